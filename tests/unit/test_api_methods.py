"""The server API's method table in one process (memory backend): aiohttp as the backend,
websockets clients as the members. Cross-process behaviour: tests/system/test_presence_cluster.py.
"""
from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
import pytest
import websockets

from gateway.api.methods import METHODS
from gateway.app import start_gateway
from gateway.config import RoomPolicy
from tests import auth_tokens
from tests.helpers import make_config

pytestmark = pytest.mark.timeout(60)

KEY = "backend-key-0123456789abcdef"
RULES = [{"pattern": "chat.*", "presence": True, "join_leave": True}]


@contextlib.asynccontextmanager
async def gateway(**overrides):
    config = make_config(**{"api_keys": KEY, **overrides})
    gw = await start_gateway(config.replace(room_policies=tuple(RoomPolicy(**r) for r in RULES)))
    try:
        yield gw
    finally:
        await gw.shutdown(timeout=1.0)


async def post(port, method, body, key=KEY, raw=None, ctype="application/json"):
    headers = {"Content-Type": ctype}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/api/{method}", headers=headers,
                                data=raw if raw is not None else orjson.dumps(body)) as r:
            text = await r.read()
            assert text.endswith(b"\n") and text.count(b"\n") == 1 and r.headers["Content-Type"] == "application/json"
            return r.status, orjson.loads(text), r.headers


