"""Slow consumers: stalled clients cannot take the gateway's memory, and each policy does what it says.

Stalled clients are real sockets with a tiny SO_RCVBUF that join a room and then never
read; fast clients (websockets) read everything. The big test runs the gateway as a
subprocess to measure its RSS from /proc while ~100 MB is published into rooms that hold
200 stalled clients; the per-policy tests run in-loop to compare what each stalled client
finally reads with the gateway's counters.
"""
import asyncio
import os
import re
import socket
import urllib.request

import orjson
import pytest
import websockets

from gateway.errors import GatewayCloseCode
from gateway_ext import FrameParser
from tests.helpers import GatewayProcess, join_ack, serve, upgrade_request

pytestmark = pytest.mark.timeout(120)


def masked_text(payload: bytes) -> bytes:
    """A client text frame with a zero mask key (XOR with zeros: the payload as is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    else:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


class Stalled:
    """A raw WebSocket client that joins `room` and then does not read until told to drain."""

    def __init__(self, sock, leftover: bytes) -> None:
        self.sock = sock
        self.leftover = leftover

    @classmethod
    async def open(cls, port: int, room: str, rcvbuf: int = 4096) -> "Stalled":
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect(), so the window is small from the start (and autotuning is off).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, upgrade_request("/ws"))
        buf = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in buf:
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, "closed during the handshake"
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 101"), buf[:100]
            buf = buf[buf.index(b"\r\n\r\n") + 4:]
            await loop.sock_sendall(sock, masked_text(orjson.dumps({"op": "join", "room": room, "id": "j"})))
            parser = FrameParser(1 << 20, require_mask=False)
            frames = parser.feed(buf)
            while not frames:
                frames = parser.feed(await loop.sock_recv(sock, 4096))
        assert join_ack(orjson.loads(frames[0][3])) == {"op": "ack", "id": "j"}
        return cls(sock, b"")

    async def drain(self, until_dropped: bool, timeout: float = 20.0):
        """Read everything: (message seqs, dropped count, close code or None)."""
        loop = asyncio.get_running_loop()
        parser = FrameParser(1 << 22, require_mask=False)
        seqs, dropped, close_code = [], 0, None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        chunk = await loop.sock_recv(self.sock, 1 << 16)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    for opcode, _fin, _rsv, payload in parser.feed(chunk):
                        if opcode == 0x8:
                            close_code = int.from_bytes(payload[:2], "big")
                            continue
                        doc = orjson.loads(payload)
                        if doc["op"] == "message":
                            seqs.append(doc["seq"])
                        elif doc["op"] == "dropped":
                            dropped += doc["count"]
                            if until_dropped:
                                return seqs, dropped, close_code
                    if close_code is not None:
                        break
        except TimeoutError:
            if until_dropped and dropped == 0:
                raise
        return seqs, dropped, close_code

    def close(self) -> None:
        self.sock.close()


class Progress:
    """How far each fast reader got; the publisher stays at most `window` messages ahead of
    them (they share one process and one core with it: unpaced, they would become slow
    consumers themselves -- not what these tests are about)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.seen: dict = {}
        self.changed = asyncio.Event()

    def update(self, room: str, seq: int) -> None:
        self.seen[room] = seq
        self.changed.set()

    async def wait_room(self, room: str, sent: int) -> None:
        async with asyncio.timeout(60):
            while sent - self.seen.get(room, 0) >= self.window:
                self.changed.clear()
                await self.changed.wait()


async def fast_reader(url: str, room: str, expect: int, joined: asyncio.Event, progress: Progress):
    """Joins `room`, reads until seq `expect`; returns the seqs it saw."""
    seqs = []
    # compression=None: permessage-deflate is not what is tested here.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.send(orjson.dumps({"op": "join", "room": room, "id": 1}).decode())
        assert join_ack(orjson.loads(await ws.recv())) == {"op": "ack", "id": 1}
        joined.set()
        async with asyncio.timeout(90):
            while not seqs or seqs[-1] < expect:
                doc = orjson.loads(await ws.recv())
                assert doc["op"] == "message", doc
                seqs.append(doc["seq"])
                progress.update(room, doc["seq"])
    return seqs


def runs(seqs):
    """Contiguous runs of a strictly increasing list: [(first, last), ...]."""
    out = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest", "latest", "disconnect"])
