"""The Redis broker beyond the shared contract: URLs and config, interest-based subscriptions,
seq shared by every process, batching, and faults (Redis killed, restarted, refusing us).

Every test starts its own redis-server on a free port (tests/redis_server.py); the cluster
tests share one 3-node cluster per module.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.broker import BrokerUnavailable, create_broker
from gateway.broker.base import Retention
from gateway.broker.redis import RedisBroker, parse_broker_url
from gateway.config import load
from gateway.errors import ConfigError
from tests.broker_helpers import Recorder, same_slot_room
from tests.helpers import ROOT
from tests.redis_server import RedisCluster, RedisServer, redis_cluster, redis_server  # noqa: F401 - fixtures


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def started(url: str, **options) -> tuple[RedisBroker, Recorder]:
    broker = RedisBroker(url, **{"prefix": "ws:", "reconnect_min": 0.02, "reconnect_max": 0.2, **options})
    rec = Recorder()
    await broker.start(rec)
    return broker, rec


# -- URLs and configuration ------------------------------------------------------------------

@pytest.mark.parametrize("url, cluster, expect", [
    ("redis://127.0.0.1:7000/3", False, [{"host": "127.0.0.1", "port": 7000, "db": 3}]),
    ("redis://h", False, [{"host": "h"}]),
    ("unix:///run/redis.sock?db=2", False, [{"path": "/run/redis.sock", "db": 2}]),
    ("redis+cluster://a:1,b:2", True, [{"host": "a", "port": 1}, {"host": "b", "port": 2}]),
    ("redis+cluster://user:pw@a:1,b:2/0", True, [{"host": "a", "port": 1, "username": "user", "password": "pw", "db": 0},
                                                 {"host": "b", "port": 2, "username": "user", "password": "pw", "db": 0}]),
])
def test_parse_urls(url, cluster, expect):
    is_cluster, seeds = parse_broker_url(url)
    assert is_cluster is cluster
    assert [{k: v for k, v in s.items() if k != "connection_class"} for s in seeds] == expect


def test_tls_url_uses_tls():
    _, [seed] = parse_broker_url("rediss://h:6380/0")
    assert seed["connection_class"].__name__ == "SSLConnection"
    cluster, seeds = parse_broker_url("rediss+cluster://a:1,b:2?ssl_cert_reqs=none")
    assert cluster and [s["connection_class"].__name__ for s in seeds] == ["SSLConnection"] * 2
    assert all(s["ssl_cert_reqs"] == "none" for s in seeds)


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://h:1/0", "unix:///tmp/r.sock",
                                 "redis+cluster://a:1,b:2", "rediss+cluster://a:1,b:2", "REDIS://h:1"])
def test_create_broker_takes_every_redis_scheme(url):
    # rediss+cluster:// used to pass config validation and then be refused here (issue 13).
    broker = create_broker(url)
    assert isinstance(broker, RedisBroker)
    assert broker.cluster is ("cluster" in url)


@pytest.mark.parametrize("url, words", [
    ("ftp://h", "scheme"),
    ("redis://h:notaport", "port"),
    ("redis://h:6379/abc", "not a number"),
    ("redis://:6379", "a host is missing"),
    ("unix://", "needs a socket path"),
    ("redis+cluster://", "at least one seed node"),
    ("redis+cluster://a:1/3", "only database 0"),
    ("localhost:6379", "not a URL"),
    ("redis://h/0?socket_timeout=1", "unsupported URL parameter 'socket_timeout'"),
    ("redis://h/0?ssl_cert_reqs=none", "need rediss://"),
    ("memory://", "not a Redis URL"),
])
def test_bad_urls_are_clear_value_errors(url, words):
    with pytest.raises(ValueError, match=words):
        parse_broker_url(url)


def test_bad_options():
    with pytest.raises(ValueError, match="braces"):
        RedisBroker("redis://h", prefix="a{b}")
    with pytest.raises(ValueError, match="timeout"):
        RedisBroker("redis://h", timeout=0)


@pytest.mark.parametrize("broker, field, words", [
    ("nats://h:4222", "broker", "unsupported scheme"),
    ("redis://h:port", "broker", "invalid Redis address"),
    ("redis://h:1/x", "broker", "not a number"),
    ("redis+cluster://a:1,b:x", "broker", "invalid Redis address"),
    ("redis+cluster://a:1/2", "broker", "only database 0"),
    ("unix://", "broker", "socket path"),
])
def test_config_rejects_bad_broker_urls(broker, field, words):
    with pytest.raises(ConfigError, match=words) as info:
        load(None, env={}, overrides={"broker": broker})
    assert "--broker" in str(info.value)


def test_config_redis_options():
    config = load(None, env={}, overrides={"broker": "redis+cluster://a:1,b:2", "redis_prefix": "app1:",
                                           "history_ttl": 60, "redis_timeout": 1.5})
    assert (config.redis_prefix, config.history_ttl, config.redis_timeout) == ("app1:", 60, 1.5)
    with pytest.raises(ConfigError, match="braces"):
        load(None, env={}, overrides={"redis_prefix": "{x}"})
    with pytest.raises(ConfigError, match="history_ttl"):
        load(None, env={}, overrides={"history_ttl": 0})


def test_workers_need_a_shared_broker():
    with pytest.raises(ConfigError, match="rooms would silently split"):
        load(None, env={}, overrides={"workers": 2, "broker": "memory://"})
    assert load(None, env={}, overrides={"workers": 2, "broker": "redis://127.0.0.1:6390/0"}).workers == 2


def test_cli_bad_broker_url_is_a_configuration_error():
    """The process exits 2 with one clear line, no traceback, and never echoes a password."""
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--broker",
                           "redis://user:s3cret@h:port/0"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "--broker" in proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "shared broker" in proc.stderr


def test_cli_flags_reach_the_config():
    from gateway.cli import build_parser, config_from_args
    args = build_parser().parse_args(["serve", "--broker", "redis://127.0.0.1:1/0", "--redis-prefix", "p:",
                                      "--history-ttl", "5", "--redis-timeout", "0.5"])
    config = config_from_args(args)
    assert (config.broker, config.redis_prefix, config.history_ttl, config.redis_timeout) == \
        ("redis://127.0.0.1:1/0", "p:", 5, 0.5)


# -- subscriptions, seq and batching against a real redis-server ------------------------------

async def numsub(server: RedisServer, channel: bytes) -> int:
    async with aioredis.Redis(host="127.0.0.1", port=server.port) as r:
        return dict(await r.pubsub_numsub(channel))[channel]


def test_interest_based_subscriptions(run, redis_server):
    """A channel is subscribed exactly while the room is held: PUBSUB NUMSUB tells."""
    async def main():
        broker, _ = await started(redis_server.url, prefix="app:")
        try:
            channel = broker.channel("lobby")
            assert channel == b"app:{lobby}"
            assert await numsub(redis_server, channel) == 0
            await broker.subscribe("lobby")
            assert await numsub(redis_server, channel) == 1
            await broker.publish("elsewhere", b"1")          # publishing does not subscribe
            assert await numsub(redis_server, broker.channel("elsewhere")) == 0
            await broker.unsubscribe("lobby")
            # unsubscribe does not wait for Redis: a round trip on the same connection does.
            await broker.subscribe("fence")
            assert await numsub(redis_server, channel) == 0
            assert broker.stats()["rooms"] == 1
        finally:
            await broker.close()
    run(main())


def test_seq_is_shared_by_every_process(run, redis_server):
    """Two publishers, two subscribers: one numbering, one order, the same for everyone."""
    async def main():
        (a, rec_a), (b, rec_b) = await started(redis_server.url), await started(redis_server.url)
        try:
            await a.subscribe("r")
            await b.subscribe("r")
            results = [seq for seq, _ in await asyncio.gather(*(
                (a if i % 2 else b).publish("r", b'{"n":%d}' % i) for i in range(400)))]
            assert sorted(results) == list(range(1, 401))
            got_a = await rec_a.wait_count("r", 400)
            got_b = await rec_b.wait_count("r", 400)
            assert got_a == got_b
            assert [seq for seq, _ in got_a] == list(range(1, 401))
            # Each publisher's seq is the number its publication was delivered with.
            assert dict(got_a) == {seq: b'{"n":%d}' % i for i, seq in enumerate(results)}
            assert a.stats()["messages_lost"] == b.stats()["messages_lost"] == 0
        finally:
            await a.close()
            await b.close()
    run(main())


def test_publishes_of_one_loop_pass_share_one_round_trip(run, redis_server):
    async def main():
        broker, rec = await started(redis_server.url)
        try:
            await broker.subscribe("r")
            await asyncio.gather(*(broker.publish("r", b"%d" % i) for i in range(2000)))
            assert broker.stats()["publish_batches"] == 1
            async with aioredis.Redis(host="127.0.0.1", port=redis_server.port) as r:
                stats = await r.info("commandstats")
            assert stats["cmdstat_evalsha"]["calls"] == 2000
            await rec.wait_count("r", 2000)
        finally:
            await broker.close()
    run(main())


def test_room_keys_follow_the_retention_and_live_in_the_selected_db(run, redis_server):
    """Issue 12: a room's keys live only while they serve: the stream `ttl` after the last
    publication, the meta hash 2 x ttl; a room without history gets no stream; nothing a
    day long. All in the selected database, all in the room's hash tag."""
    async def main():
        url = f"redis://127.0.0.1:{redis_server.port}/3"
        retention = lambda room: Retention(0 if room.startswith("off") else 10, 120)
        broker, _ = await started(url, retention=retention)
        try:
            for i in range(150):
                await broker.publish(f"room-{i}", b"1")
            await broker.publish("off", b"1")
            async with aioredis.Redis(host="127.0.0.1", port=redis_server.port, db=3) as r:
                keys = sorted(await r.keys("*"))
                assert len(keys) == 2 * 150 + 1
                for key in keys:
                    ttl = await r.ttl(key)
                    if b"hist:" in key:
                        assert 0 < ttl <= 120
                    else:
                        assert b"meta:" in key and 120 < ttl <= 240
                assert await r.hgetall(broker.meta_key("room-0")) == {b"e": (await broker.position("room-0"))[1].encode(),
                                                                       b"s": b"1"}
                assert await r.exists(broker.history_key("off")) == 0
                assert await r.xlen(broker.history_key("room-0")) == 1
                assert await r.exists(b"ws:seq:{room-0}") == 0     # the old per-room key is gone for good
            async with aioredis.Redis(host="127.0.0.1", port=redis_server.port, db=0) as r:
                assert await r.dbsize() == 0
        finally:
            await broker.close()
    run(main())


