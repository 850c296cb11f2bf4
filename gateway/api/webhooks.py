"""Webhooks: what happened on the gateway, told to the backend at least once, signed.

Events (`webhook_events`):
    room_occupied / room_vacated   a room's first member anywhere in the cluster / its last one gone
    user_online / user_offline     a user's (token `sub`) first connection in the cluster / last one
    client_published               a client's publication to a room matching `webhook_publish_rooms`
Offline and vacated are debounced (`webhook_debounce`): back within it, nothing is said.

Deciding. This process reports its own transitions only: a user's first/last connection
HERE, a room's first/last local member (the hub's subscribe/unsubscribe), batched per
event-loop pass, to the events backend (broker/events.py), which decides cluster-wide and
appends the event to the outbox atomically (broker/events.lua). A heartbeat every
webhook_ttl / 3 refreshes this process's entries and clears dead processes' ones, so a
SIGKILLed process's users go offline within webhook_ttl.

Delivering. Each process runs one delivery loop: read a batch (up to webhook_batch_size)
from the outbox, POST it, acknowledge it on a 2xx. A failure keeps the batch and retries it
after a backoff doubling from webhook_retry_min to webhook_retry_max (full jitter), refreshing
its claim so no other process takes it meanwhile; a dead process's unacknowledged entries are
claimed by the others (XAUTOCLAIM). Events older than webhook_max_age are dropped (counted).

The request (docs/backend.md):
    POST <webhook_url>
    Content-Type: application/json
    X-WS-Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    {"events": [{"id": "...", "type": "user_online", "user": "alice", "room": null, "ts": 1700000000.123}, ...]}
The backend verifies the signature, rejects an old `t` (replays) and deduplicates by `id`.

Imports: stdlib, orjson, hookclient (aiohttp), broker.events, ops.metrics (histogram); never
connection/server or Redis.
"""
from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import random
import re
import time

import orjson

from gateway.api.hookclient import require_aiohttp
from gateway.broker.events import EventsUnavailable
from gateway.ops.logs import RateLimitedLog
from gateway.ops.metrics import LatencyHistogram

log = logging.getLogger("gateway.api.webhooks")
# Redis or the receiver down: one WARNING per 10 s per kind, with the number suppressed.
_store_log = RateLimitedLog(log, 10.0)
_delivery_log = RateLimitedLog(log, 10.0)

SIGNATURE_HEADER = "X-WS-Gateway-Signature"
MAX_BACKLOG = 100_000       # tracking ops kept per dimension while the backend is down
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The signature header's value (Stripe's scheme: t=<ts>,v1=<hex hmac of "<ts>." + body>)."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a backend does (docs/backend.md): a matching v1 and a recent t."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def event_doc(entry_id: str, fields: dict) -> dict:
    """An outbox entry as the JSON event the backend receives."""
    kind = fields.get("k")
    subject = fields.get("s")
    doc = {"id": f"{entry_id}-{fields.get('n', '')}", "type": fields.get("t"),
           "user": subject if kind == "user" else fields.get("u") or None,
           "room": subject if kind == "room" else None,
           "ts": int(fields.get("ts", "0")) / 1000}
    if kind == "publish":
        doc["room"] = subject
        try:
            doc["data"] = orjson.loads(fields.get("d", "null"))
        except orjson.JSONDecodeError:
            doc["data"] = None
    return doc


class WebhookStats:
    """Counters (metrics source `webhook`)."""

    def __init__(self) -> None:
        self.sent = 0                     # events delivered (2xx)
        self.batches = 0                  # batches delivered
        self.retried = 0                  # events sent again after a failed attempt
        self.failed: dict = {}            # failed attempts by reason: timeout, connect, status
        self.dropped = 0                  # events older than webhook_max_age, given up
        self.claimed = 0                  # events taken over from a dead process
        self.backlog_dropped = 0          # tracking ops dropped past MAX_BACKLOG (long Redis outage)
        self.backend_errors = 0           # events backend (Redis) calls that failed
        self.lag = LatencyHistogram(LAG_BUCKETS)   # event ts -> delivered

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


