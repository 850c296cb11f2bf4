"""Assemble and run one gateway process (or N workers) from a Config.

This is where the parts meet: the Gateway (sockets), endpoints, broker, metrics. The CLI
calls `preflight(config)` (also what `check-config` runs) and `run(config)`; tests call
`start_gateway(config)` inside their own event loop.

Start-up failures are one line on stderr naming what failed and what to do, exit status 2
(`StartupError`; anything unexpected while starting is reported the same way), with the
traceback only at `--log-level debug`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import ssl
import sys
import traceback

from gateway.api import methods as api
from gateway.config import Config
from gateway.errors import ConfigError, StartupError
from gateway.ops import logs, systemd
from gateway.security import defences
from gateway.server.process import Gateway, ensure_port_free
from gateway.server.tls import make_ssl_context

log = logging.getLogger("gateway.app")


async def start_gateway(config: Config, sock=None, worker: int = 0) -> Gateway:
    """Build and start a Gateway in the running loop (used by `run` and by tests).

    `worker` is this process's index among `workers`: worker i serves its private metrics
    listener on metrics_port + i, so each worker can be scraped (the main port is shared).
    """
    gateway = Gateway(config, asyncio.get_running_loop())
    gateway.set_worker(worker, config.workers)
    # Origin, per-IP, token checks before the 101; expiry, refresh, rate limit after it.
    defences.install(gateway, config)
    api.install(gateway, config)          # POST /api/<method> (off unless api_keys are configured)
    hub = install_rooms(gateway, config)
    install_backend_hooks(gateway, config)
    tracker = install_presence(gateway, config, hub)
    # Concurrently: each connects to the broker (Redis) on its own connections.
    await asyncio.gather(hub.start(), tracker.start())
    if gateway.webhooks is not None:
        await gateway.webhooks.start()
    try:
        await gateway.control.load_revocations()
    except Exception as exc:  # noqa: BLE001 - Redis down at start: loaded when it connects
        log.warning("revocations not loaded yet", extra={"event": "revocations_error", "error": str(exc)[:200]})
    await gateway.start(sock)
    return gateway


def install_backend_hooks(gateway: Gateway, config: Config) -> None:
    """Proxy hooks (connect/join/publish) and webhooks, when configured (docs/backend.md)."""
    import socket as socket_mod
    from gateway.api import proxy
    # This process's id in the backend's eyes ("client": "<node>.<connection id>", webhook consumers).
    gateway.node_id = f"{socket_mod.gethostname()[:16]}-{os.getpid()}-{os.urandom(2).hex()}"
    proxy.install(gateway, config, gateway.node_id)
    gateway.webhooks = None
    if config.webhook_url:
        from gateway.api import webhooks
        if not config.broker or config.broker.startswith("memory"):
            from gateway.broker.events import MemoryEvents
            backend = MemoryEvents(gateway.node_id)
        else:
            from gateway.broker.redis_events import RedisEvents
            backend = RedisEvents(config.broker, node=gateway.node_id, prefix=config.redis_prefix,
                                  timeout=config.redis_timeout)
        gateway.webhooks = webhooks.install(gateway, config, backend)


def install_presence(gateway: Gateway, config: Config, hub):
    """Presence and join/leave events (presence / join_leave in [[rooms.policy]]), the control channel behind the
    server API's cross-process methods, revocations and the per-user connection cap."""
    from gateway.api.control import ClusterControl
    from gateway.broker import create_presence
    from gateway.rooms.presence import PresenceTracker, rules_from_config
    from gateway.security.user_limit import UserConnectionLimit

    options = {} if config.broker.startswith("memory") or not config.broker else {
        "prefix": config.redis_prefix, "timeout": config.redis_timeout, "debounce": config.join_leave_debounce}
    backend = create_presence(config.broker, **options)
    node = getattr(gateway, "node_id", None)
    if node:
        backend.node = node   # one id per process: presence's "client" ids match the backend hooks'
    rules = rules_from_config(config)
    tracker = PresenceTracker(backend, hub, rules, ttl=config.presence_ttl, debounce=config.join_leave_debounce,
                              info_claim=config.presence_info_claim, page_size=config.presence_page_size,
                              loop=gateway.loop)
    endpoint = gateway.endpoints.get("/ws")
    if rules and endpoint is not None:
        endpoint.presence = tracker      # None otherwise: joins and leaves skip presence entirely
    gateway.presence = tracker
    limits = getattr(gateway, "limits", None)
    gateway.control = ClusterControl(gateway, tracker, getattr(limits, "revocations", None))
    cap = UserConnectionLimit(gateway, backend, config.max_connections_per_user, tracker.conn_key)
    if config.max_connections_per_user > 0:
        cap.install()
        tracker.heartbeat_hooks.append(cap.heartbeat)
    gateway.metric_sources["user_limit"] = cap.stats    # zeros while the cap is off
    gateway.metric_sources["presence"] = tracker.stats
    gateway.metric_sources["presence_state"] = tracker
    # Before the hub's shutdown hook: a drained process takes its members out of presence at once.
    gateway.on_shutdown.insert(0, tracker.close)
    return tracker


