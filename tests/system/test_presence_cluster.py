"""Presence, join/leave events and the server API across real gateway processes sharing one
redis-server (started by the test): websockets clients, aiohttp as the backend.

Must show (issue 16): presence consistent across three processes and a SIGKILLed process's
members gone within the TTL; 1,000 clients reconnecting within the debounce emit no
join/leave event; disconnect and unsubscribe reach other processes; a revoked token is
refused at the next handshake on another process; the per-user cap holds across processes.
"""
from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request

import aiohttp
import orjson
import pytest
import websockets

from tests import auth_tokens
from tests.helpers import GatewayProcess
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not __import__("os").path.exists(REDIS_SERVER), reason="needs redis-server")]

KEY = "backend-key-0123456789abcdef"
TTL = 3.0
CONFIG = """
[[rooms.policy]]
pattern = "chat.*"
presence = true
join_leave = true
"""


@pytest.fixture
def cluster(tmp_path):
    """A redis-server and a factory of gateway processes sharing it (stopped at the end)."""
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    procs = []
    with RedisServer() as redis:
        def start(n=3, *extra):
            for _ in range(n):
                proc = GatewayProcess("--config", str(path), "--broker", redis.url, "--presence-ttl", str(TTL),
                                      "--log-level", "warning", "--jwt-secret", auth_tokens.SECRET,
                                      "--rate-limit", "0", *extra, env={"WS_GATEWAY_API_KEYS": KEY})
                procs.append(proc.start())
            return procs[-n:]
        try:
            yield start
        finally:
            for proc in procs:
                if proc.proc.poll() is None:
                    proc.stop()


def token(sub, **claims):
    return auth_tokens.hs256(sub=sub, **claims)


async def connect(proc, sub, **claims):
    return await websockets.connect(proc.url(), additional_headers={"Authorization": f"Bearer {token(sub, **claims)}"},
                                    open_timeout=10, max_queue=None)


async def call(ws, **request):
    await ws.send(orjson.dumps(request).decode())
    while True:
        doc = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        if doc.get("id") == request.get("id") and doc["op"] in ("ack", "error"):
            return doc


async def next_op(ws, op):
    while True:
        doc = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        if doc["op"] == op:
            return doc


async def api(proc, method, body, key=KEY):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{proc.port}/api/{method}", data=orjson.dumps(body),
                                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
            return r.status, orjson.loads(await r.read())


async def users(proc, room):
    status, doc = await api(proc, "presence", {"room": room})
    assert status == 200, doc
    return {m["user"]: m["connections"] for m in doc["members"]}


