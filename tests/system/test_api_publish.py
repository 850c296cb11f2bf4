"""POST /api/publish end to end: aiohttp as the backend, websockets clients as room members."""
import asyncio

import aiohttp
import orjson
import pytest
import websockets

from gateway.broker.base import BrokerUnavailable
from tests.helpers import join_ack, raw_request, serve
from tests.redis_server import redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)

KEY = "backend-key-0123456789abcdef"


async def post(gw, body, key=KEY, headers=None, method="POST", path="/api/publish"):
    hdrs = {"Content-Type": "application/json"}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{gw.port}{path}", data=data,
                                   headers=hdrs) as r:
            return r.status, r.headers, await r.read()


async def member(gw, room):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=5)
    await ws.send(orjson.dumps({"op": "join", "room": room, "id": 1}).decode())
    assert join_ack(orjson.loads(await asyncio.wait_for(ws.recv(), 10))) == {"op": "ack", "id": 1}
    return ws


def test_publish_reaches_members_like_a_client_publish(run):
    async def main():
        async with serve(api_keys=f"{KEY},second-key-0123456789abcdef") as gw:
            a, b, other = await member(gw, "news"), await member(gw, "news"), await member(gw, "sports")
            status, headers, body = await post(gw, {"room": "news", "data": {"headline": "é", "n": [1, 2]}})
            assert status == 200 and headers["Content-Type"] == "application/json"
            assert orjson.loads(body) == {"ok": True, "seq": 1, "epoch": gw.hub.position("news")[1]}
            expected = {"op": "message", "room": "news", "data": {"headline": "é", "n": [1, 2]}, "seq": 1}
            for ws in (a, b):
                assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == expected
            # the same publication made by a client looks the same to members
            await a.send(orjson.dumps({"op": "publish", "room": "news", "data": "from a client"}).decode())
            client_pub = orjson.loads(await asyncio.wait_for(b.recv(), 10))
            assert client_pub.keys() == expected.keys() and client_pub["seq"] == 2
            status, _, body = await post(gw, {"room": "news", "data": None}, key="second-key-0123456789abcdef")
            assert status == 200 and orjson.loads(body)["seq"] == 3
            # the other room saw nothing: its next message is the one published to it
            await post(gw, {"room": "sports", "data": 7})
            assert orjson.loads(await asyncio.wait_for(other.recv(), 10))["data"] == 7
            for ws in (a, b, other):
                await ws.close()
            assert gw.api.stats.published == 3
    run(main())