def install_rooms(gateway: Gateway, config: Config):
    """The rooms protocol at /ws: broker (--broker), Hub, slow-consumer policies, readiness, demo page."""
    from gateway.rooms.backpressure import PolicyTable
    from gateway.broker import create_broker
    from gateway.rooms.hub import Hub
    from gateway.rooms.session import RoomsEndpoint

    from gateway.rooms.history import RetentionTable
    retention = RetentionTable.from_config(config)
    broker = create_broker(config.broker, prefix=config.redis_prefix, timeout=config.redis_timeout,
                           retention=retention.for_room, max_history_bytes=config.history_max_bytes)
    hub = Hub(broker, PolicyTable.from_config(config).for_room, gateway.loop, deflate=gateway.deflate,
              retention=retention.for_room)
    endpoint = RoomsEndpoint(hub, config)
    gateway.endpoints["/ws"] = endpoint
    from gateway.server import sse
    sse.install(gateway, hub, config, endpoint.backpressure)   # GET /sse: the same rooms as events
    gateway.hub = hub   # backends publish through it: `await gateway.hub.publish(room, json_bytes)`
    from gateway.ops.metrics import LatencyHistogram
    hub.fanout = LatencyHistogram()   # exported as ws_gateway_hub_fanout_seconds
    # The metrics table's sources for rooms (gateway/ops/metrics.py METRICS).
    gateway.metric_sources.update({
        "hub": hub, "hub_gauges": lambda: hub.stats, "broker": broker.stats,
        "session": endpoint.stats, "backpressure": endpoint.backpressure,
        "history": lambda: hub.history.stats,   # ws_gateway_history_*: reads, recoveries, bytes
    })
    # Not connected: 503. Connected but degraded (a Redis Cluster shard down): 200, and the body says so.
    gateway.readiness_checks.append(
        lambda: (True, broker.degraded()) if hub.broker_connected else (False, f"broker {broker.name} is not connected"))
    gateway.on_shutdown.append(hub.close)
    from gateway.server import static
    gateway.http_routes.update(static.sdk_routes())   # the JS SDK, always: /ws-gateway.js
    if config.demo:
        from gateway.server import demo
        gateway.http_routes.update(demo.routes())
    return hub


async def _serve(config: Config, sock=None, reload=None, worker: int = 0, on_ready=None) -> int:
    try:
        gateway = await start_gateway(config, sock, worker)
    except Exception as exc:
        raise _StartFailed() from exc
    gateway.reload_config = reload
    import gateway_ext
    scheme = "https" if config.certfile else "http"
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info(f"listening on {scheme}://{host}:{gateway.port}",
             extra={"event": "listen", "host": config.host, "port": gateway.port,
                    "pid": os.getpid(), "implementation": gateway_ext.IMPLEMENTATION,
                    "tls": bool(config.certfile), "metrics_port": gateway.metrics_port,
                    "endpoints": sorted(gateway.endpoints), "worker": worker,
                    # /api/<method> answers 404 "configure api_keys" while off: not listed then
                    "routes": [r for r in gateway.routes() if not r.startswith(api.PREFIX) or config.api_keys]})
    if config.workers > 1 and not config.metrics_port:
        log.warning("workers share the main port, so /metrics there answers for a random worker; "
                    "set metrics_port (worker i listens on metrics_port + i)", extra={"event": "metrics_port"})
    # systemd (Type=notify): started only once the socket accepts; the watchdog is fed by the loop.
    # A supervised worker tells the parent instead, which says READY=1 once every worker is up.
    if on_ready is not None:
        on_ready()
    else:
        systemd.notify("READY=1", f"STATUS={gateway.status_line()}")
    watchdog = systemd.Watchdog(gateway.loop)
    watchdog.start()
    try:
        return await gateway.serve_until_signalled()
    finally:
        watchdog.stop()


