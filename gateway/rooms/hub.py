"""The Hub: room membership, broker subscriptions and encode-once, per-pass batched fan-out.

Membership: room -> members and member -> rooms, both here, so a disconnect removes a
member from every room in one call (`leave_all`). The hub subscribes a room on the broker
when its first local member joins and unsubscribes after the last one leaves, so a process
only receives the rooms it serves. A subscribe that fails (BrokerUnavailable) rolls the
join back: the room is forgotten and every joiner waiting on it gets the exception.

Fan-out, the hot path. The broker pushes `handle_publication(room, seq, data)`, never inline
with a publish (call_soon / the Redis reader). For each publication the hub builds ONE frame:
the JSON payload by byte concatenation around the publisher's already-serialised `data`
(commands.message_prefix, cached per room) and one `encode_frame` call. Frames are not sent
at once: each room collects the frames of the current event-loop pass, and one `call_soon`
per pass flushes every dirty room: its frames are joined into one `bytes` ("batch") and each
member gets `deliver(room, frames, batch)` -- the same objects for every member. A member
that can write passes the batch to its transport: one write per member per pass, however
many publications the pass carried, and no per-frame-per-member work at all. A member that
is behind queues the individual `frames` under its slow-consumer policy (backpressure.py).
msgpack members get a second encoding, made at most once per publication and only when the
room has msgpack members. JSON members that negotiated permessage-deflate (RFC 7692) are kept
apart, grouped by their server window size (`member.deflate_key`): each publication is
compressed ONCE per group (server_no_context_takeover makes one compressed frame valid for
every member of the group) -- no per-member compressor state. Rooms matching
`compression_exclude_rooms` keep those members with the plain ones.

The member interface is tiny (so benchmarks use fake members):
    member.msgpack: bool                          which encoding it wants
    member.deflate_key: int | None                optional: its permessage-deflate window (deflate.py)
    member.deliver(room: Room, frames: list[bytes], batch: bytes) -> None
`room.name` and `room.policy` (whatever `policy_for(name)` returned) are for the member.

Imports: broker.base, commands (the wire format) and gateway_ext (frame encoding); never
the connection, transports or redis.
"""
from __future__ import annotations

import asyncio
import logging
import time

from gateway_ext import encode_frame

from gateway.rooms import commands
from gateway.broker.base import Broker, BrokerUnavailable

log = logging.getLogger("gateway.rooms.hub")

OP_TEXT, OP_BINARY = 0x1, 0x2


class Room:
    """One room of this process: its members, cached prefix and policy, the pass's frames."""

    __slots__ = ("name", "members", "mp_members", "prefix", "policy", "frames", "pubs", "subscribed", "waiters",
                 "z_members", "payloads")

    def __init__(self, name: str, policy) -> None:
        self.name = name
        self.members: dict = {}          # JSON members (a dict: insertion-ordered, O(1) removal)
        self.mp_members: dict = {}       # msgpack members
        self.prefix = commands.message_prefix(name)
        self.policy = policy
        self.frames: list = []           # this pass's JSON frames, in seq order
        self.pubs: list = []             # this pass's (seq, data), for the msgpack encoding
        self.subscribed = False
        self.waiters = None              # future while the broker subscribe is in flight
        self.z_members: dict = {}        # deflate key -> {member: None}: compressed JSON members
        self.payloads: list = []         # this pass's JSON payloads, kept only for z_members

    def __len__(self) -> int:
        return len(self.members) + len(self.mp_members) + sum(map(len, self.z_members.values()))

    def __repr__(self) -> str:
        return f"Room({self.name!r}, members={len(self)})"


class HubGauges:
    __slots__ = ("rooms", "members", "connections")

    def __init__(self, rooms: int, members: int, connections: int) -> None:
        self.rooms = rooms                # rooms with local members
        self.members = members            # memberships
        self.connections = connections    # connections in at least one room


