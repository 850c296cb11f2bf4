"""The backend's HTTP API: `POST /api/publish` (as a client's `publish`) and `POST /api/history`.

    POST /api/publish HTTP/1.1
    Authorization: Bearer <api key>          (RFC 6750 section 2.1; keys: config `api_keys`)
    Content-Type: application/json
    Idempotency-Key: <key>                   (optional; or "idempotency_key" in the body)
    {"room": "chat:1", "data": {...any JSON...}}

Answers, always JSON (errors: {"ok":false,"error":CODE,"detail":"<reason for a person>"}):
    200 {"ok":true,"seq":N,"epoch":E}
                                  published; N is the room's sequence number (as a client's
                                  ack). With an idempotency key, a retry within the room's
                                  history TTL answers the ORIGINAL seq and publishes nothing
                                  (decided by the broker, atomically with the numbering): a
                                  backend may retry after a 503 or a timeout without
                                  delivering twice.
    400 bad_json / bad_request / bad_room / room_name_too_long
                                  body not a JSON object; "room" or "data" missing or invalid
                                  (the same codes and messages as the /ws publish op)
    401 unauthorized              missing or wrong key, with `WWW-Authenticate: Bearer`
    404 api_off                   no `api_keys` configured: the API is off
    405 method_not_allowed        not POST
    415 unsupported_media_type    Content-Type present and not JSON
    503 broker_unavailable        the broker cannot take it now (with "delivered_locally")
    503 unavailable               rooms are not served by this gateway
The room name and data go through the same validation and serialisation as the /ws
`publish` op (commands.py), then `gateway.hub.publish(room, data_bytes, key)`.

    POST /api/history  {"room": R, "since": N (default 0), "limit": L (default 100, <= 1000)}
    200 {"ok":true,"room":R,"epoch":E,"top":T,"complete":C,
         "publications":[{"seq":S,"data":X}, ...]}
The publications with seq > N still kept, oldest first, at most L (0: the position only).
"complete" is false when the history no longer holds what came right after N (the caller
must reload from its own source of truth), as `recovered` in a /ws join. Same key check
and error shapes as /api/publish.

Keys are compared in constant time over their SHA-256 digests, so neither a key's prefix
nor its length leaks through response timing; keys never reach a log line.
Imports: stdlib, orjson, commands, errors, handshake, broker.base; never connection/server.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import logging

import orjson

from gateway.broker.base import BrokerUnavailable
from gateway.errors import HandshakeRejected
from gateway.rooms import commands
from gateway.ws.handshake import response

log = logging.getLogger("gateway.api.methods")

PATH = "/api/publish"
HISTORY_PATH = "/api/history"
MAX_HISTORY_LIMIT = 1000
_CHALLENGE = 'Bearer realm="ws-gateway-api"'


class PublishApi:
    def __init__(self, gateway, api_keys, max_room_name_bytes: int = 200) -> None:
        # Key length (config.MIN_API_KEY_CHARS) was checked when the Config was loaded.
        keys = [k for k in api_keys if k]
        self.gateway = gateway
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

    def handle(self, request, body: bytes):
        """The route: validate synchronously, then publish in a task (the broker may await)."""
        doc = self._body(request, body)
        stats = self.stats
        try:
            commands.require_fields(doc, "publish")
            room = commands.validate_room(doc["room"], self.max_room_name_bytes)
            data = commands.serialize_data(doc["data"])
            key = doc.get("idempotency_key") or request.header("idempotency-key") or None
            if key is not None:
                key = commands.idempotency_key(key)
        except commands.CommandError as exc:
            stats.rejected["bad_request"] += 1
            raise HandshakeRejected(400, exc.message, code=exc.code) from None
        hub = getattr(self.gateway, "hub", None)
        if hub is None:
            raise HandshakeRejected(503, "rooms are not served by this gateway", code="unavailable")
        return self._publish(hub, room, data, key)

    def handle_history(self, request, body: bytes):
        """POST /api/history: the room's position and its publications after `since`."""
        doc = self._body(request, body)
        stats = self.stats
        since, limit = doc.get("since", 0), doc.get("limit", 100)
        try:
            if "room" not in doc:
                raise commands.CommandError("bad_request", 'history needs "room"')
            room = commands.validate_room(doc["room"], self.max_room_name_bytes)
            for name, value, top in (("since", since, 1 << 63), ("limit", limit, MAX_HISTORY_LIMIT + 1)):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < top:
                    raise commands.CommandError("bad_request", f'"{name}" must be an integer from 0 to {top - 1}')
        except commands.CommandError as exc:
            stats.rejected["bad_request"] += 1
            raise HandshakeRejected(400, exc.message, code=exc.code) from None
        hub = getattr(self.gateway, "hub", None)
        if hub is None:
            raise HandshakeRejected(503, "rooms are not served by this gateway", code="unavailable")
        return self._history(hub, room, since, limit)

    async def _history(self, hub, room: str, since: int, limit: int) -> bytes:
        try:
            found = await hub.broker.history(room, since, limit)
        except BrokerUnavailable as exc:
            self.stats.rejected["broker_unavailable"] += 1
            log.warning("api history failed: broker unavailable", extra={"event": "api_history", "room": room,
                                                                          "error": str(exc)[:200]})
            body = {"ok": False, "error": "broker_unavailable", "detail": "broker unavailable; retry later"}
            return response(503, orjson.dumps(body), "application/json", {"Retry-After": "1"})
        hub.history.reads += 1
        self.stats.history_reads += 1
        pubs = found.publications
        complete = since >= found.top or (bool(pubs) and pubs[0].seq == since + 1) or limit == 0
        # The stored data is already JSON: spliced in as is, never parsed again.
        items = b",".join(b'{"seq":%d,"data":%b}' % (p.seq, p.data) for p in pubs)
        head = orjson.dumps({"ok": True, "room": room, "epoch": found.epoch, "top": found.top, "complete": complete})
        return response(200, head[:-1] + b',"publications":[' + items + b"]}", "application/json")

    def _body(self, request, body: bytes) -> dict:
        """Method, key, content type and a JSON object body, or the matching HandshakeRejected."""
        stats = self.stats
        if request.method != "POST":
            raise HandshakeRejected(405, "use POST", {"Allow": "POST"}, "method_not_allowed")
        if not self._digests:
            raise HandshakeRejected(404, "the publish API is off: configure api_keys", code="api_off")
        if not self._authorized(request):
            stats.rejected["unauthorized"] += 1
            error = "" if not request.header("authorization") else ', error="invalid_token"'
            raise HandshakeRejected(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                    {"WWW-Authenticate": _CHALLENGE + error}, "unauthorized")
        ctype = request.header("content-type").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            stats.rejected["bad_request"] += 1
            raise HandshakeRejected(415, "body must be JSON (Content-Type: application/json)",
                                    code="unsupported_media_type")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            stats.rejected["bad_request"] += 1
            raise HandshakeRejected(400, f"body is not JSON: {str(exc)[:100]}", code="bad_json") from None
        if not isinstance(doc, dict):
            stats.rejected["bad_request"] += 1
            raise HandshakeRejected(400, 'body must be a JSON object {"room": ..., ...}', code="bad_json")
        return doc

    async def _publish(self, hub, room: str, data: bytes, key: str | None = None) -> bytes:
        try:
            seq, epoch = await hub.publish(room, data, key)
        except BrokerUnavailable as exc:
            self.stats.rejected["broker_unavailable"] += 1
            log.warning("api publish failed: broker unavailable", extra={"event": "api_publish", "room": room,
                                                                          "error": str(exc)[:200]})
            # JSON, so a backend can tell "nobody got it" from "only this node's members got
            # it" (Redis down, local fallback): retrying the latter duplicates it for them.
            body = {"ok": False, "error": "broker_unavailable", "delivered_locally": exc.delivered_locally,
                    "detail": "broker unavailable; retry later" + (
                        " (this node's members already got it: a retry repeats it for them)"
                        if exc.delivered_locally else "")}
            return response(503, orjson.dumps(body), "application/json", {"Retry-After": "1"})
        self.stats.published += 1
        return response(200, orjson.dumps({"ok": True, "seq": seq, "epoch": epoch}), "application/json")


class ApiStats:
    """Counters of the API (ws_gateway_api_*, declared in gateway/ops/metrics.py)."""

    def __init__(self) -> None:
        self.published = 0
        self.history_reads = 0
        self.rejected: collections.Counter = collections.Counter()


def install(gateway, config) -> PublishApi:
    api = PublishApi(gateway, tuple(getattr(config, "api_keys", ()) or ()),
                     int(getattr(config, "max_room_name_bytes", 200) or 200))
    gateway.http_routes[PATH] = api.handle
    gateway.http_routes[HISTORY_PATH] = api.handle_history
    gateway.api = api
    gateway.metric_sources["api"] = api.stats   # ws_gateway_api_* (gateway/ops/metrics.py)
    return api
