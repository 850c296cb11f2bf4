"""Native TLS (--certfile/--keyfile): wss:// end to end, bad clients, certificate reload on SIGHUP."""
import asyncio
import shutil
import ssl

import pytest
import websockets

from gateway.config import load
from gateway.errors import ConfigError
from tests.certs import client_context, make_cert
from tests.helpers import make_config, serve


def test_wss_echo_with_native_tls(run, tmp_path):
    cert, key = make_cert(tmp_path)

    async def main():
        async with serve(certfile=cert, keyfile=key) as gw:
            url = f"wss://127.0.0.1:{gw.port}/echo"
            async with websockets.connect(url, ssl=client_context(cert)) as ws:
                await ws.send("over TLS")
                assert await ws.recv() == "over TLS"
                big = b"\x01" * 200_000
                await ws.send(big)
                assert await ws.recv() == big
                tls = ws.transport.get_extra_info("ssl_object")
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert ws.close_code == 1000
    run(main())


def test_plaintext_and_untrusting_clients_fail_and_server_keeps_serving(run, tmp_path):
    cert, key = make_cert(tmp_path)

    async def main():
        async with serve(certfile=cert, keyfile=key, handshake_timeout=2.0) as gw:
            # Plain HTTP on the TLS port: the TLS handshake fails, nothing else happens.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            assert not data.startswith(b"HTTP/1.1 200")
            writer.close()
            # A client that does not trust the certificate refuses it.
            with pytest.raises(ssl.SSLCertVerificationError):
                await websockets.connect(f"wss://127.0.0.1:{gw.port}/echo", ssl=ssl.create_default_context())
            async with websockets.connect(f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(cert)) as ws:
                await ws.send("fine")
                assert await ws.recv() == "fine"
    run(main())


def test_sighup_reload_rotates_the_certificate_without_dropping_clients(run, tmp_path):
    cert, key = make_cert(tmp_path, "live")
    new_cert, new_key = make_cert(tmp_path, "next")

    async def main():
        async with serve(certfile=cert, keyfile=key) as gw:
            url = f"wss://127.0.0.1:{gw.port}/echo"
            old = await websockets.connect(url, ssl=client_context(cert))
            # Rotate in place, as certbot does: same paths, new files.
            shutil.copy(new_cert, cert)
            shutil.copy(new_key, key)
            gw.reload_config = lambda: gw.config
            applied = gw.reload()
            assert {"certfile", "keyfile"} <= applied
            async with websockets.connect(url, ssl=client_context(new_cert)) as ws:
                await ws.send("new cert")
                assert await ws.recv() == "new cert"
            await old.send("old connection lives on")
            assert await old.recv() == "old connection lives on"
            await old.close()
            # A broken replacement is refused; the current certificate stays.
            open(cert, "w").write("garbage")
            assert gw.reload() == set()
            async with websockets.connect(url, ssl=client_context(new_cert)) as ws:
                await ws.send("still")
                assert await ws.recv() == "still"
    run(main())


def test_turning_tls_off_needs_a_restart(run, tmp_path):
    cert, key = make_cert(tmp_path)

    async def main():
        async with serve(certfile=cert, keyfile=key) as gw:
            gw.reload_config = lambda: make_config()
            applied = gw.reload()
            assert "certfile" not in applied and gw.config.certfile == cert
    run(main())


def test_config_rejects_a_key_that_does_not_match(tmp_path):
    cert, _ = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    from gateway.app import preflight
    with pytest.raises(ConfigError, match="certfile: cannot load the certificate/key pair"):
        preflight(load(None, env={}, overrides={"certfile": cert, "keyfile": other_key}))
