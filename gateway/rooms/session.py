"""The `/ws` endpoint: one `Session` per connection speaking the rooms protocol (commands.py).

Requests of one read are handled in order. join / leave / publish usually complete at once
(room already subscribed here, in-memory broker); when one must wait (the broker subscribes
a new room, a Redis publish, a token refresh) the rest of the read waits behind it in
`backlog` and the socket stops being read until it is done, so a client cannot queue
unbounded work and its requests keep their order.

Outbound, a Session is the hub's member (`deliver`): while the transport accepts writes the
hub's per-pass batch goes straight to the connection (one write per pass). Once the
transport pauses (its buffer passed `write_buffer_high_bytes`), frames go to an
`OutboundQueue` created only then, and the room's slow-consumer policy decides when it is
full (backpressure.py): close with 4000, or drop and count. When the transport drains
(`on_writable`) the queue is written out, and once it is empty the client gets one
`{"op":"dropped","room":R,"count":N}` per room that lost messages. A client that does not
read its replies is not read either (reading pauses while the transport is paused).

Abuse: each client error (commands.CLIENT_ERRORS) gets an `error` reply and a log line;
`max_consecutive_errors` of them in a row close the connection with 4003.

Interface (like echo.py's EchoEndpoint): select_subprotocol, on_open, on_messages,
on_writable, on_close. Imports commands, rooms, backpressure, broker.base, errors and
handshake helpers; transports only through the Connection.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging

from gateway.rooms import commands
from gateway.rooms.backpressure import BackpressureStats, OutboundQueue
from gateway.broker.base import BrokerUnavailable
from gateway.rooms.commands import CLIENT_ERRORS, MSGPACK_SUBPROTOCOL, CommandError
from gateway.errors import CLOSE_REASONS, GatewayCloseCode
from gateway.ws.handshake import select_subprotocol

log = logging.getLogger("gateway.rooms.session")

OP_TEXT, OP_BINARY = 0x1, 0x2
# Publishes per connection queued on an order-keeping broker (Redis) before the next one is
# awaited instead: enough to fill a pipeline, bounded so a flooding client pauses.
MAX_QUEUED_PUBLISHES = 64


class SessionStats:
    """Request counters of /ws (plain ints; `errors` by code)."""

    __slots__ = ("requests", "joins", "leaves", "publishes", "refreshes", "pings", "errors",
                 "too_many_errors_closes")

    def __init__(self) -> None:
        self.requests = 0
        self.joins = 0
        self.leaves = 0
        self.publishes = 0
        self.refreshes = 0
        self.pings = 0
        self.errors: collections.Counter = collections.Counter()   # error replies by code
        self.too_many_errors_closes = 0


class Session:
    """Per-connection state (`conn.state`); also the hub's member."""

    __slots__ = ("conn", "endpoint", "msgpack", "queue", "errors", "backlog", "task", "closed",
                 "reading_paused", "throttled", "__weakref__", "deflate_key", "publishing")

    def __init__(self, conn, endpoint: "RoomsEndpoint", msgpack: bool) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.msgpack = msgpack
        self.queue: OutboundQueue | None = None   # only while behind: idle sessions pay nothing
        self.errors = 0                           # consecutive client errors
        self.backlog: list | None = None          # requests waiting behind an async one
        self.task: asyncio.Task | None = None
        self.closed = False
        self.reading_paused = False
        self.throttled = False                    # paused until the hub's fan-out catches up
        self.publishing = 0                       # queued publishes awaiting their seq (Redis)
        # permessage-deflate window (None: not negotiated): the hub's compress-once group.
        codec = getattr(conn.ws, "deflate", None)
        self.deflate_key = None if codec is None else codec.key

    # -- the hub's member interface ---------------------------------------------------------

    def deliver(self, room, frames: list, batch: bytes) -> None:
        conn = self.conn
        if self.closed:
            return
        if self.queue is None and not conn.paused:
            if len(batch) <= self.endpoint.write_buffer_high:
                conn.send_shared(batch)      # the common case: the pass's frames in one write
                return
            # A pass bigger than the high-water mark: frame by frame while the transport
            # takes them, so a client that stalls mid-pass gets the rest through its queue
            # and its policy, not a transport buffer grown by the whole pass.
            conn.flush()                     # what is corked goes first (order), then write now
            for i, frame in enumerate(frames):
                conn.send_shared(frame)
                if conn.paused:
                    frames = frames[i + 1:]
                    break
            else:
                return
            if not frames or self.closed:
                return
        queue = self.queue
        if queue is None:
            ep = self.endpoint
            queue = self.queue = OutboundQueue(ep.max_queue_bytes, ep.backpressure)
        name = room.name
        policy = room.policy
        for frame in frames:
            if not queue.push(name, frame, policy):
                self.slow_disconnect(room)
                return

    def slow_disconnect(self, room) -> None:
        conn = self.conn
        log.info("slow consumer disconnected", extra={
            "event": "slow_consumer", "conn": conn.id, "peer": conn.peer, "user": conn.user, "room": room.name,
            "queued_bytes": self.queue.bytes if self.queue is not None else 0,
        })
        self.endpoint.close_session(self)
        code = GatewayCloseCode.SLOW_CONSUMER
        conn.close(int(code), CLOSE_REASONS[code])

    # -- replies ------------------------------------------------------------------------------

    def reply(self, doc: dict) -> None:
        if self.msgpack:
            self.conn.send(OP_BINARY, commands.encode_msgpack(doc))
        else:
            self.conn.send(OP_TEXT, commands.encode_json(doc))


