"""Webhook events in Redis: per-dimension holders with TTLs, and the durable outbox (issue 17).

Keys (one hash tag, so every script's keys share a Redis Cluster slot):
    <prefix>{wh}:um <prefix>{wh}:uo <prefix>{wh}:un <prefix>{wh}:up   users (events.lua KEYS 1-4)
    <prefix>{wh}:rm <prefix>{wh}:ro <prefix>{wh}:rn <prefix>{wh}:rp   rooms
    <prefix>{wh}:outbox   the outbox stream; consumer group "webhooks", one consumer per process

Crashes. A process refreshes its members every heartbeat (ttl / 3); they expire 2/3 ttl after
the last refresh, so after a SIGKILL the next heartbeat of ANY live process (its update
script runs the cleanup) removes them and appends their user_offline / room_vacated in the
same atomic step: within the TTL, once. Entries a dead process had read but not delivered
stay in the group's pending list until a live process claims them (XAUTOCLAIM).

Time is Redis's (TIME inside the scripts), so skewed gateway clocks agree on who is alive.
Same approach as the presence branch's redis_presence.py (sorted sets scored by expiry,
counters updated in Lua, pending tokens for the debounce), in its own keyspace: webhooks
track processes holding users and rooms, presence tracks connections in opted-in rooms.
Imports `gateway.broker.events` and redis-py only.
"""
from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.broker.events import DIMENSIONS, EventsUnavailable

_SCRIPT_FILE = os.path.join(os.path.dirname(__file__), "events.lua")
GROUP = "webhooks"
OUTBOX_MAXLEN = 1_000_000    # a cap against an unbounded stream; far above any sane backlog
MAX_OPS_PER_CALL = 1000      # bounds one script's run time (Redis is single-threaded)
STALE_FACTOR = 3             # a pending event older than debounce * this lost its process
READ_BLOCK = 1.0             # longest XREADGROUP BLOCK (s); the reader's socket timeout exceeds it


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


