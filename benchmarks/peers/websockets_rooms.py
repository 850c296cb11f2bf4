"""websockets rooms server: a peer for the load tool's fanout / idle / churn modes and scale_19k.

Implements ws-gateway's `/ws` JSON protocol (gateway/rooms/commands.py) on any path, the way one
writes it idiomatically with websockets (asyncio implementation): one handler coroutine
per connection reading requests; join / leave / publish with optional "id" -> ack / error;
per-room `seq`; a publication serialised once (orjson, splicing the publisher's data, as
the gateway does) and handed to `websockets.broadcast()`, which writes the same frame to
every member without awaiting. Keepalive is websockets' own (ping every 20 s, its
default), so idle connections are weighed with keepalive on, as the gateway's are.

Standalone script: imports only websockets, orjson and uvloop, never `gateway`.
    python benchmarks/peers/websockets_rooms.py --port 9003 [--host 127.0.0.1]
"""
import argparse
import asyncio
import os
import signal

import orjson
import uvloop
from websockets import broadcast
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

MAX_ROOM_BYTES = 200
ROOMS: dict[str, set] = {}
SEQ: dict[str, int] = {}


def _error(code: str, message: str, rid) -> str:
    doc = {"op": "error", "code": code, "message": message}
    if rid is not None:
        doc["id"] = rid
    return orjson.dumps(doc).decode()


def _publish(room: str, data) -> int:
    seq = SEQ.get(room, 0) + 1
    SEQ[room] = seq
    members = ROOMS.get(room)
    if members:
        payload = b'{"op":"message","room":' + orjson.dumps(room) + b',"data":' + orjson.dumps(data) + b',"seq":%d}' % seq
        broadcast(members, payload.decode())
    return seq


async def _handler(ws) -> None:
    joined: set = set()
    try:
        async for message in ws:
            if not isinstance(message, str):
                continue   # binary is not part of this peer
            try:
                req = orjson.loads(message)
            except orjson.JSONDecodeError:
                await ws.send(_error("bad_json", "invalid JSON", None))
                continue
            if not isinstance(req, dict):
                await ws.send(_error("bad_json", "a request must be a JSON object", None))
                continue
            rid, op, room = req.get("id"), req.get("op"), req.get("room")
            if not isinstance(room, str) or not room or len(room.encode()) > MAX_ROOM_BYTES:
                await ws.send(_error("bad_request", '"room" must be a non-empty string', rid))
                continue
            if op == "publish":
                if "data" not in req:
                    await ws.send(_error("bad_request", 'publish needs "data"', rid))
                    continue
                seq = _publish(room, req["data"])
                if rid is not None:
                    await ws.send(orjson.dumps({"op": "ack", "id": rid, "seq": seq}).decode())
            elif op == "join":
                ROOMS.setdefault(room, set()).add(ws)
                joined.add(room)
                if rid is not None:
                    await ws.send(orjson.dumps({"op": "ack", "id": rid}).decode())
            elif op == "leave":
                members = ROOMS.get(room)
                if room not in joined or members is None:
                    await ws.send(_error("not_member", "not a member", rid))
                    continue
                members.discard(ws)
                joined.discard(room)
                if not members:
                    del ROOMS[room]
                if rid is not None:
                    await ws.send(orjson.dumps({"op": "ack", "id": rid}).decode())
            else:
                await ws.send(_error("unknown_op", "unknown op", rid))
    except ConnectionClosed:
        pass
    finally:
        for room in joined:
            members = ROOMS.get(room)
            if members is not None:
                members.discard(ws)
                if not members:
                    del ROOMS[room]


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # backlog: the default 100 would turn a reconnect storm into SYN retries, not a measurement.
    async with serve(_handler, host, port, compression=None, max_size=1 << 20, backlog=4096):
        print(f"websockets rooms server on ws://{host}:{port}/ (pid {os.getpid()})", flush=True)
        await stop.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
