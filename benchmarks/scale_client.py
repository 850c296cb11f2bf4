"""Client worker processes for benchmarks/scale_19k.py: subscribers that stay, answer pings, count.

One worker = one forked process with its own uvloop loop holding `count` subscribers of one
room (at most ~19,900 sockets per process here: open files are capped at 20,000). Each
subscriber joins the room, waits for the ack, answers the server's pings (keepalive stays
on, as in production) and counts the `{"op":"message",...,"data":{"k":N,...}}` frames it
receives. Messages of one room arrive in order, so the worker keeps a histogram of
subscribers per last-seen k and knows the lowest k that ALL its subscribers have: each
time that "low-water mark" rises it tells the parent `("low", k, perf_counter())`
(CLOCK_MONOTONIC: comparable across processes), which is how the parent times a
publication to its last subscriber across every worker.

Parent <-> worker protocol over a duplex multiprocessing Pipe (pickled tuples):
    worker -> parent  ("ready", opened, joined, errors) | ("low", k, t) | ("stats", {...})
    parent -> worker  ("pings?",) -> ("pings", n)   |   ("stop",) -> closes everything, ("stats", ...)
Every wait is bounded; a worker exits by itself when the parent goes away.
"""
import asyncio
import collections
import os
from time import perf_counter

import orjson
import uvloop

from benchmarks.loadtool import wsclient
from benchmarks.loadtool.clientprotocol import ClientProtocol
from benchmarks.loadtool.lowwater import LowWater
from gateway_ext import FrameError, FrameParser, Opcode

_OPEN_CONCURRENCY = 128
_MESSAGE = b'{"op":"message"'
_ACK = b'{"op":"ack"'


class Worker(LowWater):
    """One process's subscribers and what they saw (`low`: every subscriber of it has every k <= low)."""

    def __init__(self, pipe, room: str) -> None:
        super().__init__()
        self.pipe = pipe
        self.join = orjson.dumps({"op": "join", "room": room, "id": 1})
        self.deliveries = 0
        self.pings = 0
        self.joined = 0
        self.errors: collections.Counter = collections.Counter()
        self.open: set = set()

    def error(self, kind: str) -> None:
        self.errors[kind[:80]] += 1

    def completed(self, old_low: int, low: int) -> None:
        self.pipe.send(("low", low, perf_counter()))


class Subscriber(ClientProtocol):
    __slots__ = ("w", "parser", "k", "joined")

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.w = worker
        self.parser = FrameParser(1 << 20, require_mask=False)
        self.k = 0
        self.joined = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.w.open.add(self)
        transport.write(wsclient.client_frame(Opcode.TEXT, self.w.join, self.mask))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self.w.error(f"bad frame: {exc}")
            self.closing = True
            self.transport.abort()
            return
        last = None
        n = 0
        for opcode, _fin, _rsv1, payload in frames:
            if opcode == Opcode.TEXT:
                if payload.startswith(_MESSAGE):
                    n += 1
                    last = payload
                elif payload.startswith(_ACK) and not self.joined:
                    self.joined = True
                    w = self.w
                    w.joined += 1
                    w.at[0] += 1
                else:
                    self.w.error(f"unexpected: {payload[:60]!r}")
            elif opcode == Opcode.PING:
                self.w.pings += 1
                self.pong(payload)
            elif opcode == Opcode.CLOSE:
                code = self.close_received(payload)
                if code is not None:
                    self.w.error(f"server closed ({code})")
        if n:
            w = self.w
            w.deliveries += n
            i = last.find(b'"k":')
            k = int(last[i + 4:last.find(b",", i)])
            if k > self.k and self.joined:
                old, self.k = self.k, k
                w.advanced(old, k)

    def connection_lost(self, exc) -> None:
        self.w.open.discard(self)
        super().connection_lost(exc)

    def lost_early(self, exc) -> None:
        self.w.error("connection lost")


async def _open(worker: Worker, target, count: int, sources, connect_timeout: float) -> list:
    gate = asyncio.Semaphore(_OPEN_CONCURRENCY)

    async def one(source):
        async with gate:
            sub = Subscriber(worker)
            try:
                async with asyncio.timeout(connect_timeout):
                    await wsclient.open_websocket(target, sub, source)
            except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                worker.error(f"connect: {type(exc).__name__}")
                return None
            return sub

    subs = await asyncio.gather(*(one(sources.next()) for _ in range(count)))
    return [s for s in subs if s is not None]


async def _main(pipe, url: str, room: str, count: int, first: int, sources: list, open_timeout: float,
                connect_timeout: float, close_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(pipe, room)
    target = wsclient.parse_url(url)
    source_cycle = wsclient.SourceAddresses(sources, start=first)
    try:
        async with asyncio.timeout(open_timeout):
            subs = await _open(worker, target, count, source_cycle, connect_timeout)
            while worker.joined < len(subs) and any(not s.closing for s in subs):
                await asyncio.sleep(0.05)
    except TimeoutError:
        worker.error("opening/joining timed out")
        subs = [s for s in worker.open]
    pipe.send(("ready", len(subs), worker.joined, dict(worker.errors)))

    # Wait for the parent's commands; it may also just die (EOF) -> stop.
    commands: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            while pipe.poll():
                commands.put_nowait(pipe.recv())
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            commands.put_nowait(("stop",))

    loop.add_reader(pipe.fileno(), readable)
    while True:
        command = await commands.get()
        if command[0] == "pings?":
            pipe.send(("pings", worker.pings))
        elif command[0] == "stop":
            break
    loop.remove_reader(pipe.fileno())
    for s in subs:
        s.begin_close()
    pending = [s.closed for s in subs if not s.closed.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=close_timeout)
        if still:
            worker.error("close handshake timed out")
    for s in subs:
        if not s.transport.is_closing():
            s.transport.abort()
    await asyncio.sleep(0.1)
    pipe.send(("stats", {"deliveries": worker.deliveries, "pings": worker.pings, "joined": worker.joined,
                         "errors": dict(worker.errors), "low": worker.low}))


def run_worker(pipe, *args) -> None:
    """Entry point of a forked worker process."""
    try:
        uvloop.run(_main(pipe, *args))
    except BaseException as exc:   # report instead of dying silently
        try:
            pipe.send(("stats", {"errors": {f"worker crashed: {exc!r}"[:120]: 1}}))
        except OSError:
            pass
    finally:
        pipe.close()
        os._exit(0)
