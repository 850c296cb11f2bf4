"""Python SDK behaviour the shared transcripts do not reach: async iteration, flow control,
msgpack, join "last", settling everything on close (no leaks), cancellation, positions.
Driven with the fake network and clock of tests/client_fakes.py (no real time passes)."""
from __future__ import annotations

import asyncio
import gc
import json
import weakref

import msgpack
import pytest

from gateway.client import (Client, ClientClosed, ClientState, CommandError, CommandTimeout, ConnectionLost,
                            PolicyClose, Position, jwt_exp)
from gateway.client.backoff import Backoff
from tests.client_fakes import FakeClock, FakeNetwork, ScriptedRandom, settle


class Harness:
    def __init__(self, **options) -> None:
        self.clock = FakeClock()
        self.network = FakeNetwork(decode=options.pop("decode", json.loads))
        self.client = Client("ws://gw.test/ws", connect=self.network.connect, clock=self.clock,
                             random=ScriptedRandom([0.5]), **options)

    async def open(self, subprotocol=None):
        self.client.start()
        await settle()
        self.network.newest.accept(subprotocol)
        await settle()
        return self.network.newest

    def sent(self, sock=None):
        return (sock or self.network.newest).sent

    async def ack_join(self, sock, room, seq=0, epoch="e1", **extra):
        req = next(f for f in reversed(sock.sent) if f.get("op") == "join" and f["room"] == room)
        sock.deliver(json.dumps({"op": "ack", "id": req["id"], "seq": seq, "epoch": epoch, **extra}))
        await settle()

    async def advance(self, ms):
        await settle()
        target = self.clock.now_ms + ms
        while self.clock.fire_next(target):
            await settle()
        self.clock.now_ms = target
        await settle()


def msg(room, seq, data=None):
    return json.dumps({"op": "message", "room": room, "seq": seq, "data": data if data is not None else seq})


def test_async_for_yields_in_order_and_ends_on_leave():
    async def main():
        h = Harness()
        sock = await h.open()
        join = asyncio.ensure_future(h.client.join("r"))
        await settle()
        await h.ack_join(sock, "r", seq=10)
        sub = await join
        for seq in (11, 12, 12, 14):        # 12 twice: a duplicate; 14: a gap (recovery join)
            sock.deliver(msg("r", seq))
        await settle()
        got = []
        async for m in sub:
            got.append((m.room, m.seq, m.data))
            if len(got) == 2:
                break
        assert got == [("r", 11, 11), ("r", 12, 12)]
        assert sock.sent[-1] == {"op": "join", "room": "r", "id": sock.sent[-1]["id"], "since": {"epoch": "e1", "seq": 12}}
        await h.client.leave("r")
        assert sock.sent[-1]["op"] == "leave"
        with pytest.raises(StopAsyncIteration):
            await sub.get()
        await h.client.close()
    asyncio.run(main())


def test_join_waits_for_the_ack_and_raises_the_refusal():
    async def main():
        h = Harness()
        sock = await h.open()
        join = asyncio.ensure_future(h.client.join("secret"))
        await settle()
        sock.deliver(json.dumps({"op": "error", "id": sock.sent[-1]["id"], "code": "forbidden", "message": "no"}))
        await settle()
        with pytest.raises(CommandError) as info:
            await join
        assert info.value.code == "forbidden" and info.value.room == "secret"
        assert "secret" not in h.client.subscriptions
        await h.client.close()
    asyncio.run(main())


def test_a_cancelled_join_leaves_the_room():
    async def main():
        h = Harness()
        sock = await h.open()
        join = asyncio.ensure_future(h.client.join("r"))
        await settle()
        join.cancel()
        await settle()
        assert [f["op"] for f in sock.sent] == ["join", "leave"]
        assert h.client.subscriptions == {}
        await h.ack_join(sock, "r")          # the late ack is ignored
        assert h.client.subscriptions == {}
        await h.client.close()
    asyncio.run(main())


def test_iteration_raises_when_the_client_stops():
    async def main():
        h = Harness()
        sock = await h.open()
        sub = await h.client.join("r", wait=False)
        await h.ack_join(sock, "r")
        sock.deliver(msg("r", 1))
        await settle()
        sock.server_close(4004, "kicked")
        await settle()
        assert h.client.state is ClientState.CLOSED
        assert (await sub.get()).seq == 1          # what was delivered before still comes first
        with pytest.raises(PolicyClose) as info:
            await sub.get()
        assert info.value.code == "policy" and info.value.close_code == 4004
        with pytest.raises(PolicyClose):
            await h.client.publish("r", 1)
        await h.client.close()
    asyncio.run(main())


