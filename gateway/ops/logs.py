"""Log setup: JSON lines (journald, log shippers) or human-readable text.

Structured fields come from `extra={...}` on the logging call. The connection life cycle
is one line per event, always with `event` and `conn` (the connection id) and, where known,
`peer` (ip:port), `user` (the token's subject), `code` and `reason` (close / HTTP status):

    event=open     a WebSocket was accepted (path, subprotocol)
    event=close    it ended (code, reason; 1006 when the TCP connection just died)
    event=reject   an HTTP request / upgrade was refused (status, reason)
    event=keepalive_timeout, slow_consumer, ...   the gateway closed it, and why

Tokens and message payloads are never logged at INFO: call sites do not pass them, and as a
second line of defence any field named like a credential (`token`, `authorization`,
`password`, `secret`, `api_key`) is replaced by "[redacted]" here.
Leaf module: imports only the standard library.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("token", "authorization", "password", "secret", "api_key", "apikey")
REDACTED = "[redacted]"


@functools.lru_cache(maxsize=1024)
def _is_secret(key: str) -> bool:
    # Cached: the same dozen field names come by on every life-cycle line.
    key = key.lower()
    return any(word in key for word in _SECRET_WORDS)


def _fields(record: logging.LogRecord) -> dict:
    return {k: (REDACTED if _is_secret(k) else v) for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": _pid(),   # several workers may share one stream
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # e.g. a non-str dict key in a field: fall back to the forgiving encoder
            return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`time LEVEL [pid] message  key=value ...`: the pid tells the workers of one port apart."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
        line = (f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} "
                f"[{_pid()}] {record.getMessage()}")
        if extra:
            line += "  " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value) -> str:
    """One token per field in text mode: quote values with spaces, escape newlines."""
    text = str(value)
    if not text or any(c in text for c in " \n\r\t\"="):
        return json.dumps(text)
    return text


class BatchingStreamHandler(logging.StreamHandler):
    """A stream handler that writes INFO lines in batches instead of one write(2) per line.

    Every connection logs its open and close: at 15,000 handshakes per second one write
    per line -- or even one per event-loop pass, which at 50 concurrent handshakes is
    nearly one per line -- cost about a quarter of the handshake's CPU (compare --mode
    handshake, 0.87x picows with per-pass writes). Inside a running loop, lines below
    WARNING are collected and written together when `MAX_DELAY` seconds have passed since
    the first one or `MAX_BYTES` have piled up, like nginx's `access_log ... buffer= flush=`.
    WARNING and above flush what is pending and are written at once; anything logged
    outside a loop is written at once; `flush()` (logging.shutdown at exit, a graceful
    stop) writes the rest. A crash (SIGKILL) loses at most MAX_DELAY of INFO lines.
    """

    MAX_DELAY = 0.1          # seconds an INFO line may wait
    MAX_BYTES = 64 * 1024    # pending bytes that trigger a write at once

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._timer = None
        self._timer_loop = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self._write_pending()
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line)

    def add_line(self, line: str) -> None:
        """Queue an already formatted INFO line (see LifecycleLog) for the next batch."""
        timer = self._timer
        if timer is not None and not self._timer_loop.is_closed():
            # A batch is open in a live loop: no asyncio.get_running_loop() per line (it
            # calls getpid(2) each time: one system call per log line).
            self._pending.append(line)
            self._pending_bytes += len(line) + 1
            if self._pending_bytes >= self.MAX_BYTES:
                self._write_pending()
            return
        self._write_pending()   # nothing pending, or a batch left behind by a closed loop (tests)
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()
            return
        self._pending_bytes = len(line) + 1
        self._timer = loop.call_later(self.MAX_DELAY, self._write_pending)
        self._timer_loop = loop

    def _write_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            lines, self._pending = self._pending, []
            self._pending_bytes = 0
            try:
                self.stream.write("\n".join(lines) + "\n")
                super().flush()
            except Exception:  # pragma: no cover - e.g. a closed stderr
                pass

    def flush(self) -> None:
        # logging.shutdown() at exit flushes handlers: the pending lines are not lost.
        self._write_pending()
        super().flush()


def resolve_format(fmt: str, stream) -> str:
    """"auto" is text when a person is watching (the stream is a terminal), else JSON (journald,
    files, log shippers: one parseable object per line)."""
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return "json"


def setup(level: str = "info", fmt: str = "auto", stream=None) -> logging.Handler:
    """Route every logger to one stream handler (stderr: journald adds its own timestamp/PID)."""
    # Skip what no line of ours prints (logging HOWTO, "Optimization"): the caller's frame
    # walk (findCaller), thread, process and multiprocessing names -- about a third of the
    # cost of each connection's open/close line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _json_handler
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _json_handler = handler if fmt == "json" else None
    return handler


_json_handler: BatchingStreamHandler | None = None   # set by setup() in JSON mode
_PID = [os.getpid()]


def _pid() -> int:
    # os.getpid() is a system call; the workers are forked after setup(), hence the fork hook.
    return _PID[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
_ts_second = [-1, ""]


def _timestamp(now: float) -> str:
    # strftime once per second, not once per line.
    second = int(now)
    if second != _ts_second[0]:
        _ts_second[0] = second
        _ts_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_ts_second[1]}.{int((now - second) * 1000):03d}Z"


class RateLimitedLog:
    """At most one WARNING line per `interval` seconds for one kind of event.

    For events a client can cause at will (an odd request that makes the HTTP phase raise):
    a flood must not become a flood of log lines. The line says how many more happened
    since the previous one (`suppressed`); the traceback of each goes to DEBUG, so a
    developer can still see every one with `--log-level debug`.
    """

    __slots__ = ("logger", "interval", "clock", "_next", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock=time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def warning(self, msg: str, fields: dict, exc_info: bool = True) -> bool:
        """Log `msg` at WARNING unless one was logged less than `interval` ago; True if written."""
        logger = self.logger
        if exc_info and logger.isEnabledFor(logging.DEBUG):
            logger.debug(msg, exc_info=True, extra=fields)
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return False
        self._next = now + self.interval
        fields = {**fields, "suppressed": self._suppressed}
        self._suppressed = 0
        logger.warning(msg, extra=fields)
        return True


class LifecycleLog:
    """Lines of the connection life cycle (open, close, reject) without a LogRecord each.

    At the default level every connection logs one line, when it closes (what an access
    log does: who, from where, which endpoint, how it ended); the open line is DEBUG.
    Through the logging module (record, filters, formatter) each line cost ~40% of a whole
    handshake's CPU, and even this fast path costs ~5 µs per line in a ~70 µs handshake
    (compare --mode handshake: +15% handshakes/s without the open line). When setup()
    installed the JSON handler and it is the only one, the line is built here -- the same
    fields and format as JsonFormatter, in one orjson call -- and joined to that handler's
    batch. Otherwise (text format, other or extra handlers, e.g. a test capturing records)
    it goes through the logger.
    """

    __slots__ = ("logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger = logging.getLogger(name)

    def enabled(self, level: int) -> bool:
        """Whether a line at `level` would be written (check before building the fields)."""
        return self.logger.isEnabledFor(level)

    def info(self, msg: str, fields: dict) -> None:
        self._line(logging.INFO, "info", msg, fields)

    def debug(self, msg: str, fields: dict) -> None:
        self._line(logging.DEBUG, "debug", msg, fields)

    def _line(self, level: int, level_name: str, msg: str, fields: dict) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        handler = _json_handler
        root_handlers = logging.root.handlers
        if handler is None or len(root_handlers) != 1 or root_handlers[0] is not handler or logger.handlers:
            logger.log(level, msg, extra=fields)
            return
        doc = {"ts": _timestamp(time.time()), "level": level_name, "logger": self.name, "msg": msg, "pid": _pid()}
        # Life-cycle field names are fixed by connection.py and never secrets (tests/test_logs.py
        # checks them against _is_secret), so they are merged without redaction.
        doc.update(fields)
        try:
            line = orjson.dumps(doc, default=str).decode()
        except TypeError:
            line = json.dumps(doc, default=str, separators=(",", ":"))
        handler.add_line(line)
