"""The worker supervisor: `--workers N` forks N gateway processes on one port and keeps N running.

Role. The parent process serves nobody itself: it forks the workers (each binds the shared
port with SO_REUSEPORT and runs its own event loop), forwards signals to them, restarts one
that dies, and exits with a status that says how the run ended. It must not import the
server, the rooms or the broker: `app` hands it the function that runs one worker, so the
parent stays small and never builds an event loop (a fork after a loop exists would copy it).

Readiness. Each worker writes its index to a pipe shared with the parent once its listener
accepts. The parent logs `workers ready` (and tells systemd READY=1) when every worker slot
has been ready at least once; a restarted worker logs `worker ready` again. Tests and
operators wait for that line instead of for the first worker that happens to answer.

A worker that dies. Whatever the cause (SIGKILL, segfault, the OOM killer, an exception)
the parent logs `worker exited` at error level with the pid, the slot, the exit code or the
signal's name, and forks a replacement for the same slot (same metrics port, metrics_port +
index). The other workers keep serving: the kernel stops handing the dead worker's share of
new connections to its closed socket at once. Crash-loop backoff: a worker that dies after
running at least `STABLE_SECONDS` is replaced at once; each further death within that time
of its (re)start after the first doubles the delay (0.5, 1, 2 ... `MAX_BACKOFF` s), so a worker that
crashes on every request does not fork hundreds of times a second.

Exit status of the parent (documented in docs/operations.md):
  0  a SIGTERM/SIGINT/SIGUSR2 drained every worker and each exited 0;
  1  a worker did not exit cleanly during the shutdown (non-zero status, killed by a signal,
     or a second SIGTERM that skipped its drain);
  2  a worker failed before it ever became ready on its first start (e.g. its metrics port is
     in use, a TLS file unreadable): restarting would fail the same way, so the parent stops the
     other workers and exits instead of crash-looping. The worker logs one line saying why
     (`worker 0 cannot start: ...`; the traceback only at debug level).
If the parent itself is killed, each worker gets SIGTERM (Linux PR_SET_PDEATHSIG) and drains.

Imports: the standard library and `gateway.ops.systemd` only.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import struct
import sys
import time
from typing import Callable

from gateway.ops import systemd

log = logging.getLogger("gateway.server.supervisor")

STABLE_SECONDS = 10.0   # a worker that lived this long before dying is not crash-looping
MAX_BACKOFF = 30.0      # cap of the crash-loop delay
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_READY = struct.Struct("=ii")   # (slot, pid): 8 bytes, written atomically (< PIPE_BUF)

EXIT_OK, EXIT_UNCLEAN, EXIT_STARTUP = 0, 1, 2


def describe_status(status: int) -> tuple[str, int | None, str | None]:
    """A wait status as (text, exit code or None, signal name or None), e.g. ("killed by SIGKILL", None, "SIGKILL")."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {name}{core}", None, name
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}", code, None


def backoff(strikes: int) -> float:
    """Delay before restarting a worker that died `strikes` times in a row within STABLE_SECONDS."""
    if strikes <= 1:
        return 0.0
    return min(MAX_BACKOFF, 0.5 * 2.0 ** (strikes - 2))


class _Slot:
    __slots__ = ("index", "pid", "started", "ready", "ever_ready", "strikes", "restart_at", "restarts")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0            # 0: not running
        self.started = 0.0      # monotonic time of the last fork
        self.ready = False      # the running process reported its listener up
        self.ever_ready = False
        self.strikes = 0        # consecutive quick deaths
        self.restart_at: float | None = None
        self.restarts = 0


