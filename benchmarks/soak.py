"""Soak: a gateway under mixed load for a long time, sampled, plotted. A benchmark mode, not CI.

    python -m benchmarks.soak --duration 1800            # the issue's 30 minutes
    python -m benchmarks.soak --duration 600 --tag 10min # what fits a shared machine

What runs (all on 127.0.0.1; everything is bounded by --duration and stops by itself):
- a redis-server of its own on a free port, SIGKILLed and restarted every --redis-restart-every s;
- one gateway (`python -m gateway serve --broker redis://...`) with the HTTP API on;
- fan-out: --subscribers websockets clients over --rooms rooms, reading everything;
- publishing: a websockets publisher (--ws-rate msgs/s) and POST /api/publish (--http-rate/s);
- churn: --churn-rate clients/s connect, join a room, receive one message, and close (half of
  them cleanly, half by dropping the TCP connection);
- slow consumers: --slow raw sockets that upgrade, join every room and never read; the
  gateway disconnects them when their queue is full (close 4000) and new ones replace them.

Sampled every --sample-every s: the gateway's RSS and open file descriptors (/proc), its
event-loop lag (worst since the previous sample, `ws_gateway_event_loop_lag_max_seconds`),
open connections, Redis `used_memory`, and the messages the fan-out subscribers received.
Written to benchmarks/results/soak_<tag>.json and soak_<tag>.png (matplotlib, bench extra).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import orjson
import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
API_KEY = "soak-api-key-0123456789abcdef"
_TCP_CLOSED = (7, 8)   # TCP_CLOSE (reset), TCP_CLOSE_WAIT (FIN): linux/tcp_states.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """redis-server on a free port, persistence off, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="soak-redis-")
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.used_memory() is not None:
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def used_memory(self) -> int | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"INFO memory\r\n")
                data = b""
                while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            found = re.search(rb"used_memory:(\d+)", data)
            return int(found.group(1)) if found else None
        except OSError:
            return None


class Gateway:
    def __init__(self, redis: Redis, extra: list[str]) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = open(os.path.join(tempfile.gettempdir(), f"soak-gateway-{self.port}.log"), "w")
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--broker", f"redis://127.0.0.1:{redis.port}/0", "--metrics-port", str(self.metrics_port),
             "--api-key", API_KEY, "--rate-limit", "0", "--log-level", "warning", *extra],
            cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gateway did not start")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def rss_and_fds(self) -> tuple[int, int]:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


