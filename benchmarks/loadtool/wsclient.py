"""The client side of RFC 6455 that every mode shares: URL, upgrade handshake, frames, sockets.

No WebSocket library here: the handshake is one pre-formatted request and a check of the
101 response (section 4.1), and frames come from gateway_ext's `encode_frame` (Cython when
built). After the upgrade, `open_websocket` swaps the transport over to the mode's own
asyncio.Protocol (`transport.set_protocol`), so a mode's `data_received` carries no
handshake branch on its hot path.

Masking (section 5.3): each connection picks 4 random bytes once and masks every frame it
sends with that same key, so a frame can be built once and written many times. Servers
still do real unmasking work (a zero key would let a server skip it and flatter it), but
the key is not fresh per frame as the RFC asks of browsers; that guards against proxy
cache poisoning, which does not apply to a load tool talking to a server directly.

Imports only the standard library and gateway_ext.
"""
import asyncio
import base64
import hashlib
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway_ext import Opcode, encode_frame

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_MAX_RESPONSE_HEAD = 16 * 1024
# Linux: defer the ephemeral port choice from bind() to connect(), so a source address
# can reuse one port towards different destinations (not in every `socket` build).
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class HandshakeError(Exception):
    """The server did not upgrade the connection (bad status, missing/wrong accept)."""


@dataclass(frozen=True)
class Target:
    host: str            # numeric address to connect to
    port: int
    path: str            # path + query sent in the request line
    host_header: str     # what the URL said, for the Host header
    family: int

    @property
    def url(self) -> str:
        return f"ws://{self.host_header}{self.path}"


def parse_url(url: str) -> Target:
    """Parse a ws:// URL and resolve its host once (not on every connect)."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL without a host: {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    family, _, _, _, sockaddr = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)[0]
    return Target(host=sockaddr[0], port=port, path=path, host_header=parts.netloc, family=family)


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """Sec-WebSocket-Accept the server must return for `key` (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def upgrade_request(target: Target, key: bytes, extra_headers=()) -> bytes:
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        *extra_headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_response(head: bytes, expected_accept: bytes) -> None:
    """Raise HandshakeError unless `head` (up to the blank line) is a valid 101."""
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"101":
        raise HandshakeError(f"status {status_line[:80].decode('latin-1', 'replace')!r}")
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != expected_accept:
                raise HandshakeError("wrong Sec-WebSocket-Accept")
            return
    raise HandshakeError("no Sec-WebSocket-Accept header")


def random_mask() -> bytes:
    return os.urandom(4)


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """A masked client frame, built once and reused for every send."""
    return encode_frame(opcode, payload, mask=mask)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """The unmasked frame a server sends for `payload` (what an echo server returns)."""
    return encode_frame(opcode, payload)


def close_frame(mask: bytes, code: int = 1000) -> bytes:
    return encode_frame(Opcode.CLOSE, code.to_bytes(2, "big"), mask=mask)


def make_socket(target: Target, source_address: str | None) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # Small frames must leave at once: Nagle would batch them and inflate latency.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_address:
            if target.family == socket.AF_INET:
                try:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                except OSError:
                    pass  # not Linux: bind() picks the port, still per source address
            sock.bind((source_address, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class _UpgradeProtocol(asyncio.Protocol):
    """Sends the upgrade request and waits for the 101; keeps any bytes that follow it."""

    def __init__(self, request: bytes, expected_accept: bytes, done: asyncio.Future) -> None:
        self._request = request
        self._accept = expected_accept
        self._done = done
        self._buf = b""
        self.leftover = b""       # bytes after the response head (early frames)
        self.lost = None          # set when the connection died before the swap

    def connection_made(self, transport) -> None:
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            self.leftover += data  # frames that arrive before the mode protocol takes over
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_RESPONSE_HEAD:
                self._done.set_exception(HandshakeError("response head too long"))
            return
        try:
            check_response(self._buf[:end], self._accept)
        except HandshakeError as exc:
            self._done.set_exception(exc)
            return
        self.leftover = self._buf[end + 4:]
        self._buf = b""
        self._done.set_result(None)

    def eof_received(self):
        return False  # close the transport: nothing useful can follow

    def connection_lost(self, exc) -> None:
        self.lost = exc or ConnectionResetError("closed by the server")
        if not self._done.done():
            self._done.set_exception(HandshakeError(f"connection lost during the upgrade: {self.lost!r}"))


async def open_websocket(target: Target, protocol, source_address: str | None = None, extra_headers=()):
    """Connect, upgrade, then hand the transport to `protocol` (an asyncio.Protocol).

    Returns the transport. The caller bounds the time (asyncio.timeout); on any failure
    the socket is closed and the exception propagates. `protocol.connection_made` is
    called after the upgrade, then `data_received` with any early frames.
    """
    loop = asyncio.get_running_loop()
    key = new_key()
    done = loop.create_future()
    upgrade = _UpgradeProtocol(upgrade_request(target, key, extra_headers), accept_for(key), done)
    transport = None
    try:
        if source_address:
            sock = make_socket(target, source_address)
            try:
                await loop.sock_connect(sock, (target.host, target.port))
            except BaseException:
                sock.close()
                raise
            transport, _ = await loop.create_connection(lambda: upgrade, sock=sock)
        else:
            transport, _ = await loop.create_connection(lambda: upgrade, target.host, target.port)
        await done
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    if upgrade.lost is not None:
        raise HandshakeError(f"connection lost right after the upgrade: {upgrade.lost!r}")
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if upgrade.leftover:
        protocol.data_received(upgrade.leftover)
    return transport


class SourceAddresses:
    """Round-robin over `--source-address` values (None: let the kernel choose).

    Every source address has its own ~28k ephemeral ports towards one server port, so N
    addresses in 127.0.0.0/8 allow N times more concurrent connections.
    """

    def __init__(self, addresses, start: int = 0) -> None:
        self._addresses = list(addresses) or [None]
        self._next = start % len(self._addresses)

    def next(self):
        address = self._addresses[self._next]
        self._next = (self._next + 1) % len(self._addresses)
        return address
