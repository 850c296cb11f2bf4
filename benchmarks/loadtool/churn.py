"""Churn mode: a reconnect storm while a fan-out runs.

    python -m benchmarks.loadtool churn --url ws://127.0.0.1:8080/ws --clients 5000 --procs 2 \
        --publish-rate 20 --server-pid PID            # all 5,000 dropped and back at once
    ... --rate 500 --duration 20                      # or 500 dropped + reconnected per second

N clients join a room (rooms protocol, /ws) while publishers (one per worker) publish to
it `--publish-rate` times a second in total for the whole run. After `--warmup`, every client's TCP
connection is aborted at the same instant (a network drop: RST, no close handshake) and
the client reconnects at once: connect + upgrade + join, until the join is acknowledged
(`--storms` times). With `--rate R` clients are instead dropped and reconnected R per
second (spread over the workers) for `--duration` seconds.

Reported: `rate` = handshakes/s during the storm (reconnections completed / the time from
the drop to the last rejoin), handshake latency (connect start -> 101, one sample per
reconnection), errors by kind (every failed attempt counts; a client retries until
`--storm-timeout`), and in `extra`: `stuck` = clients not back within the timeout plus
rejoined clients that then received no publication within `--verify-timeout` (a
connection the server accepted but does not serve), `storm_seconds`, and with
`--server-pid`/`--server-pgid` the server's open sockets before the run and after every
client has gone (`server_sockets_leaked` > 0: the server kept connections nobody has).
"""
import asyncio
import time
from time import perf_counter

import orjson
from gateway_ext import Opcode

from . import serverproc, wsclient
from .clientprotocol import ClientProtocol, acked, lost_reason
from .echo import close_all, open_connections
from .fanout import data_of
from .idle import walk_frames
from .modes import Mode

_RETRY_PAUSE = 0.05


class _Shared:
    __slots__ = ("result", "join", "messages", "open")

    def __init__(self, result, room: str) -> None:
        self.result = result
        self.join = orjson.dumps({"op": "join", "room": room, "id": 1})
        self.messages = 0
        self.open = set()


class ChurnClient(ClientProtocol):
    """Joins on connect; `joined` when acked, `delivered` at the first publication after that."""

    __slots__ = ("shared", "buf", "joined", "delivered", "dropping")

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared = shared
        self.buf = b""
        self.dropping = False      # we abort it on purpose: not an error
        loop = asyncio.get_running_loop()
        self.joined = loop.create_future()
        self.delivered = loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.shared.open.add(self)
        transport.write(wsclient.client_frame(Opcode.TEXT, self.shared.join, self.mask))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        frames, used = walk_frames(buf)
        self.buf = buf[used:]
        for opcode, payload in frames:
            if opcode == Opcode.TEXT:
                if payload.startswith(b'{"op":"message"'):
                    self.shared.messages += 1
                    if self.joined.done() and not self.delivered.done():
                        self.delivered.set_result(perf_counter())
                elif payload.startswith(b'{"op":"ack"'):
                    if not self.joined.done():
                        self.joined.set_result(perf_counter())
                elif not self.joined.done():
                    self.joined.set_exception(ConnectionError(f"join refused: {payload[:60]!r}"))
            elif opcode == Opcode.PING:
                self.pong(payload)
            elif opcode == Opcode.CLOSE:
                code = self.close_received(payload)
                if code is not None:
                    self.shared.result.error(f"server closed a client ({code})")
                return

    def drop(self) -> None:
        """The network goes away: RST, no close handshake."""
        self.dropping = self.closing = True
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.shared.open.discard(self)
        super().connection_lost(exc)
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("lost before the join's ack"))

    def lost_early(self, exc) -> None:
        self.shared.result.error(lost_reason("client", exc))


