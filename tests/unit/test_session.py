"""/ws end to end with independent clients (websockets, aiohttp): the rooms protocol and its errors."""
import asyncio
import socket

import aiohttp
import msgpack
import orjson
import pytest
import websockets

from gateway.broker.base import BrokerUnavailable
from gateway.errors import GatewayCloseCode
from tests.helpers import join_ack, serve, upgrade_request

pytestmark = pytest.mark.timeout(60)


class Client:
    """A websockets client speaking JSON (or msgpack) dicts."""

    def __init__(self, ws, packer=False):
        self.ws = ws
        self.packer = packer

    @classmethod
    async def open(cls, gw, msgpack_proto=False):
        url = f"ws://127.0.0.1:{gw.port}/ws"
        if msgpack_proto:
            ws = await websockets.connect(url, subprotocols=["ws-gateway.msgpack"])
        else:
            ws = await websockets.connect(url)
        return cls(ws, msgpack_proto)

    async def send(self, **doc):
        await self.ws.send(msgpack.packb(doc) if self.packer else orjson.dumps(doc).decode())

    async def recv(self):
        raw = await asyncio.wait_for(self.ws.recv(), 10)
        return msgpack.unpackb(raw) if self.packer else orjson.loads(raw)

    async def request(self, **doc):
        await self.send(**doc)
        return await self.recv()

    async def close(self):
        await self.ws.close()