def _set_parent_death_signal(sig: int) -> None:
    """Linux: deliver `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol: best effort
        pass


class Supervisor:
    """Fork, watch and restart `count` workers; `run_worker(index, on_ready) -> exit code` runs one."""

    def __init__(self, count: int, run_worker: Callable[[int, Callable[[], None]], int]) -> None:
        self.count = count
        self.run_worker = run_worker
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping: int | None = None     # the signal that started the shutdown
        self.exit_status = EXIT_OK
        self._signals: list[int] = []
        self._all_ready_logged = False

    # -- the parent's loop ------------------------------------------------------------------

    def run(self) -> int:
        ready_r, ready_w = os.pipe()
        wake_r, wake_w = os.pipe()
        for fd in (ready_r, wake_r, wake_w):
            os.set_blocking(fd, False)
        self._ready_r, self._ready_w = ready_r, ready_w
        self._wake_r, self._wake_w = wake_r, wake_w
        # Block the signals while forking, so none arrives between a fork and the handler
        # (a Ctrl-C then would be a KeyboardInterrupt in the parent and orphan the workers).
        watched = (*FORWARDED, signal.SIGCHLD)
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in watched}
        try:
            for slot in self.slots:
                self._spawn(slot)
            log.info("workers started", extra={"event": "workers", "pids": [s.pid for s in self.slots]})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
            while any(s.pid for s in self.slots) or (self.stopping is None and self._restart_pending()):
                self._wait()
                self._read_ready()
                self._handle_signals()
                self._reap()
                if self.stopping is None:
                    self._restart_due()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, watched)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
            for fd in (ready_r, ready_w, wake_r, wake_w):
                os.close(fd)
        log.info("workers stopped", extra={"event": "workers_stopped", "status": self.exit_status,
                                           "signal": signal.Signals(self.stopping).name if self.stopping else None})
        return self.exit_status

    def _on_signal(self, sig, _frame) -> None:
        # Only record it: the loop acts on it (the wakeup fd ends its select).
        self._signals.append(sig)

    def _restart_pending(self) -> bool:
        return any(s.restart_at is not None for s in self.slots)

    def _wait(self) -> None:
        timeout = None
        pending = [s.restart_at for s in self.slots if s.restart_at is not None and self.stopping is None]
        if pending:
            timeout = max(0.0, min(pending) - time.monotonic())
        try:
            select.select([self._wake_r, self._ready_r], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGCHLD:
                continue   # _reap runs after this
            if sig in STOPPING:
                if self.stopping is None:
                    self.stopping = sig
                    for slot in self.slots:
                        slot.restart_at = None
                    log.info("stopping workers", extra={"event": "workers_stopping", "signal": signal.Signals(sig).name,
                                                        "pids": [s.pid for s in self.slots if s.pid]})
                    systemd.notify("STOPPING=1")
            self._forward(sig)

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        for off in range(0, len(data) - len(data) % _READY.size, _READY.size):
            index, pid = _READY.unpack_from(data, off)
            if 0 <= index < self.count and self.slots[index].pid == pid:
                slot = self.slots[index]
                slot.ready = slot.ever_ready = True
                if self._all_ready_logged:
                    log.info("worker ready", extra={"event": "worker_ready", "worker": index, "pid": pid,
                                                    "restarts": slot.restarts})
        if not self._all_ready_logged and all(s.ever_ready for s in self.slots):
            self._all_ready_logged = True
            pids = [s.pid for s in self.slots]
            log.info("workers ready", extra={"event": "workers_ready", "workers": self.count, "pids": pids})
            systemd.notify("READY=1", f"STATUS={self.count} workers ready")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._read_ready()   # a worker may have reported ready just before it died
            self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        text, code, signame = describe_status(status)
        lived = time.monotonic() - slot.started
        pid, slot.pid, was_ready = slot.pid, 0, slot.ready
        slot.ready = False
        fields = {"event": "worker_exit", "worker": slot.index, "pid": pid, "exit_code": code, "signal": signame,
                  "uptime_s": round(lived, 3)}
        if self.stopping is not None:
            clean = code == 0
            if not clean:
                self.exit_status = max(self.exit_status, EXIT_UNCLEAN)
            (log.info if clean else log.error)("worker stopped" if clean else f"worker {text} during shutdown",
                                              extra=fields)
            return
        if not slot.ever_ready:
            # Never came up, on its first start: a start-up error (port in use, bad TLS file).
            log.error(f"worker {text} before it became ready: stopping", extra=fields)
            self.exit_status = EXIT_STARTUP
            self.stopping = signal.SIGTERM
            for other in self.slots:
                other.restart_at = None
            self._forward(signal.SIGTERM)
            return
        slot.strikes = slot.strikes + 1 if (lived < STABLE_SECONDS or not was_ready) else 0
        delay = backoff(slot.strikes)
        slot.restart_at = time.monotonic() + delay
        log.error(f"worker {text}; restarting it" + (f" in {delay:g} s (crash loop)" if delay else ""),
                  extra={**fields, "restart_in_s": delay, "strikes": slot.strikes})

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                slot.restarts += 1
                self._spawn(slot)
                log.info("worker restarted", extra={"event": "worker_restart", "worker": slot.index,
                                                    "pid": slot.pid, "restarts": slot.restarts})

    # -- forking -------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        parent = os.getpid()
        # Whatever sits in the log handler's buffer would otherwise be written twice.
        for handler in logging.getLogger().handlers:
            handler.flush()
        pid = os.fork()
        if pid == 0:
            self._child(slot.index, parent)   # never returns
        slot.pid = pid
        slot.started = time.monotonic()
        slot.ready = False

    def _child(self, index: int, parent: int) -> None:
        code = 1
        try:
            # Own process group: a Ctrl-C (SIGINT to the terminal's foreground group) reaches the
            # parent only, which forwards it once; a worker that got it twice would take the
            # second copy as "exit now" and skip the drain.
            os.setpgid(0, 0)
            _set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != parent:   # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
            signal.set_wakeup_fd(-1)
            os.close(self._ready_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            # Until the worker's event loop takes the signals over: a stop signal means there is
            # nothing to drain yet, so exit 0 (not death by SIG_DFL, which the parent would count as
            # an unclean exit); a SIGHUP has nothing to reload yet (the config is being read now).
            for sig in STOPPING:
                signal.signal(sig, _exit_before_serving)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (*FORWARDED, signal.SIGCHLD))
            ready_w = self._ready_w
            started = []

            def on_ready() -> None:
                started.append(True)
                try:
                    os.write(ready_w, _READY.pack(index, os.getpid()))
                except OSError:
                    pass   # the parent is gone; PR_SET_PDEATHSIG stops us

            code = self.run_worker(index, on_ready)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            if started:
                log.exception("worker crashed", extra={"event": "worker_crash", "worker": index})
                code = 1
            else:
                # A start-up failure (a port in use, an unreadable file): one line that says what,
                # the traceback only at debug level. Status 2, like a single process's start-up error.
                log.error(f"worker {index} cannot start: {exc}",
                          extra={"event": "worker_start_failed", "worker": index, "error": f"{type(exc).__name__}: {exc}"})
                log.debug("worker start-up traceback", exc_info=True, extra={"worker": index})
                code = 2
        finally:
            # os._exit skips atexit and logging.shutdown(): flush the log handlers ourselves, or
            # the last lines (the drain's "connection closed", "stopped") would be lost.
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001 - exiting regardless
                pass
            # _exit, not exit: never unwind into the parent's stack or run its atexit hooks.
            os._exit(code if isinstance(code, int) else 1)


def _exit_before_serving(sig, _frame) -> None:
    # Nothing is served yet, so nothing to drain: leave now with status 0. Not by raising
    # SystemExit, which would surface inside whatever loop callback was running (a Redis
    # connection being opened) as a logged traceback.
    try:
        logging.shutdown()
    finally:
        os._exit(0)


def run_workers(count: int, run_worker: Callable[[int, Callable[[], None]], int]) -> int:
    """Supervise `count` workers until a stopping signal; return the parent's exit status."""
    try:
        return Supervisor(count, run_worker).run()
    except OSError as exc:  # pragma: no cover - fork/pipe failing: out of processes or fds
        if exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE):
            log.error("cannot start workers", extra={"event": "workers", "error": str(exc)})
            return EXIT_STARTUP
        raise