def test_a_full_buffer_pauses_reading_until_the_app_catches_up():
    async def main():
        h = Harness(max_queue=4)
        sock = await h.open()
        sub = await h.client.join("r", wait=False)
        await h.ack_join(sock, "r")
        for seq in range(1, 11):
            sock.deliver(msg("r", seq))
        await settle()
        # 5 taken (the fifth passed max_queue): the reader waits; 5 frames stay in the socket.
        assert sub.pending() == 5 and len(sock._inbox) == 5
        await h.advance(60_000)                      # paused on purpose: no liveness close
        assert h.client.state is ClientState.CONNECTED
        seqs = []
        for _ in range(10):
            seqs.append((await sub.get()).seq)
            await settle()
        assert seqs == list(range(1, 11)) and sub.pending() == 0
        await h.client.close()
    asyncio.run(main())


def test_callbacks_alone_buffer_nothing():
    async def main():
        h = Harness(max_queue=2)
        sock = await h.open()
        sub = await h.client.join("r", wait=False)
        got = []
        sub.on("message", lambda m: got.append(m.seq))
        await h.ack_join(sock, "r")
        for seq in range(1, 101):
            sock.deliver(msg("r", seq))
        await settle()
        assert got == list(range(1, 101)) and sub.pending() == 0
        await h.client.close()
    asyncio.run(main())


def test_msgpack_subprotocol():
    async def main():
        h = Harness(encoding="msgpack", decode=lambda f: msgpack.unpackb(f, raw=False))
        sock = await h.open("ws-gateway.msgpack")
        assert sock.subprotocols == ["ws-gateway.msgpack"]
        join = asyncio.ensure_future(h.client.join("r"))
        await settle()
        rid = sock.sent[-1]["id"]
        sock.deliver(msgpack.packb({"op": "ack", "id": rid, "seq": 1, "epoch": "e"}))
        sock.deliver(msgpack.packb({"op": "message", "room": "r", "seq": 2, "data": {"b": [1, 2]}}))
        await settle()
        sub = await join
        m = await sub.get()
        assert (m.seq, m.data) == (2, {"b": [1, 2]})
        await h.client.close()
    asyncio.run(main())


def test_msgpack_declined_falls_back_to_json():
    async def main():
        h = Harness(encoding="msgpack")
        sock = await h.open(None)            # the server did not select the subprotocol
        await h.client.join("r", wait=False)
        assert sock.sent == [{"op": "join", "room": "r", "id": 1}]   # decoded as JSON by the fake
        await h.client.close()
    asyncio.run(main())


def test_join_last_delivers_the_latest_publication_once():
    async def main():
        h = Harness()
        sock = await h.open()
        sub = await h.client.join("ticker", last=True, wait=False)
        assert sock.sent[-1] == {"op": "join", "room": "ticker", "id": 1, "last": True}
        await h.ack_join(sock, "ticker", seq=42)
        for seq in (42, 42, 43):
            sock.deliver(msg("ticker", seq))
        await settle()
        assert [(await sub.get()).seq for _ in range(2)] == [42, 43]
        assert sub.pending() == 0
        sock.drop()
        await h.advance(1000)
        sock2 = h.network.newest
        sock2.accept()
        await settle()
        assert sock2.sent[0]["since"] == {"epoch": "e1", "seq": 43}   # re-joins from its position
        assert "last" not in sock2.sent[0]
        await h.client.close()
    asyncio.run(main())


def test_everything_pending_settles_on_close_and_nothing_leaks():
    async def main():
        h = Harness()
        sock = await h.open()
        sub = await h.client.join("a", wait=False)
        await h.ack_join(sock, "a")
        waiting_join = asyncio.ensure_future(h.client.join("b"))
        in_flight = asyncio.ensure_future(h.client.publish("a", 1))
        keyed = asyncio.ensure_future(h.client.publish("a", 2, idempotency_key="k"))
        iterating = asyncio.ensure_future(sub.get())
        await settle()
        sock.drop()                                   # now disconnected, retrying
        await settle()
        queued = asyncio.ensure_future(h.client.publish("a", 3))
        connected = asyncio.ensure_future(h.client.wait_connected())
        await settle()
        assert isinstance(in_flight.exception(), ConnectionLost)
        await h.client.close()
        await settle()
        for fut in (waiting_join, keyed, queued, connected):
            assert fut.done() and isinstance(fut.exception(), ClientClosed), fut
        with pytest.raises(StopAsyncIteration):
            await iterating
        assert h.clock.next_due() is None             # every timer cancelled
        assert h.client._requests == {} and h.client._outbox == [] and h.client._tasks == set()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        ref = weakref.ref(h.client)
        # (an exception raised inside the SDK keeps its frames, hence the client, alive
        # while the app holds it: drop the finished futures too)
        del h, sock, sub, waiting_join, in_flight, keyed, iterating, queued, connected, fut
        gc.collect()
        assert ref() is None                          # no cycle keeps a closed client alive
    asyncio.run(main())