def test_each_policy_does_what_it_says_and_counters_agree(run, policy):
    n, stalled_count = 200, 3
    limits = dict(max_queue_bytes=32768, write_buffer_high_bytes=16384, send_buffer_bytes=16384)

    async def main():
        async with serve(ping_interval=0, rate_limit=0, slow_consumer_policy=policy, close_timeout=30, **limits) as gw:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            stalled = [await Stalled.open(gw.port, "room") for _ in range(stalled_count)]
            joined = asyncio.Event()
            progress = Progress(window=4)
            reader = asyncio.ensure_future(fast_reader(url, "room", n, joined, progress))
            await joined.wait()
            async with websockets.connect(url, compression=None) as pub:
                data = "x" * 4096
                for i in range(n):
                    await progress.wait_room("room", i)
                    await pub.send(orjson.dumps({"op": "publish", "room": "room", "data": data}).decode())
                fast = await reader
            assert fast == list(range(1, n + 1))            # the fast member never lost anything
            ep = gw.endpoints["/ws"]
            stats = ep.backpressure
            sessions = [s for s in gw.hub.member_rooms if s.queue is not None]
            for s in sessions:                               # bounded while stalled
                assert s.queue.bytes <= limits["max_queue_bytes"]
            seen_dropped = 0
            for client in stalled:
                seqs, dropped, code = await client.drain(until_dropped=policy != "disconnect")
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                parts = runs(seqs)
                assert parts and parts[0][0] == 1
                if policy == "disconnect":
                    assert code in (GatewayCloseCode.SLOW_CONSUMER, None)   # None: reset before we read it
                    assert len(parts) == 1 and parts[0][1] < n and dropped == 0
                    continue
                assert len(seqs) + dropped == n             # every message: delivered or counted
                seen_dropped += dropped
                if policy == "drop_newest":                  # kept the oldest: one run from 1
                    assert len(parts) == 1 and parts[0][1] < n
                elif policy == "drop_oldest":                # kept the newest: a gap, then up to n
                    assert len(parts) == 2 and parts[1][1] == n
                    queued = parts[1][1] - parts[1][0] + 1
                    assert queued * 4096 <= limits["max_queue_bytes"]
                else:                                        # latest: only the very last one after the gap
                    assert len(parts) == 2 and parts[1] == (n, n)
            if policy == "disconnect":
                assert stats.slow_disconnects == stalled_count and stats.dropped == 0
                assert gw.hub.members == 0
            else:
                counter = {"drop_newest": stats.dropped_newest, "drop_oldest": stats.dropped_oldest,
                           "latest": stats.dropped_latest}[policy]
                assert counter == seen_dropped == stats.dropped > 0
                assert stats.slow_disconnects == 0
                assert gw.hub.members == stalled_count        # all still members, caught up
                assert all(s.queue is None for s in gw.hub.member_rooms)
            for client in stalled:
                client.close()
    run(main())