def metric(proc, name) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def settled(procs):
    """Until no process has a pending leave waiting out the debounce (decided, not checked)."""
    for _ in range(3000):
        if all(metric(p, "ws_gateway_presence_pending_leaves") == 0 for p in procs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("pending leaves never settled")


def test_presence_consistent_across_three_processes_and_sigkill_within_ttl(cluster):
    # process-level: the gateways run uvloop themselves; the test's own loop is asyncio

    async def main():
        a, b, c = cluster(3)
        watcher = await connect(a, "watcher")
        await call(watcher, op="join", room="chat.1", id=1)
        clients = {}
        for proc, subs in ((a, ["ann", "bea"]), (b, ["bea", "cid"]), (c, ["dan", "eve", "eve"])):
            for sub in subs:
                ws = await connect(proc, sub)
                assert (await call(ws, op="join", room="chat.1", id=1))["op"] == "ack"
                clients.setdefault(proc, []).append(ws)
        expected = {"watcher": 1, "ann": 1, "bea": 2, "cid": 1, "dan": 1, "eve": 2}
        # every process answers the same, through the API and through the /ws op
        for _ in range(200):
            if all([await users(p, "chat.1") == expected for p in (a, b, c)]):
                break
            await asyncio.sleep(0.05)
        for proc in (a, b, c):
            assert await users(proc, "chat.1") == expected
            status, stats = await api(proc, "presence_stats", {"room": "chat.1"})
            assert stats["users"] == 6 and stats["connections"] == 8
        via_ws = await call(clients[b][0], op="presence", room="chat.1", id=9)
        assert {m["user"]: m["connections"] for m in via_ws["members"]} == expected
        # the watcher on a heard every user join once, from every process
        joined = set()
        while joined != set(expected):
            diff = await next_op(watcher, "presence_diff")
            joined |= {j["user"] for j in diff["joins"]}
            assert not diff["leaves"]
        # SIGKILL c: dan and eve (only on c) go; the others are on a and b
        killed_at = time.time()
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait()
        left = set()
        while left != {"dan", "eve"}:
            diff = await next_op(watcher, "presence_diff")
            left |= {u["user"] for u in diff["leaves"]}
        # An entry expires one TTL after its process's last heartbeat (which came before the
        # kill), on Redis's clock; a query removes expired entries before answering. So once
        # a TTL has passed since the kill, every process must answer without c's members.
        await asyncio.sleep(max(0.0, killed_at + TTL - time.time()))
        survivors = {"watcher": 1, "ann": 1, "bea": 2, "cid": 1}
        for proc in (a, b):
            assert await users(proc, "chat.1") == survivors
        for ws in (watcher, *clients[a], *clients[b]):
            await ws.close()
    asyncio.run(main())


def test_thousand_clients_reconnecting_emit_no_join_leave(cluster):
    # process-level: the gateways run uvloop themselves; the test's own loop is asyncio

    async def main():
        # The storm must fit in the debounce window: ~1 s on a quiet machine, but up to 7 s was
        # seen while other jobs loaded the 2 cores, so the window is wider than the default 3 s
        # here (the default window itself: tests/unit/test_presence.py and benchmarks/README).
        procs = cluster(3, "--join-leave-debounce", "15")
        watchers = []
        for proc in procs:
            ws = await connect(proc, f"watcher-{proc.port}")
            await call(ws, op="join", room="chat.big", id=1)
            watchers.append(ws)
        join = orjson.dumps({"op": "join", "room": "chat.big", "id": 1}).decode()

        async def one(i, proc):
            ws = await connect(proc, f"user-{i}")
            await ws.send(join)
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 30))["op"] == "ack"
            return ws

        clients = await asyncio.gather(*(one(i, procs[i % 3]) for i in range(1000)))
        for _ in range(600):
            status, stats = await api(procs[0], "presence_stats", {"room": "chat.big"})
            if stats["users"] == 1003:
                break
            await asyncio.sleep(0.1)
        assert stats["users"] == 1003
        await settled(procs)
        for ws in watchers:      # drain the joins seen so far
            while True:
                try:
                    orjson.loads(await asyncio.wait_for(ws.recv(), 1.0))
                except asyncio.TimeoutError:
                    break
        # the storm: every client drops and comes back on ANOTHER process
        started = time.monotonic()
        await asyncio.gather(*(ws.close() for ws in clients))
        clients = await asyncio.gather(*(one(i, procs[(i + 1) % 3]) for i in range(1000)))
        storm = time.monotonic() - started
        print(f"1000 clients closed and reconnected in {storm:.2f} s")
        await settled(procs)
        checks = sum(metric(p, "ws_gateway_presence_leave_checks_total") for p in procs)
        assert checks >= 1000          # every one of the 1000 leaves was decided, then cancelled
        # sentinel: the first diff every watcher sees after the storm is the sentinel's join
        sentinel = await connect(procs[0], "sentinel")
        await call(sentinel, op="join", room="chat.big", id=1)
        for ws in watchers:
            diff = await next_op(ws, "presence_diff")
            assert diff["joins"] == [{"user": "sentinel"}] and diff["leaves"] == [], diff
        status, stats = await api(procs[1], "presence_stats", {"room": "chat.big"})
        assert stats == {"ok": True, "room": "chat.big", "connections": 1004, "users": 1004}
        await asyncio.gather(*(ws.close() for ws in (*clients, *watchers, sentinel)))
    asyncio.run(main())


def test_disconnect_and_unsubscribe_reach_other_processes(cluster):
    # process-level: the gateways run uvloop themselves; the test's own loop is asyncio

    async def main():
        a, b, c = cluster(3)
        on_b = await connect(b, "mallory")
        on_c = await connect(c, "mallory")
        bystander = await connect(c, "trent")
        for ws in (on_b, on_c, bystander):
            await call(ws, op="join", room="chat.u", id=1)
        # unsubscribe mallory from chat.u everywhere (asked of a, where she is not)
        status, doc = await api(a, "unsubscribe", {"user": "mallory", "room": "chat.u", "reason": "muted"})
        assert status == 200 and doc["unsubscribed"] == 2 and doc["nodes"] == 3 and doc["missing"] == []
        for ws in (on_b, on_c):
            assert await next_op(ws, "unsubscribed") == {"op": "unsubscribed", "room": "chat.u", "reason": "muted"}
        # she no longer gets chat.u's messages; trent does
        status, doc = await api(a, "publish", {"room": "chat.u", "data": "after"})
        assert (await next_op(bystander, "message"))["data"] == "after"
        assert (await call(on_b, op="leave", room="chat.u", id=5))["code"] == "not_member"
        # disconnect mallory everywhere, asking her not to reconnect
        status, doc = await api(a, "disconnect", {"user": "mallory", "reconnect": False})
        assert status == 200 and doc["disconnected"] == 2 and doc["code"] == 4006 and doc["nodes"] == 3
        for ws in (on_b, on_c):
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 4006 and ws.close_reason == "disconnected by the server; do not reconnect"
        # one connection by its client id (as presence lists it), with a custom code
        status, doc = await api(a, "presence", {"room": "chat.u", "clients": True})
        [trent] = doc["members"]
        assert trent["user"] == "trent" and len(trent["clients"]) == 1
        status, info = await api(c, "info", {})
        assert info["processes"] == 3 and info["missing"] == [] and info["connections"] == 1
        assert {n["connections"] for n in info["nodes"]} == {0, 1} and all(n["uptime"] > 0 for n in info["nodes"])
        status, doc = await api(a, "disconnect", {"client": trent["clients"][0], "code": 4100, "reason": "bye"})
        assert doc["disconnected"] == 1
        await asyncio.wait_for(bystander.wait_closed(), 10)
        assert (bystander.close_code, bystander.close_reason) == (4100, "bye")
        status, doc = await api(b, "rooms", {})
        assert status == 200 and doc["rooms"] == [] and doc["nodes"] == 3
    asyncio.run(main())


