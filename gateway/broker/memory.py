"""The in-memory broker: one process, no Redis. The default.

Delivery goes through `loop.call_soon`, never inline, so a publisher's own message comes
back exactly as it would through Redis (after the publish call returns).

Per room it keeps a `_RoomLog`: the epoch (minted when the log is created: a process start
restarts every room's numbering), the top seq, a ring of the last `Retention.size`
publications and the idempotency keys of the last `Retention.ttl` seconds. Lifetimes follow
the room's retention, as the Redis keys do:
  - the ring and the keys are dropped `ttl` seconds after the room's last publication;
  - the position (epoch, top) stays while this process subscribes the room, else until
    `meta_ttl` after the last publication (then numbering restarts with a new epoch).
Memory is capped: every log counts its payload bytes plus a fixed overhead per publication,
per key and per room (`history_bytes`); past `max_history_bytes` the logs of the rooms
published to longest ago are evicted first (`history_evictions`, `evicted_publications`):
a subscribed room keeps its position, an unsubscribed one is forgotten (a client holding
its old epoch then gets `recovered: false`, never a wrong answer).

Expiry is lazy and amortised: logs sit in one insertion-ordered dict per TTL value (a
publication moves its room to the end), so the expired ones are always at the front; a
scan runs at most every `_EXPIRE_EVERY` seconds, and a read checks its own room.
"""
from __future__ import annotations

import asyncio
import collections
import secrets
import time

from gateway.broker.base import Broker, BrokerHandler, History, Publication, Retention

# Estimated bytes besides the payload: a Publication tuple, an int, the bytes header, the
# deque slot (per publication); an idempotency entry; a room's log object and dict slots.
PUBLICATION_OVERHEAD = 120
KEY_OVERHEAD = 130
ROOM_OVERHEAD = 400
DEFAULT_MAX_HISTORY_BYTES = 64 << 20
_EXPIRE_EVERY = 0.5


def new_epoch() -> str:
    """A short random id for a numbering that (re)starts: 8 URL-safe characters (48 bits)."""
    return secrets.token_urlsafe(6)


