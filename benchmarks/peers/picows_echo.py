"""picows echo server: the reference peer the load tool compares ws-gateway against.

Echoes every data frame back as it came (text stays text, binary stays binary, the fin
bit and continuation opcode are kept, so fragmented messages come back fragmented) on
any path, under uvloop. This is picows' own idiomatic fast path: a WSListener whose
on_ws_frame sends the payload memoryview straight back (`send` copies it into the
write buffer once; no intermediate bytes object). Pings are answered by picows'
auto-pong; a close frame is answered and the connection closed, as RFC 6455 section 5.5.1
asks of the side that receives it.

Standalone script: imports only picows and uvloop, never `gateway`.
    python benchmarks/peers/picows_echo.py --port 9001 [--host 127.0.0.1]
"""
import argparse
import asyncio
import signal

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class EchoListener(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        # Pong frames (answers to pings we never send) are not echoed.
        if msg_type == WSMsgType.PONG:
            return
        transport.send(msg_type, frame.get_payload_as_memoryview(), frame.fin)


def _listener_factory(request: WSUpgradeRequest) -> WSListener:
    # Any path: the load tool and the gateway's /echo use different URLs.
    return EchoListener()


async def _serve(host: str, port: int) -> None:
    # max_frame_size 16 MiB: large enough for any payload the load tool sends.
    server = await ws_create_server(
        _listener_factory, host, port, max_frame_size=16 << 20, websocket_handshake_timeout=10
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"picows echo server on ws://{host}:{port}/ (pid {__import__('os').getpid()})", flush=True)
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
