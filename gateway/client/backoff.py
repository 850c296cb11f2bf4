"""Reconnect delays of the Python SDK: full-jitter exponential backoff and the close-code policy.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): the n-th retry
waits uniform(0, min(max, base * 2**n)), so a thousand clients cut off together spread
their reconnects over the whole window instead of returning in waves.

Leaf module: standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay bounds in seconds (all configurable on the Client).

    min_delay / max_delay   ordinary failures (connection refused, 1006, 1011, 5xx):
                            uniform(0, min(max_delay, min_delay * 2**attempt))
    long_min / long_max     4002 rate limited and 4003 too many errors: the server told us
                            we misbehave, so wait at least long_min and grow towards long_max
    restart_spread          1001 going away / 1012 service restart: the server drains on
                            purpose; come back soon, spread over uniform(0, restart_spread)
    """
    min_delay: float = 0.5
    max_delay: float = 20.0
    long_min: float = 15.0
    long_max: float = 120.0
    restart_spread: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError("backoff needs 0 <= min_delay <= max_delay")
        if not 0 <= self.long_min <= self.long_max:
            raise ValueError("backoff needs 0 <= long_min <= long_max")
        if self.restart_spread < 0:
            raise ValueError("restart_spread must be >= 0")

    def delay(self, attempt: int, rnd: float) -> float:
        """Full jitter for the attempt-th consecutive failure (attempt >= 0), rnd in [0, 1)."""
        cap = min(self.max_delay, self.min_delay * (2 ** min(attempt, 62)))
        return rnd * cap

    def long_delay(self, attempt: int, rnd: float) -> float:
        """At least long_min: a floor, then jitter up to a cap that doubles per attempt."""
        cap = min(self.long_max, self.long_min * (2 ** min(attempt, 62)))
        return self.long_min + rnd * (cap - self.long_min) if cap > self.long_min else self.long_min

    def restart_delay(self, rnd: float) -> float:
        return rnd * self.restart_spread


# What to do after the server closed the connection, by close code (RFC 6455 section 7.4,
# gateway/errors.py for 4000-4004). Anything not listed is an ordinary failure: backoff.
RECONNECT_SOON = frozenset({1001, 1012})   # drain / restart: spread over restart_spread
RECOVER = frozenset({4000})                # slow consumer: reconnect and recover (backoff)
TOKEN_EXPIRED = 4001                       # get_token, then reconnect at once
LONG_BACKOFF = frozenset({4002, 4003})     # we misbehaved: wait long
STOP = frozenset({4004})                   # policy: never retry
STOP_HTTP = frozenset({401, 403})          # handshake refused for the token: never retry
