"""The server API: `POST /api/<method>`, JSON in and out, for a backend (docs/api.md).

    POST /api/<method> HTTP/1.1
    Authorization: Bearer <api key>          (RFC 6750 section 2.1; keys: config `api_keys`)
    Content-Type: application/json
    {...the method's arguments...}

Every answer is one line of JSON. Success: 200 `{"ok":true,...}`. Failure:
`{"ok":false,"error":<code>,"detail":<one line for a person>}` with the status:
    400 bad_json            the body is not a JSON object
    400 bad_request / bad_room / room_name_too_long / presence_disabled   an argument
    401 unauthorized        missing or wrong key (with `WWW-Authenticate: Bearer`)
    404 unknown_method      no such method (the answer lists them); api_off: no api_keys
    405 method_not_allowed  not POST
    415 unsupported_media_type   Content-Type present and not JSON
    503 broker_unavailable  Redis cannot take it now (publish also says `delivered_locally`)
(413 and 411 for oversized or chunked bodies come from the HTTP layer, before the API.)

Methods (the table METHODS; each takes the decoded body and returns the answer's fields):
publish, broadcast, history, disconnect, unsubscribe, presence, presence_stats, rooms, info,
revoke_token, revoke_user. Cross-process ones go through control.py.

Keys are compared in constant time over their SHA-256 digests, so neither a key's prefix
nor its length leaks through response timing; keys never reach a log line.
Imports: stdlib, orjson, commands, errors, handshake, broker.base; never connection/server.
"""
from __future__ import annotations

import asyncio
import collections
import fnmatch
import hashlib
import hmac
import logging
import time

import orjson

from gateway.broker.base import BrokerUnavailable
from gateway.errors import ConfigError, GatewayCloseCode
from gateway.rooms import commands
from gateway.ws.handshake import response

log = logging.getLogger("gateway.api.methods")

PREFIX = "/api/"
PATH = "/api/publish"      # the first method; kept for callers that name it
MIN_KEY_CHARS = 16
MAX_BROADCAST_ROOMS = 1000
MAX_HISTORY_LIMIT = 1000
_CHALLENGE = 'Bearer realm="ws-gateway-api"'


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None, **fields) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}
        self.fields = fields


def _json(status: int, doc: dict, headers: dict | None = None) -> bytes:
    return response(status, orjson.dumps(doc) + b"\n", "application/json", headers)