def test_held_rooms_keep_their_numbering_while_idle(run, redis_server):
    """The meta hash of a room some process holds is refreshed; an unheld one expires."""
    async def main():
        broker, rec = await started(redis_server.url, retention=lambda room: Retention(10, 1))
        try:
            await broker.subscribe("held")
            held = await broker.publish("held", b"1")
            await broker.publish("unheld", b"1")
            async with aioredis.Redis(host="127.0.0.1", port=redis_server.port) as r:
                while await r.exists(broker.meta_key("unheld")):
                    await asyncio.sleep(0.2)     # meta_ttl is 2 s: wait for Redis to expire it
                assert await r.exists(broker.meta_key("held")) == 1
                assert broker.stats()["meta_touches"] >= 1
            assert await broker.publish("held", b"2") == (2, held[1])
        finally:
            await broker.close()
    run(main())


def test_epoch_changes_when_redis_loses_the_numbering(run, redis_server):
    """Redis restarted without persistence: the next publication starts a new epoch at 1,
    and a subscriber sees the new epoch (counted as a seq reset)."""
    async def main():
        broker, rec = await started(redis_server.url)
        try:
            await broker.subscribe("r")
            seq, epoch = await broker.publish("r", b"1")
            await broker.publish("r", b"2")
            await rec.wait_count("r", 2)
            redis_server.restart()
            await rec.wait_states([True, False, True])
            assert await broker.history("r", 0, 10) != (epoch, 2, [])
            seq2, epoch2 = await broker.publish("r", b"3")
            assert seq2 == 1 and epoch2 != epoch
        finally:
            await broker.close()
    run(main())