async def member(gw, room, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", additional_headers=headers, open_timeout=5)
    await ws.send(orjson.dumps({"op": "join", "room": room, "id": 1}).decode())
    while orjson.loads(await asyncio.wait_for(ws.recv(), 10)).get("id") != 1:
        pass
    return ws


async def next_op(ws, op):
    while True:
        doc = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if doc["op"] == op:
            return doc


@pytest.mark.parametrize("method, body, key, raw, ctype, status, error, detail", [
    ("nope", {}, KEY, None, "application/json", 404, "unknown_method", "no API method 'nope'"),
    ("publish", {}, None, None, "application/json", 401, "unauthorized", "missing or invalid API key"),
    ("publish", {}, "wrong-key-0123456789abcdef", None, "application/json", 401, "unauthorized", "invalid API key"),
    ("nope", {}, "wrong-key-0123456789abcdef", None, "application/json", 401, "unauthorized", "invalid API key"),
    ("broadcast", None, KEY, b"{oops", "application/json", 400, "bad_json", "body is not JSON"),
    ("broadcast", None, KEY, b"[1]", "application/json", 400, "bad_json", "must be a JSON object"),
    ("broadcast", {"rooms": "a", "data": 1}, KEY, None, "application/json", 400, "bad_request", '"rooms" must be'),
    ("broadcast", {"rooms": ["a", "a"], "data": 1}, KEY, None, "application/json", 400, "bad_request", "twice"),
    ("broadcast", {"rooms": ["a", ""], "data": 1}, KEY, None, "application/json", 400, "bad_room", "room"),
    ("disconnect", {}, KEY, None, "application/json", 400, "bad_request", 'exactly one of "user"'),
    ("disconnect", {"user": "u", "client": "c"}, KEY, None, "application/json", 400, "bad_request", "exactly one"),
    ("disconnect", {"user": "u", "code": 1000}, KEY, None, "application/json", 400, "bad_request", '"code" must be'),
    ("disconnect", {"user": "u", "code": 4600}, KEY, None, "application/json", 400, "bad_request", "4005-4499"),
    ("disconnect", {"user": "u", "reconnect": False, "code": 4100}, KEY, None, "application/json", 400,
     "bad_request", "4500-4999"),
    ("unsubscribe", {"user": "u"}, KEY, None, "application/json", 400, "bad_request", "room"),
    ("presence", {"room": "other"}, KEY, None, "application/json", 400, "presence_disabled", "not enabled"),
    ("presence", {"room": "chat.1", "limit": 0}, KEY, None, "application/json", 400, "bad_request", '"limit"'),
    ("rooms", {"limit": "x"}, KEY, None, "application/json", 400, "bad_request", '"limit"'),
    ("revoke_token", {}, KEY, None, "application/json", 400, "bad_request", '"jti"'),
    ("revoke_token", {"jti": "x", "until": 5}, KEY, None, "application/json", 400, "bad_request", "in the past"),
    ("revoke_user", {"user": ""}, KEY, None, "application/json", 400, "bad_request", '"user"'),
    ("publish", {"room": "r", "data": 1}, KEY, None, "text/plain", 415, "unsupported_media_type", "must be JSON"),
], ids=["unknown-method", "no-key", "bad-key", "bad-key-before-method", "not-json", "not-object", "rooms-not-list",
        "room-twice", "empty-room", "no-target", "two-targets", "code-range", "code-vs-reconnect",
        "code-vs-no-reconnect", "unsubscribe-no-room", "presence-off", "bad-limit", "rooms-bad-limit", "no-jti",
        "until-past", "empty-user", "content-type"])
def test_errors_are_clear_json(run, method, body, key, raw, ctype, status, error, detail):
    async def main():
        async with gateway() as gw:
            got, doc, headers = await post(gw.port, method, body, key=key, raw=raw, ctype=ctype)
            assert (got, doc["ok"], doc["error"]) == (status, False, error), doc
            assert detail in doc["detail"], doc
            if error == "unknown_method":
                assert doc["methods"] == sorted(METHODS)
            if status == 401:
                assert headers["WWW-Authenticate"].startswith("Bearer ")
    run(main())


def test_get_and_api_off(run):
    async def main():
        async with gateway() as gw:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{gw.port}/api/info") as r:
                    assert r.status == 405 and (await r.json())["error"] == "method_not_allowed"
        async with gateway(api_keys="") as gw:
            status, doc, _ = await post(gw.port, "info", {})
            assert status == 404 and doc["error"] == "api_off"
    run(main())


def test_broadcast_rooms_info_in_one_process(run):
    async def main():
        async with gateway() as gw:
            a, b = await member(gw, "news"), await member(gw, "sports")
            c = await member(gw, "sports")
            status, doc, _ = await post(gw.port, "broadcast", {"rooms": ["news", "sports", "empty"], "data": {"x": 1}})
            assert status == 200
            assert [(r["room"], r["seq"]) for r in doc["results"]] == [("news", 1), ("sports", 1), ("empty", 1)]
            assert all(isinstance(r["epoch"], str) and r["epoch"] for r in doc["results"])   # positions (history)
            for ws, room in ((a, "news"), (b, "sports"), (c, "sports")):
                assert await next_op(ws, "message") == {"op": "message", "room": room, "data": {"x": 1}, "seq": 1}
            status, doc, _ = await post(gw.port, "rooms", {})
            assert doc["rooms"] == [{"room": "news", "connections": 1}, {"room": "sports", "connections": 2}]
            assert doc["total"] == 2 and doc["nodes"] == 1 and doc["missing"] == []
            status, doc, _ = await post(gw.port, "rooms", {"pattern": "sp*"})
            assert doc["rooms"] == [{"room": "sports", "connections": 2}]
            status, doc, _ = await post(gw.port, "info", {})
            assert doc["processes"] == 1 and doc["connections"] == 3
            [node] = doc["nodes"]
            assert node["node"] == gw.presence.backend.node and node["rooms"] == 2 and node["uptime"] >= 0
            for ws in (a, b, c):
                await ws.close()
    run(main())


def test_disconnect_unsubscribe_presence_in_one_process(run):
    async def main():
        async with gateway(jwt_secret=auth_tokens.SECRET) as gw:
            alice = await member(gw, "chat.1", auth_tokens.hs256(sub="alice"))
            bob = await member(gw, "chat.1", auth_tokens.hs256(sub="bob"))
            for _ in range(100):
                status, doc, _ = await post(gw.port, "presence_stats", {"room": "chat.1"})
                if doc["users"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert doc == {"ok": True, "room": "chat.1", "connections": 2, "users": 2}
            status, doc, _ = await post(gw.port, "presence", {"room": "chat.1", "limit": 1})
            assert doc["members"] == [{"user": "alice", "connections": 1}] and doc["next"] == "alice"
            status, doc, _ = await post(gw.port, "unsubscribe", {"user": "alice", "room": "chat.1"})
            assert doc["unsubscribed"] == 1
            assert await next_op(alice, "unsubscribed") == {"op": "unsubscribed", "room": "chat.1",
                                                             "reason": "removed by the server"}
            status, doc, _ = await post(gw.port, "disconnect", {"user": "bob"})
            assert doc == {"ok": True, "disconnected": 1, "code": 4005, "nodes": 1, "missing": []}
            await asyncio.wait_for(bob.wait_closed(), 10)
            assert (bob.close_code, bob.close_reason) == (4005, "disconnected by the server")
            status, doc, _ = await post(gw.port, "disconnect", {"user": "nobody"})
            assert doc["disconnected"] == 0
            await alice.close()
    run(main())


def test_revocation_in_one_process(run):
    async def main():
        async with gateway(jwt_secret=auth_tokens.SECRET) as gw:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            stolen = auth_tokens.hs256(sub="v", jti="abc")
            status, doc, _ = await post(gw.port, "revoke_token", {"jti": "abc"})
            assert status == 200 and doc["until"] > 0
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(url, additional_headers={"Authorization": f"Bearer {stolen}"})
            assert refused.value.response.status_code == 401
            assert gw.limits.stats.revoked == 1
            ok = await websockets.connect(url, additional_headers={
                "Authorization": f"Bearer {auth_tokens.hs256(sub='v', jti='other')}"})
            await ok.close()
    run(main())


def test_private_api_port(run):
    async def main():
        from tests.helpers import free_port
        port = free_port()
        async with gateway(api_port=port) as gw:
            assert gw.api_port == port
            status, doc, _ = await post(port, "info", {})
            assert status == 200 and doc["processes"] == 1
            # not on the public port
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{gw.port}/api/info", data=b"{}",
                                        headers={"Authorization": f"Bearer {KEY}"}) as r:
                    assert r.status == 404
    run(main())


def test_a_feature_registers_its_own_method(run):
    from gateway.api.methods import ApiError, register_method

    async def echo(api, doc):
        if "x" not in doc:
            raise ApiError(400, "bad_request", 'echo needs "x"')
        return {"x": doc["x"]}

    async def main():
        register_method("echo_for_test", echo)
        try:
            async with gateway() as gw:
                assert (await post(gw.port, "echo_for_test", {"x": [1]}))[:2] == (200, {"ok": True, "x": [1]})
                status, doc, _ = await post(gw.port, "echo_for_test", {})
                assert (status, doc["error"]) == (400, "bad_request")
            with pytest.raises(ValueError, match="already registered"):
                register_method("publish", echo)
        finally:
            METHODS.pop("echo_for_test", None)
    run(main())
