"""Redis failures a production deployment meets: a Cluster shard lost, a replica promoted, a
Sentinel failover. Real gateway processes, real redis-server nodes and sentinels started by
the tests on free ports (tests/redis_server.py), websockets clients on /ws.

What must hold:
- Cluster: losing one shard affects only the rooms on it (their publishes and joins get
  broker_unavailable); rooms on the other shards keep flowing; /readyz stays 200 and says
  "degraded"; when the shard comes back (or its replica is promoted) the gateway picks up the
  new slot map and the rooms held there flow again without the clients doing anything.
- Sentinel: the primary is SIGKILLed, the sentinels promote the replica, the gateways follow
  it; publications acked before the failover were replicated (WAIT) so the room's seq
  continues; publications refused during the failover are never delivered and use no seq.
The clients' event loop does not matter here (the broker runs inside the gateway processes,
on uvloop), so these run once, on asyncio, not under the `run` fixture's two loops.
"""
from __future__ import annotations

import asyncio
import itertools

import pytest

from gateway.broker.redis_topology import parse_sentinel_url
from gateway.config import ConfigError, load
from tests.redis_server import RedisCluster, RedisSentinels, needs_redis
from tests.system.test_cluster import Client, gateways, http_get, metric, until

pytestmark = [pytest.mark.timeout(180), needs_redis]

_rooms = itertools.count()


def rooms_per_shard(cluster: RedisCluster, tag: str) -> dict[int, str]:
    """One new room per primary, keyed by the primary's port (asked of the cluster)."""
    primaries = {p for _, _, p, _ in cluster.slots()}
    rooms: dict[int, str] = {}
    while len(rooms) < len(primaries):
        room = f"{tag}-{next(_rooms)}"
        rooms.setdefault(cluster.node_for(f"ws:{{{room}}}".encode()).port, room)
    return rooms


def room_on(cluster: RedisCluster, port: int, tag: str) -> str:
    while True:
        room = f"{tag}-{next(_rooms)}"
        if cluster.node_for(f"ws:{{{room}}}".encode()).port == port:
            return room


def owner_port(cluster: RedisCluster, channel: str) -> int | None:
    """The port of the primary serving `channel`, or None while a failover leaves it unlisted."""
    try:
        return cluster.node_for(channel.encode()).port
    except (LookupError, StopIteration):
        return None


async def publish(client: Client, room: str, data, rid) -> dict:
    """Publish with an id; return the ack or error (messages arriving meanwhile are skipped)."""
    await client.send(op="publish", room=room, data=data, id=rid)
    while True:
        m = await client.recv()
        if m.get("id") == rid:
            return m


async def next_message(client: Client, room: str) -> dict:
    while True:
        m = await client.recv()
        if m.get("op") == "message" and m["room"] == room:
            return m


@pytest.fixture(scope="module")
def replicated():
    """3 primaries with a replica each; full coverage not required, so the other shards keep
    serving while one shard is lost entirely (Redis's default stops the whole cluster)."""
    with RedisCluster(replicas=1, extra_args=("--cluster-require-full-coverage", "no")) as cluster:
        procs = gateways(cluster.url, 2)
        try:
            yield cluster, procs
        finally:
            for p in procs:
                p.stop()


