"""How many messages per second the Python SDK (gateway.client) receives, and per core.

    python benchmarks/bench_client.py [--rooms 1000] [--duration 8] [--warmup 2] [--rounds 3]
                                      [--size 64] [--window 512] [--modes callback,iterate,raw]
                                      [--encoding json] [--loop uvloop]

One client process holds `--rooms` subscriptions on one connection to a gateway (memory
broker, `--max-rooms-per-connection` raised); a publisher process pushes publications round
robin over the rooms through one raw websockets connection, pipelined (`--window` publishes
awaiting their acks), as fast as the gateway acks them. Every publication reaches exactly
one subscriber: the client. Modes of the client process:

  callback   the SDK, `sub.on("message", ...)` per room (no buffering)
  iterate    the SDK, one `async for msg in sub` task per room
  raw        the baseline: a bare websockets connection joining the same rooms and decoding
             each frame with orjson -- what the SDK's bookkeeping costs on top of websockets

Per mode and round it prints messages/s received, the client's CPU (user+system of its
process over the measured window, as a share of one core), messages/s per client core, and
the gateway's and the publisher's CPU shares (from /proc/<pid>/stat). The gateway, client and
publisher are separate processes on the same machine; with fewer cores than three they
compete, so read the per-core column.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK       # utime + stime


def run_loop(name: str, coro):
    if name == "uvloop":
        import uvloop
        return uvloop.run(coro)
    return asyncio.run(coro)


# -- the client process -----------------------------------------------------------------------

async def client_main(args) -> None:
    url = f"ws://127.0.0.1:{args.port}/ws"
    rooms = [f"r{i}" for i in range(args.rooms)]
    count = 0
    if args.mode == "raw":
        import orjson
        import websockets
        ws = await websockets.connect(url, compression=None, max_size=None, ping_interval=None)
        for i, room in enumerate(rooms):
            await ws.send(orjson.dumps({"op": "join", "room": room, "id": i}).decode())
        acks = 0
        while acks < len(rooms):
            if orjson.loads(await ws.recv()).get("op") == "ack":
                acks += 1

        async def reader():
            nonlocal count
            loads = orjson.loads
            while True:
                doc = loads(await ws.recv())
                if doc.get("op") == "message":
                    count += 1
        task = asyncio.ensure_future(reader())
    else:
        from gateway.client import Client
        client = Client(url, encoding=args.encoding, compression=None)
        client.start()
        subs = await asyncio.gather(*(client.join(room) for room in rooms))
        tasks = []
        if args.mode == "callback":
            def on_message(msg) -> None:
                nonlocal count
                count += 1
            for sub in subs:
                sub.on("message", on_message)
        else:
            async def consume(sub):
                nonlocal count
                async for _ in sub:
                    count += 1
            tasks = [asyncio.ensure_future(consume(sub)) for sub in subs]
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)      # "start"
    c0, t0, n0 = time.process_time(), time.monotonic(), count
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)      # "stop"
    c1, t1, n1 = time.process_time(), time.monotonic(), count
    print(json.dumps({"received": n1 - n0, "wall": t1 - t0, "cpu": c1 - c0}), flush=True)
    os._exit(0)


# -- the publisher process --------------------------------------------------------------------

async def publisher_main(args) -> None:
    import orjson
    import websockets
    ws = await websockets.connect(f"ws://127.0.0.1:{args.port}/ws", compression=None, ping_interval=None,
                                  max_queue=None)
    payload = "x" * max(0, args.size - 20)
    frames = [orjson.dumps({"op": "publish", "room": f"r{i}", "data": {"p": payload}, "id": i}).decode()
              for i in range(args.rooms)]
    outstanding = asyncio.Semaphore(args.window)

    async def acks():
        while True:
            await ws.recv()
            outstanding.release()
    reader = asyncio.ensure_future(acks())
    print(json.dumps({"ready": True}), flush=True)
    i = 0
    n = len(frames)
    while True:
        await outstanding.acquire()
        await ws.send(frames[i % n])
        i += 1
    reader.cancel()


# -- orchestration ----------------------------------------------------------------------------

def start_gateway(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--max-rooms-per-connection", str(100_000), "--rate-limit", "0",
                             "--no-compression", "--log-level", "error"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the gateway did not start")


def spawn(role: str, args, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--port", str(args.port), "--rooms",
           str(args.rooms), "--size", str(args.size), "--window", str(args.window), "--encoding", args.encoding,
           "--loop", args.loop, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    line = proc.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        proc.kill()
        raise RuntimeError(f"{role} did not start")
    return proc


def one(args, mode: str) -> dict:
    args.port = free_port()
    gateway = start_gateway(args.port)
    client = publisher = None
    try:
        client = spawn("client", args, ["--mode", mode])
        publisher = spawn("publisher", args, [])
        time.sleep(args.warmup)
        g0, p0 = cpu_seconds(gateway.pid), cpu_seconds(publisher.pid)
        client.stdin.write("start\n")
        client.stdin.flush()
        t0 = time.monotonic()
        time.sleep(args.duration)
        client.stdin.write("stop\n")
        client.stdin.flush()
        wall = time.monotonic() - t0
        g1, p1 = cpu_seconds(gateway.pid), cpu_seconds(publisher.pid)
        result = json.loads(client.stdout.readline())
        rate = result["received"] / result["wall"]
        client_share = result["cpu"] / result["wall"]
        return {"mode": mode, "rate": rate, "client_cpu": client_share, "per_core": rate / client_share,
                "server_cpu": (g1 - g0) / wall, "publisher_cpu": (p1 - p0) / wall}
    finally:
        for proc in (publisher, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="main", choices=["main", "client", "publisher"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", default="callback", choices=["callback", "iterate", "raw"])
    parser.add_argument("--modes", default="callback,iterate,raw")
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="approximate bytes of each publication's data")
    parser.add_argument("--window", type=int, default=512, help="publishes in flight (awaiting their acks)")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoding", default="json", choices=["json", "msgpack"])
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    if args.role == "client":
        return run_loop(args.loop, client_main(args))
    if args.role == "publisher":
        return run_loop(args.loop, publisher_main(args))
    modes = args.modes.split(",")
    print(f"# {args.rooms} subscriptions on one client connection, {args.size} B data, window {args.window}, "
          f"{args.encoding}, {args.loop}, {os.cpu_count()} cores")
    print(f"{'mode':<9} {'msg/s':>9} {'client cpu':>10} {'msg/s/core':>10} {'gateway cpu':>11} {'publisher cpu':>13}")
    results: dict[str, list] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:          # interleaved: machine noise hits every mode alike
            r = one(args, mode)
            results[mode].append(r)
            print(f"{mode:<9} {r['rate']:>9,.0f} {r['client_cpu']:>10.0%} {r['per_core']:>10,.0f} "
                  f"{r['server_cpu']:>11.0%} {r['publisher_cpu']:>13.0%}", flush=True)
    print("# medians")
    for mode in modes:
        rs = results[mode]
        med = {k: statistics.median(r[k] for r in rs) for k in ("rate", "client_cpu", "per_core", "server_cpu",
                                                                "publisher_cpu")}
        print(f"{mode:<9} {med['rate']:>9,.0f} {med['client_cpu']:>10.0%} {med['per_core']:>10,.0f} "
              f"{med['server_cpu']:>11.0%} {med['publisher_cpu']:>13.0%}")


if __name__ == "__main__":
    main()
