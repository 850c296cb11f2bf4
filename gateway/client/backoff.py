"""Reconnect delays of the Python SDK and the close-code policy (the same numbers as the
JavaScript SDK; tests/sdk/transcripts pin them for both).

Every scheduled reconnect draws one random r in [0, 1) and increments n, the count of
consecutive reconnects (reset to 0 when a connection opens):

    ordinary failure  r * min(backoff_max, backoff_initial * 2**(n-1))   full jitter
    1001, 1012        r * restart_spread           the server drains on purpose: come back
                                                   soon, spread so a whole node's clients do
                                                   not return in the same millisecond
    4002, 4003        long_backoff * (0.5 + 0.5 r) we misbehaved: wait long, never < half
    4001              no delay, no random: get_token, then connect
    4004, HTTP 401/403  stop

Full jitter is "Exponential Backoff And Jitter" (AWS Architecture Blog, 2015): a thousand
clients cut off together spread over the whole window instead of returning in waves.

Leaf module: standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay bounds in seconds (Client options of the same names)."""
    backoff_initial: float = 0.5
    backoff_max: float = 20.0
    restart_spread: float = 1.0
    long_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff needs 0 <= backoff_initial <= backoff_max")
        if self.restart_spread < 0 or self.long_backoff < 0:
            raise ValueError("restart_spread and long_backoff must be >= 0")

    def delay(self, n: int, r: float) -> float:
        """Full jitter for the n-th consecutive reconnect (n >= 1), r in [0, 1)."""
        return r * min(self.backoff_max, self.backoff_initial * (2 ** min(max(n - 1, 0), 62)))

    def restart_delay(self, r: float) -> float:
        return r * self.restart_spread

    def long_delay(self, r: float) -> float:
        return self.long_backoff * (0.5 + 0.5 * r)


# What to do after the server closed the connection, by close code (RFC 6455 section 7.4;
# 4000-4004: gateway/errors.py). Anything not listed is an ordinary failure.
RECONNECT_SOON = frozenset({1001, 1012})   # drain / restart
TOKEN_EXPIRED = 4001                       # get_token, then reconnect at once
LONG_BACKOFF = frozenset({4002, 4003})     # rate limited / too many errors
STOP = frozenset({4004})                   # policy: never retry
STOP_HTTP = {401: "unauthorized", 403: "forbidden"}   # handshake refused for the token
# 4000 (slow consumer) is an ordinary failure on purpose: reconnect with backoff and recover
# every room from its position.
CLIENT_TIMEOUT = 3008   # the client's own close after a liveness or join timeout (IANA: "Timeout")
