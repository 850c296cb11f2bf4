"""The JS SDK (gateway/static/ws-gateway.js) end to end: Node 20 with --experimental-websocket
drives it (tests/sdk/js/driver.mjs) against real gateway processes on free ports, while this
test kills, drains, restarts and freezes them, expires tokens and refuses handshakes.

What must hold, per close code of issue 15: the client reconnects (or stops, for 401/403/4004,
and never tries again), re-joins its rooms, and every subscription sees each seq once, in
order, or a `reset` event where it could not (checked by `exactly_once`). The recovery tests
need history on the server (issue 14); they skip, saying so, while its join ack has no epoch.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.request

import orjson
import pytest
import websockets

from tests import auth_tokens as t
from tests.helpers import ROOT, GatewayProcess, free_port
from tests.redis_server import RedisServer
from tests.requires import binary, requires

NODE = binary("node")
DRIVER = os.path.join(ROOT, "tests", "sdk", "js", "driver.mjs")
pytestmark = [pytest.mark.timeout(120), requires("node")]
needs_redis = requires("redis-server")

# Fast reconnects for tests; the defaults are for production.
FAST = {"backoffInitial": 100, "backoffMax": 1000, "restartSpread": 200, "longBackoff": 600,
        "pingInterval": 0, "commandTimeout": 5000}


class NodeSDK:
    """The driver subprocess: `send` commands, `wait` for events (each event matched once)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.pos = 0
        self.proc = None
        self._changed = asyncio.Event()

    async def start(self) -> "NodeSDK":
        self.proc = await asyncio.create_subprocess_exec(
            NODE, "--experimental-websocket", "--no-warnings", DRIVER, cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.ensure_future(self._read())
        await self.wait("ready")
        return self

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            self.events.append(json.loads(line))
            self._changed.set()

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")

    async def wait(self, ev: str, timeout: float = 30.0, **fields) -> dict:
        """The next not-yet-matched event named `ev` with these fields (from the cursor on)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.pos, len(self.events)):
                e = self.events[i]
                if e.get("ev") == ev and all(e.get(k) == v for k, v in fields.items()):
                    self.pos = i + 1
                    return e
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.returncode is not None:
                stderr = b""
                if self.proc.returncode is not None:
                    stderr = await self.proc.stderr.read()
                recent = [{k: v for k, v in e.items() if k != "data"} for e in self.events[-30:]]
                raise AssertionError(f"no {ev} {fields} within {timeout} s; events: {recent}\n{stderr.decode()[-2000:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def named(self, ev: str, **fields) -> list[dict]:
        return [e for e in self.events if e.get("ev") == ev and all(e.get(k) == v for k, v in fields.items())]

    async def token_loop(self, answer) -> None:
        """Answer every getToken call with answer(call) -> token or Exception."""
        call = 0
        while True:
            await self._wait_any("get_token", call)
            call += 1
            result = answer(call)
            if isinstance(result, Exception):
                self.send(cmd="token", call=call, error=str(result))
            else:
                self.send(cmd="token", call=call, token=result)

    async def _wait_any(self, ev: str, seen: int) -> None:
        while len(self.named(ev)) <= seen:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.send(cmd="exit")
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


def exactly_once(events: list[dict], room: str) -> list[int]:
    """The seqs a subscription delivered; asserts each is pos+1 (or follows a reset)."""
    last = None
    delivered = []
    for e in events:
        if e.get("room") != room:
            continue
        if e["ev"] == "reset":
            last = e.get("seq")
        elif e["ev"] == "joined" and not e.get("recovered"):
            last = e.get("seq") if e.get("epoch") is not None else None
        elif e["ev"] == "message" and e["seq"]:
            assert last is None or e["seq"] == last + 1, f"{room}: seq {e['seq']} after {last} without a reset"
            last = e["seq"]
            delivered.append(e["seq"])
    return delivered


async def publish(port: int, room: str, values, path="/ws") -> list[int]:
    """Publish each value from an independent client (websockets); returns the acked seqs."""
    seqs = []
    async with websockets.connect(f"ws://127.0.0.1:{port}{path}") as ws:
        for i, value in enumerate(values):
            await ws.send(orjson.dumps({"op": "publish", "room": room, "data": value, "id": i}).decode())
            while True:
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if reply.get("id") == i:
                    assert reply["op"] == "ack", reply
                    seqs.append(reply["seq"])
                    break
    return seqs


def run(coro):
    return asyncio.run(coro)


async def connected_client(gw, room="r", options=None, **new) -> NodeSDK:
    sdk = await NodeSDK().start()
    sdk.send(cmd="new", url=gw.url(), options={**FAST, **(options or {})}, **new)
    if room:
        sdk.send(cmd="join", room=room)
    await sdk.wait("connected")
    if room:
        await sdk.wait("joined", room=room)
    return sdk


# -- restarts and drains -------------------------------------------------------------------------

def test_gateway_killed_and_restarted_client_reconnects_and_rejoins():
    async def main():
        gw = GatewayProcess("--log-level", "warning").start()
        sdk = await connected_client(gw)
        try:
            await publish(gw.port, "r", [1, 2, 3])
            for seq in (1, 2, 3):
                await sdk.wait("message", room="r", seq=seq)
            gw.proc.kill()                 # SIGKILL: no close frame, the TCP connection just dies
            gw.proc.wait()
            gone = await sdk.wait("disconnected")
            assert gone["reconnect"] is True and gone["code"] == 1006
            await asyncio.sleep(1.0)       # the client retries against a closed port meanwhile
            gw = GatewayProcess("--log-level", "warning", port=gw.port).start()
            await sdk.wait("connected")
            joined = await sdk.wait("joined", room="r")
            # A new memory broker numbers the room afresh: the client cannot recover and says so.
            assert joined["recovered"] is False
            await sdk.wait("reset", room="r")
            seqs = await publish(gw.port, "r", [4, 5])
            for seq in seqs:
                await sdk.wait("message", room="r", seq=seq)
            assert len(sdk.named("connect")) >= 2
            assert exactly_once(sdk.events, "r")[:3] == [1, 2, 3]
        finally:
            await sdk.close()
            gw.stop()
    run(main())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 1001), (signal.SIGUSR2, 1012)], ids=["drain-1001", "restart-1012"])
def test_drain_and_service_restart_reconnect_soon(sig, code):
    async def main():
        args = ("--log-level", "warning", "--drain-window", "0.2", "--drain-timeout", "5")
        gw = GatewayProcess(*args).start()
        sdk = await connected_client(gw)
        try:
            gw.signal(sig)
            gone = await sdk.wait("disconnected")
            assert (gone["code"], gone["reconnect"]) == (code, True)
            assert gw.proc.wait(timeout=10) == 0
            gw = GatewayProcess(*args, port=gw.port).start()   # the replacement instance
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
            [seq] = await publish(gw.port, "r", ["after"])
            assert (await sdk.wait("message", room="r", seq=seq))["data"] == "after"
        finally:
            await sdk.close()
            gw.stop()
    run(main())


def test_frozen_gateway_liveness_closes_3008_and_reconnects():
    """SIGSTOP: the TCP connection stays up but nothing answers. The application ping goes
    unanswered; after pingInterval + margin the client closes (3008) and keeps retrying
    until the gateway runs again (SIGCONT)."""
    async def main():
        gw = GatewayProcess("--log-level", "warning").start()
        sdk = await connected_client(gw, options={"pingInterval": 400, "livenessMargin": 400,
                                                  "commandTimeout": 1000})
        try:
            await asyncio.sleep(1.0)       # idle but alive: pings are answered with pongs
            assert not sdk.named("disconnected")
            gw.proc.send_signal(signal.SIGSTOP)
            gone = await sdk.wait("disconnected")
            assert (gone["code"], gone["reconnect"]) == (3008, True)
            gw.proc.send_signal(signal.SIGCONT)
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
        finally:
            gw.proc.send_signal(signal.SIGCONT)
            await sdk.close()
            gw.stop()
    run(main())


# -- tokens and refusals -------------------------------------------------------------------------

def jwt_gateway(*args):
    return GatewayProcess("--log-level", "warning", "--jwt-leeway", "0", *args,
                          env={"WS_GATEWAY_JWT_SECRET": t.SECRET})


def test_token_expiry_4001_gets_a_new_token_and_reconnects():
    """The gateway closes with 4001 at exp (the in-band refresh is made to fail here); the
    client asks getToken again and reconnects at once with the new token."""
    async def main():
        gw = jwt_gateway().start()
        sdk = await NodeSDK().start()
        expired = []

        def answer(call):
            if call == 1:
                return t.hs256(sub="u", ttl=2)
            if not sdk.named("disconnected", code=4001):
                return RuntimeError("refresh refused by the test")   # so the server's 4001 comes
            expired.append(call)
            return t.hs256(sub="u", ttl=300)

        tokens = asyncio.ensure_future(sdk.token_loop(answer))
        try:
            sdk.send(cmd="new", url=gw.url(), options=FAST, getToken=True)
            sdk.send(cmd="join", room="r")
            await sdk.wait("joined", room="r")
            gone = await sdk.wait("disconnected", timeout=20)
            assert (gone["code"], gone["reconnect"]) == (4001, True)
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
            assert expired, "the reconnect used a token fetched after the 4001"
            [seq] = await publish_with_token(gw.port, "r", "fresh")
            await sdk.wait("message", room="r", seq=seq)
        finally:
            tokens.cancel()
            await sdk.close()
            gw.stop()
    run(main())


async def publish_with_token(port, room, value):
    seqs = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws?token={t.hs256(sub='pub')}") as ws:
        await ws.send(orjson.dumps({"op": "publish", "room": room, "data": value, "id": 1}).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        seqs.append(reply["seq"])
    return seqs


def test_token_refresh_in_band_keeps_the_connection():
    async def main():
        gw = jwt_gateway().start()
        sdk = await NodeSDK().start()
        tokens = asyncio.ensure_future(sdk.token_loop(lambda call: t.hs256(sub="u", ttl=3)))
        try:
            sdk.send(cmd="new", url=gw.url(), options={**FAST, "refreshMargin": 1500}, getToken=True)
            sdk.send(cmd="join", room="r")
            await sdk.wait("joined", room="r")
            await asyncio.sleep(5)         # past the first token's exp: refreshed in band
            assert len(sdk.named("get_token")) >= 2
            assert not sdk.named("disconnected") and len(sdk.named("connect")) == 1
            [seq] = await publish_with_token(gw.port, "r", "still here")
            await sdk.wait("message", room="r", seq=seq)
        finally:
            tokens.cancel()
            await sdk.close()
            gw.stop()
    run(main())


@pytest.mark.parametrize("case", ["static-401", "get-token-401", "403"])
def test_refused_handshake_stops_and_never_hammers(case):
    async def main():
        gw = jwt_gateway().start()
        sdk = await NodeSDK().start()
        bad = {"static-401": t.hs256(secret=t.OTHER_SECRET), "get-token-401": t.hs256(secret=t.OTHER_SECRET),
               "403": t.hs256(rooms=[], publish=[])}[case]
        tokens = asyncio.ensure_future(sdk.token_loop(lambda call: bad))
        try:
            if case == "static-401":
                sdk.send(cmd="new", url=gw.url(), options={**FAST, "token": bad})
            else:
                sdk.send(cmd="new", url=gw.url(), options=FAST, getToken=True)
            status = 403 if case == "403" else 401
            err = await sdk.wait("error")
            assert err["code"] == ("forbidden" if status == 403 else "unauthorized") and err["status"] == status
            gone = await sdk.wait("disconnected")
            assert (gone["status"], gone["reconnect"]) == (status, False)
            await asyncio.sleep(2.0)       # 20x the backoff bound: a retry would have happened
            assert len(sdk.named("connect")) == 1
            assert len(sdk.named("get_token")) == (1 if case != "static-401" else 0)
        finally:
            tokens.cancel()
            await sdk.close()
            gw.stop()
    run(main())


def test_policy_close_4004_stops():
    """The gateway has no 4004 trigger of its own yet (errors.py reserves it): an independent
    WebSocket server (websockets) closes with it, and counts that the client never returns."""
    async def main():
        accepted = []

        async def handler(ws):
            accepted.append(1)
            await ws.close(4004, "policy")

        port = free_port()
        async with websockets.serve(handler, "127.0.0.1", port):
            sdk = await NodeSDK().start()
            try:
                sdk.send(cmd="new", url=f"ws://127.0.0.1:{port}/ws", options=FAST)
                err = await sdk.wait("error")
                assert err["code"] == "policy"
                gone = await sdk.wait("disconnected")
                assert (gone["code"], gone["reconnect"]) == (4004, False)
                await asyncio.sleep(2.0)
                assert len(accepted) == 1 and len(sdk.named("connect")) == 1
            finally:
                await sdk.close()
    run(main())


# -- abuse closes ----------------------------------------------------------------------------------

def test_rate_limited_4002_backs_off_long_and_reconnects():
    async def main():
        gw = GatewayProcess("--log-level", "warning", "--rate-limit", "2", "--rate-limit-burst", "3").start()
        sdk = await connected_client(gw)
        try:
            for i in range(10):
                sdk.send(cmd="publish", room="r", data=i, tag=str(i))
            gone = await sdk.wait("disconnected")
            assert (gone["code"], gone["reconnect"]) == (4002, True)
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
            settled = [e for e in sdk.named("settle")]
            assert all("seq" in e or e.get("error") in ("disconnected", "rate_limited", "timeout") for e in settled)
        finally:
            await sdk.close()
            gw.stop()
    run(main())


def test_too_many_errors_4003_backs_off_long_and_reconnects():
    async def main():
        gw = GatewayProcess("--log-level", "warning", "--max-consecutive-errors", "3").start()
        sdk = await connected_client(gw)
        try:
            for i in range(3):
                sdk.send(cmd="join", room=f"bad\u0007{i}")   # bad_room: a client error each
            for i in range(3):
                assert (await sdk.wait("left", room=f"bad\u0007{i}"))["reason"] == "bad_room"
            gone = await sdk.wait("disconnected")
            assert (gone["code"], gone["reconnect"]) == (4003, True)
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
        finally:
            await sdk.close()
            gw.stop()
    run(main())


def slow_disconnects(gw) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ws_gateway_backpressure_slow_disconnects_total "):
                return float(line.split()[1])
    raise AssertionError("no slow_disconnects metric")


def test_slow_consumer_4000_reconnects():
    """The Node process is frozen (SIGSTOP: it reads nothing) while a publisher floods its
    room: the socket buffers fill, the gateway's queue for it overflows and it is closed with
    4000. Thawed, the client reads what was buffered, sees 4000 and reconnects."""
    async def main():
        gw = GatewayProcess("--log-level", "warning", "--max-queue-bytes", "65536", "--rate-limit", "0",
                            "--write-buffer-high-bytes", "16384").start()
        sdk = await connected_client(gw)
        try:
            sdk.proc.send_signal(signal.SIGSTOP)
            try:
                async with websockets.connect(gw.url(), max_size=None) as pub:
                    # The kernel's socket buffers may hold tens of MB (tcp_rmem autotuning):
                    # flood until the gateway reports the slow-consumer close.
                    for _ in range(100):
                        for _ in range(200):
                            # Random: Node negotiates permessage-deflate, which shrinks repeats to nothing.
                            blob = base64.b64encode(os.urandom(12000)).decode()
                            await asyncio.wait_for(pub.send(orjson.dumps({"op": "publish", "room": "r", "data": blob}).decode()), 20)
                        if slow_disconnects(gw) > 0:
                            break
                assert slow_disconnects(gw) == 1
            finally:
                sdk.proc.send_signal(signal.SIGCONT)
            gone = await sdk.wait("disconnected", timeout=60)
            assert (gone["code"], gone["reconnect"]) == (4000, True)
            await sdk.wait("connected")
            await sdk.wait("joined", room="r")
            exactly_once(sdk.events, "r")
        finally:
            sdk.proc.send_signal(signal.SIGCONT)
            await sdk.close()
            gw.stop()
    run(main())


# -- recovery (needs the server's history: issue 14) ---------------------------------------------

def skip_without_history(joined: dict) -> None:
    if joined.get("epoch") is None:
        pytest.skip("the running gateway's join ack has no epoch (no history/recovery yet: issue 14)")


@needs_redis
def test_recovery_across_a_gateway_restart_delivers_every_seq_once():
    """Client on gateway A, publisher on gateway B, one Redis. A dies; 20 messages are published
    meanwhile; A comes back: the client re-joins with since and gets exactly the missed range."""
    async def main():
        with RedisServer() as redis_srv:
            args = ("--log-level", "warning", "--broker", redis_srv.url)
            a = GatewayProcess(*args).start()
            b = GatewayProcess(*args).start()
            sdk = await connected_client(a)
            try:
                skip_without_history(sdk.named("joined", room="r")[0])
                await publish(b.port, "r", list(range(5)))
                a.proc.kill()
                a.proc.wait()
                await sdk.wait("disconnected")
                await publish(b.port, "r", list(range(5, 25)))
                a = GatewayProcess(*args, port=a.port).start()
                joined = await sdk.wait("joined", room="r")
                assert joined["recovered"] is True
                await publish(b.port, "r", list(range(25, 30)))
                await sdk.wait("message", room="r", seq=30)
                assert exactly_once(sdk.events, "r") == list(range(1, 31))
                assert not sdk.named("reset")
            finally:
                await sdk.close()
                a.stop()
                b.stop()
    run(main())


def test_join_last_delivers_the_latest_once_then_live_without_a_gap():
    """A `last: true` join takes (epoch, TOP) from its ack (protocol-v2, the coordinator's
    decision). With history the room's latest publication (seq TOP) follows the ack and is
    delivered once; with history off (`--history-size 0`: numbering only) nothing follows, and
    the next live publication, TOP+1, is delivered at once: no recovery join, no reset. (The
    SDK's old start at TOP-1 saw TOP+1 as a gap there, lost it and reported a reset.)"""
    async def case(args, expect_latest: bool) -> None:
        gw = GatewayProcess("--log-level", "warning", *args).start()
        sdk = None
        try:
            top = (await publish(gw.port, "ticker", [{"px": 1}, {"px": 2}, {"px": 3}]))[-1]
            sdk = await connected_client(gw, room=None)
            sdk.send(cmd="join", room="ticker", last=True)
            joined = await sdk.wait("joined", room="ticker")
            skip_without_history(joined)
            assert (joined["seq"], joined["recovered"]) == (top, False)
            if expect_latest:
                latest = await sdk.wait("message", room="ticker")
                assert (latest["seq"], latest["data"]) == (top, {"px": 3})
            [live] = await publish(gw.port, "ticker", [{"px": 4}])
            assert live == top + 1
            got = await sdk.wait("message", room="ticker", seq=live)
            assert got["data"] == {"px": 4}
            sdk.send(cmd="position", room="ticker")
            assert (await sdk.wait("position", room="ticker"))["position"] == {"epoch": joined["epoch"], "seq": live}
            seqs = [e["seq"] for e in sdk.named("message", room="ticker")]
            assert seqs == ([top, live] if expect_latest else [live])
            assert not sdk.named("reset") and len(sdk.named("joined", room="ticker")) == 1
        finally:
            if sdk is not None:
                await sdk.close()
            gw.stop()

    async def main():
        await case((), expect_latest=True)                            # skips without history
        await case(("--history-size", "0"), expect_latest=False)
    run(main())


@needs_redis
def test_redis_restart_without_persistence_announces_a_reset():
    """Redis restarts empty: the room's numbering starts again. The subscription says `reset`
    (the server's reset op with history; without it, the SDK sees the seq go back) and then
    delivers the new numbering in order: nothing is taken for a duplicate and dropped."""
    async def main():
        with RedisServer() as redis_srv:
            gw = GatewayProcess("--log-level", "warning", "--broker", redis_srv.url).start()
            sdk = await connected_client(gw)
            try:
                await publish(gw.port, "r", [1, 2, 3])
                await sdk.wait("message", room="r", seq=3)
                redis_srv.restart()        # numbering restarts (a new epoch, with history)
                for _ in range(200):       # until the gateway numbers through Redis again
                    try:
                        [seq] = await publish(gw.port, "r", ["after"])
                        if seq > 0:
                            break
                    except (AssertionError, OSError, websockets.WebSocketException):
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the gateway never published through the restarted Redis")
                await sdk.wait("reset", room="r")
                await sdk.wait("message", room="r", seq=seq)
                exactly_once(sdk.events, "r")
            finally:
                await sdk.close()
                gw.stop()
    run(main())
