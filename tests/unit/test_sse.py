"""GET /sse against an in-process gateway with aiohttp as the client: events, ids that
resume every room (Last-Event-ID), reset events, admission like /ws, drain, slow consumers."""
from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from gateway.server.sse import parse_last_event_id
from tests.auth_tokens import SECRET, hs256
from tests.helpers import raw_request, serve
from tests.unit.test_session import Client


class Events:
    """An SSE reader: parses `id:`/`event:`/`data:` fields into (id, type, data) tuples."""

    def __init__(self, response) -> None:
        self.response = response
        self.buf = b""
        self.last_id = ""

    async def next(self) -> tuple:
        while b"\n\n" not in self.buf:
            chunk = await asyncio.wait_for(self.response.content.readany(), 10)
            assert chunk, "stream ended"
            self.buf += chunk
        block, self.buf = self.buf.split(b"\n\n", 1)
        fields = {"event": "message", "id": None, "data": None}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            if name in fields:
                fields[name] = value
        if fields["id"] is not None:
            self.last_id = fields["id"]
        if fields["data"] is None:        # retry:/comment lines
            return await self.next()
        return fields["id"], fields["event"], orjson.loads(fields["data"])

    async def take(self, n: int) -> list:
        return [await self.next() for _ in range(n)]


async def open_stream(http, gw, query: str, headers=None):
    response = await http.get(f"http://127.0.0.1:{gw.port}/sse?{query}", headers=headers or {})
    return response, Events(response)


def test_events_carry_the_positions_of_every_room(run):
    async def main():
        async with serve() as gw, aiohttp.ClientSession() as http:
            response, events = await open_stream(http, gw, "room=a&room=b")
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            (_, kind_a, ack_a), (id_b, kind_b, ack_b) = await events.take(2)
            assert (kind_a, kind_b) == ("ack", "ack") and ack_a["room"] == "a" and ack_b["seq"] == 0
            ea, eb = ack_a["epoch"], ack_b["epoch"]
            assert id_b == f"{ea}:0,{eb}:0"
            await gw.hub.publish("a", b'{"x":1}')
            await gw.hub.publish("b", b'"two"')
            assert await events.take(2) == [
                (f"{ea}:1,{eb}:0", "message", {"op": "message", "room": "a", "data": {"x": 1}, "seq": 1}),
                (f"{ea}:1,{eb}:1", "message", {"op": "message", "room": "b", "data": "two", "seq": 1})]
            response.close()
    run(main())


def test_last_event_id_resumes_every_room_with_nothing_missed(run):
    async def main():
        async with serve() as gw, aiohttp.ClientSession() as http:
            response, events = await open_stream(http, gw, "room=a&room=b")
            await events.take(2)
            for i in range(3):
                await gw.hub.publish("a", b"%d" % i)
            await gw.hub.publish("b", b'"b1"')
            await events.take(4)
            last = events.last_id
            response.close()
            # Away: more for both rooms.
            await gw.hub.publish("a", b'"a4"')
            await gw.hub.publish("b", b'"b2"')
            await gw.hub.publish("b", b'"b3"')
            response, events = await open_stream(http, gw, "room=a&room=b", {"Last-Event-ID": last})
            got = await events.take(5)
            assert [(kind, doc.get("recovered"), doc["room"]) for _, kind, doc in got[:1]] == [("ack", True, "a")]
            assert [doc["data"] for _, kind, doc in got if kind == "message"] == ["a4", "b2", "b3"]
            assert [doc["seq"] for _, kind, doc in got if kind == "message"] == [4, 2, 3]
            await gw.hub.publish("a", b'"live"')
            assert (await events.next())[2]["seq"] == 5
            assert gw.endpoints["/ws"].hub.history.recoveries_succeeded == 2
            # The same through the query parameter (clients that cannot set headers).
            r2, e2 = await open_stream(http, gw, f"room=a&last_event_id={events.last_id.split(',')[0]}")
            assert (await e2.next())[2] == {"op": "ack", "room": "a", "seq": 5, "epoch": got[0][2]["epoch"],
                                            "recovered": True}
            response.close()
            r2.close()
    run(main())