class ServerApi:
    def __init__(self, gateway, api_keys, max_room_name_bytes: int = 200, config=None) -> None:
        keys = [k for k in api_keys if k]
        for key in keys:
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(f"api_keys: every key must have at least {MIN_KEY_CHARS} characters "
                                  "(use e.g. `openssl rand -hex 32`)")
        self.gateway = gateway
        self.config = config
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.max_room_name_bytes = max_room_name_bytes
        self.stats = ApiStats()

    def _authorized(self, request) -> bool:
        scheme, _, key = request.header("authorization").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = hashlib.sha256(key.strip().encode("utf-8", "replace")).digest()
        ok = False
        for known in self._digests:            # no early exit: every key costs the same
            ok |= hmac.compare_digest(digest, known)
        return ok

    # -- the route --------------------------------------------------------------------------

    def handle(self, request, body: bytes):
        """Validate synchronously (answering errors at once), then run the method in a task."""
        try:
            method, doc = self._parse(request, body)
        except ApiError as exc:
            return self._error(exc)
        return self._call(method, doc)

    def _parse(self, request, body: bytes):
        stats = self.stats
        if request.method != "POST":
            raise ApiError(405, "method_not_allowed", "use POST", {"Allow": "POST"})
        if not self._digests:
            raise ApiError(404, "api_off", "the server API is off: configure api_keys")
        if not self._authorized(request):
            stats.rejected["unauthorized"] += 1
            error = "" if not request.header("authorization") else ', error="invalid_token"'
            raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                           {"WWW-Authenticate": _CHALLENGE + error})
        name = request.path[len(PREFIX):] if request.path.startswith(PREFIX) else ""
        method = METHODS.get(name)
        if method is None:
            stats.rejected["unknown_method"] += 1
            raise ApiError(404, "unknown_method", f"no API method {name[:60]!r}", methods=sorted(METHODS))
        ctype = request.header("content-type").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            stats.rejected["bad_request"] += 1
            raise ApiError(415, "unsupported_media_type", "body must be JSON (Content-Type: application/json)")
        if not body.strip():
            doc = {}
        else:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                stats.rejected["bad_request"] += 1
                raise ApiError(400, "bad_json", f"body is not JSON: {str(exc)[:100]}") from None
        if not isinstance(doc, dict):
            stats.rejected["bad_request"] += 1
            raise ApiError(400, "bad_json", "body must be a JSON object {...arguments...}")
        if name == "publish" and "idempotency_key" not in doc and request.header("idempotency-key"):
            doc["idempotency_key"] = request.header("idempotency-key")   # the header form of the key
        return method, doc

    async def _call(self, method, doc: dict) -> bytes:
        try:
            result = await method(self, doc)
        except ApiError as exc:
            if exc.status == 400:
                self.stats.rejected["bad_request"] += 1
            return self._error(exc)
        except BrokerUnavailable as exc:
            self.stats.rejected["broker_unavailable"] += 1
            log.warning("api call failed: broker unavailable", extra={"event": "api_error", "method": method.__name__,
                                                                       "error": str(exc)[:200]})
            return self._error(ApiError(503, "broker_unavailable", "broker unavailable; retry later",
                                        {"Retry-After": "1"}))
        self.stats.calls[method.__name__] += 1
        return _json(200, {"ok": True, **result})

    def _error(self, exc: ApiError) -> bytes:
        return _json(exc.status, {"ok": False, "error": exc.error, "detail": exc.detail, **exc.fields}, exc.headers)

    # -- helpers for the methods ------------------------------------------------------------

    def room(self, doc: dict, key: str = "room") -> str:
        try:
            return commands.validate_room(doc.get(key), self.max_room_name_bytes)
        except commands.CommandError as exc:
            raise ApiError(400, exc.code, f"{key}: {exc.message}") from None

    def hub(self):
        hub = getattr(self.gateway, "hub", None)
        if hub is None:
            raise ApiError(503, "unavailable", "rooms are not served by this gateway")
        return hub

    def control(self):
        control = getattr(self.gateway, "control", None)
        if control is None:
            raise ApiError(503, "unavailable", "cross-process commands are not available on this gateway")
        return control

    def tracker(self, room: str):
        tracker = getattr(self.gateway, "presence", None)
        rule = tracker.rule_for(room) if tracker is not None else None
        if rule is None or not rule.presence:
            raise ApiError(400, "presence_disabled", f"presence is not enabled for {room!r} (presence = true in its [[rooms.policy]] rule)")
        return tracker


class ApiStats:
    """Counters of the API (ws_gateway_api_*, declared in gateway/ops/metrics.py)."""

    def __init__(self) -> None:
        self.published = 0
        self.history_reads = 0
        self.calls: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()


# -- argument checks -------------------------------------------------------------------------

def _target(doc: dict) -> dict:
    """{"user": U} or {"client": C}: whose connections a command is about."""
    user, client = doc.get("user"), doc.get("client")
    if (user is None) == (client is None):
        raise ApiError(400, "bad_request", 'give exactly one of "user" (a token sub) or "client" (a connection id)')
    value = user if user is not None else client
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ApiError(400, "bad_request", '"user" / "client" must be a non-empty string')
    return {"user": user} if user is not None else {"client": client}


def _number(doc: dict, key: str, default=None):
    value = doc.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, "bad_request", f'"{key}" must be a number')
    return value


def _reason(doc: dict) -> str:
    reason = doc.get("reason", "")
    if not isinstance(reason, str) or len(reason.encode()) > 120:
        raise ApiError(400, "bad_request", '"reason" must be a string of at most 120 bytes (a close reason)')
    return reason


def _spread(answers: list, missing: list) -> dict:
    return {"nodes": len(answers), "missing": missing}


