"""Issue 14, end to end: no message lost across reconnects, drains and restarts.

Gateways run as subprocesses (`python -m gateway serve`), with the memory broker or a real
redis-server started here on a free port; clients are `websockets`. A publisher sends about
1,000 messages/s into one room; a reader is cut off with a TCP reset (SO_LINGER 0), stays
away one second and comes back with `since`: to the same process, to another process
sharing Redis, or to the other process after its own drained on SIGTERM. Whatever the way,
the reader must see every seq exactly once, in order, the replay joined seamlessly to live.
"""
from __future__ import annotations

import asyncio
import socket
import struct

import orjson
import pytest
import websockets

from tests.helpers import GatewayProcess
from tests.redis_server import RedisServer
from tests.requires import require

pytestmark = pytest.mark.timeout(180)
ROOM = "feed"
ARGS = ("--log-level", "warning", "--history-size", "5000", "--rate-limit", "0", "--drain-window", "0",
        "--ping-interval", "0")


class Publisher:
    """About 1,000 publications/s (10 every 10 ms) until stopped, then an end marker."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        async with websockets.connect(self.url, compression=None) as ws:
            while not self.stop.is_set():
                for _ in range(10):
                    await ws.send(orjson.dumps({"op": "publish", "room": ROOM, "data": {"n": self.sent}}).decode())
                    self.sent += 1
                await asyncio.sleep(0.01)
            await ws.send(orjson.dumps({"op": "publish", "room": ROOM, "data": "end", "id": "end"}).decode())
            while True:   # the end marker's ack: everything before it was accepted
                doc = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
                if doc.get("id") == "end":
                    assert doc["op"] == "ack", doc
                    return

    def start(self) -> "Publisher":
        self.task = asyncio.ensure_future(self._run())
        return self

    async def finish(self) -> None:
        self.stop.set()
        await self.task


class Reader:
    """A client following the protocol: keeps (epoch, position) and checks every seq."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.position = 0
        self.seqs: list[int] = []
        self.acks: list[dict] = []
        self.ws = None

    async def connect(self, url: str) -> None:
        self.ws = await websockets.connect(url, compression=None, max_size=None)
        join = {"op": "join", "room": ROOM, "id": len(self.acks)}
        if self.epoch is not None:
            join["since"] = {"seq": self.position, "epoch": self.epoch}
        await self.ws.send(orjson.dumps(join).decode())
        ack = orjson.loads(await asyncio.wait_for(self.ws.recv(), 20))
        assert ack["op"] == "ack", ack
        self.acks.append(ack)
        if self.epoch is None:
            self.epoch, self.position = ack["epoch"], ack["seq"]
        else:
            assert (ack["epoch"], ack.get("recovered")) == (self.epoch, True), ack

    async def read(self, until_end: bool = False, seconds: float = 0.0) -> None:
        """Read messages for `seconds`, or until the end marker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            timeout = 30 if until_end else deadline - loop.time()
            if timeout <= 0:
                return
            try:
                raw = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError:
                if until_end:
                    raise
                return
            doc = orjson.loads(raw)
            assert doc["op"] == "message", doc
            self.seqs.append(doc["seq"])
            self.position = doc["seq"]
            if until_end and doc["data"] == "end":
                return

    def reset(self) -> None:
        """Cut the connection with a TCP RST: no close frame, no FIN."""
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()

    def check(self, first: int) -> None:
        assert self.seqs, "nothing received"
        assert self.seqs == list(range(first, self.seqs[-1] + 1)), _first_problem(self.seqs, first)


def _first_problem(seqs: list[int], first: int) -> str:
    expect = first
    for i, seq in enumerate(seqs):
        if seq != expect:
            return f"at index {i}: got {seq}, expected {expect} (around {seqs[max(0, i - 3):i + 3]})"
        expect += 1
    return "ok"


async def _cut_and_recover(reader_url: str, back_url: str, publish_url: str, gateways=(), drain=None):
    publisher = Publisher(publish_url).start()
    reader = Reader()
    await reader.connect(reader_url)
    first = reader.position + 1
    await reader.read(seconds=1.0)
    if drain is None:
        reader.reset()
    else:
        drain.signal()                      # SIGTERM: the reader's process drains (close 1001)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await reader.read(until_end=True)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert drain.proc.wait(20) == 0
    await asyncio.sleep(1.0)                # away for a second while ~1,000 more are published
    await reader.connect(back_url)
    await reader.read(seconds=0.5)
    await publisher.finish()
    await reader.read(until_end=True)
    reader.check(first)
    assert len(reader.seqs) >= 1000
    return reader


def test_tcp_reset_reconnect_with_since_memory_broker(run):
    with GatewayProcess(*ARGS) as gw:
        run(_cut_and_recover(gw.url(), gw.url(), gw.url()))


@pytest.fixture
def redis_url():
    with RedisServer() as server:
        yield server.url


def test_tcp_reset_reconnect_with_since_redis_same_process(run, redis_url):
    with GatewayProcess(*ARGS, "--broker", redis_url) as gw:
        run(_cut_and_recover(gw.url(), gw.url(), gw.url()))


def test_tcp_reset_reconnect_to_another_process_sharing_redis(run, redis_url):
    with GatewayProcess(*ARGS, "--broker", redis_url) as a, GatewayProcess(*ARGS, "--broker", redis_url) as b:
        run(_cut_and_recover(a.url(), b.url(), a.url()))


def test_recovery_after_the_process_drains_on_sigterm(run, redis_url):
    with GatewayProcess(*ARGS, "--broker", redis_url) as a, GatewayProcess(*ARGS, "--broker", redis_url) as b:
        run(_cut_and_recover(b.url(), a.url(), a.url(), drain=b))


def test_redis_restarted_without_persistence_old_epoch_is_not_recovered(run):
    async def main(server, gw):
        reader = Reader()
        await reader.connect(gw.url())
        async with websockets.connect(gw.url(), compression=None) as pub:
            for i in range(5):
                await pub.send(orjson.dumps({"op": "publish", "room": ROOM, "data": i, "id": i}).decode())
                assert orjson.loads(await pub.recv())["seq"] == i + 1
        await reader.read(seconds=0.3)
        assert reader.position == 5
        old_epoch = reader.epoch
        server.restart()                    # no persistence: every room's numbering is gone
        async with asyncio.timeout(30):
            while True:                     # until the gateway reconnected and publishes work again
                try:
                    async with websockets.connect(gw.url(), compression=None) as pub:
                        await pub.send(orjson.dumps({"op": "publish", "room": ROOM, "data": "new", "id": 1}).decode())
                        reply = orjson.loads(await pub.recv())
                        if reply["op"] == "ack":
                            break
                except OSError:
                    pass
                await asyncio.sleep(0.1)
        # The member still connected is told: reset to the new epoch, then the new message
        # (before it, the copies the gateway delivered locally with seq 0 while Redis was down).
        reset = {"seq": 0}
        while reset.get("seq") == 0 and reset.get("op") == "message" or reset == {"seq": 0}:
            reset = orjson.loads(await asyncio.wait_for(reader.ws.recv(), 20))
        assert reset["op"] == "reset" and reset["epoch"] != old_epoch and reset["seq"] == 0, reset
        assert orjson.loads(await asyncio.wait_for(reader.ws.recv(), 20))["seq"] == 1
        # A client coming back with the old epoch: recovered false, the new position.
        async with websockets.connect(gw.url(), compression=None) as c:
            await c.send(orjson.dumps({"op": "join", "room": ROOM, "id": 1,
                                       "since": {"seq": 5, "epoch": old_epoch}}).decode())
            ack = orjson.loads(await asyncio.wait_for(c.recv(), 20))
            assert ack == {"op": "ack", "id": 1, "seq": 1, "epoch": reset["epoch"], "recovered": False}

    with RedisServer() as server, GatewayProcess(*ARGS, "--broker", server.url) as gw:
        run(main(server, gw))


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_500_clients_reconnecting_at_once_cost_a_constant_number_of_reads(broker):
    """The CI size of benchmarks/bench_recovery.py (5,000 there): 500 clients of one room cut
    off together come back together with `since` while ~200 msg/s keep coming. The gateway's
    own metric counts the history reads of the wave: a small constant, not one per client."""
    from benchmarks.bench_recovery import run as wave
    if broker == "redis":
        require("redis-server")     # the benchmark starts its own (skips, saying why, where it is missing)
    result = wave(clients=500, broker=broker, rate=200.0, away=1.0, history_size=1000)
    assert result["recovered"] == 500 and result["every_seq_once_in_order"], result
    assert result["history_reads"] <= 3, result
