"""Slow mode: a share of a room's subscribers read slowly; do the fast ones notice?

    python -m benchmarks.loadtool slow --url ws://127.0.0.1:8080/ws --subscribers 1000 \
        --slow-share 0.1 --publish-rate 500 --size 64 --duration 10

S subscribers join one room; a publisher publishes `--publish-rate` messages a second
(`{"k":N,...}` data of `--size` bytes). `--slow-share` of the subscribers are slow
readers: their socket receive buffer is capped at `--slow-rcvbuf` bytes and they read
once every `--slow-interval` seconds (pause_reading in between), so they take about
rcvbuf / interval bytes a second and the server's per-connection output must pile up.
What a server should do then is its slow-consumer policy (the gateway's: queue up to
`max_queue_bytes`, then disconnect with 4000 or drop and tell the client); what it must
NOT do is let the slow ones slow the others down, or grow without bound.

Reported: `rate` = deliveries/s to the FAST subscribers, time from publish to the last
fast subscriber (p50/p99), and in `extra`: `fast_gaps` (messages a fast subscriber
missed: must be 0), `slow_closed` (slow subscribers the server closed, by close code or
"lost" for a reset; found after the window, when slow readers read everything the server
had sent them at full speed for up to `--catch-up` seconds),
`slow_dropped_notices` (`{"op":"dropped"}` messages they got), `slow_messages`, and with
`--server-pid`/`--server-pgid` the server's RSS before and after (bounded queues keep
it flat). A fast subscriber losing its connection is an error; slow ones being closed is
reported, not an error. Run with `--procs 1` (the publisher times every fast subscriber).
"""
import asyncio
import socket
from array import array
from collections import Counter
from time import perf_counter

import orjson
from gateway_ext import FrameError, FrameParser, Opcode

from . import serverproc, wsclient
from .clientprotocol import ClientProtocol, acked
from .echo import close_all, open_connections
from .fanout import data_of
from .lowwater import LowWater
from .modes import Mode

_MESSAGE = b'{"op":"message"'


class _Shared(LowWater):
    """Fast subscribers per last-seen k (the lowest k all fast ones have) and slow-side counters."""

    __slots__ = ("result", "sent_at", "latencies", "measuring", "deliveries", "gaps",
                 "slow_messages", "slow_closed", "slow_dropped", "join", "open", "running")

    def __init__(self, result, room: str) -> None:
        super().__init__()
        self.result = result
        self.sent_at: dict = {}
        self.latencies = array("d")
        self.measuring = False
        self.deliveries = 0
        self.gaps = 0
        self.slow_messages = 0
        self.slow_closed: Counter = Counter()
        self.slow_dropped = 0
        self.join = orjson.dumps({"op": "join", "room": room, "id": 1})
        self.open = set()
        self.running = True

    def completed(self, old_low: int, low: int) -> None:
        now = perf_counter()
        for k in range(old_low + 1, low + 1):
            t = self.sent_at.pop(k, None)
            if t is not None and self.measuring:
                self.latencies.append(now - t)