def test_losing_one_shard_affects_only_its_rooms(replicated):
    cluster, (a, b) = replicated
    rooms = rooms_per_shard(cluster, "loss")
    lost_port = sorted(rooms)[0]
    lost_room = rooms[lost_port]
    other_rooms = [r for p, r in rooms.items() if p != lost_port]
    primary = cluster.by_port(lost_port)
    replica = cluster.replicas_of(primary)[0]
    joinable_later = room_on(cluster, lost_port, "loss-new")

    async def main():
        pub, sub = await Client.open(a), await Client.open(b)
        try:
            for room in rooms.values():
                assert (await sub.join(room))["op"] == "ack"
            for room in rooms.values():
                assert (await publish(pub, room, "before", f"b-{room}"))["op"] == "ack"
                assert (await next_message(sub, room))["data"] == "before"
            failures = [metric(gw, "ws_gateway_broker_shard_failures_total") for gw in (a, b)]

            # The whole shard goes: its replica, then its primary (so nothing can take over).
            replica.kill()
            primary.kill()
            for gw in (a, b):
                await until(lambda: metric(gw, "ws_gateway_broker_shards_down") == 1, "the shard to be marked down")
                status, body = http_get(gw, "/readyz")
                assert status == 200 and "degraded: 1 of 3 redis shards down" in body, body
                assert str(lost_port) not in body     # /readyz is public: no addresses
                assert metric(gw, "ws_gateway_broker_connected") == 1
            assert [metric(gw, "ws_gateway_broker_shard_failures_total") for gw in (a, b)] == [f + 1 for f in failures]

            # The other shards' rooms flow, across processes, in order.
            for i in range(5):
                for room in other_rooms:
                    assert (await publish(pub, room, i, f"d-{room}-{i}"))["op"] == "ack"
            got = await sub.messages(5 * len(other_rooms))
            for room in other_rooms:
                assert [m["data"] for m in got if m["room"] == room] == list(range(5))
            # The lost shard's rooms: publishes and new joins are refused, the connection is kept.
            reply = await publish(pub, lost_room, "lost", "lost")
            assert reply["op"] == "error" and reply["code"] == "broker_unavailable"
            assert "127.0.0.1" not in reply["message"]
            newcomer = await Client.open(a)
            assert (await newcomer.join(joinable_later))["code"] == "broker_unavailable"
            assert (await newcomer.join(other_rooms[0]))["op"] == "ack"
            await newcomer.close()

            # The shard comes back (same ports, its nodes.conf): the gateways reopen it and
            # resubscribe the room they held there; nobody rejoins.
            primary.start()
            replica.start()
            for gw in (a, b):
                await until(lambda: metric(gw, "ws_gateway_broker_shards_down") == 0, "the shard to be repaired",
                            timeout=60)
                assert http_get(gw, "/readyz") == (200, "ready\n")
            reply = await publish(pub, lost_room, "back", "back")
            assert reply["op"] == "ack"
            got = await next_message(sub, lost_room)
            assert got["data"] == "back" and got["seq"] == reply["seq"]
            # Nothing published while the shard was lost ever arrives: the next message is "back".
        finally:
            await pub.close()
            await sub.close()
    asyncio.run(main())
    cluster.wait_whole()


def test_a_promoted_replica_is_picked_up(replicated):
    cluster, (a, b) = replicated
    rooms = rooms_per_shard(cluster, "promote")
    port = sorted(rooms)[-1]
    room = rooms[port]
    other = next(r for p, r in rooms.items() if p != port)
    primary = cluster.by_port(port)
    replica = cluster.replicas_of(primary)[0]
    channel = f"ws:{{{room}}}"

    async def main():
        pub, sub = await Client.open(a), await Client.open(b)
        try:
            for r in (room, other):
                assert (await sub.join(r))["op"] == "ack"
            first = await publish(pub, room, "before", "before")
            assert (await next_message(sub, room))["seq"] == first["seq"]
            with primary.client() as c:
                assert c.execute_command("WAIT", 1, 5000) >= 1   # the replica has the seq key

            primary.kill()
            # Another shard's room flows while this one fails over.
            assert (await publish(pub, other, "meanwhile", "meanwhile"))["op"] == "ack"
            assert (await next_message(sub, other))["data"] == "meanwhile"

            await until(lambda: owner_port(cluster, channel) == replica.port, "the replica's promotion", timeout=60)
            for gw in (a, b):
                await until(lambda: metric(gw, "ws_gateway_broker_shards_down") == 0, "the gateway to follow",
                            timeout=60)
            # B's subscription now lives on the promoted replica (sharded pub/sub is per node).
            with replica.client() as c:
                await until(lambda: c.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1,
                            "B to resubscribe on the new primary")
            reply = await publish(pub, room, "after", "after")
            assert reply["op"] == "ack" and reply["seq"] == first["seq"] + 1   # replicated: seq continues
            got = await next_message(sub, room)
            assert (got["data"], got["seq"]) == ("after", reply["seq"])
        finally:
            await pub.close()
            await sub.close()
    asyncio.run(main())
    # The old primary comes back as a replica of the new one; the cluster is whole again.
    primary.start()
    cluster.wait_whole()


