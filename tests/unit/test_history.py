"""Recovery on /ws (issue 14, notes/protocol-v2.md) against an in-process gateway and the
memory broker, with `websockets` clients: join positions, `since` recoveries (no gap, no
duplicate while publications keep coming), `last`, re-join after drops, epochs and `reset`,
idempotent publish, and the coalesced history reads.
"""
from __future__ import annotations

import asyncio
import random

import orjson

from tests.helpers import serve
from tests.unit.test_session import Client, until


async def join(c: Client, room: str, id=1, **extra) -> dict:
    reply = await c.request(op="join", room=room, id=id, **extra)
    assert reply["op"] == "ack" and reply["id"] == id, reply
    return reply


async def messages(c: Client, n: int) -> list:
    out = []
    while len(out) < n:
        doc = await c.recv()
        assert doc["op"] in ("message", "reset"), doc
        out.append(doc)
    return out


def test_plain_join_ack_carries_the_position(run):
    async def main():
        async with serve() as gw:
            a = await Client.open(gw)
            first = await join(a, "r")
            assert first["seq"] == 0 and isinstance(first["epoch"], str) and "recovered" not in first
            for i in range(3):
                await a.request(op="publish", room="r", data=i, id=10 + i)
                await a.recv()
            b = await Client.open(gw)
            assert await join(b, "r") == {"op": "ack", "id": 1, "seq": 3, "epoch": first["epoch"]}
            # Joining twice stays harmless and says where the member is.
            assert await join(b, "r", id=2) == {"op": "ack", "id": 2, "seq": 3, "epoch": first["epoch"]}
    run(main())


def test_join_since_replays_the_missed_range_then_live(run):
    async def main():
        async with serve() as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            for i in range(5):
                assert (await pub.request(op="publish", room="r", data={"n": i}, id=i))["seq"] == i + 1
                await pub.recv()
            c = await Client.open(gw)
            ack = await join(c, "r", since={"seq": 2, "epoch": epoch})
            assert ack == {"op": "ack", "id": 1, "seq": 5, "epoch": epoch, "recovered": True}
            assert [(m["seq"], m["data"]) for m in await messages(c, 3)] == [(3, {"n": 2}), (4, {"n": 3}), (5, {"n": 4})]
            await pub.send(op="publish", room="r", data="live")
            assert await c.recv() == {"op": "message", "room": "r", "data": "live", "seq": 6}
            assert gw.hub.history.recoveries_succeeded == 1
    run(main())


def test_nothing_missed_and_unknown_positions(run):
    async def main():
        async with serve(history_size=3) as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            for i in range(10):
                await pub.request(op="publish", room="r", data=i, id=i)
                await pub.recv()
            hub = gw.hub
            c = await Client.open(gw)
            # Up to date: recovered, nothing replayed.
            assert (await join(c, "r", since={"seq": 10, "epoch": epoch}))["recovered"] is True
            # Older than the 3 kept: recovered false, no replay; the position continues from the top.
            d = await Client.open(gw)
            assert await join(d, "r", since={"seq": 2, "epoch": epoch}) == \
                {"op": "ack", "id": 1, "seq": 10, "epoch": epoch, "recovered": False}
            # Another epoch (e.g. from before a restart): recovered false.
            e = await Client.open(gw)
            assert (await join(e, "r", since={"seq": 9, "epoch": "old"}))["recovered"] is False
            # A position from the future of this epoch: recovered false.
            f = await Client.open(gw)
            assert (await join(f, "r", since={"seq": 99, "epoch": epoch}))["recovered"] is False
            await pub.send(op="publish", room="r", data="next")
            for client in (c, d, e, f):   # each continues live with seq 11, nothing before it
                assert (await client.recv())["seq"] == 11
            assert (hub.history.recoveries_succeeded, hub.history.recoveries_failed) == (1, 3)
    run(main())


