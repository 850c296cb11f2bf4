"""Fakes that drive the Python SDK (gateway.client) deterministically: a clock whose timers
fire only when a test advances it, a scripted random source, and a fake network whose
sockets implement the SDK's Transport contract and record what the SDK does.

Used by the transcript runner (tests/unit/test_client_transcripts.py) and the SDK's unit
tests. Outputs use the transcript vocabulary (tests/sdk/transcripts/README.md):
{"connect": url}, {"send": [frames]}, {"close": code}, {"get_token": true}, events, settles.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json

from gateway.client import HandshakeRejected, TransportClosed

TOLERANCE_MS = 1e-6


class FakeTimer:
    __slots__ = ("due", "order", "callback", "args", "cancelled")

    def __init__(self, due: float, order: int, callback, args) -> None:
        self.due = due
        self.order = order
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "FakeTimer") -> bool:
        return (self.due, self.order) < (other.due, other.order)


class FakeClock:
    """Milliseconds inside (transcripts count in ms), seconds outside (the SDK's unit)."""

    def __init__(self, start_ms: float = 1_700_000_000_000) -> None:
        self.now_ms = 0.0
        self.start_ms = start_ms
        self._timers: list[FakeTimer] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now_ms / 1000

    def time(self) -> float:
        return (self.start_ms + self.now_ms) / 1000

    def call_later(self, delay: float, callback, *args) -> FakeTimer:
        timer = FakeTimer(self.now_ms + max(0.0, delay) * 1000, next(self._order), callback, args)
        heapq.heappush(self._timers, timer)
        return timer

    def next_due(self) -> float | None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].due if self._timers else None

    def fire_next(self, limit_ms: float) -> bool:
        """Fire the earliest timer due at or before limit_ms (moving the clock to it)."""
        due = self.next_due()
        if due is None or due > limit_ms + TOLERANCE_MS:
            return False
        timer = heapq.heappop(self._timers)
        self.now_ms = max(self.now_ms, timer.due)
        timer.callback(*timer.args)
        return True


class ScriptedRandom:
    """Returns the scripted values in order; the last one repeats."""

    def __init__(self, values=(0.5,)) -> None:
        self.values = list(values) or [0.5]
        self.calls = 0

    def __call__(self) -> float:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value


class FakeSocket:
    """One connection attempt: the SDK's Transport, and the server's handles on it."""

    def __init__(self, network: "FakeNetwork", url: str, headers: dict, subprotocols: list, on_activity) -> None:
        self.network = network
        self.url = url
        self.headers = headers
        self.subprotocols = subprotocols
        self.subprotocol = None
        self.on_activity = on_activity
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox: list = []
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self.sent: list = []          # every frame the SDK wrote, decoded

    # -- Transport (the SDK's side) -----------------------------------------------------------

    async def recv(self):
        while not self._inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._inbox.pop(0)
        if isinstance(item, TransportClosed):
            self._inbox.insert(0, item)   # stays closed
            raise TransportClosed(item.code, item.reason)
        return item

    def send(self, frames) -> None:
        if self.closed:
            return
        decoded = [self.network.decode(f) for f in frames]
        self.sent.extend(decoded)
        self.network.record({"send": decoded})

    def ping(self) -> None:
        # A WebSocket ping; the transcripts' liveness ping (JS sends {"op":"ping"}, which
        # browsers must do for lack of WebSocket pings) is recorded in their vocabulary.
        if not self.closed:
            self.network.record({"send": [{"op": "ping"}]})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.network.record({"close": code})
        self._end(code, reason)

    # -- the server's side --------------------------------------------------------------------

    def accept(self, subprotocol: str | None = None) -> None:
        self.subprotocol = subprotocol
        self.opened.set_result(self)

    def refuse(self, status: int) -> None:
        self.opened.set_exception(HandshakeRejected(status, "refused"))

    def unreachable(self) -> None:
        self.opened.set_exception(ConnectionRefusedError("unreachable"))

    def deliver(self, frame) -> None:
        if self.closed:
            raise AssertionError("the server sends on a closed socket")
        self.on_activity()
        self._push(frame)

    def server_close(self, code: int, reason: str = "") -> None:
        self._end(code, reason)

    def drop(self) -> None:
        self._end(1006, "")

    def _end(self, code: int, reason: str) -> None:
        self.closed = True
        self._push(TransportClosed(code, reason))

    def _push(self, item) -> None:
        self._inbox.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class FakeNetwork:
    """The SDK's `connect`: each call records {"connect": url} and waits for the server's
    verdict on the new FakeSocket (accept / refuse / unreachable)."""

    def __init__(self, decode=json.loads) -> None:
        self.outputs: list = []
        self.sockets: list[FakeSocket] = []
        self.decode = decode

    def record(self, output) -> None:
        self.outputs.append(output)

    async def connect(self, url: str, *, headers: dict, subprotocols: list, on_activity):
        sock = FakeSocket(self, url, headers, subprotocols, on_activity)
        self.sockets.append(sock)
        self.record({"connect": url})
        return await sock.opened

    @property
    def newest(self) -> FakeSocket:
        if not self.sockets:
            raise AssertionError("no socket was created")
        return self.sockets[-1]


async def settle(rounds: int = 40) -> None:
    """Let every task that can run, run (no fake time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
