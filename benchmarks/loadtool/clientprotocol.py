"""The life cycle every load-tool client connection shares (after wsclient's upgrade).

`ClientProtocol` holds the connection's mask key and transport and two futures:
`closed` (the server's close frame or EOF arrived) and `lost` (the TCP connection is
gone), which echo.close_all() waits on. It answers the server's close frame once, starts
the close handshake (`begin_close`), and reports a connection that dies before we began
closing through the `lost_early` hook. Modes subclass it and keep only their own
`data_received`; nothing here runs per message.
"""
import asyncio

from gateway_ext import Opcode

from . import wsclient


def close_code(payload: bytes) -> int:
    """Status code of a close frame's payload (1005: none given, RFC 6455 section 7.1.5)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


class ClientProtocol(asyncio.Protocol):
    __slots__ = ("mask", "transport", "closing", "closed", "lost")

    def __init__(self) -> None:
        self.mask = wsclient.random_mask()
        self.transport = None
        self.closing = False
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()   # the server's close frame or EOF arrived
        self.lost = loop.create_future()     # the TCP connection is gone

    def pong(self, payload: bytes) -> None:
        self.transport.write(wsclient.client_frame(Opcode.PONG, payload, self.mask))

    def close_received(self, payload: bytes):
        """The server's close frame: answer it (once) and mark `closed`.

        Returns its status code if the server closed first (we had not begun closing),
        else None (it answered our close).
        """
        code = None
        if not self.closing:
            code = close_code(payload)
            self.closing = True
            self.transport.write(wsclient.close_frame(self.mask))
        if not self.closed.done():
            self.closed.set_result(None)
        # RFC 6455 section 7.1.1: the server closes TCP first; close_all() waits a little
        # for its EOF before closing from this side.
        return code

    def begin_close(self) -> None:
        if not self.closing and not self.transport.is_closing():
            self.closing = True
            self.transport.write(wsclient.close_frame(self.mask))

    def eof_received(self):
        if not self.closed.done():
            self.closed.set_result(None)
        return False  # close the transport: nothing useful can follow

    def connection_lost(self, exc) -> None:
        if not self.closing:
            self.closing = True
            self.lost_early(exc)
        for future in (self.closed, self.lost):
            if not future.done():
                future.set_result(None)

    def lost_early(self, exc) -> None:
        """Hook: the connection went away before we began closing it (usually an error)."""


def lost_reason(what: str, exc) -> str:
    """`what lost`, with the exception's type when there is one."""
    return f"{what} lost" if exc is None else f"{what} lost: {type(exc).__name__}"


async def acked(protocols, timeout: float) -> list:
    """Wait up to `timeout` for the protocols' `joined` futures; those whose join was acknowledged."""
    if protocols:
        await asyncio.wait([p.joined for p in protocols], timeout=timeout)
    return [p for p in protocols if p.joined.done() and p.joined.exception() is None]
