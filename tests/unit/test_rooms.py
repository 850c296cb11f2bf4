"""Hub: membership, first-join subscribe / last-leave unsubscribe, encode-once batched fan-out.

Fake members (the hub's member interface is two attributes) and the real MemoryBroker;
a scripted broker for the failure paths.
"""
import asyncio

import msgpack
import orjson
import pytest

from gateway.broker.base import Broker, BrokerUnavailable, History
from gateway.broker.memory import MemoryBroker
from gateway.rooms.hub import Hub
from gateway_ext import FrameParser


class FakeMember:
    def __init__(self, msgpack=False, explode=False):
        self.msgpack = msgpack
        self.explode = explode
        self.calls = []          # (room name, frames, batch)

    def deliver(self, room, frames, batch):
        if self.explode:
            raise RuntimeError("boom")
        self.calls.append((room.name, frames, batch))

    def messages(self):
        out = []
        for _room, _frames, batch in self.calls:
            for _op, _fin, _rsv, payload in FrameParser(1 << 20, require_mask=False).feed(batch):
                out.append(msgpack.unpackb(payload) if self.msgpack else orjson.loads(payload))
        return out


class ScriptedBroker(Broker):
    """Records calls; subscribe can be made to fail or to wait for a go signal."""

    name = "scripted"

    def __init__(self):
        super().__init__()
        self.calls = []
        self.reads = []
        self.fail_subscribe = False
        self.gate = None

    async def start(self, handler):
        self.handler = handler
        handler.handle_broker_state(True)

    async def subscribe(self, room):
        self.calls.append(("subscribe", room))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_subscribe:
            raise BrokerUnavailable("redis is down")

    async def unsubscribe(self, room):
        self.calls.append(("unsubscribe", room))

    async def publish(self, room, data, idempotency_key=None):
        raise BrokerUnavailable("redis is down")

    async def history(self, room, since, limit):
        self.reads.append((room, since, limit))
        return History("e1", 0, [])

    async def close(self):
        pass


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_fanout_is_encoded_once_and_batched_per_pass(run):
    async def main():
        hub = Hub(MemoryBroker())
        await hub.start()
        members = [FakeMember() for _ in range(50)]
        for m in members:
            assert await hub.join(m, "r") is True
        assert hub.join_nowait(members[0], "r") is False      # already a member
        seqs = [hub.publish_nowait("r", orjson.dumps({"n": i})) for i in range(32)]
        assert seqs == list(range(1, 33))
        await settle()
        first = members[0].calls
        assert len(first) == 1                      # one delivery for the 32 publications of this pass
        _, frames, batch = first[0]
        assert len(frames) == 32 and batch == b"".join(frames)
        for m in members:
            assert m.calls[0][2] is batch           # the very same bytes object for everyone
        assert [msg["seq"] for msg in members[7].messages()] == seqs
        assert members[7].messages()[3] == {"op": "message", "room": "r", "data": {"n": 3}, "seq": 4}
        assert hub.deliveries == 32 * 50 and hub.batches == 1 and hub.publishes == 32
        # A later pass is a new batch.
        hub.publish_nowait("r", b"1")
        await settle()
        assert len(members[0].calls) == 2 and members[0].messages()[-1]["seq"] == 33
    run(main())


def test_msgpack_members_get_a_second_encoding_once(run):
    async def main():
        hub = Hub(MemoryBroker())
        await hub.start()
        js, mp1, mp2 = FakeMember(), FakeMember(msgpack=True), FakeMember(msgpack=True)
        for m in (js, mp1, mp2):
            await hub.join(m, "r")
        await hub.publish("r", b'{"a":[1,2]}')
        await hub.publish("r", b'"two"')
        await settle()
        assert mp1.calls[0][2] is mp2.calls[0][2]
        assert mp1.messages() == [{"op": "message", "room": "r", "data": {"a": [1, 2]}, "seq": 1},
                                  {"op": "message", "room": "r", "data": "two", "seq": 2}]
        assert js.messages()[1]["data"] == "two"
    run(main())


def test_membership_of_one_room_and_of_several(run):
    # One room: the hub keeps the Room itself (no dict per member); several: a dict. Every
    # query answers the same in both forms, and leaving goes back to the one-room form.
    async def main():
        hub = Hub(MemoryBroker())
        await hub.start()
        m = FakeMember()
        assert hub.rooms_of(m) == {} and not hub.is_member(m, "r") and not hub.leave(m, "r")
        assert await hub.join(m, "r") and not await hub.join(m, "r")
        assert type(hub.member_rooms[m]) is not dict
        assert set(hub.rooms_of(m)) == {"r"} and hub.is_member(m, "r") and not hub.is_member(m, "s")
        assert not hub.leave(m, "s")
        assert await hub.join(m, "s") and await hub.join(m, "t") and not await hub.join(m, "s")
        assert set(hub.rooms_of(m)) == {"r", "s", "t"} and hub.is_member(m, "t")
        assert hub.leave(m, "r") and hub.leave(m, "t")
        assert type(hub.member_rooms[m]) is not dict and set(hub.rooms_of(m)) == {"s"}
        await hub.publish("s", b'"still here"')
        await settle()
        assert [msg["data"] for msg in m.messages()] == ["still here"]
        assert hub.leave_all(m) == 1 and hub.member_rooms == {} and hub.members == 0
        await hub.join(m, "a")
        await hub.join(m, "b")
        assert hub.leave_all(m) == 2 and hub.member_rooms == {} and hub.members == 0
    run(main())


