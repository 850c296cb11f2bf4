"""Compress-once fan-out: compressed and uncompressed members in one room (RFC 7692)."""
import asyncio
import zlib

import aiohttp
import msgpack
import orjson
import pytest
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from gateway.broker.memory import MemoryBroker
from gateway.ws.deflate import Deflate, DeflateSettings
from gateway.rooms.hub import Hub
from gateway_ext import FrameParser, encode_frame
from tests.helpers import join_ack, serve, upgrade_request

pytestmark = pytest.mark.timeout(60)

MASK = b"\x11\x22\x33\x44"
DATA = {"text": "the quick brown fox jumps over the lazy dog " * 20, "user": "alice", "n": list(range(20))}


async def raw_member(port, room, extensions="permessage-deflate"):
    """A raw client that joins `room`; returns (reader, writer, parser) after the join ack."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/ws", extra=f"Sec-WebSocket-Extensions: {extensions}\r\n"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" in head
    writer.write(encode_frame(1, orjson.dumps({"op": "join", "room": room, "id": 1}), mask=MASK))
    parser = FrameParser(1 << 22, require_mask=False, allow_rsv1=True)
    [ack] = await read_frames(reader, parser, 1)
    assert join_ack(orjson.loads(ack[3])) == {"op": "ack", "id": 1}
    return reader, writer, parser


async def read_frames(reader, parser, count):
    frames = []
    while len(frames) < count:
        data = await asyncio.wait_for(reader.read(1 << 16), 10)
        assert data, "closed early"
        frames += parser.feed(data)
    return frames


def message_of(frame):
    opcode, _, rsv1, payload = frame
    if rsv1:  # RFC 7692 section 7.2.2
        payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
    return rsv1, orjson.loads(payload)


def test_one_room_compressed_and_plain_members(run):
    async def main():
        async with serve() as gw:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            small_window = ClientPerMessageDeflateFactory(server_max_window_bits=10, client_max_window_bits=True)
            clients = [
                await websockets.connect(url),                                   # compressed, window 15
                await websockets.connect(url, extensions=[small_window], compression=None),  # window 10
                await websockets.connect(url, compression=None),                 # plain
                await websockets.connect(url, subprotocols=["ws-gateway.msgpack"]),  # msgpack (plain frames)
            ]
            assert "server_max_window_bits=10" in clients[1].response.headers["Sec-WebSocket-Extensions"]
            http = aiohttp.ClientSession()
            clients.append(await http.ws_connect(url))                           # aiohttp, plain
            for i, ws in enumerate(clients):
                doc = {"op": "join", "room": "lobby", "id": i}
                if i == 3:
                    await ws.send(msgpack.packb(doc))
                    assert msgpack.unpackb(await ws.recv())["op"] == "ack"
                elif i == 4:
                    await ws.send_str(orjson.dumps(doc).decode())
                    assert orjson.loads((await ws.receive()).data)["op"] == "ack"
                else:
                    await ws.send(orjson.dumps(doc).decode())
                    assert orjson.loads(await ws.recv())["op"] == "ack"
            raw = await raw_member(gw.port, "lobby")
            before = gw.deflate.compressed_out
            for n in range(5):
                await clients[2].send(orjson.dumps({"op": "publish", "room": "lobby", "data": {**DATA, "seq": n}}).decode())
            expected = [{"op": "message", "room": "lobby", "data": {**DATA, "seq": n}, "seq": n + 1} for n in range(5)]
            for i, ws in enumerate(clients):
                for want in expected:
                    if i == 3:
                        assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10)) == want
                    elif i == 4:
                        assert orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data) == want
                    else:
                        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == want
            got = [message_of(f) for f in await read_frames(raw[0], raw[2], 5)]
            assert got == [(True, want) for want in expected]  # RSV1 on the wire
            # Compress-once: one deflate per publication per window size (15 and 10), not per member.
            assert gw.deflate.compressed_out - before == 5 * 2
            raw[1].close()
            for ws in clients:
                await ws.close()
            await http.close()
    run(main())


def test_excluded_rooms_are_sent_plain(run):
    async def main():
        async with serve(compression_exclude_rooms="bin.*, video") as gw:
            chat = await raw_member(gw.port, "chat")
            binary = await raw_member(gw.port, "bin.frames")
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", compression=None) as pub:
                for room in ("chat", "bin.frames"):
                    await pub.send(orjson.dumps({"op": "publish", "room": room, "data": DATA}).decode())
                [chat_frame] = await read_frames(chat[0], chat[2], 1)
                [bin_frame] = await read_frames(binary[0], binary[2], 1)
            assert message_of(chat_frame)[0] is True
            assert message_of(bin_frame) == (False, {"op": "message", "room": "bin.frames", "data": DATA, "seq": 1})
            chat[1].close()
            binary[1].close()
    run(main())


class FakeMember:
    def __init__(self, key):
        self.msgpack = False
        self.deflate_key = key
        self.got = []

    def deliver(self, room, frames, batch):
        self.got.append(batch)


def test_hub_compresses_once_per_publication_and_cleans_up():
    async def main():
        deflate = Deflate(DeflateSettings(min_bytes=0))
        hub = Hub(MemoryBroker(), deflate=deflate)
        await hub.start()
        members = [FakeMember(15) for _ in range(500)] + [FakeMember(9) for _ in range(3)] + [FakeMember(None)]
        for m in members:
            await hub.join(m, "r")
        assert len(hub.rooms["r"]) == 504
        await hub.publish("r", orjson.dumps(DATA))
        for _ in range(100):
            if members[0].got:
                break
            await asyncio.sleep(0.01)
        assert deflate.compressed_out == 2                  # windows 15 and 9
        assert members[0].got[0] is members[499].got[0]     # the same bytes object for the group
        assert members[-1].got[0][0] == 0x81                # the plain member: FIN + text, no RSV1
        assert members[0].got[0][0] == 0xC1                # FIN + RSV1 + text (RFC 7692 section 6)
        for m in members:
            hub.leave_all(m)
        assert not hub.rooms
        await hub.close()
    asyncio.run(main())
