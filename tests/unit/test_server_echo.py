"""The server end to end on real sockets with independent clients (websockets, aiohttp, raw)."""
import asyncio
import os

import aiohttp
import pytest
import websockets

from gateway_ext import FrameParser, encode_frame
from tests.helpers import raw_request, serve, upgrade_request, ws_url


def test_echo_text_binary_fragmented(run):
    async def main():
        async with serve() as gw:
            async with websockets.connect(ws_url(gw), max_size=None) as ws:
                await ws.send("héllo")
                assert await ws.recv() == "héllo"
                await ws.send(b"\x00\x01\x02")
                assert await ws.recv() == b"\x00\x01\x02"
                await ws.send(["frag", "ment"])
                assert await ws.recv() == "fragment"
                big = os.urandom(300_000)
                await ws.send(big)
                assert await ws.recv() == big
                pong = await ws.ping(b"abc")
                await asyncio.wait_for(pong, 5)
            assert ws.close_code == 1000
    run(main())


def test_aiohttp_client_echo(run):
    async def main():
        async with serve() as gw:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url(gw)) as ws:
                    await ws.send_str("from aiohttp")
                    assert (await ws.receive()).data == "from aiohttp"
                    await ws.send_bytes(b"\xff" * 70000)
                    assert (await ws.receive()).data == b"\xff" * 70000
    run(main())


def test_oversized_message_closes_1009_and_others_unaffected(run):
    async def main():
        async with serve(max_message_bytes=1000) as gw:
            async with websockets.connect(ws_url(gw)) as bystander, websockets.connect(ws_url(gw), max_size=None) as ws:
                await ws.send(b"x" * 1001)
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1009
                await bystander.send("still here")
                assert await bystander.recv() == "still here"
    run(main())


@pytest.mark.parametrize("payload, code", [
    (encode_frame(1, b"\xff\xfe", mask=b"abcd"), 1007),        # invalid UTF-8
    (encode_frame(1, b"unmasked"), 1002),                        # client frames must be masked
    (bytes([0x8F, 0x80, 1, 2, 3, 4]), 1002),                     # reserved opcode
    (b"\x00" * 50, 1002),                                        # garbage: unfinished continuation
])
def test_bad_frames_get_close_code_bystanders_unaffected(run, payload, code):
    async def main():
        async with serve() as gw:
            async with websockets.connect(ws_url(gw)) as bystander:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(upgrade_request())
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                writer.write(payload)
                data = await asyncio.wait_for(reader.read(), 5)  # server half-closes after its close frame
                frames = FrameParser(1 << 20, require_mask=False).feed(data)
                assert frames[-1][0] == 8
                assert int.from_bytes(frames[-1][3][:2], "big") == code
                writer.close()
                await bystander.send("ok?")
                assert await bystander.recv() == "ok?"
    run(main())


def test_truncated_frame_then_eof_does_not_crash(run):
    async def main():
        async with serve() as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(upgrade_request() + encode_frame(2, b"x" * 1000, mask=b"abcd")[:500])
            await reader.readuntil(b"\r\n\r\n")
            writer.close()
            await asyncio.sleep(0.1)
            async with websockets.connect(ws_url(gw)) as ws:
                await ws.send("alive")
                assert await ws.recv() == "alive"
            assert gw.open_connections == 0
    run(main())


@pytest.mark.parametrize("raw, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    (upgrade_request("/nowhere"), b"404"),
    (upgrade_request(version="8"), b"426"),
    (upgrade_request(key="short"), b"400"),
    (b"GET /echo HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
])
def test_bad_handshakes_get_status_and_reason(run, raw, status):
    async def main():
        async with serve() as gw:
            resp = await raw_request(gw.port, raw)
            assert resp.split(b" ")[1] == status, resp[:200]
            body = resp.split(b"\r\n\r\n", 1)[1]
            assert body.strip(), "a reason a person can act on"
            if status == b"426":
                assert b"Sec-WebSocket-Version: 13" in resp
            assert gw.stats.rejected[status.decode()] == 1
    run(main())


def test_slowloris_handshake_timeout(run):
    async def main():
        async with serve(handshake_timeout=0.3) as gw:
            resp = await raw_request(gw.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n", read_timeout=5)
            assert resp.startswith(b"HTTP/1.1 408")
    run(main())


def test_healthz_and_readyz(run):
    async def main():
        async with serve() as gw:
            resp = await raw_request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 200")
            resp = await raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 200")
    run(main())


def test_keepalive_pings_and_closes_dead_peer(run):
    async def main():
        async with serve(ping_interval=0.2, ping_timeout=0.3) as gw:
            # A live client answers pings automatically and stays connected.
            async with websockets.connect(ws_url(gw), ping_interval=None) as live:
                # A dead peer: completes the handshake, then never reads or answers.
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(upgrade_request())
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.5)
                data = await asyncio.wait_for(reader.read(100), 5)
                assert data.startswith(b"\x89\x00"), data  # a ping
                await asyncio.sleep(1.2)
                assert gw.stats.keepalive_timeouts == 1
                await live.send("still alive")
                assert await live.recv() == "still alive"
                writer.close()
    run(main())


def test_server_shutdown_sends_1001(run):
    async def main():
        async with serve() as gw:
            async with websockets.connect(ws_url(gw)) as ws:
                await gw.shutdown(1001, "bye", timeout=2)
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1001
    run(main())


def test_open_hook_failure_after_101_closes_1011_not_http_500(run):
    async def main():
        async with serve() as gw:
            def broken_hook(conn):
                raise RuntimeError("bug in an open hook")
            gw.open_hooks.append(broken_hook)
            async with websockets.connect(ws_url(gw)) as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 1011
            gw.open_hooks.remove(broken_hook)
            async with websockets.connect(ws_url(gw)) as ws:
                await ws.send("fine")
                assert await ws.recv() == "fine"
    run(main())
