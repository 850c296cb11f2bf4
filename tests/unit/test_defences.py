"""Defences end to end on real sockets: Origin, per-IP cap (and trusted proxies), message
rate limit, forbidden rooms, token expiry (4001) and refresh -- each with a bystander that
must not notice."""
import asyncio
import time

import jwt
import orjson
import pytest
import websockets

from gateway.errors import GatewayCloseCode
from tests import auth_tokens as t
from tests.helpers import join_ack, serve, ws_url

pytestmark = pytest.mark.timeout(60)


async def refused(url, **kwargs):
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.headers, response.body.decode()


async def request(ws, **doc):
    await ws.send(orjson.dumps(doc).decode())
    return orjson.loads(await asyncio.wait_for(ws.recv(), 10))


async def echo_ok(ws, text="still here"):
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 10) == text


async def until(predicate, what):
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def ws(gw, token=None, path="/ws", **kwargs):
    url = ws_url(gw, path) + (f"?token={token}" if token else "")
    return websockets.connect(url, open_timeout=5, **kwargs)


# -- Origin (RFC 6455 section 10.2) -------------------------------------------------------

def test_origin_allow_list_403_and_bystander(run):
    async def main():
        async with serve(allowed_origins="https://app.example.com,https://*.example.org") as gw:
            async with ws(gw, path="/echo", origin="https://app.example.com") as bystander:
                for bad in ("https://evil.com", "https://example.org", "http://app.example.com", "null"):
                    status, _, body = await refused(ws_url(gw), origin=bad)
                    assert status == 403 and "not allowed" in body
                async with ws(gw, path="/echo", origin="https://chat.eu.example.org") as sub:
                    await echo_ok(sub)
                async with ws(gw, path="/echo") as no_origin:    # non-browser client: no Origin header
                    await echo_ok(no_origin)
                await echo_ok(bystander)
            assert gw.limits.stats.origin_rejected == 4
    run(main())


def test_cookie_auth_without_allow_list_is_same_origin_only(run):
    async def main():
        async with serve(jwt_secret=t.SECRET, token_cookie="gw") as gw:
            cookie = {"Cookie": f"gw={t.hs256()}"}
            own = f"http://127.0.0.1:{gw.port}"
            async with ws(gw, path="/echo", origin=own, additional_headers=cookie) as same:
                await echo_ok(same)
            # a page on another site riding the visitor's cookie: cross-site WebSocket hijacking
            status, _, body = await refused(ws_url(gw), origin="https://evil.example", additional_headers=cookie)
            assert status == 403 and "same-origin" in body
    run(main())


# -- per-IP connection cap ----------------------------------------------------------------

def test_per_ip_cap_429_then_slot_freed(run):
    async def main():
        async with serve(max_connections_per_ip=2) as gw:
            async with ws(gw, path="/echo") as a, ws(gw, path="/echo") as b:
                status, headers, body = await refused(ws_url(gw))
                assert status == 429 and "too many connections from 127.0.0.1" in body and headers["Retry-After"]
                # X-Forwarded-For from an untrusted peer is ignored: no way around the cap
                status, _, _ = await refused(ws_url(gw), additional_headers={"X-Forwarded-For": "198.51.100.1"})
                assert status == 429
                await a.close()
                await until(lambda: gw.limits.per_ip.counts.get("127.0.0.1") == 1, "the server to see the close")
                async with ws(gw, path="/echo") as c:
                    await echo_ok(c)
                await echo_ok(b)
            assert gw.limits.stats.per_ip_rejected == 2
        # every connection gone: no entry left behind per address
        assert gw.limits.per_ip.counts == {}
    run(main())


def test_per_ip_cap_behind_trusted_proxy_counts_forwarded_clients(run):
    async def main():
        async with serve(max_connections_per_ip=1, trusted_proxies="127.0.0.1") as gw:
            def via(client, forged=""):
                return {"additional_headers": {"X-Forwarded-For": f"{forged}{client}"}}
            async with ws(gw, path="/echo", **via("198.51.100.1")) as one, \
                    ws(gw, path="/echo", **via("198.51.100.2")) as two:
                status, _, body = await refused(ws_url(gw), **via("198.51.100.1"))
                assert status == 429 and "198.51.100.1" in body
                # a forged left-most entry does not help: the proxy-appended address counts
                status, _, _ = await refused(ws_url(gw), **via("198.51.100.1", forged="203.0.113.99, "))
                assert status == 429
                async with ws(gw, path="/echo", additional_headers={"X-Real-IP": "198.51.100.3"}) as three:
                    await echo_ok(three)
                await echo_ok(one)
                await echo_ok(two)
                assert {c.client_ip for c in gw.connections} == {"198.51.100.1", "198.51.100.2"}
    run(main())


# -- inbound message rate (token bucket) --------------------------------------------------

def test_rate_limit_error_then_4002_bystander_unaffected(run):
    async def main():
        async with serve(rate_limit=2, rate_limit_burst=5) as gw:
            async with ws(gw) as bystander, ws(gw) as flooder:
                assert join_ack(await request(bystander, op="join", room="r", id=0)) == {"op": "ack", "id": 0}
                await asyncio.gather(*(flooder.send(orjson.dumps({"op": "publish", "room": "r", "data": i,
                                                                  "id": i}).decode()) for i in range(30)))
                replies = []
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        replies.append(orjson.loads(await asyncio.wait_for(flooder.recv(), 10)))
                assert flooder.close_code == GatewayCloseCode.RATE_LIMITED
                errors = [r for r in replies if r["op"] == "error"]
                assert [e["code"] for e in errors] == ["rate_limited"]
                acks = [r for r in replies if r["op"] == "ack"]
                assert 5 <= len(acks) < 30 and replies[-1] == errors[0]     # the error is the last word
                # the bystander got exactly the accepted publications, and still works
                got = [orjson.loads(await asyncio.wait_for(bystander.recv(), 10))["data"] for _ in acks]
                assert got == [a["id"] for a in acks]
                assert await request(bystander, op="publish", room="r", data="ok", id=99) == {
                    "op": "ack", "id": 99, "seq": len(acks) + 1}
            assert gw.limits.stats.rate_limited == 1
    run(main())


