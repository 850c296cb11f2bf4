"""Fan-out mode: S subscribers in one room, one publisher keeping W publications in flight.

    python -m benchmarks.loadtool fanout --url ws://127.0.0.1:8080/ws --subscribers 1000 --window 32
    --window 1 is "round mode": the next publication leaves when the last subscriber got
    the previous one; --window W keeps W publications in flight ("window mode").

Protocol: ws-gateway's /ws JSON protocol (gateway/rooms/commands.py), which the picows peer
(benchmarks/peers/picows_rooms.py) implements too. Every subscriber joins the room (and
waits for its ack) before the measurement; the publisher publishes
`{"op":"publish","room":R,"data":{"k":N,"p":"..."}}` with `data` padded to exactly --size
bytes of JSON, without an "id" (no ack traffic).

Cheap counting on the client (it must outrun servers doing millions of deliveries/s):
messages arrive in order per subscriber, so a read only needs its LAST complete `"k":N,`
(a `bytes.rfind`, never a frame parse): the subscriber advances from k_old to k_new and
that read delivered k_new - k_old messages. A histogram of subscribers per k gives the
lowest k that every subscriber has reached: when it passes N, publication N reached its
last subscriber -- its time-to-last-subscriber is sampled then, and the publisher tops the
window up (one write for all new publications).

Reported: deliveries/s (messages received by subscribers, the rate), p50/p99 of
time-to-last-subscriber, and in `extra` publications/s and the subscribers opened.
Servers must not ping (gateway: --ping-interval 0): subscribers never parse frames.
Imports gateway_ext (frame encoding) and the loadtool modules only.
"""
import asyncio
import dataclasses
from array import array
from time import perf_counter

import orjson
from gateway_ext import FrameError, FrameParser, Opcode

from . import fastclient, wsclient
from .clientprotocol import ClientProtocol, acked, lost_reason
from .echo import close_all, open_connections
from .lowwater import LowWater
from .modes import Mode

_MARK = b'"k":'
_TAIL = 48          # bytes of a read kept to find a `"k":N,` split across reads


def data_of(k: int, size: int) -> bytes:
    """JSON data `{"k":k,"p":"..."}` padded to exactly `size` bytes (at least the bare form)."""
    bare = b'{"k":%d,"p":""}' % k
    return b'{"k":%d,"p":"%s"}' % (k, b"x" * max(0, size - len(bare)))


def last_k(buf: bytes) -> int:
    """The N of the last complete `"k":N,` in `buf`, or -1 (the reference twin of
    _fastclient.last_k). A mark whose `,` is not within 30 bytes is cut off by the end of
    the read: then the mark before it counts."""
    end = len(buf)
    while True:
        i = buf.rfind(_MARK, 0, end)
        if i < 0:
            return -1
        j = buf.find(b",", i + 4, i + 30)
        if j > i + 4:
            digits = buf[i + 4:j]
            return int(digits) if digits.isdigit() else -1
        end = i


class _Shared(LowWater):
    """One worker's view: subscribers per k, the lowest k everyone has, the publisher's window."""

    __slots__ = ("top", "deliveries", "sent_at", "latencies", "measuring", "publisher",
                 "window", "running", "result", "open", "done")

    def __init__(self, result, subscribers: int, window: int) -> None:
        super().__init__(subscribers)
        self.top = 0                 # last k published
        self.deliveries = 0
        self.sent_at: dict = {}      # k -> perf_counter() when published
        self.latencies = array("d")
        self.measuring = False
        self.publisher = None
        self.window = window
        self.running = False
        self.result = result
        self.open = set()
        self.done = None

    def completed(self, old_low: int, low: int) -> None:
        """Publications old_low+1 .. low reached every subscriber."""
        now = perf_counter()
        sent_at = self.sent_at
        measuring = self.measuring
        for k in range(old_low + 1, low + 1):
            t = sent_at.pop(k, None)
            if t is not None and measuring:
                self.latencies.append(now - t)
        if self.running and self.publisher is not None:
            self.publisher.top_up()


