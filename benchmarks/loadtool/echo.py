"""Echo mode: every connection keeps K messages in flight against an echo endpoint.

Each connection writes K identical frames in one write at the start; whenever a read
brings back n echoes it writes n replacements, again in one write. The frame is built
once per connection (wsclient: fixed random mask key) and a batch is just `frame * n`.

Counting echoes cheaply: an echo server returns exactly the unmasked frame we sent, so a
read holding n whole echoes is byte-for-byte `expect * n` (plus maybe the start of the
next). `bytes.count` checks that at memchr speed without allocating a frame object; if
the occurrences tile the data exactly, every frame was a correct echo. Anything else
(pings, a close, fragmented or different frames) falls back to gateway_ext's FrameParser
until the stream is frame-aligned again. So the client spends ~1 µs per read, not per
message, and one client core outruns a server doing several 100k msgs/s.

Latency is sampled, one probe per connection at a time: the last frame of a batch is
stamped when written; the read that brings its echo back (the echoes arrive in order)
records now - stamp and a new probe starts with the next batch. That gives about one
sample per round trip per connection and costs one perf_counter() per read.
"""
import asyncio
from array import array
from time import perf_counter

from gateway_ext import FrameError, FrameParser, Opcode

from . import fastclient, wsclient
from .clientprotocol import ClientProtocol, lost_reason
from .modes import Mode

_MAX_FRAME = 1 << 26
# Connections opened at once: enough to hide connect latency, few enough that a server's
# accept backlog (often 100-511) does not overflow and turn into SYN retries.
_OPEN_CONCURRENCY = 128


class _Shared:
    """State shared by all connections of one worker process (read in the hot path)."""

    __slots__ = ("received", "sending", "measuring", "latencies", "result", "open")

    def __init__(self, result) -> None:
        self.received = 0
        self.sending = True
        self.measuring = False
        self.latencies = array("d")
        self.result = result
        self.open = set()


class EchoProtocol(ClientProtocol):
    __slots__ = (
        "_shared", "_frame", "_expect", "_flen", "_inflight", "_tail", "_slow", "_parser",
        "sent", "recv", "_probe", "_probe_t",
    )

    def __init__(self, shared: _Shared, opcode: int, payload: bytes, inflight: int) -> None:
        super().__init__()
        self._shared = shared
        self._frame = wsclient.client_frame(opcode, payload, self.mask)
        self._expect = wsclient.server_frame(opcode, payload)
        self._flen = len(self._expect)
        self._inflight = inflight
        self._tail = b""          # start of an echo whose rest has not arrived yet
        self._slow = False        # True while the FrameParser holds a partial frame
        self._parser = None       # created on first need
        self.sent = 0
        self.recv = 0
        self._probe = 0           # echo count that completes the probed frame; 0 = none
        self._probe_t = 0.0

    @property
    def _mask(self) -> bytes:
        return self.mask

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._shared.open.add(self)

    def start(self) -> None:
        self.transport.write(self._frame * self._inflight)
        self.sent = self._inflight

    def data_received(self, data: bytes) -> None:
        if self._slow:
            n = self._parse(data)
        else:
            tail = self._tail
            if tail:
                data = tail + data
            size = len(data)
            n = size // self._flen
            end = n * self._flen
            expect = self._expect
            if data.count(expect, 0, end) == n and (end == size or expect.startswith(data[end:])):
                self._tail = data[end:] if end != size else b""
            else:
                self._tail = b""
                n = self._parse(data)
        if not n:
            return
        shared = self._shared
        shared.received += n
        self.recv += n
        if shared.sending:
            if shared.measuring:
                now = perf_counter()
                probe = self._probe
                if probe and self.recv >= probe:
                    shared.latencies.append(now - self._probe_t)
                    probe = 0
                if not probe:
                    self._probe = self.sent + n
                    self._probe_t = now
            self.transport.write(self._frame * n)
            self.sent += n

    def _parse(self, data: bytes) -> int:
        """General path: parse real frames; returns the number of complete data messages."""
        parser = self._parser
        if parser is None:
            parser = self._parser = FrameParser(_MAX_FRAME, require_mask=False)
        try:
            frames = parser.feed(data)
        except FrameError as exc:
            self._fail(f"bad frame from server: {exc}")
            return 0
        n = 0
        for opcode, fin, _rsv1, payload in frames:
            if opcode <= Opcode.BINARY:
                n += fin
            elif opcode == Opcode.PING:
                self.pong(payload)
            elif opcode == Opcode.CLOSE:
                code = self.close_received(payload)
                if code is not None:
                    self._shared.result.error(f"server closed the connection ({code})")
                break
        self._slow = parser.buffered > 0
        return n

    def _fail(self, reason: str) -> None:
        if not self.closing:
            self._shared.result.error(reason)
            self.closing = True
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        self._shared.open.discard(self)
        super().connection_lost(exc)

    def lost_early(self, exc) -> None:
        self._shared.result.error(lost_reason("connection", exc))


