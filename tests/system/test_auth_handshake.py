"""Authentication before the 101, end to end: real sockets, websockets/aiohttp/raw clients.

Every rejection path answers with the right status, a one-line reason and the RFC 6750
challenge, never logs the token, and leaves an authenticated bystander untouched.
"""
import asyncio
import logging

import aiohttp
import pytest
import websockets

from tests import auth_tokens as t
from tests.helpers import GatewayProcess, serve, upgrade_request, ws_url


async def refused(url, **kwargs):
    """Connect expecting an HTTP refusal; return (status, headers, body text)."""
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.headers, response.body.decode()


async def handshake_head(port, extra):
    """A raw upgrade with extra header lines; the response head (and body, for a refusal)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(extra=extra))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if not head.startswith(b"HTTP/1.1 101"):
        head += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return head


def bearer(token):
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def echo_ok(ws, text="still here"):
    await ws.send(text)
    assert await ws.recv() == text


@pytest.fixture(scope="module")
def rsa_key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "rs256.pub.pem"
    path.write_bytes(t.RSA_PUBLIC_PEM)
    return str(path)


def test_valid_token_by_header_query_and_cookie(run):
    async def main():
        async with serve(jwt_secret=t.SECRET, token_cookie="gw") as gw:
            async with websockets.connect(ws_url(gw), **bearer(t.hs256(sub="h"))) as ws:
                await echo_ok(ws)
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url(gw) + "?token=" + t.hs256(sub="q")) as ws:
                    await ws.send_str("via query")
                    assert (await ws.receive()).data == "via query"
            assert (await handshake_head(gw.port, f"Cookie: x=1; gw={t.hs256(sub='c')}\r\n")).startswith(b"HTTP/1.1 101")
            bad_cookie = await handshake_head(gw.port, f"Cookie: gw={t.hs256(secret=t.OTHER_SECRET)}\r\n")
            assert bad_cookie.startswith(b"HTTP/1.1 401") and b"signature verification failed" in bad_cookie
    run(main())


def scoped(**kw):
    """An HS256 token for the gateway of the test below (aud gw, iss idp) unless overridden."""
    kw.setdefault("aud", "gw")
    kw.setdefault("iss", "idp")
    return t.hs256(**kw)


BAD_HS = [
    ("no-token", lambda: None, "authentication required", None),
    ("bad-signature", lambda: scoped(secret=t.OTHER_SECRET), "signature verification failed", "invalid_token"),
    ("alg-none", lambda: t.unsigned(), "algorithm none not accepted", "invalid_token"),
    ("wrong-alg", lambda: t.rs256(), "algorithm RS256 not accepted", "invalid_token"),
    ("expired", lambda: scoped(ttl=-120), "token expired", "invalid_token"),
    ("wrong-aud", lambda: scoped(aud="other"), "token audience not accepted", "invalid_token"),
    ("wrong-iss", lambda: scoped(iss="evil"), "token issuer not accepted", "invalid_token"),
    ("garbage", lambda: "abc.def.ghi", "malformed token", "invalid_token"),
]


@pytest.mark.parametrize("make, reason, error", [c[1:] for c in BAD_HS], ids=[c[0] for c in BAD_HS])
def test_rejections_401_with_reason_and_bystander_unaffected(run, make, reason, error, caplog):
    async def main():
        async with serve(jwt_secret=t.SECRET, jwt_audience="gw", jwt_issuer="idp", jwt_leeway=0) as gw:
            good = scoped(sub="bystander")
            async with websockets.connect(ws_url(gw), **bearer(good)) as bystander:
                token = make()
                with caplog.at_level(logging.DEBUG, logger="gateway"):
                    status, headers, body = await refused(ws_url(gw), **(bearer(token) if token else {}))
                assert status == 401
                assert body.startswith(reason) and body.endswith("\n") and body.count("\n") == 1
                challenge = headers["WWW-Authenticate"]
                assert challenge.startswith('Bearer realm="ws-gateway"')
                assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)
                if token:   # tokens never reach the logs, not even in structured fields
                    ours = [r for r in caplog.records if r.name.startswith("gateway")]   # not the client's own
                    logged = " ".join(f"{r.getMessage()} {vars(r)}" for r in ours)
                    assert token not in logged and token.split(".")[1] not in logged
                    assert any(getattr(r, "status", None) == 401 for r in ours)
                await echo_ok(bystander)
            assert gw.limits.stats.auth_rejected
    run(main())


def test_algorithm_confusion_and_none_refused_by_rs256_gateway(run, rsa_key_file):
    async def main():
        async with serve(jwt_public_key_file=rsa_key_file) as gw:
            async with websockets.connect(ws_url(gw), **bearer(t.rs256(sub="ok"))) as ws:
                await echo_ok(ws)
                # HS256 "signed" with the gateway's own public key as the HMAC secret (RFC 8725 section 2.1)
                status, headers, body = await refused(ws_url(gw), **bearer(t.hs256_with_public_key()))
                assert status == 401 and body.startswith("algorithm HS256 not accepted")
                status, _, body = await refused(ws_url(gw), **bearer(t.unsigned()))
                assert status == 401 and body.startswith("algorithm none not accepted")
                status, _, body = await refused(ws_url(gw) + "?token=" + t.es256())
                assert status == 401 and body.startswith("algorithm ES256 not accepted")
                await echo_ok(ws)
    run(main())


def test_malformed_requests_400_and_token_without_rooms_403(run):
    async def main():
        async with serve(jwt_secret=t.SECRET) as gw:
            status, headers, body = await refused(ws_url(gw) + "?token=" + t.hs256(), **bearer(t.hs256()))
            assert status == 400 and "more than one method" in body
            assert 'error="invalid_request"' in headers["WWW-Authenticate"]
            status, _, body = await refused(ws_url(gw), additional_headers={"Authorization": "Basic dTpw"})
            assert status == 400 and "Bearer scheme" in body
            status, _, body = await refused(ws_url(gw), **bearer(t.hs256(rooms=[], publish=[])))
            assert status == 403 and "grants no rooms" in body
            assert gw.limits.stats.forbidden == 1
    run(main())


def test_plain_get_of_ws_tells_401_403_before_426(run):
    """What the JS SDK's pre-flight relies on: a GET of /ws without the upgrade headers (all a
    browser's fetch can send) answers 401/403 for a refused token, 426 for a good one."""
    async def main():
        async with serve(jwt_secret=t.SECRET) as gw:
            base = f"http://127.0.0.1:{gw.port}/ws"
            async with aiohttp.ClientSession() as session:
                async def status(url):
                    async with session.get(url) as resp:
                        return resp.status, resp.headers.get("WWW-Authenticate", ""), await resp.text()
                code, challenge, body = await status(base + "?token=" + t.hs256(secret=t.OTHER_SECRET))
                assert code == 401 and "invalid_token" in challenge and "signature" in body
                code, _, _ = await status(base)
                assert code == 401
                code, _, body = await status(base + "?token=" + t.hs256(rooms=[], publish=[]))
                assert code == 403 and "grants no rooms" in body
                code, _, _ = await status(base + "?token=" + t.hs256())
                assert code == 426
            assert gw.open_connections == 0
    run(main())


