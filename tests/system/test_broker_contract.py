"""One contract, every broker: what the Hub may rely on, whichever `--broker` is configured.

Each test runs against the memory broker, a single redis-server and a 3-node Redis Cluster
(sharded pub/sub), on asyncio and on uvloop. Redis brokers get a fresh channel prefix per
test, so sequence numbers start from scratch. "Nothing was delivered" is proven with a
sentinel publication on a room in the same cluster slot (one Redis connection delivers in
order), never by sleeping.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.broker import BrokerUnavailable, Retention, create_broker
from gateway.broker.memory import MemoryBroker
from tests.broker_helpers import Recorder, same_slot_room
from tests.redis_server import RedisCluster, RedisServer


@pytest.fixture(scope="module")
def contract_redis():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def contract_cluster():
    with RedisCluster() as cluster:
        yield cluster


def retention(room: str) -> Retention:
    """Rooms named "small*" keep 3 publications, "off*" none, the rest the default."""
    if room.startswith("small"):
        return Retention(3, 60)
    if room.startswith("off"):
        return Retention(0, 60)
    return Retention()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_broker(request):
    """A factory of unstarted brokers of one kind; Redis ones share a per-test prefix.

    Memory brokers made by one factory share nothing (each is a process of its own)."""
    kind = request.param
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    if kind == "memory":
        return lambda: create_broker("memory://", retention=retention)
    url = request.getfixturevalue("contract_redis" if kind == "redis" else "contract_cluster").url
    return lambda: create_broker(url, prefix=prefix, retention=retention)


async def started(make_broker) -> tuple[object, Recorder]:
    broker = make_broker()
    rec = Recorder()
    await broker.start(rec)
    return broker, rec


def test_start_reports_connected(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            assert rec.states == [True]
            assert broker.connected
        finally:
            await broker.close()
    run(main())


def test_publish_reaches_subscriber_with_the_returned_seq(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            await broker.subscribe("lobby")
            seq, epoch = await broker.publish("lobby", b'{"text":"hi"}')
            assert isinstance(seq, int) and seq >= 1
            assert isinstance(epoch, str) and epoch
            assert await rec.wait_count("lobby", 1) == [(seq, b'{"text":"hi"}')]
            assert rec.epochs == [epoch]
        finally:
            await broker.close()
    run(main())


def test_delivery_is_never_inline_with_publish(run, make_broker):
    """The handler never runs in the publisher's task: a publisher's own message comes back later."""
    async def main():
        broker, rec = await started(make_broker)
        try:
            await broker.subscribe("r")
            publisher = asyncio.current_task()
            for i in range(20):
                await broker.publish("r", b"%d" % i)
            await rec.wait_count("r", 20)
            assert publisher not in rec.tasks
        finally:
            await broker.close()
    run(main())


def test_order_and_consecutive_seq_under_concurrent_publishes(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            await broker.subscribe("r")
            payloads = [b'{"i":%d}' % i for i in range(500)]
            seqs = [seq for seq, _ in await asyncio.gather(*(broker.publish("r", p) for p in payloads))]
            # Publications made in order get increasing, consecutive numbers...
            assert seqs == list(range(seqs[0], seqs[0] + len(payloads)))
            got = await rec.wait_count("r", len(payloads))
            # ...and arrive exactly once, in that order, each with its own number.
            assert got == list(zip(seqs, payloads))
        finally:
            await broker.close()
    run(main())


def test_only_subscribed_rooms_are_delivered(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            sentinel = same_slot_room("other")
            await broker.subscribe("mine")
            await broker.subscribe(sentinel)
            assert isinstance((await broker.publish("other", b"1"))[0], int)
            await broker.publish("mine", b"2")
            await broker.publish(sentinel, b"3")
            await rec.wait_count(sentinel, 1)
            await rec.wait_count("mine", 1)
            assert rec.of("other") == []
            assert {room for room, _, _ in rec.publications} == {"mine", sentinel}
        finally:
            await broker.close()
    run(main())


def test_unsubscribe_stops_delivery(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            sentinel = same_slot_room("r")
            await broker.subscribe("r")
            await broker.subscribe(sentinel)
            await broker.publish("r", b"before")
            await rec.wait_count("r", 1)
            await broker.unsubscribe("r")
            await broker.unsubscribe("r")   # idempotent: the hub may race a leave with a close
            await broker.publish("r", b"after")
            await broker.publish(sentinel, b"fence")
            await rec.wait_count(sentinel, 1)
            assert [d for _, d in rec.of("r")] == [b"before"]
            # ... and subscribing again resumes delivery.
            await broker.subscribe("r")
            seq, _ = await broker.publish("r", b"again")
            got = await rec.wait_count("r", 2)
            assert got[-1] == (seq, b"again")
        finally:
            await broker.close()
    run(main())


def test_rooms_are_independent_and_names_arbitrary(run, make_broker):
    """Room names with separators, braces and non-ASCII map back exactly; payload bytes are opaque."""
    async def main():
        broker, rec = await started(make_broker)
        try:
            rooms = ["a:b", "ünï cødé", "x{y}z", "}{", "seq:1", "%7D", "", "}"]
            payloads = [b"", b"1:2:3", b'"\\u00e9"', b"{" * 100, b"x" * 200_000]
            for room in rooms:
                await broker.subscribe(room)
            sent = {}
            for room in rooms:
                sent[room] = [((await broker.publish(room, p))[0], p) for p in payloads]
            for room in rooms:
                assert await rec.wait_count(room, len(payloads)) == sent[room]
                assert [s for s, _ in sent[room]] == list(range(sent[room][0][0], sent[room][0][0] + len(payloads)))
        finally:
            await broker.close()
    run(main())


def test_brokers_keep_rooms_separate_per_process(run, make_broker):
    """Two brokers (two processes): each receives only the rooms it subscribed to.

    With the memory broker each process is an island; with Redis a publication on one
    reaches the other. Either way, a broker never delivers a room it does not hold.
    """
    async def main():
        (a, rec_a), (b, rec_b) = await started(make_broker), await started(make_broker)
        try:
            sentinel = same_slot_room("only-a")
            await a.subscribe("only-a")
            await b.subscribe(sentinel)
            await a.publish("only-a", b"1")
            await a.publish(sentinel, b"2")
            await b.publish(sentinel, b"3")
            await rec_a.wait_count("only-a", 1)
            await rec_b.wait_count(sentinel, 1)
            assert rec_b.of("only-a") == []
            assert rec_a.of(sentinel) == []
        finally:
            await a.close()
            await b.close()
    run(main())


def test_publish_after_close_never_claims_delivery(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        await broker.subscribe("r")
        await broker.close()
        try:
            await broker.publish("r", b"late")
        except BrokerUnavailable:
            pass
        # Closed brokers deliver nothing: a fresh broker's fence publication proves the queue is empty.
        fence, rec2 = await started(make_broker)
        try:
            await fence.subscribe("r")
            await fence.publish("r", b"fence")
            await rec2.wait_count("r", 1)
            await asyncio.sleep(0)
            assert rec.of("r") == []
        finally:
            await fence.close()
    run(main())


def test_memory_broker_is_the_default():
    assert isinstance(create_broker(""), MemoryBroker)
    assert isinstance(create_broker("memory://"), MemoryBroker)


# -- history, positions and idempotency (issue 14) -----------------------------------------

def test_history_returns_what_came_after_since_in_order(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            await broker.subscribe("h")
            sent = [await broker.publish("h", b'{"n":%d}' % i) for i in range(5)]
            epoch = sent[0][1]
            assert {e for _, e in sent} == {epoch}
            seqs = [s for s, _ in sent]
            assert seqs == [1, 2, 3, 4, 5]
            found = await broker.history("h", 0, 100)
            assert (found.epoch, found.top) == (epoch, 5)
            assert [(p.seq, p.data) for p in found.publications] == [(i + 1, b'{"n":%d}' % i) for i in range(5)]
            assert [p.seq for p in (await broker.history("h", 3, 100)).publications] == [4, 5]
            assert [p.seq for p in (await broker.history("h", 1, 2)).publications] == [2, 3]
            assert (await broker.history("h", 5, 100)).publications == []
            assert (await broker.history("h", 0, 0)).publications == []
            assert await broker.position("h") == (5, epoch)
            # Live delivery carries the same epoch.
            await rec.wait_count("h", 5)
            assert set(rec.epochs) == {epoch}
        finally:
            await broker.close()
    run(main())


def test_publications_to_rooms_nobody_holds_are_numbered_and_kept(run, make_broker):
    """A backend publishing while the room's members reconnect: nothing is lost for them."""
    async def main():
        broker, rec = await started(make_broker)
        try:
            first = await broker.publish("away", b"1")
            second = await broker.publish("away", b"2")
            assert (first[0], second[0]) == (1, 2) and first[1] == second[1]
            found = await broker.history("away", 0, 10)
            assert [(p.seq, p.data) for p in found.publications] == [(1, b"1"), (2, b"2")]
        finally:
            await broker.close()
    run(main())