class Subscriber(ClientProtocol):
    __slots__ = ("shared", "slow", "parser", "k", "joined", "reader")

    def __init__(self, shared: _Shared, slow: bool) -> None:
        super().__init__()
        self.shared = shared
        self.slow = slow
        self.parser = FrameParser(1 << 20, require_mask=False)
        self.k = 0
        self.reader = None
        self.joined = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.shared.open.add(self)
        transport.write(wsclient.client_frame(Opcode.TEXT, self.shared.join, self.mask))

    def start_slow(self, rcvbuf: int, interval: float) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
        self.transport.pause_reading()
        self.reader = asyncio.ensure_future(self._read_now_and_then(interval))

    async def _read_now_and_then(self, interval: float) -> None:
        while not self.closing and self.shared.running:
            await asyncio.sleep(interval)
            if self.transport.is_closing():
                return
            self.transport.resume_reading()   # one read, then data_received pauses again

    def catch_up(self) -> None:
        """Read at full speed from now on (to see what the server did: a close frame, a reset)."""
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.slow and self.reader is not None and not self.closing:
            self.transport.pause_reading()
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self.shared.result.error(f"bad frame: {exc}"[:80])
            self.closing = True
            self.transport.abort()
            return
        shared = self.shared
        last = None
        n = 0
        for opcode, _fin, _rsv1, payload in frames:
            if opcode == Opcode.TEXT:
                if payload.startswith(_MESSAGE):
                    n += 1
                    last = payload
                elif payload.startswith(b'{"op":"ack"'):
                    if not self.joined.done():
                        self.joined.set_result(None)
                elif payload.startswith(b'{"op":"dropped"'):
                    shared.slow_dropped += 1
            elif opcode == Opcode.PING:
                self.pong(payload)
            elif opcode == Opcode.CLOSE:
                code = self.close_received(payload)
                if code is not None:
                    if self.slow:
                        shared.slow_closed[str(code)] += 1
                    else:
                        shared.result.error(f"server closed a fast subscriber ({code})")
                return
        if not n:
            return
        if self.slow:
            shared.slow_messages += n
            return
        i = last.find(b'"k":')
        k = int(last[i + 4:last.find(b",", i)])
        if k > self.k:
            if self.k and k - self.k > n:
                shared.gaps += k - self.k - n
            old, self.k = self.k, k
            shared.deliveries += n
            shared.advanced(old, k)

    def begin_close(self) -> None:
        if self.closing or self.transport.is_closing():
            return
        self.closing = True
        if self.slow:
            # Behind it wait megabytes it never read: a slow client that leaves just goes away.
            self.transport.abort()
            return
        self.transport.write(wsclient.close_frame(self.mask))

    def connection_lost(self, exc) -> None:
        self.shared.open.discard(self)
        super().connection_lost(exc)
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("lost before the join's ack"))

    def lost_early(self, exc) -> None:
        if self.slow:
            self.shared.slow_closed["lost"] += 1
        else:
            self.shared.result.error("fast subscriber lost")


class _Publisher(ClientProtocol):
    __slots__ = ("shared", "parser")

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared = shared
        self.parser = FrameParser(1 << 20, require_mask=False)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError:
            return
        for opcode, _fin, _rsv1, payload in frames:
            if opcode == Opcode.PING:
                self.pong(payload)
            elif opcode == Opcode.TEXT and b'"op":"error"' in payload:
                self.shared.result.error(f"publish refused: {payload[:60]!r}")
            elif opcode == Opcode.CLOSE and not self.closed.done():
                self.closed.set_result(None)

    def lost_early(self, exc) -> None:
        self.shared.result.error("publisher lost")


