"""The Broker interface: how one process's publications reach every process with members,
and how a room's recent publications are kept so a client can recover what it missed.

Push, not pull: the Hub is the broker's handler. The hub subscribes a room when its first
local member joins and unsubscribes after the last one leaves, so a process only receives
traffic for rooms it serves. Delivery to the handler is never inline with `publish()` (the
memory broker uses `call_soon`), so both brokers have the same semantics.

A publication is (room, seq, data, epoch): `data` is the already-serialised JSON of the
client's "data" value (bytes, encoded once by the publisher); `seq` the room's sequence
number, assigned by the broker at publish time so every process sees the same numbering and
a gap is a real gap; `epoch` a short random string minted whenever the room's numbering
(re)starts (a Redis restart without persistence, expiry, a memory-broker process start).
A room's position is (epoch, seq). seq 0 means "not numbered" (delivered by this process
only while the broker's backend is down): it moves no position.

History. Every broker keeps, per room, the last `Retention.size` publications for
`Retention.ttl` seconds after the room's last publication (`history()` reads them), and the
room's position (epoch, top seq) longer than that (`Retention.meta_ttl`), so a client that was
idle learns "nothing new" instead of "too old". `size == 0` keeps no publications, only the
numbering. The broker asks `retention(room)` (given at construction) once per room.

Idempotency. `publish(..., idempotency_key=K)`: a second publish to the same room with the
same K within the room's `ttl` publishes nothing and returns the original (seq, epoch),
decided atomically with the numbering.

Imports nothing from the rest of `gateway`.
"""
from __future__ import annotations

import abc
import asyncio
from typing import Callable, NamedTuple, Protocol, runtime_checkable

DEFAULT_HISTORY_SIZE = 100
DEFAULT_HISTORY_TTL = 300
MAX_IDEMPOTENCY_KEY_CHARS = 128


class BrokerUnavailable(Exception):
    """The broker cannot take publications right now (e.g. Redis is down).

    `delivered_locally`: the publication still reached this process's members (the Redis
    broker's local fallback), so a publisher that retries will duplicate it for them.
    """

    def __init__(self, message: str = "", *, delivered_locally: bool = False) -> None:
        super().__init__(message)
        self.delivered_locally = delivered_locally


class Retention(NamedTuple):
    """How long a room's history lives: `size` publications (0: none), `ttl` seconds after
    the room's last publication (also the idempotency window)."""

    size: int = DEFAULT_HISTORY_SIZE
    ttl: int = DEFAULT_HISTORY_TTL

    @property
    def meta_ttl(self) -> int:
        """How long the position (epoch, top seq) outlives the last publication: twice the
        history's TTL, so an idle client learns "nothing new" for a while after the history
        itself expired. Brokers also refresh it while a process holds the room."""
        return 2 * self.ttl


def default_retention(room: str) -> Retention:
    return Retention()


class Publication(NamedTuple):
    seq: int
    data: bytes


class History(NamedTuple):
    """A history read: the room's current position and the publications after `since`.

    `publications` are in seq order, each with seq > since, at most `limit` of them, the
    oldest first. If the first one's seq is not since + 1 (or there are none and
    top > since) the history no longer holds what came right after `since`.
    """

    epoch: str
    top: int
    publications: list


class BrokerHandler(Protocol):
    def handle_publication(self, room: str, seq: int, data: bytes, epoch: str | None) -> None:
        """A publication for a subscribed room arrived (called from the event loop).
        `epoch` is None only for seq 0 (not numbered)."""

    def handle_broker_state(self, connected: bool) -> None:
        """The broker lost or regained its backend (log once, flip readiness, count)."""


@runtime_checkable
class SyncPublisher(Protocol):
    """A broker that numbers a publication without awaiting anything (memory)."""

    def publish_nowait(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        """As Broker.publish, synchronously."""


@runtime_checkable
class QueuedPublisher(Protocol):
    """A broker that keeps call order and can queue publications before any is awaited (Redis)."""

    def publish_future(self, room: str, data: bytes, idempotency_key: str | None = None) -> asyncio.Future:
        """Queue now; the future resolves to (seq, epoch) or fails with BrokerUnavailable."""


class Broker(abc.ABC):
    #: True while publications can be accepted and delivered across processes.
    connected: bool = True
    name: str = "broker"

    def __init__(self, retention: Callable[[str], Retention] | None = None) -> None:
        self.retention = retention or default_retention

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
    async def publish(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        """Number, store (history) and publish serialised `data`; return (seq, epoch).

        Raises BrokerUnavailable when the publication cannot be accepted; never claims
        delivery that did not happen. With `idempotency_key`, a repeat within the room's
        TTL returns the first publication's (seq, epoch) and publishes nothing.
        """

    @abc.abstractmethod
    async def history(self, room: str, since: int, limit: int) -> History:
        """The room's position and up to `limit` publications with seq > `since`, oldest first.

        `limit` 0 reads only the position (the top seq and the epoch). A room the broker
        knows nothing about gets a fresh epoch and top 0, which later publications continue.
        Raises BrokerUnavailable when the backend cannot be read.
        """

    async def position(self, room: str) -> tuple[int, str]:
        """The room's (top seq, epoch): a history read of no publications."""
        found = await self.history(room, 0, 0)
        return found.top, found.epoch

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections."""

    def degraded(self) -> str:
        """While connected: why only part of the rooms can cross processes ("" when all can),
        e.g. a Redis Cluster shard that is down. Shown on /readyz, which still says 200."""
        return ""

    def stats(self) -> dict:
        """Counters for metrics (publishes, errors, reconnects, ...)."""
        return {}
