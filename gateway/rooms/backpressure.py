"""Slow consumers: the byte-accounted outbound queue and the policies that bound it.

While a connection's transport accepts writes (not paused: below the write-buffer high-water
mark) broadcast frames go straight to it and nothing here is involved or even allocated.
Once the transport pauses, frames go to this connection's `OutboundQueue`, bounded by
`max_queue_bytes`; when a frame does not fit, the room's `SlowConsumerPolicy` decides:

    disconnect   (default) close the connection with 4000 (GatewayCloseCode.SLOW_CONSUMER)
    drop_newest  keep what is queued, drop the incoming frame (the client keeps the oldest)
    drop_oldest  evict the room's oldest queued frames until the new one fits (keeps the newest)
    latest       conflation: keep only the newest frame per room, at all times while queued
                 (cursors, tickers, dashboards); beyond the byte limit like drop_oldest

Policies are chosen per room by glob pattern (`[[rooms.policy]]` in the TOML config, first
match wins, else the default `slow_consumer_policy`). A rule's own `max_queue_bytes` bounds
that room's share of a connection's queue; the connection-wide `max_queue_bytes` bounds the
total, so one connection never holds more than that whatever its rooms. A drop policy never
evicts another room's frames: when the queue is full of other rooms' frames, the incoming
frame is dropped (and counted).

Every drop is counted per room in the queue (the client gets `{"op":"dropped","room":R,
"count":N}` once it has caught up, besides the `seq` gap) and in process-wide counters:
on each policy object (per rule, for metrics labels) and in `BackpressureStats` (totals).

Pure data structures, tested without sockets. Imports only the standard library and
`config` (the policy names and the typed `[[rooms.policy]]` rules, validated there).
"""
from __future__ import annotations

import fnmatch
from collections import deque

from gateway.config import SLOW_CONSUMER_POLICIES as POLICIES

DISCONNECT, DROP_OLDEST, DROP_NEWEST, LATEST = POLICIES

# Dead entries (evicted / conflated) are removed lazily; past this many, and more than the
# live ones, the queue is compacted so a stalled client cannot grow it with tombstones.
_COMPACT_MIN = 64


class SlowConsumerPolicy:
    """What happens to a room's frames for a connection that cannot keep up; with its counters."""

    __slots__ = ("name", "max_queue_bytes", "pattern", "dropped", "slow_disconnects")

    def __init__(self, name: str = DISCONNECT, max_queue_bytes: int = 1 << 20, pattern: str = "*") -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown slow-consumer policy {name!r}; expected one of {', '.join(POLICIES)}")
        if max_queue_bytes < 1:
            raise ValueError("max_queue_bytes must be positive")
        self.name = name
        self.max_queue_bytes = max_queue_bytes
        self.pattern = pattern
        self.dropped = 0            # frames this rule dropped (all connections)
        self.slow_disconnects = 0   # connections this rule closed with 4000

    def __repr__(self) -> str:
        return f"SlowConsumerPolicy({self.name!r}, max_queue_bytes={self.max_queue_bytes}, pattern={self.pattern!r})"


class PolicyTable:
    """Room name -> policy: the first matching rule (fnmatch glob, case-sensitive) or the default."""

    def __init__(self, default: SlowConsumerPolicy, rules: list[SlowConsumerPolicy] | None = None) -> None:
        self.default = default
        self.rules = list(rules or ())

    def for_room(self, room: str) -> SlowConsumerPolicy:
        for rule in self.rules:
            if fnmatch.fnmatchcase(room, rule.pattern):
                return rule
        return self.default

    def all(self) -> list[SlowConsumerPolicy]:
        return [*self.rules, self.default]

    @classmethod
    def from_config(cls, config) -> "PolicyTable":
        """From Config: `slow_consumer_policy`, `max_queue_bytes` and the `[[rooms.policy]]` rules
        (`config.RoomPolicy`, already validated). A rule's max_queue_bytes is capped by the
        connection-wide max_queue_bytes; a setting a rule leaves out is the global one."""
        limit = config.max_queue_bytes
        default = SlowConsumerPolicy(config.slow_consumer_policy, limit, "*")
        rules = [SlowConsumerPolicy(rule.policy or config.slow_consumer_policy,
                                    min(limit, rule.max_queue_bytes or limit), rule.pattern)
                 for rule in config.room_policies]
        return cls(default, rules)


