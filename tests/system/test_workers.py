"""`--workers N` under supervision: a dead worker is logged and replaced, the others keep serving,
SIGTERM drains every worker and the parent's exit status says how it went, and every worker's
last log lines reach the log (gateway/supervisor.py).

Real `python -m gateway serve --workers 2` processes (tests.helpers.GatewayProcess), a
redis-server of our own, websockets clients and raw sockets on 127.0.0.1. Workers are found
from the parent's JSON log lines, never guessed.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import pytest
import websockets

from gateway.server.supervisor import MAX_BACKOFF, backoff, describe_status
from tests.helpers import ROOT, GatewayProcess, free_port, upgrade_request
from tests.redis_server import RedisServer, needs_redis
from tests.system.test_shutdown import _free_port_pair

pytestmark = [pytest.mark.timeout(120), needs_redis]


def log_events(gw: GatewayProcess, event: str) -> list[dict]:
    out = []
    for line in gw.output().splitlines():
        if f'"event":"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll state owned by other processes (the gateway's log, its children) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    """worker index -> pid of its newest process, from the `listening` lines."""
    pids = {}
    for line in log_events(gw, "listen"):
        pids[line["worker"]] = line["pid"]
    return pids


def numsub(server: RedisServer, channel: str) -> int:
    with server.client() as r:
        return dict(r.pubsub_numsub(channel))[channel.encode()]


@pytest.fixture(scope="module")
def redis_for_workers():
    with RedisServer() as server:
        yield server


async def _recv_json(ws, timeout: float = 10.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _join(ws, room: str) -> None:
    await ws.send(orjson.dumps({"op": "join", "room": room, "id": "j"}).decode())
    assert (await _recv_json(ws))["op"] == "ack"


async def _clients_on_both_workers(gw, redis_server, room) -> list:
    """Connect and join until both workers hold the room (the kernel picks the worker)."""
    channel = f"ws:{{{room}}}"
    clients = []
    while numsub(redis_server, channel) < 2:
        assert len(clients) < 64, "every connection landed on one worker"
        ws = await websockets.connect(gw.url("/ws"))
        clients.append(ws)
        await _join(ws, room)
    return clients


def test_a_killed_worker_is_logged_and_restarted_while_the_other_keeps_serving(redis_for_workers):
    with GatewayProcess("--broker", redis_for_workers.url, "--workers", "2", "--rate-limit", "0",
                        "--log-level", "info") as gw:
        before = worker_pids(gw)
        assert sorted(before) == [0, 1]
        victim = before[0]

        async def main():
            room = "supervised"
            clients = await _clients_on_both_workers(gw, redis_for_workers, room)
            try:
                os.kill(victim, signal.SIGKILL)
                # The dead worker's clients see their connections drop...
                survivors = []
                for ws in clients:
                    try:
                        await ws.send(orjson.dumps({"op": "publish", "room": room, "data": "probe", "id": "p"}).decode())
                        while (m := await _recv_json(ws, 10)).get("op") != "ack":
                            pass
                        survivors.append(ws)
                    except websockets.ConnectionClosed:
                        pass
                assert 0 < len(survivors) < len(clients)
                # ...while the other worker's clients keep getting publications.
                await survivors[0].send(orjson.dumps({"op": "publish", "room": room, "data": "still here"}).decode())
                for ws in survivors:
                    while (m := await _recv_json(ws)).get("data") != "still here":
                        pass
            finally:
                for ws in clients:
                    await ws.close()
        asyncio.run(main())

        # Logged with its signal, and replaced in the same slot by a process that listens.
        exits = wait_for(lambda: log_events(gw, "worker_exit"), "the worker_exit line")
        assert exits[0]["worker"] == 0 and exits[0]["pid"] == victim and exits[0]["signal"] == "SIGKILL"
        assert exits[0]["level"] == "error" and "killed by SIGKILL" in exits[0]["msg"]
        ready = wait_for(lambda: log_events(gw, "worker_ready"), "the replacement to be ready")
        assert ready[0]["worker"] == 0 and ready[0]["pid"] != victim
        assert worker_pids(gw)[0] == ready[0]["pid"] and worker_pids(gw)[1] == before[1]
        os.kill(ready[0]["pid"], 0)   # alive

        async def after():
            # Both workers serve again: the room spans two processes once more.
            clients = await _clients_on_both_workers(gw, redis_for_workers, "after-restart")
            await clients[0].send(orjson.dumps({"op": "publish", "room": "after-restart", "data": 1}).decode())
            for ws in clients:
                while (m := await _recv_json(ws)).get("op") != "message":
                    pass
                assert m["data"] == 1
            for ws in clients:
                await ws.close()
        asyncio.run(after())
        assert gw.stop() == 0
        stopped = log_events(gw, "workers_stopped")
        assert stopped and stopped[-1]["status"] == 0
        assert "Traceback" not in gw.output()


def test_sigterm_drains_every_worker_and_no_log_line_is_lost(redis_for_workers):
    """Issue 20 item 5: workers end with os._exit(), which skipped the log handler's flush.
    Every connection's "connection closed" line and each worker's "stopped" line must arrive."""
    with GatewayProcess("--broker", redis_for_workers.url, "--workers", "2", "--echo", "--log-level", "info",
                        "--drain-window", "0.2") as gw:
        async def main():
            clients = [await websockets.connect(gw.url("/echo")) for _ in range(10)]
            for ws in clients:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            gw.signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*(ws.wait_closed() for ws in clients)), 20)
            return [ws.close_code for ws in clients]
        assert asyncio.run(main()) == [1001] * 10
        assert gw.proc.wait(timeout=30) == 0
        closed = log_events(gw, "close")
        assert len(closed) == 10, gw.output()[-3000:]
        assert {c["code"] for c in closed} == {1001}
        stopped = log_events(gw, "stopped")
        assert len(stopped) == 2, gw.output()[-3000:]
        exits = log_events(gw, "worker_exit")
        assert sorted(e["worker"] for e in exits) == [0, 1] and all(e["exit_code"] == 0 for e in exits)


def test_a_worker_killed_during_the_drain_makes_the_exit_status_1(redis_for_workers):
    """A raw client that completed the upgrade but never answers the close frame holds its
    worker's drain open (drain_timeout 60 s); SIGKILL that worker mid-drain: status 1."""
    metrics_port = _free_port_pair()
    with GatewayProcess("--broker", redis_for_workers.url, "--workers", "2", "--echo", "--log-level", "info",
                        "--drain-timeout", "60", "--drain-window", "0.1", "--metrics-port", str(metrics_port)) as gw:
        socks = []
        try:
            # Silent clients until each worker holds one (asked of each worker's metrics port).
            while not all(_open_connections(metrics_port + i) > 0 for i in (0, 1)):
                assert len(socks) < 64, "every connection landed on one worker"
                s = socket.create_connection(("127.0.0.1", gw.port))
                s.sendall(upgrade_request("/echo"))
                assert s.recv(4096).startswith(b"HTTP/1.1 101")
                socks.append(s)
            gw.signal(signal.SIGTERM)
            wait_for(lambda: len(log_events(gw, "shutdown")) == 2, "both workers to start draining")
            victim = worker_pids(gw)[1]
            os.kill(victim, signal.SIGKILL)
            assert gw.proc.wait(timeout=90) == 1
        finally:
            for s in socks:
                s.close()
        exits = {e["pid"]: e for e in log_events(gw, "worker_exit")}
        assert exits[victim]["signal"] == "SIGKILL" and "during shutdown" in exits[victim]["msg"]
        assert log_events(gw, "workers_stopped")[-1]["status"] == 1
        assert not log_events(gw, "worker_restart")   # no restart once stopping