class Hub:
    """See the module docstring. `policy_for(room_name)` gives each room its slow-consumer policy."""

    def __init__(self, broker: Broker, policy_for=None, loop: asyncio.AbstractEventLoop | None = None,
                 deflate=None, max_unflushed_bytes: int = 1 << 20, retention=None) -> None:
        self.broker = broker
        self.retention = retention or broker.retention
        self.deflate = deflate           # deflate.Deflate (compress-once frames) or None
        self.policy_for = policy_for or (lambda name: None)
        self.loop = loop
        self.rooms: dict[str, Room] = {}
        # member -> its Room when it is in one room (the usual case: no dict of its own,
        # ~180 B per joined connection at 50k), {room name: Room} when in several.
        self.member_rooms: dict = {}
        self._dirty: list[Room] = []
        self._flush_scheduled = False
        self._unsubscribing: dict[str, asyncio.Task] = {}
        self._sync_publish = getattr(broker, "publish_nowait", None)
        self._queue_publish = getattr(broker, "publish_future", None)   # Redis: queue now, seq later
        # Inbound backpressure for synchronous publishes (see after_flush).
        self.max_unflushed_bytes = max_unflushed_bytes
        self.unflushed_bytes = 0
        self._after_flush: list = []
        self.publisher_pauses = 0        # times a publisher was paused until the fan-out caught up
        self.broker_connected = False
        # Counters (plain ints; metrics reads them at scrape time).
        self.publishes = 0               # publications this process handed to the broker
        self.publish_failures = 0        # ... refused by the broker (BrokerUnavailable)
        self.publications_received = 0   # publications the broker delivered for a local room
        self.publications_unrouted = 0   # ... for a room that no longer has local members
        self.deliveries = 0              # frames handed to members (one per member per publication)
        self.batches = 0                 # (room, pass) flushes: deliveries / batches = batching factor
        self.joins = 0
        self.leaves = 0
        self.subscribes = 0
        self.unsubscribes = 0
        self.subscribe_failures = 0
        self.member_errors = 0           # a member's deliver() raised (a bug; the member is dropped)
        # Fan-out latency: first publication of a pass -> that pass's writes done (after the
        # Corker's flush). Set by app to a metrics.LatencyHistogram; one timer read per pass.
        self.fanout = None
        self._pass_started = 0.0

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.broker.start(self)

    async def close(self) -> None:
        for task in list(self._unsubscribing.values()):
            task.cancel()
        await self.broker.close()

    @property
    def members(self) -> int:
        """Memberships (a connection in 3 rooms counts 3)."""
        return self.joins - self.leaves

    @property
    def stats(self) -> "HubGauges":
        """Current values for metrics (the counters are the hub's own int attributes)."""
        return HubGauges(len(self.rooms), self.members, len(self.member_rooms))

    @property
    def connections(self) -> int:
        return len(self.member_rooms)

    def rooms_of(self, member) -> dict:
        mine = self.member_rooms.get(member)
        if mine is None:
            return {}
        if type(mine) is Room:
            return {mine.name: mine}
        return mine

    def is_member(self, member, room: str) -> bool:
        mine = self.member_rooms.get(member)
        if mine is None:
            return False
        if type(mine) is Room:
            return mine.name == room
        return room in mine

    # -- membership -------------------------------------------------------------------------

    def join_nowait(self, member, name: str):
        """Join without waiting if the room is already subscribed here.

        True: joined; False: already a member; None: the broker must subscribe first
        (call `await join(member, name)`).
        """
        mine = self.member_rooms.get(member)
        if mine is not None and (mine.name == name if type(mine) is Room else name in mine):
            return False
        room = self.rooms.get(name)
        if room is None or not room.subscribed:
            return None
        self._add(member, room, mine)
        return True

    async def join(self, member, name: str) -> bool:
        """Join `name`, subscribing the broker if this is its first local member.

        Raises BrokerUnavailable (and leaves no trace) when the subscribe fails.
        """
        while True:
            joined = self.join_nowait(member, name)
            if joined is not None:
                return joined
            room = self.rooms.get(name)
            if room is None:
                pending = self._unsubscribing.get(name)
                if pending is not None:
                    # Order the broker's commands: this room's unsubscribe first, then ours.
                    await asyncio.shield(pending)
                    continue
                room = Room(name, self.policy_for(name))
                self.rooms[name] = room
                room.waiters = self.loop.create_future()
                try:
                    await self.broker.subscribe(name)
                except BaseException as exc:
                    self.subscribe_failures += 1
                    if self.rooms.get(name) is room:
                        del self.rooms[name]
                    error = exc if isinstance(exc, BrokerUnavailable) else BrokerUnavailable(f"subscribe failed: {exc!r}")
                    room.waiters.set_exception(error)
                    room.waiters.exception()   # retrieved: no "never retrieved" warning without waiters
                    room.waiters = None
                    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                        raise
                    raise error from exc
                self.subscribes += 1
                room.subscribed = True
                room.waiters.set_result(None)
                room.waiters = None
                if self.rooms.get(name) is not room:  # pragma: no cover - defensive
                    continue
                self._add(member, room, self.member_rooms.get(member))
                if member not in self.member_rooms:  # pragma: no cover - defensive
                    continue
                return True
            # Another member's subscribe is in flight: wait for its outcome.
            await asyncio.shield(room.waiters)

    def _add(self, member, room: Room, mine) -> None:
        if mine is None:
            self.member_rooms[member] = room
        elif type(mine) is Room:
            self.member_rooms[member] = {mine.name: mine, room.name: room}
        else:
            mine[room.name] = room
        key = getattr(member, "deflate_key", None)
        if key is not None and not member.msgpack and self.deflate is not None and self.deflate.room_compressed(room.name):
            room.z_members.setdefault(key, {})[member] = None
        else:
            (room.mp_members if member.msgpack else room.members)[member] = None
        self.joins += 1

    def leave(self, member, name: str) -> bool:
        """Leave `name`; False if `member` was not in it. The last leave unsubscribes."""
        mine = self.member_rooms.get(member)
        if mine is None:
            return False
        if type(mine) is Room:
            if mine.name != name:
                return False
            room = mine
            del self.member_rooms[member]
        else:
            room = mine.pop(name, None)
            if room is None:
                return False
            if len(mine) == 1:
                self.member_rooms[member] = next(iter(mine.values()))   # back to the one-room form
            elif not mine:  # pragma: no cover - a dict always holds two or more
                del self.member_rooms[member]
        self._remove(member, room)
        return True

    def leave_all(self, member) -> int:
        """Remove `member` from every room (disconnect, slow-consumer kick); returns how many."""
        mine = self.member_rooms.pop(member, None)
        if mine is None:
            return 0
        rooms = (mine,) if type(mine) is Room else tuple(mine.values())
        for room in rooms:
            self._remove(member, room)
        return len(rooms)

    def _remove(self, member, room: Room) -> None:
        room.members.pop(member, None)
        room.mp_members.pop(member, None)
        if room.z_members:
            group = room.z_members.get(getattr(member, "deflate_key", None))
            if group is not None:
                group.pop(member, None)
                if not group:
                    del room.z_members[member.deflate_key]
        self.leaves += 1
        if not room.members and not room.mp_members and not room.z_members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            room.frames = []
            room.pubs = []
            room.payloads = []
            self._unsubscribing[room.name] = self.loop.create_task(self._unsubscribe(room.name))

    async def _unsubscribe(self, name: str) -> None:
        try:
            await self.broker.unsubscribe(name)
            self.unsubscribes += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not fatal: at worst this process keeps receiving a room nobody here reads.
            log.warning("broker unsubscribe failed", extra={"event": "unsubscribe_failed", "room": name,
                                                            "error": repr(exc)[:200]})
        finally:
            if self._unsubscribing.get(name) is asyncio.current_task():
                del self._unsubscribing[name]

    # -- publishing -------------------------------------------------------------------------

    @property
    def can_publish_nowait(self) -> bool:
        return self._sync_publish is not None

    def publish_nowait(self, room: str, data: bytes) -> int:
        """Publish without awaiting (brokers with a synchronous path: memory); returns seq.

        Callers check `must_throttle` afterwards: past `max_unflushed_bytes` they stop
        reading their client until `after_flush` says this pass's frames went out.
        """
        seq = self._sync_publish(room, data)[0]
        self.publishes += 1
        self.unflushed_bytes += len(data)
        return seq

    @property
    def must_throttle(self) -> bool:
        return self.unflushed_bytes > self.max_unflushed_bytes

    def after_flush(self, callback) -> None:
        """Run `callback()` once the publications accepted so far have been fanned out.

        A publisher that can write faster than the fan-out (a libuv read loop can hand over
        megabytes in one pass) is paused until then, so one pass never holds more than about
        max_unflushed_bytes of frames, however fast the inbound socket is.
        """
        self._after_flush.append(callback)
        if not self._flush_scheduled:
            # After the handle_publication callbacks already queued (call_soon is FIFO).
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    async def publish(self, room: str, data: bytes) -> int:
        """Publish already-serialised JSON `data` to `room` (clients and backends); returns seq.

        `data` must be valid JSON (commands.serialize_data makes it): it is spliced into
        every member's frame as is. Raises BrokerUnavailable when the broker refuses.
        """
        try:
            seq = (await self.broker.publish(room, data))[0]
        except BrokerUnavailable:
            self.publish_failures += 1
            raise
        self.publishes += 1
        return seq

    @property
    def can_publish_queued(self) -> bool:
        return self._queue_publish is not None

    def publish_queued(self, room: str, data: bytes) -> asyncio.Future:
        """Queue a publication without awaiting it (brokers that keep call order: Redis).

        The future resolves to its seq or fails with BrokerUnavailable; raises
        BrokerUnavailable at once when refused. A publisher with several publications in
        flight lets the broker send them in one round trip and the hub fan them out in one
        pass, instead of one Redis round trip and one write per member per publication.
        """
        try:
            fut = self._queue_publish(room, data)
        except BrokerUnavailable:
            self.publish_failures += 1
            raise
        fut.add_done_callback(self._queued_done)
        return fut

    def _queued_done(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.publish_failures += 1
        else:
            self.publishes += 1

    # -- delivery (BrokerHandler) -----------------------------------------------------------

    def handle_broker_state(self, connected: bool) -> None:
        if connected != self.broker_connected:
            log.info("broker connected" if connected else "broker disconnected",
                     extra={"event": "broker_state", "broker": self.broker.name, "connected": connected})
        self.broker_connected = connected

    def handle_publication(self, name: str, seq: int, data: bytes, epoch: str | None = None) -> None:
        room = self.rooms.get(name)
        if room is None or not room.subscribed:
            self.publications_unrouted += 1
            return
        self.publications_received += 1
        if not room.frames:
            if not self._dirty and self.fanout is not None:
                # Once per pass, not per publication; perf_counter: uvloop's loop.time() has 1 ms steps.
                self._pass_started = time.perf_counter()
            self._dirty.append(room)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        payload = room.prefix + data + b',"seq":%d}' % seq
        room.frames.append(encode_frame(OP_TEXT, payload))
        if room.mp_members:
            room.pubs.append((seq, data))
        if room.z_members:
            room.payloads.append(payload)

    def _flush(self) -> None:
        """Once per loop pass: each dirty room's frames, joined once, to each member."""
        self._flush_scheduled = False
        self.unflushed_bytes = 0
        dirty = self._dirty
        self._dirty = []
        if self._after_flush:
            waiting = self._after_flush
            self._after_flush = []
            self.loop.call_soon(self._run_after_flush, waiting)
        for room in dirty:
            frames = room.frames
            if not frames:
                continue  # emptied by its last member leaving
            room.frames = []
            pubs = room.pubs
            room.pubs = []
            payloads = room.payloads
            room.payloads = []
            self.batches += 1
            if room.members:
                batch = frames[0] if len(frames) == 1 else b"".join(frames)
                self._deliver(room, room.members, frames, batch)
            if room.mp_members and pubs:
                name = room.name
                mp_frames = [encode_frame(OP_BINARY, commands.msgpack_message(name, data, seq)) for seq, data in pubs]
                batch = mp_frames[0] if len(mp_frames) == 1 else b"".join(mp_frames)
                self._deliver(room, room.mp_members, mp_frames, batch)
            if room.z_members and payloads:
                self._deliver_compressed(room, payloads)
        if self.fanout is not None and dirty:
            # Queued after the deliveries scheduled the Corker: runs once the frames are written.
            self.loop.call_soon(self._fanout_done, self._pass_started)

    def _deliver_compressed(self, room: Room, payloads: list) -> None:
        # RFC 7692: one compressed frame per publication per window size, shared by the group.
        frame = self.deflate.frame
        for key, members in tuple(room.z_members.items()):
            frames = [frame(OP_TEXT, payload, key) for payload in payloads]
            batch = frames[0] if len(frames) == 1 else b"".join(frames)
            self._deliver(room, members, frames, batch)

    def _fanout_done(self, started: float) -> None:
        self.fanout.observe(time.perf_counter() - started)

    def _run_after_flush(self, callbacks: list) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("after_flush callback failed")

    def _deliver(self, room: Room, members: dict, frames: list, batch: bytes) -> None:
        # A copy: deliver() may make a member leave (slow-consumer disconnect).
        targets = tuple(members)
        self.deliveries += len(frames) * len(targets)
        for member in targets:
            try:
                member.deliver(room, frames, batch)
            except Exception:
                self.member_errors += 1
                log.exception("member delivery failed; removing the member", extra={"room": room.name})
                self.leave_all(member)
