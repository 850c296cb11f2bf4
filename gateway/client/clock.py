"""Time for the Python SDK, injectable so tests can drive every timer deterministically.

`LoopClock` is the real one: the event loop's monotonic clock and timers, and the wall clock
(time.time) for token `exp` (a Unix time). A test passes an object with the same three
methods and advances it by hand (tests/client_fakes.py). Leaf module: standard library only.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle: ...


class LoopClock:
    """The running event loop's clock and timers (asyncio or uvloop)."""

    __slots__ = ()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback, *args)
