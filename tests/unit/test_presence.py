"""Presence and join/leave events in one process (memory backend): websockets clients on /ws.

The cross-process behaviour (Redis, several gateway processes, SIGKILL) is in
tests/system/test_presence_cluster.py; this file pins the protocol and the semantics.
"""
from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
import websockets

from gateway.app import start_gateway
from gateway.errors import ConfigError
from gateway.config import RoomPolicy, load
from gateway.rooms.presence import PresenceRule, PresenceTracker, rules_from_config
from tests import auth_tokens
from tests.helpers import make_config

pytestmark = pytest.mark.timeout(60)

RULES = [{"pattern": "chat.*", "presence": True, "join_leave": True},
         {"pattern": "stats.*", "presence": True},
         {"pattern": "quiet.*", "presence": False}]


@contextlib.asynccontextmanager
async def gateway(rules=RULES, **overrides):
    config = make_config(**{"join_leave_debounce": 0.2, **overrides})
    gw = await start_gateway(config.replace(room_policies=tuple(RoomPolicy(**rule) for rule in rules)))
    try:
        yield gw
    finally:
        await gw.shutdown(timeout=1.0)


async def client(gw, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", additional_headers=headers, open_timeout=5)


async def call(ws, **request):
    await ws.send(orjson.dumps(request).decode())
    while True:
        doc = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if doc.get("id") == request.get("id") and doc["op"] in ("ack", "error"):
            return doc


async def next_op(ws, op):
    while True:
        doc = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if doc["op"] == op:
            return doc


async def settled(gw):
    """Until every pending leave of the tracker has been checked (published or cancelled)."""
    tracker = gw.presence
    for _ in range(1000):
        if tracker.stats.pending_leaves == 0 and not tracker._ops and not tracker._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("presence did not settle")


def test_presence_lists_users_with_connection_counts_and_pages(run):
    async def main():
        async with gateway(jwt_secret=auth_tokens.SECRET, presence_info_claim="profile",
                           presence_page_size=2) as gw:
            alice = [await client(gw, auth_tokens.hs256(sub="alice", profile={"name": "Alice"})) for _ in range(2)]
            bob = await client(gw, auth_tokens.hs256(sub="bob"))
            carol = await client(gw, auth_tokens.hs256(sub="carol"))
            for ws in (*alice, bob, carol):
                assert (await call(ws, op="join", room="chat.1", id="j"))["op"] == "ack"
            await settled(gw)
            page = await call(bob, op="presence", room="chat.1", id=1)
            assert page["members"] == [{"user": "alice", "connections": 2, "info": {"name": "Alice"}},
                                       {"user": "bob", "connections": 1}]
            assert page["next"] == "bob" and page["room"] == "chat.1"
            rest = await call(bob, op="presence", room="chat.1", id=2, after=page["next"])
            assert rest["members"] == [{"user": "carol", "connections": 1}] and rest["next"] is None
            one = await call(bob, op="presence", room="chat.1", id=3, limit=1)
            assert [m["user"] for m in one["members"]] == ["alice"] and one["next"] == "alice"
            stats = await call(carol, op="presence_stats", room="chat.1", id=4)
            assert stats == {"op": "ack", "id": 4, "room": "chat.1", "connections": 4, "users": 3}
            # one of alice's connections leaves: still present, one connection fewer
            await call(alice[0], op="leave", room="chat.1", id="l")
            await settled(gw)
            stats = await call(carol, op="presence_stats", room="chat.1", id=5)
            assert (stats["connections"], stats["users"]) == (3, 3)
            for ws in (*alice, bob, carol):
                await ws.close()
    run(main())


def test_anonymous_connections_are_listed_by_connection(run):
    async def main():
        async with gateway() as gw:
            a, b = await client(gw), await client(gw)
            for ws in (a, b):
                await call(ws, op="join", room="stats.x", id=1)
            await settled(gw)
            members = (await call(a, op="presence", room="stats.x", id=2))["members"]
            assert len(members) == 2 and all(m["user"] is None and m["connections"] == 1 for m in members)
            assert len({m["client"] for m in members}) == 2
            assert all(m["client"].startswith(gw.presence.backend.node + ".") for m in members)
            await a.close()
            await b.close()
    run(main())


def test_join_leave_events_are_user_level_and_debounced(run):
    async def main():
        async with gateway(jwt_secret=auth_tokens.SECRET) as gw:
            watcher = await client(gw, auth_tokens.hs256(sub="watcher"))
            await call(watcher, op="join", room="chat.r", id=1)
            assert (await next_op(watcher, "presence_diff"))["joins"] == [{"user": "watcher"}]
            dave1 = await client(gw, auth_tokens.hs256(sub="dave"))
            await call(dave1, op="join", room="chat.r", id=1)
            diff = await next_op(watcher, "presence_diff")
            assert diff == {"op": "presence_diff", "room": "chat.r", "joins": [{"user": "dave"}], "leaves": []}
            # a second connection of dave: no event (user level)
            dave2 = await client(gw, auth_tokens.hs256(sub="dave"))
            await call(dave2, op="join", room="chat.r", id=1)
            # dave drops both and comes back within the debounce: nothing at all
            await dave1.close()
            await dave2.close()
            dave3 = await client(gw, auth_tokens.hs256(sub="dave"))
            await call(dave3, op="join", room="chat.r", id=1)
            await settled(gw)
            assert gw.presence.stats.leave_checks >= 1
            # a sentinel: the next diff the watcher sees is erin's join, nothing about dave before it
            erin = await client(gw, auth_tokens.hs256(sub="erin"))
            await call(erin, op="join", room="chat.r", id=1)
            assert (await next_op(watcher, "presence_diff"))["joins"] == [{"user": "erin"}]
            # dave leaves for good: one leave, after the debounce
            await dave3.close()
            diff = await next_op(watcher, "presence_diff")
            assert diff["leaves"] == [{"user": "dave"}] and diff["joins"] == []
            # rooms with presence but without join_leave: no diffs
            await call(watcher, op="join", room="stats.r", id=2)
            await call(erin, op="join", room="stats.r", id=2)
            await call(erin, op="leave", room="chat.r", id=3)
            assert (await next_op(watcher, "presence_diff"))["leaves"] == [{"user": "erin"}]
            await settled(gw)
            for ws in (watcher, erin):
                await ws.close()
    run(main())


def test_mass_join_is_one_diff_frame_per_pass(run):
    async def main():
        async with gateway() as gw:
            watcher = await client(gw)
            await call(watcher, op="join", room="chat.m", id=1)
            await next_op(watcher, "presence_diff")
            sent = gw.presence.stats.diffs_sent
            clients = [await client(gw) for _ in range(50)]
            # all 50 joins in one write each, sent without waiting: they land in few passes
            await asyncio.gather(*(ws.send(orjson.dumps({"op": "join", "room": "chat.m"}).decode()) for ws in clients))
            seen = 0
            frames = 0
            while seen < 50:
                diff = await next_op(watcher, "presence_diff")
                frames += 1
                seen += len(diff["joins"])
            assert seen == 50
            assert gw.presence.stats.diffs_sent - sent == frames < 50
            for ws in (watcher, *clients):
                await ws.close()
    run(main())


def test_presence_errors(run):
    async def main():
        async with gateway(jwt_secret=auth_tokens.SECRET) as gw:
            ws = await client(gw, auth_tokens.hs256(sub="u", rooms=["chat.*", "stats.*"], presence=["stats.*"]))
            assert (await call(ws, op="presence", room="other", id=1))["code"] == "presence_disabled"
            assert (await call(ws, op="presence", room="quiet.1", id=2))["code"] == "presence_disabled"
            # the presence claim narrows it: chat.* may be joined but its presence is not shown
            assert (await call(ws, op="presence", room="chat.1", id=3))["code"] == "forbidden"
            assert (await call(ws, op="presence_stats", room="stats.1", id=4))["users"] == 0
            assert (await call(ws, op="presence", room="stats.1", id=5, limit=-1))["code"] == "bad_request"
            assert (await call(ws, op="presence", room="stats.1", id=6, after=3))["code"] == "bad_request"
            assert (await call(ws, op="presence", id=7))["code"] == "bad_request"
            # without a presence claim the join patterns decide
            other = await client(gw, auth_tokens.hs256(sub="v", rooms=["chat.*"]))
            assert (await call(other, op="presence", room="chat.1", id=1))["members"] == []
            assert (await call(other, op="presence", room="stats.1", id=2))["code"] == "forbidden"
            await ws.close()
            await other.close()
    run(main())


def test_no_rules_no_tracker_on_the_join_path(run):
    async def main():
        async with gateway(rules=[]) as gw:
            assert gw.endpoints["/ws"].presence is None
            ws = await client(gw)
            await call(ws, op="join", room="chat.1", id=1)
            assert (await call(ws, op="presence", room="chat.1", id=2))["code"] == "presence_disabled"
            assert gw.presence.local == {} and gw.presence.stats.updates == 0
            await ws.close()
    run(main())


def test_rule_matching_and_config_checks(tmp_path):
    tracker = PresenceTracker(None, None, [PresenceRule("a.*", presence=True), PresenceRule("*", join_leave=True),
                                           PresenceRule("never")])
    assert tracker.rule_for("a.1").presence and not tracker.rule_for("a.1").join_leave
    assert tracker.rule_for("b").join_leave
    # presence and join_leave are settings of the typed [[rooms.policy]] rules; the first
    # matching rule decides, so a slow-consumer rule listed first turns presence off for its rooms
    path = tmp_path / "g.toml"
    path.write_text('[[rooms.policy]]\npattern = "chat.ticker"\npolicy = "latest"\n'
                    '[[rooms.policy]]\npattern = "chat.*"\npresence = true\njoin_leave = true\n')
    config = load(str(path), env={})
    tracker = PresenceTracker(None, None, rules_from_config(config))
    assert tracker.rule_for("chat.ticker") is None
    assert tracker.rule_for("chat.1").join_leave and tracker.rule_for("chat.1").presence
    assert config.room_policies[0].presence is None
    path.write_text('[[rooms.policy]]\npattern = "chat.*"\njoin_leave = 1\n')
    with pytest.raises(ConfigError) as info:
        load(str(path), env={})
    assert "g.toml:3: rooms.policy[0].join_leave: expected a boolean" in "\n".join(info.value.errors)


def test_diffs_reach_msgpack_and_compressed_members(run):
    import msgpack
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    async def main():
        async with gateway() as gw:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            mp = await websockets.connect(url, subprotocols=["ws-gateway.msgpack"], open_timeout=5)
            z = await websockets.connect(url, extensions=[ClientPerMessageDeflateFactory()], compression=None,
                                         open_timeout=5)
            assert z.protocol.extensions, "permessage-deflate was negotiated"
            await mp.send(msgpack.packb({"op": "join", "room": "chat.z", "id": 1}))
            ack = msgpack.unpackb(await asyncio.wait_for(mp.recv(), 10))
            assert (ack["op"], ack["id"]) == ("ack", 1)
            await call(z, op="join", room="chat.z", id=1)
            plain = await client(gw)
            await call(plain, op="join", room="chat.z", id=1)
            # each sees the joins made since it joined, in its own encoding: mp all three, z two
            seen_mp, seen_z = set(), set()
            while len(seen_mp) < 3:
                doc = msgpack.unpackb(await asyncio.wait_for(mp.recv(), 10))
                if doc["op"] == "presence_diff":
                    seen_mp |= {j["client"] for j in doc["joins"]}
            while len(seen_z) < 2:
                doc = await next_op(z, "presence_diff")
                seen_z |= {j["client"] for j in doc["joins"]}
            assert len(seen_mp) == 3 and seen_z < seen_mp
            for ws in (mp, z, plain):
                await ws.close()
    run(main())
