"""The Python SDK's view of one WebSocket connection, and its implementation on `websockets`.

The client core (core.py) never touches `websockets` directly: it calls a `connect` function
returning a `Transport`. The default is `websockets_connect` below; tests pass a fake one
(tests/client_fakes.py) that scripts what the server sends. Contract:

    transport = await connect(url, headers=..., subprotocols=..., on_activity=callback)
        raises HandshakeRejected(status) when the server answers the upgrade with an HTTP
        status (401/403 stop the client); any other exception is a failed attempt
    transport.subprotocol        the negotiated subprotocol or None
    await transport.recv()       the next message (str or bytes); raises TransportClosed
                                 (code, reason) once the connection is closed
    transport.send(frames)       write the frames, in order, now (synchronous: what the client
                                 writes before emitting an event is on the wire before the
                                 event's callbacks run; the re-joins of a reconnect are one
                                 call); silently nothing once the connection is closing
    transport.ping()             send a WebSocket ping (liveness); its pong is activity
    await transport.close(code, reason)   closing handshake, then gone
    on_activity()                called for every read from the server, control frames
                                 included, so pings and pongs count as signs of life

Imports `websockets` only inside `websockets_connect`, so the SDK imports without it.
Must not import any other gateway module.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, Sequence


class TransportClosed(Exception):
    """The connection is closed; `code` is the close frame's code (1006 when none came)."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class HandshakeRejected(Exception):
    """The server refused the WebSocket upgrade with an HTTP status (RFC 6455 section 4.1:
    anything but 101)."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class Transport(Protocol):
    subprotocol: str | None

    async def recv(self) -> str | bytes: ...
    def send(self, frames: Sequence[str | bytes]) -> None: ...
    def ping(self) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class WebsocketsTransport:
    """A `websockets.asyncio.client.ClientConnection` behind the Transport contract.

    Writes go through the connection's sans-I/O protocol and its `send_data()`, which is
    what websockets' own `send()` does on exit of its send context; calling them directly
    makes a write synchronous (no task per frame, the frames of one call leave together).
    """

    __slots__ = ("ws", "subprotocol", "_protocol", "_closed_exc", "_open")

    def __init__(self, ws, closed_exc, open_state) -> None:
        self.ws = ws
        self.subprotocol = ws.subprotocol
        self._protocol = ws.protocol
        self._closed_exc = closed_exc
        self._open = open_state

    async def recv(self):
        try:
            # Text frames as bytes: orjson/json/msgpack parse UTF-8 bytes directly, so
            # websockets need not build a str first (orjson validates the UTF-8 itself).
            return await self.ws.recv(decode=False)
        except self._closed_exc as exc:
            raise _closed_from(exc) from None

    def send(self, frames) -> None:
        protocol = self._protocol
        if protocol.state is not self._open:
            return          # closing: the read side reports how it ended
        for frame in frames:
            if type(frame) is str:
                protocol.send_text(frame.encode())
            else:
                protocol.send_binary(frame)
        self.ws.send_data()

    def ping(self) -> None:
        protocol = self._protocol
        if protocol.state is self._open:
            protocol.send_ping(os.urandom(4))
            self.ws.send_data()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


def _closed_from(exc) -> TransportClosed:
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is not None:
        return TransportClosed(rcvd.code, rcvd.reason)
    return TransportClosed(1006, "connection lost")


def websockets_connect(*, max_size: int | None = 1 << 24, compression: str | None = "deflate",
                       close_timeout: float = 2.0, ssl=None, **extra) -> Callable:
    """A `connect` for the Client built on websockets (>= 13). Keyword arguments are passed to
    `websockets.asyncio.client.connect` (e.g. `proxy=None` on websockets >= 15, `origin=`).
    Keepalive pings are the Client's job (ping_interval), so websockets' own are off; the
    connect deadline is the Client's connect_timeout. close_timeout bounds how long a close
    waits for the server's close frame (a dead server must not delay the reconnect)."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.protocol import State

    class _Connection(ClientConnection):
        on_activity: Callable[[], None] | None = None

        def data_received(self, data: bytes) -> None:
            # Any bytes from the server prove it is alive: messages, pings, pongs.
            hook = self.on_activity
            if hook is not None:
                hook()
            super().data_received(data)

    async def connect_websockets(url: str, *, headers: dict, subprotocols: list, on_activity: Callable[[], None]):
        options = dict(additional_headers=headers or None, subprotocols=subprotocols or None,
                       open_timeout=None, max_size=max_size, compression=compression,
                       close_timeout=close_timeout, ping_interval=None, ping_timeout=None,
                       create_connection=_Connection, **extra)
        if ssl is not None:
            options["ssl"] = ssl
        try:
            ws = await connect(url, **options)
        except InvalidStatus as exc:
            response = exc.response
            raise HandshakeRejected(response.status_code, response.reason_phrase or "") from None
        ws.on_activity = on_activity
        return WebsocketsTransport(ws, ConnectionClosed, State.OPEN)

    return connect_websockets
