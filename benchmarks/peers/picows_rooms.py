"""picows rooms server: the reference peer for the load tool's `fanout` mode.

Implements ws-gateway's `/ws` JSON protocol (gateway/rooms/commands.py) on any path, the way one
writes it idiomatically with picows: join / leave / publish with optional "id" -> ack /
error, per-room `seq`, and a publication sent to every member of the room, the sender
included. The message payload is serialised once per publication (orjson, by splicing the
publisher's re-serialised data, as the gateway does) and then `transport.send()` is
called once per member -- picows frames it into its write buffer and writes it to the
socket: one send (and one syscall) per delivery, no cross-publication batching. That is
the baseline ws-gateway's encode-once, corked-per-pass fan-out is compared against.

Standalone script: imports only picows, orjson and uvloop, never `gateway`.
    python benchmarks/peers/picows_rooms.py --port 9001 [--host 127.0.0.1]
"""
import argparse
import asyncio
import os
import signal

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

MAX_ROOM_BYTES = 200


class Hub:
    def __init__(self) -> None:
        self.rooms: dict[str, set] = {}
        self.seq: dict[str, int] = {}

    def publish(self, room: str, data: bytes) -> int:
        seq = self.seq.get(room, 0) + 1
        self.seq[room] = seq
        members = self.rooms.get(room)
        if members:
            payload = b'{"op":"message","room":' + orjson.dumps(room) + b',"data":' + data + b',"seq":%d}' % seq
            for transport in members:
                transport.send(WSMsgType.TEXT, payload)
        return seq


HUB = Hub()


class RoomsListener(WSListener):
    def __init__(self) -> None:
        self.transport = None
        self.joined: set = set()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for room in self.joined:
            members = HUB.rooms.get(room)
            if members is not None:
                members.discard(transport)
                if not members:
                    del HUB.rooms[room]
        self.joined.clear()

    def reply(self, doc: dict) -> None:
        self.transport.send(WSMsgType.TEXT, orjson.dumps(doc))

    def error(self, code: str, message: str, rid) -> None:
        doc = {"op": "error", "code": code, "message": message}
        if rid is not None:
            doc["id"] = rid
        self.reply(doc)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if msg_type != WSMsgType.TEXT:
            return  # pings are auto-ponged by picows; binary is not part of this peer
        try:
            req = orjson.loads(frame.get_payload_as_memoryview())
        except orjson.JSONDecodeError:
            self.error("bad_json", "invalid JSON", None)
            return
        if not isinstance(req, dict):
            self.error("bad_json", "a request must be a JSON object", None)
            return
        rid = req.get("id")
        op = req.get("op")
        room = req.get("room")
        if not isinstance(room, str) or not room or len(room.encode()) > MAX_ROOM_BYTES:
            self.error("bad_request", "\"room\" must be a non-empty string", rid)
            return
        if op == "publish":
            if "data" not in req:
                self.error("bad_request", "publish needs \"data\"", rid)
                return
            seq = HUB.publish(room, orjson.dumps(req["data"]))
            if rid is not None:
                self.reply({"op": "ack", "id": rid, "seq": seq})
        elif op == "join":
            HUB.rooms.setdefault(room, set()).add(transport)
            self.joined.add(room)
            if rid is not None:
                self.reply({"op": "ack", "id": rid})
        elif op == "leave":
            members = HUB.rooms.get(room)
            if room not in self.joined or members is None:
                self.error("not_member", "not a member", rid)
                return
            members.discard(transport)
            self.joined.discard(room)
            if not members:
                del HUB.rooms[room]
            if rid is not None:
                self.reply({"op": "ack", "id": rid})
        else:
            self.error("unknown_op", "unknown op", rid)


def _listener_factory(request: WSUpgradeRequest) -> WSListener:
    return RoomsListener()


async def _serve(host: str, port: int) -> None:
    server = await ws_create_server(
        _listener_factory, host, port, max_frame_size=1 << 20, websocket_handshake_timeout=10
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"picows rooms server on ws://{host}:{port}/ (pid {os.getpid()})", flush=True)
    async with server:
        await stop.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