def test_unix_socket_url(run, redis_server):
    async def main():
        broker, rec = await started(redis_server.unix_url)
        try:
            await broker.subscribe("r")
            seq, _ = await broker.publish("r", b'"over a unix socket"')
            assert await rec.wait_count("r", 1) == [(seq, b'"over a unix socket"')]
        finally:
            await broker.close()
    run(main())


def test_prefixes_isolate_gateways_sharing_a_redis(run, redis_server):
    async def main():
        (a, rec_a), (b, rec_b) = await started(redis_server.url, prefix="one:"), await started(redis_server.url, prefix="two:")
        try:
            await a.subscribe("r")
            await b.subscribe("r")
            assert (await a.publish("r", b"1"))[0] == 1
            assert (await b.publish("r", b"2"))[0] == 1          # separate numbering too
            assert await rec_a.wait_count("r", 1) == [(1, b"1")]
            assert await rec_b.wait_count("r", 1) == [(1, b"2")]
            await a.publish("r", b"3")
            assert await rec_a.wait_count("r", 2) == [(1, b"1"), (2, b"3")]
            assert rec_b.of("r") == [(1, b"2")]
        finally:
            await a.close()
            await b.close()
    run(main())


def test_a_failing_handler_does_not_stop_delivery(run, redis_server, caplog):
    async def main():
        broker, rec = await started(redis_server.url)
        calls = []
        original = rec.handle_publication

        def flaky(room, seq, data, epoch):
            calls.append(seq)
            if seq == 1:
                raise RuntimeError("handler bug")
            original(room, seq, data, epoch)
        rec.handle_publication = flaky
        try:
            await broker.subscribe("r")
            await broker.publish("r", b"1")
            await broker.publish("r", b"2")
            assert await rec.wait_count("r", 1) == [(2, b"2")]
            assert broker.connected
        finally:
            await broker.close()
    with caplog.at_level(logging.ERROR, logger="gateway.broker.redis"):
        run(main())
    assert "publication handler failed" in caplog.text


