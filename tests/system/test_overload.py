"""At max_connections, a handshake storm is shed with 503 + Retry-After while the established
clients keep getting every publication, in order; no slot leaks. Numbers (fan-out p99 with and
without the storm): benchmarks/overload.py and benchmarks/README.md.

A real gateway process (`--max-connections 20`), websockets members, and a storm of raw
upgrade requests on 127.0.0.1. No timing assertions.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request

import orjson
import pytest
import websockets

from tests.helpers import GatewayProcess, free_port, upgrade_request

pytestmark = pytest.mark.timeout(120)

LIMIT = 20
STORM = 300


async def storm_attempt(port: int) -> bytes:
    """One upgrade against the full gateway: the whole response, until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request("/ws"))
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        found = re.search(rf"^{re.escape(name)} (\S+)$", r.read().decode(), re.M)
    return float(found.group(1))


def test_a_handshake_storm_at_the_limit_is_shed_and_members_keep_their_messages():
    metrics_port = free_port()
    with GatewayProcess("--max-connections", str(LIMIT), "--rate-limit", "0", "--metrics-port", str(metrics_port),
                        "--log-level", "warning") as gw:
        async def main():
            members = [await websockets.connect(gw.url("/ws")) for _ in range(LIMIT)]
            try:
                for ws in members:
                    await ws.send(orjson.dumps({"op": "join", "room": "full", "id": 1}).decode())
                    assert orjson.loads(await ws.recv())["op"] == "ack"
                assert metric(metrics_port, "ws_gateway_connections_open") == LIMIT
                publisher = members[0]

                async def publish_all():
                    for i in range(100):
                        await publisher.send(orjson.dumps({"op": "publish", "room": "full", "data": i}).decode())
                        await asyncio.sleep(0)   # interleave with the storm

                storm = [asyncio.create_task(storm_attempt(gw.port)) for _ in range(STORM)]
                await publish_all()
                responses = await asyncio.gather(*storm)
                for response in responses:
                    head, _, body = response.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 503 "), response[:200]
                    assert b"\r\nRetry-After: 5" in head
                    assert b"connection limit" in body
                # Every member got every publication, in order, nothing dropped.
                for ws in members:
                    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(100)]
                    assert [(m["op"], m["data"]) for m in got] == [("message", i) for i in range(100)]
                assert metric(metrics_port, "ws_gateway_connections_open") == LIMIT   # no slot leaked
                # A slot that frees up is taken by the next client.
                await members.pop().close()
                await asyncio.to_thread(_until, lambda: metric(metrics_port, "ws_gateway_connections_open") < LIMIT)
                newcomer = await websockets.connect(gw.url("/ws"))
                members.append(newcomer)
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await websockets.connect(gw.url("/ws"))
                assert refused.value.response.status_code == 503
            finally:
                for ws in members:
                    await ws.close()
        asyncio.run(main())


def _until(predicate, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)   # another process's state
