"""Presence and join/leave events of this process: rules, batching, heartbeats, debounce, diffs.

Which rooms. Opt-in per room pattern, in the config file's per-room rules (config.RoomPolicy;
the first rule whose pattern matches a room decides all its settings):

    [[rooms.policy]]
    pattern = "chat.*"      # fnmatch glob
    presence = true         # who is here: {"op":"presence"} / {"op":"presence_stats"}
    join_leave = true       # {"op":"presence_diff"} events to the room's members

A room whose rule enables neither (or that no rule matches) is not tracked at all: its joins and leaves cost one dict lookup
(cached per room name), and a gateway without rules never creates a tracker (`None`).

What is tracked. A connection is `<node>.<connection id>`; its user is the token's `sub`, or,
anonymous, the connection itself. The backend (broker.base.PresenceBackend: memory or Redis)
keeps per room the connections and per-user counts and decides first-in/last-out atomically
across processes.

Batching. Joins and leaves of one event-loop pass are collected per room and sent on the
next pass as one script per room, all rooms in ONE backend call (one Redis pipeline: one
round trip per pass however many clients joined); events coming back
(from any process) are merged per room per pass into ONE `presence_diff` frame, encoded
once and written to every local member: a mass reconnect costs O(rooms) frames per pass,
not O(users^2).

Debounce. The last connection of a user leaving records a pending leave (with a token) in
the backend; `join_leave_debounce` seconds later this process asks the backend to publish
it, which it does only if the user did not come back meanwhile (the token still matches).
A reconnect within the window therefore emits neither the leave nor the join.

Heartbeat. Every `presence_ttl / 3` seconds the process re-adds its connections (refreshing
their expiry: a SIGKILLed process's connections expire within `presence_ttl` and the next
heartbeat of any process removes them and publishes their leaves), announces itself and
runs the other heartbeat hooks (per-user connection slots).

Imports broker.base, commands and the standard library; never transports or Redis.
"""
from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import time

import orjson

from gateway.broker.base import ANONYMOUS_PREFIX, BrokerUnavailable

log = logging.getLogger("gateway.rooms.presence")

MAX_INFO_BYTES = 1024        # a token claim shown to every member: keep it small
HEARTBEAT_ROOMS_PER_CALL = 200   # rooms refreshed per backend call (one Redis pipeline)


class PresenceRule:
    __slots__ = ("pattern", "presence", "join_leave")

    def __init__(self, pattern: str, presence: bool = False, join_leave: bool = False) -> None:
        self.pattern = pattern
        self.presence = presence
        self.join_leave = join_leave

    @property
    def tracked(self) -> bool:
        return self.presence or self.join_leave


def rules_from_config(config) -> list[PresenceRule]:
    """The `[[rooms.policy]]` rules (config.RoomPolicy), in order: the first rule matching a
    room decides, for presence as for every other per-room setting."""
    return [PresenceRule(r.pattern, bool(r.presence), bool(r.join_leave))
            for r in getattr(config, "room_policies", ())]


class PresenceStats:
    """Counters (metrics source `presence`)."""

    def __init__(self) -> None:
        self.updates = 0             # backend calls (one per room per pass)
        self.update_errors = 0
        self.diffs_sent = 0          # presence_diff frames built (one per room per pass)
        self.joins_received = 0
        self.leaves_received = 0
        self.queries = 0
        self.heartbeats = 0
        self.pending_leaves = 0      # leaves waiting out the debounce (decided, not yet checked)
        self.leave_checks = 0        # pending leaves checked after the debounce (published or cancelled)