class Load:
    def __init__(self, gw: Gateway, args) -> None:
        self.gw, self.args = gw, args
        self.url = f"ws://127.0.0.1:{gw.port}/ws"
        self.rooms = [f"soak-{i}" for i in range(args.rooms)]
        self.received = 0
        self.published = 0
        self.publish_errors = 0
        self.churned = 0
        self.churn_errors = 0
        self.slow_disconnected = 0
        self.stop = asyncio.Event()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the run ends first; True while it goes on."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            return False
        except asyncio.TimeoutError:
            return True

    async def subscriber(self, room: str) -> None:
        while not self.stop.is_set():
            try:
                async with websockets.connect(self.url, max_size=None) as ws:
                    await ws.send(orjson.dumps({"op": "join", "room": room, "id": 1}).decode())
                    while not self.stop.is_set():
                        try:
                            await asyncio.wait_for(ws.recv(), 1.0)
                        except asyncio.TimeoutError:
                            continue
                        self.received += 1
            except (OSError, websockets.WebSocketException):
                await self._sleep(0.5)

    async def ws_publisher(self) -> None:
        period = 1.0 / self.args.ws_rate
        while not self.stop.is_set():
            try:
                async with websockets.connect(self.url, max_size=None) as ws:
                    n = 0
                    while await self._sleep(period):
                        n += 1
                        await ws.send(orjson.dumps({"op": "publish", "room": random.choice(self.rooms),
                                                    "data": {"n": n, "pad": "x" * 200}}).decode())
                        self.published += 1
                        while True:   # drain whatever came back (errors while Redis is down)
                            try:
                                reply = await asyncio.wait_for(ws.recv(), 0.001)
                            except asyncio.TimeoutError:
                                break
                            if b'"error"' in (reply if isinstance(reply, bytes) else reply.encode()):
                                self.publish_errors += 1
            except (OSError, websockets.WebSocketException):
                await self._sleep(0.5)

    async def http_publisher(self) -> None:
        import aiohttp
        period = 1.0 / self.args.http_rate
        url = f"http://127.0.0.1:{self.gw.port}/api/publish"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            while await self._sleep(period):
                try:
                    async with session.post(url, json={"room": random.choice(self.rooms), "data": {"via": "http"}}) as r:
                        await r.read()
                        self.published += 1
                        if r.status != 200:
                            self.publish_errors += 1
                except aiohttp.ClientError:
                    self.publish_errors += 1

    async def churn(self) -> None:
        period = 1.0 / self.args.churn_rate
        pending: set[asyncio.Task] = set()

        async def one(i: int) -> None:
            try:
                ws = await websockets.connect(self.url)
                await ws.send(orjson.dumps({"op": "join", "room": self.rooms[i % len(self.rooms)], "id": 1}).decode())
                await asyncio.wait_for(ws.recv(), 10)
                if i % 2:
                    await ws.close()
                else:
                    ws.transport.abort()   # a dropped network: no close handshake
                self.churned += 1
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
                self.churn_errors += 1

        i = 0
        while await self._sleep(period):
            i += 1
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=15)

    async def slow_consumers(self) -> None:
        """Raw sockets that upgrade, join the busiest room and never read again."""
        socks: list[socket.socket] = []
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        while not self.stop.is_set():
            alive = []
            for s in socks:
                # Closed by the gateway? With our receive window at zero its RST is out of window
                # and ignored (RFC 5961), so poke it: an unsolicited, empty, masked Pong (allowed by
                # RFC 6455 5.5.3, ignored by a live gateway) draws a fresh RST from a closed one.
                # Then tcp_info's first byte, the TCP state, says CLOSE / CLOSE_WAIT.
                try:
                    s.send(b"\x8a\x80" + os.urandom(4), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self.slow_disconnected += 1
                    continue
                if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _TCP_CLOSED:
                    s.close()
                    self.slow_disconnected += 1
                    continue
                alive.append(s)
            socks = alive
            while len(socks) < self.args.slow:
                try:
                    s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=5)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    s.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += s.recv(4096)
                    for room in self.rooms:   # every room: its queue fills within a minute or two
                        payload = orjson.dumps({"op": "join", "room": room})
                        mask = os.urandom(4)
                        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
                    socks.append(s)
                except OSError:
                    await self._sleep(0.5)
                    break
            await self._sleep(2.0)
        for s in socks:
            s.close()

    async def redis_restarts(self, redis: Redis, events: list) -> None:
        every = self.args.redis_restart_every
        while await self._sleep(every):
            redis.kill()
            events.append(("redis killed", time.monotonic()))
            if not await self._sleep(self.args.redis_down_for):
                redis.start()
                break
            redis.start()
            events.append(("redis back", time.monotonic()))