def test_revocation_and_per_user_cap_across_processes(cluster):
    # process-level: the gateways run uvloop themselves; the test's own loop is asyncio

    async def main():
        a, b, c = cluster(3, "--max-connections-per-user", "2")
        # the cap: two connections on two processes, the third (on a third process) is refused
        first = await connect(a, "capped")
        second = await connect(b, "capped")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(c, "capped")
        assert refused.value.response.status_code == 429
        assert b"too many connections for this user" in refused.value.response.body
        other = await connect(c, "uncapped-neighbour")       # other users are not affected
        await first.close()
        for _ in range(200):                                  # the slot is released asynchronously
            try:
                third = await connect(c, "capped")
                break
            except websockets.InvalidStatus:
                await asyncio.sleep(0.05)
        await third.close()
        await second.close()
        await other.close()
        # revoke one token by jti on a: the next handshake with it on b is refused
        stolen = token("victim", jti="t-1")
        ok = await websockets.connect(b.url(), additional_headers={"Authorization": f"Bearer {stolen}"})
        await ok.close()
        status, doc = await api(a, "revoke_token", {"jti": "t-1", "until": time.time() + 600})
        assert status == 200 and doc["ok"]
        for proc in (b, c):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(proc.url(), additional_headers={"Authorization": f"Bearer {stolen}"})
            assert refused.value.response.status_code == 401
            assert b"token revoked" in refused.value.response.body
        fresh = await connect(b, "victim", jti="t-2")        # another token of the user is fine
        # revoke the user: tokens issued before the cutoff are refused, also at refresh
        status, doc = await api(a, "revoke_user", {"user": "victim"})
        assert status == 200
        refresh = await call(fresh, op="refresh", id=1, token=token("victim", ttl=900, iat=int(time.time()) - 5))
        assert refresh["code"] == "unauthorized" and "revoked" in refresh["message"]
        with pytest.raises(websockets.InvalidStatus):
            await connect(c, "victim", iat=int(time.time()) - 5)
        later = await connect(c, "victim", iat=int(time.time()) + 2)   # issued after the cutoff
        await later.close()
        await fresh.close()
        # a process started after the revocation loads it from Redis
        (d,) = cluster(1, "--max-connections-per-user", "2")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(d.url(), additional_headers={"Authorization": f"Bearer {stolen}"})
        assert refused.value.response.status_code == 401
    asyncio.run(main())


def test_drained_process_members_leave_at_once(cluster):
    # process-level: the gateways run uvloop themselves; the test's own loop is asyncio

    async def main():
        a, b = cluster(2, "--join-leave-debounce", "0.5")
        watcher = await connect(a, "watcher")
        await call(watcher, op="join", room="chat.d", id=1)
        leaving = await connect(b, "leaving")
        await call(leaving, op="join", room="chat.d", id=1)
        for _ in range(200):
            if "leaving" in await users(a, "chat.d"):
                break
            await asyncio.sleep(0.05)
        assert b.stop() == 0          # SIGTERM: drain, then exit 0
        # b removed its members before exiting: no TTL to wait for
        assert await users(a, "chat.d") == {"watcher": 1}
        # b could not confirm the pending leave (it is gone); a's cleanup publishes it
        diff = await next_op(watcher, "presence_diff")
        while diff["leaves"] != [{"user": "leaving"}]:
            diff = await next_op(watcher, "presence_diff")
        await watcher.close()
    asyncio.run(main())
