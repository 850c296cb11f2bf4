"""`GET /sse?room=R&room=R2`: the rooms as Server-Sent Events (HTML Living Standard,
section 9.2 "Server-sent events"), one-way: publishing stays on /ws and the HTTP API.

Admission is the WebSocket upgrade's: the same admission hooks (Origin, per-IP cap, the
token from `Authorization: Bearer`, `?token=` or the cookie), `max_connections`, each room
checked against the token's join permissions (403), `max_rooms_per_connection` and the room
name rules (400). The answer is `200 text/event-stream`, no Content-Length: the body is the
stream and ends when the connection does (RFC 9112 section 6.3).

Events (the data is the JSON /ws sends):
    event: ack      {"op":"ack","room":R,"seq":N,"epoch":E[,"recovered":B]}  once per room joined
    (message)       {"op":"message","room":R,"data":X,"seq":N}               the default type:
                                                                             EventSource.onmessage
    event: reset    {"op":"reset","room":R,"epoch":E,"seq":N}  the position for R was unknown or
                    too old (resume impossible: reload), or R's numbering restarted
    event: dropped  {"op":"dropped","room":R,"count":N}        a drop policy dropped N of R
Every event carries `id:`: the positions of ALL the stream's rooms, in the URL's order,
`<epoch>:<seq>` joined by ",". The browser sends the last one back as `Last-Event-ID` when it
reconnects (by itself: after a network error, a drain, a restart), and each room resumes from
its own position through the same history read a /ws `join` with `since` uses -- coalesced,
replayed in order, joined to live with no gap and no duplicate. `?last_event_id=` does the
same for clients that cannot set the header.

Fan-out: the hub builds one `data:` block per publication for all streams (encode once);
each stream prefixes its own `id:` line (its other rooms' positions differ). Slow consumers:
past the transport's high-water mark events queue under the room's slow-consumer policy with
the same caps and counters as /ws; `disconnect` ends the stream (4000 in the log; the browser
resumes from its last id, so nothing is lost while the history holds it), drop policies drop
and say so with `event: dropped`. Keepalive: a `: ping` comment when the stream was silent for
`ping_interval`. Drain (SIGTERM/SIGUSR2) ends every stream; the browser reconnects elsewhere.

Imports: rooms (hub member, commands, backpressure), errors, ws.handshake (HTTP responses).
Only this package touches transports.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import orjson

from gateway.broker.base import BrokerUnavailable
from gateway.errors import HandshakeRejected
from gateway.rooms import commands
from gateway.rooms.backpressure import OutboundQueue

log = logging.getLogger("gateway.server.sse")

PATH = "/sse"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
        b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 1000\n\n")
PING = b": ping\n\n"
MAX_LAST_EVENT_ID = 16384


class SseStats:
    __slots__ = ("opened", "open", "resumed", "events", "slow_disconnects", "resets", "gauges")

    def __init__(self) -> None:
        self.opened = 0          # streams started
        self.open = 0            # streams open now
        self.resumed = 0         # streams that came with a Last-Event-ID
        self.events = 0          # events written (not counting pings)
        self.slow_disconnects = 0
        self.resets = 0          # rooms that could not resume (reset event)
        self.gauges = ("open",)


def parse_last_event_id(value: str, count: int) -> list:
    """`E1:S1,E2:S2` -> [(seq, epoch) or None per room]; anything unusable is None (unknown)."""
    out: list = [None] * count
    if not value or len(value) > MAX_LAST_EVENT_ID:
        return out
    parts = value.split(",")
    if len(parts) != count:
        return out
    for i, part in enumerate(parts):
        epoch, sep, seq = part.rpartition(":")
        if sep and epoch and seq.isascii() and seq.isdigit() and len(epoch) <= commands.MAX_EPOCH_CHARS:
            out[i] = (int(seq), epoch)
    return out


class SseStream:
    """One event stream: the hub's member for each of its rooms."""

    __slots__ = ("conn", "endpoint", "rooms", "index", "positions", "epochs", "resume", "queue", "closed", "task",
                 "__weakref__")
    msgpack = False
    deflate_key = None
    sse = True

    def __init__(self, conn, endpoint: "SseEndpoint", rooms: list, resume: list) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.rooms = rooms
        self.index = {name: i for i, name in enumerate(rooms)}
        self.positions = [b""] * len(rooms)     # b"<epoch>:<seq>" per room, in URL order
        self.epochs = [b""] * len(rooms)
        self.resume = resume                    # (seq, epoch) or None per room, from Last-Event-ID
        self.queue: OutboundQueue | None = None
        self.closed = False
        self.task: asyncio.Task | None = None

    # -- the hub's member interface ----------------------------------------------------------

    def deliver_events(self, room, seqs: list, blocks: list) -> None:
        if self.closed:
            return
        i = self.index[room.name]
        epoch = self.epochs[i]
        if epoch != room.epoch.encode():
            epoch = self.epochs[i] = room.epoch.encode()
        positions = self.positions
        out = []
        for seq, block in zip(seqs, blocks):
            if seq:
                positions[i] = b"%b:%d" % (epoch, seq)
            out.append(b"id: " + b",".join(positions) + b"\n" + block)
        self._write(room, out)

    def reset_event(self, room, epoch: str, seq: int) -> None:
        self._position_event(room, b"reset", {"op": "reset", "room": room.name, "epoch": epoch, "seq": seq},
                             epoch, seq)

    def _position_event(self, room, kind: bytes, doc: dict, epoch: str, seq: int) -> None:
        if self.closed:
            return
        i = self.index[room.name]
        self.epochs[i] = epoch.encode()
        self.positions[i] = b"%b:%d" % (self.epochs[i], seq)
        event = b"id: " + b",".join(self.positions) + b"\nevent: " + kind + b"\ndata: " + orjson.dumps(doc) + b"\n\n"
        self._write(room, [event])

    def joined(self, room, seq: int, epoch: str, recovered) -> None:
        """The hub's answer to a join: the ack event (or a reset when the position is lost)."""
        if recovered is False:
            self.endpoint.stats.resets += 1
            self._position_event(room, b"reset", {"op": "reset", "room": room.name, "epoch": epoch, "seq": seq},
                                 epoch, seq)
            return
        doc = {"op": "ack", "room": room.name, "seq": seq, "epoch": epoch}
        if recovered is not None:
            doc["recovered"] = recovered
        self._position_event(room, b"ack", doc, epoch, seq)

    # -- writing -------------------------------------------------------------------------

    def _write(self, room, events: list) -> None:
        conn = self.conn
        stats = self.endpoint.stats
        stats.events += len(events)
        if self.queue is None and not conn.paused:
            data = events[0] if len(events) == 1 else b"".join(events)
            if len(data) <= self.endpoint.write_buffer_high:
                conn.transport.write(data)
                conn.stats.bytes_out += len(data)
                return
            # More than the high-water mark at once: event by event while the transport takes
            # them, the rest through the queue and its policy (as rooms/session.py does).
            for i, event in enumerate(events):
                conn.transport.write(event)
                conn.stats.bytes_out += len(event)
                if conn.paused:
                    events = events[i + 1:]
                    break
            else:
                return
            if not events or self.closed:
                return
        queue = self.queue
        if queue is None:
            ep = self.endpoint
            queue = self.queue = OutboundQueue(ep.max_queue_bytes, ep.backpressure)
        for event in events:
            if not queue.push(room.name, event, room.policy):
                self.slow_disconnect(room)
                return

    def slow_disconnect(self, room) -> None:
        conn = self.conn
        self.endpoint.stats.slow_disconnects += 1
        log.info("slow consumer disconnected", extra={
            "event": "slow_consumer", "conn": conn.id, "peer": conn.peer, "user": conn.user, "room": room.name,
            "queued_bytes": self.queue.bytes if self.queue is not None else 0, "transport": "sse"})
        self.endpoint.close_stream(self)
        conn.abort()   # the browser resumes from its last id: nothing queued here is needed