def _client(url: str, timeout: float | None, connect_timeout: float):
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = scheme.split("+")[0]
        netloc = rest.partition("/")[0]
        auth, at, hosts = netloc.rpartition("@")
        return aioredis.RedisCluster.from_url(f"{base}://{auth}{at}{hosts.split(',')[0]}", socket_timeout=timeout,
                                              socket_connect_timeout=connect_timeout)
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEvents:
    def __init__(self, url: str, *, node: str, prefix: str = "ws:", timeout: float = 5.0) -> None:
        self.url = url
        self.node = node
        self.prefix = prefix
        self.timeout = timeout
        self.ttl_ms = 20000
        self.stale_ms = 9000
        self._cmd = None
        self._reader = None
        self._scripts: dict = {}
        self._group_ready = False
        tag = f"{prefix}{{wh}}"
        self.outbox = f"{tag}:outbox"
        self._keys = {kind: [f"{tag}:{kind[0]}m", f"{tag}:{kind[0]}o", f"{tag}:{kind[0]}n", f"{tag}:{kind[0]}p",
                             self.outbox] for kind in DIMENSIONS}

    async def start(self, ttl: float, debounce: float) -> None:
        # Members expire 2/3 ttl after their last refresh; heartbeats come every ttl/3.
        self.ttl_ms = max(600, int(ttl * 2000 / 3))
        self.stale_ms = max(1000, int(debounce * 1000 * STALE_FACTOR))
        self._cmd = _client(self.url, self.timeout, self.timeout)
        # The reader blocks in XREADGROUP: its socket timeout must outlast the block.
        self._reader = _client(self.url, self.timeout + READ_BLOCK + 1.0, self.timeout)
        self._scripts = {name: self._cmd.register_script(body) for name, body in _load_scripts().items()}
        try:
            await self._ensure_group()
        except EventsUnavailable:
            pass      # Redis down at start: the delivery loop retries

    async def close(self) -> None:
        for client in (self._cmd, self._reader):
            if client is not None:
                await client.aclose()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._cmd.xgroup_create(self.outbox, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise EventsUnavailable(f"cannot create the outbox group: {exc}") from None
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None
        self._group_ready = True

    def _args(self, kind: str, cleanup: bool) -> list:
        on, off = DIMENSIONS[kind]
        return [self.ttl_ms, self.node, int(cleanup), self.stale_ms, on, off, kind, OUTBOX_MAXLEN,
                os.urandom(4).hex()]

    async def _run(self, name: str, kind: str, args: list):
        try:
            return await self._scripts[name](keys=self._keys[kind], args=args)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis events {name} failed: {type(exc).__name__}: {exc}"[:300]) from None

    async def update(self, kind: str, ops: list, cleanup: bool = False) -> list:
        pending = []
        chunks = [ops[i:i + MAX_OPS_PER_CALL] for i in range(0, len(ops), MAX_OPS_PER_CALL)] or [[]]
        for n, chunk in enumerate(chunks):
            args = self._args(kind, cleanup and n == len(chunks) - 1)
            for op, subject in chunk:
                args += (op, f"{self.node}|{subject}", subject)
            flat = await self._run("update", kind, args)
            pending += [(_s(flat[j]), _s(flat[j + 1])) for j in range(0, len(flat), 2)]
        return pending

    async def confirm(self, kind: str, pending: list) -> None:
        if pending:
            await self._run("confirm", kind, self._args(kind, False) + [x for pair in pending for x in pair])

    async def append(self, fields: dict) -> None:
        fields = dict(fields, n=os.urandom(4).hex())
        try:
            await self._cmd.xadd(self.outbox, fields, maxlen=OUTBOX_MAXLEN, approximate=True)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis outbox append failed: {type(exc).__name__}: {exc}"[:300]) from None

    @staticmethod
    def _entries(raw) -> list:
        return [(_s(entry_id), {_s(k): _s(v) for k, v in fields.items()}) for entry_id, fields in raw if fields]

    async def read(self, count: int, block: float) -> list:
        try:
            await self._ensure_group()
            reply = await self._reader.xreadgroup(GROUP, self.node, {self.outbox: ">"}, count=count,
                                                  block=max(1, int(min(block, READ_BLOCK) * 1000)))
        except ResponseError as exc:
            if "NOGROUP" in str(exc):        # the stream was deleted (FLUSHALL, restart): recreate
                self._group_ready = False
            raise EventsUnavailable(f"redis outbox read failed: {exc}"[:300]) from None
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis outbox read failed: {type(exc).__name__}: {exc}"[:300]) from None
        return self._entries(reply[0][1]) if reply else []

    async def claim(self, min_idle: float, count: int) -> list:
        try:
            await self._ensure_group()
            reply = await self._cmd.xautoclaim(self.outbox, GROUP, self.node, int(min_idle * 1000),
                                               start_id="0-0", count=count)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis outbox claim failed: {type(exc).__name__}: {exc}"[:300]) from None
        return self._entries(reply[1])

    async def touch(self, ids: list) -> None:
        if ids:
            try:
                await self._cmd.xclaim(self.outbox, GROUP, self.node, 0, ids, justid=True)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise EventsUnavailable(f"redis outbox touch failed: {exc}"[:300]) from None
                # The outbox is gone (Redis restarted empty): nobody can claim these entries
                # now; the caller still holds them and delivers them (XACK of a missing key is 0).
                self._group_ready = False
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                raise EventsUnavailable(f"redis outbox touch failed: {exc}"[:300]) from None

    async def ack(self, ids: list) -> None:
        if ids:
            try:
                pipe = self._cmd.pipeline(transaction=False)
                pipe.xack(self.outbox, GROUP, *ids)
                pipe.xdel(self.outbox, *ids)
                await pipe.execute()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                raise EventsUnavailable(f"redis outbox ack failed: {exc}"[:300]) from None

    async def pending_count(self) -> int:
        try:
            return int(await self._cmd.xlen(self.outbox))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise EventsUnavailable(f"redis outbox length failed: {exc}"[:300]) from None
