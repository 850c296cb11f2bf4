"""Start a server from a shell command on a free port, wait until it listens, stop it.

The command is a template: `{port}` is replaced by a free port. The server runs in its
own session (process group), so stopping it also stops the workers it forked; stopping
signals only that group, by its id, first SIGTERM then SIGKILL after a bound.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time


class ServerFailed(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pin_to(cpus):
    """A preexec_fn pinning the child to `cpus` (None or unsupported: no pinning)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None

    def pin() -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass

    return pin


class Server:
    def __init__(self, command_template: str, host: str = "127.0.0.1", cpus=None, cwd=None) -> None:
        self.port = free_port(host)
        self.host = host
        self.command = command_template.replace("{port}", str(self.port))
        self.log = tempfile.NamedTemporaryFile(prefix="loadtool-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            self.command, shell=True, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin_to(cpus),
        )

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}: {self.command}\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise ServerFailed(f"server did not listen on {self.host}:{self.port} within {timeout}s: {self.command}\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        # Workers of a multi-process server may outlive the shell's main process.
        self._signal_group(signal.SIGKILL)
        self.log.close()

    def discard_log(self) -> None:
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)   # the group this Popen created (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 20) -> str:
        self.log.flush()
        try:
            with open(self.log.name, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
