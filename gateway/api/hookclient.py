"""The HTTP client of the backend hooks: keep-alive connections, a timeout, a concurrency cap
and a circuit breaker around one backend URL.

Why aiohttp: it is the asyncio ecosystem's standard HTTP client (the most used, maintained by
aio-libs, runs on uvloop), its connector pools keep-alive connections per host with a hard
connection limit, and the gateway's tests already depend on it. httpx would add a second
stack (httpcore + anyio) for the same job and is slower per request on asyncio. It is an
optional extra (`pip install 'ws-gateway[hooks]'`): a gateway without hooks never imports
it, and configuring a hook without it stops start-up with one line saying what to install.

Failure policy (the backend must never stall the gateway):
- `timeout` bounds a whole call, including its wait for one of `max_concurrency` slots;
- a timeout, a connection error or a 5xx counts as a failure; `breaker_failures` of them in
  a row open the breaker: calls then fail at once (`HookUnavailable`) for `breaker_reset`
  seconds, after which ONE call probes (half-open) and its outcome closes or re-opens it.
  While open, a stalled backend costs the gateway nothing: no socket, no task, no wait.
- everything runs on the event loop as awaited I/O: nothing blocks it.

Imports the standard library, orjson and (lazily) aiohttp only.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

import orjson

from gateway.errors import ConfigError

log = logging.getLogger("gateway.api.hookclient")

MAX_ANSWER_BYTES = 65536   # a hook's answer is a small JSON object; more is a misconfigured URL


def require_aiohttp(what: str):
    """The aiohttp module, or a ConfigError naming the setting that needs it."""
    try:
        import aiohttp
    except ImportError:
        raise ConfigError(f"{what} needs the aiohttp package: pip install 'ws-gateway[hooks]' "
                          "(or pip install aiohttp)") from None
    return aiohttp


class HookUnavailable(Exception):
    """The backend could not answer: timeout, connection error, 5xx, busy, or breaker open."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind          # timeout | connect | status | busy | breaker_open | bad_answer


class HookStats:
    """Counters of one hook (metrics: ws_gateway_proxy_*, label `hook`)."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures: collections.Counter = collections.Counter()   # by kind
        self.breaker_opened = 0


class CircuitBreaker:
    """closed -> (N failures in a row) open -> (reset seconds) half-open -> one probe -> closed/open."""

    def __init__(self, failures: int, reset: float, clock=time.monotonic) -> None:
        self.threshold = failures
        self.reset = reset
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or self.clock() - self.opened_at < self.reset:
            return False
        self.probing = True          # half-open: this caller is the probe
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> bool:
        """Record a failure; True when this one opened (or re-opened) the breaker."""
        self.failures += 1
        if self.probing or (self.opened_at is None and self.failures >= self.threshold):
            self.opened_at = self.clock()
            self.probing = False
            return True
        return False


class HookClient:
    """POST JSON to one backend URL; see the module docstring for the failure policy."""

    def __init__(self, name: str, url: str, *, timeout: float, max_concurrency: int, breaker_failures: int,
                 breaker_reset: float, user_agent: str = "ws-gateway") -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset)
        self.stats = HookStats()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max = max_concurrency
        self._user_agent = user_agent
        self._session = None
        self._aiohttp = require_aiohttp(f"{name}_proxy_url")

    def _client(self):
        if self._session is None or self._session.closed:
            aiohttp = self._aiohttp
            # One pool per hook: up to max_concurrency keep-alive connections to the backend.
            connector = aiohttp.TCPConnector(limit=self._max, keepalive_timeout=30.0, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self._user_agent},
                                                  skip_auto_headers=("Accept-Encoding",))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, doc: dict, headers: dict | None = None) -> tuple[int, object]:
        """(status, JSON answer or None) for 2xx/4xx; HookUnavailable otherwise."""
        stats = self.stats
        stats.calls += 1
        if not self.breaker.allow():
            stats.failures["breaker_open"] += 1
            raise HookUnavailable(f"{self.name} backend unavailable (circuit breaker open)", "breaker_open")
        probe = self.breaker.probing
        body = orjson.dumps(doc)
        hdrs = {"Content-Type": "application/json"}
        if headers:
            hdrs.update(headers)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    async with self._client().post(self.url, data=body, headers=hdrs) as resp:
                        status = resp.status
                        raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
        except asyncio.CancelledError:
            if probe:                    # the probe's caller went away: let the next call probe
                self.breaker.probing = False
            raise
        except TimeoutError:
            self._failed("timeout")
            raise HookUnavailable(f"{self.name} backend did not answer within {self.timeout:g} s", "timeout") from None
        except (OSError, self._aiohttp.ClientError) as exc:
            self._failed("connect")
            raise HookUnavailable(f"{self.name} backend unreachable: {type(exc).__name__}", "connect") from None
        if status >= 500 or status in (408, 429):
            self._failed("status")
            raise HookUnavailable(f"{self.name} backend answered {status}", "status")
        self.breaker.success()
        if len(raw) > MAX_ANSWER_BYTES:
            stats.failures["bad_answer"] += 1
            raise HookUnavailable(f"{self.name} backend answered more than {MAX_ANSWER_BYTES} bytes", "bad_answer")
        answer = None
        if raw:
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if 200 <= status < 300:
                    stats.failures["bad_answer"] += 1
                    raise HookUnavailable(f"{self.name} backend answered {status} with a body that is not JSON",
                                          "bad_answer") from None
        return status, answer

    def _failed(self, kind: str) -> None:
        self.stats.failures[kind] += 1
        if self.breaker.failure():
            self.stats.breaker_opened += 1
            log.warning("backend hook circuit breaker open: refusing at once for %g s", self.breaker.reset,
                        extra={"event": "proxy_breaker_open", "hook": self.name, "reason": kind})
