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
    """`python -m gateway serve ...` in a subprocess on a free port, ready when /healthz answers."""

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None) -> None:
        self.port = port or free_port()
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, timeout: float = 15.0) -> "GatewayProcess":
        import tempfile
        fd, self.log_path = tempfile.mkstemp(prefix="gw-", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *self.args], cwd=ROOT, env=self.env,
                                     stdout=fd, stderr=fd)
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not become healthy:\n{self.output()}")

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
        if self.log_path and os.path.exists(self.log_path):
            os.unlink(self.log_path)


def join_ack(reply: dict) -> dict:
    """A join's ack without its position (seq, epoch: always present, checked here)."""
    assert isinstance(reply.get("seq"), int) and isinstance(reply.get("epoch"), str), reply
    return {k: v for k, v in reply.items() if k not in ("seq", "epoch")}