def test_a_drop_oldest_consumer_recovers_its_dropped_range(run):
    """Issue 14: after `dropped`, the client re-joins with since = its last contiguous seq
    and gets exactly what it lost, in order, then live; nothing is skipped or repeated."""
    n = 200
    limits = dict(max_queue_bytes=32768, write_buffer_high_bytes=16384, send_buffer_bytes=16384)

    async def main():
        async with serve(ping_interval=0, rate_limit=0, slow_consumer_policy="drop_oldest", close_timeout=30,
                         history_size=1000, **limits) as gw:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            stalled = await Stalled.open(gw.port, "room")
            joined = asyncio.Event()
            progress = Progress(window=4)
            reader = asyncio.ensure_future(fast_reader(url, "room", n, joined, progress))
            await joined.wait()
            async with websockets.connect(url, compression=None) as pub:
                for i in range(n):
                    await progress.wait_room("room", i)
                    await pub.send(orjson.dumps({"op": "publish", "room": "room", "data": "x" * 4096}).decode())
                assert await reader == list(range(1, n + 1))
                seqs, dropped, _ = await stalled.drain(until_dropped=True)
                parts = runs(seqs)
                assert len(parts) == 2 and dropped == parts[1][0] - parts[0][1] - 1 > 0
                # The client's rules (notes/protocol-v2.md): deliver only seq == position + 1;
                # after `dropped` (or a gap) ask again with since = position. The replay goes
                # through the same slow-consumer queue (its cap holds), so a client this slow
                # may need a few rounds; it converges with every seq delivered once, in order.
                position = parts[0][1]
                delivered = list(range(1, position + 1))
                epoch = gw.hub.position("room")[1]
                loop = asyncio.get_running_loop()
                parser = FrameParser(1 << 22, require_mask=False)
                rounds = 0
                async with asyncio.timeout(60):
                    while position < n:
                        rounds += 1
                        await loop.sock_sendall(stalled.sock, masked_text(orjson.dumps(
                            {"op": "join", "room": "room", "id": rounds, "since": {"seq": position, "epoch": epoch}})))
                        again = False
                        while not again and position < n:
                            for _op, _fin, _rsv, payload in parser.feed(await loop.sock_recv(stalled.sock, 1 << 16)):
                                doc = orjson.loads(payload)
                                if doc["op"] == "ack":
                                    assert doc == {"op": "ack", "id": rounds, "seq": n, "epoch": epoch, "recovered": True}
                                elif doc["op"] == "dropped":
                                    again = True
                                elif doc["seq"] == position + 1:
                                    position += 1
                                    delivered.append(doc["seq"])
                assert delivered == list(range(1, n + 1))
                # ... and live continues after it.
                await pub.send(orjson.dumps({"op": "publish", "room": "room", "data": "live"}).decode())
                async with asyncio.timeout(20):
                    while True:
                        docs = [orjson.loads(f[3]) for f in parser.feed(await loop.sock_recv(stalled.sock, 1 << 16))]
                        if any(d.get("seq") == n + 1 for d in docs):
                            break
            assert gw.hub.history.recoveries_succeeded == rounds and gw.hub.history.recoveries_failed == 0
            stalled.close()
    run(main())


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_200_stalled_clients_and_100_mb_keep_rss_bounded(tmp_path):
    rooms = {"slow.oldest": "drop_oldest", "slow.newest": "drop_newest", "slow.latest": "latest",
             "slow.kick": "disconnect"}
    per_room_stalled, data_bytes, total_bytes = 50, 32 * 1024, 100 * 1024 * 1024
    publications = total_bytes // data_bytes                  # 3,200: 800 per room
    max_queue, high, sndbuf = 96 * 1024, 64 * 1024, 16 * 1024
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f"max_queue_bytes = {max_queue}\nwrite_buffer_high_bytes = {high}\nsend_buffer_bytes = {sndbuf}\n"
        "ping_interval = 0.0\nrate_limit = 0.0\nclose_timeout = 2.0\n"
        + "".join(f'\n[[rooms.policy]]\npattern = "{room}"\npolicy = "{policy}"\n' for room, policy in rooms.items()))

    async def main(gw):
        url = gw.url("/ws")
        stalled = {room: [await Stalled.open(gw.port, room) for _ in range(per_room_stalled)] for room in rooms}
        per_room = publications // len(rooms)
        readers = {}
        progress = Progress(window=2)
        for room in rooms:
            joined = asyncio.Event()
            readers[room] = asyncio.ensure_future(fast_reader(url, room, per_room, joined, progress))
            await joined.wait()
        baseline = _rss_kib(gw.proc.pid, "VmRSS")
        data = "y" * data_bytes
        names = list(rooms)
        async with websockets.connect(url, compression=None) as pub:
            for i in range(publications):
                room = names[i % len(names)]
                await progress.wait_room(room, i // len(names))
                await pub.send(orjson.dumps({"op": "publish", "room": room, "data": data}).decode())
            fast = {room: await task for room, task in readers.items()}
        peak = _rss_kib(gw.proc.pid, "VmHWM")
        for room, seqs in fast.items():                          # fast members kept receiving
            assert seqs == list(range(1, per_room + 1)), room
        # Bound: per stalled client its queue + transport buffer (+ one frame in flight),
        # plus a constant for allocator slack; the kernel's socket buffers are not RSS.
        stalled_total = per_room_stalled * len(rooms)
        bound_kib = stalled_total * (max_queue + high + data_bytes) // 1024 + 32 * 1024
        grown = peak - baseline
        assert grown < bound_kib, f"RSS grew {grown} KiB (baseline {baseline} KiB), bound {bound_kib} KiB"
        assert bound_kib < total_bytes // 1024                    # the bound is below what was published
        # What the stalled clients finally read agrees with the counters.
        seen = {}
        for room, clients in stalled.items():
            seen[room] = 0
            for client in clients:
                seqs, dropped, code = await client.drain(until_dropped=rooms[room] != "disconnect", timeout=30)
                if rooms[room] == "disconnect":
                    assert code in (GatewayCloseCode.SLOW_CONSUMER, None) and len(seqs) < per_room
                else:
                    assert len(seqs) + dropped == per_room
                    seen[room] += dropped
                client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert _metric(metrics, "ws_gateway_backpressure_slow_disconnects_total") == per_room_stalled
        assert _metric(metrics, "ws_gateway_backpressure_dropped_oldest_total") == seen["slow.oldest"] > 0
        assert _metric(metrics, "ws_gateway_backpressure_dropped_newest_total") == seen["slow.newest"] > 0
        assert _metric(metrics, "ws_gateway_backpressure_dropped_latest_total") == seen["slow.latest"] > 0
        return grown, bound_kib

    with GatewayProcess("--config", str(conf), "--log-level", "warning") as gw:
        grown, bound = asyncio.run(main(gw))
        assert gw.proc.poll() is None                             # still alive
    print(f"RSS grew {grown} KiB for 200 stalled clients and 100 MiB published (bound {bound} KiB)")