class PresenceTracker:
    """The backend's handler and the rooms' presence logic for one process (module docstring)."""

    def __init__(self, backend, hub, rules: list[PresenceRule], *, ttl: float = 30.0, debounce: float = 3.0,
                 info_claim: str = "", page_size: int = 1000, loop=None) -> None:
        self.backend = backend
        self.hub = hub
        self.rules = rules
        self.ttl = ttl
        self.debounce = debounce
        self.info_claim = info_claim
        self.page_size = page_size
        self.loop = loop
        self.started = time.time()
        self.stats = PresenceStats()
        self._rule_cache: dict[str, PresenceRule | None] = {}
        # room -> {conn key: (user, info)} for this process's tracked connections
        self.local: dict[str, dict] = {}
        self.by_session: dict = {}                      # session -> {room: conn key}
        self._ops: dict[str, list] = {}                 # this pass's ops per room
        self._ops_scheduled = False
        self._diffs: dict[str, dict] = {}               # this pass's events per room: user -> (kind, info)
        self._diffs_scheduled = False
        self._pending: collections.deque = collections.deque()   # (due, room, [(user, token)])
        self._timer = None
        self._heartbeat_task = None
        self._tasks: set = set()
        self.control_handlers: list = []                # (message dict) -> None (api/control.py)
        self.state_handlers: list = []                  # (connected: bool) -> None
        self.heartbeat_hooks: list = []                 # async () -> None, every heartbeat
        self.node_info = None                           # () -> dict for the process registry

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.backend.start(self, self.ttl)
        try:
            await self.backend.register_node(self.node_info() if self.node_info is not None else {})
        except BrokerUnavailable:
            pass   # the heartbeat retries
        self._heartbeat_task = self.loop.create_task(self._heartbeat_loop())

    async def close(self, timeout: float = 2.0) -> None:
        """Stop, after telling the backend who left: a drained process's members go at once.

        Leaves already pending stay pending in the backend: the users are probably
        reconnecting to another process right now, and if they are not, any process's next
        cleanup publishes those leaves (stale pending leaves) -- no storm on a rolling restart.
        """
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.wait([self._heartbeat_task])
        if self._timer is not None:
            self._timer.cancel()
        # Connections still tracked (closing without their sessions) leave too.
        for room, conns in list(self.local.items()):
            for key in conns:
                self._queue(room, ("r", key, "", "", ""))
        self.local.clear()
        self.by_session.clear()
        batches, self._ops = self._ops, {}
        if batches:
            self._spawn(self._update_many([(room, ops, False) for room, ops in batches.items()]))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        await self.backend.close()

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def tracked_rooms(self) -> int:
        return len(self.local)

    @property
    def tracked_connections(self) -> int:
        return sum(map(len, self.local.values()))

    # -- rules ------------------------------------------------------------------------------

    def rule_for(self, room: str) -> PresenceRule | None:
        try:
            return self._rule_cache[room]
        except KeyError:
            pass
        found = None
        for rule in self.rules:
            if fnmatch.fnmatchcase(room, rule.pattern):
                found = rule if rule.tracked else None
                break
        if len(self._rule_cache) > 10000:
            self._rule_cache.clear()
        self._rule_cache[room] = found
        return found

    # -- identity ---------------------------------------------------------------------------

    def conn_key(self, conn) -> str:
        return f"{self.backend.node}.{conn.id}"

    def identity(self, conn) -> tuple[str, str, str]:
        """(conn key, user, info JSON) of a connection."""
        key = self.conn_key(conn)
        principal = conn.principal
        user = getattr(principal, "user", "") or ""
        info = ""
        if self.info_claim and principal is not None:
            value = principal.claims.get(self.info_claim)
            if value is not None:
                try:
                    info = orjson.dumps(value).decode()
                except TypeError:
                    info = ""
                if len(info) > MAX_INFO_BYTES:
                    info = ""
        return key, (user or ANONYMOUS_PREFIX + key), info

    # -- membership (called by the /ws session) ---------------------------------------------

    def joined(self, session, room: str) -> None:
        rule = self.rule_for(room)
        if rule is None:
            return
        key, user, info = self.identity(session.conn)
        rooms = self.by_session.get(session)
        if rooms is None:
            rooms = self.by_session[session] = {}
        if room in rooms:
            return
        rooms[room] = key
        conns = self.local.get(room)
        if conns is None:
            conns = self.local[room] = {}
            if rule.join_leave:
                self._spawn(self.backend.watch(room))
        conns[key] = (user, info)
        self._queue(room, ("a", key, user, info, ""))

    def left(self, session, room: str) -> None:
        rooms = self.by_session.get(session)
        if rooms is None:
            return
        key = rooms.pop(room, None)
        if key is None:
            return
        if not rooms:
            del self.by_session[session]
        self._forget(room, key)

    def left_all(self, session) -> None:
        rooms = self.by_session.pop(session, None)
        if rooms:
            for room, key in rooms.items():
                self._forget(room, key)

    def _forget(self, room: str, key: str) -> None:
        conns = self.local.get(room)
        if conns is not None:
            conns.pop(key, None)
            if not conns:
                del self.local[room]
                rule = self.rule_for(room)
                if rule is not None and rule.join_leave:
                    self._spawn(self.backend.unwatch(room))
        self._queue(room, ("r", key, "", "", ""))

    def _queue(self, room: str, op: tuple) -> None:
        ops = self._ops.get(room)
        if ops is None:
            self._ops[room] = [op]
        else:
            ops.append(op)
        if not self._ops_scheduled:
            self._ops_scheduled = True
            self.loop.call_soon(self._flush_ops)

    def _flush_ops(self) -> None:
        """Once per pass: everything that pass changed, one backend call (one pipeline) for all rooms."""
        self._ops_scheduled = False
        batches, self._ops = self._ops, {}
        if batches:
            self._spawn(self._update_many([(room, ops, False) for room, ops in batches.items()]))

    async def _update_many(self, items: list) -> None:
        """[(room, ops, cleanup)]: apply, schedule the debounce of the leaves they made pending."""
        batch = []
        for room, ops, cleanup in items:
            rule = self.rule_for(room)
            batch.append((room, ops, rule is not None and rule.join_leave, cleanup))
        self.stats.updates += len(batch)
        try:
            results = await self.backend.update_many(batch)
        except BrokerUnavailable as exc:
            results = [exc] * len(batch)
        due = self.loop.time() + self.debounce
        for (room, *_), pending in zip(batch, results):
            if isinstance(pending, BaseException):
                # The next heartbeat re-adds what is still here; what left expires with its TTL.
                self.stats.update_errors += 1
                log.warning("presence update failed", extra={"event": "presence_error", "room": room,
                                                             "error": str(pending)[:200]})
                continue
            if pending:
                self._pending.append((due, room, pending))
                self.stats.pending_leaves += len(pending)
        if self._pending and self._timer is None:
            self._timer = self.loop.call_later(max(0.0, self._pending[0][0] - self.loop.time()), self._confirm_due)

    def _confirm_due(self) -> None:
        self._timer = None
        now = self.loop.time()
        due: dict[str, list] = {}
        while self._pending and self._pending[0][0] <= now:
            _, room, pending = self._pending.popleft()
            due.setdefault(room, []).extend(pending)
        for room, pending in due.items():
            self._spawn(self._confirm(room, pending))
        if self._pending:
            self._timer = self.loop.call_later(max(0.0, self._pending[0][0] - now), self._confirm_due)

    async def _confirm(self, room: str, pending: list) -> None:
        try:
            await self.backend.confirm_leaves(room, pending)
        except BrokerUnavailable as exc:
            # Stale pending leaves are published by the next cleanup of any process.
            log.warning("presence leave confirmation failed", extra={"event": "presence_error", "room": room,
                                                                     "error": str(exc)[:200]})
        finally:
            self.stats.pending_leaves -= len(pending)
            self.stats.leave_checks += len(pending)

    # -- heartbeat --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("presence heartbeat failed")

    async def heartbeat(self) -> None:
        """Refresh this process's entries, remove dead processes' ones, announce this process."""
        self.stats.heartbeats += 1
        items = [(room, [("a", key, user, info, "") for key, (user, info) in conns.items()], True)
                 for room, conns in list(self.local.items())]
        for i in range(0, len(items), HEARTBEAT_ROOMS_PER_CALL):
            await self._update_many(items[i:i + HEARTBEAT_ROOMS_PER_CALL])
        try:
            await self.backend.register_node(self.node_info() if self.node_info is not None else {})
        except BrokerUnavailable:
            pass
        for hook in self.heartbeat_hooks:
            try:
                await hook()
            except BrokerUnavailable:
                pass

    # -- events from the backend (PresenceHandler) -------------------------------------------

    def handle_presence_events(self, room: str, joins: list, leaves: list) -> None:
        if room not in self.local:
            return   # no local member to tell
        diff = self._diffs.get(room)
        if diff is None:
            diff = self._diffs[room] = {}
        # Per user the last event of the pass wins: a diff names each user at most once.
        for user in leaves:
            if isinstance(user, str):
                diff[user] = None
                self.stats.leaves_received += 1
        for item in joins:
            if len(item) == 2 and isinstance(item[0], str):
                diff[item[0]] = item[1] or ""
                self.stats.joins_received += 1
        if not self._diffs_scheduled:
            self._diffs_scheduled = True
            self.loop.call_soon(self._flush_diffs)

    def _flush_diffs(self) -> None:
        """Once per pass: one frame per room, encoded once, for every local member."""
        self._diffs_scheduled = False
        diffs, self._diffs = self._diffs, {}
        for room, diff in diffs.items():
            if not diff:
                continue
            joins, leaves = [], []
            for user, info in diff.items():
                if info is None:
                    leaves.append(_who(user))
                else:
                    entry = _who(user)
                    if info:
                        try:
                            entry["info"] = orjson.loads(info)
                        except orjson.JSONDecodeError:
                            pass
                    joins.append(entry)
            self.stats.diffs_sent += 1
            self.hub.broadcast_local(room, {"op": "presence_diff", "room": room, "joins": joins, "leaves": leaves})

    def handle_control(self, message: dict) -> None:
        for handler in self.control_handlers:
            try:
                handler(message)
            except Exception:
                log.exception("control handler failed", extra={"command": str(message.get("cmd"))[:40]})

    def handle_control_state(self, connected: bool) -> None:
        for handler in self.state_handlers:
            try:
                handler(connected)
            except Exception:
                log.exception("control state handler failed")

    # -- queries ----------------------------------------------------------------------------

    async def members(self, room: str, after: str = "", limit: int | None = None,
                      clients: bool = False) -> tuple[list, str | None]:
        """([{"user", "connections", "info"?, "clients"?}...], next cursor) for the /ws op and the API."""
        self.stats.queries += 1
        limit = min(limit or self.page_size, self.page_size)
        rows, cursor = await self.backend.members(room, after, limit, clients)
        out = []
        for user, count, info, *ids in rows:
            entry = _who(user)
            entry["connections"] = count
            if ids:
                entry["clients"] = ids[0]
            if info:
                try:
                    entry["info"] = orjson.loads(info)
                except orjson.JSONDecodeError:
                    pass
            out.append(entry)
        return out, cursor

    async def counts(self, room: str) -> dict:
        self.stats.queries += 1
        conns, users = await self.backend.counts(room)
        return {"connections": conns, "users": users}


def _who(user: str) -> dict:
    """A user key as the wire shows it: {"user": sub} or, anonymous, {"user": null, "client": id}."""
    if user.startswith(ANONYMOUS_PREFIX):
        return {"user": None, "client": user[len(ANONYMOUS_PREFIX):]}
    return {"user": user}
