"""Values the Python SDK hands to the application: messages, positions, events, and the
small emitter behind `client.on(...)` / `sub.on(...)`.

Callbacks get one argument (the event object; for "error" the exception, which has a
string `code`). They may be plain functions or coroutine functions (those run as tasks). A
callback that raises is logged and never breaks the client. Leaf module: standard library only.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

log = logging.getLogger("gateway.client")


class Position(NamedTuple):
    """Where a subscription stands in its room: the last delivered `seq` in numbering `epoch`.

    epoch is None when the server did not say (a server without history): the position then
    only orders messages, it cannot be recovered after a reconnect."""
    epoch: str | None
    seq: int

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "seq": self.seq}

    @classmethod
    def parse(cls, value) -> "Position":
        """A Position from a Position, a (epoch, seq) pair or a {"epoch":..,"seq":..} mapping
        (what `to_json` wrote, e.g. into a file or a session store)."""
        if isinstance(value, Position):
            return value
        if isinstance(value, dict):
            epoch, seq = value.get("epoch"), value.get("seq")
        else:
            epoch, seq = value
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"a position's seq must be an integer >= 0, not {seq!r}")
        if epoch is not None and not isinstance(epoch, str):
            raise ValueError(f"a position's epoch must be a string or None, not {epoch!r}")
        return cls(epoch, seq)


class Message:
    """One publication delivered to a subscription. seq 0: unnumbered (the server's broker
    was down; delivered, but it does not move the position)."""

    __slots__ = ("room", "data", "seq", "epoch")

    def __init__(self, room: str, data: Any, seq: int, epoch: str | None) -> None:
        self.room = room
        self.data = data
        self.seq = seq
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"Message(room={self.room!r}, seq={self.seq}, data={self.data!r})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.room, self.seq, self.epoch, self.data) == (other.room, other.seq, other.epoch, other.data)

    __hash__ = None


@dataclass(frozen=True, slots=True)
class Connected:
    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended, or the client stopped. `code` is the close code (1006 when the
    connection died or a handshake was refused; 3008 when the client gave up on a silent
    server), `status` the HTTP status of a refused handshake. `reconnect` says whether the
    client will try again, after `delay` seconds (None: at once after get_token, or never)."""
    code: int
    reason: str = ""
    reconnect: bool = True
    delay: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """A join (or a re-join after a reconnect, or a recovery) was acknowledged. recovered is
    True when the server replays the missed range; seq/epoch are the ack's (the room's top)."""
    room: str
    recovered: bool
    seq: int | None
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Reset:
    """Continuity is lost: the app must reload the room's state. The subscription continues
    from (epoch, seq). reason: "not_recovered" (the join asked for a position the server
    could not replay), "no_position" (a re-join without an epoch to ask with: a server
    without history), "server_reset" (the server announced a new numbering)."""
    room: str
    epoch: str | None
    seq: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Left:
    """The subscription ended: reason "app" (leave()), or the server's error code that refused
    the join (forbidden, bad_room, too_many_rooms, ...). When the client itself closes or
    stops, subscriptions emit nothing (the client's events say it); their iteration ends."""
    room: str
    reason: str


class Emitter:
    """on/off/emit for a fixed set of event names."""

    __slots__ = ("_handlers", "_events", "_tasks")

    def __init__(self, events: tuple[str, ...]) -> None:
        self._events = events
        self._handlers: dict[str, list[Callable]] = {}
        self._tasks: set[asyncio.Task] = set()

    def on(self, event: str, callback: Callable | None = None):
        """Register `callback` for `event`; without a callback, a decorator."""
        if event not in self._events:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(self._events)}")
        if callback is None:
            return lambda fn: self.on(event, fn)
        self._handlers.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: Callable | None = None) -> None:
        """Remove one callback, or every callback of `event`."""
        handlers = self._handlers.get(event)
        if not handlers:
            return
        if callback is None:
            handlers.clear()
        else:
            try:
                handlers.remove(callback)
            except ValueError:
                pass

    def has(self, event: str) -> bool:
        return bool(self._handlers.get(event))

    def emit(self, event: str, value: Any) -> None:
        handlers = self._handlers.get(event)
        if not handlers:
            return
        for callback in tuple(handlers) if len(handlers) > 1 else handlers:
            try:
                result = callback(value)
                if result is not None and inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
            except Exception:
                log.exception("ws-gateway client: %r callback failed", event)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ws-gateway client: async callback failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for async callbacks still running (used by Client.close)."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)