# -- the methods -----------------------------------------------------------------------------

async def publish(api: ServerApi, doc: dict) -> dict:
    """{"room", "data", "idempotency_key"} -> {"seq", "epoch"}: exactly as a client's publish.

    With an idempotency key (or the Idempotency-Key header), a retry within the room's history
    TTL answers the ORIGINAL seq and publishes nothing (decided by the broker, atomically with
    the numbering): a backend may retry after a 503 or a timeout without delivering twice."""
    try:
        commands.require_fields(doc, "publish")     # every missing field named, with a typo hint
    except commands.CommandError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    room = api.room(doc)
    try:
        data = commands.serialize_data(doc["data"])
        key = doc.get("idempotency_key") or None
        if key is not None:
            key = commands.idempotency_key(key)
    except commands.CommandError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    hub = api.hub()
    try:
        seq, epoch = await hub.publish(room, data, key)
    except BrokerUnavailable as exc:
        api.stats.rejected["broker_unavailable"] += 1
        log.warning("api publish failed: broker unavailable", extra={"event": "api_publish", "room": room,
                                                                      "error": str(exc)[:200]})
        # JSON, so a backend can tell "nobody got it" from "only this node's members got
        # it" (Redis down, local fallback): retrying the latter duplicates it for them.
        raise ApiError(503, "broker_unavailable", "broker unavailable; retry later" + (
            " (this node's members already got it: a retry repeats it for them)" if exc.delivered_locally else ""),
            {"Retry-After": "1"}, delivered_locally=exc.delivered_locally) from None
    api.stats.published += 1
    return {"seq": seq, "epoch": epoch}


async def broadcast(api: ServerApi, doc: dict) -> dict:
    """{"rooms": [R...], "data"} -> {"results": [{"room", "seq"} | {"room", "error"}]}: one call, many rooms."""
    rooms = doc.get("rooms")
    if not isinstance(rooms, list) or not rooms or len(rooms) > MAX_BROADCAST_ROOMS:
        raise ApiError(400, "bad_request", f'"rooms" must be a list of 1 to {MAX_BROADCAST_ROOMS} room names')
    if "data" not in doc:
        raise ApiError(400, "bad_request", 'body needs "data"')
    names = [api.room({"room": r}) for r in rooms]
    if len(set(names)) != len(names):
        raise ApiError(400, "bad_request", '"rooms" lists a room twice')
    try:
        data = commands.serialize_data(doc["data"])     # serialised once for every room
    except commands.CommandError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    hub = api.hub()
    outcomes = await asyncio.gather(*(hub.publish(room, data) for room in names), return_exceptions=True)
    results = []
    failed = 0
    for room, outcome in zip(names, outcomes):
        if isinstance(outcome, BrokerUnavailable):
            failed += 1
            results.append({"room": room, "error": "broker_unavailable", "delivered_locally": outcome.delivered_locally})
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            seq, epoch = outcome
            results.append({"room": room, "seq": seq, "epoch": epoch})
    api.stats.published += len(names) - failed
    if failed == len(names):
        raise ApiError(503, "broker_unavailable", "broker unavailable; nothing was published", {"Retry-After": "1"},
                       results=results)
    return {"results": results}