class BackpressureStats:
    """Process-wide totals (plain ints, read by metrics at scrape time)."""

    __slots__ = ("dropped_oldest", "dropped_newest", "dropped_latest", "slow_disconnects",
                 "queues_opened", "frames_queued")

    def __init__(self) -> None:
        self.dropped_oldest = 0     # frames evicted by drop_oldest (and latest past its byte limit)
        self.dropped_newest = 0     # incoming frames refused by drop_newest / a full queue
        self.dropped_latest = 0     # frames replaced by a newer one of the same room (conflation)
        self.slow_disconnects = 0   # connections closed with 4000
        self.queues_opened = 0      # times a connection fell behind and got a queue
        self.frames_queued = 0

    @property
    def dropped(self) -> int:
        return self.dropped_oldest + self.dropped_newest + self.dropped_latest


class _RoomQueue:
    """One room's part of a connection's queue: its live entries in order, bytes, drops."""

    __slots__ = ("entries", "bytes", "drops")

    def __init__(self) -> None:
        self.entries: deque = deque()
        self.bytes = 0
        self.drops = 0


class OutboundQueue:
    """A connection's byte-accounted backlog, created only when its transport pauses.

    Entries are `[frame, room_queue]` lists shared between the global order (`_order`) and
    their room's deque; evicting marks an entry dead (frame None) instead of searching the
    global deque, and `_compact` sweeps the dead ones out.
    """

    __slots__ = ("limit", "bytes", "_order", "_rooms", "_dead", "stats")

    def __init__(self, limit: int, stats: BackpressureStats | None = None) -> None:
        self.limit = limit
        self.bytes = 0
        self._order: deque = deque()
        self._rooms: dict[str, _RoomQueue] = {}
        self._dead = 0
        self.stats = stats if stats is not None else BackpressureStats()
        self.stats.queues_opened += 1

    def __len__(self) -> int:
        return len(self._order) - self._dead

    def __bool__(self) -> bool:
        return len(self._order) > self._dead

    def push(self, room: str, frame: bytes, policy: SlowConsumerPolicy) -> bool:
        """Queue `frame` of `room` under `policy`; False means: disconnect this connection."""
        size = len(frame)
        rq = self._rooms.get(room)
        if rq is None:
            rq = self._rooms[room] = _RoomQueue()
        name = policy.name
        stats = self.stats
        if name == LATEST and rq.entries:
            n = self._evict(rq, len(rq.entries))
            stats.dropped_latest += n
            policy.dropped += n
        room_limit = policy.max_queue_bytes
        if rq.bytes + size > room_limit or self.bytes + size > self.limit:
            if name == DISCONNECT:
                policy.slow_disconnects += 1
                stats.slow_disconnects += 1
                return False
            if name != DROP_NEWEST:
                # drop_oldest / latest: make room from this room's oldest frames only.
                n = 0
                while rq.entries and (rq.bytes + size > room_limit or self.bytes + size > self.limit):
                    n += self._evict(rq, 1)
                stats.dropped_oldest += n
                policy.dropped += n
            if rq.bytes + size > room_limit or self.bytes + size > self.limit:
                # drop_newest, or nothing of this room left to evict: refuse the new frame.
                rq.drops += 1
                stats.dropped_newest += 1
                policy.dropped += 1
                return True
        entry = [frame, rq]
        rq.entries.append(entry)
        rq.bytes += size
        self.bytes += size
        self._order.append(entry)
        stats.frames_queued += 1
        return True

    def _evict(self, rq: _RoomQueue, count: int) -> int:
        for _ in range(count):
            entry = rq.entries.popleft()
            size = len(entry[0])
            entry[0] = None
            rq.bytes -= size
            self.bytes -= size
            rq.drops += 1
            self._dead += 1
        if self._dead > _COMPACT_MIN and self._dead * 2 > len(self._order):
            self._compact()
        return count

    def _compact(self) -> None:
        self._order = deque(e for e in self._order if e[0] is not None)
        self._dead = 0

    def pop(self, max_bytes: int) -> list[bytes]:
        """The oldest frames, in order, up to about `max_bytes` (at least one if any)."""
        out = []
        total = 0
        order = self._order
        while order and total < max_bytes:
            entry = order.popleft()
            frame = entry[0]
            if frame is None:
                self._dead -= 1
                continue
            rq = entry[1]
            rq.entries.popleft()   # the globally oldest live entry is its room's oldest
            size = len(frame)
            rq.bytes -= size
            self.bytes -= size
            total += size
            out.append(frame)
        return out

    def take_drops(self) -> list[tuple[str, int]]:
        """(room, dropped count) since the last call; forgets rooms with nothing left."""
        out = []
        for room, rq in list(self._rooms.items()):
            if rq.drops:
                out.append((room, rq.drops))
                rq.drops = 0
            if not rq.entries:
                del self._rooms[room]
        return out

    def clear(self) -> None:
        self._order.clear()
        self._rooms.clear()
        self.bytes = 0
        self._dead = 0
