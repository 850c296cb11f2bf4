"""The process: listeners, the clock/keepalive sweep, admission, shutdown.

One `Gateway` per process owns the listening socket(s), the set of open connections, the
endpoints (`/ws`, `/echo`), the plain HTTP routes (`/healthz`, `/readyz`, ...) and the Corker.
Timers are shared: one periodic sweep updates a coarse clock, pings connections that have
been silent for `ping_interval` and aborts those still silent `ping_timeout` later -- one
timer for the whole process instead of one per connection (memory at 50k connections).
Only this module and connection.py touch sockets and transports.

Graceful shutdown (SIGTERM/SIGINT: close 1001; SIGUSR2: close 1012 "service restart"):
  1. not ready: /readyz answers 503 and new upgrades get 503 + Retry-After while the listener
     stays open, so load balancers (nginx `proxy_next_upstream http_503`) move on;
  2. close frames go out in batches spread over `drain_window`, so clients do not all
     reconnect to the next instance in the same instant;
  3. the listener closes; the gateway waits for the close handshakes until `drain_timeout`
     (counted from the signal), aborts the stragglers, runs the shutdown hooks and exits 0.
A second SIGTERM/SIGINT exits at once (status 1).

SIGHUP reloads the configuration (file + environment + the original flags): the fields in
`config.RELOADABLE` apply to new connections and timers at once (log level/format, limits,
timeouts, drain settings, and TLS certificates re-read from the same paths -- certificate
rotation without dropping anyone); host/port/workers/broker/metrics listener changes are
logged as needing a restart and ignored. Feature sections (`extra`) are handed to the
`on_reload` hooks; a feature without one keeps what it read at start.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import itertools
import logging
import os
import signal
import socket

from gateway_ext import CloseCode, Corker, StreamStats

from gateway.ops import logs, systemd
from gateway.config import RELOADABLE, Config
from gateway.server.tls import make_ssl_context
from gateway.server.connection import Connection
from gateway.ws.deflate import Deflate
from gateway.server.echo import EchoEndpoint
from gateway.errors import ConfigError, GatewayCloseCode, HandshakeRejected, StartupError
from gateway.security.limits import OperatorOnly
from gateway.ws.handshake import response
from gateway.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.ops.metrics import LatencyHistogram, Metrics

log = logging.getLogger("gateway.server.process")

PING_SLICE = 512   # keepalive pings written per event-loop pass (see Gateway._send_pings)

# Close codes counted by their own label value: those RFC 6455 section 7.4.1 and the IANA
# registry define, and the gateway's 4000-4004. A client may send any of 3000-4999 (section
# 7.4.2): as labels they would make up to 2,000 series, so the rest count as "other".
KNOWN_CLOSE_CODES = frozenset(int(c) for c in CloseCode) | frozenset(int(c) for c in GatewayCloseCode)


class Stats(StreamStats):
    """Counters read by metrics at scrape time. The per-read ones (messages_in, frames_out,
    bytes_in, bytes_out) and the coarse clock `now` live in the compiled StreamStats base,
    so the read path updates them without attribute lookups."""

    __slots__ = ("accepted", "opened", "closed", "rejected", "keepalive_timeouts", "close_codes", "handshake",
                 "http_errors")

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 0
        self.opened = 0
        self.closed = 0
        self.keepalive_timeouts = 0
        self.http_errors = 0      # unexpected exceptions before the 101, answered 400 (connection.py)
        self.rejected: collections.Counter = collections.Counter()
        self.close_codes: collections.Counter = collections.Counter()   # once per connection, not per message
        self.handshake = LatencyHistogram()                             # accept -> 101, once per connection


class Gateway:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.stats = Stats()
        self.corker = Corker(self.loop)
        self.deflate = Deflate.from_config(config)   # permessage-deflate policy, None when off
        self.connections: set[Connection] = set()
        # Connections still in the HTTP phase -> accept time (loop clock), in accept order:
        # the sweep expires the oldest ones (handshake_timeout) without a timer per client.
        self.handshaking: dict[Connection, float] = {}
        self.endpoints: dict[str, object] = {}
        if config.echo:
            self.endpoints["/echo"] = EchoEndpoint()
        self.http_routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        # Long-lived HTTP responses (Server-Sent Events): path -> endpoint with prepare/on_open/...
        self.stream_routes: dict[str, object] = {}
        # Routes by path prefix (the server API: /api/<method>), tried after the exact ones.
        self.http_prefixes: dict = {}
        self.listed_routes: list = []      # paths a prefix route serves, for the listening line
        self.api_routes: dict = {}         # prefix routes of the private api_port listener
        self._api_server: asyncio.AbstractServer | None = None
        self.metrics = Metrics(self, self.loop)
        # Unexpected exceptions before the 101 (connection.py): one WARNING per 10 s at most.
        self.http_error_log = logs.RateLimitedLog(logging.getLogger("gateway.server.connection"), interval=10.0)
        # Where the metrics table (gateway/ops/metrics.py METRICS) reads its values: features
        # register their stats here by source name ({name: object, dict or callable}).
        self.metric_sources: dict = {}
        if self.deflate is not None:
            self.metric_sources["deflate"] = self.deflate   # permessage-deflate counters
        if not config.metrics_port:
            self.http_routes["/metrics"] = self._metrics
        # /metrics on the main port: loopback and trusted proxies only, unless metrics_public.
        self._metrics_access = OperatorOnly(config.trusted_proxies, config.metrics_public)
        # Admission hooks run before the 101: (conn, request) -> extra headers or raise HandshakeRejected.
        self.admission_hooks: list = []
        # Checks that must ask another process (the connect proxy, a cluster-wide cap) before
        # the 101: objects with `async admit(conn)` (raise HandshakeRejected) and
        # `abandon(conn)` (the client went away while waiting). Empty by default: the upgrade
        # then stays synchronous.
        self.async_admission: list = []
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
        self.on_reload: list = []     # callables (old_config, new_config) run after a SIGHUP reload
        self.reload_config = None     # () -> Config: re-reads file + env + original flags (set by app)
        self.draining = False
        self._all_closed: asyncio.Event | None = None
        self._ssl = None
        self.stats.now = self.loop.time()
        self.ready = False
        self._ids = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_ping_scan = 0.0
        self._stopping: asyncio.Future | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self.worker_index = 0   # set by app: worker i of `workers` serves metrics on metrics_port + i
        self.sockets: list[socket.socket] = []

    # -- bookkeeping used by Connection -------------------------------------------------

    def next_connection_id(self) -> int:
        return next(self._ids)

    def set_worker(self, index: int, count: int) -> None:
        """This process is worker `index` of `count`: its private metrics listener is
        metrics_port + index, and its connection ids are index+1, index+1+count, ... so ids
        are unique across the workers sharing a port (and id % count tells the worker)."""
        self.worker_index = index
        self._ids = itertools.count(index + 1, max(1, count))

    def routes(self) -> list[str]:
        """Every path this listener answers: WebSocket endpoints, HTTP routes and the paths
        served by prefix routes (the server API's methods, `listed_routes`)."""
        return sorted(set(self.endpoints) | set(self.http_routes) | set(self.listed_routes))

    @property
    def clock(self) -> float:
        """Loop time of the last sweep (the per-read path reads it as `stats.now`)."""
        return self.stats.now

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def route_of(self, endpoint) -> str:
        """The path `endpoint` is served at (for the close log line; a handful of endpoints)."""
        for path, candidate in self.endpoints.items():
            if candidate is endpoint:
                return path
        return ""

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
        ws = conn.ws
        if ws is not None:
            code = ws.close_code
            self.stats.close_codes[code if code in KNOWN_CLOSE_CODES else "other"] += 1
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    def admit(self, conn: Connection, request) -> dict:
        if self.draining:
            # The listener stays open during the drain so health checks see 503; new clients go elsewhere.
            raise HandshakeRejected(503, "server is shutting down; reconnect to another instance",
                                    {"Retry-After": "1"})
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
        results = [check() for check in self.readiness_checks]
        problems = [detail for ok, detail in results if not ok]
        if not self.ready:
            problems.insert(0, "not accepting connections")
        if problems:
            return response(503, ("; ".join(problems) + "\n").encode())
        # A passing check may still report a partial outage (a Redis Cluster shard down): 200, said.
        notes = [detail for ok, detail in results if detail]
        return response(200, ("; ".join(["ready", *notes]) + "\n").encode())

    def _metrics(self, request, body):
        """/metrics on the main port. Its numbers map the deployment (connections, rooms, broker
        state, versions): only the host itself and trusted proxies read it unless metrics_public."""
        headers = request.headers
        if not self._metrics_access.allows(request.peer, headers.get("x-forwarded-for", ""),
                                           headers.get("x-real-ip", "")):
            raise HandshakeRejected(403, "/metrics answers loopback and trusted_proxies only "
                                         "(see metrics_public, metrics_port)")
        return self._render_metrics(request, body)

    def _render_metrics(self, request, body):
        return response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    # -- life cycle -----------------------------------------------------------------------

    def _make_socket(self) -> socket.socket:
        c = self.config
        # SO_REUSEPORT only where sharing the port is the plan: the workers of one `--workers N`
        # (the kernel balances accepts over their sockets) or an explicit `reuse_port`. Set
        # always, a second instance started by mistake silently took a share of the clients.
        return listen_socket(c.host, c.port, c.backlog, reuse_port=c.workers > 1 or c.reuse_port)

    async def start(self, sock: socket.socket | None = None) -> None:
        sock = sock or self._make_socket()
        self.sockets.append(sock)
        if self._ssl is None:
            self._ssl = make_ssl_context(self.config)
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": self.config.handshake_timeout} if self._ssl else {}
        server = await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=self.config.backlog, **tls)
        self._servers.append(server)
        if self.config.metrics_port and self._metrics_server is None:
            await self._start_metrics_listener()
        if getattr(self.config, "api_port", 0) and self._api_server is None and self.api_routes:
            await self._start_api_listener()
        self._schedule_sweep()
        self.metrics.start()
        self.ready = True

    async def _start_metrics_listener(self) -> None:
        """/metrics, /healthz, /readyz on a private port; it stays open until the very end of a drain."""
        # The private listener is where the operator put it (metrics_host): no peer check.
        site = _PrivateSite(self, {"/metrics": self._render_metrics, "/healthz": self._healthz,
                                   "/readyz": self._readyz})
        # Worker i listens on metrics_port + i: nothing shares this port, so no SO_REUSEPORT.
        sock = listen_socket(self.config.metrics_host, self.config.metrics_port + self.worker_index,
                             self.config.backlog, reuse_port=False, what="metrics_port")
        self._metrics_server = await self.loop.create_server(lambda: Connection(site), sock=sock)

    async def _start_api_listener(self) -> None:
        """The server API (/api/*) on a private port only. Workers share it like the main port
        (SO_REUSEPORT only then): any process can serve any method, the cross-process ones go
        over the control channel."""
        c = self.config
        site = _PrivateSite(self, {"/healthz": self._healthz}, dict(self.api_routes))
        sock = listen_socket(c.api_host, c.api_port, c.backlog, reuse_port=c.workers > 1 or c.reuse_port,
                             what="api_port")
        self._api_server = await self.loop.create_server(lambda: Connection(site), sock=sock)

    @property
    def api_port(self) -> int | None:
        if self._api_server is None:
            return None
        return self._api_server.sockets[0].getsockname()[1]

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None:
            return None
        return self._metrics_server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    def _sweep_interval(self) -> float:
        c = self.config
        candidates = [1.0, c.ping_timeout / 4, c.handshake_timeout / 4]
        if c.ping_interval > 0:
            candidates.append(c.ping_interval / 4)
        return max(0.05, min(candidates))

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        now = self.stats.now = self.loop.time()
        c = self.config
        pending = self.handshaking
        if pending:
            expired = now - c.handshake_timeout
            while pending:
                conn = next(iter(pending))
                if pending[conn] > expired:
                    break       # accept order: every later one is younger
                del pending[conn]
                conn.handshake_timeout()
        if c.ping_interval > 0 and now >= self._next_ping_scan:
            self._next_ping_scan = now + min(c.ping_interval, c.ping_timeout) / 4
            interval, deadline = c.ping_interval, c.ping_interval + c.ping_timeout
            due = []
            for conn in list(self.connections):
                idle = now - conn.last_seen
                if conn.ws is None:          # an event stream: a comment keeps proxies from timing it out
                    if idle >= interval:
                        conn.last_seen = now
                        conn.endpoint.heartbeat(conn)
                    continue
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
                    due.append(conn)
            if due:
                self._send_pings(due, 0)
        for hook in self.sweep_hooks:
            try:
                hook(now)
            except Exception:  # a failing hook must not stop keepalive for everyone
                log.exception("sweep hook failed")
        self._schedule_sweep()

    def _send_pings(self, due: list, start: int) -> None:
        """Ping `due[start:]`, PING_SLICE per event-loop pass.

        Connections opened together fall due together: 19,000 pings written in one pass
        would hold every fan-out and handshake back for tens of milliseconds.
        """
        end = start + PING_SLICE
        for conn in due[start:end]:
            conn.ws.ping()       # no-op once a close frame was sent; flush() skips closed ones
            conn.flush()
        if end < len(due):
            self.loop.call_soon(self._send_pings, due, end)

    async def stop_accepting(self) -> None:
        self.ready = False
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down", drain: float | None = None,
                       timeout: float | None = None) -> None:
        """Graceful stop (see the module docstring): not ready, spread the closes, stop accepting, wait.

        `drain` (default `config.drain_window`) spreads the close frames over that many seconds;
        `timeout` (default `config.drain_timeout`) bounds the whole call. The spread is capped
        at half the timeout so the last clients still have time to answer.
        """
        config = self.config
        timeout = config.drain_timeout if timeout is None else timeout
        drain = config.drain_window if drain is None else drain
        drain = max(0.0, min(drain, timeout / 2))
        deadline = self.loop.time() + timeout
        self.ready = False
        self.draining = True
        self._all_closed = asyncio.Event()
        conns = [conn for conn in self.connections]
        if conns:
            log.info("draining", extra={"event": "drain", "connections": len(conns), "code": code,
                                        "drain_window": drain})
            batches = max(1, min(len(conns), int(drain / 0.05)))   # a batch at most every 50 ms
            per_batch = -(-len(conns) // batches)
            start = self.loop.time()
            for n, i in enumerate(range(0, len(conns), per_batch)):
                for conn in conns[i:i + per_batch]:
                    conn.close(code, reason)
                if i + per_batch < len(conns):
                    # Sleep until this batch's slot rather than a fixed step, so slow batches don't stretch the window.
                    await asyncio.sleep(max(0.0, start + drain * (n + 1) / batches - self.loop.time()))
        await self.stop_accepting()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                log.warning("drain timeout: aborting connections", extra={
                    "event": "drain_timeout", "connections": len(self.connections)})
            for conn in list(self.connections):
                conn.abort()
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.metrics.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._api_server is not None:
            self._api_server.close()
            self._api_server = None

    def reload(self) -> set[str]:
        """SIGHUP: apply the reloadable part of a fresh configuration; return the fields applied."""
        if self.reload_config is None:
            log.warning("SIGHUP: no configuration source to reload", extra={"event": "reload"})
            return set()
        try:
            new = self.reload_config()
        except ConfigError as exc:
            for error in exc.errors:
                log.error("SIGHUP: configuration rejected, keeping the running one",
                          extra={"event": "reload_error", "error": error})
            return set()
        old = self.config
        # Every field is compared: anything outside RELOADABLE (sockets, workers, broker, auth keys
        # and other settings features read once at start) is reported as needing a restart.
        changed = {f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)}
        needs_restart = changed - RELOADABLE
        if bool(old.certfile) != bool(new.certfile):
            needs_restart |= {"certfile", "keyfile"}   # turning TLS on/off changes the listener
        apply = {f: getattr(new, f) for f in changed - needs_restart}
        if self._ssl is not None and "certfile" not in needs_restart:
            try:
                # Same SSLContext object, new certificate: new handshakes use it at once.
                self._ssl.load_cert_chain(new.certfile, new.keyfile)
                apply.setdefault("certfile", new.certfile)
                apply.setdefault("keyfile", new.keyfile)
            except (OSError, ValueError) as exc:
                log.error("SIGHUP: cannot load the new certificate, keeping the old one",
                          extra={"event": "reload_error", "error": str(exc)})
                apply.pop("certfile", None)
                apply.pop("keyfile", None)
        self.config = old.replace(**apply)
        try:
            self._metrics_access = OperatorOnly(self.config.trusted_proxies, self.config.metrics_public)
        except ConfigError as exc:   # a bad trusted_proxies entry: keep the running rule (defences says why)
            log.error("SIGHUP: /metrics access rule not changed", extra={"event": "reload_error", "error": str(exc)})
        if {"log_level", "log_format"} & apply.keys():
            logs.setup(self.config.log_level, self.config.log_format)
        for hook in self.on_reload:
            try:
                hook(old, self.config)
            except Exception:
                log.exception("reload hook failed")
        log.info("configuration reloaded", extra={"event": "reload", "applied": sorted(apply),
                                                  "needs_restart": sorted(needs_restart)})
        if needs_restart:
            log.warning("SIGHUP: these changes need a restart and were ignored",
                        extra={"event": "reload", "fields": sorted(needs_restart)})
        return set(apply)

    async def serve_until_signalled(self) -> int:
        """Run until SIGTERM/SIGINT (close 1001) or SIGUSR2 (close 1012, restart); SIGHUP reloads.

        A second SIGTERM/SIGINT during the drain exits at once with status 1.
        """
        stop: asyncio.Future = self.loop.create_future()
        codes = {signal.SIGTERM: (1001, "server shutting down"), signal.SIGINT: (1001, "server shutting down"),
                 signal.SIGUSR2: (1012, "service restart")}

        def on_signal(sig: int) -> None:
            if stop.done():
                log.warning("second signal: exiting now", extra={"event": "shutdown", "signal": sig,
                                                                 "connections": len(self.connections)})
                logging.shutdown()
                os._exit(1)
            stop.set_result(sig)

        def on_hup() -> None:
            if stop.done():
                return
            systemd.notify("RELOADING=1")
            self.reload()
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

        for sig in codes:
            self.loop.add_signal_handler(sig, on_signal, sig)
        self.loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            sig = await stop
            code, reason = codes[sig]
            systemd.notify("STOPPING=1", f"STATUS=draining {len(self.connections)} connections")
            log.info("shutting down", extra={"event": "shutdown", "signal": signal.Signals(sig).name,
                                             "connections": len(self.connections), "code": code})
            await self.shutdown(code, reason)
            log.info("stopped", extra={"event": "stopped", "connections": len(self.connections)})
        finally:
            for sig in (*codes, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
        return 0

    def status_line(self) -> str:
        return f"{len(self.connections)} connections on port {self.port}"


def listen_socket(host: str, port: int, backlog: int, reuse_port: bool = False, what: str = "port") -> socket.socket:
    """A listening TCP socket, or a StartupError saying in one line what failed and what to do.

    SO_REUSEADDR always (restart while old connections sit in TIME_WAIT); SO_REUSEPORT only
    when asked. Without it, binding a port another process listens on fails with EADDRINUSE
    -- which is the point: a second instance must not start silently.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise StartupError("workers > 1 and reuse_port need SO_REUSEPORT, which this system lacks")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(_listen_error(what, host, port, exc)) from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def ensure_port_free(host: str, port: int, what: str = "port") -> None:
    """Raise StartupError if something listens on host:port already (checked by binding without
    SO_REUSEPORT, then letting go). Run by app.run before anything starts: before forking
    workers, whose own sockets share the port and so could not tell another instance from a
    sibling, and before a single process logs anything, so the failure is the last line."""
    if port:
        listen_socket(host, port, 1, what=what).close()


def _listen_error(what: str, host: str, port: int, exc: OSError) -> str:
    where = f"{what} {port} on {host}"
    flag = "--" + what.replace("_", "-")
    if exc.errno == errno.EADDRINUSE:
        return (f"{where} is already in use (another ws-gateway or another program listens there); "
                f"stop it or choose another {flag} (several processes on one port: --workers N or --reuse-port)")
    if exc.errno == errno.EACCES:
        return (f"{where}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE: "
                f"use a {flag} of 1024 or more behind nginx)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{where}: {host} is not an address of this machine (use 127.0.0.1 for this machine only, "
                "0.0.0.0 for every IPv4 address or :: for IPv6)")
    if isinstance(exc, socket.gaierror):
        return f"{where}: cannot resolve {host!r} ({exc.strerror}; give an IP address or a host name)"
    return f"{where}: cannot listen: {exc.strerror or exc}"


class _PrivateSite:
    """What a Connection needs from its server, for the private metrics listener: HTTP routes only.

    Its own Stats, so scrapes do not count as client traffic; no endpoints, so no upgrades.
    """

    def __init__(self, gateway: Gateway, routes: dict, prefixes: dict | None = None) -> None:
        self.gateway = gateway
        self.loop = gateway.loop
        self.stats = Stats()
        self.endpoints: dict = {}
        self.http_routes = routes
        self.stream_routes: dict = {}
        self.http_prefixes = prefixes or {}
        self.corker = gateway.corker
        self.handshaking = gateway.handshaking   # expired by the gateway's sweep
        self.http_error_log = gateway.http_error_log
        self._ids = itertools.count(1)

    @property
    def config(self) -> Config:
        return self.gateway.config

    @property
    def clock(self) -> float:
        return self.gateway.clock

    def next_connection_id(self) -> int:
        return next(self._ids)
