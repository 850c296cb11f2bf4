"""Proxy hooks: the backend decides what a JWT cannot (a cookie session, a join that depends on
the database, a publication to check or rewrite). Centrifugo's proxy, AnyCable's RPC.

Each hook POSTs JSON to one backend URL through a HookClient (hookclient.py: keep-alive
pool, timeout, concurrency cap, circuit breaker). The wire format is in docs/backend.md;
in short:

connect (`connect_proxy_url`), before the `101` of a /ws upgrade that carries no JWT (or
every upgrade when no JWT key is configured). The gateway forwards the handshake's
`proxy_headers` (Cookie, Authorization, Origin, ...) as the request's own headers, so the
backend's session middleware reads them as usual, and sends
    {"client": "<node>.<id>", "ip": "...", "path": "/ws", "query": "..."}
    200 {"user": "alice", "rooms": [...], "publish": [...], "info": {...}, "expire_at": 1700000000}
        admits: the connection's principal (rooms/publish default to default_rooms/
        default_publish; "user": "" is anonymous; expire_at closes it with 4001 then)
    401 / 403 {"reason": "..."}     the client gets that status (and the reason, sanitised)
    anything else, timeout, breaker open: 503 with Retry-After (the backend is down; a
        client should retry later, not treat it as a verdict on its credentials)

join (`join_proxy_url`, rooms matching `join_proxy_rooms`): {"client","user","room","info"}
    200 {} / {"allow": true} allows; 403 or {"allow": false, "reason": ...} -> error
    `forbidden`; unavailable -> error `backend_unavailable` (retry later).
publish (`publish_proxy_url`, rooms matching `publish_proxy_rooms`): {"client","user","room","data"}
    200 {} publishes as sent; {"data": X} publishes X instead; 403 / {"allow": false} ->
    `forbidden`; unavailable -> `backend_unavailable`.

The hooks run as awaited tasks: the connection waits (reading paused), the event loop and
every other client do not. Imports: stdlib, orjson, hookclient, security.auth (Principal),
rooms.commands (error codes), errors; never connection/server.
"""
from __future__ import annotations

import fnmatch
import logging
import re

import orjson

from gateway.api.hookclient import HookClient, HookUnavailable
from gateway.errors import HandshakeRejected
from gateway.ops.logs import RateLimitedLog
from gateway.rooms.commands import CommandError, serialize_data
from gateway.security.auth import MAX_PATTERN_LENGTH, MAX_PATTERNS, MAX_SUB_LENGTH, Principal

log = logging.getLogger("gateway.api.proxy")
# While a backend is down every handshake/join meets it: one WARNING per 10 s per hook, with
# the number suppressed (each refusal is also counted, and the breaker's opening logged).
_unavailable_log = {kind: RateLimitedLog(log, 10.0) for kind in ("connect", "join", "publish")}

MAX_REASON_CHARS = 200
MAX_INFO_BYTES = 4096
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _reason(answer, default: str) -> str:
    """A backend's reason as safe one-line ASCII (it reaches an HTTP status line and a log)."""
    if isinstance(answer, dict) and isinstance(answer.get("reason"), str) and answer["reason"].strip():
        return _UNSAFE.sub("?", answer["reason"].strip())[:MAX_REASON_CHARS]
    return default


def _patterns(value, default: tuple) -> tuple:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_PATTERNS
            or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LENGTH for p in value)):
        raise ValueError("rooms/publish must be lists of room patterns")
    return tuple(value)


def _matcher(patterns: tuple):
    if "*" in patterns:
        return lambda room: True
    if not patterns:
        return lambda room: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda room: regex.match(room) is not None


def principal_from_answer(answer, default_rooms: tuple, default_publish: tuple) -> Principal:
    """The connect proxy's 200 answer as a Principal; ValueError saying what is wrong."""
    if not isinstance(answer, dict):
        raise ValueError("the answer must be a JSON object")
    user = answer.get("user")
    if (not isinstance(user, str) or len(user) > MAX_SUB_LENGTH
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in user)):
        raise ValueError('"user" must be a short printable string ("" for anonymous)')
    rooms = _patterns(answer.get("rooms"), default_rooms)
    publish = _patterns(answer.get("publish"), rooms if "rooms" in answer else default_publish)
    expire_at = answer.get("expire_at")
    if expire_at is not None and (isinstance(expire_at, bool) or not isinstance(expire_at, (int, float))):
        raise ValueError('"expire_at" must be Unix seconds')
    claims = {"proxy": True}
    if "info" in answer:
        if len(orjson.dumps(answer["info"])) > MAX_INFO_BYTES:
            raise ValueError(f'"info" is larger than {MAX_INFO_BYTES} bytes')
        claims["info"] = answer["info"]
    return Principal(user=user, expires_at=float(expire_at) if expire_at is not None else None,
                     rooms=rooms, publish=publish, claims=claims)