def test_max_connections_503_bystander_unaffected(run):
    async def main():
        async with serve(max_connections=1) as gw:
            async with websockets.connect(ws_url(gw)) as first:
                status, headers, body = await refused(ws_url(gw))
                assert status == 503 and "connection limit" in body and headers["Retry-After"]
                await echo_ok(first)
    run(main())


def test_cli_flags_end_to_end_and_open_mode_warning(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(t.SECRET)

    async def main(port, expect_open):
        url = f"ws://127.0.0.1:{port}/echo"
        if expect_open:
            async with websockets.connect(url) as ws:
                await echo_ok(ws)
            return
        status, _, body = await refused(url)
        assert status == 401
        async with websockets.connect(url + "?token=" + t.hs256()) as ws:
            await echo_ok(ws)

    with GatewayProcess("--echo", "--jwt-secret-file", str(secret_file), "--jwt-leeway", "5") as gw:
        asyncio.run(main(gw.port, expect_open=False))
        assert "AUTHENTICATION IS OFF" not in gw.output()
        assert t.SECRET not in gw.output()
    with GatewayProcess("--echo") as gw:
        asyncio.run(main(gw.port, expect_open=True))
        assert "AUTHENTICATION IS OFF" in gw.output()


def test_bad_key_file_refuses_to_start(tmp_path):
    private = tmp_path / "private.pem"
    private.write_bytes(t.RSA_PRIVATE_PEM)
    for args, message in ((["--jwt-public-key-file", str(tmp_path / "missing.pem")], "cannot read"),
                          (["--jwt-public-key-file", str(private)], "PRIVATE key"),
                          (["--jwt-secret", "short"], "at least 32 bytes"),
                          (["--allowed-origins", "not-an-origin"], "allowed_origins")):
        proc = GatewayProcess(*args)
        with pytest.raises(RuntimeError, match=message) as info:
            proc.start(timeout=10)
        assert "exited with 2" in str(info.value)


def test_check_config_validates_key_files(tmp_path):
    import subprocess
    import sys
    from tests.helpers import ROOT
    good = tmp_path / "good.toml"
    good.write_text(f'jwt_secret = "{t.SECRET}"\napi_keys = ["k123456789abcdef0"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(f'jwt_public_key_file = "{tmp_path / "missing.pem"}"\n')
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(good)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert t.SECRET not in out.stdout and "k123456789abcdef0" not in out.stdout   # secrets redacted
    assert 'jwt_secret = "<redacted>"' in out.stdout
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "jwt_public_key_file: cannot read" in out.stderr
