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

from gateway.broker import BrokerUnavailable, create_broker
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


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_broker(request):
    """A factory of unstarted brokers of one kind; Redis ones share a per-test prefix."""
    kind = request.param
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    if kind == "memory":
        return lambda: create_broker("memory://")
    url = request.getfixturevalue("contract_redis" if kind == "redis" else "contract_cluster").url
    return lambda: create_broker(url, prefix=prefix)


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
            seq = await broker.publish("lobby", b'{"text":"hi"}')
            assert isinstance(seq, int) and seq >= 1
            assert await rec.wait_count("lobby", 1) == [(seq, b'{"text":"hi"}')]
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
            seqs = await asyncio.gather(*(broker.publish("r", p) for p in payloads))
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
            assert isinstance(await broker.publish("other", b"1"), int)
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
            seq = await broker.publish("r", b"again")
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
                sent[room] = [(await broker.publish(room, p), p) for p in payloads]
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