class SlowMode(Mode):
    name = "slow"
    help = "a share of a room's subscribers read slowly while publications flow; fast subscribers' rate and latency"
    unit = "deliveries/s (fast subscribers)"
    rate_key = "fast_deliveries_per_s"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--subscribers", type=int, default=1000, help="subscribers in the room (default 1000)")
        parser.add_argument("--slow-share", type=float, default=0.1, help="share of slow readers (default 0.1)")
        # Not smaller than the loopback MSS (64 KiB): below it the receiver's window updates
        # stall and the sender falls back to zero-window probes (a TCP artefact, not slowness).
        parser.add_argument("--slow-rcvbuf", type=int, default=65536, help="slow readers' SO_RCVBUF (default 65536)")
        parser.add_argument("--slow-interval", type=float, default=0.5,
                            help="seconds between a slow reader's reads (default 0.5)")
        parser.add_argument("--publish-rate", type=float, default=500.0, help="publications/s (default 500)")
        parser.add_argument("--size", type=int, default=64, help="bytes of JSON data per publication (default 64)")
        parser.add_argument("--room", default="slow", help="room name (default slow)")
        parser.add_argument("--catch-up", type=float, default=10.0,
                            help="after the window, slow readers read at full speed for up to this many "
                                 "seconds to see what the server did to them (default 10)")
        serverproc.add_arguments(parser)

    def params(self, args) -> dict:
        return {"subscribers": args.subscribers, "slow_share": args.slow_share, "publish_rate": args.publish_rate,
                "size": args.size, "slow_rcvbuf": args.slow_rcvbuf, "slow_interval": args.slow_interval}

    def before_workers(self, params) -> None:
        params.rss_before = serverproc.rss_bytes(**serverproc.target_of(params))

    async def prepare(self, ctx, result):
        params = ctx.params
        if ctx.procs != 1:
            raise SystemExit("slow: run it with --procs 1 (the publisher times every fast subscriber)")
        if not 0 <= params.slow_share < 1 or params.publish_rate <= 0:
            raise SystemExit("slow: --slow-share must be in [0, 1) and --publish-rate > 0")
        shared = _Shared(result, params.room)
        n_slow = int(params.subscribers * params.slow_share)
        made = [0]

        def make():
            made[0] += 1
            return Subscriber(shared, made[0] <= n_slow)

        subs = await open_connections(ctx, result, make, params.subscribers, 0)
        subs = await acked(subs, params.open_timeout)
        fast = [s for s in subs if not s.slow]
        shared.at = {0: len(fast)}
        pubs = await open_connections(ctx, result, lambda: _Publisher(shared), 1, 0)
        result.extra["fast_subscribers"] = len(fast)
        result.extra["slow_subscribers"] = len(subs) - len(fast)
        if not fast or not pubs:
            result.error("no fast subscribers or no publisher")
            return None
        return shared, subs, pubs[0]

    async def run(self, ctx, prepared, result) -> None:
        if prepared is None:
            return
        params = ctx.params
        shared, subs, publisher = prepared
        for s in subs:
            if s.slow:
                s.start_slow(params.slow_rcvbuf, params.slow_interval)
        loop = asyncio.get_running_loop()
        prefix = b'{"op":"publish","room":' + orjson.dumps(params.room) + b',"data":'
        interval = 1.0 / params.publish_rate
        k = 0

        async def publish() -> None:
            nonlocal k
            next_at = loop.time()
            while shared.running and not publisher.closing:
                # Catch up in one write if the loop was late (a steady rate, not a burst-free one).
                due = max(1, int((loop.time() - next_at) / interval) + 1)
                frames = []
                now = perf_counter()
                for _ in range(due):
                    k += 1
                    shared.sent_at[k] = now
                    frames.append(wsclient.client_frame(Opcode.TEXT, prefix + data_of(k, params.size) + b"}",
                                                        publisher.mask))
                publisher.transport.write(b"".join(frames))
                next_at += due * interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))

        task = asyncio.ensure_future(publish())
        await asyncio.sleep(params.warmup)
        meter = ctx.cpu_meter()
        meter.start()
        d0, t0 = shared.deliveries, perf_counter()
        shared.measuring = True
        await asyncio.sleep(params.duration)
        result.count = shared.deliveries - d0
        result.elapsed = perf_counter() - t0
        shared.measuring = False
        meter.stop(result.extra)
        target = serverproc.target_of(params)
        rss_end = serverproc.rss_bytes(**target) if target else None
        shared.running = False
        task.cancel()
        result.latencies = shared.latencies
        # A server that disconnected a slow reader queued its close frame (or reset) behind
        # everything the reader never read: read it all now to find out.
        slow = [s for s in subs if s.slow]
        for s in slow:
            s.catch_up()
        if slow:
            await asyncio.wait([s.lost for s in slow], timeout=params.catch_up)
        extra = result.extra
        extra["published"] = k
        extra["fast_gaps"] = shared.gaps
        extra["slow_messages"] = shared.slow_messages
        extra["slow_dropped_notices"] = shared.slow_dropped
        extra["slow_closed"] = sum(shared.slow_closed.values())
        for code, count in shared.slow_closed.items():
            extra[f"slow_closed_{code}"] = count
        if rss_end is not None:
            extra["server_rss_kb_end"] = rss_end // 1024
        if shared.gaps:
            result.error("fast subscribers missed messages")
        # Let the fast ones catch up, then close everyone (slow ones read again to close).
        for _ in range(100):
            if shared.low >= k:
                break
            await asyncio.sleep(0.02)
        await close_all([*subs, publisher], params.close_timeout, result)

    def finish(self, summary, params) -> None:
        before = getattr(params, "rss_before", None)
        if before is not None:
            summary.extra["server_rss_kb_before"] = before // 1024