# -- faults -----------------------------------------------------------------------------------

async def until(predicate, timeout: float = 15.0) -> None:
    """Poll a condition driven by an external process (redis-server), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def redis_command(server: RedisServer, *args, password=None):
    async with aioredis.Redis(host="127.0.0.1", port=server.port, password=password, protocol=2) as r:
        return await r.execute_command(*args)


def test_redis_killed_and_restarted(run, redis_server, caplog):
    """Down: told once, logged once, local members still served (seq 0), every refusal counted.
    Back: resubscribed to every room held, publishing again, state told once more."""
    async def main():
        broker, rec = await started(redis_server.url)
        try:
            await broker.subscribe("r")
            await broker.subscribe("s")
            assert (await broker.publish("r", b"1"))[0] == 1
            await rec.wait_count("r", 1)

            redis_server.kill()
            await rec.wait_states([True, False])
            assert not broker.connected and broker.state()[0] is False
            with pytest.raises(BrokerUnavailable, match="only to members on this process"):
                await broker.publish("r", b'"local"')
            assert await rec.wait_count("r", 2) == [(1, b"1"), (0, b'"local"')]
            with pytest.raises(BrokerUnavailable):
                await broker.publish("not-held", b"x")
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("new")
            await until(lambda: broker.connect_failures >= 3)   # several failed attempts, one log line

            redis_server.start()
            await rec.wait_states([True, False, True])
            stats = broker.stats()
            assert stats["reconnects"] == 1 and stats["connected"] == 1
            assert stats["publish_errors"] == 2 and stats["local_deliveries"] == 1
            assert stats["subscribe_errors"] == 1 and stats["rooms"] == 2
            for room in ("r", "s"):
                assert await numsub(redis_server, broker.channel(room)) == 1
            assert await numsub(redis_server, broker.channel("new")) == 0
            # Redis restarted without persistence: numbering starts again, and the gap is
            # reported as a reset (unmeasurable), not as a number of lost messages.
            assert (await broker.publish("s", b"after"))[0] == 1
            assert await rec.wait_count("s", 1) == [(1, b"after")]
            await broker.publish("r", b"after")
            await rec.wait_count("r", 3)
            assert broker.stats()["seq_resets"] == 1 and broker.stats()["messages_lost"] == 0
            assert rec.of("not-held") == []
        finally:
            await broker.close()
    with caplog.at_level(logging.INFO, logger="gateway.broker.redis"):
        run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.broker.redis"]
    assert messages.count("redis broker disconnected") == 1
    assert messages.count("redis broker connected") == 2


def test_inflight_publishes_fail_and_are_never_claimed(run, redis_server):
    """Publications written but unanswered when Redis dies get BrokerUnavailable, not a seq."""
    async def main():
        broker, rec = await started(redis_server.url)
        try:
            await broker.subscribe("r")
            # Redis holds every write (EVALSHA included) from now on: the batch stays unanswered.
            await redis_command(redis_server, "CLIENT", "PAUSE", "20000", "WRITE")
            tasks = [asyncio.ensure_future(broker.publish("r", b"%d" % i)) for i in range(10)]
            await until(lambda: broker.stats()["publish_batches"] == 1)
            redis_server.kill()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, BrokerUnavailable) for r in results), results
            assert broker.stats()["publish_errors"] == 10
            assert broker.stats()["local_deliveries"] == 0     # outcome unknown: no local copy either
            await rec.wait_states([True, False])
            assert rec.of("r") == []
        finally:
            await broker.close()
    run(main())


def test_a_silent_redis_counts_as_down(run, redis_server):
    """Redis that stops answering (paused) is detected by the command timeout, then rejoined."""
    async def main():
        broker, rec = await started(redis_server.url, timeout=0.3)
        try:
            await broker.subscribe("r")
            await redis_command(redis_server, "CLIENT", "PAUSE", "1500", "ALL")
            with pytest.raises(BrokerUnavailable, match="Timeout"):
                await broker.publish("r", b"1")
            await rec.wait_states([True, False])
            await rec.wait_states([True, False, True])   # the pause ends: reconnected
            assert (await broker.publish("r", b"2"))[0] >= 1
            assert await numsub(redis_server, broker.channel("r")) == 1
        finally:
            await broker.close()
    run(main())


def test_missed_publications_are_counted_from_seq_gaps(run, redis_server):
    """B is cut off while A keeps publishing: after B is back, messages_lost says how many it missed."""
    async def main():
        (a, _), (b, rec_b) = await started(redis_server.url), await started(redis_server.url)
        try:
            await b.subscribe("r")
            await a.publish("r", b"1")
            await rec_b.wait_count("r", 1)
            # New connections now need a password (A's and B's current ones stay logged in),
            # so B cannot come back until we allow it.
            await redis_command(redis_server, "CONFIG", "SET", "requirepass", "let-me-in")
            await redis_command(redis_server, "CLIENT", "KILL", "TYPE", "pubsub", password="let-me-in")  # only B subscribes
            await rec_b.wait_states([True, False])
            for i in range(5):
                await a.publish("r", b"missed")
            await until(lambda: b.connect_failures >= 1)
            await redis_command(redis_server, "CONFIG", "SET", "requirepass", "", password="let-me-in")
            await rec_b.wait_states([True, False, True])
            seq, _ = await a.publish("r", b"after")
            assert seq == 7
            assert await rec_b.wait_count("r", 2) == [(1, b"1"), (7, b"after")]
            assert b.stats()["messages_lost"] == 5 and b.stats()["seq_resets"] == 0
            assert a.connected and a.stats()["publish_errors"] == 0
        finally:
            await a.close()
            await b.close()
    run(main())


def test_start_with_redis_down_then_up(run):
    """A gateway may start before its Redis: not ready, refusing publishes, connected once Redis is up."""
    async def main():
        server = RedisServer()
        broker, rec = await started(server.url)
        try:
            assert rec.states == [False] and not broker.connected
            assert "broker disconnected" in broker.state()[1]
            with pytest.raises(BrokerUnavailable):
                await broker.publish("r", b"1")
            server.start()
            await rec.wait_states([False, True])
            await broker.subscribe("r")
            assert (await broker.publish("r", b"1"))[0] == 1
            assert await rec.wait_count("r", 1) == [(1, b"1")]
        finally:
            await broker.close()
            server.close()
    run(main())


# -- Redis Cluster: sharded pub/sub ------------------------------------------------------------

def rooms_on_every_node(cluster: RedisCluster, broker: RedisBroker) -> dict[int, str]:
    """One room per cluster node (port -> room), found by asking the cluster."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(cluster.nodes):
        room = f"room-{i}"
        found.setdefault(cluster.node_for(broker.channel(room)).port, room)
        i += 1
    return found


