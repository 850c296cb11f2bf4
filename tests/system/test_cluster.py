"""Several gateway processes, one Redis: the rooms protocol across processes, end to end.

Real `python -m gateway serve --broker redis://...` processes (tests.helpers.GatewayProcess),
a redis-server (or a 3-node Redis Cluster) of our own on free ports, and websockets clients
on /ws. What must hold: a publication on one process reaches the members on every other
process exactly once and in order; a process with no members of a room gets none of its
traffic; Redis going away mid-stream loses only what the counters say, and nothing crashes.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import time
import urllib.error
import urllib.request

import orjson
import pytest
import redis
import websockets

from tests.helpers import GatewayProcess
from tests.redis_server import RedisCluster, RedisServer

pytestmark = pytest.mark.timeout(120)

_rooms = itertools.count()


def new_room(tag: str) -> str:
    return f"{tag}-{next(_rooms)}"


class Client:
    """A websockets client on one gateway's /ws, speaking JSON dicts."""

    def __init__(self, ws) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, gw: GatewayProcess) -> "Client":
        return cls(await websockets.connect(gw.url("/ws"), max_size=None))

    async def send(self, **doc) -> None:
        await self.ws.send(orjson.dumps(doc).decode())

    async def recv(self, timeout: float = 10.0) -> dict:
        return orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def join(self, room: str) -> dict:
        await self.send(op="join", room=room, id=f"join-{room}")
        return await self.recv()

    async def messages(self, n: int) -> list[dict]:
        """The next n messages (anything else arriving in between is a test failure)."""
        out = [await self.recv() for _ in range(n)]
        assert all(m["op"] == "message" for m in out), out
        return out

    async def close(self) -> None:
        await self.ws.close()