async def open_connections(ctx, result, make_protocol, count: int, first: int) -> list:
    """Open `count` WebSockets concurrently (bounded), counting failures as errors."""
    params = ctx.params
    sources = ctx.sources(first)
    gate = asyncio.Semaphore(_OPEN_CONCURRENCY)
    headers = tuple(params.header or ())

    async def one(source):
        async with gate:
            protocol = make_protocol()
            try:
                async with asyncio.timeout(params.connect_timeout):
                    await wsclient.open_websocket(ctx.target, protocol, source, headers)
            except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                result.error(f"connect: {_reason(exc)}")
                return None
            return protocol

    opened = await asyncio.gather(*(one(sources.next()) for _ in range(count)))
    return [p for p in opened if p is not None]


# After the server's close frame, how long to wait for it to close TCP before we do.
_EOF_GRACE = 0.5


async def close_all(protocols, timeout: float, result) -> None:
    """Close handshake on every connection, bounded by `timeout`; abort the stragglers.

    A connection whose server neither answers the close frame nor closes TCP within
    `timeout` counts as an error ("close handshake timed out").
    """
    pending = [p for p in protocols if not p.closed.done()]
    for p in pending:
        p.begin_close()
    if pending:
        _done, still = await asyncio.wait([p.closed for p in pending], timeout=timeout)
        for _ in still:
            result.error("close handshake timed out")
    lingering = [p.lost for p in protocols if not p.lost.done()]
    if lingering:
        await asyncio.wait(lingering, timeout=min(_EOF_GRACE, timeout))
    for p in protocols:
        if not p.lost.done():
            p.transport.abort()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return str(exc)[:80] if isinstance(exc, wsclient.HandshakeError) else type(exc).__name__


def payload_of(size: int) -> bytes:
    """Printable ASCII, so the same bytes are valid in a text frame."""
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return (alphabet * (size // len(alphabet) + 1))[:size]


class EchoMode(Mode):
    name = "echo"
    help = "K messages in flight per connection against an echo endpoint; msgs/s and latency"
    unit = "msgs/s"
    rate_key = "msgs_per_s"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--connections", type=int, default=100, help="connections in total (default 100)")
        parser.add_argument("--inflight", type=int, default=16, help="messages in flight per connection (default 16)")
        parser.add_argument("--size", type=int, default=32, help="payload bytes (default 32)")
        parser.add_argument("--binary", action="store_true", help="binary frames (default: text)")

    def params(self, args) -> dict:
        return {
            "connections": args.connections, "inflight": args.inflight, "size": args.size,
            "binary": args.binary,
        }

    async def prepare(self, ctx, result):
        params = ctx.params
        first, count = ctx.share(params.connections)
        shared = _Shared(result)
        opcode = Opcode.BINARY if params.binary else Opcode.TEXT
        payload = payload_of(params.size)
        protocols = await open_connections(
            ctx, result, lambda: EchoProtocol(shared, opcode, payload, params.inflight), count, first
        )
        result.extra["connections"] = len(protocols)
        return shared, protocols

    async def run(self, ctx, prepared, result) -> None:
        if prepared is None:
            return
        params = ctx.params
        shared, protocols = prepared
        if params.client_impl == "compiled":
            self._run_compiled(ctx, shared, protocols, result)
            await close_all(protocols, params.close_timeout, result)
            return
        for p in protocols:
            if not p.closing:
                p.start()
        await asyncio.sleep(params.warmup)
        meter = ctx.cpu_meter()
        meter.start()
        start_count, start = shared.received, perf_counter()
        shared.measuring = True
        await asyncio.sleep(params.duration)
        result.count = shared.received - start_count
        result.elapsed = perf_counter() - start
        meter.stop(result.extra)
        shared.measuring = False
        shared.sending = False
        result.latencies = shared.latencies
        await close_all(protocols, params.close_timeout, result)

    def _run_compiled(self, ctx, shared, protocols, result) -> None:
        """Warmup + window in _fastclient's epoll loop on the upgraded sockets; then the
        protocols take their connections back in the state the loop left them."""
        params = ctx.params
        live = [p for p in protocols if not p.closing]
        for p in live:
            p.transport.pause_reading()
        meter = ctx.cpu_meter()
        expect = live[0]._expect if live else b""
        if not live:
            result.count, result.elapsed = 0, params.duration
            return
        out = fastclient.module().run_echo(
            [p.transport.get_extra_info("socket").fileno() for p in live],
            [p._frame for p in live], [p.mask for p in live], expect, params.inflight,
            params.warmup, params.duration, params.close_timeout,
            meter.start, lambda: meter.stop(result.extra), result.error,
        )
        shared.sending = False
        for p, (alive, closing, partial, slow, sent, recv) in zip(live, out["states"]):
            p.sent, p.recv = sent, recv
            if not alive or closing:
                p.closing = True                  # counted by the compiled loop already
                if not p.closed.done():
                    p.closed.set_result(None)
                if not alive:
                    p.transport.abort()
                continue
            p._tail = partial
            if slow:
                p._parse(slow)                    # a frame header/payload cut by the window's end
            p.transport.resume_reading()
        shared.received += out["count"]
        result.count = out["count"]
        result.elapsed = out["elapsed"]
        result.latencies = out["latencies"]