async def history(api: ServerApi, doc: dict) -> dict:
    """{"room", "since" (0), "limit" (100, <= 1000)} -> {"room", "epoch", "top", "complete",
    "publications": [{"seq", "data"}]}: the publications with seq > since still kept, oldest
    first. "complete" is false when the history no longer holds what came right after since
    (reload from your own source of truth), as `recovered` in a /ws join (docs/history.md)."""
    room = api.room(doc)
    since, limit = doc.get("since", 0), doc.get("limit", 100)
    for name, value, top in (("since", since, 1 << 63), ("limit", limit, MAX_HISTORY_LIMIT + 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < top:
            raise ApiError(400, "bad_request", f'"{name}" must be an integer from 0 to {top - 1}')
    hub = api.hub()
    found = await hub.broker.history(room, since, limit)     # BrokerUnavailable: 503
    hub.history.reads += 1
    api.stats.history_reads += 1
    pubs = found.publications
    complete = since >= found.top or (bool(pubs) and pubs[0].seq == since + 1) or limit == 0
    # The stored data is already JSON: parsed here once to sit in the answer's JSON.
    return {"room": room, "epoch": found.epoch, "top": found.top, "complete": complete,
            "publications": [{"seq": p.seq, "data": orjson.loads(p.data)} for p in pubs]}


async def disconnect(api: ServerApi, doc: dict) -> dict:
    """{"user"|"client", "reconnect", "code", "reason"} -> {"disconnected", "nodes", "missing"}."""
    target = _target(doc)
    reconnect = doc.get("reconnect", True)
    if not isinstance(reconnect, bool):
        raise ApiError(400, "bad_request", '"reconnect" must be true or false')
    code = doc.get("code")
    if code is None:
        code = int(GatewayCloseCode.DISCONNECTED if reconnect else GatewayCloseCode.DISCONNECTED_FOR_GOOD)
    elif isinstance(code, bool) or not isinstance(code, int) or not (
            4005 <= code <= 4499 if reconnect else (code == 4006 or 4500 <= code <= 4999)):
        raise ApiError(400, "bad_request", '"code" must be 4005-4499 with "reconnect": true, or 4006 / 4500-4999 '
                                           'with "reconnect": false (clients reconnect on the former only)')
    reason = _reason(doc) or ("disconnected by the server" if reconnect else "disconnected by the server; "
                                                                             "do not reconnect")
    answers, missing = await api.control().request("disconnect", {**target, "code": code, "reason": reason})
    return {"disconnected": sum(int((r or {}).get("disconnected", 0)) for _, r in answers), "code": code,
            **_spread(answers, missing)}


async def unsubscribe(api: ServerApi, doc: dict) -> dict:
    """{"user"|"client", "room", "reason"} -> {"unsubscribed", "nodes", "missing"}."""
    target = _target(doc)
    room = api.room(doc)
    reason = _reason(doc)
    answers, missing = await api.control().request("unsubscribe", {**target, "room": room, "reason": reason})
    return {"unsubscribed": sum(int((r or {}).get("unsubscribed", 0)) for _, r in answers), **_spread(answers, missing)}


async def presence(api: ServerApi, doc: dict) -> dict:
    """{"room", "after", "limit", "clients"} -> {"room", "members", "next"}; with "clients": true
    each member also lists its connections' ids (for `disconnect` by "client"; O(room))."""
    room = api.room(doc)
    after = doc.get("after") or ""
    limit = doc.get("limit")
    clients = doc.get("clients", False)
    if not isinstance(clients, bool):
        raise ApiError(400, "bad_request", '"clients" must be true or false')
    if not isinstance(after, str):
        raise ApiError(400, "bad_request", '"after" must be a string (the "next" of the previous page)')
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, "bad_request", '"limit" must be a positive integer')
    members, cursor = await api.tracker(room).members(room, after, limit, clients)
    return {"room": room, "members": members, "next": cursor}


async def presence_stats(api: ServerApi, doc: dict) -> dict:
    """{"room"} -> {"room", "connections", "users"}."""
    room = api.room(doc)
    return {"room": room, **await api.tracker(room).counts(room)}


async def rooms(api: ServerApi, doc: dict) -> dict:
    """{"pattern", "limit"} -> {"rooms": [{"room", "connections"}], "total", "nodes", "missing"}."""
    pattern = doc.get("pattern") or "*"
    limit = doc.get("limit") or 1000
    if not isinstance(pattern, str) or len(pattern) > 256:
        raise ApiError(400, "bad_request", '"pattern" must be a glob (fnmatch) of at most 256 characters')
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise ApiError(400, "bad_request", '"limit" must be an integer 1-100000')
    answers, missing = await api.control().request("rooms", {"pattern": pattern, "limit": limit})
    merged: collections.Counter = collections.Counter()
    for _, result in answers:
        for name, count in ((result or {}).get("rooms") or {}).items():
            if pattern == "*" or fnmatch.fnmatchcase(name, pattern):
                merged[name] += int(count)
    ordered = sorted(merged.items())
    return {"rooms": [{"room": name, "connections": count} for name, count in ordered[:limit]],
            "total": len(ordered), **_spread(answers, missing)}


async def info(api: ServerApi, doc: dict) -> dict:
    """{} -> {"nodes": [{"node", "pid", "host", "connections", "rooms", "uptime", ...}], "connections", "missing"}."""
    answers, missing = await api.control().request("info", {})
    nodes = sorted((r for _, r in answers if isinstance(r, dict)), key=lambda r: str(r.get("node")))
    return {"nodes": nodes, "processes": len(nodes), "connections": sum(int(n.get("connections", 0)) for n in nodes),
            "missing": missing}


async def _revoke(api: ServerApi, key: str, value: str, until: float) -> None:
    control = api.control()
    await control.backend.store_revocation(key, value, until)
    if control.revocations is not None:
        control.revocations.apply(key, value, until)        # this process at once
    await control.announce("revoke", {"key": key, "value": value, "until": until})


def _until(api: ServerApi, doc: dict) -> float:
    now = time.time()
    until = _number(doc, "until")
    if until is None:
        ttl = getattr(api.config, "revocation_ttl", 86400.0) if api.config is not None else 86400.0
        return now + ttl
    if until <= now:
        raise ApiError(400, "bad_request", '"until" is in the past: those tokens have expired anyway')
    return float(until)


async def revoke_token(api: ServerApi, doc: dict) -> dict:
    """{"jti", "until"} -> {"until"}: the token with this jti is refused at handshake and refresh."""
    jti = doc.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise ApiError(400, "bad_request", '"jti" must be a non-empty string (the token\'s jti claim)')
    until = _until(api, doc)
    await _revoke(api, f"jti:{jti}", "", until)
    return {"until": until}


async def revoke_user(api: ServerApi, doc: dict) -> dict:
    """{"user", "before", "until"} -> {"before", "until"}: the user's tokens issued at or before
    `before` (default: now) are refused at handshake and refresh."""
    user = doc.get("user")
    if not isinstance(user, str) or not user or len(user) > 256:
        raise ApiError(400, "bad_request", '"user" must be a non-empty string (a token sub)')
    before = _number(doc, "before")
    before = time.time() if before is None else float(before)
    until = _until(api, doc)
    await _revoke(api, f"user:{user}", repr(before), until)
    return {"before": before, "until": until}


# The method table: POST /api/<name>. One line per method (the history feature adds its own).
METHODS = {
    "publish": publish,
    "broadcast": broadcast,
    "history": history,
    "disconnect": disconnect,
    "unsubscribe": unsubscribe,
    "presence": presence,
    "presence_stats": presence_stats,
    "rooms": rooms,
    "info": info,
    "revoke_token": revoke_token,
    "revoke_user": revoke_user,
}



def register_method(name: str, method) -> None:
    """Add `POST /api/<name>` from a feature's own module (e.g. history): `async method(api, doc)
    -> dict` of the answer's fields, raising ApiError for a refusal (docs/api.md lists it)."""
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"API method {name!r} is already registered")
    METHODS[name] = method


PublishApi = ServerApi   # the name of the publish-only first version


def install(gateway, config) -> ServerApi:
    """`/api/*` on the main port, or only on the private `api_port` listener (server/process.py)."""
    api = ServerApi(gateway, tuple(getattr(config, "api_keys", ()) or ()),
                    int(getattr(config, "max_room_name_bytes", 200) or 200), config)
    if not getattr(config, "api_port", 0):
        gateway.http_prefixes[PREFIX] = api.handle
        gateway.listed_routes.extend(PREFIX + name for name in METHODS)
    gateway.api_routes = {PREFIX: api.handle}
    gateway.api = api
    gateway.metric_sources["api"] = api.stats   # ws_gateway_api_* (gateway/ops/metrics.py)
    return api