class RoomsEndpoint:
    """The `/ws` endpoint; `hub` is the process's rooms.Hub."""

    subprotocols = (MSGPACK_SUBPROTOCOL,)

    def __init__(self, hub, config) -> None:
        self.hub = hub
        self.config = config
        self.max_room_name_bytes = config.max_room_name_bytes
        self.max_rooms = config.max_rooms_per_connection
        self.max_errors = config.max_consecutive_errors
        self.max_queue_bytes = config.max_queue_bytes
        self.write_buffer_high = config.write_buffer_high_bytes
        self.backpressure = BackpressureStats()
        self.stats = SessionStats()
        self.sessions = 0
        # Backend hooks (api/proxy.py RoomHook), None unless configured: objects with
        # applies(room), `async check_join(conn, room, id)` and `async filter_publish(conn,
        # room, data, id) -> data`, raising CommandError (forbidden / backend_unavailable).
        self.join_proxy = None
        self.publish_proxy = None
        # client_published webhooks (api/webhooks.py): (conn, room, data) -> None, or None.
        self.on_published = None
        self.publish_hooked = False      # either of the two above: one test per publish
        # presence.PresenceTracker when some room pattern enables presence or join/leave
        # events; None otherwise, and then joins and leaves pay one attribute test.
        self.presence = None

    # -- endpoint interface -----------------------------------------------------------------

    def select_subprotocol(self, request):
        return select_subprotocol(request, self.subprotocols)

    def on_open(self, conn, subprotocol) -> None:
        conn.state = Session(conn, self, subprotocol == MSGPACK_SUBPROTOCOL)
        self.sessions += 1
        # Pause (and queue in the gateway, under the policy) once this much waits in the
        # transport; resume at a quarter so a draining client gets a few writes' worth.
        conn.set_write_buffer_limits(self.write_buffer_high, self.config.send_buffer_bytes)

    def on_messages(self, conn, messages) -> None:
        session = conn.state
        if session.closed:
            return
        if session.backlog is not None:
            session.backlog.extend(messages)   # reading is paused; this is the rest of one read
            return
        self._process(session, messages)
        if session.closed:
            return
        if conn.paused and not session.reading_paused:
            # The client does not read what we send: stop reading what it sends.
            session.reading_paused = True
            conn.pause_reading()
        if self.hub.must_throttle and not session.throttled:
            # It publishes faster than this pass can fan out: read it again after the flush.
            self.hub.publisher_pauses += 1
            session.throttled = True
            if not session.reading_paused:
                session.reading_paused = True
                conn.pause_reading()
            self.hub.after_flush(lambda: self._unthrottle(session))

    def _unthrottle(self, session: Session) -> None:
        session.throttled = False
        self._maybe_resume(session)

    def _maybe_resume(self, session: Session) -> None:
        """Read the client again once no reason to pause remains."""
        conn = session.conn
        if (session.reading_paused and not conn.paused and session.backlog is None and not session.throttled
                and not session.closed):
            session.reading_paused = False
            conn.resume_reading()

    def on_writable(self, conn) -> None:
        session = conn.state
        if session is None or session.closed:
            return
        queue = session.queue
        if queue is not None:
            while queue and not conn.paused and not session.closed:
                for frame in queue.pop(self.write_buffer_high):
                    conn.send_frame(frame)
                conn.flush()
            if not queue and not session.closed:
                # Caught up: tell the client what it missed (besides the seq gap).
                for room, count in queue.take_drops():
                    session.reply(commands.dropped(room, count))
                session.queue = None
                conn.flush()
        self._maybe_resume(session)

    def on_rate_limited(self, conn) -> None:
        """defences.py: this connection's inbound message budget ran out. Say why in the
        protocol's terms, leave every room; the connection then closes with 4002."""
        session = conn.state
        if session is None or session.closed:
            return
        self.stats.errors["rate_limited"] += 1
        session.reply(commands.error("rate_limited", "message rate limit exceeded; closing (4002)"))
        self.close_session(session)

    def on_close(self, conn) -> None:
        session = conn.state
        if session is not None and not session.closed:
            self.close_session(session)

    def close_session(self, session: Session) -> None:
        """Leave every room and drop the queue (disconnect, slow-consumer or abuse close)."""
        session.closed = True
        self.sessions -= 1
        self.hub.leave_all(session)
        if self.presence is not None:
            self.presence.left_all(session)
        if session.queue is not None:
            session.queue.clear()
            session.queue = None
        session.backlog = None

    # -- backend hooks ------------------------------------------------------------------------

    def set_hooks(self, *, join_proxy=None, publish_proxy=None, on_published=None) -> None:
        """Attach backend hooks (api/proxy.py, api/webhooks.py); None leaves one as it is."""
        if join_proxy is not None:
            self.join_proxy = join_proxy
        if publish_proxy is not None:
            self.publish_proxy = publish_proxy
        if on_published is not None:
            self.on_published = on_published
        self.publish_hooked = self.publish_proxy is not None or self.on_published is not None

    # -- requests -----------------------------------------------------------------------------

    def _process(self, session: Session, messages) -> None:
        for i, (opcode, payload) in enumerate(messages):
            if session.closed:
                return
            try:
                pending = self._handle(session, opcode, payload)
            except CommandError as exc:
                self._refuse(session, exc)
                continue
            session.errors = 0
            if pending is not None:
                # Wait for it; the rest of this read follows when it is done.
                session.backlog = list(messages[i + 1:])
                if not session.reading_paused:
                    session.reading_paused = True
                    session.conn.pause_reading()
                session.task = asyncio.ensure_future(self._finish(session, pending))
                return

    def _handle(self, session: Session, opcode: int, payload):
        """Handle one request; returns None when done, or a coroutine that must be awaited."""
        self.stats.requests += 1
        if opcode == OP_TEXT:
            obj = commands.decode_json(payload)
        elif session.msgpack:
            obj = commands.decode_msgpack(payload)
        else:
            raise CommandError("bad_json", f"binary frames need the {MSGPACK_SUBPROTOCOL} subprotocol; send JSON text")
        cmd = commands.parse(obj, self.max_room_name_bytes)
        op = cmd.op
        if op == "publish":
            return self._publish(session, cmd)
        if op == "join":
            return self._join(session, cmd)
        if op == "leave":
            self.stats.leaves += 1
            if not self.hub.leave(session, cmd.room):
                raise CommandError("not_member", f"not a member of {cmd.room!r}", cmd.id)
            if self.presence is not None:
                self.presence.left(session, cmd.room)
            self._ack(session, cmd)
            return None
        if op == "ping":
            # Liveness for clients that cannot see WebSocket pongs (browsers): one small reply.
            self.stats.pings += 1
            session.reply(commands.pong(cmd.id))
            return None
        if op == "refresh":
            return self._refresh(session, cmd)
        return self._presence_query(session, cmd)

    def _ack(self, session: Session, cmd, seq=None) -> None:
        if cmd.id is not None:
            session.reply(commands.ack(cmd.id, seq))

    def _publish(self, session: Session, cmd):
        self.stats.publishes += 1
        principal = session.conn.principal
        if principal is not None and not principal.can_publish(cmd.room):
            raise CommandError("forbidden", f"not allowed to publish to {cmd.room!r}", cmd.id)
        hub = self.hub
        if self.publish_hooked:
            proxy = self.publish_proxy
            if proxy is not None and proxy.applies(cmd.room):
                return self._publish_proxied(session, cmd, proxy)
            if self.on_published is not None:
                self.on_published(session.conn, cmd.room, cmd.data)
        if hub.can_publish_nowait:
            self._ack(session, cmd, hub.publish_nowait(cmd.room, cmd.data, cmd.key))
            return None
        if hub.can_publish_queued and session.publishing < MAX_QUEUED_PUBLISHES:
            # The broker numbers publications in call order, so the next request need not
            # wait for this one's round trip; its ack follows when Redis answers. Past the
            # cap the publish is awaited below, which pauses reading (backpressure).
            try:
                fut = hub.publish_queued(cmd.room, cmd.data, cmd.key)
            except BrokerUnavailable as exc:
                raise _broker_unavailable("publish", exc, cmd.id) from None
            session.publishing += 1
            fut.add_done_callback(functools.partial(self._published, session, cmd))
            return None
        return self._publish_async(session, cmd)

    def _published(self, session: Session, cmd, fut: asyncio.Future) -> None:
        session.publishing -= 1
        if session.closed or fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._ack(session, cmd, fut.result()[0])
        else:
            self._refuse(session, _broker_unavailable("publish", exc, cmd.id))

    async def _publish_proxied(self, session: Session, cmd, proxy) -> None:
        # The backend allows, refuses (CommandError) or replaces the data; the rest of the
        # client's requests wait behind it (order), other clients do not.
        cmd.data = await proxy.filter_publish(session.conn, cmd.room, cmd.data, cmd.id)
        if session.closed:
            return
        if self.on_published is not None:
            self.on_published(session.conn, cmd.room, cmd.data)
        await self._publish_async(session, cmd)

    async def _publish_async(self, session: Session, cmd) -> None:
        try:
            seq, _ = await self.hub.publish(cmd.room, cmd.data, cmd.key)
        except BrokerUnavailable as exc:
            raise _broker_unavailable("publish", exc, cmd.id) from None
        self._ack(session, cmd, seq)

    def _join(self, session: Session, cmd):
        self.stats.joins += 1
        room = cmd.room
        principal = session.conn.principal
        if principal is not None and not principal.can_join(room):
            raise CommandError("forbidden", f"not allowed to join {room!r}", cmd.id)
        hub = self.hub
        member = hub.is_member(session, room)
        if not member and len(hub.rooms_of(session)) >= self.max_rooms:
            raise CommandError("too_many_rooms", f"a connection may join at most {self.max_rooms} rooms", cmd.id)
        proxy = self.join_proxy
        if proxy is not None and not member and proxy.applies(room):
            return self._join_proxied(session, cmd, proxy)
        # The hub answers (ack with the position, then the replay) right before the member
        # gets live frames, so nothing falls between them.
        reply = functools.partial(self._join_ack, session, cmd)
        joined = hub.join_nowait(session, room, cmd.since, cmd.epoch, cmd.last, reply)
        if joined is None:
            return self._join_async(session, cmd, reply)
        if joined is False:
            position = hub.position(room)   # joining twice is harmless
            if cmd.id is not None:
                session.reply(commands.join_ack(cmd.id, *position) if position else commands.ack(cmd.id))
        if joined and self.presence is not None:
            self.presence.joined(session, room)
        return None

    def _join_ack(self, session: Session, cmd, seq: int, epoch: str, recovered) -> None:
        if session.closed:
            return
        if cmd.id is not None or cmd.since is not None or cmd.last:
            session.reply(commands.join_ack(cmd.id, seq, epoch, recovered))

    async def _join_proxied(self, session: Session, cmd, proxy) -> None:
        await proxy.check_join(session.conn, cmd.room, cmd.id)   # raises CommandError to refuse
        if session.closed:
            return
        await self._join_async(session, cmd, functools.partial(self._join_ack, session, cmd))

    async def _join_async(self, session: Session, cmd, reply) -> None:
        try:
            joined = await self.hub.join(session, cmd.room, cmd.since, cmd.epoch, cmd.last, reply)
        except BrokerUnavailable as exc:
            raise _broker_unavailable("join", exc, cmd.id) from None
        if session.closed:
            self.hub.leave(session, cmd.room)   # it went away while the broker subscribed
            return
        if joined is False and cmd.id is not None:
            position = self.hub.position(cmd.room)
            session.reply(commands.join_ack(cmd.id, *position) if position else commands.ack(cmd.id))
        if joined and self.presence is not None:
            self.presence.joined(session, cmd.room)

    def force_leave(self, session: Session, room: str, reason: str) -> bool:
        """The server API's `unsubscribe`: out of `room`, and told so."""
        if session.closed or not self.hub.leave(session, room):
            return False
        if self.presence is not None:
            self.presence.left(session, room)
        session.reply(commands.unsubscribed(room, reason))
        session.conn.flush()
        return True

    def _presence_query(self, session: Session, cmd):
        tracker = self.presence
        rule = tracker.rule_for(cmd.room) if tracker is not None else None
        if rule is None or not rule.presence:
            raise CommandError("presence_disabled", f"presence is not enabled for {cmd.room!r}", cmd.id)
        principal = session.conn.principal
        if principal is not None and not principal.can_see_presence(cmd.room):
            raise CommandError("forbidden", f"not allowed to see who is in {cmd.room!r}", cmd.id)
        return self._presence_async(session, cmd, tracker)

    async def _presence_async(self, session: Session, cmd, tracker) -> None:
        doc = {"op": "ack"}
        if cmd.id is not None:
            doc["id"] = cmd.id
        doc["room"] = cmd.room
        try:
            if cmd.op == "presence":
                doc["members"], doc["next"] = await tracker.members(cmd.room, cmd.after, cmd.limit or None)
            else:
                doc.update(await tracker.counts(cmd.room))
        except BrokerUnavailable as exc:
            raise CommandError("broker_unavailable", f"presence unavailable now: {exc}"[:200], cmd.id) from None
        if not session.closed:
            session.reply(doc)

    def _refresh(self, session: Session, cmd):
        self.stats.refreshes += 1
        hook = getattr(session.conn.gateway, "refresh_token", None)
        if hook is None:
            raise CommandError("unsupported", "this server has no authentication to refresh", cmd.id)
        return self._refresh_async(session, cmd, hook)

    async def _refresh_async(self, session: Session, cmd, hook) -> None:
        # The hook (auth) checks the token and updates conn.principal; it raises to refuse.
        try:
            result = hook(session.conn, cmd.token)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            raise CommandError("unauthorized", f"token refused: {getattr(exc, 'reason', None) or exc}"[:200],
                               cmd.id) from None
        if result is False:
            raise CommandError("unauthorized", "token refused", cmd.id)
        self._ack(session, cmd)

    async def _finish(self, session: Session, pending) -> None:
        try:
            await pending
        except CommandError as exc:
            if not session.closed:
                self._refuse(session, exc)
        except Exception:
            log.exception("request failed", extra={"conn": session.conn.id})
            if not session.closed:
                self._refuse(session, CommandError("internal_error", "the server failed to handle this request"))
        session.task = None
        backlog = session.backlog
        session.backlog = None
        if session.closed:
            return
        if backlog:
            self._process(session, backlog)
        self._maybe_resume(session)

    def _refuse(self, session: Session, exc: CommandError) -> None:
        conn = session.conn
        self.stats.errors[exc.code] += 1
        log.info("request refused", extra={"event": "request_error", "conn": conn.id, "peer": conn.peer,
                                           "user": conn.user, "code": exc.code, "reason": exc.message})
        session.reply(commands.error(exc.code, exc.message, exc.id))
        if exc.code in CLIENT_ERRORS:
            session.errors += 1
            if session.errors >= self.max_errors:
                self.stats.too_many_errors_closes += 1
                self.close_session(session)
                code = GatewayCloseCode.TOO_MANY_ERRORS
                conn.close(int(code), CLOSE_REASONS[code])


def _broker_unavailable(action: str, exc: BaseException, rid) -> CommandError:
    """The client's error for a broker outage. The exception's text (e.g. redis-py's "Error 111
    connecting to 10.0.0.5:6379") names internal addresses: it is for the logs (the broker logs
    each state change), never for clients."""
    message = f"cannot {action} now: the message broker is unavailable; retry later"
    if getattr(exc, "delivered_locally", False):
        message += " (members on this gateway process already got it, without a seq: a retry repeats it for them)"
    return CommandError("broker_unavailable", message, rid)