async def node_command(node: RedisServer, *args):
    async with aioredis.Redis(host="127.0.0.1", port=node.port, protocol=2) as r:
        return await r.execute_command(*args)


def test_cluster_uses_sharded_pubsub_on_the_owning_node(run, redis_cluster):
    async def main():
        p = prefix()
        (a, rec_a), (b, _) = await started(redis_cluster.url, prefix=p), await started(redis_cluster.url, prefix=p)
        try:
            assert a.cluster and a.stats()["shards"] == 3
            rooms = rooms_on_every_node(redis_cluster, a)
            for room in rooms.values():
                await a.subscribe(room)
            for port, room in rooms.items():
                channel = a.channel(room)
                owner = next(n for n in redis_cluster.nodes if n.port == port)
                assert dict(zip(*[iter(await node_command(owner, "PUBSUB", "SHARDNUMSUB", channel))] * 2)) == {channel: 1}
                # Not the classic (broadcast-to-every-node) pub/sub.
                assert await node_command(owner, "PUBSUB", "NUMSUB", channel) == [channel, 0]
            sent = {room: (await b.publish(room, room.encode()))[0] for room in rooms.values()}
            for room, seq in sent.items():
                assert await rec_a.wait_count(room, 1) == [(seq, room.encode())]
            port, room = next(iter(rooms.items()))
            await a.unsubscribe(room)
            # unsubscribe does not wait; a subscribe on the same shard's connection is a round trip after it.
            await a.subscribe(same_slot_room(room))
            owner = next(n for n in redis_cluster.nodes if n.port == port)
            assert await node_command(owner, "PUBSUB", "SHARDNUMSUB", a.channel(room)) == [a.channel(room), 0]
        finally:
            await a.close()
            await b.close()
    run(main())


