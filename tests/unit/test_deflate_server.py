"""permessage-deflate end to end: websockets, aiohttp and raw clients against /echo."""
import asyncio
import logging
import os
import zlib

import aiohttp
import pytest
import websockets

from gateway import cli
from gateway.errors import ConfigError
from gateway_ext import FrameParser, encode_frame
from tests.helpers import make_config, serve, upgrade_request, ws_url

MASK = b"\x0a\x0b\x0c\x0d"
JSON = b'{"type":"message","room":"lobby","user":"alice","text":"hello everyone, how is it going?"}'


def client_deflate(data: bytes, wbits: int = 15) -> bytes:
    comp = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return (comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def raw_upgrade(port, extensions=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    writer.write(upgrade_request(extra=extra))
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    assert head.startswith("HTTP/1.1 101"), head
    answer = None
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-extensions":
            answer = value.strip()
    return reader, writer, answer


async def read_frames(reader, parser, count):
    frames = []
    while len(frames) < count:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "connection closed early"
        frames += parser.feed(data)
    return frames


def test_websockets_client_negotiates_and_echoes(run):
    async def main():
        async with serve() as gw:
            async with websockets.connect(ws_url(gw), max_size=None) as ws:
                answer = ws.response.headers["Sec-WebSocket-Extensions"]
                assert answer.startswith("permessage-deflate; server_no_context_takeover")
                for msg in ["tiny", JSON.decode() * 20, "é" * 100_000, os.urandom(5000), b"\x00" * 300_000]:
                    await ws.send(msg)
                    assert await ws.recv() == msg
                await ws.send(["frag" * 200, "ment" * 200])
                assert await ws.recv() == "frag" * 200 + "ment" * 200
            assert ws.close_code == 1000
            d = gw.deflate
            assert d.negotiated == 1 and d.compressed_out >= 3 and d.bytes_after < d.bytes_before / 5
    run(main())


def test_aiohttp_client_negotiates_and_echoes(run):
    async def main():
        async with serve() as gw:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url(gw), compress=15) as ws:
                    assert ws.compress  # aiohttp accepted our answer
                    await ws.send_str(JSON.decode() * 30)
                    assert (await ws.receive()).data == JSON.decode() * 30
                    await ws.send_bytes(b"\xff" * 70000)
                    assert (await ws.receive()).data == b"\xff" * 70000
                async with session.ws_connect(ws_url(gw)) as ws:  # no offer: no compression
                    assert not ws.compress
                    await ws.send_str("plain")
                    assert (await ws.receive()).data == "plain"
            assert gw.deflate.negotiated == 1
    run(main())


def test_compression_off_answers_no_extension(run):
    async def main():
        async with serve(compression=False) as gw:
            async with websockets.connect(ws_url(gw)) as ws:
                assert "Sec-WebSocket-Extensions" not in ws.response.headers
                await ws.send(JSON.decode() * 10)
                assert await ws.recv() == JSON.decode() * 10
    run(main())


def test_raw_client_small_server_window(run):
    """server_max_window_bits=8: the answer says 8 and every reply inflates with a 256-byte window."""
    async def main():
        async with serve() as gw:
            reader, writer, answer = await raw_upgrade(gw.port, "permessage-deflate; server_max_window_bits=8")
            assert answer == "permessage-deflate; server_no_context_takeover; server_max_window_bits=8; client_no_context_takeover"
            big = (JSON + os.urandom(40)) * 50
            writer.write(encode_frame(2, client_deflate(big), rsv1=True, mask=MASK) + encode_frame(1, b"hi", mask=MASK))
            parser = FrameParser(1 << 20, require_mask=False, allow_rsv1=True)
            (op1, _, rsv1, p1), (op2, _, rsv2, p2) = await read_frames(reader, parser, 2)
            assert (op1, rsv1, op2, rsv2, p2) == (2, True, 1, False, b"hi")
            assert zlib.decompressobj(-8).decompress(p1 + b"\x00\x00\xff\xff") == big
            writer.close()
    run(main())


def test_invalid_offer_is_declined_and_logged(run, caplog):
    async def main():
        async with serve() as gw:
            reader, writer, answer = await raw_upgrade(gw.port, "permessage-deflate; server_max_window_bits=16")
            assert answer is None  # declined (RFC 7692 section 5), the handshake still succeeds
            writer.write(encode_frame(1, b"works", mask=MASK))
            [(op, _, _, payload)] = await read_frames(reader, FrameParser(1 << 20, require_mask=False), 1)
            assert payload == b"works"
            # RSV1 was not negotiated: a compressed frame is a protocol error.
            writer.write(encode_frame(1, client_deflate(b"x"), rsv1=True, mask=MASK))
            frames = FrameParser(1 << 20, require_mask=False).feed(await asyncio.wait_for(reader.read(), 5))
            assert frames[-1][0] == 8 and int.from_bytes(frames[-1][3][:2], "big") == 1002
            writer.close()
    with caplog.at_level(logging.INFO, logger="gateway.server.connection"):
        run(main())
    assert any("offer declined" in r.getMessage() and "server_max_window_bits" in getattr(r, "reason", "")
               for r in caplog.records)


@pytest.mark.parametrize("payload, code", [
    (client_deflate(b"\x00" * (32 << 20)), 1009),        # zip bomb: 32 MiB of zeros in ~32 KiB
    (b"\xff\xff\xff\xff not deflate", 1002),              # corrupt compressed data
    (client_deflate(b"\xc3\x28 invalid utf-8" * 50), 1007),  # invalid UTF-8 after inflating
])
def test_bad_compressed_messages_close_the_sender_only(run, payload, code):
    async def main():
        async with serve(max_message_bytes=1 << 20) as gw:
            async with websockets.connect(ws_url(gw)) as compressed_bystander, \
                    websockets.connect(ws_url(gw), compression=None) as plain_bystander:
                reader, writer, answer = await raw_upgrade(gw.port, "permessage-deflate")
                assert answer
                writer.write(encode_frame(1, payload, rsv1=True, mask=MASK))
                data = await asyncio.wait_for(reader.read(), 5)  # server half-closes after its close frame
                frames = FrameParser(1 << 20, require_mask=False).feed(data)
                assert frames[-1][0] == 8 and int.from_bytes(frames[-1][3][:2], "big") == code
                writer.close()
                for ws in (compressed_bystander, plain_bystander):
                    await ws.send(JSON.decode() * 10)
                    assert await ws.recv() == JSON.decode() * 10
    run(main())


def test_websockets_zip_bomb_gets_1009(run):
    async def main():
        async with serve(max_message_bytes=100_000) as gw:
            async with websockets.connect(ws_url(gw), max_size=None) as ws:
                await ws.send(b"\x00" * 5_000_000)  # ~5 KiB on the wire
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 1009
    run(main())


def test_client_context_takeover_budget_end_to_end(run):
    async def main():
        async with serve(compression_client_context_takeover=True, compression_max_contexts=1) as gw:
            async with websockets.connect(ws_url(gw)) as first:
                assert "client_no_context_takeover" not in first.response.headers["Sec-WebSocket-Extensions"]
                async with websockets.connect(ws_url(gw)) as second:
                    assert "client_no_context_takeover" in second.response.headers["Sec-WebSocket-Extensions"]
                    for ws in (first, second):
                        for _ in range(3):  # the first client really uses its context
                            await ws.send(JSON.decode() * 5)
                            assert await ws.recv() == JSON.decode() * 5
                assert gw.deflate.live_contexts == 1
            for _ in range(100):
                if gw.deflate.live_contexts == 0:
                    break
                await asyncio.sleep(0.01)
            assert gw.deflate.live_contexts == 0
    run(main())


def test_cli_flags_and_validation():
    args = cli.build_parser().parse_args(
        ["serve", "--no-compression", "--compression-level", "1", "--compression-min-bytes", "0",
         "--compression-exclude-rooms", "bin.*"])
    config = cli.config_from_args(args)
    assert (config.compression, config.compression_level, config.compression_min_bytes,
            config.compression_exclude_rooms) == (False, 1, 0, "bin.*")
    assert cli.config_from_args(cli.build_parser().parse_args(["serve"])).compression is True
    with pytest.raises(ConfigError, match="compression_client_max_window_bits"):
        make_config(compression_client_max_window_bits=8)
    with pytest.raises(ConfigError, match="compression_level"):
        make_config(compression_level=10)