def test_first_join_subscribes_last_leave_unsubscribes(run):
    async def main():
        broker = ScriptedBroker()
        hub = Hub(broker)
        await hub.start()
        a, b = FakeMember(), FakeMember()
        await hub.join(a, "r")
        await hub.join(b, "r")
        await hub.join(a, "s")
        assert broker.calls == [("subscribe", "r"), ("subscribe", "s")]
        assert hub.members == 3 and hub.connections == 2 and set(hub.rooms_of(a)) == {"r", "s"}
        assert hub.leave(a, "r") and not hub.leave(a, "r") and not hub.leave(FakeMember(), "r")
        await settle()
        assert ("unsubscribe", "r") not in broker.calls     # b is still there
        assert hub.leave_all(b) == 1 and hub.leave_all(a) == 1 and hub.leave_all(a) == 0
        await settle()
        assert broker.calls[2:] == [("unsubscribe", "r"), ("unsubscribe", "s")]
        assert hub.rooms == {} and hub.member_rooms == {} and hub.members == 0
        assert hub.unsubscribes == 2
    run(main())


def test_rejoin_waits_for_the_pending_unsubscribe(run):
    async def main():
        broker = ScriptedBroker()
        hub = Hub(broker)
        await hub.start()
        a = FakeMember()
        await hub.join(a, "r")
        hub.leave(a, "r")                     # unsubscribe task created, not yet run
        await hub.join(a, "r")
        assert broker.calls == [("subscribe", "r"), ("unsubscribe", "r"), ("subscribe", "r")]
        assert hub.is_member(a, "r")
    run(main())


def test_failed_subscribe_rolls_back_every_waiting_joiner(run):
    async def main():
        broker = ScriptedBroker()
        broker.fail_subscribe = True
        broker.gate = asyncio.Event()
        hub = Hub(broker)
        await hub.start()
        a, b = FakeMember(), FakeMember()
        ta = asyncio.ensure_future(hub.join(a, "r"))
        tb = asyncio.ensure_future(hub.join(b, "r"))
        await settle()
        assert broker.calls == [("subscribe", "r")]        # one subscribe for both joiners
        broker.gate.set()
        for t in (ta, tb):
            with pytest.raises(BrokerUnavailable):
                await t
        assert hub.rooms == {} and hub.member_rooms == {} and hub.subscribe_failures == 1
        broker.fail_subscribe = False
        assert await hub.join(a, "r") is True            # the next attempt starts afresh
        with pytest.raises(BrokerUnavailable):
            await hub.publish("r", b"1")
        assert hub.publish_failures == 1
    run(main())


def test_publication_for_a_left_room_is_dropped_and_a_failing_member_is_removed(run):
    async def main():
        hub = Hub(MemoryBroker())
        await hub.start()
        good, bad = FakeMember(), FakeMember(explode=True)
        await hub.join(good, "r")
        await hub.join(bad, "r")
        hub.publish_nowait("r", b"1")
        hub.leave(good, "r")                  # leaves before the pass is flushed
        await settle()
        assert good.calls == [] and hub.member_errors == 1 and hub.member_rooms == {}
        hub.handle_publication("gone", 1, b"1")
        assert hub.publications_unrouted == 1
    run(main())


def test_member_leaving_during_delivery_does_not_break_the_loop(run):
    async def main():
        hub = Hub(MemoryBroker())
        await hub.start()
        members = []

        class Kicker(FakeMember):
            def deliver(self, room, frames, batch):
                super().deliver(room, frames, batch)
                for m in members:
                    hub.leave_all(m)      # e.g. a slow-consumer disconnect mid-loop

        members = [Kicker()] + [FakeMember() for _ in range(3)]
        for m in members:
            await hub.join(m, "r")
        hub.publish_nowait("r", b"1")
        await settle()
        assert hub.rooms == {} and hub.member_errors == 0
    run(main())


def test_publishers_are_throttled_until_the_pass_is_fanned_out(run):
    async def main():
        hub = Hub(MemoryBroker(), max_unflushed_bytes=100)
        await hub.start()
        m = FakeMember()
        await hub.join(m, "r")
        order = []
        hub.publish_nowait("r", b"1" * 60)
        assert not hub.must_throttle
        hub.publish_nowait("r", b"2" * 60)
        assert hub.must_throttle
        hub.after_flush(lambda: order.append(("resumed", len(m.calls))))
        await settle()
        assert order == [("resumed", 1)]          # after the frames went to the member
        assert not hub.must_throttle and hub.unflushed_bytes == 0
        # Without local members there is no fan-out, but the callback still runs.
        hub.publish_nowait("nobody", b"x" * 200)
        hub.after_flush(lambda: order.append("empty"))
        await settle()
        assert order[-1] == "empty"
    run(main())
