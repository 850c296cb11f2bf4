"""Where webhook events are decided and queued: the interface, and its in-process form.

Two "dimensions", each a set of subjects held by processes:
    users   a user (token `sub`) is held by every process with one of their connections;
            first holder in the cluster -> `user_online`, last one gone -> `user_offline`
    rooms   a room is held by every process with a local member (the hub's subscription);
            first -> `room_occupied`, last -> `room_vacated`
A process reports only its own 0 -> 1 and 1 -> 0 transitions (one op per process and
subject, not per connection), so the backend's work is O(processes x subjects).

A removal that makes the subject unheld is recorded as *pending* (with a token); the
process confirms it after the debounce, and the backend appends the event only if nobody
took the subject back meanwhile: a reconnect within the debounce says nothing at all.

Events go to an outbox (a Redis Stream with a consumer group, redis_events.py; here a deque)
from which api/webhooks.py delivers them at least once. Entries are (entry id, fields) with
fields t (type), k (user|room), s (subject), ts (ms), n (nonce) and, for client_published,
u (user) and d (JSON data); the event id is "<entry id>-<nonce>": unique, and the same on
every redelivery.

Imports the standard library only (redis_events.py is the Redis form).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from typing import Protocol

DIMENSIONS = {"user": ("user_online", "user_offline"), "room": ("room_occupied", "room_vacated")}


class EventsUnavailable(Exception):
    """The outbox / tracking store cannot answer now (Redis down): retried later."""


class EventsBackend(Protocol):
    node: str

    async def start(self, ttl: float, debounce: float) -> None: ...

    async def close(self) -> None: ...

    async def update(self, kind: str, ops: list, cleanup: bool = False) -> list:
        """Apply [(op "a"|"r", subject)] for this process atomically; return the pending
        [(subject, token)] to confirm after the debounce. `cleanup` also removes dead
        processes' entries (appending their events). Raises EventsUnavailable."""

    async def confirm(self, kind: str, pending: list) -> None: ...

    async def append(self, fields: dict) -> None:
        """Append one event (client_published) to the outbox."""

    async def read(self, count: int, block: float) -> list:
        """New outbox entries for this process: [(entry id, fields)] (waits up to `block` s)."""

    async def claim(self, min_idle: float, count: int) -> list:
        """Entries another (dead) consumer read but never acknowledged, idle >= min_idle s."""

    async def touch(self, ids: list) -> None:
        """Keep entries this process is still retrying from being claimed by others."""

    async def ack(self, ids: list) -> None:
        """Delivered: remove from the outbox."""

    async def pending_count(self) -> int: ...


class MemoryEvents:
    """One process: the same semantics with dicts and a deque (no TTL: nobody else can die)."""

    def __init__(self, node: str = "") -> None:
        self.node = node or f"mem-{os.getpid()}"
        self._held: dict = {kind: {} for kind in DIMENSIONS}       # kind -> {subject: count}
        self._pending: dict = {kind: {} for kind in DIMENSIONS}    # kind -> {subject: token}
        self._outbox: collections.OrderedDict = collections.OrderedDict()   # id -> fields (not yet read)
        self._inflight: dict = {}                                   # id -> fields (read, not acked)
        self._seq = itertools.count(1)
        self._nonce = os.urandom(4).hex()
        self._ready = asyncio.Event()

    async def start(self, ttl: float, debounce: float) -> None:
        pass

    async def close(self) -> None:
        self._ready.set()

    def _emit(self, fields: dict) -> None:
        ms = int(time.time() * 1000)
        fields.setdefault("ts", str(ms))
        fields["n"] = self._nonce
        self._outbox[f"{ms}-{next(self._seq)}"] = fields
        self._ready.set()

    async def update(self, kind: str, ops: list, cleanup: bool = False) -> list:
        on, _ = DIMENSIONS[kind]
        held, pending = self._held[kind], self._pending[kind]
        out = []
        for op, subject in ops:
            if op == "a":
                count = held.get(subject, 0) + 1
                held[subject] = count
                if count == 1 and pending.pop(subject, None) is None:
                    self._emit({"t": on, "k": kind, "s": subject})
            elif subject in held:
                count = held[subject] - 1
                if count > 0:
                    held[subject] = count
                else:
                    del held[subject]
                    token = f"{time.monotonic_ns()}:{self.node}"
                    pending[subject] = token
                    out.append((subject, token))
        return out

    async def confirm(self, kind: str, pending: list) -> None:
        _, off = DIMENSIONS[kind]
        waiting = self._pending[kind]
        for subject, token in pending:
            if waiting.get(subject) == token:
                del waiting[subject]
                self._emit({"t": off, "k": kind, "s": subject})

    async def append(self, fields: dict) -> None:
        self._emit(dict(fields))

    async def read(self, count: int, block: float) -> list:
        if not self._outbox:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), block)
            except asyncio.TimeoutError:
                return []
        out = []
        while self._outbox and len(out) < count:
            entry_id, fields = self._outbox.popitem(last=False)
            self._inflight[entry_id] = fields
            out.append((entry_id, fields))
        return out

    async def claim(self, min_idle: float, count: int) -> list:
        return []      # one process: nobody else to take over from

    async def touch(self, ids: list) -> None:
        pass

    async def ack(self, ids: list) -> None:
        for entry_id in ids:
            self._inflight.pop(entry_id, None)

    async def pending_count(self) -> int:
        return len(self._outbox) + len(self._inflight)

