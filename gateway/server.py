"""The process: listeners, the clock/keepalive sweep, admission, shutdown.

One `Gateway` per process owns the listening socket(s), the set of open connections, the
endpoints (`/ws`, `/echo`), the plain HTTP routes (`/healthz`, `/readyz`, ...) and the Corker.
Timers are shared: one periodic sweep updates a coarse clock, pings connections that have
been silent for `ping_interval` and aborts those still silent `ping_timeout` later -- one
timer for the whole process instead of one per connection (memory at 50k connections).
Only this module and connection.py touch sockets and transports.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import socket

from .config import Config
from .connection import Connection, Corker
from .echo import EchoEndpoint
from .handshake import response

log = logging.getLogger("gateway.server")


class Stats:
    """Hot-path counters: plain integers, read by metrics at scrape time."""

    __slots__ = ("accepted", "opened", "closed", "messages_in", "frames_out", "rejected", "keepalive_timeouts")

    def __init__(self) -> None:
        self.accepted = 0
        self.opened = 0
        self.closed = 0
        self.messages_in = 0
        self.frames_out = 0
        self.keepalive_timeouts = 0
        self.rejected: collections.Counter = collections.Counter()


class Gateway:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.stats = Stats()
        self.corker = Corker(self.loop)
        self.connections: set[Connection] = set()
        self.endpoints: dict[str, object] = {}
        if config.echo:
            self.endpoints["/echo"] = EchoEndpoint()
        self.http_routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        # Admission hooks run before the 101: (conn, request) -> extra headers or raise HandshakeRejected.
        self.admission_hooks: list = []
        # Per-connection life-cycle hooks (conn) -> None, e.g. per-IP counts and token expiry
        # (defences.py): open_hooks right after the 101, close_hooks when an open one is gone.
        self.open_hooks: list = []
        self.close_hooks: list = []
        # Called by every sweep tick with the loop time: process-wide timers (token expiry).
        self.sweep_hooks: list = []
        # (conn, token) -> Principal or raise auth.TokenRejected; set by defences when auth is on.
        self.refresh_token = None
        # Readiness checks: () -> (ok, detail); all must pass for /readyz to say 200.
        self.readiness_checks: list = []
        self.on_shutdown: list = []   # async callables run after clients are closed
        self.clock = self.loop.time()
        self.ready = False
        self._ids = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_ping_scan = 0.0
        self._stopping: asyncio.Future | None = None
        self.sockets: list[socket.socket] = []

    # -- bookkeeping used by Connection -------------------------------------------------

    def next_connection_id(self) -> int:
        return next(self._ids)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.stats.opened += 1
        for hook in self.open_hooks:
            hook(conn)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.stats.closed += 1
        for hook in self.close_hooks:
            hook(conn)

    def admit(self, conn: Connection, request) -> dict:
        headers: dict = {}
        for hook in self.admission_hooks:
            extra = hook(conn, request)
            if extra:
                headers.update(extra)
        return headers

    # -- HTTP routes ----------------------------------------------------------------------

    def _healthz(self, request, body):
        return response(200, b"ok\n")

    def _readyz(self, request, body):
        problems = [detail for ok, detail in (check() for check in self.readiness_checks) if not ok]
        if not self.ready:
            problems.insert(0, "not accepting connections")
        if problems:
            return response(503, ("; ".join(problems) + "\n").encode())
        return response(200, b"ready\n")

    # -- life cycle -----------------------------------------------------------------------

    def _make_socket(self) -> socket.socket:
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            # Several worker processes share one port; the kernel balances accepts.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, self.config.port))
        sock.listen(self.config.backlog)
        sock.setblocking(False)
        return sock

    async def start(self, sock: socket.socket | None = None) -> None:
        sock = sock or self._make_socket()
        self.sockets.append(sock)
        server = await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=self.config.backlog)
        self._servers.append(server)
        self._schedule_sweep()
        self.ready = True

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    def _sweep_interval(self) -> float:
        c = self.config
        candidates = [1.0, c.ping_timeout / 4]
        if c.ping_interval > 0:
            candidates.append(c.ping_interval / 4)
        return max(0.05, min(candidates))

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        now = self.clock = self.loop.time()
        c = self.config
        if c.ping_interval > 0 and now >= self._next_ping_scan:
            self._next_ping_scan = now + min(c.ping_interval, c.ping_timeout) / 4
            interval, deadline = c.ping_interval, c.ping_interval + c.ping_timeout
            for conn in list(self.connections):
                idle = now - conn.last_seen
                if idle < interval:
                    conn.pinged = False
                elif idle >= deadline and conn.pinged:
                    self.stats.keepalive_timeouts += 1
                    log.info("keepalive timeout", extra={"event": "keepalive_timeout", "conn": conn.id, "peer": conn.peer})
                    conn.ws.close(1011, "keepalive ping timeout")
                    conn.flush()
                    conn.abort()
                elif not conn.pinged:
                    conn.pinged = True
                    conn.ws.ping(b"")
                    conn.flush()
        for hook in self.sweep_hooks:
            try:
                hook(now)
            except Exception:  # a failing hook must not stop keepalive for everyone
                log.exception("sweep hook failed")
        self._schedule_sweep()

    async def stop_accepting(self) -> None:
        self.ready = False
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down", drain: float = 0.0,
                       timeout: float | None = None) -> None:
        """Graceful stop: not ready, stop accepting, close every client with `code`, wait.

        `drain` spreads the close frames over that many seconds so that clients do not all
        reconnect to the next instance at the same instant.
        """
        timeout = self.config.close_timeout if timeout is None else timeout
        await self.stop_accepting()
        conns = list(self.connections)
        if conns:
            batches = max(1, min(len(conns), int(drain / 0.05) if drain > 0 else 1))
            per_batch = -(-len(conns) // batches)
            for i in range(0, len(conns), per_batch):
                for conn in conns[i:i + per_batch]:
                    conn.close(code, reason)
                if drain > 0 and i + per_batch < len(conns):
                    await asyncio.sleep(drain / batches)
            deadline = self.loop.time() + timeout
            while self.connections and self.loop.time() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(self.connections):
                conn.abort()
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def serve_until_signalled(self) -> int:
        """Run until SIGTERM/SIGINT (close 1001) or SIGHUP (close 1012); a second signal exits at once."""
        stop: asyncio.Future = self.loop.create_future()
        signals = {signal.SIGTERM: 1001, signal.SIGINT: 1001}

        def on_signal(sig: int) -> None:
            if stop.done():
                log.warning("second signal: exiting now", extra={"event": "shutdown", "signal": sig})
                os._exit(1)
            stop.set_result(sig)

        for sig in signals:
            self.loop.add_signal_handler(sig, on_signal, sig)
        sig = await stop
        log.info("shutting down", extra={"event": "shutdown", "signal": signal.Signals(sig).name,
                                         "connections": len(self.connections)})
        await self.shutdown(signals[sig])
        return 0
