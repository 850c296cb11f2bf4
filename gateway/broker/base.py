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


# -- presence and cross-process commands (issue 16) -----------------------------------------
#
# A second, independent backend next to the Broker: who is in which room (user level, across
# processes), the cluster's control channel (disconnect, unsubscribe, revoke, queries), the
# per-user connection cap and the revocation list. Memory: gateway/broker/memory_presence.py;
# Redis: gateway/broker/redis_presence.py (+ presence.lua). Both are created only when a
# feature needs them, so a gateway without presence pays nothing on any path.

#: One presence operation of a batch: ("a", conn_key, user, info_json, "") adds or refreshes a
#: connection in a room, ("r", conn_key, "", "", "") removes it. `user` is the token's `sub`,
#: or ANONYMOUS_PREFIX + conn_key for a connection without a user.
PresenceOp = tuple

#: Prefix of the user key of an anonymous connection: a control character, so no `sub` (auth
#: refuses control characters in `sub`) can collide with it.
ANONYMOUS_PREFIX = "\x1f"


class PresenceHandler(Protocol):
    def handle_presence_events(self, room: str, joins: list, leaves: list) -> None:
        """User-level diffs for `room` decided by any process: joins [(user, info_json)],
        leaves [user]. Called from the event loop, never inline with `update`."""

    def handle_control(self, message: dict) -> None:
        """A control-channel message (every process gets every message, its own included)."""

    def handle_control_state(self, connected: bool) -> None:
        """The control channel was (re)connected or lost: reload state that may have been missed."""


@runtime_checkable
class PresenceBackend(Protocol):
    """Where presence, the control channel, per-user caps and revocations live.

    Rooms are tracked by connection key (`<node>.<connection id>`); a user is "in" a room while
    at least one of their connections is. The first connection in (count 0 -> 1) is a join,
    the last one out (1 -> 0) a leave, decided atomically by the backend however many
    processes race. With `events`, a leave is first recorded as pending (returned with a
    token); `confirm_leaves` publishes it later unless the user came back meanwhile (debounce),
    and a join that cancels a pending leave publishes nothing.
    """

    node: str          # this process's id (unique per process start)
    connected: bool

    async def start(self, handler: PresenceHandler, ttl: float) -> None: ...

    async def close(self) -> None: ...

    async def update(self, room: str, ops: list, events: bool, cleanup: bool = False) -> list:
        """Apply `ops` atomically; return [(user, token)] of leaves now pending (events only).
        `cleanup`: also drop connections whose TTL passed (a dead process's) and stale pending
        leaves, publishing those leaves at once. Raises BrokerUnavailable."""

    async def update_many(self, batch: list) -> list:
        """[(room, ops, events, cleanup)] at once (Redis: one pipeline); per item its pending
        leaves, or the BrokerUnavailable it met. Raises BrokerUnavailable if nothing got through."""

    async def confirm_leaves(self, room: str, pending: list) -> None:
        """Publish the leaves in `pending` [(user, token)] whose user did not come back."""

    async def watch(self, room: str) -> None:
        """Receive `room`'s presence events (handle_presence_events)."""

    async def unwatch(self, room: str) -> None: ...

    async def members(self, room: str, after: str, limit: int, clients: bool = False) -> tuple[list, str | None]:
        """([(user, connections, info_json)], next cursor or None), users in code-point order;
        with `clients`, each row also lists the user's connection keys (costs O(room))."""

    async def counts(self, room: str) -> tuple[int, int]:
        """(connections, users) present in `room`."""

    async def send_control(self, message: dict) -> None:
        """Publish a control message to every process (this one included)."""

    async def register_node(self, info: dict) -> None:
        """Announce this process (refreshed every heartbeat; gone after 3 missed ones)."""

    async def nodes(self) -> list[dict]:
        """The live processes' last announcements."""

    async def acquire_user_slot(self, user: str, conn_key: str, limit: int) -> bool:
        """Count `conn_key` towards `user`'s connections unless `limit` are already open."""

    async def acquire_user_slots(self, requests: list) -> list:
        """Many [(user, conn_key, limit)] at once (Redis: one pipeline); per request a bool or
        the exception it met."""

    async def release_user_slot(self, user: str, conn_key: str) -> None: ...

    async def refresh_user_slots(self, slots: list) -> None:
        """Keep [(user, conn_key)] of this process alive (heartbeat)."""

    async def store_revocation(self, key: str, value: str, until: float) -> None:
        """Persist one revocation (`jti:<id>` or `user:<sub>` -> value) until Unix time `until`."""

    async def load_revocations(self) -> dict:
        """Every unexpired revocation: {key: (value, until)}."""
