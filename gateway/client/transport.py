"""The Python SDK's view of one WebSocket connection, and its implementation on `websockets`.

The client core (core.py) never touches `websockets` directly: it calls a `connect` function
returning a `Transport`. The default is `websockets_connect` below; tests pass a fake one
(tests/sdk/fakes.py) that scripts what the server sends. Contract:

    transport = await connect(url, headers=..., subprotocols=..., on_activity=callback)
        raises HandshakeRejected(status) when the server answers the upgrade with an HTTP
        status (401/403 stop the client), any other exception for a failed attempt
    transport.subprotocol        the negotiated subprotocol or None
    await transport.recv()       the next message (str or bytes); raises TransportClosed
                                 (code, reason) once the connection is closed
    await transport.send(frames) write every frame of the list in order, without yielding to
                                 the event loop between them (the re-joins of a reconnect
                                 leave in one go)
    await transport.ping()       send a ping (liveness); the pong shows up as activity
    await transport.close(code, reason)   closing handshake, then gone
    transport.abort()            drop the connection at once (dead peer)
    on_activity()                called for every read from the server, control frames
                                 included, so pings and pongs count as signs of life

Imports `websockets` only inside `websockets_connect`, so the SDK module imports without it.
Must not import any other gateway module.
"""
from __future__ import annotations

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
    async def send(self, frames: Sequence[str | bytes]) -> None: ...
    async def ping(self) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def abort(self) -> None: ...


class WebsocketsTransport:
    """A `websockets.asyncio.client.ClientConnection` behind the Transport contract."""

    __slots__ = ("ws", "subprotocol", "_closed_exc")

    def __init__(self, ws, closed_exc) -> None:
        self.ws = ws
        self.subprotocol = ws.subprotocol
        self._closed_exc = closed_exc

    async def recv(self):
        try:
            return await self.ws.recv()
        except self._closed_exc as exc:
            raise _closed_from(exc) from None

    async def send(self, frames) -> None:
        ws = self.ws
        try:
            # websockets writes each message to the transport before its first await (it only
            # awaits to drain past write_limit), so the frames leave in this loop pass.
            for frame in frames:
                await ws.send(frame)
        except self._closed_exc as exc:
            raise _closed_from(exc) from None

    async def ping(self) -> None:
        try:
            await self.ws.ping()   # the returned pong waiter is not awaited: activity says it
        except self._closed_exc as exc:
            raise _closed_from(exc) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        transport = self.ws.transport
        if transport is not None:
            transport.abort()


def _closed_from(exc) -> TransportClosed:
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is not None:
        return TransportClosed(rcvd.code, rcvd.reason)
    return TransportClosed(1006, "connection lost")


def websockets_connect(*, open_timeout: float | None = 10.0, max_size: int | None = 1 << 24,
                       compression: str | None = "deflate", write_limit: int = 1 << 18, ssl=None,
                       **extra) -> Callable:
    """A `connect` for the Client built on websockets (>= 13). Keyword arguments are passed to
    `websockets.asyncio.client.connect` (e.g. `proxy=None` on websockets >= 15, `origin=`);
    keepalive pings are the Client's job (ping_interval), so websockets' own are off."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

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
                       open_timeout=open_timeout, max_size=max_size, compression=compression,
                       write_limit=write_limit, ping_interval=None, ping_timeout=None,
                       create_connection=_Connection, **extra)
        if ssl is not None:
            options["ssl"] = ssl
        try:
            ws = await connect(url, **options)
        except InvalidStatus as exc:
            response = exc.response
            raise HandshakeRejected(response.status_code, response.reason_phrase or "") from None
        ws.on_activity = on_activity
        return WebsocketsTransport(ws, ConnectionClosed)

    return connect_websockets