def http_get(gw: GatewayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(gw: GatewayProcess, name: str) -> float:
    _, text = http_get(gw, "/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    """Poll state owned by another process (a gateway, redis-server), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def numsub(server: RedisServer, channel: str) -> int:
    with server.client() as r:
        return dict(r.pubsub_numsub(channel))[channel.encode()]


def gateways(url: str, n: int, *extra: str) -> list[GatewayProcess]:
    # --rate-limit 0: these tests publish bursts well past the per-connection default.
    procs = [GatewayProcess("--broker", url, "--log-level", "info", "--rate-limit", "0", *extra) for _ in range(n)]
    try:
        for p in procs:
            p.start()
    except Exception:
        for p in procs:
            if p.proc is not None:
                p.stop()
        raise
    return procs


@pytest.fixture(scope="module")
def redis_for_cluster():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def three(redis_for_cluster):
    """Gateways A, B, C sharing one Redis (rooms are unique per test)."""
    procs = gateways(redis_for_cluster.url, 3)
    yield procs
    for p in procs:
        p.stop()


def test_publish_on_one_process_reaches_every_other_exactly_once_in_order(run, three):
    a, b, c = three
    room = new_room("fanout")

    async def main():
        pub, a2, b1, b2, c1 = [await Client.open(gw) for gw in (a, a, b, b, c)]
        try:
            for client in (pub, a2, b1, b2, c1):
                assert (await client.join(room))["op"] == "ack"
            n = 200
            for i in range(n):
                await pub.send(op="publish", room=room, data={"i": i}, id=i)
            # The publisher sees its acks and its own messages, interleaved; sort them out.
            acks, own = {}, []
            while len(acks) < n or len(own) < n:
                m = await pub.recv()
                if m["op"] == "ack":
                    acks[m["id"]] = m["seq"]
                else:
                    own.append(m)
            seqs = [acks[i] for i in range(n)]
            assert seqs == list(range(seqs[0], seqs[0] + n))
            expected = [{"op": "message", "room": room, "data": {"i": i}, "seq": seqs[i]} for i in range(n)]
            assert own == expected
            for member in (a2, b1, b2, c1):
                assert await member.messages(n) == expected
            # Exactly once: the next thing each member gets is the fence, not a duplicate.
            await pub.send(op="publish", room=room, data="fence")
            for member in (a2, b1, b2, c1):
                assert (await member.recv())["data"] == "fence"
        finally:
            for client in (pub, a2, b1, b2, c1):
                await client.close()
    run(main())


def test_a_process_without_members_gets_none_of_the_traffic(run, three, redis_for_cluster):
    a, b, c = three
    room = new_room("interest")
    channel = f"ws:{{{room}}}"

    async def main():
        ca, cb = await Client.open(a), await Client.open(b)
        bystander = await Client.open(c)      # connected to C, but not in the room
        try:
            assert numsub(redis_for_cluster, channel) == 0
            await ca.join(room)
            await cb.join(room)
            assert numsub(redis_for_cluster, channel) == 2            # A and B, not C
            received_c = metric(c, "ws_gateway_broker_messages_received_total")
            for i in range(20):
                await ca.send(op="publish", room=room, data=i)
            await cb.messages(20)
            assert numsub(redis_for_cluster, channel) == 2
            assert metric(c, "ws_gateway_broker_messages_received_total") == received_c
            # The last member on B leaves: B unsubscribes (asynchronously).
            await cb.send(op="leave", room=room, id="bye")
            assert (await cb.recv())["op"] == "ack"
            await until(lambda: numsub(redis_for_cluster, channel) == 1, "B to unsubscribe")
            await ca.send(op="publish", room=room, data="only A")
            while (await ca.recv()).get("data") != "only A":
                pass
            await bystander.send(op="join", room=new_room("other"), id=1)
            assert (await bystander.recv())["op"] == "ack"
            assert metric(c, "ws_gateway_broker_messages_received_total") == received_c
        finally:
            for client in (ca, cb, bystander):
                await client.close()
    run(main())


def test_redis_killed_and_restarted_mid_stream(run):
    """Down: local delivery continues (seq 0), publishers get errors, /readyz 503, nothing
    crashes. Back: both processes resubscribe and cross-process delivery resumes; the
    counters say exactly what did not cross."""
    with RedisServer() as server:
        a, b = gateways(server.url, 2)
        try:
            _kill_restart(run, server, a, b)
        finally:
            a.stop()
            b.stop()
        assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output()[-2000:] + b.output()[-2000:]
        for gw in (a, b):
            log = gw.output()
            assert log.count('"msg":"redis broker disconnected"') == 1, log[-3000:]
            assert "Traceback" not in log


def _kill_restart(run, server: RedisServer, a: GatewayProcess, b: GatewayProcess) -> None:
    room = new_room("fault")

    async def publish_all(pub: Client, start: int, n: int) -> dict:
        """Publish n messages with ids; return id -> reply (ack or error), skipping messages."""
        for i in range(start, start + n):
            await pub.send(op="publish", room=room, data={"i": i}, id=i)
        replies = {}
        while len(replies) < n:
            m = await pub.recv()
            if m["op"] not in ("message", "reset"):   # pub is a member too
                replies[m["id"]] = m
        return replies

    async def main():
        pub, local, remote = await Client.open(a), await Client.open(a), await Client.open(b)
        try:
            for client in (pub, local, remote):
                assert (await client.join(room))["op"] == "ack"
            replies = await publish_all(pub, 0, 20)
            assert [replies[i]["seq"] for i in range(20)] == list(range(1, 21))
            assert [m["seq"] for m in await remote.messages(20)] == list(range(1, 21))
            assert [m["seq"] for m in await local.messages(20)] == list(range(1, 21))

            server.kill()
            for gw in (a, b):
                await until(lambda: http_get(gw, "/readyz")[0] == 503, "readyz 503")
                assert "broker" in http_get(gw, "/readyz")[1]
                assert http_get(gw, "/healthz")[0] == 200

            replies = await publish_all(pub, 100, 10)
            assert all(r["op"] == "error" and r["code"] == "broker_unavailable" for r in replies.values()), replies
            # The client is told what happened, never where Redis is (issue 20, item 10).
            assert all(str(server.port) not in r["message"] and "members on this gateway process already got it"
                       in r["message"] for r in replies.values()), replies
            # Local members still get them, unnumbered; the other process cannot.
            got = await local.messages(10)
            assert [(m["seq"], m["data"]["i"]) for m in got] == [(0, i) for i in range(100, 110)]
            # Joining a room this process does not hold needs Redis: refused, connection kept.
            await remote.send(op="join", room=new_room("while-down"), id="j")
            assert (await remote.recv())["code"] == "broker_unavailable"

            server.start()
            for gw in (a, b):
                await until(lambda: http_get(gw, "/readyz")[0] == 200, "readyz 200 after restart")
            replies = await publish_all(pub, 200, 20)
            # Redis came back empty (no persistence): the room's numbering starts again.
            assert [replies[i]["seq"] for i in range(200, 220)] == list(range(1, 21))
            # Members are told the numbering restarted (issue 14: `reset` with the new epoch,
            # before its first message); nothing published while Redis was down ever reaches
            # B: the first message it gets is 200.
            for client in (remote, local):   # (pub got its reset among its replies)
                reset = await client.recv()
                assert (reset["op"], reset["room"], reset["seq"]) == ("reset", room, 0), reset
            assert [m["data"]["i"] for m in await remote.messages(20)] == list(range(200, 220))
            assert [m["data"]["i"] for m in await local.messages(20)] == list(range(200, 220))

            assert metric(a, "ws_gateway_broker_publish_errors_total") == 10
            assert metric(a, "ws_gateway_broker_local_deliveries_total") == 10
            for gw in (a, b):
                assert metric(gw, "ws_gateway_broker_reconnects_total") == 1
                assert metric(gw, "ws_gateway_broker_connected") == 1
            assert metric(b, "ws_gateway_broker_seq_resets_total") == 1
        finally:
            for client in (pub, local, remote):
                await client.close()
    run(main())


def test_workers_share_one_port_and_one_redis(run, redis_for_cluster):
    """`--workers 2`: the kernel spreads connections over two processes; rooms span both."""
    room = new_room("workers")
    channel = f"ws:{{{room}}}"
    with GatewayProcess("--broker", redis_for_cluster.url, "--workers", "2", "--rate-limit", "0") as gw:
        # /healthz answers as soon as ONE worker listens; on a loaded machine the other may
        # start listening a second later, and every connection made meanwhile lands on the first.
        for _ in range(600):
            if gw.output().count('"event":"listen"') >= 2:
                break
            time.sleep(0.05)

        async def main():
            clients = []
            try:
                # Connect until both workers hold the room (each connection lands on either).
                while numsub(redis_for_cluster, channel) < 2:
                    assert len(clients) < 64, "every connection landed on one worker"
                    client = await Client.open(gw)
                    clients.append(client)
                    assert (await client.join(room))["op"] == "ack"
                await clients[0].send(op="publish", room=room, data="to all")
                for client in clients:
                    assert (await client.recv())["data"] == "to all"
            finally:
                for client in clients:
                    await client.close()
        run(main())


@pytest.fixture(scope="module")
def sharded():
    """A 3-node Redis Cluster and two gateways using sharded pub/sub on it."""
    with RedisCluster() as cluster:
        procs = gateways(cluster.url, 2)
        try:
            yield cluster, procs
        finally:
            for p in procs:
                p.stop()


def test_redis_cluster_sharded_fanout(run, sharded):
    cluster, (a, b) = sharded
    # Rooms on every shard, found by asking the cluster who owns each channel.
    rooms: dict[int, str] = {}
    while len(rooms) < 3:
        room = new_room("shard")
        rooms.setdefault(cluster.node_for(f"ws:{{{room}}}".encode()).port, room)

    async def main():
        ca, cb = await Client.open(a), await Client.open(b)
        try:
            for room in rooms.values():
                await cb.join(room)
            for port, room in rooms.items():
                owner = next(n for n in cluster.nodes if n.port == port)
                with owner.client() as r:
                    assert r.execute_command("PUBSUB", "SHARDNUMSUB", f"ws:{{{room}}}") == [f"ws:{{{room}}}".encode(), 1]
            for room in rooms.values():
                for i in range(5):
                    await ca.send(op="publish", room=room, data=i)       # A has no members: publishes only
            got = await cb.messages(15)
            for room in rooms.values():
                assert [(m["seq"], m["data"]) for m in got if m["room"] == room] == [(i + 1, i) for i in range(5)]
            assert metric(a, "ws_gateway_broker_messages_received_total") == 0
            assert metric(a, "ws_gateway_broker_shards") == 3
        finally:
            await ca.close()
            await cb.close()
    run(main())


def test_loadtool_fanout_across_processes(three):
    """benchmarks/bench_cross_process.py's client: publisher on A, subscribers spread over B and C."""
    import json
    import subprocess
    import sys
    from tests.helpers import ROOT
    a, b, c = three
    before = [metric(gw, "ws_gateway_broker_messages_received_total") for gw in (b, c)]
    out = subprocess.run([sys.executable, "-m", "benchmarks.loadtool", "fanout", "--url", a.url("/ws"),
                          "--subscriber-url", b.url("/ws"), "--subscriber-url", c.url("/ws"),
                          "--subscribers", "20", "--window", "4", "--duration", "0.5", "--warmup", "0.2",
                          "--room", new_room("loadtool")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert result["errors"] == 0 and result["extra"]["subscribers"] == 20, out.stdout + out.stderr
    assert result["count"] > 0
    # Both B and C had subscribers: both received the room's traffic through Redis.
    after = [metric(gw, "ws_gateway_broker_messages_received_total") for gw in (b, c)]
    assert after[0] > before[0] and after[1] > before[1]


# -- one process, Redis broker: the session's queued (pipelined) publishes ---------------------

def test_queued_publishes_keep_order_and_share_round_trips(run, redis_for_cluster):
    """A client's publishes are queued without waiting for each Redis round trip: acks and
    messages still follow request order, seqs are consecutive, and batches carry many."""
    from tests.helpers import serve
    room = new_room("pipelined")

    async def main():
        async with serve(broker=redis_for_cluster.url, rate_limit=0) as gw:
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
                client = Client(ws)
                await client.join(room)
                n = 300           # past MAX_QUEUED_PUBLISHES: the rest wait their turn
                for i in range(n):
                    await client.send(op="publish", room=room, data=i, id=i)
                acks, messages = [], []
                while len(acks) < n or len(messages) < n:
                    m = await client.recv()
                    (acks if m["op"] == "ack" else messages).append(m)
                assert [a["id"] for a in acks] == list(range(n))
                seqs = [a["seq"] for a in acks]
                assert seqs == list(range(seqs[0], seqs[0] + n))
                assert [(m["data"], m["seq"]) for m in messages] == list(zip(range(n), seqs))
                stats = gw.hub.broker.stats()
                assert stats["publishes"] == n and stats["publish_batches"] < n
                assert gw.hub.publishes == n and gw.hub.publish_failures == 0
    run(main())


def test_queued_publishes_unanswered_when_redis_dies_get_errors(run):
    from tests.helpers import serve
    room = new_room("inflight")

    async def main(server):
        async with serve(broker=server.url, rate_limit=0) as gw:
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
                client = Client(ws)
                await client.join(room)
                with server.client() as r:
                    r.execute_command("CLIENT", "PAUSE", "20000", "WRITE")   # Redis holds the EVALSHAs
                for i in range(5):
                    await client.send(op="publish", room=room, data=i, id=i)
                await until(lambda: gw.hub.broker.stats()["publishes"] == 5, "the publishes to be queued")
                server.kill()
                replies = [await client.recv() for _ in range(5)]
                assert [(r["op"], r["id"], r["code"]) for r in replies] == [("error", i, "broker_unavailable") for i in range(5)]
                assert gw.hub.publish_failures == 5 and gw.hub.publishes == 0
                # The connection is still fine.
                await client.send(op="leave", room=room, id="bye")
                assert (await client.recv())["op"] == "ack"
    with RedisServer() as server:
        run(main(server))
