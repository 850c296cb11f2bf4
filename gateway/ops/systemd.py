"""systemd service notifications (sd_notify) without a dependency on libsystemd.

With `Type=notify` systemd passes `$NOTIFY_SOCKET` (a filesystem path, or `@name` for the
abstract namespace) and waits for `READY=1` before it considers the unit started; with
`WatchdogSec=` it passes `$WATCHDOG_USEC` and kills the service if `WATCHDOG=1` does not
arrive in time. The pings are sent from an event-loop timer on purpose: a blocked loop stops
pinging, so systemd restarts a gateway that no longer serves anyone.
Outside systemd (no `$NOTIFY_SOCKET`) every call is a cheap no-op.

Leaf module: imports only the standard library.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("gateway.ops.systemd")


def notify(*states: str, env: dict | None = None) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=...") to systemd; False when not under systemd."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
        return True
    except OSError as exc:
        # Never let a notification failure take the gateway down: log it once per call site.
        log.warning("sd_notify failed", extra={"event": "sd_notify", "error": str(exc), "states": list(states)})
        return False


def watchdog_interval(env: dict | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if the watchdog is off.

    Like sd_watchdog_enabled(): `$WATCHDOG_PID`, when set, must be this process -- or its
    parent, so that forked workers (whose parent only waits for them) keep it fed.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0 or not env.get("NOTIFY_SOCKET"):
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid not in (str(os.getpid()), str(os.getppid())):
        return None
    return usec / 2 / 1_000_000


class Watchdog:
    """Sends WATCHDOG=1 every `watchdog_interval()` seconds from the event loop."""

    def __init__(self, loop, env: dict | None = None) -> None:
        self.loop = loop
        self.env = os.environ if env is None else env
        self.interval = watchdog_interval(self.env)
        self._handle = None
        self.sent = 0

    def start(self) -> bool:
        if self.interval is None:
            return False
        self._tick()
        return True

    def _tick(self) -> None:
        if notify("WATCHDOG=1", env=self.env):
            self.sent += 1
        self._handle = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
