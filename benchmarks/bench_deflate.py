"""permessage-deflate benchmarks: memory per idle connection, compress-once fan-out, the codec.

    python -m benchmarks.bench_deflate rss    [--connections 10000]
    python -m benchmarks.bench_deflate fanout [--subscribers 1000 --size 1024 --window 32 --rounds 3]
    python -m benchmarks.bench_deflate codec

rss     Server RSS growth per open connection after N clients upgraded and each echoed one
        1 KiB JSON message: `plain` (no offer), `deflate` (Chrome's offer
        `permessage-deflate; client_max_window_bits`, server defaults) and `takeover`
        (--compression-client-context-takeover: one inflater per connection, the memory the
        default avoids). One fresh server per mode; (RSS after - RSS before) / N.
fanout  S subscribers in one /ws room, a publisher keeping W publications of a ~1 KiB JSON
        document in flight; deliveries/s with subscribers that do not offer compression vs
        subscribers that negotiated it (compress-once: one deflate per publication). Rounds
        alternate the two on fresh servers; median ratio, also per server core (rate divided
        by the server's CPU share, steadier on a shared machine). Subscribers count frames
        (header parse only); the first message of every subscriber is inflated and checked.
codec   The zlib costs behind the design choices: shared Z_FULL_FLUSH compressor vs a fresh
        one per message, levels 1/6, the ratio a per-connection context (takeover) would add
        for a chat stream, and what deflate saves by message size (-> compression_min_bytes).

The server runs `python -m gateway serve` in a subprocess pinned to CPU 0 (client: CPU 1)
when both exist. Only 127.0.0.1 is used.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import orjson

from gateway_ext import FrameParser, encode_frame

ROOT = Path(__file__).resolve().parents[1]
MASK = b"\x37\xfa\x21\x3d"
CHROME_OFFER = "permessage-deflate; client_max_window_bits"
_WORDS = ("the quick brown fox jumps over lazy dog order status shipped pending price volume "
          "market user message reply thanks meeting tomorrow update build deploy green red "
          "latency error warning region eu us ap server client queue retry alice bob carol").split()


def sample_doc(k: int, size: int = 1024, seed: int = 0) -> bytes:
    """A chat/dashboard-like JSON document of about `size` bytes (keys, ids, numbers, text)."""
    rnd = random.Random(seed * 1_000_003 + k)
    doc = {"k": k, "type": "chat.message", "room": "support-eu", "ts": 1_700_000_000_000 + k * 37,
           "user": {"id": f"u_{rnd.randrange(10**6)}", "name": rnd.choice(["Alice Martin", "Bob Chen", "Carol Diaz"]),
                    "avatar": f"https://cdn.example.com/a/{rnd.randrange(10**6)}.png"},
           "items": []}
    while len(orjson.dumps(doc)) < size - 60:
        doc["items"].append({"id": rnd.randrange(10**9), "price": round(rnd.uniform(1, 500), 2),
                             "qty": rnd.randrange(1, 50), "note": " ".join(rnd.choices(_WORDS, k=rnd.randrange(2, 8)))})
    return orjson.dumps(doc)


def chat_doc(k: int, size: int) -> bytes:
    """A small chat message of about `size` bytes."""
    rnd = random.Random(k)
    doc = {"type": "chat", "user": "alice", "text": ""}
    while len(orjson.dumps(doc)) < size:
        doc["text"] += rnd.choice(_WORDS) + " "
    return orjson.dumps(doc)


def client_deflate(data: bytes, wbits: int = 12) -> bytes:
    comp = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return (comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


# -- the server under test ----------------------------------------------------------------------

def _cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return []


class Server:
    def __init__(self, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--ping-interval", "0", "--rate-limit", "0", "--max-connections", "100000",
               "--log-level", "warning", *flags]
        if len(_cpus()) >= 2:
            cmd = ["taskset", "-c", str(_cpus()[0]), *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode())
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    @property
    def rss(self) -> int:
        return self._status("VmRSS:")

    @property
    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- a minimal client connection ---------------------------------------------------------------

class Client(asyncio.Protocol):
    """Upgrade (optionally offering deflate), then hand every frame to `on_frames`."""

    def __init__(self, path: str, offer: str | None, on_frames=None) -> None:
        self.path, self.offer, self.on_frames = path, offer, on_frames
        self.transport = None
        self.head = b""
        self.opened = asyncio.get_running_loop().create_future()
        self.parser = FrameParser(1 << 24, require_mask=False, allow_rsv1=True)
        self.negotiated = False
        self.inbox: asyncio.Queue | None = None
        self.bytes_in = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Extensions: {self.offer}\r\n" if self.offer else ""
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"{extra}\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(head.split(b"\r\n")[0].decode()))
                return
            self.negotiated = b"permessage-deflate" in head.lower()
            self.opened.set_result(None)
            if not data:
                return
        self.bytes_in += len(data)
        frames = self.parser.feed(data)
        if frames:
            if self.on_frames is not None:
                self.on_frames(self, frames)
            elif self.inbox is not None:
                for frame in frames:
                    self.inbox.put_nowait(frame)

    def send_text(self, data: bytes, compress: bool = False) -> None:
        if compress:
            self.transport.write(encode_frame(1, client_deflate(data), True, True, MASK))
        else:
            self.transport.write(encode_frame(1, data, mask=MASK))

    async def recv(self, timeout: float = 30.0):
        return await asyncio.wait_for(self.inbox.get(), timeout)


async def connect(port: int, path: str, offer: str | None, on_frames=None, inbox: bool = False) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(path, offer, on_frames), "127.0.0.1", port)
    if inbox:
        client.inbox = asyncio.Queue()
    await asyncio.wait_for(client.opened, 30)
    return client


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def pin_client() -> None:
    cpus = _cpus()
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[1]})


# -- rss -----------------------------------------------------------------------------------------

async def _rss_round(port: int, n: int, offer: str | None) -> int:
    clients: list[Client] = []
    for start in range(0, n, 500):
        batch = [connect(port, "/echo", offer, inbox=True) for _ in range(min(500, n - start))]
        clients += await asyncio.gather(*batch)
    negotiated = sum(c.negotiated for c in clients)
    msg = sample_doc(1)
    for start in range(0, n, 500):  # every connection echoes one 1 KiB message (compressed if agreed)
        group = clients[start:start + 500]
        for c in group:
            c.send_text(msg, compress=c.negotiated)
        for c in group:
            _, _, rsv1, payload = await c.recv()
            assert (inflate(payload) if rsv1 else payload) == msg
    return negotiated, clients


def cmd_rss(args) -> None:
    pin_client()
    modes = [("plain", None, ()), ("deflate", CHROME_OFFER, ()),
             ("takeover", CHROME_OFFER, ("--compression-client-context-takeover", "--compression-max-contexts", "1000000"))]
    print(f"rss: {args.connections} idle connections, each echoed one 1 KiB JSON message")
    results = {}
    for name, offer, flags in modes:
        server = Server("--echo", *flags)
        try:
            time.sleep(0.5)
            before = server.rss

            async def main():
                negotiated, clients = await _rss_round(server.port, args.connections, offer)
                await asyncio.sleep(1.0)
                after = server.rss
                for c in clients:
                    c.transport.abort()
                return negotiated, after
            negotiated, after = _run(main())
        finally:
            server.stop()
        per = (after - before) / args.connections
        results[name] = per
        print(f"  {name:9s} negotiated {negotiated:6d}/{args.connections}  RSS {before / 2**20:7.1f} -> "
              f"{after / 2**20:7.1f} MiB   {per / 1024:6.2f} KiB/connection")
    print(f"  deflate / plain = {results['deflate'] / results['plain']:.2f}x   "
          f"takeover / plain = {results['takeover'] / results['plain']:.2f}x")


# -- fanout --------------------------------------------------------------------------------------

class _Fanout:
    def __init__(self, subscribers: int, window: int) -> None:
        self.at = {0: subscribers}   # k -> subscribers whose last message is k
        self.low = 0
        self.top = 0
        self.window = window
        self.deliveries = 0
        self.compressed = 0
        self.bytes = 0
        self.publisher: Client | None = None
        self.size = 1024
        self.checked = 0
        self.errors = 0

    def on_frames(self, client: Client, frames) -> None:
        k_old = client.k
        k_new = k_old + len(frames)
        client.k = k_new
        if k_old == 0:
            self._check(frames[0])
        self.deliveries += len(frames)
        for frame in frames:
            if frame[2]:
                self.compressed += 1
        at = self.at
        at[k_old] -= 1
        at[k_new] = at.get(k_new, 0) + 1
        if k_old == self.low and at[k_old] == 0:
            low = self.low
            while at.get(low, 0) == 0 and low < self.top:
                at.pop(low, None)
                low += 1
            self.low = low
            self.top_up()

    def _check(self, frame) -> None:
        payload = inflate(frame[3]) if frame[2] else frame[3]
        doc = orjson.loads(payload)
        if doc.get("op") != "message" or doc["data"]["k"] != 1:
            self.errors += 1
        self.checked += 1

    def top_up(self) -> None:
        room = self.window - (self.top - self.low)
        if room <= 0:
            return
        out = []
        for _ in range(room):
            self.top += 1
            data = _DOCS[self.top % len(_DOCS)].replace(b'{"k":0,', b'{"k":%d,' % self.top, 1)
            out.append(encode_frame(1, b'{"op":"publish","room":"bench","data":' + data + b"}", mask=MASK))
        self.publisher.transport.write(b"".join(out))


_DOCS: list = []


async def _fanout_round(port: int, subs: int, offer: str | None, window: int, warmup: float, duration: float,
                        server: Server) -> dict:
    state = _Fanout(subs, window)
    clients = []
    for start in range(0, subs, 250):
        group = await asyncio.gather(*[connect(port, "/ws", offer, inbox=True) for _ in range(min(250, subs - start))])
        for c in group:
            c.send_text(orjson.dumps({"op": "join", "room": "bench", "id": 1}))
        for c in group:
            _, _, _, payload = await c.recv()
            assert orjson.loads(payload)["op"] == "ack", payload
            c.k = 0
            c.inbox = None
            c.on_frames = state.on_frames
        clients += group
    negotiated = sum(c.negotiated for c in clients)
    state.publisher = await connect(port, "/ws", None)
    state.top_up()
    await asyncio.sleep(warmup)
    d0, b0, c0, cpu0, t0 = state.deliveries, sum(c.bytes_in for c in clients), state.compressed, server.cpu_seconds, time.perf_counter()
    me0 = sum(os.times()[:2])
    await asyncio.sleep(duration)
    d1, b1, c1, cpu1, t1 = state.deliveries, sum(c.bytes_in for c in clients), state.compressed, server.cpu_seconds, time.perf_counter()
    me1 = sum(os.times()[:2])
    for c in clients + [state.publisher]:
        c.transport.abort()
    elapsed = t1 - t0
    return {"rate": (d1 - d0) / elapsed, "server_cpu": (cpu1 - cpu0) / elapsed, "client_cpu": (me1 - me0) / elapsed,
            "negotiated": negotiated,
            "bytes_per_delivery": (b1 - b0) / max(1, d1 - d0), "compressed_share": (c1 - c0) / max(1, d1 - d0),
            "checked": state.checked, "errors": state.errors}


def cmd_fanout(args) -> None:
    pin_client()
    _DOCS[:] = [sample_doc(0, args.size, seed) for seed in range(16)]  # "k":0 is replaced per publication
    print(f"fanout: {args.subscribers} subscribers, ~{len(_DOCS[0])} B JSON data, window {args.window}, "
          f"{args.duration:g} s measured after {args.warmup:g} s, {args.rounds} rounds (fresh server each)")
    ratios, core_ratios, rows = [], [], {"plain": [], "deflate": []}
    for r in range(args.rounds):
        got = {}
        for name, offer in (("plain", None), ("deflate", CHROME_OFFER)):
            server = Server()
            try:
                res = _run(_fanout_round(server.port, args.subscribers, offer, args.window,
                                                args.warmup, args.duration, server))
            finally:
                server.stop()
            got[name] = res
            rows[name].append(res)
            print(f"  round {r + 1} {name:8s} {res['rate']:12,.0f} deliveries/s  cpu server {res['server_cpu']:4.0%} client {res['client_cpu']:4.0%}  "
                  f"{res['bytes_per_delivery']:7.1f} B/delivery on the wire  compressed {res['compressed_share']:4.0%}  "
                  f"negotiated {res['negotiated']}/{args.subscribers}  checked {res['checked']} errors {res['errors']}")
        ratios.append(got["plain"]["rate"] / got["deflate"]["rate"])
        core_ratios.append((got["plain"]["rate"] / max(got["plain"]["server_cpu"], 1e-9))
                           / (got["deflate"]["rate"] / max(got["deflate"]["server_cpu"], 1e-9)))
    print(f"  median deliveries/s: plain {statistics.median(r['rate'] for r in rows['plain']):,.0f}  "
          f"deflate {statistics.median(r['rate'] for r in rows['deflate']):,.0f}")
    ns = {name: statistics.median(r["server_cpu"] / max(r["rate"], 1) * 1e9 for r in rows[name]) for name in rows}
    print(f"  median server CPU per delivery: plain {ns['plain']:.0f} ns, deflate {ns['deflate']:.0f} ns")
    print(f"  median plain/deflate = {statistics.median(ratios):.2f}x   per server core {statistics.median(core_ratios):.2f}x"
          f"   wire bytes/delivery plain {statistics.median(r['bytes_per_delivery'] for r in rows['plain']):.0f}"
          f" vs deflate {statistics.median(r['bytes_per_delivery'] for r in rows['deflate']):.0f}")


# -- codec ---------------------------------------------------------------------------------------

def _per_call(fn, seconds: float = 0.3) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            fn()
        n += 100
    return (time.perf_counter() - t0) / n * 1e6


def cmd_codec(args) -> None:
    pin_client()
    from gateway.ws.deflate import Deflate, DeflateSettings
    doc = sample_doc(7)
    print(f"codec: {len(doc)} B chat-like JSON")
    for level in (1, 6):
        d = Deflate(DeflateSettings(level=level, min_bytes=0))
        shared = _per_call(lambda: d.compress(doc, 15))
        fresh = _per_call(lambda: (lambda c: c.compress(doc) + c.flush(zlib.Z_SYNC_FLUSH))(
            zlib.compressobj(level, zlib.DEFLATED, -15)))
        size = len(d.compress(doc, 15))
        inflate_us = _per_call(lambda: zlib.decompressobj(-15).decompress(client_deflate(doc, 15) + b"\x00\x00\xff\xff"))
        raw = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
        zlib_only = _per_call(lambda: (raw.compress(doc), raw.flush(zlib.Z_FULL_FLUSH)))
        frame_us = _per_call(lambda: d.frame(1, doc, 15))
        print(f"  level {level}: {len(doc)} -> {size} B ({len(doc) / size:.1f}x)  shared+Z_FULL_FLUSH {shared:5.1f} us"
              f"  fresh compressobj {fresh:5.1f} us   (client deflate+our inflate {inflate_us:5.1f} us)")
        print(f"           Deflate.frame() {frame_us:5.1f} us of which zlib's C calls {zlib_only:5.1f} us"
              f" -> Python around zlib {max(0.0, frame_us - zlib_only):4.1f} us (what Cython could save)")
    # What per-connection context takeover would add on a stream of small chat messages.
    msgs = [orjson.dumps({"type": "chat.message", "room": "support-eu", "user": random.Random(i).choice(
        ["alice", "bob", "carol"]), "text": " ".join(random.Random(i).choices(_WORDS, k=12)), "ts": 1_700_000_000 + i})
        for i in range(200)]
    d = Deflate(DeflateSettings(min_bytes=0))
    plain = sum(map(len, msgs))
    no_takeover = sum(len(d.compress(m, 15) or m) for m in msgs)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    takeover = sum(len(comp.compress(m) + comp.flush(zlib.Z_SYNC_FLUSH)) - 4 for m in msgs)
    print(f"  200 chat messages of ~{plain // 200} B: plain {plain} B, no context takeover {no_takeover} B "
          f"({plain / no_takeover:.2f}x), with takeover {takeover} B ({plain / takeover:.2f}x) -- takeover would "
          f"cost one ~{(1 << 15) * 2 // 1024 + 200} KiB compressor per connection and rule out compress-once")
    print("  savings by message size (no context takeover, level 6):")
    for size in (64, 128, 256, 512, 1024, 4096):
        m = sample_doc(3, size) if size >= 512 else chat_doc(3, size)
        out = d.compress(m, 15)
        print(f"    {len(m):5d} B -> {len(out) if out else len(m):5d} B  ({1 - (len(out) if out else len(m)) / len(m):4.0%} saved)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_deflate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rss = sub.add_parser("rss")
    rss.add_argument("--connections", type=int, default=10_000)
    fan = sub.add_parser("fanout")
    fan.add_argument("--subscribers", type=int, default=1000)
    fan.add_argument("--size", type=int, default=1024)
    fan.add_argument("--window", type=int, default=32)
    fan.add_argument("--rounds", type=int, default=3)
    fan.add_argument("--warmup", type=float, default=2.0)
    fan.add_argument("--duration", type=float, default=5.0)
    sub.add_parser("codec")
    args = parser.parse_args(argv)
    {"rss": cmd_rss, "fanout": cmd_fanout, "codec": cmd_codec}[args.cmd](args)


if __name__ == "__main__":
    main()
