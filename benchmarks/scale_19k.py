"""The 50k-per-process proof, measured at what this machine allows: N connections on ONE server
process with keepalive on, a fan-out to all of them, and the projection to 50,000.

    python benchmarks/scale_19k.py                                  # gateway, 19,000 connections
    python benchmarks/scale_19k.py --connections 5000 --server picows
    python benchmarks/scale_19k.py --server-cmd "python my_server.py --port {port}" --label mine

Open files are capped at 20,000 per process on this machine (not raisable), so one server
process holds at most ~19,900 sockets; the clients are spread over `--procs` worker
processes (benchmarks/scale_client.py) and several 127.0.0.x source addresses.

Phases (each bounded in time; the script always ends and stops what it started):
  1. start the server (gateway: `--ping-interval` default 10 s, i.e. keepalive ON) and read
     its RSS and the kernel's slab memory (the baseline);
  2. open N subscribers, each joins one room and waits for the ack (open rate reported);
  3. idle hold (`--hold`, longer than the ping interval): server RSS per connection, server
     CPU per idle connection per second (its keepalive sweep + pings), pings answered;
  4. fan-out, round mode: publish a `--size`-byte message, wait until the LAST of the N
     subscribers has it, repeat `--rounds` times: time to last subscriber (p50/max);
  5. fan-out, window mode: `--window` publications in flight for `--window-seconds`:
     deliveries/s (publications completed x subscribers / elapsed) and server CPU;
  during 4 and 5 `--probes` loops keep opening new WebSockets (upgrade + close): the
  process must stay responsive, so every handshake must succeed; their latency is reported.
  6. close everything, print the report and the 50k projection, write the raw JSON
     (`--out`, default benchmarks/results/scale_<label>_<N>.json).

Exit status 0 when every subscriber joined, every publication reached every subscriber,
every probe handshake succeeded and nothing else failed.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from time import perf_counter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
import uvloop  # noqa: E402

from benchmarks import scale_client  # noqa: E402
from benchmarks.loadtool import serverproc, wsclient  # noqa: E402
from benchmarks.loadtool.fanout import data_of  # noqa: E402
from benchmarks.loadtool.handshake import _CloseWaiter  # noqa: E402
from benchmarks.loadtool.servers import Server, ServerFailed  # noqa: E402
from benchmarks.loadtool.stats import percentile  # noqa: E402
from gateway_ext import FrameError, FrameParser, Opcode  # noqa: E402

SERVERS = {
    "gateway": "{python} -m gateway serve --host 127.0.0.1 --port {{port}} --log-level warning "
               "--ping-interval {ping} --ping-timeout {ping} --max-connections 100000 "
               # The limiter stays on (its per-connection cost is part of the RSS measured); the
               # publisher, one client publishing for a whole backend, must not hit it.
               "--rate-limit 1000000 --rate-limit-burst 1000000",
    "picows": "{python} benchmarks/peers/picows_rooms.py --port {{port}}",
    "websockets": "{python} benchmarks/peers/websockets_rooms.py --port {{port}}",
    "aiohttp": "{python} benchmarks/peers/aiohttp_rooms.py --port {{port}}",
}
TARGET = 50_000
ROOM = "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=19_000, help="subscribers on the one server process (default 19000)")
    p.add_argument("--server", default="gateway", choices=sorted(SERVERS), help="which server (default gateway)")
    p.add_argument("--server-cmd", help="any rooms server command instead; {port} is replaced by a free port")
    p.add_argument("--label", help="name in the report and the file name (default: --server)")
    p.add_argument("--procs", type=int, default=0, help="client worker processes (default: one per 6,000 subscribers)")
    p.add_argument("--source-addresses", type=int, default=4, help="127.0.0.2.. source addresses (default 4)")
    p.add_argument("--ping-interval", type=float, default=10.0, help="gateway keepalive ping interval (default 10 s)")
    p.add_argument("--hold", type=float, default=0.0, help="idle seconds (default: ping interval x 2.5)")
    p.add_argument("--rounds", type=int, default=20, help="round-mode publications (default 20)")
    p.add_argument("--window", type=int, default=8, help="window-mode publications in flight (default 8)")
    p.add_argument("--window-seconds", type=float, default=10.0, help="window-mode duration (default 10)")
    p.add_argument("--size", type=int, default=64, help="bytes of JSON data per publication (default 64)")
    p.add_argument("--probes", type=int, default=2, help="concurrent handshake loops during the fan-out (default 2)")
    p.add_argument("--open-timeout", type=float, default=180.0, help="seconds to open and join all (default 180)")
    p.add_argument("--out", help="raw JSON result path (default benchmarks/results/scale_<label>_<N>.json)")
    args = p.parse_args(argv)
    if args.connections < 1 or args.rounds < 1 or args.window < 1 or args.probes < 0:
        p.error("--connections, --rounds, --window must be >= 1 and --probes >= 0")
    if not args.procs:
        args.procs = max(1, -(-args.connections // 6000))
    if args.connections / args.procs > 19_500:
        p.error("more than 19,500 sockets per client process: raise --procs (open files are capped at 20,000)")
    args.hold = args.hold or args.ping_interval * 2.5
    args.label = args.label or ("custom" if args.server_cmd else args.server)
    return args


# -- machine facts --------------------------------------------------------------------------

def slab_bytes():
    """Kernel slab memory (socket structures of both ends live here), from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Slab:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release()}
    try:
        import resource
        info["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError):
        pass
    for name in ("net/core/somaxconn", "net/ipv4/ip_local_port_range", "net/ipv4/tcp_mem", "fs/nr_open"):
        try:
            with open(f"/proc/sys/{name}") as f:
                info[name] = " ".join(f.read().split())
        except OSError:
            pass
    return info


# -- the parent's side: publisher, low-water marks, probes -------------------------------------

class Publisher(asyncio.Protocol):
    """Publishes without ids (no acks); answers pings; any error or close is reported."""

    def __init__(self, errors: list) -> None:
        self.errors = errors
        self.mask = wsclient.random_mask()
        self.parser = FrameParser(1 << 20, require_mask=False)
        self.transport = None
        self.closing = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def publish(self, ks, size: int) -> None:
        prefix = b'{"op":"publish","room":' + orjson.dumps(ROOM) + b',"data":'
        self.transport.write(b"".join(
            wsclient.client_frame(Opcode.TEXT, prefix + data_of(k, size) + b"}", self.mask) for k in ks))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameError as exc:
            self.errors.append(f"publisher: bad frame {exc}")
            return
        for opcode, _fin, _rsv1, payload in frames:
            if opcode == Opcode.PING:
                self.transport.write(wsclient.client_frame(Opcode.PONG, payload, self.mask))
            elif opcode == Opcode.TEXT and b'"error"' in payload:
                self.errors.append(f"publisher: {payload[:80]!r}")
            elif opcode == Opcode.CLOSE and not self.closing:
                self.errors.append("publisher: closed by the server")

    def connection_lost(self, exc) -> None:
        if not self.closing:
            self.errors.append("publisher: connection lost")


class Marks:
    """Every worker's low-water mark; the k that every subscriber of every worker has."""

    def __init__(self, workers: int) -> None:
        self.lows = [0] * workers
        self.low = 0
        self.done_at: dict = {}           # k -> perf_counter() when its last subscriber had it
        self.changed = asyncio.Event()

    def update(self, index: int, k: int, t: float) -> None:
        if k <= self.lows[index]:
            return
        self.lows[index] = k
        low = min(self.lows)
        for done in range(self.low + 1, low + 1):
            self.done_at[done] = t        # this worker's report completed it (the others were there)
        if low > self.low:
            self.low = low
            self.changed.set()

    async def wait_for(self, k: int, timeout: float) -> bool:
        deadline = perf_counter() + timeout
        while self.low < k:
            self.changed.clear()
            left = deadline - perf_counter()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return False
        return True


class Probes:
    """`n` loops of connect + upgrade + close while the fan-out runs: handshakes must keep working."""

    def __init__(self, target, n: int, sources: list) -> None:
        self.target = target
        self.n = n
        self.sources = wsclient.SourceAddresses(sources)
        self.ok = 0
        self.errors: dict = {}
        self.latencies: list = []
        self.running = False
        self.live: set = set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running:
            probe = _CloseWaiter(loop, self.live)
            t0 = perf_counter()
            try:
                async with asyncio.timeout(10):
                    await wsclient.open_websocket(self.target, probe, self.sources.next())
                    t1 = perf_counter()
                    probe.send_close()
                    await probe.done
            except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                kind = f"{type(exc).__name__}: {exc}"[:80]
                self.errors[kind] = self.errors.get(kind, 0) + 1
                if probe.transport is not None:
                    probe.transport.abort()
                await asyncio.sleep(0.05)
                continue
            self.ok += 1
            self.latencies.append(t1 - t0)
            if probe.transport is not None and not probe.transport.is_closing():
                probe.transport.close()
            await asyncio.sleep(0.01)     # a trickle, not a second benchmark

    def start(self) -> list:
        self.running = True
        return [asyncio.ensure_future(self._loop()) for _ in range(self.n)]

    async def stop(self, tasks) -> None:
        self.running = False
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for p in list(self.live):
            p.transport.abort()

    def report(self) -> dict:
        lat = sorted(self.latencies)
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        return {"handshakes_ok": self.ok, "handshake_errors": sum(self.errors.values()), "error_kinds": self.errors,
                "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)), "max_ms": ms(lat[-1] if lat else None)}


class Workers:
    def __init__(self, args, url: str, sources: list) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        base, extra = divmod(args.connections, args.procs)
        first = 0
        for i in range(args.procs):
            count = base + (1 if i < extra else 0)
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=scale_client.run_worker, daemon=True, args=(
                child, url, ROOM, count, first, sources, args.open_timeout, 10.0, 10.0))
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
            first += count
        self.ready: list = [None] * args.procs
        self.stats: list = [None] * args.procs
        self.pings: list = [None] * args.procs
        self.marks = Marks(args.procs)
        self.event = asyncio.Event()

    def listen(self, loop) -> None:
        for index, pipe in enumerate(self.pipes):
            loop.add_reader(pipe.fileno(), self._readable, loop, index)

    def _readable(self, loop, index: int) -> None:
        pipe = self.pipes[index]
        try:
            while pipe.poll():
                message = pipe.recv()
                kind = message[0]
                if kind == "low":
                    self.marks.update(index, message[1], message[2])
                elif kind == "ready":
                    self.ready[index] = message[1:]
                elif kind == "pings":
                    self.pings[index] = message[1]
                elif kind == "stats":
                    self.stats[index] = message[1]
                self.event.set()
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            if self.stats[index] is None:
                self.stats[index] = {"errors": {"worker exited": 1}}
            self.event.set()

    async def wait(self, what: str, timeout: float) -> bool:
        deadline = perf_counter() + timeout
        while any(v is None for v in getattr(self, what)):
            self.event.clear()
            left = deadline - perf_counter()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.event.wait(), left)
            except TimeoutError:
                return False
        return True

    def send(self, message) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(message)
            except OSError:
                pass

    def reap(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()   # our own child, by its handle
                proc.join(5)


async def measure(args, server: Server, workers: Workers, url: str, sources: list, report: dict) -> dict:
    """Phases 2-6 (see the module docstring); fills and returns `report`."""
    loop = asyncio.get_running_loop()
    workers.listen(loop)
    group = {"pgid": server.proc.pid}
    errors = report.setdefault("errors", [])
    n = args.connections

    # 2. open and join
    t0 = perf_counter()
    if not await workers.wait("ready", args.open_timeout + 30):
        errors.append("workers did not report ready in time")
    opened = sum(r[0] for r in workers.ready if r)
    joined = sum(r[1] for r in workers.ready if r)
    open_errors: dict = {}
    for r in workers.ready:
        for kind, count in (r[2] if r else {}).items():
            open_errors[kind] = open_errors.get(kind, 0) + count
    open_seconds = perf_counter() - t0
    report["open"] = {"opened": opened, "joined": joined, "seconds": round(open_seconds, 2),
                      "connections_per_s": round(opened / open_seconds, 1), "errors": open_errors}
    print(f"opened {opened:,} / joined {joined:,} of {n:,} in {open_seconds:.1f} s "
          f"({opened / open_seconds:,.0f}/s){'  errors ' + str(open_errors) if open_errors else ''}", flush=True)
    if joined < n:
        errors.append(f"only {joined} of {n} subscribers joined")

    # 3. idle hold with keepalive on
    await asyncio.sleep(2.0)
    rss_open = serverproc.rss_bytes(**group)
    slab_open = slab_bytes()
    workers.pings = [None] * len(workers.pipes)
    workers.send(("pings?",))
    await workers.wait("pings", 10)
    pings0 = sum(p or 0 for p in workers.pings)
    cpu0, h0 = serverproc.cpu_seconds(**group), perf_counter()
    print(f"idle hold {args.hold:.0f} s (keepalive pings every {args.ping_interval:g} s) ...", flush=True)
    await asyncio.sleep(args.hold)
    cpu1, held = serverproc.cpu_seconds(**group), perf_counter() - h0
    workers.pings = [None] * len(workers.pipes)
    workers.send(("pings?",))
    await workers.wait("pings", 10)
    pings = sum(p or 0 for p in workers.pings) - pings0
    rss_hold = serverproc.rss_bytes(**group)
    base = report["baseline"]
    idle = {"rss_kb_open": rss_open // 1024, "rss_kb_after_hold": rss_hold // 1024,
            "rss_bytes_per_conn": round((rss_hold - base["rss"]) / max(joined, 1), 1),
            "rss_bytes_per_conn_open": round((rss_open - base["rss"]) / max(joined, 1), 1),
            "hold_seconds": round(held, 2), "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_share": round((cpu1 - cpu0) / held, 4),
            "cpu_us_per_conn_s": round((cpu1 - cpu0) / held / max(joined, 1) * 1e6, 4),
            "pings_answered": pings}
    if slab_open is not None and base.get("slab") is not None:
        # Both ends' sockets are on this machine: half of the slab growth per connection.
        idle["kernel_slab_bytes_per_socket"] = round((slab_open - base["slab"]) / max(2 * opened, 1), 1)
    report["idle"] = idle
    print(f"idle: server RSS {idle['rss_bytes_per_conn']:,.0f} B/connection, CPU {idle['cpu_us_per_conn_s']:.3f} "
          f"us per connection per second ({idle['server_cpu_share']:.1%} of a core), {pings:,} pings answered", flush=True)

    # 4 + 5. fan-out with handshakes probing responsiveness
    pub_errors: list = []
    publisher = Publisher(pub_errors)
    try:
        async with asyncio.timeout(10):
            await wsclient.open_websocket(wsclient.parse_url(url), publisher, sources[0] if sources else None)
    except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
        errors.append(f"publisher could not connect: {exc!r}")
        return report
    probes = Probes(wsclient.parse_url(url), args.probes, sources)
    probe_tasks = probes.start()
    marks = workers.marks
    latencies = []
    k = 0
    for _ in range(args.rounds):
        k += 1
        t = perf_counter()
        publisher.publish([k], args.size)
        if not await marks.wait_for(k, 30):
            errors.append(f"publication {k} did not reach every subscriber within 30 s")
            break
        latencies.append(marks.done_at[k] - t)
        await asyncio.sleep(0.05)
    lat = sorted(latencies)
    report["round"] = {"publications": len(lat), "subscribers": joined,
                       "time_to_last_ms_p50": round(percentile(lat, 50) * 1000, 2) if lat else None,
                       "time_to_last_ms_max": round(lat[-1] * 1000, 2) if lat else None,
                       "time_to_last_ms_min": round(lat[0] * 1000, 2) if lat else None}
    if lat:
        print(f"round: time to last of {joined:,} subscribers p50 {report['round']['time_to_last_ms_p50']} ms, "
              f"min {report['round']['time_to_last_ms_min']} ms, max {report['round']['time_to_last_ms_max']} ms", flush=True)

    # window mode: keep `window` in flight; a completion tops the window up
    start_low, sent = marks.low, k
    cpu0, w0 = serverproc.cpu_seconds(**group), perf_counter()
    end = w0 + args.window_seconds
    stalled = False
    while perf_counter() < end:
        free = args.window - (sent - marks.low)
        if free > 0:
            publisher.publish(range(sent + 1, sent + free + 1), args.size)
            sent += free
        if not await marks.wait_for(marks.low + 1, 30):
            errors.append("window mode stalled: no publication completed in 30 s")
            stalled = True
            break
    elapsed = perf_counter() - w0
    cpu1 = serverproc.cpu_seconds(**group)
    done = marks.low - start_low
    report["window"] = {"window": args.window, "seconds": round(elapsed, 2), "publications": done,
                        "publications_per_s": round(done / elapsed, 1),
                        "deliveries_per_s": round(done * joined / elapsed, 1),
                        "server_cpu_share": round((cpu1 - cpu0) / elapsed, 3)}
    print(f"window {args.window}: {report['window']['deliveries_per_s']:,.0f} deliveries/s "
          f"({report['window']['publications_per_s']:,.1f} publications/s to {joined:,}), "
          f"server CPU {report['window']['server_cpu_share']:.0%}", flush=True)
    if not stalled:
        await marks.wait_for(sent, 30)   # let the last ones land before closing
    await probes.stop(probe_tasks)
    report["probes"] = probes.report()
    print(f"handshakes during the fan-out: {probes.ok} ok, {report['probes']['handshake_errors']} failed, "
          f"p50 {report['probes']['p50_ms']} ms, p99 {report['probes']['p99_ms']} ms", flush=True)
    if probes.ok == 0 and args.probes:
        errors.append("no handshake succeeded during the fan-out")
    if probes.errors:
        errors.append(f"handshakes failed during the fan-out: {probes.errors}")
    errors.extend(pub_errors)
    publisher.closing = True
    publisher.transport.abort()

    # 6. close everything
    workers.send(("stop",))
    await workers.wait("stats", 60)
    worker_errors: dict = {}
    deliveries = 0
    for s in workers.stats:
        for kind, count in ((s or {}).get("errors") or {}).items():
            worker_errors[kind] = worker_errors.get(kind, 0) + count
        deliveries += (s or {}).get("deliveries", 0)
    report["subscriber_errors"] = worker_errors
    report["deliveries_total"] = deliveries
    if worker_errors:
        errors.append(f"subscriber errors: {worker_errors}")
    return report


def projection(report: dict, args) -> dict:
    """What the measured per-connection costs mean for 50,000 connections in one process."""
    idle, base = report.get("idle") or {}, report["baseline"]
    out: dict = {"connections": TARGET}
    if idle:
        per = idle["rss_bytes_per_conn"]
        out["rss_mb"] = round((base["rss"] + TARGET * per) / 2**20, 1)
        out["idle_cpu_share"] = round(TARGET * idle["cpu_us_per_conn_s"] / 1e6, 4)
        if "kernel_slab_bytes_per_socket" in idle:
            out["kernel_slab_mb"] = round(TARGET * idle["kernel_slab_bytes_per_socket"] / 2**20, 1)
    rnd = report.get("round") or {}
    if rnd.get("time_to_last_ms_p50"):
        # One core writes to every member: linear in members.
        out["time_to_last_ms_p50"] = round(rnd["time_to_last_ms_p50"] * TARGET / max(rnd["subscribers"], 1), 1)
    window = report.get("window") or {}
    if window.get("deliveries_per_s"):
        out["deliveries_per_s"] = window["deliveries_per_s"]   # a rate per core: does not grow with N
    out["settings"] = {
        "open files": "LimitNOFILE=262144 (deploy/systemd/ws-gateway*.service); fs.nr_open / fs.file-max "
                      "(deploy/sysctl/99-ws-gateway.conf); interactive: deploy/limits/ws-gateway.conf",
        "accept queue": "net.core.somaxconn = 8192, net.ipv4.tcp_max_syn_backlog = 8192 (reconnect storms); "
                        "the gateway listens with backlog 4096",
        "ports": "behind nginx each client is one nginx -> gateway connection: ip_local_port_range = 10240 65535 "
                 "(~55k per nginx address and gateway port) or several gateway ports / upstream addresses",
        "kernel socket memory": "net.ipv4.tcp_mem / tcp_rmem / tcp_wmem with small defaults (4096 16384 ...) "
                                "so 50k mostly idle sockets stay cheap",
    }
    return out


def print_projection(proj: dict) -> None:
    print(f"\nprojection to {proj['connections']:,} connections in one process:")
    if "rss_mb" in proj:
        print(f"  server RSS ~{proj['rss_mb']:,} MB; idle CPU (keepalive) ~{proj['idle_cpu_share']:.1%} of a core"
              + (f"; kernel socket slab ~{proj['kernel_slab_mb']:,} MB" if "kernel_slab_mb" in proj else ""))
    if "time_to_last_ms_p50" in proj:
        print(f"  fan-out of one message to all: ~{proj['time_to_last_ms_p50']:,} ms to the last subscriber "
              f"(linear in members at the measured {proj.get('deliveries_per_s', 0):,.0f} deliveries/s)")
    print("  settings needed:")
    for name, text in proj["settings"].items():
        print(f"    {name}: {text}")


def main(argv=None) -> int:
    args = parse_args(argv)
    template = args.server_cmd or SERVERS[args.server].format(python=sys.executable, ping=args.ping_interval)
    sources = [f"127.0.0.{i}" for i in range(2, 2 + args.source_addresses)]
    server = Server(template, cwd=REPO)
    workers = None
    try:
        server.wait_listening(30)
        time.sleep(1.0)
        url = f"ws://127.0.0.1:{server.port}/ws"
        report = {"label": args.label, "server_cmd": server.command, "connections": args.connections,
                  "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
                  "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "baseline": {"rss": serverproc.rss_bytes(pgid=server.proc.pid), "slab": slab_bytes()}}
        print(f"{args.label}: {server.command}\n{args.connections:,} subscribers over {args.procs} client processes "
              f"and {len(sources)} source addresses; baseline RSS {report['baseline']['rss'] // 1024:,} KB", flush=True)
        workers = Workers(args, url, sources)
        result = uvloop.run(measure(args, server, workers, url, sources, report))
    except ServerFailed as exc:
        print(f"scale: {exc}", file=sys.stderr)
        return 1
    finally:
        if workers is not None:
            workers.send(("stop",))
            workers.reap()
        server.stop()
        server.discard_log()
    result["projection"] = projection(result, args)
    print_projection(result["projection"])
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"scale_{args.label}_{args.connections}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nraw result: {out}")
    if result["errors"]:
        print("ERRORS:\n  " + "\n  ".join(map(str, result["errors"])))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
