"""Exceptions of the Python SDK (gateway.client). Leaf module: standard library only."""
from __future__ import annotations


class ClientError(Exception):
    """Base class of every error the SDK raises."""


class CommandError(ClientError):
    """The server answered a request with {"op":"error"}: `code` is one of the stable codes
    of the protocol (bad_room, forbidden, too_many_rooms, broker_unavailable, ...)."""

    def __init__(self, code: str, message: str = "", room: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.room = room


class CommandTimeout(ClientError, TimeoutError):
    """No answer within `command_timeout` (a publish may or may not have happened: use an
    idempotency key to retry it safely)."""


class ConnectionLost(ClientError):
    """The connection closed while the request was in flight and the request is not safe to
    repeat (a publish without an idempotency key): it may or may not have been applied."""


class ClientClosed(ClientError):
    """The client was closed (by the application, or stopped by the server: see `cause`)."""


class ClientStopped(ClientClosed):
    """The client stopped reconnecting because retrying cannot help; the application must act.
    `code` is the close code (4001, 4004) or the HTTP status of the refused handshake (401, 403)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class AuthError(ClientStopped):
    """The handshake was refused with HTTP 401 or 403 (bad, expired or forbidden token), or the
    token expired (4001) and no `get_token` can renew it."""


class PolicyClose(ClientStopped):
    """The server closed the connection with 4004: its policy (an operator kicked the user,
    a ban): reconnecting would be refused again, so the client stops."""


class TokenError(ClientError):
    """`get_token` failed or returned something that is not a non-empty string."""