class SubscriberProtocol(ClientProtocol):
    """asyncio.Protocol of one subscriber: join, then count messages by their last k."""

    __slots__ = ("shared", "room", "k", "tail", "parser", "joined")

    def __init__(self, shared: _Shared, room: str) -> None:
        super().__init__()
        self.shared = shared
        self.room = room
        self.k = 0
        self.tail = b""
        self.parser = FrameParser(1 << 20, require_mask=False)   # until the join's ack
        self.joined = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.shared.open.add(self)
        join = orjson.dumps({"op": "join", "room": self.room, "id": 1})
        transport.write(wsclient.client_frame(Opcode.TEXT, join, self.mask))

    def data_received(self, data: bytes) -> None:
        if self.parser is not None:
            self._before_join(data)
            return
        buf = self.tail + data if self.tail else data
        self.tail = buf[-_TAIL:]
        k = last_k(buf)
        old = self.k
        if k > old:
            self.k = k
            shared = self.shared
            shared.deliveries += k - old
            shared.advanced(old, k)

    def _before_join(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self._fail(f"bad frame: {exc}")
            return
        for opcode, _fin, _rsv, payload in frames:
            if opcode == Opcode.TEXT:
                reply = orjson.loads(payload)
                if reply.get("op") == "ack" and reply.get("id") == 1:
                    self.parser = None
                    if not self.joined.done():
                        self.joined.set_result(None)
                    return
                self._fail(f"join refused: {reply.get('code', reply.get('op'))}")
                return
            if opcode == Opcode.CLOSE:
                self._fail("closed by the server before the join's ack")
                return

    def _fail(self, reason: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(RuntimeError(reason))
        self.shared.result.error(reason[:80])
        self.closing = True
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.shared.open.discard(self)
        super().connection_lost(exc)
        if not self.joined.done():
            self.joined.set_exception(RuntimeError("connection lost before the join's ack"))

    def lost_early(self, exc) -> None:
        self.shared.result.error(lost_reason("subscriber", exc))


class PublisherProtocol(ClientProtocol):
    """Keeps `window` publications in flight; reads only to notice errors and the close."""

    __slots__ = ("shared", "room", "size", "parser")

    def __init__(self, shared: _Shared, room: str, size: int) -> None:
        super().__init__()
        self.shared = shared
        self.room = room
        self.size = size
        self.parser = FrameParser(1 << 20, require_mask=False)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def top_up(self) -> None:
        shared = self.shared
        n = shared.window - (shared.top - shared.low)
        if n <= 0 or self.closing:
            return
        prefix = b'{"op":"publish","room":' + orjson.dumps(self.room) + b',"data":'
        frames = []
        top = shared.top
        now = perf_counter()
        sent_at = shared.sent_at
        for k in range(top + 1, top + n + 1):
            frames.append(wsclient.client_frame(Opcode.TEXT, prefix + data_of(k, self.size) + b"}", self.mask))
            sent_at[k] = now
        shared.top = top + n
        self.transport.write(b"".join(frames))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self.shared.result.error(f"publisher: bad frame: {exc}"[:80])
            return
        for opcode, _fin, _rsv, payload in frames:
            if opcode == Opcode.TEXT and b'"error"' in payload:
                self.shared.result.error(f"publish refused: {orjson.loads(payload).get('code')}")
            elif opcode == Opcode.CLOSE:
                if self.close_received(payload) is not None:
                    self.shared.result.error("server closed the publisher")

    def lost_early(self, exc) -> None:
        self.shared.result.error("publisher lost")


class FanoutMode(Mode):
    name = "fanout"
    help = "S subscribers in one room + 1 publisher with W publications in flight; deliveries/s and time to last subscriber"
    unit = "deliveries/s"
    rate_key = "deliveries_per_s"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--subscribers", type=int, default=1000, help="subscribers in the room (default 1000)")
        parser.add_argument("--window", type=int, default=1,
                            help="publications in flight (default 1 = round mode; e.g. 32 = window mode)")
        parser.add_argument("--size", type=int, default=64, help="bytes of JSON data per publication (default 64)")
        parser.add_argument("--room", default="bench", help="room name (default bench)")
        parser.add_argument("--subscriber-url", action="append", metavar="URL",
                            help="put subscribers on this server instead, round-robin over repeats; the "
                                 "publisher stays on --url (cross-process fan-out through a broker)")

    def params(self, args) -> dict:
        return {"subscribers": args.subscribers, "window": args.window, "size": args.size}

    async def prepare(self, ctx, result):
        params = ctx.params
        if ctx.procs != 1:
            raise SystemExit("fanout: run it with --procs 1 (one client process holds 10k+ subscribers "
                             "and the publisher must see every subscriber)")
        if params.subscribers < 1 or params.window < 1:
            raise SystemExit("fanout: --subscribers and --window must be at least 1")
        shared = _Shared(result, params.subscribers, params.window)
        urls = getattr(params, "subscriber_url", None)
        if urls:
            # Subscribers spread over other processes: S // len(urls) each (+1 for the first few).
            subs = []
            for i, url in enumerate(urls):
                count = params.subscribers // len(urls) + (1 if i < params.subscribers % len(urls) else 0)
                there = dataclasses.replace(ctx, target=wsclient.parse_url(url))
                subs += await open_connections(there, result, lambda: SubscriberProtocol(shared, params.room), count, 0)
        else:
            subs = await open_connections(ctx, result, lambda: SubscriberProtocol(shared, params.room),
                                          params.subscribers, 0)
        if len(subs) != params.subscribers:
            shared.at = {0: len(subs)}
        ok = await acked(subs, params.open_timeout)   # a refused or lost join is counted by the protocol
        shared.at = {0: len(ok)}
        pubs = await open_connections(ctx, result, lambda: PublisherProtocol(shared, params.room, params.size), 1, 0)
        result.extra["subscribers"] = len(ok)
        if not ok or not pubs:
            result.error("no subscribers or no publisher")
            return None
        shared.publisher = pubs[0]
        return shared, subs, pubs[0]

    async def run(self, ctx, prepared, result) -> None:
        if prepared is None:
            return
        params = ctx.params
        shared, subs, publisher = prepared
        if params.client_impl == "compiled":
            self._run_compiled(ctx, shared, subs, publisher, result)
            await close_all([*subs, publisher], params.close_timeout, result)
            return
        shared.running = True
        publisher.top_up()
        await asyncio.sleep(params.warmup)
        meter = ctx.cpu_meter()
        meter.start()
        d0, p0, t0 = shared.deliveries, shared.low, perf_counter()
        shared.measuring = True
        await asyncio.sleep(params.duration)
        result.count = shared.deliveries - d0
        result.elapsed = perf_counter() - t0
        shared.measuring = False
        meter.stop(result.extra)
        result.extra["publications_per_s"] = round((shared.low - p0) / result.elapsed, 1)
        shared.running = False
        result.latencies = shared.latencies
        # Let the last window arrive so the close handshakes are not stuck behind it.
        for _ in range(100):
            if shared.low >= shared.top:
                break
            await asyncio.sleep(0.01)
        await close_all([*subs, publisher], params.close_timeout, result)

    def _run_compiled(self, ctx, shared, subs, publisher, result) -> None:
        """Warmup + window in _fastclient's epoll loop on the joined sockets.

        The transports stop reading meanwhile (the event loop does not run until the loop
        returns anyway); afterwards the Python state (each subscriber's k, the low-water
        histogram) is set from the compiled loop's, so close_all sees a consistent picture.
        """
        params = ctx.params
        live = [p for p in subs if not p.closing]
        for p in (*live, publisher):
            p.transport.pause_reading()
        prefix = b'{"op":"publish","room":' + orjson.dumps(params.room) + b',"data":'
        meter = ctx.cpu_meter()
        out = fastclient.module().run_fanout(
            [p.transport.get_extra_info("socket").fileno() for p in live],
            publisher.transport.get_extra_info("socket").fileno(),
            prefix, params.size, publisher.mask, params.window, params.warmup, params.duration,
            meter.start, lambda: meter.stop(result.extra), result.error,
        )
        for i in out["lost"]:
            live[i].closing = True          # already counted as an error by the compiled loop
        at = {}
        for p, k in zip(live, out["k"]):
            p.k = k
            at[k] = at.get(k, 0) + 1
        shared.at, shared.low, shared.top, shared.deliveries = at, out["low"], out["top"], out["deliveries"]
        for p in (*live, publisher):
            if not p.closing:
                p.transport.resume_reading()
        result.count = out["count"]
        result.elapsed = out["elapsed"]
        result.latencies = out["latencies"]
        result.extra["publications_per_s"] = round(out["published"] / out["elapsed"], 1) if out["elapsed"] else 0.0
