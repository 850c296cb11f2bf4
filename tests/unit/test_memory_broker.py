"""The memory broker's history: lifetimes follow each room's retention, bytes are capped.

The shared behaviour (numbering, history reads, idempotency) is in the broker contract
suite (tests/system/test_broker_contract.py); these are the memory broker's own rules,
driven by an injected clock instead of sleeping.
"""
from __future__ import annotations

import asyncio

from gateway.broker.base import Retention
from gateway.broker.memory import KEY_OVERHEAD, PUBLICATION_OVERHEAD, ROOM_OVERHEAD, MemoryBroker
from tests.broker_helpers import Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _broker(**kwargs) -> tuple[MemoryBroker, Clock]:
    clock = Clock()
    broker = MemoryBroker(kwargs.pop("retention", lambda room: Retention(100, 10)), clock=clock, **kwargs)
    await broker.start(Recorder())
    return broker, clock


def test_history_expires_after_ttl_and_the_position_after_meta_ttl(run):
    async def main():
        broker, clock = await _broker()
        seq, epoch = broker.publish_nowait("r", b"1")
        clock.now += 9
        assert [p.seq for p in broker.history_nowait("r", 0, 10).publications] == [1]
        clock.now += 2     # 11 s after the last publication: history gone, position kept
        found = broker.history_nowait("r", 0, 10)
        assert (found.epoch, found.top, found.publications) == (epoch, 1, [])
        assert broker.publish_nowait("r", b"2") == (2, epoch)
        clock.now += 21    # past meta_ttl (20 s) of silence: a new numbering
        seq, new_epoch = broker.publish_nowait("r", b"3")
        assert seq == 1 and new_epoch != epoch
        assert broker.expired_rooms == 1
    run(main())


def test_expiry_sweeps_rooms_nobody_reads(run):
    async def main():
        broker, clock = await _broker()
        for i in range(50):
            broker.publish_nowait(f"r{i}", b"x" * 100)
        assert broker.history_rooms == 50
        clock.now += 11
        broker.publish_nowait("other", b"y")        # publications drive the lazy sweep
        assert broker.history_bytes == 50 * ROOM_OVERHEAD + ROOM_OVERHEAD + PUBLICATION_OVERHEAD + 1
        clock.now += 10
        broker.publish_nowait("other", b"y")
        assert broker.history_rooms == 1 and broker.expired_rooms == 50
    run(main())


def test_a_held_room_keeps_its_position_while_subscribed(run):
    async def main():
        broker, clock = await _broker()
        await broker.subscribe("held")
        seq, epoch = broker.publish_nowait("held", b"1")
        clock.now += 100
        broker.publish_nowait("other", b"x")
        assert broker.history_nowait("held", 0, 10) == (epoch, 1, [])
        await broker.unsubscribe("held")
        clock.now += 21
        broker.publish_nowait("other", b"x")
        assert broker.history_nowait("held", 0, 10).epoch != epoch
    run(main())


def test_history_bytes_are_capped_and_the_oldest_rooms_go_first(run):
    async def main():
        one_room = ROOM_OVERHEAD + 10 * (PUBLICATION_OVERHEAD + 1000)
        broker, clock = await _broker(max_history_bytes=5 * one_room + ROOM_OVERHEAD)
        await broker.subscribe("r0")
        for room in range(8):
            for i in range(10):
                broker.publish_nowait(f"r{room}", b"x" * 1000)
                clock.now += 0.01
        assert broker.history_bytes <= 5 * one_room + ROOM_OVERHEAD
        assert broker.history_evictions == 3 and broker.evicted_publications == 30
        kept = [room for room in range(8) if broker.history_nowait(f"r{room}", 0, 100).publications]
        assert kept == [3, 4, 5, 6, 7]
        # The held room lost its publications but not its position.
        assert broker.history_nowait("r0", 0, 100).top == 10
        # Unheld evicted rooms were forgotten: their numbering restarts.
        assert broker.history_nowait("r1", 0, 100).top == 0
    run(main())


def test_idempotency_keys_expire_with_the_ttl_and_count_in_the_cap(run):
    async def main():
        broker, clock = await _broker()
        before = broker.history_bytes
        first = broker.publish_nowait("r", b"1", "k")
        assert broker.history_bytes == before + ROOM_OVERHEAD + PUBLICATION_OVERHEAD + 1 + KEY_OVERHEAD + 1
        assert broker.publish_nowait("r", b"1", "k") == first
        assert broker.duplicates == 1
        clock.now += 5
        broker.publish_nowait("r", b"2")
        clock.now += 6     # the key is 11 s old, the room 6 s idle
        assert broker.publish_nowait("r", b"1", "k") == (3, first[1])
    run(main())


def test_history_is_bounded_by_size_exactly(run):
    async def main():
        broker, clock = await _broker(retention=lambda room: Retention(3, 10))
        for i in range(10):
            broker.publish_nowait("r", b"%d" % i)
        assert [p.data for p in broker.history_nowait("r", 0, 100).publications] == [b"7", b"8", b"9"]
        assert broker.history_bytes == ROOM_OVERHEAD + 3 * (PUBLICATION_OVERHEAD + 1)
    run(main())


def test_delivery_carries_the_epoch_and_only_for_held_rooms(run):
    async def main():
        clock = Clock()
        broker = MemoryBroker(clock=clock)
        rec = Recorder()
        await broker.start(rec)
        await broker.subscribe("a")
        seq, epoch = broker.publish_nowait("a", b"1")
        broker.publish_nowait("b", b"2")
        await asyncio.sleep(0)
        assert rec.publications == [("a", 1, b"1")] and rec.epochs == [epoch]
    run(main())
