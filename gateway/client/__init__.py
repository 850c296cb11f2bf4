"""ws-gateway's Python SDK: an asyncio client that reconnects, re-joins with positions,
recovers gaps, refreshes its token and acts on the gateway's close codes.

    from gateway.client import Client

    async with Client("wss://host/ws", get_token=fetch_token) as client:
        sub = await client.join("chat", since=saved_position)
        sub.on("reset", lambda ev: reload_state())
        seq = await client.publish("chat", {"text": "hi"}, idempotency_key="msg-1")
        async for msg in sub:
            print(msg.seq, msg.data)

Install with `pip install ws-gateway[client]` (adds `websockets`). This package imports
nothing of the server (no gateway_ext, uvloop, redis): .importlinter and
tests/unit/test_client_import.py keep it that way. Guide: docs/clients.md#python.
"""
from .backoff import Backoff
from .core import Client, ClientState, jwt_exp
from .errors import (AuthError, ClientClosed, ClientError, ClientStopped, CommandError, CommandTimeout,
                     ConnectionLost, PolicyClose, TokenError)
from .events import Connected, Disconnected, Joined, Left, Message, Position, Reset
from .subscription import Subscription
from .transport import HandshakeRejected, Transport, TransportClosed, websockets_connect

__all__ = [
    "Client", "ClientState", "Subscription", "Message", "Position", "Backoff", "jwt_exp",
    "Connected", "Disconnected", "Joined", "Reset", "Left",
    "ClientError", "CommandError", "CommandTimeout", "ConnectionLost", "ClientClosed", "ClientStopped",
    "AuthError", "PolicyClose", "TokenError",
    "Transport", "TransportClosed", "HandshakeRejected", "websockets_connect",
]
