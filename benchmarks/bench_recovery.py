"""N clients of one room reconnecting at once with `since`: history reads and time to live.

    python -m benchmarks.bench_recovery [--clients 5000] [--broker memory|redis] [--rate 200]
                                        [--away 1.0] [--history-size 1000]

One gateway subprocess (the memory broker, or Redis: a redis-server of its own on a free
port), a publisher sending `--rate` messages/s into the room throughout, and N clients
(raw sockets, the load tool's client: no WebSocket library overhead) that join the room,
follow it, are all cut off with a TCP reset, stay away `--away` seconds and reconnect at
once, each with `{"since": {"seq": its position, "epoch": ...}}`.

Reported: the history reads the gateway made for the reconnect wave
(`ws_gateway_history_reads_total`, from its /metrics: the issue's "small constant"), the
time from the first reconnect to the moment every client has everything published up to
the moment the last one finished its handshake ("all live again"), and whether every client
saw each seq exactly once in order across the cut (it must). Exit status 1 if not.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import orjson

from benchmarks.bench_cross_process import Redis, free_port, wait_http
from benchmarks.loadtool import wsclient
from benchmarks.loadtool.clientprotocol import ClientProtocol
from gateway_ext import FrameParser, Opcode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOM = "wave"


class Member(ClientProtocol):
    """One client: its position, whether every seq came once in order, its acks."""

    def __init__(self, state: "Member | None" = None) -> None:
        super().__init__()
        self.parser = FrameParser(1 << 24, require_mask=False)
        self.epoch = state.epoch if state else None
        self.position = state.position if state else 0
        self.ok = state.ok if state else True
        self.acked = asyncio.get_running_loop().create_future()
        self.recovered = None
        self.progress = None          # set by the runner: called with the new position

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for opcode, _fin, _rsv, payload in self.parser.feed(data):
            if opcode == Opcode.CLOSE:
                self.close_received(payload)
                continue
            if opcode == Opcode.PING:
                self.pong(payload)
                continue
            doc = orjson.loads(payload)
            op = doc["op"]
            if op == "message":
                if doc["seq"] != self.position + 1:
                    self.ok = False
                self.position = doc["seq"]
                if self.progress is not None:
                    self.progress(self)
            elif op == "ack":
                if self.epoch is None:
                    self.epoch, self.position = doc["epoch"], doc["seq"]
                elif doc.get("recovered") is not True or doc["epoch"] != self.epoch:
                    self.ok = False
                self.recovered = doc.get("recovered")
                if not self.acked.done():
                    self.acked.set_result(None)
            else:
                self.ok = False

    def join(self, since: bool) -> None:
        doc = {"op": "join", "room": ROOM, "id": 1}
        if since:
            doc["since"] = {"seq": self.position, "epoch": self.epoch}
        self.transport.write(wsclient.client_frame(Opcode.TEXT, orjson.dumps(doc), self.mask))

    def reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closing = True
        self.transport.abort()


class Publisher(ClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.parser = FrameParser(1 << 24, require_mask=False)
        self.top = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for opcode, _fin, _rsv, payload in self.parser.feed(data):
            if opcode == Opcode.TEXT:
                doc = orjson.loads(payload)
                if doc["op"] == "ack" and "seq" in doc:
                    self.top = max(self.top, doc["seq"])

    async def run(self, rate: float, stop: asyncio.Event) -> None:
        n = 0
        step = 0.01
        per_step = max(1, round(rate * step))
        while not stop.is_set():
            for _ in range(per_step):
                doc = {"op": "publish", "room": ROOM, "data": {"n": n, "pad": "x" * 40}, "id": n}
                self.transport.write(wsclient.client_frame(Opcode.TEXT, orjson.dumps(doc), self.mask))
                n += 1
            await asyncio.sleep(step)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def connect_all(target, members: list, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(member):
        async with gate:
            async with asyncio.timeout(60):
                await wsclient.open_websocket(target, member)
    await asyncio.gather(*(one(m) for m in members))


async def wave(port: int, clients: int, rate: float, away: float, concurrency: int) -> dict:
    target = wsclient.parse_url(f"ws://127.0.0.1:{port}/ws")
    publisher = Publisher()
    await wsclient.open_websocket(target, publisher)
    members = [Member() for _ in range(clients)]
    await connect_all(target, members, concurrency)
    for m in members:
        m.join(since=False)
    await asyncio.wait_for(asyncio.gather(*(m.acked for m in members)), 60)
    stop = asyncio.Event()
    pub_task = asyncio.ensure_future(publisher.run(rate, stop))
    await asyncio.sleep(1.0)                              # live traffic reaches everyone
    for m in members:
        m.reset()                                         # all cut off at once (TCP RST)
    await asyncio.sleep(away)
    reads_before = metric(port, "ws_gateway_history_reads_total")
    back = [Member(m) for m in members]
    started = time.perf_counter()
    joined = asyncio.get_running_loop().create_future()
    target_seq = [None]
    behind = {id(m) for m in back}

    def progress(member):
        if target_seq[0] is not None and member.position >= target_seq[0]:
            behind.discard(id(member))
            if not behind and not joined.done():
                joined.set_result(None)

    for m in back:
        m.progress = progress

    async def reconnect(member, gate):
        async with gate:
            async with asyncio.timeout(120):
                await wsclient.open_websocket(target, member)
            member.join(since=True)

    gate = asyncio.Semaphore(concurrency)
    await asyncio.gather(*(reconnect(m, gate) for m in back))
    handshakes_done = time.perf_counter()
    target_seq[0] = publisher.top                          # everything published by now
    for m in back:
        progress(m)
    if behind:
        await asyncio.wait_for(joined, 120)
    all_live = time.perf_counter()
    reads = metric(port, "ws_gateway_history_reads_total") - reads_before
    stop.set()
    await pub_task
    result = {
        "clients": clients, "rate": rate, "away_s": away,
        "history_reads": int(reads),
        "recovered": sum(1 for m in back if m.recovered is True),
        "every_seq_once_in_order": all(m.ok for m in back),
        "handshakes_s": round(handshakes_done - started, 3),
        "all_live_s": round(all_live - started, 3),
        "replayed_up_to": target_seq[0],
    }
    for m in (*back, publisher):
        if m.transport is not None:
            m.transport.abort()
    return result


def run(clients: int = 5000, broker: str = "memory", rate: float = 200.0, away: float = 1.0,
        history_size: int = 1000, concurrency: int = 500) -> dict:
    redis = Redis() if broker == "redis" else None
    port = free_port()
    url = f"redis://127.0.0.1:{redis.port}/0" if redis else "memory://"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--broker", url,
                             "--history-size", str(history_size), "--rate-limit", "0", "--ping-interval", "0",
                             "--log-level", "warning", "--max-connections", str(clients + 100)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port)
        result = asyncio.run(wave(port, clients, rate, away, concurrency))
        result["broker"] = broker
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if redis is not None:
            redis.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--broker", choices=("memory", "redis"), default="memory")
    parser.add_argument("--rate", type=float, default=200.0, help="publications/s during the wave")
    parser.add_argument("--away", type=float, default=1.0, help="seconds the clients stay away")
    parser.add_argument("--history-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    args = parser.parse_args(argv)
    result = run(args.clients, args.broker, args.rate, args.away, args.history_size, args.concurrency)
    print(orjson.dumps(result).decode())
    return 0 if result["every_seq_once_in_order"] and result["recovered"] == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
