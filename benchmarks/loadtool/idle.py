"""Idle mode: open N WebSockets, hold them silent, weigh the server: RSS and CPU per connection.

    python -m benchmarks.loadtool idle --url ws://127.0.0.1:8080/ws --connections 10000 \
        --server-pid PID --procs 2 --warmup 3 --duration 30

Phases: the parent reads the server's RSS before any worker starts (the baseline); the
workers open their share of the connections and meet at the barrier; after `--warmup`
seconds of settling, worker 0 reads the server's RSS ("open") and starts metering its
CPU; after `--duration` more seconds it reads CPU and RSS again ("end"). Connections
answer the server's pings (keepalive stays on, as in production) and send nothing else,
so what the window shows is what idle connections cost the server: its keepalive sweep
and pings. With `--join ROOM` (rooms servers) each connection first joins ROOM and waits
for the ack, so the weight includes room membership, as for a real idle subscriber. Run the window longer than the server's ping interval to include the pings.

Reported (the RESULT line): `rate` = server RSS bytes per held connection,
(end - baseline) / connections -- lower is better, so in `compare` A/B < 1 means A is
lighter -- and in `extra`: `server_rss_kb_{before,open,end}`, `rss_per_conn_open`,
`cpu_us_per_conn_s` (server CPU microseconds per idle connection per second),
`server_cpu` (share of a core), `pings` answered and `connections` held. A connection the
server closes during the hold is an error. The server is named by `--server-pid`, or by
`--server-pgid` (compare passes it: the whole group is weighed; the `sh -c` wrapper's few
hundred KB cancel out against the baseline).
"""
import asyncio
from time import perf_counter

import orjson
from gateway_ext import Opcode

from . import serverproc, wsclient
from .clientprotocol import ClientProtocol, lost_reason
from .echo import close_all, open_connections
from .modes import Mode


def walk_frames(buf: bytes):
    """Complete unmasked server frames at the start of `buf`: ([(opcode, payload)], bytes used).

    Only what an idle client meets: pings, pongs, a close, and whatever small messages a
    server may send; no fragment reassembly (not needed to answer pings).
    """
    frames = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        length = buf[pos + 1] & 0x7F
        header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
        if n - pos < header:
            break
        if length >= 126:
            length = int.from_bytes(buf[pos + 2:pos + header], "big")
        end = pos + header + length
        if end > n:
            break
        frames.append((buf[pos] & 0x0F, buf[pos + header:end]))
        pos = end
    return frames, pos


class _Shared:
    __slots__ = ("result", "open", "pings", "messages", "join", "joined")

    def __init__(self, result, join: bytes | None = None) -> None:
        self.result = result
        self.open = set()
        self.pings = 0
        self.messages = 0
        self.join = join       # the /ws join request every connection sends first, or None
        self.joined = 0        # acks received for it


class IdleProtocol(ClientProtocol):
    """A silent client that answers pings; a server close during the hold is an error."""

    __slots__ = ("shared", "buf")

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared = shared
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.shared.open.add(self)
        if self.shared.join is not None:
            transport.write(wsclient.client_frame(Opcode.TEXT, self.shared.join, self.mask))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        frames, used = walk_frames(buf)
        self.buf = buf[used:]
        for opcode, payload in frames:
            if opcode == Opcode.PING:
                self.shared.pings += 1
                self.pong(payload)
            elif opcode == Opcode.CLOSE:
                code = self.close_received(payload)
                if code is not None:
                    self.shared.result.error(f"server closed the connection ({code})")
                return
            elif opcode == Opcode.TEXT and payload.startswith(b'{"op":"ack"'):
                self.shared.joined += 1
            elif opcode != Opcode.PONG:
                self.shared.messages += 1

    def connection_lost(self, exc) -> None:
        self.shared.open.discard(self)
        super().connection_lost(exc)

    def lost_early(self, exc) -> None:
        self.shared.result.error(lost_reason("connection", exc))


class IdleMode(Mode):
    name = "idle"
    help = "hold N idle connections (answering pings); server RSS and CPU per connection"
    unit = "B/conn (server RSS)"
    rate_key = "rss_bytes_per_conn"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--connections", type=int, default=1000, help="connections in total (default 1000)")
        parser.add_argument("--join", metavar="ROOM",
                            help="rooms servers (/ws): each connection joins ROOM first, as real subscribers do")
        serverproc.add_arguments(parser)

    def params(self, args) -> dict:
        return {"connections": args.connections, "join": args.join}

    def before_workers(self, params) -> None:
        params.rss_before = serverproc.rss_bytes(**serverproc.target_of(params))

    async def prepare(self, ctx, result):
        first, count = ctx.share(ctx.params.connections)
        join = ctx.params.join
        shared = _Shared(result, join and orjson.dumps({"op": "join", "room": join, "id": 1}))
        protocols = await open_connections(ctx, result, lambda: IdleProtocol(shared), count, first)
        result.extra["connections_opened"] = len(protocols)
        if join:
            deadline = perf_counter() + ctx.params.open_timeout
            while shared.joined < len(protocols) and perf_counter() < deadline:
                await asyncio.sleep(0.05)
            if shared.joined < len(protocols):
                result.error(f"join not acknowledged ({len(protocols) - shared.joined})")
        return shared, protocols

    async def run(self, ctx, prepared, result) -> None:
        if prepared is None:
            return
        params = ctx.params
        shared, protocols = prepared
        await asyncio.sleep(params.warmup)
        weigh = ctx.index == 0 and serverproc.target_of(params)
        if weigh:
            target = serverproc.target_of(params)
            rss_open = serverproc.rss_bytes(**target)
            cpu0 = serverproc.cpu_seconds(**target)
        pings0, t0 = shared.pings, perf_counter()
        await asyncio.sleep(params.duration)
        elapsed = perf_counter() - t0
        result.elapsed = elapsed
        result.extra["connections"] = len(shared.open)
        result.extra["pings"] = shared.pings - pings0
        if weigh:
            cpu1 = serverproc.cpu_seconds(**target)
            rss_end = serverproc.rss_bytes(**target)
            extra = result.extra
            if rss_open is not None and rss_end is not None:
                extra["server_rss_kb_open"] = rss_open // 1024
                extra["server_rss_kb_end"] = rss_end // 1024
            if cpu0 is not None and cpu1 is not None:
                extra["server_cpu_s"] = round(cpu1 - cpu0, 3)
                extra["server_cpu"] = round((cpu1 - cpu0) / elapsed, 4)
        await close_all(protocols, params.close_timeout, result)

    def finish(self, summary, params) -> None:
        extra = summary.extra
        held = extra.get("connections", 0)
        before = getattr(params, "rss_before", None)
        if before is not None:
            extra["server_rss_kb_before"] = before // 1024
        summary.count = held
        summary.rate = 0.0
        if not held:
            return
        if before is not None and "server_rss_kb_end" in extra:
            summary.rate = (extra["server_rss_kb_end"] * 1024 - before) / held
            extra["rss_per_conn_open"] = round((extra["server_rss_kb_open"] * 1024 - before) / held, 1)
        if "server_cpu_s" in extra:
            extra["cpu_us_per_conn_s"] = round(extra["server_cpu_s"] / params.duration / held * 1e6, 4)