async def until(predicate, what="condition"):
    """Wait (bounded) for server-side state reached through the loop we share with it."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_join_publish_leave_with_acks_and_seq(run):
    async def main():
        async with serve() as gw:
            a, b = await Client.open(gw), await Client.open(gw)
            assert join_ack(await a.request(op="join", room="lobby", id=1)) == {"op": "ack", "id": 1}
            assert join_ack(await b.request(op="join", room="lobby", id="j")) == {"op": "ack", "id": "j"}
            assert join_ack(await a.request(op="join", room="lobby", id=2)) == {"op": "ack", "id": 2}   # idempotent
            await a.send(op="publish", room="lobby", data={"text": "hi", "n": [1, 2]}, id="p1")
            assert await a.recv() == {"op": "ack", "id": "p1", "seq": 1}
            expected = {"op": "message", "room": "lobby", "data": {"text": "hi", "n": [1, 2]}, "seq": 1}
            assert await a.recv() == expected          # the sender is a member too
            assert await b.recv() == expected
            await b.send(op="publish", room="lobby", data="second")          # no id: no ack
            assert (await a.recv())["seq"] == 2 and (await b.recv())["data"] == "second"
            assert await b.request(op="leave", room="lobby", id=3) == {"op": "ack", "id": 3}
            await a.send(op="publish", room="lobby", data=3)
            assert await a.recv() == {"op": "message", "room": "lobby", "data": 3, "seq": 3}
            assert gw.hub.members == 1
            # b left: the next thing it sees is its own request's answer, not room traffic.
            assert (await b.request(op="leave", room="lobby", id=4))["code"] == "not_member"
            await a.close()
            await b.close()
            await until(lambda: gw.hub.members == 0 and not gw.hub.rooms, "cleanup")
    run(main())


def test_join_then_publish_in_one_burst_keeps_order(run):
    """The first join waits for the broker subscribe; the publish behind it must wait too."""
    async def main():
        async with serve() as gw:
            a = await Client.open(gw)
            await a.send(op="join", room="fresh", id=1)
            await a.send(op="publish", room="fresh", data="x", id=2)
            got = [await a.recv() for _ in range(3)]
            assert got[0]["seq"] == 0 and got[0]["epoch"]
            got[0] = join_ack(got[0])
            assert got == [{"op": "ack", "id": 1}, {"op": "ack", "id": 2, "seq": 1},
                           {"op": "message", "room": "fresh", "data": "x", "seq": 1}]
            await a.close()
    run(main())


def test_msgpack_subprotocol(run):
    async def main():
        async with serve() as gw:
            m = await Client.open(gw, msgpack_proto=True)
            j = await Client.open(gw)
            assert m.ws.subprotocol == "ws-gateway.msgpack"
            assert join_ack(await m.request(op="join", room="r", id=1)) == {"op": "ack", "id": 1}
            await j.request(op="join", room="r", id=1)
            await j.send(op="publish", room="r", data={"k": [1, "two", None]})
            want = {"op": "message", "room": "r", "data": {"k": [1, "two", None]}, "seq": 1}
            raw = await asyncio.wait_for(m.ws.recv(), 10)
            assert isinstance(raw, bytes) and msgpack.unpackb(raw) == want
            assert await j.recv() == want
            await m.send(op="publish", room="r", data={"from": "msgpack"}, id=9)
            assert await m.recv() == {"op": "ack", "id": 9, "seq": 2}
            assert (await j.recv())["data"] == {"from": "msgpack"}
            assert (await m.recv())["seq"] == 2          # its own message, msgpack-encoded
            # msgpack can carry what JSON cannot: refused with a clear code.
            await m.ws.send(msgpack.packb({"op": "publish", "room": "r", "data": b"\x00\x01", "id": 3}))
            assert (await m.recv())["code"] == "bad_request"
            # A JSON text frame is still understood; the answer is msgpack.
            await m.ws.send('{"op":"leave","room":"r","id":4}')
            assert await m.recv() == {"op": "ack", "id": 4}
            await m.close()
            await j.close()
    run(main())


def test_aiohttp_client_sees_the_same_protocol(run):
    async def main():
        async with serve() as gw, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://127.0.0.1:{gw.port}/ws") as ws:
                await ws.send_str('{"op":"join","room":"x","id":1}')
                assert join_ack(orjson.loads((await ws.receive(timeout=10)).data)) == {"op": "ack", "id": 1}
                await ws.send_str('{"op":"publish","room":"x","data":null}')
                assert orjson.loads((await ws.receive(timeout=10)).data) == {
                    "op": "message", "room": "x", "data": None, "seq": 1}
    run(main())


@pytest.mark.parametrize("frame, code", [
    ("{not json", "bad_json"),
    ("[]", "bad_json"),
    ('{"op":"fly","id":1}', "unknown_op"),
    ('{"op":"join","id":1}', "bad_request"),
    ('{"op":"join","room":7,"id":1}', "bad_request"),
    ('{"op":"join","room":"","id":1}', "bad_room"),
    ('{"op":"join","room":"bad\\u0007bell","id":1}', "bad_room"),
    ('{"op":"join","room":"' + "r" * 201 + '","id":1}', "room_name_too_long"),
    ('{"op":"publish","room":"x","id":1}', "bad_request"),
    ('{"op":"leave","room":"never-joined","id":1}', "not_member"),
    ('{"op":"refresh","token":"abc","id":1}', "unsupported"),
    (b"\x93\x01\x02\x03", "bad_json"),          # binary without the msgpack subprotocol
])
def test_every_bad_input_gets_a_coded_error_and_harms_nobody(run, frame, code):
    async def main():
        async with serve() as gw:
            bystander = await Client.open(gw)
            await bystander.request(op="join", room="calm", id=0)
            bad = await Client.open(gw)
            await bad.ws.send(frame)
            reply = await bad.recv()
            assert reply["op"] == "error" and reply["code"] == code and reply["message"]
            if frame[:1] == "{" and '"id":1' in frame:
                assert reply["id"] == 1
            # Still usable, and the bystander never noticed.
            assert join_ack(await bad.request(op="join", room="calm", id=5)) == {"op": "ack", "id": 5}
            await bystander.send(op="publish", room="calm", data="ok")
            assert (await bystander.recv())["data"] == "ok"
            assert gw.endpoints["/ws"].stats.errors[code] == 1
            await bad.close()
            await bystander.close()
    run(main())


def test_too_many_rooms(run):
    async def main():
        async with serve(max_rooms_per_connection=3) as gw:
            c = await Client.open(gw)
            for i in range(3):
                assert (await c.request(op="join", room=f"r{i}", id=i))["op"] == "ack"
            reply = await c.request(op="join", room="r3", id=3)
            assert (reply["code"], reply["id"]) == ("too_many_rooms", 3)
            assert await c.request(op="leave", room="r0", id=4) == {"op": "ack", "id": 4}
            assert join_ack(await c.request(op="join", room="r3", id=5)) == {"op": "ack", "id": 5}
            await c.close()
    run(main())


def test_repeated_abuse_closes_with_4003_but_good_requests_reset_the_count(run):
    async def main():
        async with serve(max_consecutive_errors=3) as gw:
            c = await Client.open(gw)
            for _ in range(2):
                await c.ws.send("garbage")
                assert (await c.recv())["code"] == "bad_json"
            assert join_ack(await c.request(op="join", room="r", id=1)) == {"op": "ack", "id": 1}   # resets
            for _ in range(3):
                await c.ws.send("garbage")
            for _ in range(3):
                assert (await c.recv())["code"] == "bad_json"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == GatewayCloseCode.TOO_MANY_ERRORS == 4003
            await until(lambda: gw.hub.members == 0, "the abuser's memberships to go")
            assert gw.endpoints["/ws"].stats.too_many_errors_closes == 1
    run(main())


def test_abrupt_disconnect_cleans_membership_and_unsubscribes(run):
    async def main():
        async with serve() as gw:
            broker = gw.hub.broker
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(upgrade_request("/ws"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 101 " in head
            # Masked text frame {"op":"join","room":"gone"} (mask 0: XOR is the identity).
            payload = b'{"op":"join","room":"gone"}'
            writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload)
            await writer.drain()
            await until(lambda: gw.hub.members == 1, "join")
            assert broker.stats()["rooms"] == 1
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()          # RST, no close frame
            await until(lambda: gw.hub.members == 0 and not gw.hub.rooms and not gw.hub.member_rooms, "cleanup")
            await until(lambda: broker.stats()["rooms"] == 0, "broker unsubscribe")
            assert gw.endpoints["/ws"].sessions == 0
    run(main())


class Principal:
    user = "alice"
    expires_at = None

    def can_join(self, room):
        return room.startswith("public.")

    def can_publish(self, room):
        return room == "public.chat"


def test_forbidden_rooms_when_a_principal_is_attached(run):
    async def main():
        async with serve() as gw:
            def attach(conn, request):
                conn.principal = Principal()
            gw.admission_hooks.append(attach)
            c = await Client.open(gw)
            assert join_ack(await c.request(op="join", room="public.news", id=1)) == {"op": "ack", "id": 1}
            reply = await c.request(op="join", room="private", id=2)
            assert (reply["code"], reply["id"]) == ("forbidden", 2)
            reply = await c.request(op="publish", room="public.news", data=1, id=3)
            assert reply["code"] == "forbidden"
            assert (await c.request(op="publish", room="public.chat", data=1, id=4))["op"] == "ack"
            assert not gw.hub.is_member(gw.connections.copy().pop().state, "private")
            await c.close()
    run(main())


def test_refresh_calls_the_gateway_hook(run):
    async def main():
        async with serve() as gw:
            seen = []

            async def refresh(conn, token):
                seen.append(token)
                if token == "bad":
                    raise ValueError("expired")
                return object()

            gw.refresh_token = refresh
            c = await Client.open(gw)
            assert await c.request(op="refresh", token="good", id=1) == {"op": "ack", "id": 1}
            reply = await c.request(op="refresh", token="bad", id=2)
            assert (reply["code"], reply["id"]) == ("unauthorized", 2) and "expired" in reply["message"]
            assert seen == ["good", "bad"]
            await c.close()
    run(main())


def test_ping_is_answered_with_pong_and_is_not_an_error(run):
    """The SDK's liveness probe: answered in order with the other replies, never counted as
    a client error (an idle page pings forever without reaching max_consecutive_errors)."""
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            assert await c.request(op="ping") == {"op": "pong"}
            assert await c.request(op="ping", id="p1") == {"op": "pong", "id": "p1"}
            for _ in range(gw.config.max_consecutive_errors + 2):
                assert await c.request(op="ping") == {"op": "pong"}
            assert join_ack(await c.request(op="join", room="r", id=1)) == {"op": "ack", "id": 1}
            ep = gw.endpoints["/ws"]
            assert ep.stats.pings == gw.config.max_consecutive_errors + 4 and not ep.stats.errors
            await c.close()
    run(main())


def test_broker_unavailable_rolls_the_join_back(run):
    async def main():
        async with serve() as gw:
            hub = gw.hub

            # What redis-py says: the broker's address must not reach clients.
            async def down(room):
                raise BrokerUnavailable("redis unavailable: ConnectionError: Error 111 connecting to 10.9.8.7:6379.")

            async def publish_down(room, data, idempotency_key=None):
                raise BrokerUnavailable("redis unavailable (ConnectionError: Error 111 connecting to 10.9.8.7:6379.)")

            original = hub.broker.subscribe
            hub.broker.subscribe = down
            c = await Client.open(gw)
            reply = await c.request(op="join", room="r", id=1)
            assert (reply["code"], reply["id"]) == ("broker_unavailable", 1)
            assert reply["message"] == "cannot join now: the message broker is unavailable; retry later"
            assert hub.members == 0 and not hub.rooms
            hub.broker.subscribe = original
            assert join_ack(await c.request(op="join", room="r", id=2)) == {"op": "ack", "id": 2}
            hub._sync_publish = None            # as with Redis: publish is a coroutine
            hub.broker.publish = publish_down
            reply = await c.request(op="publish", room="r", data=1, id=3)
            assert (reply["code"], reply["id"]) == ("broker_unavailable", 3)
            assert "10.9.8.7" not in reply["message"] and "6379" not in reply["message"]
            # broker_unavailable is not the client's fault: it does not count towards 4003.
            assert gw.endpoints["/ws"].stats.errors["broker_unavailable"] == 2
            await c.close()
    run(main())


def test_backend_publish_through_the_hub(run):
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            await c.request(op="join", room="news", id=1)
            seq, _ = await gw.hub.publish("news", orjson.dumps({"headline": "hub"}))
            assert await c.recv() == {"op": "message", "room": "news", "data": {"headline": "hub"}, "seq": seq}
            await c.close()
    run(main())


def test_readiness_reflects_the_broker(run):
    async def main():
        async with serve() as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 200 " in (await reader.read(1000))
            gw.hub.handle_broker_state(False)
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.read(1000)
            assert b" 503 " in answer and b"broker" in answer
    run(main())


def test_a_flooding_publisher_is_paused_and_resumed_without_loss(run):
    """One read can carry many publications: past max_unflushed_bytes the publisher is not
    read again until the pass's frames went out, and nothing is lost."""
    async def main():
        async with serve(rate_limit=0) as gw:
            gw.hub.max_unflushed_bytes = 10_000
            sub = await Client.open(gw)
            await sub.request(op="join", room="flood", id=1)
            pub = await Client.open(gw)
            n = 300
            for i in range(n):
                await pub.send(op="publish", room="flood", data={"i": i, "pad": "p" * 500})
            got = [(await sub.recv())["data"]["i"] for _ in range(n)]
            assert got == list(range(n))
            assert gw.hub.publisher_pauses > 0
            await pub.close()
            await sub.close()
    run(main())