def test_last_gives_the_latest_value(run):
    async def main():
        async with serve() as gw:
            pub = await Client.open(gw)
            await join(pub, "ticker")
            empty = await Client.open(gw)
            ack = await join(empty, "ticker", last=True)
            assert ack["seq"] == 0 and "recovered" not in ack
            for price in (10, 11, 12):
                await pub.request(op="publish", room="ticker", data={"price": price}, id=price)
                await pub.recv()
                await empty.recv()
            c = await Client.open(gw)
            assert (await join(c, "ticker", last=True))["seq"] == 3
            assert await c.recv() == {"op": "message", "room": "ticker", "data": {"price": 12}, "seq": 3}
            await pub.send(op="publish", room="ticker", data={"price": 13})
            assert (await c.recv())["seq"] == 4
    run(main())


def test_a_member_rejoins_with_since_to_recover(run):
    """After a `dropped` notice (or a gap) a member asks again without leaving the room."""
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            epoch = (await join(c, "r"))["epoch"]
            for i in range(4):
                await c.request(op="publish", room="r", data=i, id=10 + i)
                await c.recv()
            ack = await join(c, "r", id=2, since={"seq": 1, "epoch": epoch})
            assert (ack["recovered"], ack["seq"]) == (True, 4)
            assert [m["seq"] for m in await messages(c, 3)] == [2, 3, 4]
            await c.send(op="publish", room="r", data="live")
            assert (await c.recv())["seq"] == 5
            assert gw.hub.members == 1
    run(main())


def test_msgpack_members_recover_too(run):
    async def main():
        async with serve() as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            for i in range(3):
                await pub.request(op="publish", room="r", data=[i], id=i)
                await pub.recv()
            c = await Client.open(gw, msgpack_proto=True)
            ack = await c.request(op="join", room="r", id=1, since={"seq": 0, "epoch": epoch})
            assert ack == {"op": "ack", "id": 1, "seq": 3, "epoch": epoch, "recovered": True}
            assert [await c.recv() for _ in range(3)] == [
                {"op": "message", "room": "r", "data": [i], "seq": i + 1} for i in range(3)]
    run(main())


def test_history_off_recovers_only_an_up_to_date_position(run):
    async def main():
        async with serve(history_size=0) as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            await pub.request(op="publish", room="r", data=1, id=1)
            await pub.recv()
            c = await Client.open(gw)
            assert (await join(c, "r", since={"seq": 0, "epoch": epoch}))["recovered"] is False
            assert (await join(c, "r", id=2, since={"seq": 1, "epoch": epoch}))["recovered"] is True
    run(main())


def test_bad_recovery_requests_are_refused(run):
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            for bad in ({"since": 5}, {"since": {"seq": -1, "epoch": "e"}}, {"since": {"seq": 1}},
                        {"since": {"seq": 1, "epoch": "x" * 65}}, {"last": "yes"},
                        {"last": True, "since": {"seq": 1, "epoch": "e"}}):
                reply = await c.request(op="join", room="r", id=1, **bad)
                assert (reply["op"], reply["code"]) == ("error", "bad_request"), (bad, reply)
            for bad in ("", 5, "k" * 129, "a\nb"):
                reply = await c.request(op="publish", room="r", data=1, id=2, idempotency_key=bad)
                assert (reply["op"], reply["code"]) == ("error", "bad_request"), (bad, reply)
    run(main())


def test_the_same_idempotency_key_twice_is_one_delivery_and_one_seq(run):
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            await join(c, "orders")
            first = await c.request(op="publish", room="orders", data={"id": 17}, id=1, idempotency_key="o-17")
            assert await c.recv() == {"op": "message", "room": "orders", "data": {"id": 17}, "seq": 1}
            again = await c.request(op="publish", room="orders", data={"id": 17}, id=2, idempotency_key="o-17")
            assert (first["seq"], again["seq"]) == (1, 1)
            await c.send(op="publish", room="orders", data="fence")
            assert await c.recv() == {"op": "message", "room": "orders", "data": "fence", "seq": 2}
    run(main())