class _RoomLog:
    __slots__ = ("room", "epoch", "top", "ring", "keys", "bytes", "retention", "size", "ttl", "last_publish",
                 "subscribed", "queue")

    def __init__(self, room: str, retention: Retention, now: float) -> None:
        self.room = room
        self.epoch = new_epoch()
        self.top = 0
        self.ring: collections.deque = collections.deque()   # (seq, data), oldest first
        self.keys: dict = {}          # idempotency key -> (seq, expires), oldest first
        self.bytes = ROOM_OVERHEAD
        self.retention = retention
        self.size = retention.size
        self.ttl = retention.ttl
        self.last_publish = now
        self.subscribed = False
        self.queue: dict | None = None    # its TTL's expiry queue while it is in it (see MemoryBroker._touch)


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self, retention=None, *, max_history_bytes: int = DEFAULT_MAX_HISTORY_BYTES,
                 clock=time.monotonic) -> None:
        super().__init__(retention)
        if max_history_bytes < 0:
            raise ValueError("max_history_bytes must be >= 0")
        self.max_history_bytes = max_history_bytes
        self._clock = clock
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logs: dict[str, _RoomLog] = {}
        # ttl -> {room: None}, ordered by last publication (oldest first): expiry order.
        self._by_ttl: dict[int, dict] = {}
        # ttl -> {room: None}: unsubscribed rooms whose publications expired, kept for their position.
        self._meta: dict[int, dict] = {}
        self._lru: dict[str, None] = {}    # every log, least recently published first: eviction order
        self._next_expiry = 0.0
        self.history_bytes = 0
        # counters
        self.publishes = 0
        self.duplicates = 0               # idempotent retries answered with the original seq
        self.history_evictions = 0        # room logs evicted by max_history_bytes
        self.evicted_publications = 0     # ... and the publications they held
        self.expired_rooms = 0            # room logs dropped by their TTL
        self.gauges = ("history_bytes", "rooms", "history_rooms")

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        handler.handle_broker_state(True)

    # -- room logs ----------------------------------------------------------------------

    def _log(self, room: str, now: float) -> _RoomLog:
        log = self._logs.get(room)
        if log is not None and not log.subscribed and now - log.last_publish > log.retention.meta_ttl:
            self._drop(log)
            self.expired_rooms += 1
            log = None
        if log is None:
            log = self._logs[room] = _RoomLog(room, self.retention(room), now)
            self.history_bytes += ROOM_OVERHEAD
            log.queue = self._by_ttl.setdefault(log.retention.ttl, {})
            log.queue[room] = None
            self._lru[room] = None
        elif now - log.last_publish > log.ttl and (log.ring or log.keys):
            self._clear(log)
        return log

    def _clear(self, log: _RoomLog) -> int:
        """Drop a log's publications and keys (its position stays)."""
        n = len(log.ring)
        freed = log.bytes - ROOM_OVERHEAD
        log.ring.clear()
        log.keys.clear()
        log.bytes = ROOM_OVERHEAD
        self.history_bytes -= freed
        return n

    def _drop(self, log: _RoomLog) -> None:
        """Forget a room entirely: the next publication starts a new epoch."""
        self.history_bytes -= log.bytes
        del self._logs[log.room]
        ttl = log.retention.ttl
        self._by_ttl.get(ttl, {}).pop(log.room, None)
        self._meta.get(ttl, {}).pop(log.room, None)
        self._lru.pop(log.room, None)
        log.queue = None

    def _expire(self, now: float) -> None:
        """Drop what outlived its TTL: the fronts of the queues (oldest publication first)."""
        self._next_expiry = now + _EXPIRE_EVERY
        for ttl, rooms in self._by_ttl.items():
            meta = self._meta.setdefault(ttl, {})
            while rooms:
                log = self._logs[next(iter(rooms))]
                if now - log.last_publish <= ttl:
                    break
                self._clear(log)
                del rooms[log.room]
                log.queue = None
                if log.subscribed:
                    # The position stays while this process holds the room: nothing to evict.
                    self._lru.pop(log.room, None)
                else:
                    meta[log.room] = None   # position only, until meta_ttl
        for ttl, meta in self._meta.items():
            while meta:
                log = self._logs[next(iter(meta))]
                if now - log.last_publish <= log.retention.meta_ttl:
                    break
                self._drop(log)
                self.expired_rooms += 1

    def _evict(self) -> None:
        """Over max_history_bytes: evict the logs of the rooms published to longest ago."""
        lru = self._lru
        while self.history_bytes > self.max_history_bytes and lru:
            log = self._logs[next(iter(lru))]
            self.history_evictions += 1
            self.evicted_publications += self._clear(log)
            if log.subscribed:
                del lru[log.room]                 # nothing left to evict there; its position stays
                self._by_ttl[log.retention.ttl].pop(log.room, None)
                log.queue = None
            else:
                self._drop(log)

    def _touch(self, log: _RoomLog, now: float) -> None:
        log.last_publish = now
        room = log.room
        lru = self._lru
        rooms = log.queue
        if rooms is not None and next(reversed(rooms)) == room and next(reversed(lru)) == room:
            return   # the hot case: the last room published to again; already last in both orders
        ttl = log.ttl
        rooms = log.queue = self._by_ttl.setdefault(ttl, {})
        rooms.pop(room, None)
        rooms[room] = None
        if self._meta:
            self._meta.get(ttl, {}).pop(room, None)
        lru.pop(room, None)
        lru[room] = None

    # -- the Broker interface -----------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        self._log(room, self._clock()).subscribed = True

    async def unsubscribe(self, room: str) -> None:
        log = self._logs.get(room)
        if log is not None and log.subscribed:
            log.subscribed = False
            # Unheld now: its position lives on until meta_ttl like any other room's.
            ttl = log.retention.ttl
            if room not in self._by_ttl.get(ttl, ()):
                self._meta.setdefault(ttl, {})[room] = None
                self._lru[room] = None

    async def publish(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        return self.publish_nowait(room, data, idempotency_key)

    def publish_nowait(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        """Synchronous publish for the hot path (no coroutine needed in memory)."""
        now = self._clock()
        if now >= self._next_expiry:
            self._expire(now)
        log = self._logs.get(room)
        if log is None or now - log.last_publish > log.ttl:
            log = self._log(room, now)
        keys = log.keys
        if idempotency_key is not None:
            while keys:   # same TTL for every key of a room: the oldest expire first
                first = next(iter(keys))
                if keys[first][1] > now:
                    break
                del keys[first]
                log.bytes -= KEY_OVERHEAD + len(first)
                self.history_bytes -= KEY_OVERHEAD + len(first)
            found = keys.get(idempotency_key)
            if found is not None:
                self.duplicates += 1
                return found[0], log.epoch
        self.publishes += 1
        seq = log.top = log.top + 1
        size = log.size
        if size:
            ring = log.ring
            ring.append((seq, data))
            added = PUBLICATION_OVERHEAD + len(data)
            if len(ring) > size:
                added -= PUBLICATION_OVERHEAD + len(ring.popleft()[1])
            log.bytes += added
            self.history_bytes += added
        if idempotency_key is not None:
            keys[idempotency_key] = (seq, now + log.ttl)
            log.bytes += KEY_OVERHEAD + len(idempotency_key)
            self.history_bytes += KEY_OVERHEAD + len(idempotency_key)
        self._touch(log, now)
        if self.history_bytes > self.max_history_bytes:
            self._evict()
        if log.subscribed:
            self._loop.call_soon(self._handler.handle_publication, room, seq, data, log.epoch)
        return seq, log.epoch

    async def history(self, room: str, since: int, limit: int) -> History:
        return self.history_nowait(room, since, limit)

    def history_nowait(self, room: str, since: int, limit: int) -> History:
        log = self._log(room, self._clock())
        if limit <= 0 or since >= log.top or not log.ring:
            return History(log.epoch, log.top, [])
        ring = log.ring
        start = max(0, since + 1 - ring[0][0])     # ring seqs are consecutive
        end = min(len(ring), start + limit)
        new = tuple.__new__
        return History(log.epoch, log.top, [new(Publication, ring[i]) for i in range(start, end)])

    async def close(self) -> None:
        for log in self._logs.values():
            log.subscribed = False

    @property
    def rooms(self) -> int:
        return sum(1 for log in self._logs.values() if log.subscribed)

    @property
    def history_rooms(self) -> int:
        return len(self._logs)

    def stats(self) -> dict:
        return {"publishes": self.publishes, "duplicates": self.duplicates, "rooms": self.rooms,
                "history_rooms": self.history_rooms, "history_bytes": self.history_bytes,
                "history_evictions": self.history_evictions, "evicted_publications": self.evicted_publications,
                "expired_rooms": self.expired_rooms}
