"""Presence, control channel, per-user caps and revocations inside one process (memory broker).

The same semantics as the Redis backend (redis_presence.py), kept in dicts: per room the
connections (conn key -> user), the per-user connection counts, the users' info and the
pending leaves (user -> token). One process means no crashed peers, so nothing expires on a
timer here; the TTL arguments exist to keep the interface one. Events and control messages
are delivered with `call_soon`, never inline, exactly like messages arriving from Redis.

Imports only `gateway.broker.base` and the standard library.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time

from gateway.broker.base import PresenceHandler


class _Room:
    __slots__ = ("conns", "counts", "info", "pending")

    def __init__(self) -> None:
        self.conns: dict[str, str] = {}     # conn key -> user
        self.counts: dict[str, int] = {}    # user -> connections
        self.info: dict[str, str] = {}      # user -> info JSON
        self.pending: dict[str, str] = {}   # user -> token of a leave not yet published


class MemoryPresence:
    connected = True

    def __init__(self) -> None:
        self.node = f"{os.getpid():x}{os.urandom(2).hex()}"
        self._handler: PresenceHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rooms: dict[str, _Room] = {}
        self._watched: set[str] = set()
        self._tokens = itertools.count(1)
        self._slots: dict[str, set] = {}            # user -> conn keys (per-user cap)
        self._revoked: dict[str, tuple] = {}
        self._node_info: dict = {}

    async def start(self, handler: PresenceHandler, ttl: float) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._watched.clear()

    # -- presence -------------------------------------------------------------------------

    async def update(self, room: str, ops: list, events: bool, cleanup: bool = False) -> list:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        joins, pending = [], []
        for op, key, user, info, _ in ops:
            if op == "a":
                if key in state.conns:
                    continue
                state.conns[key] = user
                n = state.counts.get(user, 0) + 1
                state.counts[user] = n
                if n == 1:
                    if info:
                        state.info[user] = info
                    if state.pending.pop(user, None) is None:
                        joins.append((user, info))
            else:
                user = state.conns.pop(key, None)
                if user is None:
                    continue
                n = state.counts[user] - 1
                if n > 0:
                    state.counts[user] = n
                    continue
                del state.counts[user]
                state.info.pop(user, None)
                if events:
                    token = f"{next(self._tokens)}:{self.node}"
                    state.pending[user] = token
                    pending.append((user, token))
        if not state.conns and not state.pending:
            del self._rooms[room]
        if events and joins:
            self._emit(room, joins, [])
        return pending

    async def update_many(self, batch: list) -> list:
        return [await self.update(room, ops, events, cleanup) for room, ops, events, cleanup in batch]

    async def confirm_leaves(self, room: str, pending: list) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        leaves = []
        for user, token in pending:
            if state.pending.get(user) == token:
                del state.pending[user]
                leaves.append(user)
        if not state.conns and not state.pending:
            del self._rooms[room]
        if leaves:
            self._emit(room, [], leaves)

    def _emit(self, room: str, joins: list, leaves: list) -> None:
        if room in self._watched:
            self._loop.call_soon(self._handler.handle_presence_events, room, joins, leaves)

    async def watch(self, room: str) -> None:
        self._watched.add(room)

    async def unwatch(self, room: str) -> None:
        self._watched.discard(room)

    async def members(self, room: str, after: str, limit: int, clients: bool = False) -> tuple[list, str | None]:
        state = self._rooms.get(room)
        if state is None:
            return [], None
        users = sorted(u for u in state.counts if u > after)
        page = users[:limit]
        out = [(u, state.counts[u], state.info.get(u, "")) for u in page]
        if clients:
            out = [row + (sorted(k for k, owner in state.conns.items() if owner == row[0]),) for row in out]
        return out, (page[-1] if len(users) > limit else None)

    async def counts(self, room: str) -> tuple[int, int]:
        state = self._rooms.get(room)
        return (len(state.conns), len(state.counts)) if state is not None else (0, 0)

    # -- control channel, processes -------------------------------------------------------

    async def send_control(self, message: dict) -> None:
        self._loop.call_soon(self._handler.handle_control, message)

    async def register_node(self, info: dict) -> None:
        self._node_info = dict(info, node=self.node)

    async def nodes(self) -> list[dict]:
        return [self._node_info] if self._node_info else []

    # -- per-user cap, revocations --------------------------------------------------------

    async def acquire_user_slot(self, user: str, conn_key: str, limit: int) -> bool:
        keys = self._slots.setdefault(user, set())
        if conn_key not in keys and len(keys) >= limit:
            return False
        keys.add(conn_key)
        return True

    async def acquire_user_slots(self, requests: list) -> list:
        return [await self.acquire_user_slot(*request) for request in requests]

    async def release_user_slot(self, user: str, conn_key: str) -> None:
        keys = self._slots.get(user)
        if keys is not None:
            keys.discard(conn_key)
            if not keys:
                del self._slots[user]

    async def refresh_user_slots(self, slots: list) -> None:
        return None

    async def store_revocation(self, key: str, value: str, until: float) -> None:
        self._revoked[key] = (value, until)

    async def load_revocations(self) -> dict:
        now = time.time()
        self._revoked = {k: v for k, v in self._revoked.items() if v[1] > now}
        return dict(self._revoked)
