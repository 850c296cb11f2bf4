"""One port, one instance unless sharing was asked for (issue 12 item 5).

Before: SO_REUSEPORT was always set, so a second `ws-gateway serve` on a port in use started
silently and took a share of the connections (an open-mode instance answering 101 where the
authenticated one answered 401). Now it exits at start with status 2 and one line saying why;
`--workers N` (siblings share the port) and `--reuse-port` (on purpose) still share it.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import ROOT, GatewayProcess, free_port, serve


def second_instance(port: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--log-level", "warning", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(result: subprocess.CompletedProcess, port: int) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "already in use" in line]
    assert len(lines) == 1 and f"port {port} on 127.0.0.1" in lines[0], result.stderr
    assert lines[0] == result.stderr.strip().splitlines()[-1]   # the last word, not lost among log lines


def test_a_second_instance_on_a_port_in_use_fails_at_start():
    with GatewayProcess("--jwt-secret", "s" * 32) as first:
        assert_one_clear_line(second_instance(first.port), first.port)
        # The first instance still answers every client (nobody took a share).
        with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/healthz", timeout=5) as r:
            assert r.status == 200


def test_workers_check_the_port_before_forking():
    """The workers' own sockets share the port, so the parent checks it first."""
    with GatewayProcess() as first:
        result = second_instance(first.port, "--workers", "2", "--broker", "redis://127.0.0.1:1/0")
        assert_one_clear_line(result, first.port)


def test_a_port_held_by_another_program_is_named():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        assert_one_clear_line(second_instance(port), port)


def test_reuse_port_shares_the_port_on_purpose():
    port = free_port()
    with GatewayProcess("--reuse-port", port=port), GatewayProcess("--reuse-port", port=port) as second:
        # Its /healthz may have been answered by the first: wait for its own "listening" line.
        deadline = time.monotonic() + 15
        while not (listening := _events(second.output(), "listen")) and time.monotonic() < deadline:
            assert second.proc.poll() is None, second.output()
            time.sleep(0.05)   # another process: no event to await
        assert second.proc.poll() is None and [e["port"] for e in listening] == [port]


def _events(output: str, event: str) -> list[dict]:
    docs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [d for d in docs if d.get("event") == event]


def test_one_worker_does_not_set_so_reuseport(run):
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT on this system")

    async def main():
        async with serve() as gw:
            assert gw.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        async with serve(reuse_port=True) as gw:
            assert gw.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    run(main())
