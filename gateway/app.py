"""Assemble and run one gateway process (or N workers) from a Config.

This is where the parts meet: the Gateway (sockets), endpoints, broker, metrics. The CLI
calls `run(config)`; tests call `start_gateway(config)` inside their own event loop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

from gateway.ops import logs, systemd
from gateway.config import Config
from gateway.server.process import Gateway
from gateway.api import methods as api
from gateway.security import defences
from gateway.errors import ConfigError

log = logging.getLogger("gateway.app")


async def start_gateway(config: Config, sock=None, worker: int = 0) -> Gateway:
    """Build and start a Gateway in the running loop (used by `run` and by tests).

    `worker` is this process's index among `workers`: worker i serves its private metrics
    listener on metrics_port + i, so each worker can be scraped (the main port is shared).
    """
    gateway = Gateway(config, asyncio.get_running_loop())
    gateway.worker_index = worker
    # Origin, per-IP, token checks before the 101; expiry, refresh, rate limit after it.
    defences.install(gateway, config)
    api.install(gateway, config)          # POST /api/publish (off unless api_keys are configured)
    hub = install_rooms(gateway, config)
    await hub.start()
    await gateway.start(sock)
    return gateway


def install_rooms(gateway: Gateway, config: Config):
    """The rooms protocol at /ws: broker (--broker), Hub, slow-consumer policies, readiness, demo page."""
    from gateway.rooms.backpressure import PolicyTable
    from gateway.broker import create_broker
    from gateway.rooms.hub import Hub
    from gateway.rooms.session import RoomsEndpoint

    broker = create_broker(config.broker, prefix=config.redis_prefix, seq_ttl=config.redis_seq_ttl,
                           timeout=config.redis_timeout)
    hub = Hub(broker, PolicyTable.from_config(config).for_room, gateway.loop, deflate=gateway.deflate)
    endpoint = RoomsEndpoint(hub, config)
    gateway.endpoints["/ws"] = endpoint
    gateway.hub = hub   # backends publish through it: `await gateway.hub.publish(room, json_bytes)`
    from gateway.ops.metrics import LatencyHistogram
    hub.fanout = LatencyHistogram()   # exported as ws_gateway_hub_fanout_seconds
    # The metrics table's sources for rooms (gateway/ops/metrics.py METRICS).
    gateway.metric_sources.update({
        "hub": hub, "hub_gauges": lambda: hub.stats, "broker": broker.stats,
        "session": endpoint.stats, "backpressure": endpoint.backpressure,
    })
    gateway.readiness_checks.append(lambda: (hub.broker_connected, f"broker {broker.name} is not connected"))
    gateway.on_shutdown.append(hub.close)
    from gateway.server import static
    gateway.http_routes.update(static.sdk_routes())   # the JS SDK, always: /ws-gateway.js
    if config.demo:
        from gateway.server import demo
        gateway.http_routes.update(demo.routes())
    return hub


async def _serve(config: Config, sock=None, reload=None, worker: int = 0) -> int:
    gateway = await start_gateway(config, sock, worker)
    gateway.reload_config = reload
    import gateway_ext
    log.info("listening", extra={"event": "listen", "host": config.host, "port": gateway.port,
                                 "pid": os.getpid(), "implementation": gateway_ext.IMPLEMENTATION,
                                 "tls": bool(config.certfile), "metrics_port": gateway.metrics_port,
                                 "endpoints": sorted(gateway.endpoints), "worker": worker})
    if config.workers > 1 and not config.metrics_port:
        log.warning("workers share the main port, so /metrics there answers for a random worker; "
                    "set metrics_port (worker i listens on metrics_port + i)", extra={"event": "metrics_port"})
    # systemd (Type=notify): started only once the socket accepts; the watchdog is fed by the loop.
    systemd.notify("READY=1", f"STATUS={gateway.status_line()}")
    watchdog = systemd.Watchdog(gateway.loop)
    watchdog.start()
    try:
        return await gateway.serve_until_signalled()
    finally:
        watchdog.stop()


def _run_one(config: Config, sock=None, reload=None, worker: int = 0) -> int:
    import uvloop
    return uvloop.run(_serve(config, sock, reload, worker))


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


def run(config: Config, reload=None) -> int:
    """Run the gateway until a signal; `reload()` re-reads the configuration on SIGHUP."""
    logs.setup(config.log_level, config.log_format)
    try:
        defences.preflight(config)   # unreadable key file, bad origin/proxy entry: refuse to start
    except ConfigError as exc:
        print(f"ws-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    soft, hard = raise_nofile_limit()
    log.info("open files limit", extra={"event": "rlimit", "soft": soft, "hard": hard})
    try:
        if config.workers <= 1:
            return _run_one(config, reload=reload)
        if not config.reuse_port:
            # The workers' sockets share the port, so they cannot see another instance on it.
            from gateway.server.process import ensure_port_free
            ensure_port_free(config.host, config.port)
        return _run_workers(config, reload)
    except ConfigError as exc:   # e.g. the port is in use (server/process.py listen_socket)
        print(f"ws-gateway: configuration error: {exc}", file=sys.stderr)
        return 2


def _run_workers(config: Config, reload=None) -> int:
    """Fork N workers sharing the port through SO_REUSEPORT; forward signals; reap them."""
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    children: list[int] = []

    def forward(sig, _frame):
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # Block these signals while forking so that none arrives before the parent forwards them
    # (a Ctrl-C then would be a KeyboardInterrupt in the parent and orphan the workers).
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # child
            # Own process group: a Ctrl-C (SIGINT to the terminal's foreground group) reaches the
            # parent only, which forwards it once; a worker that got it twice would take the
            # second copy as "exit now" and skip the drain.
            os.setpgid(0, 0)
            for sig in forwarded:
                signal.signal(sig, signal.SIG_DFL)   # until the worker's event loop takes them over
            signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
            try:
                code = _run_one(config, reload=reload, worker=index)
            except BaseException:
                log.exception("worker crashed")
                code = 1
            os._exit(code)
        children.append(pid)
    log.info("workers started", extra={"event": "workers", "pids": children})
    for sig in forwarded:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
    status = 0
    for pid in children:
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(st)
        status = status or (code if code > 0 else 0)
    return status