def test_cluster_node_killed_and_restarted(run):
    """A primary dies: only its shard goes down (the broker stays connected, degraded; the
    other shards' rooms flow); the node comes back: topology re-read, its rooms resubscribed
    on their shard, traffic flows again. (Cluster-level failover: tests/system/test_redis_failover.py.)"""
    async def until(predicate, what):
        async with asyncio.timeout(30):
            while not predicate():
                await asyncio.sleep(0.02)   # polling state that changes when Redis answers

    async def main(cluster: RedisCluster):
        broker, rec = await started(cluster.url, prefix=prefix())
        try:
            rooms = rooms_on_every_node(cluster, broker)
            for room in rooms.values():
                await broker.subscribe(room)
            victim = cluster.nodes[1]
            victim.kill()
            await until(lambda: broker.stats()["shards_down"] == 1, "the shard to be marked down")
            assert rec.states == [True] and broker.connected
            assert broker.degraded().startswith("degraded: 1 of 3 redis shards down")
            assert broker.state() == (True, broker.degraded())
            with pytest.raises(BrokerUnavailable):
                await broker.publish(rooms[victim.port], b"1")
            victim.start()   # same port, same nodes.conf: it rejoins with its slots
            await until(lambda: broker.stats()["shards_down"] == 0, "the shard to be repaired")
            assert broker.degraded() == "" and broker.stats()["shard_failures"] == 1
            for room in rooms.values():
                seq, _ = await broker.publish(room, b'"back"')
                await rec.wait_for(lambda: (seq, b'"back"') in rec.of(room))
            owner_channel = broker.channel(rooms[victim.port])
            assert await node_command(victim, "PUBSUB", "SHARDNUMSUB", owner_channel) == [owner_channel, 1]
            assert rec.states == [True]
        finally:
            await broker.close()
    with RedisCluster() as cluster:
        run(main(cluster))
