"""Soak of the client SDKs (issue 15): JS and Python SDK clients through gateway restarts and
Redis restarts while a publisher publishes at a steady rate. Not collected by pytest.

    python -m benchmarks.sdk_soak --node-clients 100 --python-clients 100 --restarts 10 --redis-restarts 2 --rate 200

Two gateways share one throwaway Redis (no persistence); the clients are spread over both.
The restarts alternate between the gateways and between a drain (SIGTERM: 1001) and a crash
(SIGKILL: 1006); each gateway comes back on its port. Redis is restarted empty
`--redis-restarts` times in between, so room numbering starts again (a new epoch).

Each client checks every delivered seq against its own bookkeeping (benchmarks/sdk_soak_node.mjs,
benchmarks/sdk_soak_python.py: one process per SDK): seq == last + 1, where last is the previous
seq or the one a `reset` announced. Passing means zero violations (no gap that was not announced
by a reset) and no client stuck: after a quiet period every client is connected and has
delivered its room's last published seq.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import time

import orjson
import websockets

from tests.helpers import ROOT, GatewayProcess
from tests.redis_server import RedisServer

NODE_SCRIPT = os.path.join(ROOT, "benchmarks", "sdk_soak_node.mjs")
PYTHON_SCRIPT = os.path.join(ROOT, "benchmarks", "sdk_soak_python.py")


class Publisher:
    """Publishes round-robin over the rooms at `rate`/s through whichever gateway is up."""

    def __init__(self, ports, rooms, rate):
        self.ports, self.rooms, self.rate = ports, rooms, rate
        self.last = {}          # room -> last acked seq (> 0)
        self.acked = 0
        self.failed = 0
        self.stopping = False

    async def run(self):
        i = 0
        while not self.stopping:
            port = self.ports[i % len(self.ports)]
            try:
                async with websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=2) as ws:
                    pending = {}
                    reader = asyncio.ensure_future(self._acks(ws, pending))
                    try:
                        start = time.monotonic()
                        n = 0
                        while not self.stopping and not reader.done():
                            room = self.rooms[i % len(self.rooms)]
                            i += 1
                            n += 1
                            pending[i] = room
                            await ws.send(orjson.dumps({"op": "publish", "room": room, "data": {"n": i}, "id": i}).decode())
                            delay = start + n / self.rate - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                    finally:
                        reader.cancel()
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError):
                self.failed += 1
                i += 1          # try the other gateway next
                await asyncio.sleep(0.05)

    async def _acks(self, ws, pending):
        async for raw in ws:
            doc = orjson.loads(raw)
            room = pending.pop(doc.get("id"), None)
            if room is not None and doc.get("op") == "ack":
                self.acked += 1
                if doc.get("seq"):
                    self.last[room] = doc["seq"]


async def main(args) -> int:
    node = shutil.which("node")
    if node is None and args.node_clients:
        print("node is not installed (--node-clients 0 runs the Python half alone)", file=sys.stderr)
        return 2
    rooms = [f"soak-{i}" for i in range(args.rooms)]
    with RedisServer() as redis_srv:
        common = ("--broker", redis_srv.url, "--log-level", "warning", "--drain-window", "0.5",
                  "--drain-timeout", "5", "--rate-limit", "0")
        gateways = [GatewayProcess(*common).start() for _ in range(2)]
        ports = [gw.port for gw in gateways]
        urls = [f"ws://127.0.0.1:{p}/ws" for p in ports]
        halves = []      # (sdk, process): one per SDK, same stdin/stdout protocol
        if args.node_clients:
            cfg = {"urls": urls, "clients": args.node_clients, "rooms": rooms}
            halves.append(("js", await asyncio.create_subprocess_exec(
                node, "--experimental-websocket", "--no-warnings", NODE_SCRIPT, json.dumps(cfg), cwd=ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)))
        if args.python_clients:
            cfg = {"urls": urls, "clients": args.python_clients, "rooms": rooms}
            halves.append(("python", await asyncio.create_subprocess_exec(
                sys.executable, PYTHON_SCRIPT, json.dumps(cfg), cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)))
        for _, proc in halves:
            await proc.stdout.readline()
        publisher = Publisher(ports, rooms, args.rate)
        pub_task = asyncio.ensure_future(publisher.run())
        started = time.monotonic()
        redis_after = {round((k + 1) * args.restarts / (args.redis_restarts + 1)) for k in range(args.redis_restarts)}
        try:
            for k in range(args.restarts):
                await asyncio.sleep(args.interval)
                gw = gateways[k % 2]
                how = "SIGKILL" if k % 4 >= 2 else "SIGTERM"
                gw.proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
                gw.proc.wait(timeout=15)
                await asyncio.sleep(random.uniform(0.2, 1.0))
                gateways[k % 2] = GatewayProcess(*common, port=gw.port).start()
                print(f"restart {k + 1}/{args.restarts}: gateway :{gw.port} by {how}; published {publisher.acked}",
                      flush=True)
                if k + 1 in redis_after:
                    redis_srv.restart()
                    print("redis restarted empty", flush=True)
            await asyncio.sleep(args.interval)
        finally:
            publisher.stopping = True
            await asyncio.wait_for(pub_task, 10)
        await asyncio.sleep(args.quiet)
        report = []
        for sdk, proc in halves:
            proc.stdin.write(b"report\n")
            report += [{**c, "sdk": sdk} for c in json.loads(await proc.stdout.readline())]
            proc.stdin.write(b"exit\n")
            await proc.wait()
        for gw in gateways:
            gw.stop()

    violations = [(i, c["violations"]) for i, c in enumerate(report) if c["violations"]]
    stuck = [i for i, c in enumerate(report)
             if c["state"] != "connected" or c["last"] != publisher.last.get(c["room"])]
    summary = {
        "node_clients": sum(c["sdk"] == "js" for c in report),
        "python_clients": sum(c["sdk"] == "python" for c in report), "restarts": args.restarts, "redis_restarts": args.redis_restarts,
        "seconds": round(time.monotonic() - started, 1), "published": publisher.acked,
        "publisher_reconnects": publisher.failed,
        "delivered": sum(c["delivered"] for c in report), "resets": sum(c["resets"] for c in report),
        "reconnects": sum(c["connects"] - 1 for c in report),
        "violations": len(violations), "stuck": len(stuck),
    }
    print(json.dumps(summary))
    for i, v in violations[:5]:
        print(f"client {i} ({report[i]['sdk']}): seq jumps {v}", file=sys.stderr)
    for i in stuck[:5]:
        c = report[i]
        print(f"client {i} ({c['sdk']}) stuck: state {c['state']}, last {c['last']}, room {c['room']} at "
              f"{publisher.last.get(c['room'])}", file=sys.stderr)
    return 0 if not violations and not stuck else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--node-clients", type=int, default=100)
    p.add_argument("--python-clients", type=int, default=100)
    p.add_argument("--rooms", type=int, default=10)
    p.add_argument("--rate", type=float, default=200.0, help="publications per second")
    p.add_argument("--restarts", type=int, default=10, help="gateway restarts")
    p.add_argument("--redis-restarts", type=int, default=2)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between restarts")
    p.add_argument("--quiet", type=float, default=8.0, help="seconds after the last publication")
    sys.exit(asyncio.run(main(p.parse_args())))
