"""Handshake mode: open a WebSocket, close it, repeat, from C concurrent loops.

One cycle = TCP connect + HTTP upgrade (the timed part: "handshake latency" is connect
start to a validated 101) + our close frame + the server's close frame or EOF. A cycle
counts when it completes inside the measurement window.

After the server's close frame the cycle is done, but the socket is left open briefly
for the server's FIN (RFC 6455 section 7.1.1: the server closes TCP first). That keeps
TIME_WAIT on the server side, so the client does not burn its ephemeral ports.
"""
import asyncio
import os
import resource
from time import perf_counter

from . import fastclient, wsclient
from .modes import Mode

# After the server's close frame, how long the socket may wait for the server's FIN.
_EOF_GRACE = 1.0
# After an error, pause this long so a refused port does not become a busy loop.
_ERROR_BACKOFF = 0.01
# The compiled client cycles through this many pre-built requests (random keys, their
# accept values computed once): SHA-1 and base64 per handshake are not the server's cost.
_KEY_POOL = 64


class _CloseWaiter(asyncio.Protocol):
    """Sends our close frame on demand; `done` resolves on the server's close frame or EOF."""

    __slots__ = ("transport", "done", "_mask", "_buf", "_linger", "_live")

    def __init__(self, loop, live: set) -> None:
        self._live = live           # connections of this worker not yet lost
        self.transport = None
        self.done = loop.create_future()
        self._mask = wsclient.random_mask()
        self._buf = b""
        self._linger = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._live.add(self)

    def send_close(self) -> None:
        self.transport.write(wsclient.close_frame(self._mask))

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # the cycle is over; only the server's FIN matters now
        # Only a close frame (opcode 8) is expected; skip whole frames until one arrives.
        # Frames here are tiny, so a minimal header walk is enough (no masking from servers).
        buf = self._buf + data
        pos = 0
        while len(buf) - pos >= 2:
            length = buf[pos + 1] & 0x7F
            header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if len(buf) - pos < header:
                break
            if length >= 126:
                length = int.from_bytes(buf[pos + 2:pos + header], "big")
            if len(buf) - pos < header + length:
                break
            if buf[pos] & 0x0F == 0x8:
                self._finish()
                self._linger = asyncio.get_running_loop().call_later(_EOF_GRACE, self.transport.close)
                self._buf = b""
                return
            pos += header + length
        self._buf = buf[pos:]

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._live.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class HandshakeMode(Mode):
    name = "handshake"
    help = "open (connect + upgrade) and close WebSockets repeatedly; handshakes/s and latency"
    unit = "handshakes/s"
    rate_key = "handshakes_per_s"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--concurrency", type=int, default=50, help="concurrent open/close loops in total (default 50)")

    def params(self, args) -> dict:
        return {"concurrency": args.concurrency}

    async def run(self, ctx, prepared, result) -> None:
        if ctx.params.client_impl == "compiled":
            self._run_compiled(ctx, result)
            return
        params = ctx.params
        loop = asyncio.get_running_loop()
        first, count = ctx.share(params.concurrency)
        sources = ctx.sources(first)
        headers = tuple(params.header or ())
        start = perf_counter()
        window_start = start + params.warmup
        window_end = window_start + params.duration
        latencies = result.latencies
        counted = 0
        live = set()
        meter = ctx.cpu_meter()
        loop.call_later(params.warmup, meter.start)
        loop.call_later(params.warmup + params.duration, meter.stop, result.extra)

        async def cycle_loop() -> None:
            nonlocal counted
            while perf_counter() < window_end:
                protocol = _CloseWaiter(loop, live)
                t0 = perf_counter()
                try:
                    async with asyncio.timeout(params.connect_timeout):
                        await wsclient.open_websocket(ctx.target, protocol, sources.next(), headers)
                        t1 = perf_counter()
                        protocol.send_close()
                        await protocol.done
                except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                    result.error(_reason(exc))
                    if protocol.transport is not None:
                        protocol.transport.abort()
                    await asyncio.sleep(_ERROR_BACKOFF)
                    continue
                t2 = perf_counter()
                if window_start <= t2 < window_end:
                    counted += 1
                    latencies.append(t1 - t0)

        await asyncio.gather(*(cycle_loop() for _ in range(count)))
        result.count = counted
        result.elapsed = params.duration
        # Sockets still waiting for the server's FIN: give it the grace, then abort.
        deadline = perf_counter() + min(_EOF_GRACE, params.close_timeout)
        while live and perf_counter() < deadline:
            await asyncio.sleep(0.02)
        for protocol in list(live):
            protocol.transport.abort()


    def _run_compiled(self, ctx, result) -> None:
        """The same cycles in _fastclient's epoll loop (blocks this worker's event loop,
        which has nothing else to do meanwhile)."""
        params = ctx.params
        first, count = ctx.share(params.concurrency)
        headers = tuple(params.header or ())
        keys = [wsclient.new_key() for _ in range(_KEY_POOL)]
        requests = [wsclient.upgrade_request(ctx.target, key, headers) for key in keys]
        accepts = [wsclient.accept_for(key) for key in keys]
        sources = list(params.source_address or ())
        if sources:   # each worker starts its round-robin at its global index, as SourceAddresses does
            start = first % len(sources)
            sources = sources[start:] + sources[:start]
        meter = ctx.cpu_meter()
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        maxfd = min(soft if soft != resource.RLIM_INFINITY else 1 << 20, 1 << 22)
        counted, latencies = fastclient.module().run_handshake(
            ctx.target.host, ctx.target.port, requests, accepts, wsclient.close_frame(os.urandom(4)),
            count, params.warmup, params.duration, params.connect_timeout, params.close_timeout,
            sources, meter.start, lambda: meter.stop(result.extra), result.error, maxfd,
        )
        result.count = counted
        result.elapsed = params.duration
        result.latencies = latencies


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, wsclient.HandshakeError):
        return f"handshake: {str(exc)[:80]}"
    return type(exc).__name__