@pytest.mark.parametrize("kwargs, status, code, text", [
    (dict(key=None), 401, "unauthorized", "missing or invalid API key"),
    (dict(key="wrong-key-0123456789abcdef"), 401, "unauthorized", "missing or invalid API key"),
    (dict(key=KEY[:-1]), 401, "unauthorized", "missing or invalid API key"),            # a prefix is not the key
    (dict(body=b"{not json"), 400, "bad_json", "body is not JSON"),
    (dict(body=[1, 2]), 400, "bad_json", "must be a JSON object"),
    (dict(body={"room": "news"}), 400, "bad_request", 'publish needs "data"'),
    (dict(body={"data": 1}), 400, "bad_request", 'publish needs "room"'),
    (dict(body={"rom": "news"}), 400, "bad_request",
     'publish needs "room" and "data" ("rom" is not a field: did you mean "room"?)'),
    (dict(body={"room": "", "data": 1}), 400, "bad_room", "must not be empty"),
    (dict(body={"room": "a\nb", "data": 1}), 400, "bad_room", "control"),
    (dict(body={"room": "x" * 300, "data": 1}), 400, "room_name_too_long", "limited to 200"),
    (dict(headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type", "must be JSON"),
    (dict(method="GET"), 405, "method_not_allowed", "use POST"),
], ids=["no-key", "wrong-key", "key-prefix", "not-json", "not-object", "no-data", "no-room", "typo", "empty-room",
        "control-char-room", "long-room", "content-type", "get"])
def test_rejections_are_json_with_a_code_and_a_reason(run, kwargs, status, code, text):
    kwargs = dict(kwargs)    # shared by the asyncio and uvloop runs of this case

    async def main():
        async with serve(api_keys=KEY) as gw:
            ws = await member(gw, "news")
            body = kwargs.pop("body", {"room": "news", "data": 1})
            got, headers, reply = await post(gw, body, **kwargs)
            # JSON like the successes (issue 20, item 10): a backend parses one format.
            assert got == status and headers["Content-Type"] == "application/json" and reply.count(b"\n") == 1
            doc = orjson.loads(reply)
            assert doc["ok"] is False and doc["error"] == code and text in doc["detail"], doc
            if status == 401:
                challenge = headers["WWW-Authenticate"]
                assert challenge.startswith("Bearer ")
                assert ("error=" in challenge) is (kwargs.get("key") is not None)
            # nothing was published, and the member's connection is fine
            await ws.send(orjson.dumps({"op": "publish", "room": "news", "data": "check"}).decode())
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["seq"] == 1
            await ws.close()
    run(main())


def test_api_off_without_keys_and_oversized_body(run):
    async def main():
        async with serve() as gw:
            status, _, body = await post(gw, {"room": "r", "data": 1})
            assert status == 404 and orjson.loads(body) == {"ok": False, "error": "api_off",
                                                            "detail": "the server API is off: configure api_keys"}
        async with serve(api_keys=KEY, max_message_bytes=1000) as gw:
            status, _, _ = await post(gw, {"room": "r", "data": "x" * 2000})
            assert status == 413
            # a request without Content-Length cannot smuggle a body either
            reply = await raw_request(gw.port, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                                               b"Transfer-Encoding: chunked\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 411")
    run(main())


def test_short_api_key_is_a_config_error():
    from gateway.config import load
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError, match="at least 16 characters") as info:
        load(None, env={}, overrides={"api_keys": ["short"]}, flags={"api_keys": "--api-key"})
    assert info.value.errors[0].startswith("--api-key: api_keys:")   # the flag the user typed


def test_broker_unavailable_503(run):
    async def main():
        async with serve(api_keys=KEY) as gw:
            async def down(room, data, idempotency_key=None):
                raise BrokerUnavailable("redis is down")
            gw.hub.broker.publish = down
            gw.hub._sync_publish = None
            status, headers, body = await post(gw, {"room": "r", "data": 1})
            assert status == 503 and b"broker unavailable" in body and headers["Retry-After"]
            assert orjson.loads(body)["error"] == "broker_unavailable"
            assert orjson.loads(body)["delivered_locally"] is False
            assert gw.api.stats.rejected["broker_unavailable"] == 1
    run(main())


def test_publish_through_redis_reaches_other_processes_and_503_when_down(run, redis_server):
    async def main():
        async with serve(api_keys=KEY, broker=redis_server.url) as a, \
                serve(api_keys=KEY, broker=redis_server.url) as b:
            far = await member(b, "news")                    # a member on the other gateway
            near = await member(a, "news")                   # and one on the publishing gateway
            status, _, body = await post(a, {"room": "news", "data": {"via": "redis"}})
            assert status == 200
            seq = orjson.loads(body)["seq"]
            assert orjson.loads(await asyncio.wait_for(far.recv(), 10)) == {
                "op": "message", "room": "news", "data": {"via": "redis"}, "seq": seq}
            assert orjson.loads(await asyncio.wait_for(near.recv(), 10))["seq"] == seq
            redis_server.kill()                              # the broker goes away for real
            for _ in range(500):                             # until gateway a has noticed
                if not a.hub.broker_connected:
                    break
                await asyncio.sleep(0.01)
            assert not a.hub.broker_connected
            status, headers, body = await post(a, {"room": "news", "data": 2})
            assert status == 503 and b"broker unavailable" in body and headers["Retry-After"]
            # ...but this gateway's own member got it (seq 0: not numbered), and the answer says
            # so, because a retry would repeat it for that member.
            assert orjson.loads(body)["delivered_locally"] is True
            assert orjson.loads(await asyncio.wait_for(near.recv(), 10)) == {
                "op": "message", "room": "news", "data": 2, "seq": 0}
            await far.close()
            await near.close()
    run(main())


def test_the_same_idempotency_key_twice_is_one_delivery_and_one_seq(run):
    """A backend retrying (after a timeout or a 503) with the same key publishes once."""
    async def main():
        async with serve(api_keys=KEY) as gw:
            ws = await member(gw, "orders")
            first = await post(gw, {"room": "orders", "data": {"id": 17}}, headers={"Idempotency-Key": "order-17"})
            again = await post(gw, {"room": "orders", "data": {"id": 17}}, headers={"Idempotency-Key": "order-17"})
            in_body = await post(gw, {"room": "orders", "data": {"id": 17}, "idempotency_key": "order-17"})
            assert first[0] == again[0] == in_body[0] == 200
            assert orjson.loads(first[2]) == orjson.loads(again[2]) == orjson.loads(in_body[2])
            assert orjson.loads(first[2])["seq"] == 1
            await post(gw, {"room": "orders", "data": "fence"})
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["data"] == {"id": 17}
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == {
                "op": "message", "room": "orders", "data": "fence", "seq": 2}
            status, _, body = await post(gw, {"room": "orders", "data": 1}, headers={"Idempotency-Key": "k" * 129})
            assert status == 400 and b"idempotency_key" in body
            await ws.close()
    run(main())


def test_idempotent_publish_through_redis_across_gateways(run, redis_server):
    """The key is decided in Redis: a retry sent to ANOTHER gateway is still one publication."""
    async def main():
        async with serve(api_keys=KEY, broker=redis_server.url) as a, \
                serve(api_keys=KEY, broker=redis_server.url) as b:
            ws = await member(b, "orders")
            first = await post(a, {"room": "orders", "data": 1, "idempotency_key": "x-1"})
            again = await post(b, {"room": "orders", "data": 1, "idempotency_key": "x-1"})
            assert orjson.loads(first[2]) == orjson.loads(again[2]) and orjson.loads(first[2])["seq"] == 1
            await post(a, {"room": "orders", "data": "fence"})
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["seq"] == 1
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == {
                "op": "message", "room": "orders", "data": "fence", "seq": 2}
            await ws.close()
    run(main())


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_history_api(run, broker, request):
    async def main():
        url = request.getfixturevalue("redis_server").url if broker == "redis" else "memory://"
        async with serve(api_keys=KEY, broker=url, history_size=5) as gw:
            for i in range(8):
                await post(gw, {"room": "h", "data": {"n": i}})
            status, _, body = await post(gw, {"room": "h", "since": 5, "limit": 10}, path="/api/history")
            doc = orjson.loads(body)
            assert status == 200 and doc["ok"] and doc["top"] == 8 and doc["complete"] is True
            assert doc["publications"] == [{"seq": 6, "data": {"n": 5}}, {"seq": 7, "data": {"n": 6}},
                                           {"seq": 8, "data": {"n": 7}}]
            assert isinstance(doc["epoch"], str)
            doc = orjson.loads((await post(gw, {"room": "h", "since": 6, "limit": 1}, path="/api/history"))[2])
            assert [p["seq"] for p in doc["publications"]] == [7]
            if broker == "memory":     # exactly 5 kept: what came after 0 is gone
                doc = orjson.loads((await post(gw, {"room": "h"}, path="/api/history"))[2])
                assert doc["complete"] is False and [p["seq"] for p in doc["publications"]] == [4, 5, 6, 7, 8]
            doc = orjson.loads((await post(gw, {"room": "h", "since": 8, "limit": 0}, path="/api/history"))[2])
            assert (doc["top"], doc["complete"], doc["publications"]) == (8, True, [])
            for bad in ({"room": "h", "since": -1}, {"room": "h", "limit": 5000}, {"room": "", "since": 0},
                        {"room": "h", "since": "1"}):
                status, _, body = await post(gw, bad, path="/api/history")
                assert status == 400, (bad, body)
            assert (await post(gw, {"room": "h"}, key=None, path="/api/history"))[0] == 401
    run(main())