class Tracker:
    """This process's users and rooms, reported to the backend on their 0 <-> 1 transitions."""

    def __init__(self, backend, loop, *, users: bool, rooms: bool, ttl: float, debounce: float, stats) -> None:
        self.backend = backend
        self.loop = loop
        self.ttl = ttl
        self.debounce = debounce
        self.stats = stats
        self.users: dict[str, int] = {}       # user -> local connections
        self.rooms: set[str] = set()          # rooms with local members
        self.track_users = users
        self.track_rooms = rooms
        self._ops: dict[str, list] = {"user": [], "room": []}       # not yet sent, in order
        self._busy = {"user": False, "room": False}                  # a call in flight
        self._cleanup_due = {"user": False, "room": False}           # the heartbeat asked for one
        self._scheduled = False
        self._tasks: set = set()
        self._timers: set = set()
        self._heartbeat: asyncio.Task | None = None

    # -- hooks --------------------------------------------------------------------------------

    def on_open(self, conn) -> None:
        user = conn.user
        if user:
            n = self.users.get(user, 0)
            self.users[user] = n + 1
            if n == 0:
                self._queue("user", ("a", user))

    def on_close(self, conn) -> None:
        user = conn.user
        n = self.users.get(user) if user else None
        if n is None:
            return
        if n > 1:
            self.users[user] = n - 1
        else:
            del self.users[user]
            self._queue("user", ("r", user))

    def on_room(self, room: str, occupied: bool) -> None:
        if occupied:
            self.rooms.add(room)
            self._queue("room", ("a", room))
        elif room in self.rooms:
            self.rooms.discard(room)
            self._queue("room", ("r", room))

    # -- sending: one ordered sender per dimension -----------------------------------------
    #
    # A dimension's ops must reach the backend in the order they happened (a failed "r u"
    # replayed after a later "a u" would take a connected user offline), so each dimension
    # has ONE call in flight; ops of the passes meanwhile wait in `_ops` and go together in
    # the next call. A failed call puts its ops back in front and retries with backoff: what
    # happened while Redis was down is reported when it is back (bounded by MAX_BACKLOG).

    def _queue(self, kind: str, op: tuple) -> None:
        self._ops[kind].append(op)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        for kind, ops in self._ops.items():
            if (ops or self._cleanup_due[kind]) and not self._busy[kind]:
                self._busy[kind] = True
                self._spawn(self._send(kind))

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, kind: str) -> None:
        attempt = 0
        try:
            while self._ops[kind] or self._cleanup_due[kind]:
                ops, self._ops[kind] = self._ops[kind], []
                cleanup, self._cleanup_due[kind] = self._cleanup_due[kind], False
                try:
                    pending = await self.backend.update(kind, ops, cleanup)
                except EventsUnavailable as exc:
                    self.stats.backend_errors += 1
                    _store_log.warning("webhook tracking update failed; retrying", {
                        "event": "webhook_error", "error": str(exc)[:200], "ops": len(ops)}, exc_info=False)
                    self._ops[kind][:0] = ops
                    self._cleanup_due[kind] |= cleanup
                    self._trim(kind)
                    attempt += 1
                    await asyncio.sleep(min(self.ttl / 3, 0.1 * 2 ** min(attempt, 8)))
                    continue
                attempt = 0
                if pending:
                    timer = self.loop.call_later(self.debounce, self._confirm_later, kind, pending)
                    self._timers.add(timer)
        finally:
            self._busy[kind] = False

    def _trim(self, kind: str) -> None:
        """Past MAX_BACKLOG ops (a long Redis outage), keep only what the heartbeat would send:
        the subjects held now. Those that came and went meanwhile are not reported; those that
        left expire in the backend and go offline/vacated through the TTL cleanup."""
        if len(self._ops[kind]) <= MAX_BACKLOG:
            return
        held = self.users if kind == "user" else self.rooms
        self.stats.backlog_dropped += len(self._ops[kind])
        self._ops[kind] = [("a", subject) for subject in held]

    def _confirm_later(self, kind: str, pending: list) -> None:
        self._timers = {t for t in self._timers if not t.cancelled() and t.when() > self.loop.time()}
        self._spawn(self._confirm(kind, pending))

    async def _confirm(self, kind: str, pending: list) -> None:
        try:
            await self.backend.confirm(kind, pending)
        except EventsUnavailable as exc:
            # Stale pending events are appended by any process's next cleanup.
            self.stats.backend_errors += 1
            _store_log.warning("webhook confirmation failed", {"event": "webhook_error", "error": str(exc)[:200]},
                               exc_info=False)

    # -- heartbeat ----------------------------------------------------------------------------

    def start(self) -> None:
        self._heartbeat = self.loop.create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook heartbeat failed")

    async def heartbeat(self) -> None:
        """Refresh this process's entries and clear dead processes' ones (their events appended):
        queued behind the ops not yet sent, so the order holds."""
        for kind, held in (("user", self.users), ("room", self.rooms)):
            self._ops[kind].extend(("a", subject) for subject in held)
            self._cleanup_due[kind] = True
            self._trim(kind)
        self._flush()

    async def close(self, timeout: float = 2.0) -> None:
        """Take this process's users and rooms out at once (a drained process's clients are
        reconnecting elsewhere: their pending offline is cancelled there, or appended by any
        process's cleanup once stale). Then stop."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for timer in self._timers:
            timer.cancel()
        for user in list(self.users):
            self._queue("user", ("r", user))
        for room in list(self.rooms):
            self._queue("room", ("r", room))
        self.users.clear()
        self.rooms.clear()
        self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):   # Redis down: the TTL cleanup of the others covers it
            task.cancel()


class Deliverer:
    """The delivery loop of one process (module docstring)."""

    def __init__(self, backend, config, stats: WebhookStats) -> None:
        self.backend = backend
        self.url = config.webhook_url
        self.secret = config.webhook_secret.encode()
        self.timeout = config.webhook_timeout
        self.batch_size = config.webhook_batch_size
        self.retry_min = config.webhook_retry_min
        self.retry_max = config.webhook_retry_max
        self.max_age = config.webhook_max_age
        self.events = frozenset(config.webhook_events)
        # Another process's entries are claimed once idle longer than its longest retry
        # sleep plus an attempt (it refreshes the claim before every attempt).
        self.claim_idle = config.webhook_retry_max + 2 * config.webhook_timeout + 5.0
        self.stats = stats
        self._aiohttp = require_aiohttp("webhook_url")
        self._session = None
        self._task: asyncio.Task | None = None
        self._next_claim = 0.0

    def start(self, loop) -> None:
        self._task = loop.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._session is not None:
            await self._session.close()

    def _client(self):
        if self._session is None or self._session.closed:
            aiohttp = self._aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers={"User-Agent": "ws-gateway-webhooks"})
        return self._session

    def _backoff(self, attempt: int) -> float:
        return random.uniform(self.retry_min, min(self.retry_max, self.retry_min * 2 ** attempt))

    async def _next_batch(self) -> list:
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, self.claim_idle / 2)
            claimed = await self.backend.claim(self.claim_idle, self.batch_size)
            if claimed:
                self.stats.claimed += len(claimed)
                log.info("webhook events taken over from another process",
                         extra={"event": "webhook_claimed", "count": len(claimed)})
                return claimed
        return await self.backend.read(self.batch_size, 1.0)

    async def _run(self) -> None:
        batch: list = []
        delivered = False        # the backend has `batch` (2xx); only its acknowledgement is missing
        attempt = 0
        while True:
            try:
                if not batch:
                    attempt, delivered = 0, False
                    batch = await self._next_batch()
                    if not batch:
                        continue
                elif delivered:
                    await self.backend.ack([entry_id for entry_id, _ in batch])
                    batch = []
                    continue
                else:
                    await self.backend.touch([entry_id for entry_id, _ in batch])
                batch = await self._drop_expired(batch)
                batch = await self._drop_unwanted(batch)
                if not batch:
                    continue
                if attempt:
                    self.stats.retried += len(batch)
                if await self._post(batch):
                    delivered = True
                    await self.backend.ack([entry_id for entry_id, _ in batch])
                    batch = []
                    continue
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
            except asyncio.CancelledError:
                raise
            except EventsUnavailable as exc:
                self.stats.backend_errors += 1
                _store_log.warning("webhook outbox unavailable", {"event": "webhook_error", "error": str(exc)[:200]},
                                   exc_info=False)
                await asyncio.sleep(self._backoff(2))
            except Exception:
                log.exception("webhook delivery loop failed")
                await asyncio.sleep(self.retry_max)

    async def _drop_expired(self, batch: list) -> list:
        limit = time.time() - self.max_age
        old = [entry_id for entry_id, fields in batch if int(fields.get("ts", "0")) / 1000 < limit]
        if not old:
            return batch
        await self.backend.ack(old)
        self.stats.dropped += len(old)
        log.error("webhook events dropped: undelivered for webhook_max_age", extra={
            "event": "webhook_dropped", "count": len(old), "max_age": self.max_age})
        gone = set(old)
        return [item for item in batch if item[0] not in gone]

    async def _drop_unwanted(self, batch: list) -> list:
        """Types not in webhook_events (e.g. user_offline without user_online configured: the
        tracking decides both) are acknowledged without sending."""
        unwanted = [entry_id for entry_id, fields in batch if fields.get("t") not in self.events]
        if not unwanted:
            return batch
        await self.backend.ack(unwanted)
        gone = set(unwanted)
        return [item for item in batch if item[0] not in gone]

    async def _post(self, batch: list) -> bool:
        events = [event_doc(entry_id, fields) for entry_id, fields in batch]
        body = orjson.dumps({"events": events})
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body, int(time.time()))}
        try:
            async with self._client().post(self.url, data=body, headers=headers) as resp:
                status = resp.status
                await resp.read()
        except asyncio.TimeoutError:
            return self._failed("timeout", len(events))
        except (OSError, self._aiohttp.ClientError) as exc:
            return self._failed("connect", len(events), type(exc).__name__)
        if not 200 <= status < 300:
            return self._failed("status", len(events), str(status))
        now = time.time()
        stats = self.stats
        stats.sent += len(events)
        stats.batches += 1
        for event in events:
            stats.lag.observe(max(0.0, now - event["ts"]))
        return True

    def _failed(self, reason: str, count: int, detail: str = "") -> bool:
        self.stats.fail(reason)
        _delivery_log.warning("webhook delivery failed; retrying with backoff", {
            "event": "webhook_failed", "reason": reason, "detail": detail, "events": count}, exc_info=False)
        return False


class Webhooks:
    """The process's webhook feature: tracker, delivery loop, client_published appends."""

    def __init__(self, gateway, config, backend) -> None:
        self.gateway = gateway
        self.config = config
        self.backend = backend
        self.stats = WebhookStats()
        events = set(config.webhook_events)
        self.tracker = Tracker(backend, gateway.loop, users=bool(events & {"user_online", "user_offline"}),
                               rooms=bool(events & {"room_occupied", "room_vacated"}), ttl=config.webhook_ttl,
                               debounce=config.webhook_debounce, stats=self.stats)
        self.deliverer = Deliverer(backend, config, self.stats)
        patterns = tuple(config.webhook_publish_rooms) if "client_published" in events else ()
        self._publish_match = (re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match
                               if patterns else None)
        self._tasks: set = set()

    async def start(self) -> None:
        await self.backend.start(self.config.webhook_ttl, self.config.webhook_debounce)
        self.tracker.start()
        self.deliverer.start(self.gateway.loop)

    async def close(self) -> None:
        await self.tracker.close()
        await self.deliverer.close()
        await self.backend.close()

    def on_published(self, conn, room: str, data: bytes) -> None:
        """A client's publication (rooms/session.py): client_published for matching rooms."""
        if self._publish_match is None or self._publish_match(room) is None:
            return
        fields = {"t": "client_published", "k": "publish", "s": room, "u": conn.user, "d": data,
                  "ts": str(int(time.time() * 1000))}
        task = self.gateway.loop.create_task(self._append(fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _append(self, fields: dict) -> None:
        try:
            await self.backend.append(fields)
        except EventsUnavailable as exc:
            self.stats.backend_errors += 1
            _store_log.warning("client_published event lost: outbox unavailable",
                               {"event": "webhook_error", "error": str(exc)[:200]}, exc_info=False)

    def metrics(self) -> dict:
        s = self.stats
        return {"sent": s.sent, "batches": s.batches, "retried": s.retried, "failed": dict(s.failed),
                "dropped": s.dropped, "claimed": s.claimed, "backend_errors": s.backend_errors, "lag": s.lag,
                "tracking_dropped": s.backlog_dropped}


def install(gateway, config, backend) -> Webhooks:
    hooks = Webhooks(gateway, config, backend)
    tracker = hooks.tracker
    if tracker.track_users:
        gateway.open_hooks.append(tracker.on_open)
        gateway.close_hooks.append(tracker.on_close)
    hub = getattr(gateway, "hub", None)
    if tracker.track_rooms and hub is not None:
        hub.room_observer = tracker.on_room
    endpoint = gateway.endpoints.get("/ws")
    if hooks._publish_match is not None and endpoint is not None:
        endpoint.set_hooks(on_published=hooks.on_published)
    gateway.metric_sources["webhook"] = hooks.metrics
    # First of the shutdown hooks: the tracker reports this process's users gone while Redis is still there.
    gateway.on_shutdown.insert(0, hooks.close)
    return hooks
