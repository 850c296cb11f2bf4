"""The Redis broker: publications cross processes and machines through Redis pub/sub.

Imports only `gateway.broker.base` and redis-py (with hiredis): never the hub, the
connection or the config, so it can be tested and benchmarked on its own.

Theory of operation
-------------------
URLs. `redis://host:port/db`, `rediss://...` (TLS) and `unix:///path?db=N` name one Redis.
`redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`) names seed nodes of a
Redis Cluster (7+): the cluster is chosen by the scheme, never guessed, because the two
modes use different commands and a wrong guess would fail only under load.
`redis+sentinel://host:port[,host:port...]/service-name[/db]` asks Redis Sentinel for the
service's primary (`redis_topology.py`) each time the broker connects, so after a failover
it follows the promoted replica.

Shards. One Redis is one shard. On a cluster the broker asks CLUSTER SLOTS and keeps one
shard per primary. Each shard has exactly two connections: a publisher and a pub/sub
reader. On a cluster, sharded pub/sub (SPUBLISH/SSUBSCRIBE) keeps a room's traffic on the
shard that owns its slot instead of broadcasting it to every node.

Names. Room R uses channel `<prefix>{R}`, meta hash `<prefix>meta:{R}` (its epoch `e` and
top seq `s`), history stream `<prefix>hist:{R}` and idempotency keys `<prefix>idem:{R}:<key>`.
The hash tag `{R}` puts them all in one cluster slot, which sharded pub/sub and the scripts
below require; on a single node it is harmless. "}" and "%" in R are percent-escaped and an empty R is
"%" (see `room_tag`); the prefix may not contain braces (it would move the tag).

Sequence numbers and history. Publishing runs ONE Lua script (PUBLISH_SCRIPT): an
idempotency key seen within the room's TTL answers the original (seq, epoch) and does
nothing else; otherwise it reads the room's epoch from the meta hash (minting one, and
deleting any stream left from an older numbering, when the hash is gone), HINCRBYs the top
seq, EXPIREs the hash (`Retention.meta_ttl`), XADDs the publication to the stream with the
seq as its id (`MAXLEN ~ size`: trimmed by whole stream nodes, so it may hold a few more),
EXPIREs the stream (`Retention.ttl`), PUBLISHes `b"<seq>:<epoch>:<data>"` and records the
idempotency key (EX ttl). Redis runs scripts one at a time, so the number a publisher gets
back is the number every subscriber sees and the history holds, and channel order is seq
order: gaps are real gaps. After meta_ttl of silence in a room no process holds, or a Redis
restart without persistence, the room gets a new epoch and its seq starts again at 1;
subscribers count that as `seq_resets`. Reads (READ_SCRIPT) return the position and an
XRANGE after `since`, minting the epoch the same way for a room Redis does not know, so a
joiner's position is the one later publications continue.

Keys live only while they serve (issue 12): the stream `ttl` seconds after the room's last
publication, the meta hash `meta_ttl` (2 x ttl) after its last publication or read, and
while any process holds the room (the touch loop re-EXPIREs the meta of held rooms that
saw no publication for a third of their meta_ttl). Redis memory per room: the meta hash
(~100 B), up to `size` (+ one stream node, <= 100) entries of ~(payload + 30 B) while
published to, and ~(80 B + key) per idempotency key within the ttl. With history off
(size 0) only the meta hash and the keys.

Batching. `publish()` appends to its shard's queue; one writer task per shard writes
everything queued since its last write as one pipeline, then reads the replies.
Publications made while a batch is in flight form the next batch, so thousands of
publishes per second cost a few hundred round trips, and a lone publish waits for nothing
but the next loop pass. The script is loaded once per connection (SCRIPT LOAD), so the
pipeline carries only EVALSHA.

Subscriptions. The hub calls `subscribe` on a room's first local join and `unsubscribe` on
its last leave. `subscribe` waits for Redis's confirmation, so anything published after it
returns is received; it raises BrokerUnavailable if Redis is unreachable, so the hub can
roll the join back. `unsubscribe` does not wait; stray messages for rooms no longer held
are dropped by the reader.

Shard faults (cluster). A fault on one shard (its connection lost, a timeout, MOVED/ASK from
it) takes down only that shard: its queued and in-flight publications fail, publications to
its rooms get BrokerUnavailable (with the local fallback below), joins of rooms it serves are
refused, and every other shard keeps flowing. The broker stays connected ("degraded") while
at least one shard is up; a repair task re-reads CLUSTER SLOTS with backoff, opens the
shard's primary again (or the replica promoted in its place), resubscribes the rooms now
served there, and moves rooms whose slot changed owner. Only when every shard is down does
the whole broker count as disconnected.

Faults. Any connection error, timeout or cluster redirection marks the broker disconnected:
the handler is told once and it is logged once; queued and in-flight publications fail with
BrokerUnavailable (in-flight ones may or may not have reached Redis, so they are reported,
never claimed as delivered) and are counted in `publish_errors`. A supervisor reconnects
with jittered exponential backoff, re-reads the cluster topology, reloads the script,
resubscribes every room held, and only then reports connected. While disconnected, a
publication to a room this process holds still reaches its local members (with seq 0: not
numbered, this process only; `local_deliveries`) and the publisher still gets
BrokerUnavailable, because the other processes did not get it. Loss on the receiving side is
measured from the seq numbers: `messages_lost` counts publications skipped in a room this
process held (e.g. published elsewhere while this process was cut off).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from urllib.parse import urlsplit

from redis.asyncio.connection import Connection, parse_url
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.broker import url as broker_url
from gateway.broker.redis_topology import cluster_nodes, parse_sentinel_url
from gateway.broker.base import Broker, BrokerHandler, BrokerUnavailable, History, Publication
from gateway.broker.memory import new_epoch

log = logging.getLogger("gateway.broker.redis")

# KEYS[1] meta hash, KEYS[2] history stream, KEYS[3] channel, KEYS[4] (optional) idempotency
# key; ARGV[1] data, ARGV[2] history size, ARGV[3] ttl, ARGV[4] meta ttl, ARGV[5]
# PUBLISH|SPUBLISH, ARGV[6] the epoch to mint if the room has none. Returns {seq, epoch, dup}.
# The channel is passed as a key so Redis Cluster checks it shares the others' slot.
PUBLISH_SCRIPT = b"""
if KEYS[4] then
  local done = redis.call('GET', KEYS[4])
  if done then
    local seq, epoch = string.match(done, '^(%d+):(.*)$')
    return {tonumber(seq), epoch, 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[2] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq, 'd', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call(ARGV[5], KEYS[3], seq .. ':' .. epoch .. ':' .. ARGV[1])
if KEYS[4] then
  redis.call('SET', KEYS[4], seq .. ':' .. epoch, 'EX', ARGV[3])
end
return {seq, epoch, 0}
"""

# KEYS[1] meta hash, KEYS[2] history stream; ARGV[1] since, ARGV[2] limit (0: position only),
# ARGV[3] meta ttl, ARGV[4] the epoch to mint if the room has none. Returns {top, epoch, entries}.
READ_SCRIPT = b"""
local meta = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch, top = meta[1], tonumber(meta[2] or '0')
if not epoch then
  epoch = ARGV[4]
  top = 0
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local entries = {}
local since = tonumber(ARGV[1])
if ARGV[2] ~= '0' and since < top then
  entries = redis.call('XRANGE', KEYS[2], since + 1, '+', 'COUNT', ARGV[2])
end
return {top, epoch, entries}
"""

# Replies meaning "the topology is not what we think": refresh it by reconnecting.
# READONLY: a primary demoted to replica by a Sentinel failover (or a cluster failover).
_REDIRECTS = (b"MOVED", b"ASK", b"CLUSTERDOWN", b"TRYAGAIN", b"READONLY")
_SUBSCRIBE_CHUNK = 1000   # channels per (S)SUBSCRIBE when resubscribing many rooms


# No address: this text reaches clients (broker_unavailable); the log names the shard.
_SHARD_DOWN = "the Redis shard serving this room is down"


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _command(*args: bytes) -> bytes:
    """RESP-encode one command. Hand-rolled: the publish path packs thousands per second."""
    return b"*%d\r\n%b" % (len(args), b"".join(_bulk(a) for a in args))


def _history(reply) -> History:
    top, epoch, entries = reply
    # XRANGE entries: [id, [field, value]]; the id is "<seq>-0" (the script sets it).
    pubs = [Publication(int(entry[0].partition(b"-")[0]), entry[1][1]) for entry in entries]
    return History(epoch.decode(), int(top), pubs)


def _ignore(reply) -> None:
    return None


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()   # a failed EXPIRE is a fault the supervisor handles; nothing to report here


def room_tag(room: str) -> bytes:
    """The room as a cluster hash tag: it must not contain "}" (that would end the tag early)
    nor be empty (an empty tag hashes the whole name). "%" and "}" are percent-escaped, so
    distinct rooms keep distinct tags; "" becomes a lone "%", which no escaped name can be."""
    if "}" in room or "%" in room:
        room = room.replace("%", "%25").replace("}", "%7D")
    return room.encode() if room else b"%"


def parse_broker_url(url: str) -> tuple[bool, list[dict]]:
    """(cluster?, connection kwargs per seed node) for a broker URL; ValueError if invalid.

    The URL is checked by `gateway.broker.url.parse` (the one parser, shared with config
    validation); redis-py's `parse_url` turns each node into connection keyword arguments."""
    parsed = broker_url.parse(url)
    if parsed.memory:
        raise ValueError("memory:// is not a Redis URL")
    return parsed.cluster, [parse_url(node) for node in parsed.nodes]


class _Shard:
    """One Redis primary: a publisher connection, a pub/sub reader and their bookkeeping."""

    __slots__ = ("address", "pub", "sub", "queue", "inflight", "writer", "reader", "sub_waiters", "unsub_expected",
                 "up")

    def __init__(self, address: str, pub: Connection, sub: Connection) -> None:
        self.address = address
        self.up = False              # connected, scripts loaded, reader running
        self.pub = pub
        self.sub = sub
        self.queue: list = []        # (key, channel, data, future) not yet written
        self.inflight: list = []     # written, reply not read yet
        self.writer: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        # Subscribe confirmations and the unsubscribes we asked for, per channel, in order.
        self.sub_waiters: dict[bytes, collections.deque] = collections.defaultdict(collections.deque)
        self.unsub_expected: collections.Counter = collections.Counter()


class RedisBroker(Broker):
    name = "redis"

    def __init__(self, url: str, *, prefix: str = "ws:", timeout: float = 5.0, retention=None,
                 reconnect_min: float = 0.05, reconnect_max: float = 5.0, local_fallback: bool = True) -> None:
        super().__init__(retention)
        self._sentinel = None
        if broker_url.parse(url).sentinel:
            self._sentinel = parse_sentinel_url(url)
            self.cluster, self._seeds = False, []
        else:
            self.cluster, self._seeds = parse_broker_url(url)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"invalid Redis channel prefix {prefix!r}: braces would change the cluster hash tag")
        if timeout <= 0 or not 0 < reconnect_min <= reconnect_max:
            raise ValueError("timeout must be > 0 and 0 < reconnect_min <= reconnect_max")
        self.url = url
        self.prefix = prefix.encode()
        self.timeout = timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.local_fallback = local_fallback
        self._publish_cmd = b"SPUBLISH" if self.cluster else b"PUBLISH"
        self._subscribe_cmd = b"SSUBSCRIBE" if self.cluster else b"SUBSCRIBE"
        self._unsubscribe_cmd = b"SUNSUBSCRIBE" if self.cluster else b"UNSUBSCRIBE"
        self.connected = False
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rooms: dict[bytes, str] = {}        # channel -> room, for every room held
        self._last_seq: dict[str, tuple] = {}      # room -> (seq, epoch) last received (gap detection)
        self._args: dict[str, tuple] = {}          # room -> its keys and retention arguments (held rooms)
        self._touched: dict[str, float] = {}       # held room -> when its meta TTL was last refreshed
        self._toucher: asyncio.Task | None = None
        self._now = 0.0                            # loop time, refreshed every second by the touch loop
        self._shards: list[_Shard] = []
        self._slots: list[int] | None = None       # cluster: slot -> index in _shards
        self._sha: bytes = b""
        self._read_sha: bytes = b""
        self._fault: asyncio.Future | None = None
        self._supervisor: asyncio.Task | None = None
        self._healer: asyncio.Task | None = None      # cluster: repairs shards that are down
        self._closers: set[asyncio.Task] = set()
        self._closing = False
        self._reported: bool | None = None         # last state told to the handler
        self._last_error = ""
        # counters (see stats())
        self.publishes = 0
        self.publish_errors = 0
        self.publish_batches = 0
        self.subscribe_errors = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.messages_received = 0
        self.messages_lost = 0
        self.seq_resets = 0
        self.local_deliveries = 0
        self.shard_failures = 0
        self.duplicates = 0            # idempotent retries answered with the original seq
        self.history_reads = 0
        self.meta_touches = 0          # EXPIREs of held rooms' meta hashes (touch loop)

    # -- names -------------------------------------------------------------------------

    def channel(self, room: str) -> bytes:
        return b"%b{%b}" % (self.prefix, room_tag(room))

    def meta_key(self, room: str) -> bytes:
        return b"%bmeta:{%b}" % (self.prefix, room_tag(room))

    def history_key(self, room: str) -> bytes:
        return b"%bhist:{%b}" % (self.prefix, room_tag(room))

    def idempotency_key(self, room: str, key: str) -> bytes:
        return b"%bidem:{%b}:%b" % (self.prefix, room_tag(room), key.encode("utf-8", "surrogatepass"))

    def _room_args(self, room: str) -> tuple:
        """(channel, meta, stream, size, ttl, meta_ttl) as RESP bulk strings, cached per held room."""
        args = self._args.get(room)
        if args is None:
            retention = self.retention(room)
            args = (self.channel(room), _bulk(self.meta_key(room)), _bulk(self.history_key(room)),
                    _bulk(b"%d" % retention.size), _bulk(b"%d" % retention.ttl), _bulk(b"%d" % retention.meta_ttl),
                    retention.meta_ttl)
            if self.channel(room) in self._rooms:
                self._args[room] = args
        return args

    def _shard_for(self, channel: bytes) -> _Shard:
        if self._slots is None:
            return self._shards[0]
        return self._shards[self._slots[key_slot(channel)]]

    # -- life cycle --------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        """Connect (one attempt), report the state, and keep reconnecting in the background.

        A Redis that is down at startup does not stop the gateway: it serves local traffic,
        reports not-ready, and connects when Redis comes up.
        """
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        try:
            await self._connect()
        except Exception as exc:  # noqa: BLE001 - any failure here means "not connected yet"
            self.connect_failures += 1
            await self._teardown(exc)
            self._set_state(False, exc)
            self._supervisor = self._loop.create_task(self._supervise(first_delay=True))
        else:
            self._set_state(True)
            self._supervisor = self._loop.create_task(self._supervise(first_delay=False))
            self._start_healer()
        self._toucher = self._loop.create_task(self._touch_loop())

    async def close(self) -> None:
        self._closing = True
        if self._toucher is not None:
            self._toucher.cancel()
        for task in (self._supervisor, self._healer):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self.connected = False
        await self._teardown(BrokerUnavailable("broker closed"))
        if self._closers:
            await asyncio.wait(self._closers)
        if self._sentinel is not None:
            await self._sentinel.close()
        self._rooms.clear()
        self._last_seq.clear()
        self._touched.clear()
        self._args.clear()

    def _set_state(self, connected: bool, error: BaseException | None = None) -> None:
        self.connected = connected
        if self._reported is connected:
            return
        self._reported = connected
        if connected:
            log.info("redis broker connected", extra={"event": "broker_state", "connected": True, "url": self._safe_url(),
                                                      "shards": len(self._shards), "rooms": len(self._rooms),
                                                      "reconnects": self.reconnects})
        else:
            self._last_error = f"{type(error).__name__}: {error}" if error else "disconnected"
            log.warning("redis broker disconnected", extra={"event": "broker_state", "connected": False,
                                                            "url": self._safe_url(), "error": self._last_error})
        if self._handler is not None:
            try:
                self._handler.handle_broker_state(connected)
            except Exception:
                log.exception("broker state handler failed")

    def _safe_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password:
            return self.url.replace(":" + parts.password + "@", ":***@", 1)
        return self.url

    async def _supervise(self, first_delay: bool) -> None:
        """Wait for a fault, tear down, back off (jittered, exponential), reconnect; repeat."""
        attempt = 1 if first_delay else 0
        while not self._closing:
            if attempt == 0:
                error = await self._fault
                self.connected = False   # refuse new publications before anything awaits
                self._stop_healer()
                await self._teardown(error)
                self._set_state(False, error)
                attempt = 1
            # Jittered (uniform in [delay/2, delay]): gateways that lost the same Redis do not
            # all reconnect in the same instant.
            delay = min(self.reconnect_max, self.reconnect_min * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(delay / 2, delay))
            try:
                await self._connect()
            except Exception as exc:  # noqa: BLE001 - retried with backoff
                self.connect_failures += 1
                await self._teardown(exc)
                log.debug("redis reconnect failed", extra={"event": "broker_retry", "attempt": attempt,
                                                           "error": f"{type(exc).__name__}: {exc}"})
                attempt += 1
                continue
            self.reconnects += 1
            attempt = 0
            self._set_state(True)
            self._start_healer()

    def _new_connection(self, kwargs: dict, role: str) -> Connection:
        kwargs = dict(kwargs)
        cls = kwargs.pop("connection_class", Connection)
        # RESP2: pub/sub messages are plain replies, read like any other (under RESP3, which
        # redis-py 8 defaults to, they are push frames the parser would divert elsewhere).
        # No hidden retries: a failed command must surface here, where it is counted.
        kwargs.setdefault("protocol", 2)
        return cls(**kwargs, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                   client_name=f"ws-gateway-{role}")

    async def _topology(self) -> tuple[list[dict], list[int] | None]:
        """Connection kwargs per shard and, on a cluster, the slot -> shard map."""
        if self._sentinel is not None:
            host, port = await self._sentinel.primary(self.timeout)
            return [{**self._sentinel.node, "host": host, "port": port}], None
        if not self.cluster:
            return self._seeds, None
        errors = []
        # The seeds first, then the primaries we know: a seed list may name only dead nodes.
        known = [{**self._seeds[0], "host": h, "port": int(p)}
                 for h, _, p in (s.address.rpartition(":") for s in self._shards)]
        for seed in [*self._seeds, *known]:
            conn = self._new_connection(seed, "topology")
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.connect()
                    await conn.send_packed_command(_command(b"CLUSTER", b"SLOTS"))
                    ranges = await conn.read_response()
                return cluster_nodes(ranges, seed)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                errors.append(exc)
            finally:
                await conn.disconnect(nowait=True)
        raise errors[-1] if errors else RedisError("no cluster seed answered")

    def _make_shard(self, kwargs: dict) -> _Shard:
        address = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port', 6379)}"
        return _Shard(address, self._new_connection(kwargs, "pub"), self._new_connection(kwargs, "sub"))

    async def _open_shard(self, shard: _Shard) -> None:
        """Connect a shard's two connections, check the node, load the script, start its reader."""
        await shard.pub.connect()
        await shard.sub.connect()
        # From here on our own `asyncio.timeout` blocks bound every exchange: redis-py's
        # socket_timeout would wrap each send in asyncio.wait_for, a new task per write.
        shard.pub.socket_timeout = shard.sub.socket_timeout = None
        async with asyncio.timeout(self.timeout):
            if self.cluster:
                # A node that is back but not yet agreed on by the cluster answers CLUSTERDOWN:
                # do not use it until it says the cluster is ok.
                await shard.pub.send_packed_command(_command(b"CLUSTER", b"INFO"))
                info = await shard.pub.read_response()
                if b"cluster_state:ok" not in info:
                    raise RedisError(f"cluster not ready on {shard.address}")
            if self._sentinel is not None:
                # Right after a failover a sentinel may still name the old primary, which comes
                # back as a replica: publishing there would fail (READONLY) or be lost.
                await shard.pub.send_packed_command(_command(b"ROLE"))
                role = await shard.pub.read_response()
                if not role or role[0] != b"master":
                    raise RedisError(f"{shard.address} is not a primary (ROLE {role[0] if role else None!r})")
            await self._load_scripts(shard.pub)
        shard.reader = self._loop.create_task(self._read_loop(shard))
        shard.up = True

    async def _connect(self) -> None:
        """Build every shard, load the script, resubscribe every room held; raise on failure.

        On a cluster, shards that cannot be opened are left down (the healer retries them)
        as long as one shard is up: a gateway started during a partial outage serves the rest.
        """
        nodes, slots = await self._topology()
        self._fault = self._loop.create_future()
        shards = [self._make_shard(kwargs) for kwargs in nodes]
        self._shards, self._slots = shards, slots
        error = None
        for shard in shards:
            try:
                await self._open_shard(shard)
            except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, a node not ready
                if not self.cluster:
                    raise
                error = exc
                self._shard_down(shard, exc)
        if not any(shard.up for shard in shards):
            raise error or RedisError("no shard is up")
        await self._resubscribe({channel: self._shard_for(channel) for channel in self._rooms})

    async def _resubscribe(self, targets: dict[bytes, _Shard]) -> None:
        """Subscribe each channel on its shard (those that are up), in chunks; wait for every confirmation."""
        by_shard: dict[_Shard, list[bytes]] = collections.defaultdict(list)
        for channel, shard in targets.items():
            if shard.up:
                by_shard[shard].append(channel)
        pending = set()
        for shard, channels in by_shard.items():
            for i in range(0, len(channels), _SUBSCRIBE_CHUNK):
                chunk = channels[i:i + _SUBSCRIBE_CHUNK]
                for channel in chunk:
                    fut = self._loop.create_future()
                    shard.sub_waiters[channel].append(fut)
                    pending.add(fut)
                async with asyncio.timeout(self.timeout):
                    await shard.sub.send_packed_command(_command(self._subscribe_cmd, *chunk))
        deadline = self._loop.time() + self.timeout * 2
        while pending and not self._fault.done():
            done, pending = await asyncio.wait(pending | {self._fault}, timeout=deadline - self._loop.time(),
                                               return_when=asyncio.FIRST_COMPLETED)
            pending.discard(self._fault)
            if not done:
                raise asyncio.TimeoutError("resubscribing timed out")
        if self._fault.done():
            raise self._fault.result()
        # Rooms released while we were resubscribing (unsubscribe() sends nothing while
        # disconnected): release them in Redis too, or their traffic would keep coming.
        for shard, channels in by_shard.items():
            stale = [c for c in channels if c not in self._rooms]
            if stale and shard.up:
                shard.unsub_expected.update(stale)
                async with asyncio.timeout(self.timeout):
                    await shard.sub.send_packed_command(_command(self._unsubscribe_cmd, *stale))

    # -- shard faults and repair (cluster) --------------------------------------------------

    def _shard_down(self, shard: _Shard, error: BaseException) -> None:
        """Take one shard out of service now: fail what it holds, stop its tasks, drop its sockets."""
        was_up, shard.up = shard.up, False
        reason = f"redis shard unavailable: {type(error).__name__}: {error}"
        current = asyncio.current_task()
        for task in (shard.writer, shard.reader):
            if task is not None and task is not current and not task.done():
                task.cancel()
        for item in (*shard.inflight, *shard.queue):
            fut = item[1]
            if not fut.done():
                self.publish_errors += 1
                fut.set_exception(BrokerUnavailable(reason))
        shard.inflight, shard.queue = [], []
        for waiters in shard.sub_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(BrokerUnavailable(reason))
        shard.sub_waiters.clear()
        shard.unsub_expected.clear()
        closer = self._loop.create_task(self._close_shard(shard))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        if was_up:
            self.shard_failures += 1
            log.warning("redis shard down", extra={"event": "broker_shard", "shard": shard.address, "up": False,
                                                   "error": f"{type(error).__name__}: {error}",
                                                   "shards_down": sum(not s.up for s in self._shards),
                                                   "shards": len(self._shards)})
        if self.connected and not self._closing:
            self._start_healer()

    async def _close_shard(self, shard: _Shard) -> None:
        for task in (shard.writer, shard.reader):
            if task is not None and task is not asyncio.current_task() and not task.done():
                task.cancel()
                await asyncio.wait([task])
        for conn in (shard.pub, shard.sub):
            try:
                await conn.disconnect(nowait=True)
            except Exception:  # noqa: BLE001 - the socket is being thrown away anyway
                pass

    def _start_healer(self) -> None:
        if any(not s.up for s in self._shards) and (self._healer is None or self._healer.done()):
            self._healer = self._loop.create_task(self._heal())

    def _stop_healer(self) -> None:
        if self._healer is not None and self._healer is not asyncio.current_task():
            self._healer.cancel()
        self._healer = None

    async def _heal(self) -> None:
        """While some shards are down (and others up): re-read the topology and repair, with backoff."""
        attempt = 0
        while not self._closing and self.connected and any(not s.up for s in self._shards):
            delay = min(self.reconnect_max, self.reconnect_min * 2 ** attempt)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            attempt += 1
            try:
                await self._repair()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried with backoff
                self.connect_failures += 1
                log.debug("redis shard repair failed", extra={"event": "broker_retry", "attempt": attempt,
                                                              "error": f"{type(exc).__name__}: {exc}"})

    async def _repair(self) -> None:
        """Adopt the current slot map: keep the shards that are up, open the others (a restarted
        primary or the replica promoted in its place), move rooms to the shard now serving them."""
        nodes, slots = await self._topology()
        old_shards = {s.address: s for s in self._shards}
        old_owner = {channel: self._shard_for(channel) for channel in self._rooms}
        shards, fresh = [], []
        for kwargs in nodes:
            shard = self._make_shard(kwargs)
            kept = old_shards.get(shard.address)
            if kept is not None and kept.up:
                shards.append(kept)
                continue
            try:
                await self._open_shard(shard)
            except Exception as exc:  # noqa: BLE001 - still down: keep it as such, try again later
                log.debug("redis shard still down", extra={"event": "broker_retry", "shard": shard.address,
                                                           "error": f"{type(exc).__name__}: {exc}"})
                await self._close_shard(shard)
            shards.append(shard)
            fresh.append(shard)
        if not self.connected or self._closing:   # the whole broker failed meanwhile
            for shard in fresh:
                await self._close_shard(shard)
            return
        retired = [s for s in self._shards if s not in shards]
        self._shards, self._slots = shards, slots
        for shard in retired:   # no longer a primary (demoted, or its slots moved away)
            if shard.up:
                self._shard_down(shard, RedisError(f"{shard.address} no longer serves any slot"))
        for shard in fresh:
            if shard.up:
                log.info("redis shard up", extra={"event": "broker_shard", "shard": shard.address, "up": True,
                                                  "shards_down": sum(not s.up for s in shards),
                                                  "shards": len(shards)})
        # Rooms whose shard is new, or whose slot now belongs to another shard.
        moved, involved = {}, set()
        try:
            for channel in self._rooms:
                shard = self._shard_for(channel)
                before = old_owner.get(channel)
                if shard in fresh or shard is not before:
                    moved[channel] = shard
                    involved.add(shard)
                    if before is not None and before.up and before is not shard and before in shards:
                        involved.add(before)
                        before.unsub_expected[channel] += 1
                        async with asyncio.timeout(self.timeout):
                            await before.sub.send_packed_command(_command(self._unsubscribe_cmd, channel))
            if moved:
                await self._resubscribe(moved)
        except Exception as exc:
            # Half-moved rooms would stay unsubscribed on a shard that looks healthy: take the
            # shards involved down, so the next repair reopens them and resubscribes all their rooms.
            for shard in involved:
                if shard.up:
                    self._shard_down(shard, exc)
            raise

    async def _load_scripts(self, conn: Connection) -> None:
        await conn.send_packed_command(_command(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT))
        self._sha = await conn.read_response()
        await conn.send_packed_command(_command(b"SCRIPT", b"LOAD", READ_SCRIPT))
        self._read_sha = await conn.read_response()

    def _report_fault(self, error: BaseException, shard: _Shard | None = None) -> None:
        """A connection failed. On a cluster only its shard goes down, unless it was the last one up."""
        if self.cluster and shard is not None and shard in self._shards:
            if shard.up:
                self._shard_down(shard, error)
            if any(s.up for s in self._shards):
                return
        if self._fault is not None and not self._fault.done():
            self._fault.set_result(error)

    async def _teardown(self, error: BaseException | None) -> None:
        """Fail everything pending with BrokerUnavailable, stop the tasks, drop the connections."""
        reason = f"redis unavailable: {type(error).__name__}: {error}" if error else "redis unavailable"
        current = asyncio.current_task()
        shards, self._shards = self._shards, []
        for shard in shards:
            for task in (shard.writer, shard.reader):
                if task is not None and task is not current and not task.done():
                    task.cancel()
            for item in (*shard.inflight, *shard.queue):
                fut = item[1]
                if not fut.done():
                    self.publish_errors += 1
                    fut.set_exception(BrokerUnavailable(reason))
            shard.inflight, shard.queue = [], []
            for waiters in shard.sub_waiters.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(reason))
            shard.sub_waiters.clear()
        # asyncio.wait, not `await task`: it never re-raises the tasks' CancelledError,
        # which would be indistinguishable from our own cancellation.
        tasks = [t for shard in shards for t in (shard.writer, shard.reader) if t is not None and t is not current]
        if tasks:
            await asyncio.wait(tasks)
        for shard in shards:
            for conn in (shard.pub, shard.sub):
                try:
                    await conn.disconnect(nowait=True)
                except Exception:  # noqa: BLE001 - the socket is being thrown away anyway
                    pass

    # -- publishing and history ----------------------------------------------------------

    async def publish(self, room: str, data: bytes, idempotency_key: str | None = None) -> tuple[int, str]:
        return await self.publish_future(room, data, idempotency_key)

    def publish_future(self, room: str, data: bytes, idempotency_key: str | None = None) -> asyncio.Future:
        """Queue a publication now; the future gets its (seq, epoch) (or BrokerUnavailable).

        Synchronous on purpose: publications queued in call order are sent, numbered and
        delivered in that order (one FIFO per shard, a room lives on one shard), so a
        caller may queue several before awaiting any. Raises BrokerUnavailable at once
        while disconnected.
        """
        if not self.connected:
            self.publish_errors += 1
            if self.local_fallback and self.channel(room) in self._rooms:
                # Redis is down but this process has members: they still get it (seq 0 = not
                # numbered, this process only), later and not inline, like any publication.
                self.local_deliveries += 1
                self._loop.call_soon(self._deliver_local, room, data)
                raise BrokerUnavailable(f"redis unavailable ({self._last_error}); "
                                        "delivered only to members on this process, without a seq",
                                        delivered_locally=True)
            raise BrokerUnavailable(f"redis unavailable ({self._last_error})")
        shard = self._shard_for(self.channel(room))
        if not shard.up:
            # Cluster, one shard down: this room's publications fail like an outage (local
            # fallback included); the other shards' rooms keep flowing.
            self.publish_errors += 1
            if self.local_fallback and self.channel(room) in self._rooms:
                self.local_deliveries += 1
                self._loop.call_soon(self._deliver_local, room, data)
                raise BrokerUnavailable(f"redis unavailable ({_SHARD_DOWN}); delivered only to members on "
                                        "this process, without a seq", delivered_locally=True)
            raise BrokerUnavailable(f"redis unavailable ({_SHARD_DOWN})")
        channel, meta, stream, size, ttl, meta_ttl, _ = self._room_args(room)
        if idempotency_key is None:
            head = b"*12\r\n$7\r\nEVALSHA\r\n" + _bulk(self._sha) + b"$1\r\n3\r\n"
            idem = b""
        else:
            head = b"*13\r\n$7\r\nEVALSHA\r\n" + _bulk(self._sha) + b"$1\r\n4\r\n"
            idem = _bulk(self.idempotency_key(room, idempotency_key))
        cmd = b"".join((head, meta, stream, _bulk(channel), idem, _bulk(data), size, ttl, meta_ttl,
                        _bulk(self._publish_cmd), _bulk(new_epoch().encode())))
        self.publishes += 1
        return self._enqueue(channel, cmd, self._published)

    def _published(self, reply) -> tuple[int, str]:
        seq, epoch, dup = reply
        if dup:
            self.duplicates += 1
        return seq, epoch.decode()

    async def history(self, room: str, since: int, limit: int) -> History:
        if not self.connected:
            raise BrokerUnavailable(f"redis unavailable ({self._last_error})")
        channel, meta, stream, _size, _ttl, meta_ttl, _ = self._room_args(room)
        cmd = b"".join((b"*9\r\n$7\r\nEVALSHA\r\n", _bulk(self._read_sha), b"$1\r\n2\r\n", meta, stream,
                        _bulk(b"%d" % max(0, since)), _bulk(b"%d" % max(0, limit)), meta_ttl,
                        _bulk(new_epoch().encode())))
        self.history_reads += 1
        return await self._enqueue(channel, cmd, _history)

    def _enqueue(self, channel: bytes, cmd: bytes, convert) -> asyncio.Future:
        """Queue one packed command on the channel's shard; the future gets convert(reply)."""
        shard = self._shard_for(channel)
        fut = self._loop.create_future()
        if not shard.up:
            fut.set_exception(BrokerUnavailable(f"redis unavailable ({_SHARD_DOWN})"))
            return fut
        shard.queue.append((cmd, fut, convert))
        if shard.writer is None or shard.writer.done():
            shard.writer = self._loop.create_task(self._write_loop(shard))
        return fut

    def _deliver_local(self, room: str, data: bytes) -> None:
        if self.channel(room) in self._rooms:
            try:
                self._handler.handle_publication(room, 0, data, None)
            except Exception:
                log.exception("publication handler failed", extra={"room": room})

    async def _write_loop(self, shard: _Shard) -> None:
        """Write the queue as one pipeline, read its replies, repeat while more was queued."""
        conn = shard.pub
        try:
            while shard.queue:
                batch = shard.inflight = shard.queue
                shard.queue = []
                self.publish_batches += 1
                if not conn.is_connected:  # never let redis-py silently reconnect behind our back
                    raise BrokerUnavailable("publisher connection closed")
                retry = []
                fault = None
                # One deadline for the whole batch: a Redis that stops answering is a fault.
                async with asyncio.timeout(self.timeout):
                    await conn.send_packed_command([item[0] for item in batch], check_health=False)
                    for item in batch:
                        fut = item[1]
                        try:
                            reply = await conn.read_response()
                        except NoScriptError:
                            retry.append(item)  # SCRIPT FLUSH happened: not executed, safe to resend
                            continue
                        except ResponseError as exc:
                            self.publish_errors += 1
                            if not fut.done():
                                fut.set_exception(BrokerUnavailable(f"redis refused the command: {exc}"))
                            if str(exc).encode().startswith(_REDIRECTS):
                                fault = exc   # keep reading the batch's replies, then refresh the topology
                            continue
                        if not fut.done():
                            try:
                                fut.set_result(item[2](reply))
                            except Exception as exc:  # noqa: BLE001 - an unexpected reply shape
                                fut.set_exception(BrokerUnavailable(f"unexpected reply from redis: {exc!r}"[:200]))
                shard.inflight = []
                if fault is not None:
                    shard.queue[:0] = retry
                    self._report_fault(fault, shard)
                    return
                if retry:
                    # The scripts' SHA1s do not change, so the queued EVALSHAs stay valid.
                    async with asyncio.timeout(self.timeout):
                        await self._load_scripts(conn)
                    shard.queue[:0] = retry
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors, timeouts: a fault
            self._report_fault(exc, shard)

    async def _touch_loop(self) -> None:
        """Keep the meta hash of every held room alive (keys live while they serve).

        A room published to refreshes its own TTL in the script; a held room that stays
        silent would otherwise lose its numbering after meta_ttl and its members would see
        a reset. Every second, held rooms untouched for a third of their meta_ttl get one
        pipelined EXPIRE each.
        """
        while True:
            await asyncio.sleep(1.0)
            now = self._now = self._loop.time()
            if not self.connected:
                continue
            touched = self._touched
            for room in list(touched):
                args = self._args.get(room)
                if args is None or now - touched[room] < args[6] / 3:
                    continue
                touched[room] = now
                self.meta_touches += 1
                self._enqueue(args[0], b"*3\r\n$6\r\nEXPIRE\r\n" + args[1] + args[5], _ignore) \
                    .add_done_callback(_retrieve)

    # -- subscriptions -----------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        channel = self.channel(room)
        if channel in self._rooms:
            return
        if not self.connected:
            self.subscribe_errors += 1
            raise BrokerUnavailable(f"redis unavailable: {self._last_error}")
        shard = self._shard_for(channel)
        if not shard.up:
            self.subscribe_errors += 1
            raise BrokerUnavailable(f"redis unavailable: {_SHARD_DOWN}")
        # Held from now on, so a reconnect while we wait resubscribes it.
        self._rooms[channel] = room
        self._room_args(room)
        self._touched[room] = self._now = self._loop.time()
        fut = self._loop.create_future()
        shard.sub_waiters[channel].append(fut)
        try:
            if not shard.sub.is_connected:
                raise BrokerUnavailable("pub/sub connection closed")
            async with asyncio.timeout(self.timeout):
                await shard.sub.send_packed_command(_command(self._subscribe_cmd, channel), check_health=False)
                await fut
        except BaseException as exc:
            self.subscribe_errors += 1
            if self._rooms.get(channel) == room:
                await self.unsubscribe(room)
            if isinstance(exc, (RedisError, OSError, asyncio.TimeoutError)):
                self._report_fault(exc, shard)
                raise BrokerUnavailable(f"redis subscribe failed: {type(exc).__name__}: {exc}") from None
            raise

    async def unsubscribe(self, room: str) -> None:
        channel = self.channel(room)
        if self._rooms.pop(channel, None) is None:
            return
        self._last_seq.pop(room, None)
        self._touched.pop(room, None)
        self._args.pop(room, None)
        if not self.connected or not self._shards:
            return   # not subscribed in Redis anyway; the next connect will not resubscribe it
        shard = self._shard_for(channel)
        if not shard.up:
            return   # its subscription died with the shard's connection
        shard.unsub_expected[channel] += 1
        try:
            if not shard.sub.is_connected:
                raise BrokerUnavailable("pub/sub connection closed")
            async with asyncio.timeout(self.timeout):
                await shard.sub.send_packed_command(_command(self._unsubscribe_cmd, channel), check_health=False)
        except Exception as exc:  # noqa: BLE001 - the room is released either way
            self._report_fault(exc, shard)

    # -- receiving ---------------------------------------------------------------------

    async def _read_loop(self, shard: _Shard) -> None:
        """The pub/sub reader of one shard: deliver publications, confirm (un)subscribes."""
        conn = shard.sub
        rooms = self._rooms
        last_seq = self._last_seq
        touched = self._touched
        handler = self._handler
        try:
            while True:
                reply = await conn.read_response(timeout=math.inf)
                kind = reply[0]
                if kind == b"message" or kind == b"smessage":
                    room = rooms.get(reply[1])
                    if room is None:
                        continue   # released while the message was on its way
                    seq_b, _, rest = reply[2].partition(b":")
                    epoch_b, _, data = rest.partition(b":")
                    seq = int(seq_b)
                    self.messages_received += 1
                    prev = last_seq.get(room)
                    if prev is not None:
                        if prev[1] != epoch_b or seq <= prev[0]:
                            self.seq_resets += 1
                            epoch = epoch_b.decode()
                        else:
                            epoch = prev[2]
                            if seq > prev[0] + 1:
                                self.messages_lost += seq - prev[0] - 1
                    else:
                        epoch = epoch_b.decode()
                    last_seq[room] = (seq, epoch_b, epoch)
                    if room in touched:
                        touched[room] = self._now   # the script refreshed the meta TTL
                    try:
                        handler.handle_publication(room, seq, data, epoch)
                    except Exception:
                        log.exception("publication handler failed", extra={"room": room})
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    waiters = shard.sub_waiters.get(reply[1])
                    if waiters:
                        fut = waiters.popleft()
                        if not fut.done():
                            fut.set_result(None)
                elif kind == b"unsubscribe" or kind == b"sunsubscribe":
                    channel = reply[1]
                    if shard.unsub_expected[channel] > 0:
                        shard.unsub_expected[channel] -= 1
                    elif channel in rooms:
                        # Redis dropped a room we hold (its slot moved): re-read the topology.
                        raise RedisError(f"redis unsubscribed {channel!r} (slot migrated?)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - lost connection, protocol error, MOVED: a fault
            self._report_fault(exc, shard)

    # -- observability -----------------------------------------------------------------

    def state(self) -> tuple[bool, str]:
        """A readiness check: (ok, detail)."""
        if self.connected:
            return True, self.degraded() or "broker connected"
        return False, f"broker disconnected ({self._last_error or 'connecting'})"

    def stats(self) -> dict:
        return {
            "connected": int(self.connected),
            "publishes": self.publishes,
            "publish_errors": self.publish_errors,
            "publish_batches": self.publish_batches,
            "subscribe_errors": self.subscribe_errors,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "messages_received": self.messages_received,
            "messages_lost": self.messages_lost,
            "seq_resets": self.seq_resets,
            "local_deliveries": self.local_deliveries,
            "duplicates": self.duplicates,
            "history_reads": self.history_reads,
            "meta_touches": self.meta_touches,
            "rooms": len(self._rooms),
            "shards": len(self._shards),
            "shards_down": sum(not s.up for s in self._shards),
            "shard_failures": self.shard_failures,
        }

    def degraded(self) -> str:
        """Why only part of the rooms are served ("" when all are): shards down on a cluster.
        Addresses stay out of it (it is shown on /readyz); the log and /metrics name the shards."""
        if not self.connected:
            return ""
        down = sum(not s.up for s in self._shards)
        if not down:
            return ""
        return (f"degraded: {down} of {len(self._shards)} redis shards down "
                "(their rooms get broker_unavailable; the other rooms flow)")