class _Publisher(ClientProtocol):
    """Publishes to the room at a fixed rate for the whole run; answers pings."""

    __slots__ = ("shared", "room", "buf", "k", "task")

    def __init__(self, shared: _Shared, room: str) -> None:
        super().__init__()
        self.shared = shared
        self.room = room
        self.buf = b""
        self.k = 0
        self.task = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    async def publish_every(self, interval: float, size: int) -> None:
        prefix = b'{"op":"publish","room":' + orjson.dumps(self.room) + b',"data":'
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.closing:
            self.k += 1
            self.transport.write(wsclient.client_frame(Opcode.TEXT, prefix + data_of(self.k, size) + b"}", self.mask))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        frames, used = walk_frames(buf)
        self.buf = buf[used:]
        for opcode, payload in frames:
            if opcode == Opcode.PING:
                self.pong(payload)
            elif opcode == Opcode.TEXT and b'"op":"error"' in payload:
                self.shared.result.error(f"publish refused: {payload[:60]!r}")
            elif opcode == Opcode.CLOSE:
                if not self.closing:
                    self.shared.result.error("server closed the publisher")
                    self.closing = True
                if not self.closed.done():
                    self.closed.set_result(None)

    def lost_early(self, exc) -> None:
        self.shared.result.error("publisher lost")