def test_sentinel_failover_is_followed_and_seq_continues():
    with RedisSentinels() as sentinels:
        a, b = gateways(sentinels.url, 2)
        try:
            _sentinel_failover(sentinels, a, b)
        finally:
            a.stop()
            b.stop()
        assert a.proc.returncode == 0 and b.proc.returncode == 0
        for gw in (a, b):
            assert "Traceback" not in gw.output()


def _sentinel_failover(sentinels: RedisSentinels, a, b) -> None:
    room = f"sentinel-{next(_rooms)}"
    old, new = sentinels.primary, sentinels.replica

    async def main():
        pub, sub = await Client.open(a), await Client.open(b)
        try:
            assert (await sub.join(room))["op"] == "ack"
            for i in range(10):
                assert (await publish(pub, room, i, i))["seq"] == i + 1
            assert [m["seq"] for m in await sub.messages(10)] == list(range(1, 11))
            with old.client() as c:
                assert c.execute_command("WAIT", 1, 5000) >= 1   # every acked publication is on the replica

            old.kill()
            for gw in (a, b):
                await until(lambda: http_get(gw, "/readyz")[0] == 503, "the gateways to notice")
            # During the failover: publications are refused (broker_unavailable) until one is
            # acked by the new primary. Refused ones use no seq and are never delivered.
            refused, acked, n = 0, None, 0
            while acked is None:
                n += 1
                reply = await publish(pub, room, f"during-{n}", f"during-{n}")
                if reply["op"] == "ack":
                    acked = reply
                else:
                    assert reply["code"] == "broker_unavailable", reply
                    refused += 1
                    await asyncio.sleep(0.1)   # pacing the retries, not a timing assertion
            assert refused > 0
            assert sentinels.current_primary_port() == new.port
            assert acked["seq"] == 11                              # numbering continues on the replica
            for gw in (a, b):
                await until(lambda: http_get(gw, "/readyz")[0] == 200, "readyz 200 after the failover")
            for i in range(5):
                assert (await publish(pub, room, f"after-{i}", f"after-{i}"))["seq"] == 12 + i
            # B got every acked publication in order, except the first one if A reached the new
            # primary before B had resubscribed: then B counts it as lost (a seq gap), never silently.
            got = []
            while not got or got[-1]["data"] != "after-4":
                m = await sub.recv()
                got.append(m)
            got = [(m["data"], m["seq"]) for m in got]
            expected = [(f"during-{n}", 11)] + [(f"after-{i}", 12 + i) for i in range(5)]
            assert got in (expected, expected[1:]), got
            assert metric(b, "ws_gateway_broker_messages_lost_total") == (0 if got == expected else 1)
            assert metric(b, "ws_gateway_broker_seq_resets_total") == 0
            for gw in (a, b):
                assert metric(gw, "ws_gateway_broker_reconnects_total") >= 1
        finally:
            await pub.close()
            await sub.close()
    asyncio.run(main())


# -- URLs -------------------------------------------------------------------------------------

def test_sentinel_url_parsing():
    spec = parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/cache/2?sentinel_password=s3")
    assert spec.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert spec.service == "cache" and spec.sentinel_password == "s3"
    assert spec.node["db"] == 2 and spec.node["password"] == "pw" and "host" not in spec.node
    assert parse_sentinel_url("rediss+sentinel://h:1/m").node["connection_class"].__name__ == "SSLConnection"
    for bad, why in (("redis+sentinel://h:1", "service name"), ("redis+sentinel:///m", "a host is missing"),
                     ("redis+sentinel://h:x/m", "invalid Sentinel address"), ("redis+sentinel://h:1/m/db", "not a number"),
                     ("redis+sentinel://h:1/m?ssl_ca_certs=/x", "unsupported URL parameter")):
        with pytest.raises(ValueError, match=why):
            parse_sentinel_url(bad)


def test_config_accepts_sentinel_urls_and_explains_bad_ones():
    assert load(None, env={}, overrides={"broker": "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster"}).broker
    with pytest.raises(ConfigError, match="service name"):
        load(None, env={}, overrides={"broker": "redis+sentinel://127.0.0.1:26379"})
    with pytest.raises(ConfigError, match="invalid Sentinel address"):
        load(None, env={}, overrides={"broker": "redis+sentinel://127.0.0.1:x/mymaster"})