class SseEndpoint:
    """`GET /sse` (see the module docstring); `hub` is the process's rooms.Hub."""

    rate_limit_exempt = True   # nothing is read from an event stream

    def __init__(self, hub, config, backpressure) -> None:
        self.hub = hub
        self.config = config
        self.max_rooms = config.max_rooms_per_connection
        self.max_room_name_bytes = config.max_room_name_bytes
        self.max_queue_bytes = config.max_queue_bytes
        self.write_buffer_high = config.write_buffer_high_bytes
        self.backpressure = backpressure       # the /ws endpoint's: one set of slow-consumer counters
        self.stats = SseStats()

    # -- admission (Connection._stream) -------------------------------------------------------

    def prepare(self, conn, request) -> bytes:
        """Validate the rooms and the resume point; the response head, or HandshakeRejected."""
        if request.method != "GET":
            raise HandshakeRejected(405, "use GET", {"Allow": "GET"})
        names = request.query_params().get("room", [])
        if not names:
            raise HandshakeRejected(400, "name at least one room: /sse?room=R&room=R2")
        rooms: list = []
        for name in names:
            try:
                commands.validate_room(name, self.max_room_name_bytes)
            except commands.CommandError as exc:
                raise HandshakeRejected(400, f"{exc.code}: {exc.message}") from None
            if name not in rooms:
                rooms.append(name)
        if len(rooms) > self.max_rooms:
            raise HandshakeRejected(400, f"too_many_rooms: a stream may join at most {self.max_rooms} rooms")
        principal = conn.principal
        if principal is not None:
            for name in rooms:
                if not principal.can_join(name):
                    raise HandshakeRejected(403, f"not allowed to join {name[:100]!r}")
        last = request.header("last-event-id") or (request.query_params().get("last_event_id") or [""])[0]
        conn.state = SseStream(conn, self, rooms, parse_last_event_id(last, len(rooms)))
        if last:
            self.stats.resumed += 1
        return HEAD

    # -- life cycle ------------------------------------------------------------------------

    def on_open(self, conn) -> None:
        stream = conn.state
        self.stats.opened += 1
        self.stats.open += 1
        conn.set_write_buffer_limits(self.config.write_buffer_high_bytes, self.config.send_buffer_bytes)
        stream.task = asyncio.ensure_future(self._join_all(stream))

    async def _join_all(self, stream: SseStream) -> None:
        hub = self.hub
        for name, resume in zip(stream.rooms, stream.resume):
            if stream.closed:
                return
            since, epoch = resume if resume is not None else (None, None)
            reply = functools.partial(self._reply, stream, name)
            try:
                if hub.join_nowait(stream, name, since, epoch, False, reply) is None:
                    await hub.join(stream, name, since, epoch, False, reply)
            except BrokerUnavailable as exc:
                log.info("sse join failed", extra={"event": "sse_join_failed", "conn": stream.conn.id,
                                                   "room": name, "error": str(exc)[:200]})
                if not stream.closed:
                    # The stream ends; EventSource retries by itself (`retry: 1000`).
                    self.close_stream(stream)
                    stream.conn.close()
                return
        stream.task = None

    def _reply(self, stream: SseStream, name: str, seq: int, epoch: str, recovered) -> None:
        room = self.hub.rooms.get(name)
        if room is not None:
            stream.joined(room, seq, epoch, recovered)

    def on_messages(self, conn, messages) -> None:   # pragma: no cover - an event stream has no messages
        return

    def on_writable(self, conn) -> None:
        stream = conn.state
        if stream is None or stream.closed or stream.queue is None:
            return
        queue = stream.queue
        high = self.config.write_buffer_high_bytes
        while queue and not conn.paused and not stream.closed:
            data = queue.pop(high)
            if data:
                conn.transport.write(b"".join(data))
        if not queue and not stream.closed:
            for name, count in queue.take_drops():
                room = self.hub.rooms.get(name)
                if room is not None:
                    stream._write(room, [b"event: dropped\ndata: " + orjson.dumps(commands.dropped(name, count))
                                         + b"\n\n"])
            if not stream.queue:
                stream.queue = None

    def heartbeat(self, conn) -> None:
        """The gateway's sweep: this stream was silent for ping_interval (proxies drop idle ones)."""
        stream = conn.state
        if stream is not None and not stream.closed and stream.queue is None and not conn.paused:
            conn.transport.write(PING)

    def on_close(self, conn) -> None:
        stream = conn.state
        if stream is not None and not stream.closed:
            self.close_stream(stream)

    def close_stream(self, stream: SseStream) -> None:
        stream.closed = True
        self.stats.open -= 1
        self.hub.leave_all(stream)
        if stream.queue is not None:
            stream.queue.clear()
            stream.queue = None
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()


def install(gateway, hub, config, backpressure) -> SseEndpoint:
    endpoint = SseEndpoint(hub, config, backpressure)
    gateway.stream_routes[PATH] = endpoint
    sources = getattr(gateway, "metric_sources", None)
    if isinstance(sources, dict):
        sources["sse"] = endpoint.stats
    return endpoint