def test_a_new_epoch_under_members_sends_reset(run):
    """The broker reports a restarted numbering (as after a Redis restart): members get
    `reset` with the position to adopt, then the new epoch's messages."""
    async def main():
        async with serve() as gw:
            c = await Client.open(gw)
            await join(c, "r")
            gw.hub.handle_publication("r", 1, b'"after restart"', "fresh-epoch")
            assert await c.recv() == {"op": "reset", "room": "r", "epoch": "fresh-epoch", "seq": 0}
            assert await c.recv() == {"op": "message", "room": "r", "data": "after restart", "seq": 1}
            assert gw.hub.position("r") == (1, "fresh-epoch") and gw.hub.history.resets == 1
    run(main())


def test_joiners_recovering_under_live_traffic_see_every_seq_once_in_order(run):
    """The property itself: while a publisher keeps going, clients join with arbitrary past
    positions; each sees since+1, since+2, ... with no gap and no duplicate."""
    async def main():
        async with serve(history_size=1000, rate_limit=0) as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            stop = asyncio.Event()

            async def publish():
                n = 0
                while not stop.is_set():
                    await pub.send(op="publish", room="r", data=n)
                    n += 1
                    if n % 5 == 0:
                        await asyncio.sleep(0.005)   # ~1,000 publications/s
            task = asyncio.ensure_future(publish())
            await until(lambda: gw.hub.position("r")[0] >= 50, "traffic")
            rng = random.Random(7)
            joiners = []
            for _ in range(30):
                c = await Client.open(gw)
                top = gw.hub.position("r")[0]
                since = rng.randrange(max(0, top - 300), top + 1)   # within the 1,000 kept
                await c.send(op="join", room="r", id=1, since={"seq": since, "epoch": epoch})
                joiners.append((c, since))
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            stop.set()
            await task
            await pub.send(op="publish", room="r", data="end")
            for c, since in joiners:
                ack = await c.recv()
                assert ack["recovered"] is True, (since, ack)
                seqs = []
                while True:
                    doc = await c.recv()
                    seqs.append(doc["seq"])
                    if doc["data"] == "end":
                        break
                assert seqs == list(range(since + 1, seqs[-1] + 1)), (since, seqs[:5])
            # One read served them (the window kept up with the live stream afterwards).
            assert gw.hub.history.reads <= 2
    run(main())


def test_many_joiners_cost_a_constant_number_of_reads(run):
    async def main():
        async with serve(history_size=100) as gw:
            pub = await Client.open(gw)
            epoch = (await join(pub, "r"))["epoch"]
            for i in range(50):
                await pub.send(op="publish", room="r", data=i)
            await until(lambda: gw.hub.position("r")[0] == 50, "published")
            reads = gw.hub.history.reads
            clients = [await Client.open(gw) for _ in range(200)]
            await asyncio.gather(*(c.send(op="join", room="r", id=1, since={"seq": i % 50, "epoch": epoch})
                                   for i, c in enumerate(clients)))
            for i, c in enumerate(clients):
                assert (await c.recv())["recovered"] is True
                assert [m["seq"] for m in await messages(c, 50 - i % 50)] == list(range(i % 50 + 1, 51))
            assert gw.hub.history.reads - reads <= 2
            text = gw.metrics.render().decode()
            assert "ws_gateway_history_reads_total" in text and "ws_gateway_history_recoveries_succeeded_total" in text
    run(main())


def test_history_bytes_are_capped_through_the_config(run):
    async def main():
        async with serve(history_max_bytes=200_000) as gw:
            c = await Client.open(gw)
            big = "x" * 1000
            for i in range(400):
                await c.send(op="publish", room=f"room-{i}", data=big)
            await c.request(op="publish", room="fence", data=1, id=1)
            broker = gw.hub.broker
            assert broker.history_bytes <= 200_000 and broker.history_evictions > 0
            assert "ws_gateway_history_bytes" in gw.metrics.render().decode()
    run(main())
