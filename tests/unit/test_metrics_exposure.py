"""/metrics is for operators (issue 12 item 6): bounded labels, and not public by default.

Real gateways on real sockets: an independent client (`websockets`) closes with codes of its
choosing; /metrics is asked from 127.0.0.1, from this machine's non-loopback address, and
through a trusted proxy (X-Forwarded-For) for an outside client.
"""
import asyncio
import socket

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.server.process import KNOWN_CLOSE_CODES
from tests.helpers import raw_request, serve, ws_url


def outside_address() -> str | None:
    """This machine's address on a non-loopback interface (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))    # no packet is sent: this only picks the route
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


OUTSIDE = outside_address()
needs_outside = pytest.mark.skipif(OUTSIDE is None, reason="no non-loopback IPv4 address on this machine")


async def get(host: str, port: int, path: str = "/metrics", headers: str = "") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    return int(answer[9:12])


def test_client_close_codes_are_bounded_labels(run):
    async def main():
        async with serve() as gw:
            codes = list(range(3000, 3040)) + [4999, 1000, 4000]
            for code in codes:
                ws = await websockets.connect(ws_url(gw))
                await ws.close(code)
            while gw.stats.closed < len(codes):
                await asyncio.sleep(0.01)
            body = (await raw_request(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).partition(b"\r\n\r\n")[2]
        family = next(f for f in text_string_to_metric_families(body.decode())
                      if f.name == "ws_gateway_connections_closed_by_code")
        by_code = {s.labels["code"]: s.value for s in family.samples if s.name.endswith("_total")}
        assert by_code == {"other": 41, "1000": 1, "4000": 1}
    run(main())


def test_known_close_codes():
    # 4005/4006: the server API's disconnect (reconnect / do not reconnect)
    assert {1000, 1001, 1006, 1009, 1011, 1012, 4000, 4001, 4002, 4003, 4004, 4005, 4006} <= KNOWN_CLOSE_CODES
    assert not {3000, 4007, 4100, 4999, 1004, 1016} & KNOWN_CLOSE_CODES


@needs_outside
def test_metrics_refuses_peers_that_are_not_loopback(run):
    async def main():
        async with serve(host="0.0.0.0") as gw:
            assert status(await get("127.0.0.1", gw.port)) == 200
            refused = await get(OUTSIDE, gw.port)
            assert status(refused) == 403 and b"trusted_proxies" in refused
            # The rest of the port is unchanged for that peer.
            assert status(await get(OUTSIDE, gw.port, "/healthz")) == 200
            assert gw.stats.rejected["403"] == 1
    run(main())


@needs_outside
def test_metrics_answers_a_trusted_proxy_and_when_public(run):
    async def main():
        async with serve(host="0.0.0.0", trusted_proxies=(OUTSIDE,)) as gw:
            assert status(await get(OUTSIDE, gw.port)) == 200
        async with serve(host="0.0.0.0", metrics_public=True) as gw:
            assert status(await get(OUTSIDE, gw.port)) == 200
    run(main())


def test_metrics_through_a_trusted_proxy_is_judged_by_the_real_client(run):
    """nginx on this host (a trusted proxy) forwarding an outside client's /metrics: refused."""
    async def main():
        async with serve(trusted_proxies=("127.0.0.1",)) as gw:
            outside = await get("127.0.0.1", gw.port, headers="X-Forwarded-For: 203.0.113.7\r\n")
            assert status(outside) == 403
            assert status(await get("127.0.0.1", gw.port, headers="X-Real-IP: 203.0.113.7\r\n")) == 403
            assert status(await get("127.0.0.1", gw.port, headers="X-Forwarded-For: 127.0.0.1\r\n")) == 200
            assert status(await get("127.0.0.1", gw.port)) == 200
    run(main())


def test_metrics_public_is_a_flag_and_reloadable():
    from gateway.cli import build_parser, config_from_args
    from gateway.config import RELOADABLE

    args = build_parser().parse_args(["serve", "--metrics-public"])
    assert config_from_args(args).metrics_public is True
    assert config_from_args(build_parser().parse_args(["serve"])).metrics_public is False
    assert "metrics_public" in RELOADABLE
