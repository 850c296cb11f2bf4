"""Assemble and run one gateway process (or N workers) from a Config.

This is where the parts meet: the Gateway (sockets), endpoints, broker, metrics. The CLI
calls `run(config)`; tests call `start_gateway(config)` inside their own event loop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from . import logs
from .config import Config
from .server import Gateway
from . import defences
from .errors import ConfigError

log = logging.getLogger("gateway.app")


async def start_gateway(config: Config, sock=None) -> Gateway:
    """Build and start a Gateway in the running loop (used by `run` and by tests)."""
    gateway = Gateway(config, asyncio.get_running_loop())
    # Origin, per-IP, token checks before the 101; expiry, refresh, rate limit after it.
    defences.install(gateway, config)
    await gateway.start(sock)
    return gateway


async def _serve(config: Config, sock=None) -> int:
    gateway = await start_gateway(config, sock)
    import gateway_ext
    log.info("listening", extra={"event": "listen", "host": config.host, "port": gateway.port,
                                 "pid": os.getpid(), "implementation": gateway_ext.IMPLEMENTATION,
                                 "endpoints": sorted(gateway.endpoints)})
    return await gateway.serve_until_signalled()


def _run_one(config: Config, sock=None) -> int:
    import uvloop
    return uvloop.run(_serve(config, sock))


def run(config: Config) -> int:
    from .cli import raise_nofile_limit
    logs.setup(config.log_level, config.log_format)
    try:
        defences.preflight(config)   # unreadable key file, bad origin/proxy entry: refuse to start
    except ConfigError as exc:
        print(f"ws-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    soft, hard = raise_nofile_limit()
    log.info("open files limit", extra={"event": "rlimit", "soft": soft, "hard": hard})
    if config.workers <= 1:
        return _run_one(config)
    return _run_workers(config)


def _run_workers(config: Config) -> int:
    """Fork N workers sharing the port through SO_REUSEPORT; forward signals; reap them."""
    children: list[int] = []
    for _ in range(config.workers):
        pid = os.fork()
        if pid == 0:  # child
            try:
                code = _run_one(config)
            except BaseException:
                log.exception("worker crashed")
                code = 1
            os._exit(code)
        children.append(pid)
    log.info("workers started", extra={"event": "workers", "pids": children})

    def forward(sig, _frame):
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
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
