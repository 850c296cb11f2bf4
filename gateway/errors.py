"""Gateway-level errors and the 4xxx close codes a client developer may see.

Leaf module: imports only the standard library.
"""
from enum import IntEnum


class HandshakeRejected(Exception):
    """Refuse an HTTP request / WebSocket upgrade with `status` and a one-line `reason`.

    With an error `code` (a JSON API's refusal), the body is JSON, `{"ok": false, "error":
    code, "detail": reason}`, like the API's answers; otherwise it is the reason as text.
    `quiet`: logged at DEBUG, not INFO (requests browsers make by themselves, e.g. a favicon).
    """

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None,
                 code: str | None = None, quiet: bool = False) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.code = code
        self.quiet = quiet

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why.

    `errors` lists every problem found, each with its location (file:line, $VAR or --flag).
    """

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors) if errors else [message]


class StartupError(Exception):
    """The gateway cannot start (a port in use, an address this machine does not have, ...).

    Its message is one line naming what failed and what to do; the CLI prints it and exits
    with status 2 (the traceback only at --log-level debug).
    """


class GatewayCloseCode(IntEnum):
    """Close codes the gateway sends (4000-4999 are private use, RFC 6455 section 7.4.2).

    Each line is what a client developer should read to act on it.
    """

    SLOW_CONSUMER = 4000        # you did not read fast enough; your queue passed max_queue_bytes
    TOKEN_EXPIRED = 4001        # your token expired and no {"op":"refresh"} arrived in time
    RATE_LIMITED = 4002         # you sent messages faster than the per-connection rate limit
    TOO_MANY_ERRORS = 4003      # too many invalid requests in a row (malformed JSON, unknown ops, ...)
    POLICY = 4004               # the server's policy closed you (e.g. an operator kicked the user)
    DISCONNECTED = 4005         # the backend disconnected you (server API); reconnecting is fine
    DISCONNECTED_FOR_GOOD = 4006  # the backend disconnected you and asks you NOT to reconnect
    # Server API `disconnect` may also send its own code: 4005-4499 mean "you may reconnect",
    # 4500-4999 "do not reconnect" (docs/api.md); SDKs act on the range.


CLOSE_REASONS = {
    GatewayCloseCode.SLOW_CONSUMER: "slow consumer: outbound queue limit exceeded",
    GatewayCloseCode.TOKEN_EXPIRED: "token expired",
    GatewayCloseCode.RATE_LIMITED: "message rate limit exceeded",
    GatewayCloseCode.TOO_MANY_ERRORS: "too many invalid requests",
    GatewayCloseCode.POLICY: "closed by server policy",
    GatewayCloseCode.DISCONNECTED: "disconnected by the server",
    GatewayCloseCode.DISCONNECTED_FOR_GOOD: "disconnected by the server; do not reconnect",
}
