"""Connection: the only glue between a uvloop transport and the sans-I/O pieces.

Data flow of one connection:

    bytes in -> [head] handshake.parse_request -> route: HTTP handler | WebSocket upgrade
             -> [open] ServerProtocol.receive_data -> messages -> endpoint.on_messages
             -> frames queued on the protocol -> flush(): ONE transport write per read
                (or per event-loop pass for frames pushed by the hub, via the Corker)

The [open] part runs in gateway_ext.WebSocketStream, this class's compiled base (it runs
per read and per delivery); everything once-per-connection is here.

Write coalescing ("corking") is the point of this module: everything produced while handling
one read, and every broadcast frame that reaches this connection in one loop pass, leaves in
a single `write`/`writelines` call, i.e. one syscall instead of one per frame.

Closing (RFC 6455 section 7): when both close frames have crossed the server closes TCP
first (section 7.1.1); after a protocol failure (section 7.1.7) it half-closes and drains
until EOF; a close it initiated waits `close_timeout` for the peer's answer, then aborts.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time

from gateway_ext import WebSocketStream
from gateway_ext.constants import ANSWERED, BODY, CLOSED, HEAD, OPEN

from gateway.errors import HandshakeRejected
from gateway.ws.handshake import Request, accept, content_length, parse_request, reject, response, validate_upgrade
from gateway.ops.logs import LifecycleLog
from gateway.ws.protocol import ServerProtocol

log = logging.getLogger("gateway.server.connection")
lifecycle = LifecycleLog("gateway.server.connection")   # open/close/reject lines, once per connection


def _http_handler(site, path: str):
    """The HTTP route for `path`: an exact route, else the first matching prefix route (/api/)."""
    handler = site.http_routes.get(path)
    if handler is None:
        for prefix, candidate in site.http_prefixes.items():
            if path.startswith(prefix):
                return candidate
    return handler


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class Connection(WebSocketStream, asyncio.Protocol):
    """One client socket. `gateway` is the process-wide Gateway (see server.py).

    The per-read and per-write path of an open connection -- data_received, send,
    send_frame, send_shared, flush -- and the fields it uses (transport, ws, endpoint,
    limiter, phase, last_seen, paused; also the flags pinged and _closing) are inherited
    from gateway_ext's WebSocketStream (compiled, with a pure-Python twin); this class
    supplies its hooks `_receive_http` and `_after_close_sent`.
    """

    __slots__ = (
        "gateway", "id", "peer", "request", "_head", "_body_needed", "_timer",
        "principal", "state", "_client_ip",
    )

    def __init__(self, gateway) -> None:
        super().__init__(gateway.stats, gateway.corker)
        self.gateway = gateway
        self.id = 0
        self.peer = ""
        self.request: Request | None = None
        self._head = bytearray()
        self._body_needed = 0
        self._timer = None
        self.principal = None     # who this is (set by auth at the handshake)
        self.state = None         # per-endpoint state (e.g. the rooms session)
        self._client_ip = ""      # see client_ip; None: the host part of `peer`

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        gw = self.gateway
        self.id = gw.next_connection_id()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        gw.stats.accepted += 1
        # Until the upgrade, last_seen holds the accept time (for the handshake latency metric;
        # perf_counter because uvloop's loop.time() moves in 1 ms steps).
        self.last_seen = time.perf_counter()
        # Slowloris guard: the request head (and body) must arrive within the timeout. No
        # timer per client: the gateway's sweep expires them in accept order (server.py).
        gw.handshaking[self] = gw.loop.time()

    def eof_received(self):
        if self.ws is not None:
            self.ws.receive_eof()
        return False  # let the transport close

    def connection_lost(self, exc) -> None:
        if self.phase == CLOSED:
            return
        previous, self.phase = self.phase, CLOSED
        if previous != OPEN:
            self.gateway.handshaking.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gw = self.gateway
        if previous == OPEN and self.ws is None:   # an event stream (sse.py)
            gw.connection_closed(self)
            try:
                self.endpoint.on_close(self)
            except Exception:  # a bug in an endpoint must not leak the connection
                log.exception("endpoint on_close failed", extra={"conn": self.id})
            lifecycle.info("connection closed", {
                "event": "close", "conn": self.id, "peer": self.peer, "client": self.client_ip, "user": self.user,
                "path": "/sse", "reason": str(exc) if exc else ""})
        elif previous == OPEN:
            ws = self.ws
            ws.receive_eof()
            gw.connection_closed(self)
            try:
                self.endpoint.on_close(self)
            except Exception:  # a bug in an endpoint must not leak the connection
                log.exception("endpoint on_close failed", extra={"conn": self.id})
            # The connection's one INFO line (the open line is DEBUG): who, from where, which
            # endpoint, compressed or not, and how it ended.
            lifecycle.info("connection closed", {
                "event": "close", "conn": self.id, "peer": self.peer, "client": self.client_ip, "user": self.user,
                "path": gw.route_of(self.endpoint), "compressed": ws.deflate is not None,
                "code": ws.close_code, "reason": ws.close_reason or (str(exc) if exc else ""),
            })

    # pause_writing / resume_writing (asyncio's flow control) and the endpoint's
    # pause_reading / resume_reading are the base class's: a transport over its high-water
    # mark is not read, whatever kind of write filled it (docs/security.md, "Memory model").

    # -- output ---------------------------------------------------------------------------

    def set_write_buffer_limits(self, high: int, sndbuf: int = 0) -> None:
        """Pause (pause_writing -> `paused`) above `high` buffered bytes, resume below a quarter;
        `sndbuf` > 0 also caps the kernel's send buffer (SO_SNDBUF), which stops its autotuning."""
        if sndbuf > 0:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                except OSError as exc:  # pragma: no cover - not a TCP socket (e.g. a test double)
                    log.debug("cannot set SO_SNDBUF", extra={"conn": self.id, "error": str(exc)})
        self.transport.set_write_buffer_limits(high=high, low=high // 4)

    def _after_close_sent(self) -> None:
        if not self._closing:
            self._start_closing()
        elif self.ws.close_received:
            self._finish_close()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (section 7.1.2) and flush it now."""
        if self.ws is None:
            if self.phase == OPEN and self.transport is not None:
                self.transport.close()   # an event stream: end it after what is buffered (FIN)
            else:
                self.abort()
            return
        self.ws.close(code, reason)
        self.flush()

    def abort(self) -> None:
        if self.transport is not None and self.phase != CLOSED:
            self.transport.abort()

    def _start_closing(self) -> None:
        self._closing = True
        ws = self.ws
        if ws.close_received:
            self._finish_close()
            return
        if ws.failed and self.transport.can_write_eof():
            # Section 7.1.7: fail the connection. Half-close so our close frame is not lost
            # to a reset, and drain whatever the peer still sends until its EOF.
            self.transport.write_eof()
        self._timer = self.gateway.loop.call_later(self.gateway.config.close_timeout, self.abort)

    def _finish_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.close()  # flushes the close frame, then FIN (section 7.1.1)

    @property
    def user(self) -> str:
        return getattr(self.principal, "user", "") or ""

    @property
    def client_ip(self) -> str:
        """The client's address (behind trusted proxies: theirs, not the proxy's)."""
        ip = self._client_ip
        return self.peer.rpartition(":")[0] if ip is None else ip

    @client_ip.setter
    def client_ip(self, ip: str) -> None:
        # Without a proxy it is the host part of `peer`: derive it instead of keeping a
        # second string per connection (~60 bytes of each idle connection).
        self._client_ip = None if ip and self.peer.rpartition(":")[0] == ip else ip

    # -- HTTP phase -----------------------------------------------------------------------

    def handshake_timeout(self) -> None:
        """Called by the gateway's sweep when the request did not arrive in time."""
        if self.phase in (HEAD, BODY):
            self.gateway.stats.rejected["timeout"] += 1
            lifecycle.info("handshake timeout", {"event": "reject", "conn": self.id, "peer": self.peer, "status": 408})
            self._respond(response(408, b"request not received in time\n"))

    def _receive_http(self, data: bytes) -> None:
        if self.phase == BODY:
            self._head += data
            if len(self._head) >= self._body_needed:
                self._dispatch_http(bytes(self._head[:self._body_needed]))
            return
        if self.phase != HEAD:
            return
        head = self._head
        head += data
        try:
            request = parse_request(head, self.peer)
            if request is None:
                return
            self.request = request
            rest = bytes(head[request.head_bytes:])
            self._head = bytearray()
            self._route(request, rest)
        except HandshakeRejected as exc:
            self._reject(exc)
        except Exception:
            self._unexpected("request")

    def _route(self, request: Request, rest: bytes) -> None:
        gw = self.gateway
        endpoint = gw.endpoints.get(request.path)
        if endpoint is not None:
            self._upgrade(request, endpoint, rest)
            return
        stream = gw.stream_routes.get(request.path)
        if stream is not None:
            self._stream(request, stream)
            return
        if _http_handler(gw, request.path) is None:
            # A browser asks for /favicon.ico by itself (the demo page, a dashboard): nothing an
            # operator can act on, so not an INFO line per page load.
            raise HandshakeRejected(404, f"no endpoint at {request.path[:100]}", quiet=request.path == "/favicon.ico")
        if "transfer-encoding" in request.headers:
            # parse_request refused every coding but chunked (501) and TE with Content-Length (400).
            raise HandshakeRejected(411, "chunked request bodies are not supported; send Content-Length")
        length = content_length(request)
        if length > gw.config.max_message_bytes:
            raise HandshakeRejected(413, f"request body larger than {gw.config.max_message_bytes} bytes")
        if len(rest) >= length:
            self._dispatch_http(rest[:length])
        else:
            self.phase = BODY
            self._body_needed = length
            self._head = bytearray(rest)

    def _dispatch_http(self, body: bytes) -> None:
        self.phase = ANSWERED  # answered; ignore anything else on this socket
        self._head = bytearray()
        request = self.request
        try:
            result = _http_handler(self.gateway, request.path)(request, body)
        except HandshakeRejected as exc:
            self._reject(exc)
            return
        except Exception:
            self._unexpected("route")
            return
        if asyncio.iscoroutine(result):
            task = self.gateway.loop.create_task(result)
            task.add_done_callback(self._http_done)
        else:
            self._respond(result)

    def _http_done(self, task: asyncio.Task) -> None:
        try:
            self._respond(task.result())
        except HandshakeRejected as exc:
            self._reject(exc)
        except Exception:
            self._unexpected("route")

    def _unexpected(self, stage: str) -> None:
        """An exception nobody anticipated before the 101: answer 400, log it rate-limited.

        Most likely an odd request meeting a gap in validation: the client gets a 400, the log
        one WARNING line per interval at most (a client must not be able to flood it, nor
        cause a traceback per request), each traceback goes to DEBUG; counted as http_errors.
        """
        gw = self.gateway
        gw.stats.http_errors += 1
        request = self.request
        gw.http_error_log.warning("unexpected error in the HTTP phase; answered 400", {
            "event": "http_error", "conn": self.id, "peer": self.peer, "stage": stage,
            "path": request.path[:100] if request is not None else ""})
        self._reject(HandshakeRejected(400, "bad request"))

    def _upgrade(self, request: Request, endpoint, rest: bytes) -> None:
        gw = self.gateway
        if request.method == "GET" and "websocket" not in request.tokens("upgrade"):
            # A plain GET of a WebSocket endpoint answers what the upgrade would (401/403 for
            # the token, 429, 503) before its 426: a browser cannot read the status of a failed
            # handshake (the WebSocket API reports close 1006 only), so the JS SDK asks this
            # way after a close before open (docs/clients.md). No connection is opened.
            gw.admit(self, request)
        key = validate_upgrade(request)
        if gw.open_connections >= gw.config.max_connections:
            raise HandshakeRejected(503, "server is at its connection limit; retry later", {"Retry-After": "5"})
        extra_headers = gw.admit(self, request)   # auth, origin, per-IP limits (may raise)
        if gw.async_admission:
            # A check that asks another process (the connect proxy, a cluster-wide cap): stop
            # reading until it answers; the 101 (or the refusal) follows from its task.
            self.transport.pause_reading()
            task = gw.loop.create_task(self._admit_async(request, endpoint, rest, key, extra_headers))
            task.add_done_callback(_retrieve)
            return
        self._open(request, endpoint, rest, key, extra_headers)

    async def _admit_async(self, request: Request, endpoint, rest: bytes, key: str, extra_headers: dict) -> None:
        gw = self.gateway
        admitted = []
        try:
            for check in gw.async_admission:
                await check.admit(self)
                admitted.append(check)
        except HandshakeRejected as exc:
            for check in admitted:
                check.abandon(self)
            if self.phase == HEAD:
                self._reject(exc)
            return
        except Exception:
            for check in admitted:
                check.abandon(self)
            log.exception("internal error in async admission", extra={"conn": self.id, "peer": self.peer})
            if self.phase == HEAD:
                self._reject(HandshakeRejected(500, "internal error"))
            return
        if self.phase != HEAD or self.transport is None or self.transport.is_closing():
            for check in admitted:      # it went away (or timed out) while we asked
                check.abandon(self)
            return
        if gw.draining:                 # the drain began while we asked
            for check in admitted:
                check.abandon(self)
            self._reject(HandshakeRejected(503, "server is shutting down; reconnect to another instance",
                                           {"Retry-After": "1"}))
            return
        self.transport.resume_reading()
        try:
            self._open(request, endpoint, rest, key, extra_headers)
        except HandshakeRejected as exc:
            for check in admitted:
                check.abandon(self)
            self._reject(exc)

    def _open(self, request: Request, endpoint, rest: bytes, key: str, extra_headers: dict) -> None:
        gw = self.gateway
        subprotocol = endpoint.select_subprotocol(request)
        ws, extensions = self._negotiate_extensions(request)
        self.transport.write(accept(key, subprotocol, extensions, extra_headers))
        gw.handshaking.pop(self, None)
        self.ws = ws
        self.endpoint = endpoint
        self.phase = OPEN
        # Every endpoint's writes count against the same high-water mark (the rooms endpoint
        # sets it again with its SO_SNDBUF): past it the client is not read until it drains.
        self.transport.set_write_buffer_limits(high=gw.config.write_buffer_high_bytes,
                                               low=gw.config.write_buffer_high_bytes // 4)
        # Nothing reads the request head after the 101 (auth keeps what it needs in
        # `principal`): its headers dict and strings are ~1 KB per idle connection.
        self.request = None
        self._head = None
        gw.stats.handshake.observe(time.perf_counter() - self.last_seen)
        self.last_seen = gw.clock
        try:
            gw.connection_opened(self)
            if lifecycle.enabled(logging.DEBUG):   # one INFO line per connection: the close
                lifecycle.debug("connection opened", {
                    "event": "open", "conn": self.id, "peer": self.peer, "client": self.client_ip, "user": self.user,
                    "path": request.path, "subprotocol": subprotocol or "", "extensions": extensions or "",
                })
            endpoint.on_open(self, subprotocol)
        except Exception:
            # The 101 is on the wire: from here a failure is a WebSocket close (1011, RFC 6455
            # section 7.4.1), never an HTTP response written into the upgraded stream.
            log.exception("internal error while opening a connection", extra={"conn": self.id, "peer": self.peer})
            self.close(1011, "internal error")
            return
        if rest:
            self.data_received(rest)
        else:
            self.flush()

    def _stream(self, request: Request, endpoint) -> None:
        """A long-lived HTTP response (Server-Sent Events, sse.py), admitted like an upgrade:
        the connection cap, the admission hooks (Origin, per-IP, token), then the endpoint's
        own checks; from then on it is an open connection (drain, keepalive, metrics)."""
        gw = self.gateway
        if gw.open_connections >= gw.config.max_connections:
            raise HandshakeRejected(503, "server is at its connection limit; retry later", {"Retry-After": "5"})
        gw.admit(self, request)
        head = endpoint.prepare(self, request)
        self.transport.write(head)
        gw.handshaking.pop(self, None)
        self.endpoint = endpoint
        self.phase = OPEN
        self.request = None
        self._head = None
        self.last_seen = gw.clock
        try:
            gw.connection_opened(self)
            endpoint.on_open(self)
        except Exception:
            log.exception("internal error while opening a stream", extra={"conn": self.id, "peer": self.peer})
            self.abort()

    def _negotiate_extensions(self, request: Request):
        """The protocol object and the Sec-WebSocket-Extensions answer (RFC 7692 section 5)."""
        gw = self.gateway
        offers = request.header("sec-websocket-extensions")
        deflate = gw.deflate
        if offers and deflate is not None:
            codec, answer, declined = deflate.negotiate(offers, gw.config.max_message_bytes)
            if declined:  # RFC 7692 section 5: an invalid offer is declined, not an error
                log.info("permessage-deflate offer declined", extra={
                    "event": "extension_declined", "conn": self.id, "peer": self.peer, "reason": "; ".join(declined)})
            if codec is not None:
                return ServerProtocol(gw.config.max_message_bytes, codec, gw.config.max_fragments), answer
        return ServerProtocol(gw.config.max_message_bytes, None, gw.config.max_fragments), None

    def _reject(self, exc: HandshakeRejected) -> None:
        stats = self.gateway.stats
        stats.rejected[str(exc.status)] += 1
        if exc.quiet:
            lifecycle.debug("request rejected", {"event": "reject", "conn": self.id, "peer": self.peer,
                                                 "status": exc.status, "reason": exc.reason})
        else:
            lifecycle.info("request rejected", {
                "event": "reject", "conn": self.id, "peer": self.peer, "client": self.client_ip, "status": exc.status,
                "reason": exc.reason,
            })
        self._respond(reject(exc))

    def _respond(self, data: bytes) -> None:
        self.gateway.handshaking.pop(self, None)
        self.phase = ANSWERED
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()
