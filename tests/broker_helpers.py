"""Helpers for broker tests: a recording BrokerHandler and a same-slot sentinel room."""
from __future__ import annotations

import asyncio
import itertools

from redis.crc import key_slot

from gateway.broker.redis import room_tag

TIMEOUT = 10.0


class Recorder:
    """A BrokerHandler that records what arrives, and in which task."""

    def __init__(self) -> None:
        self.publications: list[tuple[str, int, bytes]] = []
        self.epochs: list[str | None] = []      # the epoch of each publication, in order
        self.states: list[bool] = []
        self.tasks: list = []
        self._changed = asyncio.Event()

    def handle_publication(self, room: str, seq: int, data: bytes, epoch: str | None = None) -> None:
        self.publications.append((room, seq, data))
        self.epochs.append(epoch)
        self.tasks.append(asyncio.current_task())
        self._changed.set()

    def handle_broker_state(self, connected: bool) -> None:
        self.states.append(connected)
        self._changed.set()

    async def wait_states(self, states: list[bool]) -> None:
        """Wait until the state history is exactly `states` (fails if it goes past it)."""
        await self.wait_for(lambda: self.states[:len(states)] == states or len(self.states) >= len(states))
        assert self.states == states

    def of(self, room: str) -> list[tuple[int, bytes]]:
        return [(seq, data) for r, seq, data in self.publications if r == room]

    async def wait_for(self, predicate) -> None:
        async def poll():
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(poll(), TIMEOUT)

    async def wait_count(self, room: str, n: int) -> list[tuple[int, bytes]]:
        await self.wait_for(lambda: len(self.of(room)) >= n)
        return self.of(room)


def same_slot_room(room: str, prefix: str = "") -> str:
    """Another room whose channel hashes to `room`'s cluster slot (ordering sentinel)."""
    # Channels are `<prefix>{tag}`: the slot is the CRC of the room's tag alone.
    target = key_slot(room_tag(room))
    for i in itertools.count():
        candidate = f"sentinel-{i}"
        if key_slot(candidate.encode()) == target:
            return candidate
