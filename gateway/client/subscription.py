"""One room of a Client: its position (epoch, seq), its state, and the gap rule.

States (the protocol-v2 client rules, notes in docs/clients.md#python):

    joining     a join is wanted or in flight (also while the client is disconnected)
    joined      acked; messages with seq == pos + 1 are delivered and move the position
    recovering  a gap or a `dropped` notice was seen: a join with since=(epoch, pos) is in
                flight; nothing of the room is delivered until its ack, whose replay
                covers everything sent before it
    left        the app left, the server refused the join, or the client closed

Delivery rule (both SDKs): deliver only seq == pos + 1 (or seq 0: unnumbered, delivered,
position unchanged); seq <= pos is a duplicate and dropped silently (without an epoch it is a
numbering restart instead: reset "server_reset", then delivered); seq > pos + 1 is a gap
and starts a recovery. With a server that sends no epoch (no history) the recovery join has
no `since`; its ack then reports a reset (reason "no_position"), as does every re-join after
a reconnect: such a server cannot say what was missed.

A join with `last` (only while there is no position) asks for the room's latest publication:
the ack's seq is the position, and the publication with that seq, replayed right after the
ack, is delivered once although it is not pos + 1.

Messages go to `on("message")` callbacks, and to a buffer for `async for` unless callbacks
alone consume them (a registered message callback and no iteration: nothing is buffered).
Past `max_queue` buffered messages the client stops reading the socket until the app catches
up, so the server's slow-consumer policy applies instead of unbounded memory here.

Must not import any other gateway module.
"""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from .errors import ClientClosed
from .events import Emitter, Joined, Left, Message, Position, Reset

if TYPE_CHECKING:  # pragma: no cover
    from .core import Client

JOINING, JOINED, RECOVERING, LEFT = "joining", "joined", "recovering", "left"

_END = object()   # iteration ends normally