def test_rate_limit_spares_steady_clients_and_echo(run):
    async def main():
        async with serve(rate_limit=1, rate_limit_burst=5) as gw:
            async with ws(gw) as steady:
                for i in range(5):                       # within the burst: never limited
                    assert (await request(steady, op="join", room=f"r{i}", id=i))["op"] == "ack"
            async with ws(gw, path="/echo") as echo:     # /echo (conformance, benchmarks) is exempt
                await asyncio.gather(*(echo.send(f"m{i}") for i in range(50)))
                assert [await echo.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]
            assert gw.limits.stats.rate_limited == 0
    run(main())


# -- permissions, expiry and refresh on /ws -----------------------------------------------

def test_forbidden_join_and_publish(run):
    async def main():
        async with serve(jwt_secret=t.SECRET) as gw:
            token = t.hs256(sub="carol", rooms=["chat:*"], publish=["chat:public"])
            async with ws(gw, token) as c:
                assert join_ack(await request(c, op="join", room="chat:1", id=1)) == {"op": "ack", "id": 1}
                reply = await request(c, op="join", room="admin", id=2)
                assert (reply["op"], reply["code"], reply["id"]) == ("error", "forbidden", 2)
                reply = await request(c, op="publish", room="chat:1", data="x", id=3)
                assert (reply["code"], reply["id"]) == ("forbidden", 3)
                assert (await request(c, op="publish", room="chat:public", data="x", id=4))["op"] == "ack"
                assert gw.hub.is_member(next(iter(gw.connections)).state, "chat:1")
                assert not any("admin" in gw.hub.rooms_of(conn.state) for conn in gw.connections)
    run(main())


def test_expiry_closes_4001_and_refresh_extends(run):
    async def main():
        async with serve(jwt_secret=t.SECRET, jwt_leeway=0) as gw:
            exp = int(time.time()) + 2
            short = jwt.encode({"sub": "dave", "exp": exp, "rooms": ["a"]}, t.SECRET, algorithm="HS256")
            async with ws(gw, short) as expiring, ws(gw, short) as refreshed:
                assert (await request(refreshed, op="join", room="a", id=1))["op"] == "ack"
                # refresh errors first: other user, no later exp, garbage -- the connection survives them
                for bad, why in ((t.hs256(sub="mallory", ttl=600), "different user"),
                                 (short, "does not extend"),
                                 ("x.y.z", "malformed token")):
                    reply = await request(refreshed, op="refresh", token=bad, id=2)
                    assert (reply["code"], reply["id"]) == ("unauthorized", 2) and why in reply["message"]
                    assert bad not in reply["message"]
                longer = t.hs256(sub="dave", ttl=600, rooms=["a", "b"])
                assert await request(refreshed, op="refresh", token=longer, id=3) == {"op": "ack", "id": 3}
                # the refresh also brought the new permissions
                assert join_ack(await request(refreshed, op="join", room="b", id=4)) == {"op": "ack", "id": 4}
                await asyncio.wait_for(expiring.wait_closed(), 10)
                assert expiring.close_code == GatewayCloseCode.TOKEN_EXPIRED == 4001
                assert expiring.close_reason == "token expired"
                assert time.time() >= exp
                # the refreshed connection lives on past the first token's exp
                assert (await request(refreshed, op="publish", room="a", data=1, id=5))["op"] == "ack"
            stats = gw.limits.stats
            assert (stats.token_expired, stats.refreshed, stats.refresh_rejected) == (1, 1, 3)
            assert not any(gw.limits._wheel.values())     # closed connections leave the expiry wheel
    run(main())


def test_refresh_without_auth_is_unsupported(run):
    async def main():
        async with serve() as gw:
            async with ws(gw) as c:
                reply = await request(c, op="refresh", token=t.hs256(), id=1)
                assert reply["code"] == "unsupported"
    run(main())


def test_sighup_reload_rotates_keys_and_limits(run, tmp_path):
    from tests.helpers import make_config
    secret_file = tmp_path / "secret"
    secret_file.write_text(t.SECRET)

    async def main():
        async with serve(jwt_secret_file=str(secret_file)) as gw:
            async with ws(gw, t.hs256(sub="old")) as held:
                secret_file.write_text(t.OTHER_SECRET)                     # the operator rotates the key
                gw.reload_config = lambda: make_config(jwt_secret_file=str(secret_file), max_connections_per_ip=2)
                assert "max_connections_per_ip" in gw.reload()
                status, _, body = await refused(ws_url(gw, "/ws") + "?token=" + t.hs256())
                assert status == 401 and "signature verification failed" in body
                async with ws(gw, t.hs256(secret=t.OTHER_SECRET, sub="new")) as fresh:
                    assert (await request(fresh, op="join", room="r", id=1))["op"] == "ack"
                    status, _, _ = await refused(ws_url(gw, "/ws") + "?token=" + t.hs256(secret=t.OTHER_SECRET))
                    assert status == 429                                    # the new per-IP limit applies
                # a broken new configuration keeps the running keys
                secret_file.unlink()
                gw.reload_config = lambda: make_config(jwt_secret_file=str(secret_file))
                gw.reload()
                async with ws(gw, t.hs256(secret=t.OTHER_SECRET, sub="again")):
                    pass
                assert (await request(held, op="join", room="r", id=2))["op"] == "ack"   # untouched
    run(main())
