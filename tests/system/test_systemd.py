"""sd_notify without libsystemd: READY=1 once listening, WATCHDOG=1 from the loop, STOPPING=1 on SIGTERM."""
import os
import signal
import socket

import pytest

from gateway.ops import systemd
from tests.helpers import GatewayProcess


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    yield path, sock
    sock.close()


def _messages_until(sock, wanted: str) -> list[str]:
    seen = []
    while True:
        seen.append(sock.recv(4096).decode())   # blocks (with the socket timeout) for the next datagram
        if wanted in seen[-1].split("\n"):
            return seen


def test_notify_sends_one_datagram(notify_socket):
    path, sock = notify_socket
    assert systemd.notify("READY=1", "STATUS=ok", env={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_abstract_namespace():
    name = f"ws-gateway-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_notify_is_a_noop_outside_systemd_and_survives_a_dead_socket(tmp_path):
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}, 2.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),   # meant for another process
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "nonsense"}, None),
    ({"WATCHDOG_USEC": "4000000"}, None),
])
def test_watchdog_interval(env, expected):
    assert systemd.watchdog_interval(env) == expected


def test_gateway_process_notifies_ready_watchdog_stopping(notify_socket):
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}   # a ping every 0.1 s
    with GatewayProcess("--echo", "--log-level", "warning", env=env) as gw:
        first = _messages_until(sock, "READY=1")
        assert any(f"on port {gw.port}" in m for m in first)
        _messages_until(sock, "WATCHDOG=1")
        _messages_until(sock, "WATCHDOG=1")   # it keeps coming, from the event loop
        gw.signal(signal.SIGHUP)               # reload: RELOADING=1 then READY=1 again
        _messages_until(sock, "RELOADING=1")
        _messages_until(sock, "READY=1")
        gw.signal(signal.SIGTERM)
        stopping = _messages_until(sock, "STOPPING=1")
        assert stopping
        assert gw.proc.wait(timeout=15) == 0
