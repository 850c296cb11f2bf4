"""Cross-process fan-out through Redis vs one process with the memory broker, side by side.

    python benchmarks/bench_cross_process.py [--subscribers 1000] [--window 32] [--rounds 3]
                                              [--duration 5] [--warmup 2] [--size 64]

Setups (each round runs all of them, in turn, so machine noise hits them alike):
  memory      one gateway, memory broker: publisher and subscribers on it (the baseline)
  redis-1     one gateway, Redis broker: same, every publication makes the Redis round trip
  redis-3     three gateways on one Redis: the publisher on A, the subscribers split over B
              and C (loadtool fanout --subscriber-url); A has no members, so it only publishes

The client is the load tool's fanout mode (deliveries/s = messages received by subscribers;
p99 = time from publishing to the LAST subscriber receiving it). It starts its own
redis-server on a free port in a temp dir (never the system one) and its own gateways, and
prints one line per round and setup, then the medians and ratios to `memory`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str = "/readyz", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} not ready")


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def evalsha_stats(self) -> dict:
        import redis
        with redis.Redis(host="127.0.0.1", port=self.port) as r:
            return r.info("commandstats").get("cmdstat_evalsha", {})

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Gateway:
    def __init__(self, broker: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--broker", broker, "--ping-interval", "0", "--rate-limit", "0", "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(self.port)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fanout(args, pub: Gateway, subs: list[Gateway], room: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.loadtool", "fanout", "--url", pub.url,
           "--subscribers", str(args.subscribers), "--window", str(args.window), "--size", str(args.size),
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--room", room]
    for gw in subs:
        cmd += ["--subscriber-url", gw.url]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.duration + args.warmup + 120)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"loadtool failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args()

    redis = Redis()
    servers: list[Gateway] = []
    try:
        memory = Gateway("memory://")
        redis1 = Gateway(f"redis://127.0.0.1:{redis.port}/0")
        a, b, c = (Gateway(f"redis://127.0.0.1:{redis.port}/0") for _ in range(3))
        servers = [memory, redis1, a, b, c]
        setups = {"memory": (memory, []), "redis-1": (redis1, []), "redis-3": (a, [b, c])}
        results: dict[str, list[dict]] = {name: [] for name in setups}
        for rnd in range(args.rounds):
            for name, (pub, subs) in setups.items():
                r = fanout(args, pub, subs, f"bench-{name}-{rnd}")
                results[name].append(r)
                print(f"round {rnd + 1} {name:8s} {r['rate']:>12,.0f} deliveries/s  "
                      f"{r['extra'].get('publications_per_s', 0):>9,.0f} publications/s  "
                      f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}", flush=True)
        base = statistics.median(r["rate"] for r in results["memory"])
        base_p99 = statistics.median(r["p99_ms"] for r in results["memory"])
        print(f"\nmedians ({args.subscribers} subscribers, window {args.window}, {args.size} B, "
              f"{args.rounds} rounds x {args.duration:g} s):")
        summary = {}
        for name, rs in results.items():
            rate = statistics.median(r["rate"] for r in rs)
            p99 = statistics.median(r["p99_ms"] for r in rs)
            p50 = statistics.median(r["p50_ms"] for r in rs)
            ratios = [r["rate"] / m["rate"] for r, m in zip(rs, results["memory"])]
            summary[name] = {"deliveries_per_s": rate, "p50_ms": p50, "p99_ms": p99,
                             "ratio_to_memory": statistics.median(ratios)}
            print(f"  {name:8s} {rate:>12,.0f} deliveries/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms   "
                  f"rate/memory {statistics.median(ratios):.2f} (per round {', '.join(f'{x:.2f}' for x in ratios)})  "
                  f"p99/memory {p99 / base_p99:.2f}")
        print("\nredis EVALSHA (all rounds):", redis.evalsha_stats())
        print("RESULT " + json.dumps(summary, sort_keys=True))
    finally:
        for gw in servers:
            gw.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
