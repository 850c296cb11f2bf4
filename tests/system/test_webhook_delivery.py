"""Webhooks end to end: gateway processes on one real redis-server, and a real HTTP receiver
(aiohttp.web) that verifies every signature the way docs/backend.md tells a backend to.

- the receiver is down for 20 s, then back: every event arrives at least once, distinct
  events have distinct ids, every signature is valid, the failures and retries are counted;
- a SIGKILLed process's users go offline (and its room is vacated) within webhook_ttl,
  decided by a surviving process, once; a user still connected elsewhere stays online.
"""
import asyncio
import json
import signal
import time
import urllib.request

import pytest
import websockets
from aiohttp import web

from gateway.api.webhooks import SIGNATURE_HEADER, verify
from tests import auth_tokens as t
from tests.helpers import GatewayProcess, free_port
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.unit.test_metrics_golden import GOLDEN, scraped_lines

pytestmark = pytest.mark.timeout(180)

SECRET = "webhook-secret-for-tests-0123456789"


class Receiver:
    """The backend's webhook endpoint: verifies, records, can be taken down and brought back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.events = []             # (arrival monotonic time, event) for every delivery, duplicates included
        self.bad_signatures = 0
        self.batches = 0
        self.runner = None
        self.arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET.encode(), body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        self.batches += 1
        now = time.monotonic()
        for event in json.loads(body)["events"]:
            self.events.append((now, event))
        self.arrived.set()
        return web.Response(text="ok")

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def down(self) -> None:
        await self.runner.cleanup()

    def seen(self) -> set:
        return {(e["type"], e["user"] or e["room"]) for _, e in self.events}

    async def wait_for(self, wanted: set, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not wanted <= self.seen():
            if time.monotonic() > deadline:
                raise AssertionError(f"missing events: {sorted(wanted - self.seen())}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


def gateway(redis, receiver, *extra):
    return GatewayProcess("--broker", redis.url, "--jwt-secret", t.SECRET, "--webhook-url", receiver.url,
                          "--webhook-secret", SECRET, "--webhook-retry-min", "0.2", "--webhook-retry-max", "1",
                          "--webhook-debounce", "0.5", "--webhook-timeout", "2", *extra)


async def visit(gw, user, room):
    """A user connects, joins a room, publishes once and leaves."""
    async with websockets.connect(gw.url("/ws") + "?token=" + t.hs256(sub=user)) as ws:
        await ws.send(json.dumps({"op": "join", "room": room, "id": 1}))
        assert json.loads(await ws.recv())["op"] == "ack"
        await ws.send(json.dumps({"op": "publish", "room": room, "data": {"hi": user}, "id": 2}))
        while json.loads(await ws.recv()).get("id") != 2:
            pass


def expected_for(i):
    return {("user_online", f"u{i}"), ("user_offline", f"u{i}"), ("room_occupied", f"room.{i}"),
            ("room_vacated", f"room.{i}")}


def scrape(gw) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5) as r:
        return r.read().decode()


def total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_receiver_down_20s_every_event_delivered_at_least_once_signed_with_unique_ids(redis_server):  # noqa: F811
    async def main():
        receiver = Receiver()
        await receiver.up()
        gws = [gateway(redis_server, receiver), gateway(redis_server, receiver)]
        for gw in gws:
            await asyncio.to_thread(gw.start)
        try:
            wanted = set()
            # While the receiver is up.
            for i in range(4):
                await visit(gws[i % 2], f"u{i}", f"room.{i}")
                wanted |= expected_for(i)
            await receiver.wait_for(wanted, 30)
            # Down for 20 s, while users come and go on both processes.
            await receiver.down()
            went_down = time.monotonic()
            i = 4
            while time.monotonic() - went_down < 20:
                await visit(gws[i % 2], f"u{i}", f"room.{i}")
                wanted |= expected_for(i)
                i += 1
                await asyncio.sleep(0.5)
            await asyncio.sleep(max(0.0, 20 - (time.monotonic() - went_down)))
            await receiver.up()
            await receiver.wait_for(wanted, 60)
            assert i > 10
            # Every event at least once; distinct events have distinct ids, and one id always
            # names the same event (a redelivery), so a backend can deduplicate by id.
            by_id = {}
            for _, event in receiver.events:
                key = (event["type"], event["user"] or event["room"], event["ts"])
                assert by_id.setdefault(event["id"], key) == key
            assert {(k[0], k[1]) for k in by_id.values()} == wanted
            assert len(by_id) == len(wanted)            # each transition emitted exactly once
            assert receiver.bad_signatures == 0
            texts = [scrape(gw) for gw in gws]
            assert sum(total(x, "ws_gateway_webhook_failed_total") for x in texts) > 0
            assert sum(total(x, "ws_gateway_webhook_retried_total") for x in texts) > 0
            assert sum(total(x, "ws_gateway_webhook_sent_total") for x in texts) >= len(wanted)
            assert sum(total(x, "ws_gateway_webhook_delivery_lag_seconds_count") for x in texts) >= len(wanted)
            # The webhook lines of the golden list are what a hooked gateway exports.
            webhook_golden = [line for line in GOLDEN if line.startswith("ws_gateway_webhook_")]
            assert [line for line in scraped_lines(texts[0]) if line.startswith("ws_gateway_webhook_")] == \
                webhook_golden
        finally:
            for gw in gws:
                gw.stop()
            await receiver.down()

    asyncio.run(main())


def test_sigkill_users_go_offline_within_the_ttl_once(redis_server):  # noqa: F811
    ttl = 6.0

    async def main():
        receiver = Receiver()
        await receiver.up()
        survivor = gateway(redis_server, receiver, "--webhook-ttl", str(ttl))
        victim = gateway(redis_server, receiver, "--webhook-ttl", str(ttl))
        for gw in (survivor, victim):
            await asyncio.to_thread(gw.start)
        clients = []
        try:
            for user in ("k1", "k2", "k3", "both"):
                ws = await websockets.connect(victim.url("/ws") + "?token=" + t.hs256(sub=user))
                await ws.send(json.dumps({"op": "join", "room": "kroom", "id": 1}))
                assert json.loads(await ws.recv())["op"] == "ack"
                clients.append(ws)
            other = await websockets.connect(survivor.url("/ws") + "?token=" + t.hs256(sub="both"))
            await receiver.wait_for({("user_online", u) for u in ("k1", "k2", "k3", "both")}
                                    | {("room_occupied", "kroom")}, 30)
            killed = time.monotonic()
            victim.signal(signal.SIGKILL)
            await asyncio.to_thread(victim.proc.wait)
            gone = {("user_offline", u) for u in ("k1", "k2", "k3")} | {("room_vacated", "kroom")}
            await receiver.wait_for(gone, 4 * ttl)
            delays = [arrived - killed for arrived, event in receiver.events
                      if (event["type"], event["user"] or event["room"]) in gone]
            print(f"offline/vacated {min(delays):.2f}-{max(delays):.2f} s after the SIGKILL (ttl {ttl} s)")
            # Within the TTL (+1 s for delivery on a loaded machine).
            assert max(delays) <= ttl + 1.0, delays
            # One more heartbeat round: "both" is still connected on the survivor.
            await asyncio.sleep(ttl / 2)
            types = [(e["type"], e["user"] or e["room"]) for _, e in receiver.events]
            assert ("user_offline", "both") not in types
            for item in gone:
                assert types.count(item) == 1          # decided once, by one process
            await other.close()
            await receiver.wait_for({("user_offline", "both")}, 30)
        finally:
            for ws in clients:
                ws.transport.abort()
            survivor.stop()
            victim.stop()
            await receiver.down()

    asyncio.run(main())


def test_redis_down_then_back_transitions_meanwhile_are_reported_in_order(redis_server):  # noqa: F811
    async def main():
        receiver = Receiver()
        await receiver.up()
        gw = gateway(redis_server, receiver, "--webhook-ttl", "3", "--redis-timeout", "1")
        await asyncio.to_thread(gw.start)
        try:
            stays = await websockets.connect(gw.url("/ws") + "?token=" + t.hs256(sub="stays"))
            await receiver.wait_for({("user_online", "stays")}, 30)
            await asyncio.to_thread(redis_server.kill)
            # While Redis is down: a user comes and goes; the gateway keeps serving.
            async with websockets.connect(gw.url("/ws") + "?token=" + t.hs256(sub="brief")) as ws:
                await ws.send(json.dumps({"op": "publish", "room": "r", "data": 1, "id": 1}))
                await asyncio.wait_for(ws.recv(), 10)
            await asyncio.sleep(2)                          # a few failed attempts
            await asyncio.to_thread(redis_server.restart)   # empty: no persistence
            await receiver.wait_for({("user_online", "brief"), ("user_offline", "brief")}, 60)
            order = [e["type"] for _, e in receiver.events if e["user"] == "brief"]
            assert order.index("user_online") < order.index("user_offline")
            assert ("user_offline", "stays") not in {(e["type"], e["user"]) for _, e in receiver.events}
            await stays.close()
            await receiver.wait_for({("user_offline", "stays")}, 30)
            assert "webhook_error" in gw.output()
        finally:
            gw.stop()
            await receiver.down()

    asyncio.run(main())
