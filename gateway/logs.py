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

import json
import logging
import os
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("token", "authorization", "password", "secret", "api_key", "apikey")
REDACTED = "[redacted]"


def _is_secret(key: str) -> bool:
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
            "pid": os.getpid(),   # several workers may share one stream
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.getMessage()}"
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


def setup(level: str = "info", fmt: str = "json", stream=None) -> logging.Handler:
    """Route every logger to one stream handler (stderr: journald adds its own timestamp/PID)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
