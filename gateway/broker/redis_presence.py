"""Presence, the control channel, per-user caps and revocations in Redis (issue 16).

Separate from the publication broker (redis.py) on purpose: its own two connections (a
command client and a pub/sub reader), its own scripts (presence.lua), so neither can slow
the other and the hot publish path stays untouched. Created only when a feature needs it.

Names (prefix as the broker's; `{tag}` = the room's or user's cluster hash tag, so every key
of one script lives in one slot):
    <prefix>pz:{R} pk:{R} pc:{R} pu:{R} pi:{R} pg:{R}   a room's presence (see presence.lua)
    <prefix>pev:{R}          the room's presence events (join/leave diffs), PUBLISHed by Lua
    <prefix>uc:{U}           user U's connections across the cluster (max_connections_per_user)
    <prefix>control          the control channel: every process receives every command
    <prefix>nodes            live processes ("<ms>|<json>", refreshed every heartbeat)
    <prefix>revoked          revocations: key -> "<until>|<value>", pruned after `until`

Time. Expiries use Redis's clock (TIME inside the scripts), never the gateways', so machines
with skewed clocks agree on who is alive. A process refreshes its entries every heartbeat
(ttl / 3); after a SIGKILL nobody does, and the next script touching the room (a surviving
process's heartbeat, a presence query) removes them and publishes their leaves: they are gone
within the TTL.

Sentinel. `redis+sentinel://` URLs get redis-py's Sentinel clients (master_for: the primary is
found again after a failover) and the redis-py script calls instead of the fast pipe.

Cluster. The command client is a RedisCluster for `redis+cluster://` URLs (every script's
keys share a slot); the reader uses classic SUBSCRIBE on one node, which receives every
PUBLISH of the cluster (classic pub/sub is broadcast). Presence events are rare next to
publications, so that broadcast is cheap.

Faults. Every call raises BrokerUnavailable when Redis cannot answer; the reader reconnects
with jittered backoff, resubscribes, and tells the handler (which reloads what it may have
missed). Imports only `gateway.broker.base` and redis-py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket

import hashlib

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.broker import url as broker_url
from gateway.broker.base import BrokerUnavailable, PresenceHandler

log = logging.getLogger("gateway.broker.redis_presence")

_SCRIPT_FILE = os.path.join(os.path.dirname(__file__), "presence.lua")
STALE_FACTOR = 3           # a pending leave older than debounce * this has lost its process
MAX_OPS_PER_CALL = 1000    # bounds one script's run time (Redis is single-threaded)


def _load_scripts() -> dict[str, str]:
    with open(_SCRIPT_FILE, encoding="utf-8") as fh:
        text = fh.read()
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("-- @script "):
            current = line.split()[-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    common = "\n".join(sections.pop("common"))
    return {name: common + "\n" + "\n".join(body) for name, body in sections.items()}


def tag(name: str) -> str:
    """A name as a cluster hash tag (the broker's escaping: no "}" inside, never empty)."""
    if "}" in name or "%" in name:
        name = name.replace("%", "%25").replace("}", "%7D")
    return name or "%"


def _client(url: str, timeout: float, reader: bool = False):
    """A redis-py client for the broker URL (checked by the one parser, gateway/broker/url.py;
    its nodes carry the TLS parameters). Cluster: a RedisCluster from the first seed; the
    reader is a plain client on that node (classic pub/sub reaches every node)."""
    parsed = broker_url.parse(url)
    first = parsed.nodes[0]
    if parsed.sentinel:
        # The primary the sentinels name, found again after a failover (redis-py's Sentinel).
        from redis.asyncio.sentinel import Sentinel
        node = parse_url(first)
        for key in ("host", "port", "connection_class"):
            node.pop(key, None)
        if parsed.tls:
            node["ssl"] = True
        asked = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if parsed.params.get("sentinel_password"):
            asked["password"] = parsed.params["sentinel_password"]
        sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=asked)
        return sentinel.master_for(parsed.service, socket_timeout=None if reader else timeout,
                                   socket_connect_timeout=timeout, **node)
    if reader:   # no read timeout: the reader waits for messages indefinitely
        return aioredis.Redis.from_url(first, socket_connect_timeout=timeout)
    if parsed.cluster:
        return aioredis.RedisCluster.from_url(first, socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_url(first, socket_timeout=timeout, socket_connect_timeout=timeout)


def _arg(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return b"%d" % value
    return str(value).encode()


def _pack(*parts) -> bytes:
    """RESP-encode one command (hand-rolled: a handshake or a join pass packs one per call)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = _arg(part)
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _ScriptPipe:
    """Commands issued during one loop pass leave in ONE write on ONE connection; Redis answers
    in order, so the replies are read back in order (single node; a cluster uses redis-py).

    What redis-py's Pipeline costs per call (a pool checkout, SCRIPT EXISTS before every
    execute, per-command objects) is ~10x a handshake's own Python; this is one bytes join
    and one hiredis parse per command. A NOSCRIPT reply (SCRIPT FLUSH, a restarted Redis)
    loads the script and resends just those commands; a connection error fails the batch
    (BrokerUnavailable) and the next call reconnects.
    """

    def __init__(self, url: str, timeout: float) -> None:
        kwargs = parse_url(broker_url.parse(url).nodes[0])
        self._cls = kwargs.pop("connection_class", Connection)
        kwargs.setdefault("protocol", 2)
        self._kwargs = kwargs
        self.timeout = timeout
        self._conn: Connection | None = None
        self._queue: list = []       # (packed, script body or None, future)
        self._writer: asyncio.Task | None = None

    def call(self, packed: bytes, body: bytes | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((packed, body, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return fut

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = self._cls(**self._kwargs, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                             client_name="ws-gateway-presence")
            await conn.connect()
            conn.socket_timeout = None   # our asyncio.timeout bounds each exchange
            self._conn = conn
        return conn

    async def _write_loop(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._connection()
                    await conn.send_packed_command([packed for packed, _, _ in batch], check_health=False)
                    retry = []
                    for item in batch:
                        fut = item[2]
                        try:
                            reply = await conn.read_response()
                        except NoScriptError:
                            retry.append(item)
                            continue
                        except ResponseError as exc:
                            if not fut.done():
                                fut.set_exception(exc)
                            continue
                        if not fut.done():
                            fut.set_result(reply)
                    for body in {item[1] for item in retry if item[1]}:
                        await conn.send_packed_command(_pack(b"SCRIPT", b"LOAD", body), check_health=False)
                        await conn.read_response()
                self._queue[:0] = retry
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the connection is unusable: fail the batch
                conn, self._conn = self._conn, None
                if conn is not None:
                    try:
                        await conn.disconnect(nowait=True)
                    except Exception:  # noqa: BLE001
                        pass
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, (RedisError, OSError, asyncio.TimeoutError))
                                          else RedisError(repr(exc)))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait([self._writer])
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        for _, _, fut in self._queue:
            if not fut.done():
                fut.set_exception(RedisError("closed"))


class RedisPresence:
    def __init__(self, url: str, *, prefix: str = "ws:", timeout: float = 5.0, debounce: float = 3.0) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.node = f"{socket.gethostname()[:16]}-{os.getpid()}-{os.urandom(2).hex()}"
        self.connected = False
        self.ttl_ms = 30000
        self.stale_ms = int(debounce * 1000 * STALE_FACTOR)
        self._handler: PresenceHandler | None = None
        self._cmd = None
        self._scripts: dict = {}
        self._bodies: dict = {}
        self._pipe: _ScriptPipe | None = None     # single node: the fast path for every script
        self._reader: asyncio.Task | None = None
        self._pubsub = None
        self._watched: dict[str, str] = {}     # event channel -> room
        self._control = f"{prefix}control"
        self._closing = False
        self.errors = 0
        self.reconnects = 0

    # -- names ------------------------------------------------------------------------------

    def room_keys(self, room: str) -> list[str]:
        t, p = tag(room), self.prefix
        return [f"{p}pz:{{{t}}}", f"{p}pk:{{{t}}}", f"{p}pc:{{{t}}}", f"{p}pu:{{{t}}}", f"{p}pi:{{{t}}}",
                f"{p}pg:{{{t}}}", f"{p}pev:{{{t}}}"]

    def events_channel(self, room: str) -> str:
        return f"{self.prefix}pev:{{{tag(room)}}}"

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, handler: PresenceHandler, ttl: float) -> None:
        self._handler = handler
        self.ttl_ms = max(1000, int(ttl * 1000))
        self._cmd = _client(self.url, self.timeout)
        bodies = _load_scripts()
        self._scripts = {name: self._cmd.register_script(body) for name, body in bodies.items()}
        self._bodies = {name: (hashlib.sha1(body.encode()).hexdigest().encode(), body.encode())
                        for name, body in bodies.items()}
        parsed = broker_url.parse(self.url)
        if not parsed.cluster and not parsed.sentinel:   # the pipe holds one fixed address
            self._pipe = _ScriptPipe(self.url, self.timeout)
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(ready))
        try:
            # Wait for the first subscription (so control messages sent right after start
            # arrive), but not forever: a gateway starts while Redis is down and catches up.
            await asyncio.wait_for(asyncio.shield(ready), self.timeout)
        except asyncio.TimeoutError:
            log.warning("presence: redis not reachable yet; retrying in the background",
                        extra={"event": "presence_state", "connected": False})

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
        if self._pipe is not None:
            await self._pipe.close()
        if self._cmd is not None:
            await self._cmd.aclose()

    async def _read_loop(self, ready: asyncio.Future) -> None:
        """Subscribe (control + watched rooms), deliver, and on any error start over."""
        attempt = 0
        while not self._closing:
            client = _client(self.url, self.timeout, reader=True)
            pubsub = self._pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._control, *self._watched)
                if attempt:
                    self.reconnects += 1
                attempt = 0
                self._set_state(True)
                if not ready.done():
                    ready.set_result(None)
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None:
                        self._dispatch(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - connection lost, Redis down: start over
                self._set_state(False, exc)
            finally:
                self._pubsub = None
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:  # noqa: BLE001 - being thrown away
                    pass
            attempt += 1
            delay = min(5.0, 0.05 * 2 ** min(attempt, 7))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    def _set_state(self, connected: bool, error: BaseException | None = None) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("presence: redis connected", extra={"event": "presence_state", "connected": True})
        else:
            log.warning("presence: redis disconnected", extra={"event": "presence_state", "connected": False,
                                                               "error": f"{type(error).__name__}: {error}"[:200]})
        try:
            self._handler.handle_control_state(connected)
        except Exception:
            log.exception("presence state handler failed")

    def _dispatch(self, msg: dict) -> None:
        if msg.get("type") != "message":
            return
        channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
        try:
            doc = orjson.loads(msg["data"])
        except orjson.JSONDecodeError:
            log.warning("presence: undecodable message", extra={"event": "presence_bad_message", "channel": channel})
            return
        try:
            if channel == self._control:
                if isinstance(doc, dict):
                    self._handler.handle_control(doc)
                return
            room = self._watched.get(channel)
            if room is None or not isinstance(doc, dict):
                return
            # cjson encodes an empty Lua table as {}: treat it as an empty list
            joins = doc.get("j") or []
            leaves = doc.get("l") or []
            self._handler.handle_presence_events(room, [tuple(j) for j in joins] if isinstance(joins, list) else [],
                                                 leaves if isinstance(leaves, list) else [])
        except Exception:
            log.exception("presence handler failed", extra={"channel": channel})

    # -- calls ------------------------------------------------------------------------------

    def _script(self, name: str, keys: list, args: list) -> asyncio.Future:
        """Queue one script on the fast pipe (single node)."""
        sha, body = self._bodies[name]
        return self._pipe.call(_pack(b"EVALSHA", sha, len(keys), *keys, *args), body)

    async def _run(self, name: str, keys: list, args: list):
        try:
            if self._pipe is not None:
                return await self._script(name, keys, args)
            return await self._scripts[name](keys=keys, args=args)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise BrokerUnavailable(f"redis presence {name} failed: {type(exc).__name__}: {exc}"[:300]) from None

    def _update_args(self, ops: list, events: bool, cleanup: bool) -> list:
        args = [self.ttl_ms, self.node, int(events), int(cleanup), self.stale_ms, max(self.ttl_ms, self.stale_ms) * 2]
        for op, key, user, info, _ in ops:
            args += (op, key, user, info)
        return args

    def _chunks(self, ops: list, events: bool, cleanup: bool):
        """A room's ops as script calls of at most MAX_OPS_PER_CALL (bounding one script's run
        time: Redis is single-threaded); the cleanup runs with the last one, after every entry
        of this process was refreshed."""
        for i in range(0, max(1, len(ops)), MAX_OPS_PER_CALL):
            yield self._update_args(ops[i:i + MAX_OPS_PER_CALL], events, cleanup and i + MAX_OPS_PER_CALL >= len(ops))

    @staticmethod
    def _pending(flat) -> list:
        return [(flat[j].decode(), flat[j + 1].decode()) for j in range(0, len(flat), 2)]

    async def update(self, room: str, ops: list, events: bool, cleanup: bool = False) -> list:
        (result,) = await self.update_many([(room, ops, events, cleanup)])
        if isinstance(result, BaseException):
            raise result
        return result

    async def update_many(self, batch: list) -> list:
        """Several rooms' updates [(room, ops, events, cleanup)] at once (single node: ONE write,
        one round trip, for a loop pass's joins and leaves or a heartbeat; cluster: concurrent
        calls); per item its pending leaves, or the BrokerUnavailable that item met."""
        if self._pipe is not None:
            return await self._gather([[self._script("update", self.room_keys(room), args)
                                        for args in self._chunks(ops, events, cleanup)]
                                       for room, ops, events, cleanup in batch], self._pending)
        # Cluster: one script call per room chunk, concurrently (redis-py routes each by slot).
        return await self._gather([[asyncio.ensure_future(self._scripts["update"](keys=self.room_keys(room), args=args))
                                    for args in self._chunks(ops, events, cleanup)]
                                   for room, ops, events, cleanup in batch], self._pending)

    async def _gather(self, groups: list, convert) -> list:
        """Await groups of queued pipe calls; per group the joined result or its BrokerUnavailable."""
        out = []
        for futs in groups:
            result: list | BaseException = []
            for fut in futs:
                try:
                    reply = await fut
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    self.errors += 1
                    result = BrokerUnavailable(f"redis presence failed: {type(exc).__name__}: {exc}"[:300])
                    continue
                if not isinstance(result, BaseException):
                    result = result + convert(reply)
            out.append(result)
        return out

    async def confirm_leaves(self, room: str, pending: list) -> None:
        args = [x for pair in pending for x in pair]
        if args:
            await self._run("confirm", self.room_keys(room), args)

    async def watch(self, room: str) -> None:
        channel = self.events_channel(room)
        if channel in self._watched:
            return
        self._watched[channel] = room
        pubsub = self._pubsub
        if pubsub is not None and self.connected:
            try:
                await pubsub.subscribe(channel)
            except Exception as exc:  # noqa: BLE001 - the reader resubscribes after it reconnects
                log.debug("presence watch failed", extra={"room": room, "error": repr(exc)[:200]})

    async def unwatch(self, room: str) -> None:
        channel = self.events_channel(room)
        if self._watched.pop(channel, None) is None:
            return
        pubsub = self._pubsub
        if pubsub is not None and self.connected:
            try:
                await pubsub.unsubscribe(channel)
            except Exception:  # noqa: BLE001 - stray events for unwatched rooms are ignored
                pass

    async def members(self, room: str, after: str, limit: int, clients: bool = False) -> tuple[list, str | None]:
        users, counts, infos, more, owners = await self._run("members", self.room_keys(room),
                                                             [self.stale_ms, after, limit, int(clients)])
        out = [(u.decode(), int(c or 0), (i or b"").decode()) for u, c, i in zip(users, counts, infos)]
        if clients:
            by_user: dict = {}
            for j in range(0, len(owners), 2):
                by_user.setdefault(owners[j + 1].decode(), []).append(owners[j].decode())
            out = [row + (sorted(by_user.get(row[0], ())),) for row in out]
        return out, (out[-1][0] if more and out else None)

    async def counts(self, room: str) -> tuple[int, int]:
        conns, users = await self._run("counts", self.room_keys(room), [self.stale_ms])
        return int(conns), int(users)

    async def send_control(self, message: dict) -> None:
        try:
            await self._cmd.publish(self._control, orjson.dumps(message))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise BrokerUnavailable(f"redis control publish failed: {type(exc).__name__}: {exc}"[:300]) from None

    async def register_node(self, info: dict) -> None:
        await self._run("node", [f"{self.prefix}nodes"], [self.node, orjson.dumps(dict(info, node=self.node)),
                                                          self.ttl_ms])

    async def nodes(self) -> list[dict]:
        docs = await self._run("node", [f"{self.prefix}nodes"], ["", "", self.ttl_ms])
        return [orjson.loads(d) for d in docs]

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}uc:{{{tag(user)}}}"

    async def acquire_user_slot(self, user: str, conn_key: str, limit: int) -> bool:
        return bool(await self._run("slot", [self._user_key(user)], [conn_key, limit, self.ttl_ms]))

    async def acquire_user_slots(self, requests: list) -> list:
        """[(user, conn key, limit)] at once (the handshakes of one loop pass): one write on a
        single node, concurrent calls on a cluster."""
        if self._pipe is not None:
            results = await self._gather([[self._script("slot", [self._user_key(user)], [key, limit, self.ttl_ms])]
                                          for user, key, limit in requests], lambda reply: [bool(reply)])
            return [r if isinstance(r, BaseException) else r[0] for r in results]
        results = await self._gather([[asyncio.ensure_future(self._scripts["slot"](
            keys=[self._user_key(user)], args=[key, limit, self.ttl_ms]))] for user, key, limit in requests],
            lambda reply: [bool(reply)])
        return [r if isinstance(r, BaseException) else r[0] for r in results]

    async def release_user_slot(self, user: str, conn_key: str) -> None:
        try:
            if self._pipe is not None:
                await self._pipe.call(_pack(b"ZREM", self._user_key(user), conn_key))
                return
            await self._cmd.zrem(self._user_key(user), conn_key)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise BrokerUnavailable(f"redis release failed: {exc}"[:300]) from None

    async def refresh_user_slots(self, slots: list) -> None:
        by_user: dict[str, list] = {}
        for user, key in slots:
            by_user.setdefault(user, []).append(key)
        for user, keys in by_user.items():
            await self._run("touch", [self._user_key(user)], [self.ttl_ms, *keys])

    async def store_revocation(self, key: str, value: str, until: float) -> None:
        try:
            await self._cmd.hset(f"{self.prefix}revoked", key, f"{until:.3f}|{value}")
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise BrokerUnavailable(f"redis revocation store failed: {exc}"[:300]) from None

    async def load_revocations(self) -> dict:
        import time
        name = f"{self.prefix}revoked"
        try:
            raw = await self._cmd.hgetall(name)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise BrokerUnavailable(f"redis revocation load failed: {exc}"[:300]) from None
        now, out, expired = time.time(), {}, []
        for key, value in raw.items():
            until, _, val = value.decode().partition("|")
            try:
                until_f = float(until)
            except ValueError:
                until_f = 0.0
            if until_f > now:
                out[key.decode()] = (val, until_f)
            else:
                expired.append(key)
        if expired:
            try:
                await self._cmd.hdel(name, *expired)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass
        return out

    def stats(self) -> dict:
        return {"connected": int(self.connected), "errors": self.errors, "reconnects": self.reconnects,
                "watched_rooms": len(self._watched)}