def _open_connections(port: int) -> float:
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(re.search(r"^ws_gateway_connections_open (\S+)$", text, re.M).group(1))


def test_workers_that_cannot_start_make_the_parent_exit_2_instead_of_crash_looping(redis_for_workers):
    """Worker 0's metrics port (metrics_port + 0) is held by a socket without SO_REUSEPORT: the
    main port is free (the parent's own check passes), but worker 0 fails inside its start.
    Restarting it would fail the same way: the parent stops worker 1 and exits 2."""
    metrics_port = _free_port_pair()   # worker 1 gets metrics_port + 1, which must be free
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", metrics_port))
        holder.listen()
        proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port",
                               str(free_port()), "--workers", "2", "--broker", redis_for_workers.url,
                               "--metrics-port", str(metrics_port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("event") == "worker_exit" and line["worker"] == 0]
    assert failed and "before it became ready: stopping" in failed[0]["msg"], proc.stderr[-3000:]
    assert not [line for line in lines if line.get("event") == "worker_restart"]
    assert "Traceback" not in proc.stderr   # one line says why, as for any start-up error
    assert f"metrics_port {metrics_port}" in proc.stderr   # the worker's one line names what failed


def test_crash_loop_backoff_and_status_descriptions():
    assert [backoff(n) for n in range(1, 9)] == [0, 0.5, 1, 2, 4, 8, 16, MAX_BACKOFF]
    assert backoff(100) == MAX_BACKOFF
    # Real wait statuses from real children.
    for code, expected in ((0, ("exited with status 0", 0, None)), (3, ("exited with status 3", 3, None))):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        assert describe_status(os.waitpid(pid, 0)[1]) == expected
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    os.kill(pid, signal.SIGKILL)
    assert describe_status(os.waitpid(pid, 0)[1]) == ("killed by SIGKILL", None, "SIGKILL")


def test_a_crash_looping_worker_is_restarted_with_growing_delays_and_sigterm_ends_the_loop():
    """The Supervisor itself, with a worker that reports ready and exits 3 at once, every time."""
    import logging
    import threading

    from gateway.server.supervisor import Supervisor

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("gateway.server.supervisor")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def crashing_worker(index, on_ready):
        on_ready()
        return 3

    def stop_after_four_exits():
        wait_for(lambda: sum(getattr(r, "event", "") == "worker_exit" for r in records) >= 4, "four exits")
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_after_four_exits, daemon=True)
    stopper.start()
    try:
        status = Supervisor(1, crashing_worker).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    stopper.join(5)
    exits = [r for r in records if getattr(r, "event", "") == "worker_exit" and hasattr(r, "restart_in_s")]
    assert [r.restart_in_s for r in exits[:4]] == [0.0, 0.5, 1.0, 2.0]
    assert [r.strikes for r in exits[:4]] == [1, 2, 3, 4]
    assert all(r.exit_code == 3 and r.levelname == "ERROR" for r in exits)
    assert "crash loop" in exits[1].getMessage()
    # SIGTERM during a backoff delay: no more restarts, the parent returns (0: nothing was
    # running uncleanly when it stopped; the crashes were before the shutdown).
    assert status in (0, 1)
    assert records[-1].event == "workers_stopped"
