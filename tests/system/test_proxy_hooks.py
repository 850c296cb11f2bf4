"""Proxy hooks end to end: a gateway process asks a real HTTP backend (aiohttp.web, in this
test) to admit handshakes by cookie session, to allow joins and to allow/deny/replace
publications; a stalled backend costs a handshake its timeout, never the other clients.
"""
import asyncio
import json
import time
import urllib.request

import pytest
import websockets
from aiohttp import web

from tests import auth_tokens as t
from tests.helpers import GatewayProcess, free_port
from tests.unit.test_metrics_golden import GOLDEN, scraped_lines

SESSIONS = {"sess-alice": "alice", "sess-bob": "bob", "sess-banned": "mallory"}


class Backend:
    """A cookie-session backend, as a Django or FastAPI app would answer the hooks."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hits = {"connect": 0, "join": 0, "publish": 0, "stall": 0}
        self.seen_headers = []
        self.peers = []              # the gateway's (address, port) per connect call: keep-alive reuses one
        self.runner = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def connect(self, request: web.Request) -> web.Response:
        self.hits["connect"] += 1
        self.seen_headers.append(dict(request.headers))
        self.peers.append(request.transport.get_extra_info("peername"))
        doc = await request.json()
        assert doc["path"] == "/ws" and doc["client"]
        user = SESSIONS.get(request.cookies.get("session", ""))
        if user is None:
            return web.json_response({"reason": "no session: log in first"}, status=401)
        if user == "mallory":
            return web.json_response({"reason": "account suspended"}, status=403)
        return web.json_response({"user": user, "rooms": ["chat.*"], "info": {"name": user.title()}})

    async def join(self, request: web.Request) -> web.Response:
        self.hits["join"] += 1
        doc = await request.json()
        if doc["room"] == "chat.secret" and doc["user"] != "bob":
            return web.json_response({"allow": False, "reason": "members only"})
        return web.json_response({})

    async def publish(self, request: web.Request) -> web.Response:
        self.hits["publish"] += 1
        doc = await request.json()
        text = doc["data"].get("text", "")
        if "spam" in text:
            return web.json_response({"reason": "looks like spam"}, status=403)
        return web.json_response({"data": {"text": text.strip(), "by": doc["user"], "name": doc["info"]["name"]}})

    async def stall(self, request: web.Request) -> web.Response:
        self.hits["stall"] += 1
        await asyncio.sleep(3600)
        return web.json_response({})

    async def __aenter__(self) -> "Backend":
        app = web.Application()
        app.router.add_post("/connect", self.connect)
        app.router.add_post("/join", self.join)
        app.router.add_post("/publish", self.publish)
        app.router.add_post("/stall", self.stall)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


async def refused(url, **kwargs):
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.body.decode()


async def request(ws, doc):
    await ws.send(json.dumps(doc))
    while True:
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if answer.get("id") == doc["id"]:
            return answer


def cookie(value):
    return {"additional_headers": {"Cookie": f"theme=dark; session={value}", "User-Agent": "test-browser/1"}}


def test_cookie_session_backend_admits_refuses_and_moderates():
    async def main():
        async with Backend() as backend:
            gw = GatewayProcess("--connect-proxy-url", backend.url("connect"),
                                "--join-proxy-url", backend.url("join"), "--join-proxy-rooms", "chat.*",
                                "--publish-proxy-url", backend.url("publish"), "--publish-proxy-rooms", "chat.*")
            await asyncio.to_thread(gw.start)
            try:
                url = gw.url("/ws")
                # No session cookie: 401 with the backend's reason; a suspended account: 403.
                assert await refused(url) == (401, "no session: log in first\n")
                assert await refused(url, **cookie("sess-banned")) == (403, "account suspended\n")
                assert await refused(url, **cookie("sess-forged")) == (401, "no session: log in first\n")
                # Cookies authenticate: a page on another site is refused before the backend is
                # asked (RFC 6455 section 10.2); the same origin is fine.
                asked = backend.hits["connect"]
                status, _ = await refused(url, origin=websockets.Origin("https://evil.example"),
                                          **cookie("sess-alice"))
                assert status == 403 and backend.hits["connect"] == asked
                async with websockets.connect(url, origin=websockets.Origin(f"http://127.0.0.1:{gw.port}"),
                                              **cookie("sess-alice")):
                    pass
                async with websockets.connect(url, **cookie("sess-alice")) as alice, \
                        websockets.connect(url, **cookie("sess-bob")) as bob:
                    # The cookie and the chosen headers reached the backend as headers.
                    assert "session=sess-alice" in backend.seen_headers[-2]["Cookie"]
                    assert backend.seen_headers[-2]["User-Agent"] == "test-browser/1"
                    # Permissions came from the backend's answer: rooms chat.* only.
                    assert (await request(alice, {"op": "join", "room": "news", "id": 1}))["code"] == "forbidden"
                    # The join proxy: members only for chat.secret.
                    answer = await request(alice, {"op": "join", "room": "chat.secret", "id": 2})
                    assert answer["code"] == "forbidden" and answer["message"] == "members only"
                    assert (await request(bob, {"op": "join", "room": "chat.secret", "id": 3}))["op"] == "ack"
                    assert (await request(alice, {"op": "join", "room": "chat.1", "id": 4}))["op"] == "ack"
                    assert (await request(bob, {"op": "join", "room": "chat.1", "id": 5}))["op"] == "ack"
                    # The publish proxy denies one publication and rewrites the other.
                    denied = await request(alice, {"op": "publish", "room": "chat.1", "data": {"text": "buy spam"},
                                                   "id": 6})
                    assert denied["code"] == "forbidden" and denied["message"] == "looks like spam"
                    ack = await request(alice, {"op": "publish", "room": "chat.1", "data": {"text": "  hi  "},
                                                "id": 7})
                    assert ack["op"] == "ack"
                    message = json.loads(await asyncio.wait_for(bob.recv(), 10))
                    assert message["op"] == "message" and message["seq"] == ack["seq"]
                    assert message["data"] == {"text": "hi", "by": "alice", "name": "Alice"}
                assert backend.hits["join"] == 4 and backend.hits["publish"] == 2   # `news` never asked
                # One after another, handshakes reuse one keep-alive connection to the backend.
                before = len(backend.peers)
                for _ in range(5):
                    async with websockets.connect(url, **cookie("sess-alice")):
                        pass
                assert len(backend.peers) == before + 5 and len(set(backend.peers[before:])) == 1
            finally:
                gw.stop()

    asyncio.run(main())


def test_stalled_backend_fails_handshakes_within_the_timeout_and_others_are_served():
    async def main():
        async with Backend() as backend:
            gw = GatewayProcess("--connect-proxy-url", backend.url("stall"), "--proxy-timeout", "3",
                                "--proxy-breaker-failures", "2", "--proxy-breaker-reset", "60",
                                "--join-proxy-url", backend.url("stall"), "--join-proxy-rooms", "slow.*",
                                "--jwt-secret", t.SECRET)
            await asyncio.to_thread(gw.start)
            try:
                url = gw.url("/ws")
                started = time.monotonic()
                stalled = [asyncio.create_task(refused(url)) for _ in range(2)]
                # Meanwhile a client with a JWT (no proxy call) connects and works normally.
                async with websockets.connect(url + "?token=" + t.hs256(sub="carol")) as carol:
                    while backend.hits["stall"] < 2:
                        await asyncio.sleep(0.01)   # both handshakes are waiting on the backend now
                    for i in range(20):
                        assert (await request(carol, {"op": "publish", "room": "r", "data": i, "id": i}))["op"] == "ack"
                    assert not any(task.done() for task in stalled), "served while the backend stalls"
                    for status, body in await asyncio.gather(*stalled):
                        assert (status, body) == (503, "authentication backend unavailable; retry later\n")
                    # Bounded by proxy_timeout (3 s); the margin is for a loaded CI machine.
                    assert time.monotonic() - started < 3 + 5
                    # Two failures opened the breaker: the next handshake is refused without a call.
                    assert await refused(url) == (503, "authentication backend unavailable; retry later\n")
                    assert backend.hits["stall"] == 2
                    # A join hook that stalls answers backend_unavailable; carol stays connected.
                    answer = await request(carol, {"op": "join", "room": "slow.1", "id": "j"})
                    assert answer["code"] == "backend_unavailable"
                    assert (await request(carol, {"op": "join", "room": "fast", "id": "k"}))["op"] == "ack"
                # What a hooked gateway exports is the proxy part of the golden list, and says so.
                with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                assert [line for line in scraped_lines(text) if line.startswith("ws_gateway_proxy_")] == \
                    [line for line in GOLDEN if line.startswith("ws_gateway_proxy_")]
                assert 'ws_gateway_proxy_breaker_open{hook="connect"} 1.0' in text
                assert 'ws_gateway_proxy_failures_total{hook="connect",kind="timeout"} 2.0' in text
                assert 'ws_gateway_proxy_failures_total{hook="connect",kind="breaker_open"} 1.0' in text
            finally:
                gw.stop()
            metrics = gw.output()
            assert "circuit breaker open" in metrics

    asyncio.run(main())