def _run_one(config: Config, sock=None, reload=None, worker: int = 0, on_ready=None) -> int:
    import uvloop
    try:
        return uvloop.run(_serve(config, sock, reload, worker, on_ready))
    except _StartFailed as failed:
        return report_startup_failure(failed.__cause__, config.log_level)


class _StartFailed(Exception):
    """Raised by _serve when start_gateway failed (the cause is the real error): a failure
    before serving is reported as one line, a crash while serving keeps its traceback."""


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit: each connection is one fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - depends on the host
            log.warning("cannot raise RLIMIT_NOFILE", extra={"error": str(exc)})
    return soft, hard


def preflight(config: Config) -> None:
    """Open what the settings name outside the file, once, before anything starts: the JWT
    key files, the TLS certificate and key, the origin and proxy lists. Raises ConfigError
    listing every problem. `serve` and `check-config` both run it (cli.load_config)."""
    errors = []
    try:
        defences.preflight(config)   # unreadable key file, bad origin/proxy entry
    except ConfigError as exc:
        errors.extend(exc.errors)
    if config.connect_proxy_url or config.join_proxy_url or config.publish_proxy_url or config.webhook_url:
        try:
            from gateway.api.hookclient import require_aiohttp
            require_aiohttp("connect_proxy_url/join_proxy_url/publish_proxy_url/webhook_url")
        except ConfigError as exc:
            errors.extend(exc.errors)
    try:
        make_ssl_context(config)
    except ssl.SSLError as exc:
        errors.append(f"certfile: cannot load the certificate/key pair ({exc.reason or exc}): "
                      "is keyfile the private key of certfile, both PEM?")
    except (OSError, ValueError) as exc:
        errors.append(f"certfile: cannot load the certificate/key pair: {exc}")
    if errors:
        raise ConfigError("; ".join(errors), errors)


def report_startup_failure(exc: BaseException, level: str) -> int:
    """One line on stderr (the traceback too at debug level); the exit status, 2."""
    if isinstance(exc, StartupError):
        line = str(exc)
    else:
        line = f"cannot start: {type(exc).__name__}: {exc}"
        if level.lower() != "debug":
            line += " (run with --log-level debug for the traceback)"
    if level.lower() == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"ws-gateway: error: {line}", file=sys.stderr, flush=True)
    return 2


def run(config: Config, reload=None) -> int:
    """Run the gateway until a signal; `reload()` re-reads the configuration on SIGHUP."""
    logs.setup(config.log_level, config.log_format)
    try:
        # Once, before anything starts: N workers would each report the same failure (and
        # their own sockets share the port, so they could not see another instance on it),
        # and a single process would have logged a few lines first.
        if not config.reuse_port:
            ensure_port_free(config.host, config.port)
        if config.metrics_port and config.workers == 1:
            ensure_port_free(config.metrics_host, config.metrics_port, "metrics_port")
    except StartupError as exc:
        return report_startup_failure(exc, config.log_level)
    soft, hard = raise_nofile_limit()
    log.info("open files limit", extra={"event": "rlimit", "soft": soft, "hard": hard})
    if config.workers <= 1:
        return _run_one(config, reload=reload)
    return _run_workers(config, reload)


def _run_workers(config: Config, reload=None) -> int:
    """N workers on one port (SO_REUSEPORT), supervised: see gateway/server/supervisor.py."""
    from gateway.server.supervisor import run_workers
    return run_workers(config.workers,
                       lambda index, on_ready: _run_one(config, reload=reload, worker=index, on_ready=on_ready))
