"""Webhooks in one process (memory broker): signing, debounce semantics, delivery with retries."""
import asyncio
import hashlib
import hmac
import json

import websockets
from aiohttp import web

from gateway.api.webhooks import SIGNATURE_HEADER, sign, verify
from gateway.broker.events import MemoryEvents
from tests import auth_tokens as t
from tests.helpers import free_port, serve

SECRET = b"unit-test-webhook-secret-0123"


def test_signature_is_stripe_style_and_verify_rejects_tampering_and_replays():
    body = b'{"events":[]}'
    header = sign(SECRET, body, 1700000000)
    mac = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert verify(SECRET, body, header, now=1700000100)
    assert not verify(SECRET, body + b" ", header, now=1700000100)          # body changed
    assert not verify(b"other-secret-000000000000", body, header, now=1700000100)
    assert not verify(SECRET, body, header, now=1700000000 + 301)           # replayed later
    assert not verify(SECRET, body, "v1=" + mac, now=1700000000)            # no timestamp


def test_memory_events_debounce_first_in_last_out():
    async def main():
        events = MemoryEvents("n1")
        assert await events.update("user", [("a", "alice"), ("a", "alice")]) == []
        pending = await events.update("user", [("r", "alice")])
        assert pending == []                                     # one holder left
        pending = await events.update("user", [("r", "alice")])
        assert [s for s, _ in pending] == ["alice"]
        await events.update("user", [("a", "alice")])            # back within the debounce
        await events.confirm("user", pending)                    # ... so the offline is cancelled
        pending = await events.update("user", [("r", "alice")])
        await events.confirm("user", pending)
        got = await events.read(10, 0.1)
        assert [(f["t"], f["s"]) for _, f in got] == [("user_online", "alice"), ("user_offline", "alice")]
        assert len({entry_id for entry_id, _ in got}) == 2
        assert await events.pending_count() == 2
        await events.ack([entry_id for entry_id, _ in got])
        assert await events.pending_count() == 0

    asyncio.run(main())


def test_memory_broker_delivers_after_failures_with_retries(run):
    async def main():
        calls = []
        got = []

        async def hook(request):
            body = await request.read()
            calls.append(verify(SECRET, body, request.headers[SIGNATURE_HEADER]))
            if len(calls) <= 2:
                return web.Response(status=503)                  # down twice, then up
            got.extend(json.loads(body)["events"])
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/h", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with serve(webhook_url=f"http://127.0.0.1:{port}/h", webhook_secret=SECRET.decode(),
                             webhook_debounce=0.05, webhook_retry_min=0.05, webhook_retry_max=0.1,
                             jwt_secret=t.SECRET, webhook_publish_rooms=("chat.*",),
                             webhook_events=("room_occupied", "room_vacated", "user_online", "user_offline",
                                             "client_published")) as gw:
                async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={t.hs256(sub='alice')}") as ws:
                    for doc in ({"op": "join", "room": "chat.1", "id": 1},
                                {"op": "publish", "room": "chat.1", "data": {"a": 1}, "id": 2},
                                {"op": "publish", "room": "other", "data": 2, "id": 3}):
                        await ws.send(json.dumps(doc))
                        while json.loads(await ws.recv()).get("id") != doc["id"]:
                            pass
                while len(got) < 5:
                    await asyncio.sleep(0.02)
                stats = gw.webhooks.stats
                assert stats.failed == {"status": 2} and stats.retried >= 2 and stats.sent == 5
        finally:
            await runner.cleanup()
        assert all(calls)
        assert [(e["type"], e["user"], e["room"]) for e in got] == [
            ("user_online", "alice", None), ("room_occupied", None, "chat.1"),
            ("client_published", "alice", "chat.1"), ("user_offline", "alice", None),
            ("room_vacated", None, "chat.1")]
        assert got[2]["data"] == {"a": 1} and len({e["id"] for e in got}) == 5

    run(main())


def test_only_the_configured_types_are_sent():
    async def main():
        got = []

        async def hook(request):
            got.extend(json.loads(await request.read())["events"])
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/h", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with serve(webhook_url=f"http://127.0.0.1:{port}/h", webhook_secret=SECRET.decode(),
                             webhook_debounce=0.01, jwt_secret=t.SECRET, webhook_events=("user_offline",)) as gw:
                for user in ("a", "b"):
                    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={t.hs256(sub=user)}"):
                        pass
                while len(got) < 2:
                    await asyncio.sleep(0.02)
                while await gw.webhooks.backend.pending_count():
                    await asyncio.sleep(0.02)      # the online events were acknowledged unsent
        finally:
            await runner.cleanup()
        assert [(e["type"], e["user"]) for e in got] == [("user_offline", "a"), ("user_offline", "b")]

    asyncio.run(main())


class _AckFailsOnce(MemoryEvents):
    """The outbox goes away between a 2xx and its acknowledgement, once."""

    def __init__(self):
        super().__init__("n")
        self.acks = 0

    async def ack(self, ids):
        self.acks += 1
        if self.acks == 1:
            from gateway.broker.events import EventsUnavailable
            raise EventsUnavailable("redis down")
        await super().ack(ids)


def test_a_delivered_batch_whose_ack_failed_is_acknowledged_not_sent_again():
    from gateway.api.webhooks import Deliverer, WebhookStats
    from tests.helpers import make_config

    async def main():
        posts = []

        async def hook(request):
            posts.append(json.loads(await request.read()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/h", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        backend = _AckFailsOnce()
        config = make_config(webhook_url=f"http://127.0.0.1:{port}/h", webhook_secret=SECRET.decode(),
                             webhook_retry_min=0.01, webhook_retry_max=0.05)
        deliverer = Deliverer(backend, config, WebhookStats())
        try:
            await backend.update("user", [("a", "alice")])
            deliverer.start(asyncio.get_running_loop())
            while backend.acks < 2:
                await asyncio.sleep(0.01)
        finally:
            await deliverer.close()
            await runner.cleanup()
        assert len(posts) == 1 and await backend.pending_count() == 0

    asyncio.run(main())
