"""Exceptions of the Python SDK (gateway.client). Leaf module: standard library only.

Every error carries `code`, a stable string an application can switch on (the same codes
as the JavaScript SDK): the server's error codes (forbidden, bad_room, broker_unavailable,
... see docs/clients.md), and the client's own:

    timeout        no answer within command_timeout
    disconnected   the connection closed while a request without idempotency key was in flight
    closed         the client was closed by the application
    policy         the server closed with 4004: the client stopped
    unauthorized   the handshake was refused with HTTP 401: the client stopped
    forbidden      the handshake was refused with HTTP 403: the client stopped
    token          get_token failed or returned no token
"""
from __future__ import annotations


class ClientError(Exception):
    """Base class of every error the SDK raises; `code` says which."""

    code = "error"

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message or code or self.code)
        if code is not None:
            self.code = code
        self.message = message


class CommandError(ClientError):
    """The server answered a request with {"op":"error","code":C,"message":M}."""

    def __init__(self, code: str, message: str = "", room: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code, code)
        self.message = message
        self.room = room


class CommandTimeout(ClientError, TimeoutError):
    """No answer within `command_timeout` (a publish may or may not have happened: use an
    idempotency key to retry it safely)."""

    code = "timeout"


class ConnectionLost(ClientError):
    """The connection closed while the request was in flight and it is not safe to repeat
    (a publish without an idempotency key): it may or may not have been applied."""

    code = "disconnected"


class ClientClosed(ClientError):
    """The client was closed by the application."""

    code = "closed"


class ClientStopped(ClientClosed):
    """The client stopped reconnecting because retrying cannot help; the application must act.
    `close_code` is the close code (4004) or None; `status` the HTTP status of a refused
    handshake (401, 403) or None."""

    def __init__(self, code: str, message: str, close_code: int | None = None, status: int | None = None) -> None:
        super().__init__(message, code)
        self.close_code = close_code
        self.status = status


class AuthError(ClientStopped):
    """The handshake was refused with HTTP 401 (code "unauthorized": bad or expired token)
    or 403 ("forbidden": the token grants nothing here, or the Origin is not allowed)."""


class PolicyClose(ClientStopped):
    """The server closed the connection with 4004 (code "policy": an operator kicked the
    user, a ban): reconnecting would be refused again, so the client stops."""


class TokenError(ClientError):
    """get_token raised, or returned something that is not a non-empty string."""

    code = "token"