class Subscription:
    """Created by `await client.join(room)`; see the module docstring."""

    EVENTS = ("message", "joined", "reset", "left", "error")

    __slots__ = ("room", "_client", "state", "epoch", "seq", "last", "_last_seq", "_queue", "_getter",
                 "_end", "_emitter", "_first", "_iterating", "_retry_timer", "_retry_attempt", "_was_joined",
                 "__weakref__")

    def __init__(self, client: "Client", room: str, position: Position | None, last: bool) -> None:
        self.room = room
        self._client = client
        self.state = JOINING
        self.epoch: str | None = position.epoch if position is not None else None
        self.seq: int | None = position.seq if position is not None else None
        self.last = last                   # join with "last": the room's latest publication first
        self._last_seq: int | None = None  # that publication's seq, delivered once although <= pos
        self._queue: collections.deque = collections.deque()
        self._getter: asyncio.Future | None = None
        self._end = None                   # None, _END or the exception that ends iteration
        self._emitter = Emitter(self.EVENTS)
        self._first: asyncio.Future | None = None
        self._iterating = False
        self._retry_timer = None
        self._retry_attempt = 0
        self._was_joined = False           # acked at least once (a re-join without epoch resets)

    def __repr__(self) -> str:
        return f"Subscription({self.room!r}, state={self.state}, position={self.position})"

    # -- position -------------------------------------------------------------------------

    @property
    def position(self) -> Position | None:
        """(epoch, seq) of the last delivered message, or None before the first ack/message."""
        return None if self.seq is None else Position(self.epoch, self.seq)

    @position.setter
    def position(self, value) -> None:
        """Set where to resume: the next (re-)join asks for everything after it. Setting it while
        joined moves the gap rule's reference at once (a lower seq starts a recovery on the next
        message; a higher one skips messages)."""
        if value is None:
            self.epoch = self.seq = None
            return
        pos = Position.parse(value)
        self.epoch, self.seq = pos.epoch, pos.seq

    # -- events ---------------------------------------------------------------------------

    def on(self, event: str, callback=None):
        result = self._emitter.on(event, callback)
        if event == "message" and callback is not None and not self._iterating:
            # Hand what was buffered before the callback existed to it, then stop buffering.
            queued, self._queue = self._queue, collections.deque()
            for msg in queued:
                self._emitter.emit("message", msg)
            self._client._maybe_resume(self)
        return result

    def off(self, event: str, callback=None) -> None:
        self._emitter.off(event, callback)

    # -- the app's side -------------------------------------------------------------------

    def __aiter__(self):
        self._iterating = True
        return self

    async def __anext__(self) -> Message:
        queue = self._queue
        while not queue:
            end = self._end
            if end is not None:
                if end is _END:
                    raise StopAsyncIteration
                raise end
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        msg = queue.popleft()
        if self._client._paused_by is self:
            self._client._maybe_resume(self)
        return msg

    async def get(self) -> Message:
        """The next message (what `async for` yields); raises StopAsyncIteration once left."""
        self._iterating = True
        return await self.__anext__()

    def pending(self) -> int:
        """Messages buffered and not yet taken by the app."""
        return len(self._queue)

    async def wait_joined(self) -> "Subscription":
        """Until the first ack (raises CommandError when the server refuses the join,
        ClientStopped/ClientClosed when the client ends first)."""
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
            if self.state == JOINED:
                self._first.set_result(self)
            elif self.state == LEFT:
                self._first.set_exception(self._end if isinstance(self._end, BaseException)
                                          else ClientClosed("subscription left"))
        return await asyncio.shield(self._first)

    async def leave(self) -> None:
        await self._client.leave(self.room)

    # -- the client's side ----------------------------------------------------------------

    def _deliver(self, msg: Message) -> None:
        emitter = self._emitter
        if "message" in emitter._handlers and emitter._handlers["message"]:
            emitter.emit("message", msg)
            if not self._iterating:
                return
        self._queue.append(msg)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)
        if len(self._queue) > self._client.max_queue:
            self._client._paused_by = self

    def _on_message(self, data, seq: int) -> None:
        """The gap rule of protocol-v2.md, 'Client rules'."""
        if not seq:
            if self.state != LEFT:
                self._deliver(Message(self.room, data, 0, self.epoch))
            return
        if self.state != JOINED:
            return      # joining/recovering: whatever precedes the ack is covered by its replay
        pos = self.seq
        if pos is None or seq == pos + 1:
            self.seq = seq
            self._last_seq = None
            self._deliver(Message(self.room, data, seq, self.epoch))
        elif seq <= pos:
            if seq == self._last_seq:          # join "last": the latest publication, once
                self._last_seq = None
                self._deliver(Message(self.room, data, seq, self.epoch))
            elif self.epoch is None:
                # A server without history never replays: a seq going back means the room's
                # numbering restarted (e.g. Redis restarted empty). Say so, follow it.
                self.seq = seq - 1
                self._emit_reset("server_reset")
                self.seq = seq
                self._deliver(Message(self.room, data, seq, None))
            # else a duplicate (replay overlapping live): dropped silently
        else:
            self._client._recover(self)        # a gap: stop, ask for the missed range

    def _on_ack(self, doc: dict, since: Position | None, last: bool) -> None:
        """The ack of a join; `since` is what that join asked to resume from."""
        epoch = doc.get("epoch")
        top = doc.get("seq")
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            top = None
        if not isinstance(epoch, str):
            epoch = None
        was_joined = self._was_joined
        self._was_joined = True
        self._retry_attempt = 0
        self.state = JOINED
        self._last_seq = None
        if since is not None and doc.get("recovered") is True and epoch in (None, since.epoch):
            # The server replays since.seq+1..top next: the position stays where it is.
            self.epoch = since.epoch
            self._emit_joined(True, top, epoch)
            return
        # The position restarts from the ack (unknown without a seq: the next message sets it).
        self.epoch = epoch
        self.seq = top
        if last and top:
            self._last_seq = top
        self._emit_joined(False, top, epoch)
        if since is not None:
            self._emit_reset("not_recovered")
        elif was_joined:
            self._emit_reset("no_position")    # re-joined with nothing to resume from

    def _emit_joined(self, recovered: bool, seq, epoch) -> None:
        first = self._first
        if first is None:
            self._first = first = asyncio.get_running_loop().create_future()
        if not first.done():
            first.set_result(self)
        self._emitter.emit("joined", Joined(self.room, recovered, seq, epoch))

    def _emit_reset(self, reason: str) -> None:
        self._emitter.emit("reset", Reset(self.room, self.epoch, self.seq, reason))

    def _on_reset_op(self, epoch, seq) -> None:
        """{"op":"reset"}: the room's numbering restarted while we are in it."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            seq = None
        self.epoch = epoch if isinstance(epoch, str) else None
        self.seq = seq
        self._last_seq = None
        self._emit_reset("server_reset")

    def _finish(self, reason: str, error: BaseException | None = None, quiet: bool = False) -> None:
        """The subscription is over: wake the iterator (after its buffer) and the join waiter.
        quiet: the client itself ended (closed or stopped; the client's own events say so),
        so the subscription emits nothing; its iteration ends (raising `error` if given)."""
        if self.state == LEFT:
            return
        self.state = LEFT
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self._end = error if error is not None else _END
        first = self._first
        if first is not None and not first.done():
            first.set_exception(error if error is not None else ClientClosed(f"left {self.room!r}"))
            first.exception()   # retrieved: no "never retrieved" warning when nobody waits
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)
        if quiet:
            return
        if error is not None:
            self._emitter.emit("error", error)
        self._emitter.emit("left", Left(self.room, reason))
