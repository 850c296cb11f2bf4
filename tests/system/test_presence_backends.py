"""The presence backends (broker.base.PresenceBackend) against one contract: memory and Redis
(a redis-server started by the test) must agree on every answer; then what only Redis has:
several "processes" racing, a SCRIPT FLUSH, a Redis restart, and expiry after a crash.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

import pytest

from gateway.broker.base import ANONYMOUS_PREFIX, BrokerUnavailable, PresenceBackend
from gateway.broker.memory_presence import MemoryPresence
from gateway.broker.redis_presence import RedisPresence
from tests.redis_server import REDIS_SERVER, RedisSentinels, RedisServer, redis_cluster, redis_server  # noqa: F401

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="needs redis-server")]


class Handler:
    def __init__(self) -> None:
        self.events: list = []
        self.control: list = []
        self.states: list = []
        self.changed = asyncio.Event()

    def handle_presence_events(self, room, joins, leaves):
        self.events.append((room, [tuple(j) for j in joins], list(leaves)))
        self.changed.set()

    def handle_control(self, message):
        self.control.append(message)
        self.changed.set()

    def handle_control_state(self, connected):
        self.states.append(connected)
        self.changed.set()

    async def wait(self, predicate, timeout=10.0):
        async def poll():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def backend(kind, server=None, prefix=None, ttl=30.0, debounce=3.0):
    if kind == "memory":
        b = MemoryPresence()
    elif kind in ("cluster", "sentinel"):
        b = RedisPresence(server.url, prefix=prefix or f"t{uuid.uuid4().hex[:6]}:", debounce=debounce, timeout=2.0)
    else:
        b = RedisPresence(server.url, prefix=prefix or f"t{uuid.uuid4().hex[:6]}:", debounce=debounce, timeout=2.0)
    handler = Handler()
    await b.start(handler, ttl)
    b.handler = handler
    try:
        yield b
    finally:
        await b.close()


def a(key, user, info=""):
    return ("a", key, user, info, "")


def r(key):
    return ("r", key, "", "", "")


@pytest.fixture
def server_for(request):
    """The Redis a backend kind talks to: a single node, or a 3-node Redis Cluster (module-wide)."""
    def get(kind):
        if kind == "cluster":
            cluster = request.getfixturevalue("redis_cluster")

            class Url:
                url = cluster.url
            return Url
        if kind == "sentinel":
            sentinels = RedisSentinels().start()
            request.addfinalizer(sentinels.close)
            return sentinels
        return request.getfixturevalue("redis_server") if kind == "redis" else None
    return get


@pytest.mark.parametrize("kind", ["memory", "redis", "cluster", "sentinel"])
def test_contract(run, kind, server_for):
    async def main():
        async with backend(kind, server_for(kind)) as b:
            assert isinstance(b, PresenceBackend)     # every method the interface declares
            h = b.handler
            await b.watch("room")
            # first connection in: a join; a second connection of the same user: nothing
            assert await b.update("room", [a("n.1", "alice", '{"n":1}'), a("n.2", "alice", '{"n":2}')], True) == []
            await h.wait(lambda: len(h.events) == 1)
            assert h.events == [("room", [("alice", '{"n":1}')], [])]
            anon = ANONYMOUS_PREFIX + "n.3"
            await b.update("room", [a("n.3", anon), a("n.4", "bob")], True)
            await h.wait(lambda: len(h.events) == 2)
            assert sorted(h.events[1][1]) == [(anon, ""), ("bob", "")]
            # members in code-point order (anonymous ones first: their key starts with \x1f), paged
            assert await b.members("room", "", 10) == ([(anon, 1, ""), ("alice", 2, '{"n":1}'), ("bob", 1, "")], None)
            assert await b.members("room", "", 2) == ([(anon, 1, ""), ("alice", 2, '{"n":1}')], "alice")
            assert await b.members("room", "alice", 2) == ([("bob", 1, "")], None)
            rows, _ = await b.members("room", "", 10, clients=True)
            assert rows[1] == ("alice", 2, '{"n":1}', ["n.1", "n.2"])
            assert await b.counts("room") == (4, 3)
            assert await b.counts("elsewhere") == (0, 0)
            # re-adding (a heartbeat) changes nothing
            assert await b.update("room", [a("n.1", "alice")], True) == []
            assert await b.counts("room") == (4, 3)
            # alice's last connection out: pending, not published yet
            assert await b.update("room", [r("n.1")], True) == []
            [(user, token)] = await b.update("room", [r("n.2")], True)
            assert user == "alice"
            assert await b.counts("room") == (2, 2)
            # she comes back before the confirmation: the leave is cancelled, no join either
            await b.update("room", [a("n.5", "alice")], True)
            await b.confirm_leaves("room", [(user, token)])
            # bob leaves for good: his confirmation publishes the leave
            [(bob, bob_token)] = await b.update("room", [r("n.4")], True)
            await b.confirm_leaves("room", [(bob, bob_token)])
            await h.wait(lambda: len(h.events) == 3)
            assert h.events[2] == ("room", [], ["bob"])
            # removing an unknown connection is harmless; without events nothing is pending
            assert await b.update("room", [r("nope")], True) == []
            assert await b.update("quiet", [a("n.6", "carol")], False) == []
            assert await b.update("quiet", [r("n.6")], False) == []
            assert await b.counts("quiet") == (0, 0)
            # update_many: several rooms at once, per room its pending leaves
            results = await b.update_many([("x", [a("n.7", "dan")], True, False), ("y", [a("n.8", "dan")], True, False)])
            assert results == [[], []]
            [[(dan, _)], []] = await b.update_many([("x", [r("n.7")], True, False), ("y", [], True, True)])
            assert dan == "dan"
            # per-user slots
            assert await b.acquire_user_slot("u", "k1", 2) and await b.acquire_user_slot("u", "k2", 2)
            assert not await b.acquire_user_slot("u", "k3", 2)
            assert await b.acquire_user_slot("u", "k2", 2)          # the same connection again
            assert await b.acquire_user_slots([("u", "k3", 2), ("v", "k1", 2)]) == [False, True]
            await b.release_user_slot("u", "k1")
            assert await b.acquire_user_slot("u", "k3", 2)
            # revocations
            import time
            await b.store_revocation("jti:x", "", time.time() + 60)
            await b.store_revocation("user:y", "123.0", time.time() - 1)
            assert await b.load_revocations() == {"jti:x": ("", pytest.approx(time.time() + 60, abs=5))}
            # control channel: every message comes back to the sender too
            await b.send_control({"cmd": "hello", "n": 1})
            await h.wait(lambda: h.control)
            assert h.control == [{"cmd": "hello", "n": 1}]
            await b.register_node({"pid": 1})
            assert [n["node"] for n in await b.nodes()] == [b.node]
    run(main())


def test_first_in_last_out_is_atomic_across_processes(run, redis_server):
    async def main():
        prefix = f"t{uuid.uuid4().hex[:6]}:"
        async with backend("redis", redis_server, prefix) as p1, backend("redis", redis_server, prefix) as p2, \
                backend("redis", redis_server, prefix) as p3:
            await p1.watch("race")
            # 3 processes x 30 connections of one user, added concurrently: one join
            await asyncio.gather(*(p.update("race", [a(f"{p.node}.{i}", "zed")], True)
                                   for p in (p1, p2, p3) for i in range(30)))
            await p1.handler.wait(lambda: p1.handler.events)
            assert await p1.counts("race") == (90, 1)
            # all removed concurrently: exactly one pending leave, whoever removed the last
            results = await asyncio.gather(*(p.update("race", [r(f"{p.node}.{i}")], True)
                                             for p in (p1, p2, p3) for i in range(30)))
            pending = [item for result in results for item in result]
            assert len(pending) == 1 and pending[0][0] == "zed"
            # confirming it from any process publishes it once
            await asyncio.gather(p2.confirm_leaves("race", pending), p3.confirm_leaves("race", pending))
            await p1.handler.wait(lambda: len(p1.handler.events) == 2)
            assert p1.handler.events == [("race", [("zed", "")], []), ("race", [], ["zed"])]
    run(main())


def test_crashed_process_entries_expire(run, redis_server):
    async def main():
        prefix = f"t{uuid.uuid4().hex[:6]}:"
        async with backend("redis", redis_server, prefix, ttl=1.0) as alive:
            await alive.watch("room")
            dead = RedisPresence(redis_server.url, prefix=prefix)
            await dead.start(Handler(), 1.0)
            await dead.update("room", [a("dead.1", "ghost"), a("dead.2", ANONYMOUS_PREFIX + "dead.2")], True)
            await dead.close()          # no removal: as after a SIGKILL
            await alive.update("room", [a("alive.1", "living")], True)
            assert (await alive.counts("room"))[1] == 3
            await asyncio.sleep(1.1)    # past the entries' expiry (Redis's clock)
            await alive.update("room", [a("alive.1", "living")], True, cleanup=True)   # a heartbeat
            assert await alive.counts("room") == (1, 1)
            await alive.handler.wait(lambda: any(ev[2] for ev in alive.handler.events))
            leaves = [u for ev in alive.handler.events for u in ev[2]]
            assert sorted(leaves) == sorted(["ghost", ANONYMOUS_PREFIX + "dead.2"])
    run(main())


def test_script_flush_and_redis_restart(run, redis_server):
    async def main():
        async with backend("redis", redis_server) as b:
            await b.update("room", [a("n.1", "alice")], True)
            with redis_server.client() as c:
                c.script_flush()
            assert await b.counts("room") == (1, 1)           # NOSCRIPT: loaded again, answered
            assert await b.acquire_user_slots([("u", "k", 1)]) == [True]
            redis_server.kill()
            with pytest.raises(BrokerUnavailable):
                await b.update("room", [a("n.2", "bob")], True)
            with pytest.raises(BrokerUnavailable):
                await b.send_control({"cmd": "x"})
            outcome = await b.acquire_user_slots([("u", "k2", 1)])
            assert isinstance(outcome[0], BrokerUnavailable)
            await b.handler.wait(lambda: b.handler.states[-1:] == [False])
            redis_server.start()                                  # empty: persistence is off
            await b.handler.wait(lambda: b.handler.states[-1:] == [True], timeout=20)
            assert await b.update("room", [a("n.1", "alice")], True) == []   # a heartbeat re-adds it
            assert await b.counts("room") == (1, 1)
            await b.send_control({"cmd": "back"})
            await b.handler.wait(lambda: {"cmd": "back"} in b.handler.control)
    run(main())
