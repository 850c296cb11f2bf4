"""Graceful shutdown, restart and reload, on a real `python -m gateway serve` process.

SIGTERM: every client gets 1001 and the process exits 0 within drain_timeout; /readyz says
503 (and upgrades are refused) while clients are still being closed; SIGUSR2 closes with 1012;
a second SIGTERM exits at once; SIGHUP reloads what is reloadable and keeps every client.
"""
import asyncio
import os
import json
import signal
import time

import pytest
import uvloop
import websockets

from gateway_ext import FrameParser
from tests.helpers import GatewayProcess, free_port, raw_request, serve, upgrade_request, ws_url
from tests.redis_server import redis_server  # noqa: F401  (fixture)

CLIENTS = 1000


async def _connect_many(url: str, n: int) -> list:
    sem = asyncio.Semaphore(100)   # connect in waves: the test, not the server, sets the pace

    async def one():
        async with sem:
            return await websockets.connect(url, ping_interval=None, open_timeout=30, close_timeout=10)
    return await asyncio.gather(*(one() for _ in range(n)))


def test_sigterm_with_1000_clients_every_one_gets_1001_and_exit_0():
    drain_window, drain_timeout = 1.0, 8.0
    with GatewayProcess("--echo", "--drain-window", str(drain_window), "--drain-timeout", str(drain_timeout),
                        "--log-level", "warning") as gw:
        async def main():
            clients = await _connect_many(gw.url("/echo"), CLIENTS)
            await clients[0].send("still serving")
            assert await clients[0].recv() == "still serving"
            loop = asyncio.get_running_loop()
            received = []

            async def closed_at(ws):
                await ws.wait_closed()
                received.append(loop.time())
            waiters = [asyncio.create_task(closed_at(ws)) for ws in clients]
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*waiters), drain_timeout)
            return clients, received, signalled
        clients, received, signalled = uvloop.run(main())
        codes = [ws.close_code for ws in clients]
        assert codes.count(1001) == CLIENTS, {c: codes.count(c) for c in set(codes)}
        assert all(ws.close_reason == "server shutting down" for ws in clients)
        # The closes were spread over the drain window, not sent in one burst.
        assert max(received) - min(received) >= drain_window / 2
        assert gw.proc.wait(timeout=drain_timeout - (time.monotonic() - signalled)) == 0
        assert "Traceback" not in gw.output()