def test_a_publish_waiting_for_a_connection_times_out_and_is_forgotten():
    async def main():
        h = Harness(command_timeout=2.0)
        h.client.start()
        await settle()
        h.network.newest.unreachable()
        await settle()
        pub = asyncio.ensure_future(h.client.publish("r", 1, idempotency_key="k1"))
        await settle()
        await h.advance(2000)
        assert isinstance(pub.exception(), CommandTimeout) and pub.exception().code == "timeout"
        assert h.client._outbox == []
        await h.client.close()
    asyncio.run(main())


def test_positions_are_readable_and_settable():
    async def main():
        h = Harness()
        sock = await h.open()
        sub = await h.client.join("r", since=("e0", 4), wait=False)
        assert sock.sent[-1]["since"] == {"epoch": "e0", "seq": 4}
        await h.ack_join(sock, "r", seq=6, epoch="e0", recovered=True)
        for seq in (5, 6):
            sock.deliver(msg("r", seq))
        await settle()
        assert h.client.positions() == {"r": Position("e0", 6)}
        saved = json.loads(json.dumps(sub.position.to_json()))
        assert Position.parse(saved) == Position("e0", 6)
        with pytest.raises(ValueError):
            sub.position = {"epoch": "e0", "seq": -1}
        await h.client.close()
    asyncio.run(main())


def test_a_callback_that_raises_does_not_break_the_client(caplog):
    async def main():
        h = Harness()
        h.client.on("connected", lambda ev: 1 / 0)
        seen = []

        async def async_cb(ev):
            seen.append(ev)
        h.client.on("connected", async_cb)
        await h.open()
        assert h.client.state is ClientState.CONNECTED and len(seen) == 1
        await h.client.close()
    asyncio.run(main())
    assert "callback failed" in caplog.text


def test_backoff_formulas():
    b = Backoff(backoff_initial=0.1, backoff_max=0.4, restart_spread=1.0, long_backoff=30.0)
    assert [round(b.delay(n, 1.0), 6) for n in (1, 2, 3, 4, 60)] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert b.delay(1, 0.0) == 0.0
    assert b.restart_delay(0.25) == 0.25
    assert (b.long_delay(0.0), b.long_delay(0.5)) == (15.0, 22.5)
    with pytest.raises(ValueError):
        Backoff(backoff_initial=2, backoff_max=1)


def test_jwt_exp_reads_the_payload_without_verifying():
    token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1IiwiZXhwIjoxNzAwMDAwMTIwfQ.sig"
    assert jwt_exp(token) == 1700000120.0
    assert jwt_exp("not-a-jwt") is None and jwt_exp("a.!!!.c") is None


def test_token_in_header_by_default_and_in_the_query_on_request():
    async def main():
        h = Harness(token="abc")
        h.client.start()
        await settle()
        sock = h.network.newest
        assert sock.headers["Authorization"] == "Bearer abc" and sock.url == "ws://gw.test/ws"
        await h.client.close()
        h = Harness(token="abc", token_via="query")
        h.client.url = "ws://gw.test/ws?x=1&token=old"
        h.client.start()
        await settle()
        assert h.network.newest.url == "ws://gw.test/ws?x=1&token=abc"
        assert "Authorization" not in h.network.newest.headers
        await h.client.close()
    asyncio.run(main())


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        Client("ws://x/ws", token="")
    with pytest.raises(ValueError):
        Client("ws://x/ws", encoding="xml")
    with pytest.raises(TypeError):
        Client("ws://x/ws", connect=FakeNetwork().connect, open_timeout=3)

    async def main():
        h = Harness()
        with pytest.raises(ValueError):
            await h.client.join("")
        with pytest.raises(ValueError):
            await h.client.publish("r", 1, idempotency_key="k" * 129)
        await h.client.close()
        with pytest.raises(ClientClosed):
            await h.client.join("r")
    asyncio.run(main())
