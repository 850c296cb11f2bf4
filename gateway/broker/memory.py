"""The in-memory broker: one process, no Redis. The default.

Delivery goes through `loop.call_soon`, never inline, so a publisher's own message comes
back exactly as it would through Redis (after the publish call returns). Per-room
sequence numbers live here while the room is subscribed.
"""
from __future__ import annotations

import asyncio

from gateway.broker.base import Broker, BrokerHandler


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq: dict[str, int] = {}   # subscribed rooms -> last sequence number
        self.publishes = 0

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        handler.handle_broker_state(True)

    async def subscribe(self, room: str) -> None:
        self._seq.setdefault(room, 0)

    async def unsubscribe(self, room: str) -> None:
        self._seq.pop(room, None)

    async def publish(self, room: str, data: bytes) -> int:
        return self.publish_nowait(room, data)

    def publish_nowait(self, room: str, data: bytes) -> int:
        """Synchronous publish for the hot path (no coroutine needed in memory)."""
        seq = self._seq.get(room)
        self.publishes += 1
        if seq is None:
            return 0
        seq += 1
        self._seq[room] = seq
        self._loop.call_soon(self._handler.handle_publication, room, seq, data)
        return seq

    async def close(self) -> None:
        self._seq.clear()

    def stats(self) -> dict:
        return {"publishes": self.publishes, "rooms": len(self._seq)}