def test_a_position_read_starts_the_numbering_later_publications_continue(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            top, epoch = await broker.position("fresh")
            assert top == 0 and isinstance(epoch, str) and epoch
            assert await broker.publish("fresh", b"x") == (1, epoch)
        finally:
            await broker.close()
    run(main())


def test_history_size_bounds_what_is_kept(run, make_broker):
    """ "small*" keeps 3: the newest ones, contiguous up to the top (Redis trims by stream
    node, MAXLEN ~, so it may keep more; never fewer, never a hole)."""
    async def main():
        broker, rec = await started(make_broker)
        try:
            for i in range(250):
                await broker.publish("small", b"%d" % i)
            found = await broker.history("small", 0, 1000)
            seqs = [p.seq for p in found.publications]
            assert found.top == 250
            assert 3 <= len(seqs) <= 3 + 100
            assert seqs == list(range(251 - len(seqs), 251))
            assert [p.data for p in found.publications][-3:] == [b"247", b"248", b"249"]
        finally:
            await broker.close()
    run(main())


def test_history_off_keeps_the_numbering_only(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            await broker.subscribe("off")
            seq, epoch = await broker.publish("off", b"1")
            await broker.publish("off", b"2")
            found = await broker.history("off", 0, 10)
            assert (found.top, found.epoch, found.publications) == (seq + 1, epoch, [])
            await rec.wait_count("off", 2)
        finally:
            await broker.close()
    run(main())


def test_the_same_idempotency_key_publishes_once(run, make_broker):
    async def main():
        broker, rec = await started(make_broker)
        try:
            sentinel = same_slot_room("idem")
            await broker.subscribe("idem")
            await broker.subscribe(sentinel)
            first = await broker.publish("idem", b'"a"', idempotency_key="order-17")
            again = await broker.publish("idem", b'"a"', idempotency_key="order-17")
            other = await broker.publish("idem", b'"b"', idempotency_key="order-18")
            assert again == first
            assert other == (first[0] + 1, first[1])
            # The same key in another room is another publication.
            assert (await broker.publish(sentinel, b'"a"', idempotency_key="order-17"))[0] == 1
            await broker.publish(sentinel, b"fence")
            await rec.wait_count(sentinel, 2)
            assert rec.of("idem") == [(first[0], b'"a"'), (other[0], b'"b"')]
            assert [p.seq for p in (await broker.history("idem", 0, 10)).publications] == [first[0], other[0]]
        finally:
            await broker.close()
    run(main())


def test_every_process_sees_one_numbering(run, make_broker):
    """Redis: two processes share the position and history; memory: each process is its own world."""
    async def main():
        (a, _), (b, _) = await started(make_broker), await started(make_broker)
        try:
            sa = await a.publish("shared", b"1")
            sb = await b.publish("shared", b"2")
            if isinstance(a, MemoryBroker):
                assert sa[0] == sb[0] == 1 and sa[1] != sb[1]
            else:
                assert sb == (sa[0] + 1, sa[1])
                assert [p.data for p in (await a.history("shared", 0, 10)).publications] == [b"1", b"2"]
        finally:
            await a.close()
            await b.close()
    run(main())
