"""websockets (asyncio implementation) echo server: a second, slower reference peer.

Useful as an independent check that the load tool speaks plain RFC 6455 (websockets is
strict about masking, close handshakes and UTF-8). Echoes each message back with its
type on any path, under uvloop; compression is off so frames are comparable with picows.

Standalone script: imports only websockets and uvloop, never `gateway`.
    python benchmarks/peers/websockets_echo.py --port 9002 [--host 127.0.0.1]
"""
import argparse
import asyncio
import os
import signal

import uvloop
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def _echo(ws) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(_echo, host, port, compression=None, max_size=16 << 20, ping_interval=None):
        print(f"websockets echo server on ws://{host}:{port}/ (pid {os.getpid()})", flush=True)
        await stop.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