def test_readyz_flips_before_the_listener_closes(run):
    async def main():
        async with serve(drain_window=2.0, drain_timeout=5.0) as gw:
            clients = [await websockets.connect(ws_url(gw), ping_interval=None) for _ in range(20)]
            assert (await raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
            shutdown = asyncio.create_task(gw.shutdown())
            closes = [asyncio.create_task(ws.wait_closed()) for ws in clients]
            await asyncio.wait(closes, return_when=asyncio.FIRST_COMPLETED)
            # Draining has begun: the listener still answers, and says "not ready".
            readyz = await raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert readyz.startswith(b"HTTP/1.1 503"), readyz
            upgrade = await raw_request(gw.port, upgrade_request())
            assert upgrade.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in upgrade
            still_open = sum(not task.done() for task in closes)
            assert still_open > 0 and gw.connections   # existing clients are still being closed
            await shutdown
            await asyncio.gather(*closes)
            assert {ws.close_code for ws in clients} == {1001}
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", gw.port)
    run(main())


def test_shutdown_without_clients_does_not_wait_for_the_window(run):
    async def main():
        async with serve(drain_window=4.0, drain_timeout=9.0) as gw:
            loop = asyncio.get_running_loop()
            # No clients: nothing to spread, so shutdown() is done well before the window.
            await asyncio.wait_for(gw.shutdown(), 3.0)
            assert not gw.ready and gw.draining
            del loop
    run(main())


async def _silent_client(port: int):
    """A client that completes the upgrade, then never answers a close frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def _read_close_code(reader) -> int:
    parser = FrameParser(1 << 20, require_mask=False)
    while True:
        data = await reader.read(65536)
        assert data, "connection ended without a close frame"
        for frame in parser.feed(data):
            if frame[0] == 8:
                return int.from_bytes(frame[3][:2], "big")


def test_unanswered_close_is_aborted_and_exit_0_within_drain_timeout():
    drain_timeout = 2.0
    with GatewayProcess("--echo", "--drain-window", "0.5", "--drain-timeout", str(drain_timeout),
                        "--close-timeout", "60", "--log-level", "warning") as gw:
        async def main():
            reader, writer = await _silent_client(gw.port)
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await asyncio.wait_for(_read_close_code(reader), drain_timeout) == 1001
            # We never answer: the gateway aborts us at the drain deadline (close_timeout is 60 s).
            assert await asyncio.wait_for(reader.read(), drain_timeout + 1) == b""
            writer.close()
            return signalled
        signalled = uvloop.run(main())
        assert gw.proc.wait(timeout=max(0.5, drain_timeout + 1 - (time.monotonic() - signalled))) == 0
        assert '"event":"drain_timeout"' in gw.output()


def test_second_sigterm_exits_at_once():
    with GatewayProcess("--echo", "--drain-window", "1", "--drain-timeout", "60", "--close-timeout", "60",
                        "--log-level", "info") as gw:
        async def main():
            reader, writer = await _silent_client(gw.port)
            gw.signal(signal.SIGTERM)
            assert await asyncio.wait_for(_read_close_code(reader), 10) == 1001
            gw.signal(signal.SIGTERM)   # the operator insists
            return writer
        uvloop.run(main())
        assert gw.proc.wait(timeout=10) == 1
        assert "second signal: exiting now" in gw.output()


def test_sigusr2_restart_closes_with_1012():
    with GatewayProcess("--echo", "--drain-window", "0.2", "--log-level", "warning") as gw:
        async def main():
            ws = await websockets.connect(gw.url("/echo"))
            gw.signal(signal.SIGUSR2)
            await asyncio.wait_for(ws.wait_closed(), 10)
            return ws.close_code, ws.close_reason
        assert uvloop.run(main()) == (1012, "service restart")
        assert gw.proc.wait(timeout=10) == 0


def _wait_for_log(gw, needle: str, timeout: float = 10.0) -> dict:
    """The first JSON log line of the gateway process whose text contains `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gw.output().splitlines():
            if needle in line:
                return json.loads(line)
        time.sleep(0.05)   # the process writes its log file; nothing to await across processes
    raise AssertionError(f"{needle!r} not logged:\n{gw.output()}")


def test_sighup_reloads_limits_and_keeps_clients(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text("echo = true\nmax_connections = 100\n")
    with GatewayProcess("--config", str(config), "--log-level", "info") as gw:
        async def main():
            ws = await websockets.connect(gw.url("/echo"))
            # port comes from a flag (flags win over the file); backlog is a socket setting: restart only.
            config.write_text(f"echo = true\nmax_connections = 1\nport = {gw.port + 1}\nbacklog = 16\n")
            gw.signal(signal.SIGHUP)
            reloaded = await asyncio.to_thread(_wait_for_log, gw, '"event":"reload"')
            assert "max_connections" in reloaded["applied"]
            assert reloaded["needs_restart"] == ["backlog"]
            # The open client survived the reload; the new limit applies to the next upgrade.
            await ws.send("hi")
            assert await ws.recv() == "hi"
            with pytest.raises(websockets.InvalidStatus) as info:
                await websockets.connect(gw.url("/echo"))
            assert info.value.response.status_code == 503
            # A broken file on the next SIGHUP is reported and the running config is kept.
            config.write_text("max_connections = -5\n")
            gw.signal(signal.SIGHUP)
            error = await asyncio.to_thread(_wait_for_log, gw, '"event":"reload_error"')
            assert "max_connections" in error["error"]
            await ws.send("still")
            assert await ws.recv() == "still"
            await ws.close()
        uvloop.run(main())
        assert gw.stop() == 0


def test_workers_each_drain_once_and_have_their_own_metrics_port(redis_server):
    metrics_port = _free_port_pair()
    with GatewayProcess("--echo", "--workers", "2", "--broker", redis_server.url, "--metrics-port", str(metrics_port),
                        "--drain-window", "0.5", "--log-level", "warning") as gw:
        for port in (metrics_port, metrics_port + 1):   # each worker answers on its own port
            assert "ws_gateway_connections_open" in _get_when_up(f"http://127.0.0.1:{port}/metrics", gw)

        async def main():
            clients = await _connect_many(gw.url("/echo"), 40)   # SO_REUSEPORT spreads them over both workers
            # Only the parent is signalled (systemd KillMode=mixed); it forwards to each worker once.
            gw.signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*(ws.wait_closed() for ws in clients)), 10)
            return [ws.close_code for ws in clients]
        codes = uvloop.run(main())
        assert codes == [1001] * 40
        assert gw.proc.wait(timeout=10) == 0
        assert "second signal" not in gw.output()


def _get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _get_when_up(url: str, gw, timeout: float = 15.0) -> str:
    """GET from a worker that may still be starting (/healthz proved only that one worker is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: {exc}\n{gw.output()}") from None
            time.sleep(0.05)   # another process is starting; nothing to await across processes


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free right now (worker i listens on metrics_port + i)."""
    import socket
    while True:
        port = free_port()
        if port + 1 >= 65536:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_ctrl_c_to_the_process_group_drains_workers_once(redis_server):
    """A terminal's Ctrl-C signals the whole foreground group: workers still drain (1001)."""
    import subprocess
    import sys
    from tests.helpers import ROOT
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--echo", "--port", str(port), "--workers", "2",
                             "--broker", redis_server.url, "--drain-window", "0.3", "--log-level", "warning"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def main():
            deadline = time.monotonic() + 15
            while True:   # the workers are starting in another process: retry the first connect
                try:
                    clients = await _connect_many(f"ws://127.0.0.1:{port}/echo", 20)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)   # what the terminal does on Ctrl-C
            await asyncio.wait_for(asyncio.gather(*(ws.wait_closed() for ws in clients)), 10)
            return [ws.close_code for ws in clients]
        assert uvloop.run(main()) == [1001] * 20
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, output
        assert "second signal" not in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
