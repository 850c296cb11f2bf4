"""Smoke tests of the load tool (benchmarks/loadtool) against a real picows echo peer,
plus bytes-in tests of its echo counter (fast path and FrameParser fallback).

The smoke runs are ~1 s each and check only that the tool works end to end: the RESULT
line parses, messages flowed, nothing failed. They say nothing about performance.
"""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadtool import echo, fastclient, stats, wsclient
from benchmarks.loadtool.servers import Server
from gateway_ext import Opcode, encode_frame

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def picows_url():
    pytest.importorskip("picows")
    server = Server(f"{sys.executable} benchmarks/peers/picows_echo.py --port {{port}}", cwd=REPO)
    try:
        server.wait_listening(20)
        yield f"ws://127.0.0.1:{server.port}/echo"
    finally:
        server.stop()
        server.discard_log()


_IMPLS = ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    not fastclient.available(), reason="benchmarks/loadtool/_fastclient not built (setup.py build_ext --inplace)"))]


def _loadtool(*args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadtool", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().splitlines()[-1].startswith("RESULT "), "RESULT must be the last line"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("impl", _IMPLS)
def test_echo_smoke(picows_url, impl):
    result = _loadtool("echo", "--url", picows_url, "--connections", "4", "--inflight", "4",
                       "--duration", "1", "--warmup", "0.2", "--label", "picows", "--client-impl", impl)
    assert result["client_impl"] == impl
    assert result["mode"] == "echo"
    assert result["server"] == "picows"
    assert result["errors"] == 0, result["error_kinds"]
    assert result["count"] > 0 and result["msgs_per_s"] > 0
    assert result["p50_ms"] is not None and result["p99_ms"] >= result["p50_ms"]
    assert result["params"]["inflight"] == 4


@pytest.mark.parametrize("impl", _IMPLS)
def test_handshake_smoke(picows_url, impl):
    result = _loadtool("handshake", "--url", picows_url, "--concurrency", "4",
                       "--duration", "1", "--warmup", "0.2", "--client-impl", impl)
    assert result["mode"] == "handshake"
    assert result["client_impl"] == impl
    assert result["client_bound"] in (True, False)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["count"] > 0 and result["handshakes_per_s"] > 0
    assert result["p99_ms"] >= result["p50_ms"] > 0


@pytest.mark.parametrize("impl", _IMPLS)
def test_echo_two_procs_binary(picows_url, impl):
    result = _loadtool("echo", "--url", picows_url, "--connections", "4", "--inflight", "2", "--binary", "--client-impl", impl,
                       "--procs", "2", "--duration", "1", "--warmup", "0.2", "--source-address", "127.0.0.2")
    assert result["errors"] == 0, result["error_kinds"]
    assert result["count"] > 0
    assert result["extra"]["connections"] == 4


@pytest.fixture(scope="module")
def picows_rooms_url():
    pytest.importorskip("picows")
    server = Server(f"{sys.executable} benchmarks/peers/picows_rooms.py --port {{port}}", cwd=REPO)
    try:
        server.wait_listening(20)
        yield f"ws://127.0.0.1:{server.port}/ws"
    finally:
        server.stop()
        server.discard_log()


@pytest.mark.parametrize("impl", _IMPLS)
@pytest.mark.parametrize("window", [1, 4])
def test_fanout_smoke(picows_rooms_url, impl, window):
    result = _loadtool("fanout", "--url", picows_rooms_url, "--subscribers", "20", "--window", str(window),
                       "--duration", "1", "--warmup", "0.2", "--client-impl", impl)
    assert result["client_impl"] == impl
    assert result["errors"] == 0, result["error_kinds"]
    assert result["extra"]["subscribers"] == 20
    # every delivery counted belongs to a publication: 20 per publication that reached everyone,
    # plus those of publications still on their way at the window's edges
    assert result["count"] > 0 and result["extra"]["publications_per_s"] > 0
    assert result["samples"] > 0 and result["p99_ms"] >= result["p50_ms"]


@pytest.mark.parametrize("impl", _IMPLS)
def test_handshake_refused_port_reports_errors_and_ends(impl):
    result = _loadtool("handshake", "--url", "ws://127.0.0.1:1/", "--concurrency", "2",
                       "--duration", "0.3", "--warmup", "0", "--client-impl", impl)
    assert result["count"] == 0
    assert result["errors"] > 0
    assert set(result["error_kinds"]) == {"ConnectionRefusedError"}


def test_echo_refused_port_reports_errors_and_ends():
    # Port 1 is privileged and closed here: every connect is refused, quickly.
    result = _loadtool("echo", "--url", "ws://127.0.0.1:1/", "--connections", "2",
                       "--duration", "0.3", "--warmup", "0", "--connect-timeout", "2")
    assert result["count"] == 0
    assert result["errors"] == 2


class _FakeTransport:
    def __init__(self) -> None:
        self.written = []
        self.aborted = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _with_protocol(body):
    async def main():
        result = stats.WorkerResult()
        shared = echo._Shared(result)
        proto = echo.EchoProtocol(shared, Opcode.TEXT, b"hello", inflight=3)
        transport = _FakeTransport()
        proto.connection_made(transport)
        proto.start()
        body(proto, shared, transport, result)

    asyncio.run(main())


ECHO = encode_frame(Opcode.TEXT, b"hello")


def test_counter_fast_path_with_split_reads():
    def body(proto, shared, transport, result):
        assert transport.written == [proto._frame * 3]          # K frames in one write
        data = ECHO * 3
        proto.data_received(data[:4])
        proto.data_received(data[4:15])
        proto.data_received(data[15:])
        assert shared.received == 3
        assert b"".join(transport.written[1:]) == proto._frame * 3  # replacements
        assert not proto._slow and result.errors == 0

    _with_protocol(body)


def test_counter_falls_back_to_parser_for_ping_and_fragments():
    def body(proto, shared, transport, result):
        ping = encode_frame(Opcode.PING, b"p")
        first = encode_frame(Opcode.TEXT, b"hel", fin=False)
        rest = encode_frame(Opcode.CONTINUATION, b"lo")
        data = ECHO + ping + first + rest[:1]
        proto.data_received(data)
        assert shared.received == 1 and proto._slow              # parser holds a partial frame
        proto.data_received(rest[1:] + ECHO)
        assert shared.received == 3 and not proto._slow          # back on the fast path
        pong = encode_frame(Opcode.PONG, b"p", mask=proto._mask)
        assert pong in transport.written
        proto.data_received(ECHO)
        assert shared.received == 4 and result.errors == 0

    _with_protocol(body)


def test_counter_reports_server_close_as_error():
    def body(proto, shared, transport, result):
        proto.data_received(encode_frame(Opcode.CLOSE, (1001).to_bytes(2, "big")))
        assert result.errors == 1
        assert "1001" in next(iter(result.error_kinds))
        assert transport.written[-1] == wsclient.close_frame(proto._mask)

    _with_protocol(body)


def test_handshake_response_check():
    key = wsclient.new_key()
    good = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: " + wsclient.accept_for(key)
    wsclient.check_response(good, wsclient.accept_for(key))
    with pytest.raises(wsclient.HandshakeError):
        wsclient.check_response(b"HTTP/1.1 404 Not Found\r\n", wsclient.accept_for(key))
    with pytest.raises(wsclient.HandshakeError):
        wsclient.check_response(good, wsclient.accept_for(wsclient.new_key()))


def test_percentile_nearest_rank():
    ordered = list(range(1, 101))
    assert stats.percentile(ordered, 50) == 50
    assert stats.percentile(ordered, 99) == 99
    assert stats.percentile([7], 99.9) == 7
    assert stats.percentile([], 50) is None


def test_client_bound_flag_in_results_and_compare_lines():
    from benchmarks.loadtool import cli, compare, cpu

    assert cpu.client_bound({"client_cpu": 0.95}) is True
    assert cpu.client_bound({"client_cpu": 0.60}) is False
    assert cpu.client_bound({"client_cpu": 1.5}, procs=2) is False      # 75% per worker
    assert cpu.client_bound({}) is False                               # not measured: no claim
    rec = {"rate": 1000.0, "unit": "msgs/s", "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0,
           "extra": {"client_cpu": 0.97, "server_cpu": 0.55}, "client_bound": True, "client_impl": "compiled"}
    line = compare._side_text(rec)
    assert "cpu client 97% server 55%" in line and "CLIENT-BOUND" in line and "[compiled client]" in line
    rec.update(client_bound=False, extra={"client_cpu": 0.5, "server_cpu": 0.99})
    assert "CLIENT-BOUND" not in compare._side_text(rec)
    summary = cli.human_summary({
        "mode": "echo", "server": "s", "params": {"procs": 1}, "rate": 1.0, "unit": "msgs/s", "count": 1,
        "p50_ms": 1.0, "p99_ms": 1.0, "p999_ms": 1.0, "max_ms": 1.0, "samples": 1, "errors": 0,
        "error_kinds": {}, "extra": {"client_cpu": 0.93, "server_cpu": 0.4}, "client_bound": True,
        "client_impl": "compiled"})
    assert "client 93%  server 40%   CLIENT-BOUND" in summary