class ProxyStats:
    def __init__(self) -> None:
        self.decisions: dict = {}        # (hook, outcome) -> count; see count()

    def count(self, hook: str, outcome: str) -> None:
        key = (hook, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1


class ConnectProxy:
    """An async admission check (server/connection.py `gateway.async_admission`)."""

    def __init__(self, client: HookClient, headers: tuple, default_rooms: tuple, default_publish: tuple,
                 node: str, stats: ProxyStats) -> None:
        self.client = client
        self.headers = tuple(h.lower() for h in headers)
        self.default_rooms = default_rooms
        self.default_publish = default_publish
        self.node = node
        self.stats = stats

    async def admit(self, conn) -> None:
        if conn.principal is not None:
            return                         # a valid JWT came with the request: no need to ask
        request = conn.request
        forwarded = {}
        for name in self.headers:
            value = request.headers.get(name)
            if value:
                forwarded[name] = value
        doc = {"client": f"{self.node}.{conn.id}", "ip": conn.client_ip, "path": request.path,
               "query": request.query}
        try:
            status, answer = await self.client.post(doc, forwarded)
        except HookUnavailable as exc:
            self.stats.count("connect", "unavailable")
            _unavailable_log["connect"].warning("connect proxy unavailable: handshake refused with 503", {
                "event": "proxy_unavailable", "hook": "connect", "conn": conn.id, "reason": exc.reason},
                exc_info=False)
            raise HandshakeRejected(503, "authentication backend unavailable; retry later",
                                    {"Retry-After": "5"}) from None
        if status in (401, 403):
            self.stats.count("connect", "refused")
            raise HandshakeRejected(status, _reason(answer, "refused by the connect proxy"))
        if not 200 <= status < 300:
            self.stats.count("connect", "unavailable")
            _unavailable_log["connect"].warning(
                f"connect proxy answered {status} (expected 200, 401 or 403): check connect_proxy_url",
                {"event": "proxy_bad_status", "hook": "connect", "status": status}, exc_info=False)
            raise HandshakeRejected(503, "authentication backend unavailable; retry later", {"Retry-After": "5"})
        try:
            principal = principal_from_answer(answer, self.default_rooms, self.default_publish)
        except ValueError as exc:
            self.stats.count("connect", "bad_answer")
            _unavailable_log["connect"].warning(f"connect proxy answer refused: {exc}",
                                                {"event": "proxy_bad_answer", "hook": "connect"}, exc_info=False)
            raise HandshakeRejected(503, "authentication backend gave an invalid answer; retry later",
                                    {"Retry-After": "5"}) from None
        if not principal.grants_anything:
            self.stats.count("connect", "refused")
            raise HandshakeRejected(403, "the connect proxy granted no rooms")
        self.stats.count("connect", "admitted")
        conn.principal = principal

    def abandon(self, conn) -> None:
        """The client went away while we asked: nothing is held for it."""


class RoomHook:
    """The join or publish proxy: asked only for rooms matching its patterns (cached per room)."""

    def __init__(self, kind: str, client: HookClient, patterns: tuple, node: str, stats: ProxyStats) -> None:
        self.kind = kind
        self.client = client
        self.node = node
        self.stats = stats
        self._match = _matcher(tuple(patterns))
        self._cache: dict[str, bool] = {}

    def applies(self, room: str) -> bool:
        hit = self._cache.get(room)
        if hit is None:
            if len(self._cache) > 10000:
                self._cache.clear()
            hit = self._cache[room] = self._match(room)
        return hit

    def _doc(self, conn, room: str) -> dict:
        principal = conn.principal
        doc = {"client": f"{self.node}.{conn.id}", "user": conn.user, "room": room}
        info = principal.claims.get("info") if principal is not None else None
        if info is not None:
            doc["info"] = info
        return doc

    async def _ask(self, doc: dict, cmd_id) -> object:
        """The answer of an allowing backend; CommandError for a refusal or an unavailable backend."""
        kind = self.kind
        try:
            status, answer = await self.client.post(doc)
        except HookUnavailable as exc:
            self.stats.count(kind, "unavailable")
            _unavailable_log[kind].warning(f"{kind} proxy unavailable: refused with backend_unavailable", {
                "event": "proxy_unavailable", "hook": kind, "room": doc["room"], "reason": exc.reason},
                exc_info=False)
            raise CommandError("backend_unavailable", f"the {kind} backend is unavailable; retry later", cmd_id) \
                from None
        if status in (401, 403) or (200 <= status < 300 and isinstance(answer, dict) and answer.get("allow") is False):
            self.stats.count(kind, "refused")
            raise CommandError("forbidden", _reason(answer, f"{kind} refused by the backend"), cmd_id)
        if not 200 <= status < 300:
            self.stats.count(kind, "unavailable")
            _unavailable_log[kind].warning(f"{kind} proxy answered {status} (expected 200 or 403)",
                                           {"event": "proxy_bad_status", "hook": kind, "status": status},
                                           exc_info=False)
            raise CommandError("backend_unavailable", f"the {kind} backend is unavailable; retry later", cmd_id)
        self.stats.count(kind, "allowed")
        return answer

    async def check_join(self, conn, room: str, cmd_id) -> None:
        await self._ask(self._doc(conn, room), cmd_id)

    async def filter_publish(self, conn, room: str, data: bytes, cmd_id) -> bytes:
        """The data to publish: as sent, or the backend's replacement."""
        doc = self._doc(conn, room)
        doc["data"] = orjson.loads(data)
        answer = await self._ask(doc, cmd_id)
        if isinstance(answer, dict) and "data" in answer:
            self.stats.count(self.kind, "replaced")
            return serialize_data(answer["data"], cmd_id)
        return data


class Proxies:
    """The configured hooks of one process, their clients and stats."""

    def __init__(self) -> None:
        self.stats = ProxyStats()
        self.clients: list[HookClient] = []
        self.connect: ConnectProxy | None = None
        self.join: RoomHook | None = None
        self.publish: RoomHook | None = None

    def metrics(self) -> dict:
        """Per hook: calls, failures by kind, breaker state (metrics source `proxy`)."""
        out = {"decisions": {k: v for k, v in self.stats.decisions.items()},
               "calls": {}, "failures": {}, "breaker_open": {}, "breaker_opened": {}}
        for client in self.clients:
            out["calls"][client.name] = client.stats.calls
            for kind, n in client.stats.failures.items():
                out["failures"][(client.name, kind)] = n
            out["breaker_open"][client.name] = int(client.breaker.open)
            out["breaker_opened"][client.name] = client.stats.breaker_opened
        return out

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def install(gateway, config, node: str) -> Proxies | None:
    """Attach the configured hooks to `gateway` (None when none is configured)."""
    if not (config.connect_proxy_url or config.join_proxy_url or config.publish_proxy_url):
        return None
    proxies = Proxies()

    def client(name: str, url: str) -> HookClient:
        c = HookClient(name, url, timeout=config.proxy_timeout, max_concurrency=config.proxy_max_concurrency,
                       breaker_failures=config.proxy_breaker_failures, breaker_reset=config.proxy_breaker_reset)
        proxies.clients.append(c)
        return c

    from gateway.security.auth import _split
    if config.connect_proxy_url:
        proxies.connect = ConnectProxy(client("connect", config.connect_proxy_url), config.proxy_headers,
                                       _split(config.default_rooms), _split(config.default_publish), node,
                                       proxies.stats)
        # First of the async checks: the per-user cap (if any) needs the user it finds.
        gateway.async_admission.insert(0, proxies.connect)
    if config.join_proxy_url:
        proxies.join = RoomHook("join", client("join", config.join_proxy_url), config.join_proxy_rooms, node,
                                proxies.stats)
    if config.publish_proxy_url:
        proxies.publish = RoomHook("publish", client("publish", config.publish_proxy_url), config.publish_proxy_rooms,
                                   node, proxies.stats)
    endpoint = gateway.endpoints.get("/ws")
    if endpoint is not None:
        endpoint.set_hooks(join_proxy=proxies.join, publish_proxy=proxies.publish)
    gateway.proxies = proxies
    gateway.metric_sources["proxy"] = proxies.metrics
    gateway.on_shutdown.append(proxies.close)
    return proxies