class ChurnMode(Mode):
    name = "churn"
    help = "reconnect storm: N clients in a room dropped and reconnecting (at once or at a rate) while a fan-out runs"
    unit = "handshakes/s"
    rate_key = "handshakes_per_s"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--clients", type=int, default=1000, help="clients in the room, in total (default 1000)")
        parser.add_argument("--rate", type=float, default=0.0,
                            help="drop + reconnect this many clients per second for --duration (default 0: all at once)")
        parser.add_argument("--storms", type=int, default=1, help="all-at-once storms, one after the other (default 1)")
        parser.add_argument("--room", default="churn", help="room name (default churn)")
        parser.add_argument("--publish-rate", type=float, default=20.0,
                            help="publications/s to the room during the run, all workers together (default 20; 0 = none)")
        parser.add_argument("--size", type=int, default=64, help="bytes of JSON data per publication (default 64)")
        parser.add_argument("--storm-timeout", type=float, default=60.0,
                            help="seconds for every client to be back (default 60); later = stuck")
        parser.add_argument("--verify-timeout", type=float, default=5.0,
                            help="seconds for a rejoined client to receive a publication (default 5)")
        parser.add_argument("--storm-concurrency", type=int, default=1000,
                            help="reconnects in flight per worker (default 1000)")
        serverproc.add_arguments(parser)

    def params(self, args) -> dict:
        return {"clients": args.clients, "rate": args.rate, "storms": args.storms, "publish_rate": args.publish_rate}

    async def prepare(self, ctx, result):
        params = ctx.params
        first, count = ctx.share(params.clients)
        shared = _Shared(result, params.room)
        clients = await open_connections(ctx, result, lambda: ChurnClient(shared), count, first)
        clients = await acked(clients, params.open_timeout)
        publisher = None
        if params.publish_rate > 0:
            # One publisher per worker (each publishing its share of the rate): a worker's
            # rejoined clients are verified while its own publisher still runs.
            pubs = await open_connections(ctx, result, lambda: _Publisher(shared, params.room), 1, 0)
            publisher = pubs[0] if pubs else None
        result.extra["clients"] = len(clients)
        return shared, clients, publisher

    async def run(self, ctx, prepared, result) -> None:
        if prepared is None:
            return
        params = ctx.params
        shared, clients, publisher = prepared
        if publisher is not None:
            interval = ctx.procs / params.publish_rate
            publisher.task = asyncio.ensure_future(publisher.publish_every(interval, params.size))
        await asyncio.sleep(params.warmup)
        meter = ctx.cpu_meter()
        meter.start()
        sources = ctx.sources(ctx.share(params.clients)[0])
        headers = tuple(params.header or ())
        gate = asyncio.Semaphore(params.storm_concurrency)
        stats = {"reconnected": 0, "stuck": 0, "undelivered": 0}
        t_start = perf_counter()

        async def reconnect(deadline: float):
            """Connect + upgrade + join until acked or the deadline; every failed attempt is an error."""
            while perf_counter() < deadline:
                client = ChurnClient(shared)
                t0 = perf_counter()
                try:
                    async with gate:
                        async with asyncio.timeout(max(0.1, min(params.connect_timeout, deadline - perf_counter()))):
                            await wsclient.open_websocket(ctx.target, client, sources.next(), headers)
                            t1 = perf_counter()
                            await client.joined
                except (OSError, TimeoutError, wsclient.HandshakeError, ConnectionError) as exc:
                    result.error(f"reconnect: {_reason(exc)}")
                    if client.transport is not None:
                        client.closing = True
                        client.transport.abort()
                    await asyncio.sleep(_RETRY_PAUSE)
                    continue
                result.latencies.append(t1 - t0)
                stats["reconnected"] += 1
                return client
            stats["stuck"] += 1
            return None

        async def verify(client) -> None:
            """A rejoined client must receive a publication (it is served, not just accepted)."""
            if params.publish_rate <= 0:
                return
            try:
                await asyncio.wait_for(asyncio.shield(client.delivered), params.verify_timeout)
            except TimeoutError:
                stats["undelivered"] += 1

        storm_seconds = 0.0
        if params.rate > 0:
            # Steady churn: this worker's share of `rate`, one client at a time, round-robin.
            interval = ctx.procs / params.rate
            end = perf_counter() + params.duration
            pending = set()
            i = 0
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            while perf_counter() < end and clients:
                index = i % len(clients)
                old = clients[index]
                old.drop()

                async def replace(index=index):
                    new = await reconnect(perf_counter() + params.storm_timeout)
                    if new is not None:
                        clients[index] = new
                        await verify(new)

                pending.add(asyncio.ensure_future(replace()))
                i += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            if pending:
                await asyncio.wait(pending, timeout=params.storm_timeout + params.verify_timeout + 5)
            storm_seconds = perf_counter() - t_start
            clients = [c for c in clients if not c.dropping]
        else:
            for _ in range(params.storms):
                t0 = perf_counter()
                for c in clients:
                    c.drop()
                deadline = t0 + params.storm_timeout
                back = await asyncio.gather(*(reconnect(deadline) for _ in clients))
                storm_seconds += perf_counter() - t0
                clients = [c for c in back if c is not None]
                await asyncio.gather(*(verify(c) for c in clients))
        result.count = stats["reconnected"]
        result.elapsed = storm_seconds
        meter.stop(result.extra)
        extra = result.extra
        extra["reconnected"] = stats["reconnected"]
        extra["stuck"] = stats["stuck"] + stats["undelivered"]
        extra["not_back"] = stats["stuck"]
        extra["undelivered"] = stats["undelivered"]
        extra["storm_seconds"] = round(storm_seconds, 3)
        extra["messages"] = shared.messages
        if extra["stuck"]:
            result.error("stuck connections")
        if publisher is not None:
            publisher.closing = True
            publisher.task.cancel()
            publisher.transport.abort()
        await close_all(clients, params.close_timeout, result)

    def before_workers(self, params) -> None:
        params.sockets_before = serverproc.open_sockets(**serverproc.target_of(params))

    def finish(self, summary, params) -> None:
        extra = summary.extra
        if params.procs > 1 and "storm_seconds" in extra:
            # Workers storm over the same wall-clock interval; merge summed their durations.
            extra["storm_seconds"] = round(extra["storm_seconds"] / params.procs, 3)
        before = getattr(params, "sockets_before", None)
        if before is None:
            return
        # Every client is gone now: the server must be back to the sockets it had before
        # (a dropped connection it still holds is a leak). Give its close handshakes a moment.
        target = serverproc.target_of(params)
        deadline = perf_counter() + 5.0
        while True:
            after = serverproc.open_sockets(**target)
            if after is None or after <= before or perf_counter() > deadline:
                break
            time.sleep(0.1)
        extra["server_sockets_before"] = before
        extra["server_sockets_after"] = after
        if after is not None and after > before:
            extra["server_sockets_leaked"] = after - before
            summary.errors += 1
            summary.error_kinds["server kept connections no client has"] = after - before


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, wsclient.HandshakeError):
        return f"handshake: {str(exc)[:60]}"
    if isinstance(exc, ConnectionError) and str(exc).startswith("join refused"):
        return str(exc)[:80]
    return type(exc).__name__
