"""Shared test helpers: free ports, an in-loop gateway, a gateway subprocess, raw sockets.

Everything here talks to real sockets on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from gateway import config as config_mod
from gateway.app import start_gateway

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(**overrides):
    base = dict(host="127.0.0.1", port=0, echo=True, log_level="warning")
    base.update(overrides)
    return config_mod.load(None, env={}, overrides=base)


@contextlib.asynccontextmanager
async def serve(**overrides):
    """A Gateway running in the current event loop on a free port."""
    gw = await start_gateway(make_config(**overrides))
    try:
        yield gw
    finally:
        await gw.shutdown(timeout=1.0)


def ws_url(gw, path="/echo") -> str:
    return f"ws://127.0.0.1:{gw.port}{path}"


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def upgrade_request(path="/echo", key="dGhlIHNhbXBsZSBub25jZQ==", version="13", extra="") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


class GatewayProcess:
    """`python -m gateway serve ...` in a subprocess on a free port, ready when /healthz answers
    (with `--workers N`: once the parent has logged that all N workers are listening)."""

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None) -> None:
        self.port = port or free_port()
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = None
        self._notify: socket.socket | None = None
        self._notify_dir = None
        self.notifications: list[str] = []   # what the process sent to NOTIFY_SOCKET (with --workers)

    def start(self, timeout: float = 15.0) -> "GatewayProcess":
        import tempfile
        fd, self.log_path = tempfile.mkstemp(prefix="gw-", suffix=".log")
        if self.workers > 1 and "NOTIFY_SOCKET" not in self.env:
            # Play systemd (Type=notify): the parent sends READY=1 once all workers listen.
            self._notify_dir = tempfile.mkdtemp(prefix="gw-notify-")
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(os.path.join(self._notify_dir, "notify.sock"))
            self._notify.setblocking(False)
            self.env["NOTIFY_SOCKET"] = self._notify.getsockname()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *self.args], cwd=ROOT, env=self.env,
                                     stdout=fd, stderr=fd)
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    # With --workers N the first worker to answer proves nothing about the others:
                    # ready means the parent told "systemd" READY=1, which it does once every worker listens.
                    if r.status == 200 and (self._notify is None or self._notified_ready()):
                        return self
            except OSError:
                pass
            time.sleep(0.05)   # another process is starting: nothing to await across processes
        raise RuntimeError(f"gateway did not become healthy:\n{self.output()}")

    def _notified_ready(self) -> bool:
        try:
            while True:
                self.notifications.append(self._notify.recv(4096).decode())
        except BlockingIOError:
            pass
        return any("READY=1" in n.split("\n") for n in self.notifications)

    @property
    def workers(self) -> int:
        args = self.args
        for i, arg in enumerate(args):
            if arg == "--workers" and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith("--workers="):
                return int(arg.split("=", 1)[1])
        return 1

    def output(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def url(self, path="/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self._notify is not None:
            import shutil
            self._notify.close()
            shutil.rmtree(self._notify_dir, ignore_errors=True)
        if self.log_path and os.path.exists(self.log_path):
            os.unlink(self.log_path)


def join_ack(reply: dict) -> dict:
    """A join's ack without its position (seq, epoch: always present, checked here)."""
    assert isinstance(reply.get("seq"), int) and isinstance(reply.get("epoch"), str), reply
    return {k: v for k, v in reply.items() if k not in ("seq", "epoch")}