def test_an_unknown_position_gets_an_explicit_reset(run):
    async def main():
        async with serve(history_size=2) as gw, aiohttp.ClientSession() as http:
            for i in range(5):
                await gw.hub.publish("a", b"%d" % i)
            epoch = gw.hub.broker.history_nowait("a", 0, 0).epoch
            for last in (f"{epoch}:1", "other-epoch:4", "garbage", f"{epoch}:1,{epoch}:2"):
                response, events = await open_stream(http, gw, "room=a", {"Last-Event-ID": last})
                ident, kind, doc = await events.next()
                if last == "garbage" or "," in last:    # not a position for this stream: a plain join
                    assert kind == "ack" and "recovered" not in doc
                else:
                    assert (kind, doc) == ("reset", {"op": "reset", "room": "a", "epoch": epoch, "seq": 5})
                assert ident == f"{epoch}:5"
                response.close()
    run(main())


def test_parse_last_event_id():
    assert parse_last_event_id("e1:5,e2:0", 2) == [(5, "e1"), (0, "e2")]
    assert parse_last_event_id("e1:5", 2) == [None, None]
    assert parse_last_event_id("e1:x,:3", 2) == [None, None]
    assert parse_last_event_id("", 1) == [None]


def test_admission_is_the_upgrades(run):
    async def main():
        async with serve(jwt_secret=SECRET) as gw, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{gw.port}/sse"
            async with http.get(f"{base}?room=public.a") as r:
                assert r.status == 401
            good = hs256(rooms=["public.*"])
            async with http.get(f"{base}?room=secret", headers={"Authorization": f"Bearer {good}"}) as r:
                assert r.status == 403
            async with http.get(f"{base}?room=public.a&token={good}") as r:
                assert r.status == 200
                assert (await Events(r).next())[1] == "ack"
            for query, status in (("", 400), ("room=", 400), ("room=" + "x" * 300, 400)):
                async with http.get(f"{base}?{query}", headers={"Authorization": f"Bearer {good}"}) as r:
                    assert r.status == status, query
            reply = await raw_request(gw.port, b"POST /sse?room=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 401") or reply.startswith(b"HTTP/1.1 405")
    run(main())


def test_drain_ends_streams_and_keepalive_comments(run):
    async def main():
        async with serve(ping_interval=0.2, ping_timeout=0.2) as gw, aiohttp.ClientSession() as http:
            response, events = await open_stream(http, gw, "room=a")
            await events.next()
            async with asyncio.timeout(10):
                while b": ping" not in events.buf:
                    events.buf += await response.content.readany()
            assert gw.endpoints["/ws"].hub.members == 1
            await gw.shutdown(timeout=5)
            async with asyncio.timeout(10):
                while await response.content.readany():
                    pass                      # the stream ended cleanly (drained), not reset
            assert gw.hub.members == 0
    run(main())


def test_a_slow_stream_is_disconnected_by_the_policy_and_can_resume(run):
    async def main():
        limits = dict(max_queue_bytes=32768, write_buffer_high_bytes=16384, send_buffer_bytes=16384,
                      rate_limit=0, history_size=1000)
        async with serve(**limits) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, b"GET /sse?room=big HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            async with asyncio.timeout(10):
                while b"event: ack" not in head:      # joined: what follows is delivered to it
                    head += await loop.sock_recv(sock, 4096)
            pub = await Client.open(gw)
            for i in range(200):
                await pub.send(op="publish", room="big", data="x" * 4096)
            await pub.request(op="publish", room="big", data="fence", id=1)
            sse = gw.stream_routes["/sse"]
            async with asyncio.timeout(10):
                while sse.stats.slow_disconnects == 0:
                    await asyncio.sleep(0.01)
            assert gw.endpoints["/ws"].backpressure.slow_disconnects >= 1 and gw.hub.members == 0   # it left
            sock.close()
    run(main())
