"""aiohttp rooms server: a peer for the load tool's fanout / idle / churn modes and scale_19k.

Implements ws-gateway's `/ws` JSON protocol (gateway/rooms/commands.py) on any path, the way one
writes it idiomatically with aiohttp: a `WebSocketResponse` per connection read in its
handler; join / leave / publish with optional "id" -> ack / error; per-room `seq`; a
publication serialised once (orjson, splicing the publisher's data) and sent to every
member with `await ws.send_str(...)`, one after the other. Keepalive is aiohttp's
heartbeat (ping every 20 s), so idle connections are weighed with keepalive on.

Standalone script: imports only aiohttp, orjson and uvloop, never `gateway`.
    python benchmarks/peers/aiohttp_rooms.py --port 9004 [--host 127.0.0.1]
"""
import argparse
import asyncio
import os
import signal

import orjson
import uvloop
from aiohttp import WSMsgType, web

MAX_ROOM_BYTES = 200
ROOMS: dict[str, set] = {}
SEQ: dict[str, int] = {}


def _error(code: str, message: str, rid) -> str:
    doc = {"op": "error", "code": code, "message": message}
    if rid is not None:
        doc["id"] = rid
    return orjson.dumps(doc).decode()


async def _publish(room: str, data) -> int:
    seq = SEQ.get(room, 0) + 1
    SEQ[room] = seq
    members = ROOMS.get(room)
    if members:
        payload = (b'{"op":"message","room":' + orjson.dumps(room) + b',"data":' + orjson.dumps(data)
                   + b',"seq":%d}' % seq).decode()
        for ws in list(members):
            if not ws.closed:
                try:
                    await ws.send_str(payload)
                except ConnectionError:
                    pass
    return seq


async def _handler(request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=1 << 20)
    await ws.prepare(request)
    joined: set = set()
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                await ws.send_str(_error("bad_json", "invalid JSON", None))
                continue
            if not isinstance(req, dict):
                await ws.send_str(_error("bad_json", "a request must be a JSON object", None))
                continue
            rid, op, room = req.get("id"), req.get("op"), req.get("room")
            if not isinstance(room, str) or not room or len(room.encode()) > MAX_ROOM_BYTES:
                await ws.send_str(_error("bad_request", '"room" must be a non-empty string', rid))
                continue
            if op == "publish":
                if "data" not in req:
                    await ws.send_str(_error("bad_request", 'publish needs "data"', rid))
                    continue
                seq = await _publish(room, req["data"])
                if rid is not None:
                    await ws.send_str(orjson.dumps({"op": "ack", "id": rid, "seq": seq}).decode())
            elif op == "join":
                ROOMS.setdefault(room, set()).add(ws)
                joined.add(room)
                if rid is not None:
                    await ws.send_str(orjson.dumps({"op": "ack", "id": rid}).decode())
            elif op == "leave":
                members = ROOMS.get(room)
                if room not in joined or members is None:
                    await ws.send_str(_error("not_member", "not a member", rid))
                    continue
                members.discard(ws)
                joined.discard(room)
                if not members:
                    del ROOMS[room]
                if rid is not None:
                    await ws.send_str(orjson.dumps({"op": "ack", "id": rid}).decode())
            else:
                await ws.send_str(_error("unknown_op", "unknown op", rid))
    finally:
        for room in joined:
            members = ROOMS.get(room)
            if members is not None:
                members.discard(ws)
                if not members:
                    del ROOMS[room]
    return ws


async def _serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # backlog: the default 128 would turn a reconnect storm into SYN retries, not a measurement.
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiohttp rooms server on ws://{host}:{port}/ (pid {os.getpid()})", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