async def run(args) -> dict:
    redis = Redis()
    redis.start()
    # A smaller per-connection queue than the default 1 MiB, so slow consumers cycle in minutes.
    # and a capped kernel send buffer (autotuning would let each stalled socket hold 4 MiB first).
    gw = Gateway(redis, ["--max-queue-bytes", "262144", "--send-buffer-bytes", "65536", *(args.gateway_arg or [])])
    load = Load(gw, args)
    events: list = []
    samples: list[dict] = []
    t0 = time.monotonic()
    tasks = [asyncio.create_task(load.subscriber(load.rooms[i % len(load.rooms)])) for i in range(args.subscribers)]
    tasks += [asyncio.create_task(c) for c in (load.ws_publisher(), load.http_publisher(), load.churn(),
                                               load.slow_consumers(), load.redis_restarts(redis, events))]
    try:
        last_received = 0
        while time.monotonic() - t0 < args.duration:
            await asyncio.sleep(args.sample_every)
            try:
                metrics = await asyncio.to_thread(gw.metrics)
                rss, fds = gw.rss_and_fds()
            except OSError as exc:
                print(f"soak: sample failed: {exc}", file=sys.stderr)
                continue
            sample = {
                "t": round(time.monotonic() - t0, 1), "rss_bytes": rss, "open_fds": fds,
                "loop_lag_max_s": metrics.get("ws_gateway_event_loop_lag_max_seconds"),
                "connections": metrics.get("ws_gateway_connections_open"),
                "redis_used_memory": await asyncio.to_thread(redis.used_memory),
                "received": load.received - last_received, "published": load.published,
                "publish_errors": load.publish_errors, "churned": load.churned, "churn_errors": load.churn_errors,
                "slow_disconnected": load.slow_disconnected,
                "slow_consumer_closes": metrics.get("ws_gateway_backpressure_slow_disconnects_total"),
            }
            last_received = load.received
            samples.append(sample)
            print("soak:", json.dumps(sample), flush=True)
    finally:
        load.stop.set()
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                print(f"soak: a load task failed: {task.exception()!r}", file=sys.stderr)
        code = await asyncio.to_thread(gw.stop)
        redis.kill()
    return {"args": vars(args), "samples": samples, "gateway_exit": code,
            "events": [(name, round(t - t0, 1)) for name, t in events]}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["samples"]
    t = [x["t"] / 60 for x in s]
    panels = [("RSS (MiB)", [x["rss_bytes"] / 2**20 for x in s]),
              ("open file descriptors", [x["open_fds"] for x in s]),
              ("event-loop lag, worst per sample (ms)", [(x["loop_lag_max_s"] or 0) * 1000 for x in s]),
              ("Redis used_memory (MiB)", [(x["redis_used_memory"] or 0) / 2**20 for x in s]),
              ("open connections", [x["connections"] or 0 for x in s]),
              ("messages received by subscribers / sample", [x["received"] for x in s])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels)), sharex=True)
    for ax, (title, ys) in zip(axes, panels):
        ax.plot(t, ys, lw=1)
        ax.set_title(f"{title}: first {ys[0]:,.1f}, last {ys[-1]:,.1f}, max {max(ys):,.1f}", fontsize=9, loc="left")
        ax.set_ylim(bottom=0, top=max(ys) * 1.15 or 1)
        ax.grid(alpha=0.3)
        for name, at in result["events"]:
            if name == "redis killed":
                ax.axvline(at / 60, color="red", alpha=0.3, lw=0.8)
    axes[-1].set_xlabel("minutes (red lines: Redis SIGKILLed and restarted)")
    a = result["args"]
    fig.suptitle(f"soak {a['duration'] / 60:.0f} min: {a['subscribers']} subscribers / {a['rooms']} rooms, "
                 f"{a['ws_rate']:g}+{a['http_rate']:g} publishes/s, churn {a['churn_rate']:g}/s, {a['slow']} slow",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800, help="seconds (default 1800)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--subscribers", type=int, default=300)
    p.add_argument("--rooms", type=int, default=10)
    p.add_argument("--ws-rate", type=float, default=100, help="publishes/s over a websocket")
    p.add_argument("--http-rate", type=float, default=20, help="publishes/s through POST /api/publish")
    p.add_argument("--churn-rate", type=float, default=20, help="short-lived clients/s")
    p.add_argument("--slow", type=int, default=5, help="slow consumers held at any time")
    p.add_argument("--redis-restart-every", type=float, default=180)
    p.add_argument("--redis-down-for", type=float, default=3)
    p.add_argument("--gateway-arg", action="append", help="extra flag for the gateway (repeat)")
    p.add_argument("--tag", default=None)
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as fh:
            plot(json.load(fh), args.plot_only[:-len(".json")] + ".png")
        return 0
    tag = args.tag or f"{int(args.duration / 60)}min"
    result = asyncio.run(run(args))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"soak_{tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(RESULTS, f"soak_{tag}.png"))
    print(f"soak: wrote benchmarks/results/soak_{tag}.json and .png; gateway exit {result['gateway_exit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
