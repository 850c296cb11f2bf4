"""The Redis outbox and tracking scripts (gateway/broker/redis_events.py, events.lua) against a
real redis-server: first-in/last-out across "processes", the debounce, the TTL cleanup run by
two survivors at once, and a dead consumer's entries claimed by another."""
import asyncio

from gateway.broker.redis_events import RedisEvents
from tests.redis_server import redis_server  # noqa: F401  (fixture)


async def drain(events: RedisEvents) -> list:
    out = []
    while True:
        got = await events.read(100, 0.05)
        if not got:
            return out
        await events.ack([entry_id for entry_id, _ in got])
        out += [(f["t"], f["s"]) for _, f in got]


def test_cluster_wide_transitions_decided_once(redis_server):  # noqa: F811
    async def main():
        a, b, c = (RedisEvents(redis_server.url, node=n, timeout=2) for n in "abc")
        for ev in (a, b, c):
            await ev.start(ttl=1.5, debounce=0.2)   # members expire 1 s after their last refresh
        try:
            await asyncio.gather(a.update("user", [("a", "u")]), b.update("user", [("a", "u")]))
            assert await drain(a) == [("user_online", "u")]               # two holders, one online
            assert await a.update("user", [("r", "u")]) == []             # b still holds u
            pending = await b.update("user", [("r", "u")])
            assert [s for s, _ in pending] == ["u"]
            await a.update("user", [("a", "u")])                          # back within the debounce
            await b.confirm("user", pending)                              # ... so nothing is said
            assert await drain(a) == []
            # c holds room r and "dies" (stops refreshing); a and b both clean up at once.
            await c.update("room", [("a", "r")])
            assert await drain(a) == [("room_occupied", "r")]
            await asyncio.sleep(1.2)
            await asyncio.gather(a.update("room", [], cleanup=True), b.update("room", [], cleanup=True))
            assert await drain(a) == [("room_vacated", "r")]              # once, not twice
            # a keeps refreshing u: the cleanup leaves it alone.
            await a.update("user", [("a", "u")], cleanup=True)
            assert await drain(b) == []
        finally:
            for ev in (a, b, c):
                await ev.close()

    asyncio.run(main())


def test_a_dead_consumers_entries_are_claimed_and_ids_are_stable(redis_server):  # noqa: F811
    async def main():
        a, b = RedisEvents(redis_server.url, node="a"), RedisEvents(redis_server.url, node="b")
        for ev in (a, b):
            await ev.start(ttl=30, debounce=1)
        try:
            await a.update("user", [("a", "x"), ("a", "y")])
            read = await a.read(10, 0.1)                    # a reads them, then dies without acking
            assert [f["s"] for _, f in read] == ["x", "y"]
            assert await b.read(10, 0.1) == []              # not new any more
            assert await b.claim(5.0, 10) == []             # not idle long enough
            await asyncio.sleep(0.3)
            claimed = await b.claim(0.2, 10)
            assert claimed == read                          # same entry ids, same fields: same event ids
            await b.ack([entry_id for entry_id, _ in claimed])
            assert await b.pending_count() == 0
            # A live consumer retrying keeps its entries: touch resets their idle time.
            await a.update("user", [("a", "z")])
            mine = await a.read(10, 0.1)
            await asyncio.sleep(0.3)
            await a.touch([entry_id for entry_id, _ in mine])
            assert await b.claim(0.2, 10) == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_touch_after_the_outbox_vanished_is_not_an_error(redis_server):  # noqa: F811
    async def main():
        a = RedisEvents(redis_server.url, node="a")
        await a.start(ttl=30, debounce=1)
        try:
            await a.update("user", [("a", "x")])
            read = await a.read(10, 0.1)
            await asyncio.to_thread(redis_server.restart)      # empty: the stream and its group are gone
            await a.touch([entry_id for entry_id, _ in read])  # no error: the holder still delivers them
            await a.ack([entry_id for entry_id, _ in read])
            await a.update("user", [("a", "y")])
            assert [f["s"] for _, f in await a.read(10, 0.1)] == ["y"]   # the group is back
        finally:
            await a.close()

    asyncio.run(main())
