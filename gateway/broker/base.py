"""The Broker interface: how one process's publications reach every process with members.

Push, not pull: the Hub is the broker's handler. The hub subscribes a room when its first
local member joins and unsubscribes after the last one leaves, so a process only receives
traffic for rooms it serves. Delivery to the handler is never inline with `publish()` (the
memory broker uses `call_soon`), so both brokers have the same semantics.

A publication is (room, seq, data): `data` is the already-serialised JSON of the client's
"data" value (bytes, encoded once by the publisher), and `seq` the room's sequence number,
assigned by the broker at publish time so every process sees the same numbering and a
gap is a real gap. Imports nothing from the rest of `gateway`.
"""
from __future__ import annotations

import abc
from typing import Protocol


class BrokerUnavailable(Exception):
    """The broker cannot take publications right now (e.g. Redis is down).

    `delivered_locally`: the publication still reached this process's members (the Redis
    broker's local fallback), so a publisher that retries will duplicate it for them.
    """

    def __init__(self, message: str = "", *, delivered_locally: bool = False) -> None:
        super().__init__(message)
        self.delivered_locally = delivered_locally


class BrokerHandler(Protocol):
    def handle_publication(self, room: str, seq: int, data: bytes) -> None:
        """A publication for a subscribed room arrived (called from the event loop)."""

    def handle_broker_state(self, connected: bool) -> None:
        """The broker lost or regained its backend (log once, flip readiness, count)."""


class Broker(abc.ABC):
    #: True while publications can be accepted and delivered across processes.
    connected: bool = True
    name: str = "broker"

    @abc.abstractmethod
    async def start(self, handler: BrokerHandler) -> None:
        """Connect and begin delivering publications to `handler`."""

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """Start receiving `room` (raises BrokerUnavailable if that cannot be done now)."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """Stop receiving `room`."""

    @abc.abstractmethod
    async def publish(self, room: str, data: bytes) -> int:
        """Publish serialised `data` to `room`; return its sequence number.

        Raises BrokerUnavailable when the publication cannot be accepted; never claims
        delivery that did not happen.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections."""

    def stats(self) -> dict:
        """Counters for metrics (publishes, errors, reconnects, ...)."""
        return {}
