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

Positions and recovery (rooms/history.py, docs/history.md). Each room knows its position:
`epoch` and `top` (the last seq accepted) and `flushed` (the last seq handed to members).
Publications are de-duplicated by seq (a copy that a history read already delivered is
dropped) and a new epoch makes the hub deliver `{"op":"reset",...}` to the members first.
A join is answered with the position its member continues from (`reply(seq, epoch,
recovered)`, called synchronously right before the member is attached, so the ack, the
replayed range and the live stream follow each other with no gap and no duplicate). A join
with `since` is served from the room's replay window when it covers the range, at once;
otherwise the joiner waits (not attached: live frames do not reach it) for ONE history read
per room in flight, which serves every waiting joiner whose range it covers and leaves a
window behind for the next ones. Replayed frames are built once per publication and
encoding and shared by joiners, like live fan-out. A re-join with `since` by a member
detaches it until its range is replayed (recovery after `dropped`).

The member interface is tiny (so benchmarks use fake members):
    member.msgpack: bool                          which encoding it wants
    member.deflate_key: int | None                optional: its permessage-deflate window (deflate.py)
    member.deliver(room: Room, frames: list[bytes], batch: bytes) -> None
    member.sse: bool                              optional: a Server-Sent Events stream, which gets
    member.deliver_events(room, seqs, blocks)     ... one shared `data:` block per publication
    member.reset_event(room, epoch, seq)          ... and the `reset` as a call (it writes its own ids)
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
from gateway.rooms.history import WINDOW_IDLE, WINDOW_SLACK, Entry, HistoryStats, Window
from gateway.broker.base import Broker, BrokerUnavailable, SyncPublisher, QueuedPublisher

log = logging.getLogger("gateway.rooms.hub")

OP_TEXT, OP_BINARY = 0x1, 0x2


class Room:
    """One room of this process: its members, cached prefix and policy, the pass's frames."""

    __slots__ = ("name", "members", "mp_members", "prefix", "policy", "frames", "pubs", "subscribed", "waiters",
                 "z_members", "payloads", "sse_members", "epoch", "top", "flushed", "window", "joining", "reading", "held",
                 "retention")

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
        self.sse_members: dict = {}      # Server-Sent Events streams (deliver_events, see server/sse.py)
        self.epoch: str | None = None    # the room's numbering as this process knows it (None: not yet)
        self.top = 0                     # last seq accepted (live or from a history read)
        self.flushed = -1                # last seq handed to members; -1: position not known yet
        self.window: Window | None = None
        self.joining: list = []          # Joiners waiting for the position or their range
        self.reading = None              # the `since` of the history read in flight, or None
        self.held: list | None = None    # entries fanned out while a read is in flight
        self.retention = None

    def __len__(self) -> int:
        return (len(self.members) + len(self.mp_members) + sum(map(len, self.z_members.values()))
                + len(self.sse_members))

    def empty(self) -> bool:
        return (not self.members and not self.mp_members and not self.z_members and not self.joining
                and not self.sse_members)


class Joiner:
    """A join waiting for its position or its range: answered (and attached) by the hub."""

    __slots__ = ("member", "since", "epoch", "last", "reply", "future", "read", "rejoin")

    def __init__(self, member, since, epoch, last, reply, future) -> None:
        self.member = member
        self.since = since      # seq to replay after, or None (plain join / last)
        self.epoch = epoch
        self.last = last        # latest-value join: the most recent publication only
        self.reply = reply      # reply(seq, epoch, recovered) -> None: the ack, sent before the replay
        self.future = future    # resolved True when attached, False if it left first
        self.read = False       # a history read that covered it has completed
        self.rejoin = False     # a member asking for a range again (it stays a member on failure)

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
        self._sync_publish = broker.publish_nowait if isinstance(broker, SyncPublisher) else None
        # Redis: queue now, seq later
        self._queue_publish = broker.publish_future if isinstance(broker, QueuedPublisher) else None
        self._sync_history = getattr(broker, "history_nowait", None)    # memory: reads need no await
        self.history = HistoryStats(broker)
        self._window_sweep = None
        self.max_window_bytes = 64 << 20     # all rooms' replay windows together
        self.duplicates_dropped = 0          # publications already delivered (e.g. by a history read)
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
        # (room name, occupied: bool) -> None on a room's first local member and after its
        # last one left (api/webhooks.py: room_occupied / room_vacated); None: not asked.
        self.room_observer = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.broker.start(self)

    async def close(self) -> None:
        for task in list(self._unsubscribing.values()):
            task.cancel()
        if self._window_sweep is not None:
            self._window_sweep.cancel()
            self._window_sweep = None
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

    def position(self, name: str) -> tuple[int, str] | None:
        """(seq, epoch) a member of `name` on this process is at, if known here."""
        room = self.rooms.get(name)
        if room is None or room.flushed < 0:
            return None
        return room.flushed, room.epoch

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

    def join_nowait(self, member, name: str, since: int | None = None, epoch: str | None = None,
                    last: bool = False, reply=None):
        """Join without waiting if the room is subscribed here and its position or the
        joiner's range is at hand (the usual case).

        True: joined (`reply` was called, the replay delivered, the member attached);
        False: already a member (a plain join: harmless, nothing done); None: it must wait
        (call `await join(...)` with the same arguments).
        """
        mine = self.member_rooms.get(member)
        if mine is not None and (mine.name == name if type(mine) is Room else name in mine):
            return False if since is None and not last else None   # a recovery: `await join(...)`
        room = self.rooms.get(name)
        if room is None or not room.subscribed:
            return None
        if room.flushed < 0 and not room.joining and self._sync_history is not None:
            self._read(room, 0 if last else since)   # memory: the position (and range) is one call away
        joiner = Joiner(member, since, epoch, last, reply, None)
        if room.flushed < 0 or not self._serve(room, joiner):
            return None
        self._register(member, room, mine)
        self._attach(member, room)
        return True

    async def join(self, member, name: str, since: int | None = None, epoch: str | None = None,
                   last: bool = False, reply=None) -> bool:
        """Join `name`, subscribing the broker if this is its first local member, and answer
        with the position (`reply(seq, epoch, recovered)`), the replayed range, then live.

        Raises BrokerUnavailable (and leaves no trace) when the subscribe fails.
        """
        while True:
            mine = self.member_rooms.get(member)
            if mine is not None and (mine.name == name if type(mine) is Room else name in mine):
                if since is None and not last:
                    return False
                return await self._rejoin(member, mine if type(mine) is Room else mine[name], since, epoch, last,
                                          reply)
            room = self.rooms.get(name)
            if room is not None and room.subscribed:
                return await self._join_subscribed(member, room, since, epoch, last, reply)
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
                if self.room_observer is not None:
                    self.room_observer(name, True)
                return await self._join_subscribed(member, room, since, epoch, last, reply)
            # Another member's subscribe is in flight: wait for its outcome.
            await asyncio.shield(room.waiters)

    async def _join_subscribed(self, member, room: Room, since, epoch, last, reply) -> bool:
        mine = self.member_rooms.get(member)
        if room.flushed < 0 and not room.joining and self._sync_history is not None:
            self._read(room, 0 if last else since)
        joiner = Joiner(member, since, epoch, last, reply, None)
        if room.flushed >= 0 and self._serve(room, joiner):
            self._register(member, room, mine)
            self._attach(member, room)
            return True
        # Registered now (leave/disconnect find it), attached when answered.
        self._register(member, room, mine)
        joiner.future = self.loop.create_future()
        room.joining.append(joiner)
        self._need_read(room)
        return await joiner.future

    async def _rejoin(self, member, room: Room, since, epoch, last, reply) -> bool:
        """A member asks for a range again (after `dropped` or a gap): detach it until the
        range is replayed, so no live frame overtakes the replay."""
        self._detach(member, room)
        joiner = Joiner(member, since, epoch, last, reply, None)
        joiner.rejoin = True
        if room.flushed >= 0 and self._serve(room, joiner):
            self._attach(member, room)
            return True
        joiner.future = self.loop.create_future()
        room.joining.append(joiner)
        self._need_read(room)
        return await joiner.future

    def _register(self, member, room: Room, mine) -> None:
        if mine is None:
            self.member_rooms[member] = room
        elif type(mine) is Room:
            self.member_rooms[member] = {mine.name: mine, room.name: room}
        else:
            mine[room.name] = room
        self.joins += 1

    def _attach(self, member, room: Room) -> None:
        """Add the member to the room's delivery group (live frames reach it from now on)."""
        if getattr(member, "sse", False):
            room.sse_members[member] = None
            return
        key = getattr(member, "deflate_key", None)
        if key is not None and not member.msgpack and self.deflate is not None and self.deflate.room_compressed(room.name):
            room.z_members.setdefault(key, {})[member] = None
        else:
            (room.mp_members if member.msgpack else room.members)[member] = None

    def _detach(self, member, room: Room) -> None:
        room.members.pop(member, None)
        room.sse_members.pop(member, None)
        room.mp_members.pop(member, None)
        if room.z_members:
            key = getattr(member, "deflate_key", None)
            group = room.z_members.get(key)
            if group is not None:
                group.pop(member, None)
                if not group:
                    del room.z_members[key]

    def _variant(self, member, room: Room):
        """Which encoding of a publication this member gets: "json", "msgpack" or a deflate key."""
        if member.msgpack:
            return "msgpack"
        if getattr(member, "sse", False):
            return "sse"
        key = getattr(member, "deflate_key", None)
        if key is not None and self.deflate is not None and self.deflate.room_compressed(room.name):
            return key
        return "json"

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
        self._detach(member, room)
        if room.joining:
            for joiner in [j for j in room.joining if j.member is member]:
                room.joining.remove(joiner)
                if joiner.future is not None and not joiner.future.done():
                    joiner.future.set_result(False)
        self.leaves += 1
        if room.empty() and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            room.frames = []
            room.pubs = []
            room.payloads = []
            self._drop_window(room)
            self._unsubscribing[room.name] = self.loop.create_task(self._unsubscribe(room.name))
            if self.room_observer is not None:
                self.room_observer(room.name, False)

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

    def publish_nowait(self, room: str, data: bytes, idempotency_key: str | None = None) -> int:
        """Publish without awaiting (brokers with a synchronous path: memory); returns seq.

        Callers check `must_throttle` afterwards: past `max_unflushed_bytes` they stop
        reading their client until `after_flush` says this pass's frames went out.
        """
        seq = self._sync_publish(room, data, idempotency_key)[0]
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

    async def publish(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        """Publish already-serialised JSON `data` to `room` (clients and backends); returns (seq, epoch).

        `data` must be valid JSON (commands.serialize_data makes it): it is spliced into
        every member's frame as is. Raises BrokerUnavailable when the broker refuses.
        """
        try:
            result = await self.broker.publish(room, data, idempotency_key)
        except BrokerUnavailable:
            self.publish_failures += 1
            raise
        self.publishes += 1
        return result

    @property
    def can_publish_queued(self) -> bool:
        return self._queue_publish is not None

    def publish_queued(self, room: str, data: bytes, idempotency_key: str | None = None) -> asyncio.Future:
        """Queue a publication without awaiting it (brokers that keep call order: Redis).

        The future resolves to its seq or fails with BrokerUnavailable; raises
        BrokerUnavailable at once when refused. A publisher with several publications in
        flight lets the broker send them in one round trip and the hub fan them out in one
        pass, instead of one Redis round trip and one write per member per publication.
        """
        try:
            fut = self._queue_publish(room, data, idempotency_key)
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
        if seq:
            if epoch is not room.epoch and epoch != room.epoch:
                if room.epoch is None:
                    room.epoch = epoch        # first news of this room here: its position starts now
                    room.top = seq - 1
                else:
                    self._new_epoch(room, epoch, seq - 1)
            elif seq <= room.top:
                self.duplicates_dropped += 1  # already delivered (a history read got there first)
                return
            room.top = seq
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
            if room.frames:
                self._flush_room(room)
        if self.fanout is not None and dirty:
            # Queued after the deliveries scheduled the Corker: runs once the frames are written.
            self.loop.call_soon(self._fanout_done, self._pass_started)

    def _flush_room(self, room: Room) -> None:
        frames = room.frames
        room.frames = []
        pubs = room.pubs
        room.pubs = []
        payloads = room.payloads
        room.payloads = []
        self.batches += 1
        if room.members:
            batch = frames[0] if len(frames) == 1 else b"".join(frames)
            self._deliver(room, room.members, frames, batch)
        if room.mp_members:
            name = room.name
            mp_frames = [encode_frame(OP_BINARY, commands.msgpack_message(name, data, seq)) for seq, data in pubs]
            batch = mp_frames[0] if len(mp_frames) == 1 else b"".join(mp_frames)
            self._deliver(room, room.mp_members, mp_frames, batch)
        if room.z_members and payloads:
            self._deliver_compressed(room, payloads)
        if room.sse_members:
            # One `data:` block per publication, shared by every stream (each adds its own `id:`).
            prefix = room.prefix
            seqs = [seq for seq, _ in pubs]
            blocks = [b"data: " + prefix + data + b',"seq":%d}\n\n' % seq for seq, data in pubs]
            self._deliver_events(room, room.sse_members, seqs, blocks)
        if room.epoch is not None:
            room.flushed = room.top   # members (attached before this flush) are at the top now
        if room.window is not None or room.held is not None:
            self._keep(room, pubs, frames)
        if room.joining:
            self._serve_joining(room)
        self._trim_window(room)

    def _trim_window(self, room: Room) -> None:
        """Keep what the history keeps: a window answers exactly like the broker would (the
        slack only lives while the joiners a read was made for are answered)."""
        window = room.window
        if window is not None and len(window.entries) > self._retention(room).size:
            self.history.window_bytes -= window.trim(self._retention(room).size)

    # -- history: windows, reads, recoveries -------------------------------------------------

    def _keep(self, room: Room, pubs: list, frames: list) -> None:
        """Extend the room's replay window (or the read's held list) with a flushed pass."""
        window = room.window
        held = room.held
        for (seq, data), frame in zip(pubs, frames):
            if not seq:
                continue
            entry = Entry(seq, data, frame)
            if held is not None:
                held.append(entry)
            if window is not None and window.epoch == room.epoch:
                before = window.bytes
                if not window.append(entry):
                    self._drop_window(room)   # a hole: the next recovery reads again
                    window = None
                    continue
                self.history.window_bytes += window.bytes - before
        if window is not None:
            # A bound while joiners wait; the exact history_size trim follows their answers.
            self.history.window_bytes -= window.trim(self._retention(room).size + WINDOW_SLACK)

    def _retention(self, room: Room):
        if room.retention is None:
            room.retention = self.retention(room.name)
        return room.retention

    def _drop_window(self, room: Room) -> None:
        if room.window is not None:
            self.history.window_bytes -= room.window.bytes
            room.window = None

    def _new_epoch(self, room: Room, epoch: str, seq: int) -> None:
        """The room's numbering restarted: deliver what the old one had, then `reset` to members."""
        if room.frames:
            self._flush_room(room)
        room.epoch = epoch
        room.top = seq
        if room.flushed >= 0:
            room.flushed = seq
        self._drop_window(room)
        self.history.resets += 1
        doc = {"op": "reset", "room": room.name, "epoch": epoch, "seq": seq}
        if room.members:
            frame = encode_frame(OP_TEXT, commands.encode_json(doc))
            self._deliver(room, room.members, [frame], frame)
        if room.mp_members:
            frame = encode_frame(OP_BINARY, commands.encode_msgpack(doc))
            self._deliver(room, room.mp_members, [frame], frame)
        for key, members in tuple(room.z_members.items()):
            frame = self.deflate.frame(OP_TEXT, commands.encode_json(doc), key)
            self._deliver(room, members, [frame], frame)
        for member in tuple(room.sse_members):
            member.reset_event(room, epoch, seq)

    def _serve(self, room: Room, joiner: Joiner) -> bool:
        """Answer a joiner now if its position or range is at hand; False: it must wait."""
        top = room.flushed
        epoch = room.epoch
        since = joiner.since
        if joiner.last:
            if top == 0 or not self._retention(room).size:
                self._answer(room, joiner, top, None, ())
                return True
            since = top - 1
        elif since is None:
            self._answer(room, joiner, top, None, ())
            return True
        elif joiner.epoch != epoch:
            if not joiner.read:
                return False       # confirm the epoch with a read: this process may be the stale one
            self.history.recoveries_failed += 1
            self._answer(room, joiner, top, False, ())
            return True
        elif since == top:
            self.history.recoveries_succeeded += 1
            self._answer(room, joiner, top, True, ())
            return True
        elif since > top:
            if since <= room.top:
                return False       # in this pass: served after the flush
            if not joiner.read:
                return False       # ahead of this process: the broker knows better
            self.history.recoveries_failed += 1
            self._answer(room, joiner, top, False, ())
            return True
        window = room.window
        if window is not None and window.epoch == epoch and window.covers(since, top):
            window.used = self.loop.time()
            if not joiner.last:
                self.history.recoveries_succeeded += 1
            self._answer(room, joiner, top, None if joiner.last else True, window.between(since, top))
            return True
        if not joiner.read:
            return False
        if joiner.last:
            self._answer(room, joiner, top, None, ())
            return True
        self.history.recoveries_failed += 1
        self._answer(room, joiner, top, False, ())
        return True

    def _answer(self, room: Room, joiner: Joiner, seq: int, recovered, entries) -> None:
        """The ack, then the replay, then (by the caller) attach: in this order, in one go."""
        if joiner.last:
            self.history.last_joins += 1
        if joiner.reply is not None:
            joiner.reply(seq, room.epoch, recovered)
        if entries:
            self._replay(room, joiner.member, entries)

    def _replay(self, room: Room, member, entries: list) -> None:
        variant = self._variant(member, room)
        window = room.window
        key = (variant, entries[0].seq, entries[-1].seq)
        cached = window.batches.get(key) if window is not None else None
        if cached is None:
            frames = [self._frame(room, entry, variant) for entry in entries]
            cached = (frames, frames[0] if len(frames) == 1 else b"".join(frames))
            if window is not None:
                window.batches[key] = cached
        self.history.replayed += len(entries)
        self.deliveries += len(entries)
        try:
            if variant == "sse":
                member.deliver_events(room, [entry.seq for entry in entries], cached[0])
                return
            member.deliver(room, cached[0], cached[1])
        except Exception:
            self.member_errors += 1
            log.exception("member delivery failed; removing the member", extra={"room": room.name})
            self.leave_all(member)

    def _frame(self, room: Room, entry: Entry, variant) -> bytes:
        """An entry's frame in one encoding, built once and kept with the entry."""
        frame = entry.frames.get(variant)
        if frame is None:
            if variant == "msgpack":
                frame = encode_frame(OP_BINARY, commands.msgpack_message(room.name, entry.data, entry.seq))
            elif variant == "sse":
                frame = b"data: " + room.prefix + entry.data + b',"seq":%d}\n\n' % entry.seq
            else:
                payload = room.prefix + entry.data + b',"seq":%d}' % entry.seq
                frame = encode_frame(OP_TEXT, payload) if variant == "json" else self.deflate.frame(OP_TEXT, payload,
                                                                                                    variant)
            entry.frames[variant] = frame
            size = len(frame)
            entry.size += size
            if room.window is not None and room.window.entries and room.window.entries[-1].seq >= entry.seq:
                room.window.bytes += size
                self.history.window_bytes += size
        return frame

    def _serve_joining(self, room: Room) -> None:
        """Answer every waiting joiner that can be answered now; read for the others."""
        joining = room.joining
        room.joining = []
        waiting = []
        for joiner in joining:
            member = joiner.member
            if not self.is_member(member, room.name):
                continue   # pragma: no cover - _remove takes its joiners out
            if room.flushed >= 0 and self._serve(room, joiner):
                self._attach(member, room)
                if joiner.future is not None and not joiner.future.done():
                    joiner.future.set_result(True)
            else:
                waiting.append(joiner)
        room.joining = waiting + room.joining
        if room.joining:
            self._need_read(room)

    def _need_read(self, room: Room) -> None:
        """Start one history read for the waiting joiners that need one (unless one is in flight)."""
        if room.reading is not None:
            return
        need = [j for j in room.joining if not j.read and not (
            room.flushed >= 0 and j.since is not None and not j.last and j.epoch == room.epoch
            and room.flushed < j.since <= room.top)]
        if not need:
            return
        self._read(room)

    def _read(self, room: Room, since_hint: int | None = None) -> None:
        """ONE history read for the room: from the lowest position any waiting joiner needs
        (`since_hint`: a joiner about to be asked for, not waiting yet)."""
        retention = self._retention(room)
        sinces = [j.since for j in room.joining if j.since is not None and not j.last]
        if since_hint is not None:
            sinces.append(since_hint)
        if any(j.last for j in room.joining) and room.flushed > 0:
            sinces.append(room.flushed - 1)
        if any(j.last for j in room.joining) and room.flushed < 0:
            sinces.append(0)
        if sinces and retention.size:
            # Everything the history keeps (not just from the lowest waiting position): joiners
            # of the same wave arrive with slightly different, older positions, and each one
            # below the window's floor would cost another read. history_size + slack entries:
            # Redis trims by stream node (MAXLEN ~).
            since = min(sinces)
            if room.epoch is not None:
                since = max(0, min(since, room.top - retention.size))
            limit = retention.size + WINDOW_SLACK
        else:
            since, limit = 0, 0                                # the position only
        room.reading = since
        room.held = []
        self.history.reads += 1
        covered = [j for j in room.joining if j.since is None or j.last or j.since >= since]
        if self._sync_history is not None:
            try:
                found = self._sync_history(room.name, since, limit)
            except Exception as exc:   # pragma: no cover - the memory broker does not fail
                self._read_failed(room, covered, exc)
                return
            self._read_done(room, since, covered, found)
            return
        task = self.loop.create_task(self.broker.history(room.name, since, limit))
        task.add_done_callback(lambda t: self._read_finished(room, since, covered, t))

    def _read_finished(self, room: Room, since: int, covered: list, task: asyncio.Task) -> None:
        if task.cancelled():
            self._read_failed(room, covered, BrokerUnavailable("history read cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self._read_failed(room, covered, exc)
            return
        self._read_done(room, since, covered, task.result())

    def _read_failed(self, room: Room, covered: list, exc: BaseException) -> None:
        room.reading = None
        room.held = None
        self.history.read_failures += 1
        log.warning("history read failed", extra={"event": "history_read_failed", "room": room.name,
                                                  "error": repr(exc)[:200]})
        error = exc if isinstance(exc, BrokerUnavailable) else BrokerUnavailable(f"history read failed: {exc!r}")
        for joiner in covered:
            if joiner in room.joining:
                room.joining.remove(joiner)
                if joiner.rejoin:
                    self._attach(joiner.member, room)     # still a member: live goes on, the request fails
                else:
                    self.leave(joiner.member, room.name)  # leaves no trace, like a failed subscribe
                if joiner.future is not None and not joiner.future.done():
                    joiner.future.set_exception(error)
        if room.joining:
            self._need_read(room)

    def _read_done(self, room: Room, since: int, covered: list, found) -> None:
        room.reading = None
        held, room.held = room.held, None
        if self.rooms.get(room.name) is not room:
            return
        epoch, top, pubs = found
        if room.epoch is None:
            room.epoch = epoch
            room.top = max(room.top, top)
        elif epoch != room.epoch:
            self._new_epoch(room, epoch, top)
        elif top > room.top:
            # In flight on the live path: deliver them now from the read (only contiguously,
            # never jumping a hole); the live copies will be dropped as duplicates.
            for pub in pubs:
                if pub.seq == room.top + 1:
                    self.handle_publication(room.name, pub.seq, pub.data, epoch)
        if room.flushed < 0 and not room.frames:
            room.flushed = room.top
        # The replay window: the read's publications, then what was fanned out meanwhile.
        size = self._retention(room).size
        if size and pubs:
            window = Window(epoch, pubs[0].seq - 1, self.loop.time())
            for pub in pubs:
                window.append(Entry(pub.seq, pub.data))
            for entry in held or ():
                window.append(entry)
            old = room.window
            if old is None or old.epoch != epoch or window.floor < old.floor or old.last < window.last:
                self._drop_window(room)
                window.trim(size + WINDOW_SLACK)
                room.window = window
                self.history.window_bytes += window.bytes
                self._schedule_window_sweep()
        elif size and room.window is None and since >= top:
            room.window = Window(epoch, top, self.loop.time())   # nothing after `since`: an empty window
            self._schedule_window_sweep()
        for joiner in covered:
            joiner.read = True
        if self.history.window_bytes > self.max_window_bytes:
            self._serve_joining(room)
            self._drop_window(room)
            return
        if not room.frames:
            self._serve_joining(room)
            self._trim_window(room)
        # else: answered after this pass's flush, once `flushed` includes what the read added

    def _schedule_window_sweep(self) -> None:
        if self._window_sweep is None:
            self._window_sweep = self.loop.call_later(WINDOW_IDLE / 2, self._sweep_windows)

    def _sweep_windows(self) -> None:
        """Drop the replay windows nobody recovered from lately (idle rooms hold no history)."""
        self._window_sweep = None
        expired = self.loop.time() - WINDOW_IDLE
        left = False
        for room in self.rooms.values():
            window = room.window
            if window is not None:
                if window.used < expired and not room.joining:
                    self._drop_window(room)
                else:
                    left = True
        if left:
            self._schedule_window_sweep()

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

    def _deliver_events(self, room: Room, members: dict, seqs: list, blocks: list) -> None:
        targets = tuple(members)
        self.deliveries += len(blocks) * len(targets)
        for member in targets:
            try:
                member.deliver_events(room, seqs, blocks)
            except Exception:
                self.member_errors += 1
                log.exception("member delivery failed; removing the member", extra={"room": room.name})
                self.leave_all(member)

    def broadcast_local(self, name: str, doc: dict) -> int:
        """One server event (e.g. a presence diff) to this process's members of `name`.

        Encoded once per encoding, the same frame for every member (compressed members get
        it uncompressed: RFC 7692 section 6 lets a message go without RSV1), through each
        member's slow-consumer path like any broadcast. Returns the members reached.
        """
        room = self.rooms.get(name)
        if room is None:
            return 0
        reached = 0
        if room.members or room.z_members:
            frame = encode_frame(OP_TEXT, commands.encode_json(doc))
            for members in (room.members, *room.z_members.values()):
                if members:
                    reached += len(members)
                    self._deliver(room, members, [frame], frame)
        if room.mp_members:
            frame = encode_frame(OP_BINARY, commands.encode_msgpack(doc))
            reached += len(room.mp_members)
            self._deliver(room, room.mp_members, [frame], frame)
        return reached

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
