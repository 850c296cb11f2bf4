"""The `/ws` client protocol: application messages <-> Python values, validation, error codes.

Wire format. JSON text frames (orjson); a client that negotiated the subprotocol
`ws-gateway.msgpack` may also send msgpack binary frames and receives msgpack binary
frames, with the same shapes.

client -> server (each may carry "id", a string or an integer; the server then answers
`{"op":"ack","id":...}` or `{"op":"error","id":...,"code":...,"message":...}`):

    {"op":"join","room":R}                  ack: {"op":"ack","id":I,"seq":TOP,"epoch":E}, the
                                            position the live messages continue from
    {"op":"join","room":R,"since":{"seq":N,"epoch":E}}
                                            recovery: ack with "recovered": true, then every
                                            message after N in order, then live (no gap, no
                                            duplicate); "recovered": false when E is not the
                                            room's epoch or N is older than the history kept.
                                            By a member of R: the recovery after `dropped`.
    {"op":"join","room":R,"last":true}      ack, then the room's most recent message
    {"op":"leave","room":R}
    {"op":"publish","room":R,"data":X,"idempotency_key":K}
                                            the ack also carries the publication's "seq"; a
                                            retry with the same K (<= 128 chars) within the
                                            room's history TTL gets the original seq and
                                            publishes nothing
    {"op":"refresh","token":T}              hand a new token to the auth layer
    {"op":"ping"}                           answered {"op":"pong"} (with the request's "id"
                                            if it has one): a liveness probe a browser can
                                            see; WebSocket pings are answered by browsers
                                            without telling the page's script
    {"op":"presence","room":R,"after":U,"limit":N}   who is in R (rooms with presence on; the
                                            ack carries "members" and "next": the cursor of
                                            the next page, or null). "after"/"limit" optional
    {"op":"presence_stats","room":R}        the ack carries "connections" and "users"

server -> client:

    {"op":"message","room":R,"data":X,"seq":N}   to every member of R, the sender included;
                                                 N grows by one per publication in R
    {"op":"dropped","room":R,"count":N}          N messages of R were dropped because this
                                                 client read too slowly (see backpressure.py)
    {"op":"reset","room":R,"epoch":E,"seq":N}    R's numbering restarted under this member: what
                                                 came before cannot be recovered; continue from (E, N)
    {"op":"ack","id":I}  /  {"op":"error","id":I,"code":C,"message":M}
    {"op":"pong"}                                the answer to a ping
    {"op":"presence_diff","room":R,"joins":[{"user":U,"info":X}],"leaves":[{"user":U}]}
                                                 users who came / went (rooms with join_leave
                                                 on); anonymous ones as {"user":null,"client":C}
    {"op":"unsubscribed","room":R,"reason":T}    the server removed you from R (server API)

Error codes (stable: clients may switch on them; "message" is for humans):

    bad_json            the frame is not a JSON object (or, with msgpack, not a msgpack map);
                        binary frames without the msgpack subprotocol also get this
    bad_request         a field is missing or has the wrong type ("message" names it)
    unknown_op          "op" is none of join, leave, publish, refresh, ping, presence, presence_stats
    bad_room            the room name is empty or contains control characters
    room_name_too_long  the room name has more than max_room_name_bytes UTF-8 bytes
    too_many_rooms      the join would exceed max_rooms_per_connection
    not_member          leave of a room this connection has not joined
    forbidden           the authenticated principal may not join / publish to / see the
                        presence of this room
    presence_disabled   presence / presence_stats for a room no presence rule enables
    unauthorized        refresh: the new token was rejected
    unsupported         refresh on a server without an auth layer
    broker_unavailable  the broker cannot take the request now (retry later)
    backend_unavailable the join/publish proxy (the application's backend) did not answer:
                        timeout, error, or its circuit breaker is open (retry later)
    rate_limited        reserved for the per-connection rate limiter
    internal_error      a server bug while handling the request (logged with a traceback)

Abuse: after `max_consecutive_errors` client errors in a row the connection is closed
with 4003 (gateway.errors.GatewayCloseCode.TOO_MANY_ERRORS).

Encode once: a publication's "data" travels between processes as the JSON bytes the
publisher's gateway serialised once (`Publish.data`); outgoing message payloads are built
by byte concatenation around them (`message_prefix` + data + `message_suffix`), never by
re-parsing. Only msgpack members need a second encoding (`msgpack_message`).

No WebSocket, transport or broker knowledge here; imports only orjson, msgpack and the stdlib.
"""
from __future__ import annotations

import msgpack
import orjson

MSGPACK_SUBPROTOCOL = "ws-gateway.msgpack"

# Client-fault codes: they count towards max_consecutive_errors.
CLIENT_ERRORS = frozenset({
    "bad_json", "bad_request", "unknown_op", "bad_room", "room_name_too_long", "too_many_rooms",
    "not_member", "forbidden", "unauthorized", "unsupported", "presence_disabled",
})

MAX_ID_CHARS = 128          # an "id" is echoed back: keep it small
MAX_TOKEN_CHARS = 8192      # a JWT with generous claims fits
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_EPOCH_CHARS = 64


class CommandError(Exception):
    """A request the server refuses: `code` is one of the documented codes above."""

    def __init__(self, code: str, message: str, id=None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.id = id


class Command:
    """One validated client request. `data` (publish) is already-serialised JSON bytes."""

    __slots__ = ("op", "id", "room", "data", "token", "since", "epoch", "last", "key", "after", "limit")

    def __init__(self, op: str, id=None, room: str = "", data: bytes = b"", token: str = "", after: str = "",
                 limit: int = 0) -> None:
        self.op = op
        self.id = id
        self.room = room
        self.data = data
        self.token = token
        self.since: int | None = None   # join: recover after this seq ...
        self.epoch: str | None = None   # ... of this epoch
        self.last = False               # join: the most recent message only
        self.key: str | None = None     # publish: idempotency key
        self.after = after          # presence: the cursor ("next" of the previous page)
        self.limit = limit          # presence: page size wanted (0: the server's)

    def __repr__(self) -> str:  # for test failures; never logs data or tokens
        return f"Command({self.op!r}, id={self.id!r}, room={self.room!r})"


# -- decoding ------------------------------------------------------------------------------

def decode_json(payload: bytes) -> dict:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CommandError("bad_json", f"invalid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise CommandError("bad_json", "a request must be a JSON object")
    return obj


def decode_msgpack(payload: bytes) -> dict:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CommandError("bad_json", f"invalid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise CommandError("bad_json", "a request must be a msgpack map")
    return obj


def validate_room(room, max_room_name_bytes: int, id=None) -> str:
    """A room name: a non-empty string without control characters, bounded in UTF-8 bytes."""
    if not isinstance(room, str):
        raise CommandError("bad_request", "\"room\" must be a string", id)
    if not room:
        raise CommandError("bad_room", "\"room\" must not be empty", id)
    # len() first: a character is at least one byte, so huge names are refused before encoding.
    if len(room) > max_room_name_bytes:
        raise CommandError("room_name_too_long", f"room names are limited to {max_room_name_bytes} UTF-8 bytes", id)
    if not room.isprintable():  # also refuses lone surrogates, which cannot be encoded
        raise CommandError("bad_room", "room names must not contain control or unprintable characters", id)
    if len(room.encode("utf-8")) > max_room_name_bytes:
        raise CommandError("room_name_too_long", f"room names are limited to {max_room_name_bytes} UTF-8 bytes", id)
    return room


def _request_id(obj: dict):
    if "id" not in obj:
        return None
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise CommandError("bad_request", "\"id\" must be a string or an integer")
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        raise CommandError("bad_request", f"\"id\" is limited to {MAX_ID_CHARS} characters")
    if isinstance(rid, int) and not -(1 << 63) <= rid < (1 << 64):
        raise CommandError("bad_request", "\"id\" integers must fit in 64 bits")
    return rid


def serialize_data(value, id=None) -> bytes:
    """The publisher's "data" as JSON bytes: done once per publication, here."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # msgpack can carry bytes, ext types, non-string keys
        if "bytes" in str(exc):
            raise CommandError("bad_request", "\"data\" cannot hold binary (msgpack bin) values: data travels as "
                                              "JSON between gateways; send binary as base64 text", id) from None
        raise CommandError("bad_request", f"\"data\" must be representable as JSON: {exc}"[:160], id) from None


# The fields each op needs; any other field is ignored (forward compatible), except that a
# missing field's error names an unknown one that looks like a typo of it ("rom" -> "room").
FIELDS = {"publish": ("room", "data"), "join": ("room",), "leave": ("room",), "refresh": ("token",), "ping": (),
          "presence": ("room",), "presence_stats": ("room",)}
_KNOWN = frozenset({"op", "id", "since", "last", "idempotency_key", "after", "limit"}).union(*FIELDS.values())   # optional ones too


def require_fields(obj: dict, op: str, rid=None) -> None:
    """CommandError (bad_request) naming every field `op` needs that `obj` lacks."""
    missing = [name for name in FIELDS[op] if name not in obj]
    if missing:
        raise CommandError("bad_request", f"{op} needs " + " and ".join(f'"{m}"' for m in missing)
                           + _typo_hint(obj, missing), rid)


def _typo_hint(obj: dict, missing) -> str:
    import difflib   # only on this error path
    unknown = [k for k in obj if isinstance(k, str) and k not in _KNOWN]
    for key in unknown:
        close = difflib.get_close_matches(key, missing, 1, 0.5)
        if close:
            return f' ("{key[:40]}" is not a field: did you mean "{close[0]}"?)'
    if unknown:
        return " (unknown field" + ("s " if len(unknown) > 1 else " ") + ", ".join(f'"{k[:40]}"' for k in unknown[:3]) + ")"
    return ""


def parse(obj: dict, max_room_name_bytes: int) -> Command:
    """Validate one decoded request; raise CommandError with the documented code."""
    rid = _request_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise CommandError("bad_request", "missing \"op\" (a string: join, leave, publish, refresh or ping)"
                           + (_typo_hint(obj, ["op"]) if "op" not in obj else ""), rid)
    if op == "publish":
        if "data" not in obj or "room" not in obj:
            require_fields(obj, op, rid)
        room = validate_room(obj["room"], max_room_name_bytes, rid)
        cmd = Command("publish", rid, room, serialize_data(obj["data"], rid))
        if obj.get("idempotency_key") is not None:
            cmd.key = idempotency_key(obj["idempotency_key"], rid)
        return cmd
    if op == "join" or op == "leave":
        if "room" not in obj:
            require_fields(obj, op, rid)
        cmd = Command(op, rid, validate_room(obj["room"], max_room_name_bytes, rid))
        if op == "join":
            since = obj.get("since")
            if since is not None:
                if not isinstance(since, dict):
                    raise CommandError("bad_request", '"since" must be {"seq": N, "epoch": E}', rid)
                seq, epoch = since.get("seq"), since.get("epoch")
                if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < (1 << 63):
                    raise CommandError("bad_request", '"since.seq" must be an integer >= 0', rid)
                if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_CHARS:
                    raise CommandError("bad_request", f'"since.epoch" must be a string (<= {MAX_EPOCH_CHARS} chars)',
                                       rid)
                cmd.since, cmd.epoch = seq, epoch
            last = obj.get("last", False)
            if not isinstance(last, bool):
                raise CommandError("bad_request", '"last" must be a boolean', rid)
            if last and since is not None:
                raise CommandError("bad_request", '"last" and "since" exclude each other', rid)
            cmd.last = last
        return cmd
    if op == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            if "token" not in obj:
                require_fields(obj, op, rid)
            raise CommandError("bad_request", "refresh needs \"token\" (a non-empty string)", rid)
        if len(token) > MAX_TOKEN_CHARS:
            raise CommandError("bad_request", f"\"token\" is limited to {MAX_TOKEN_CHARS} characters", rid)
        return Command("refresh", rid, token=token)
    if op == "ping":
        return Command("ping", rid)
    if op == "presence" or op == "presence_stats":
        require_fields(obj, op, rid)
        room = validate_room(obj["room"], max_room_name_bytes, rid)
        after, limit = obj.get("after", ""), obj.get("limit", 0)
        if after is None:
            after = ""
        if not isinstance(after, str) or len(after) > 512:
            raise CommandError("bad_request", "\"after\" must be a string (the \"next\" of the previous page)", rid)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise CommandError("bad_request", "\"limit\" must be a non-negative integer", rid)
        return Command(op, rid, room, after=after, limit=limit)
    raise CommandError("unknown_op", f"unknown op {op[:40]!r}; expected join, leave, publish, refresh, ping, "
                                     "presence or presence_stats", rid)


def idempotency_key(value, rid=None) -> str:
    """An idempotency key: a non-empty string of at most MAX_IDEMPOTENCY_KEY_CHARS characters."""
    if not isinstance(value, str) or not value:
        raise CommandError("bad_request", '"idempotency_key" must be a non-empty string', rid)
    if len(value) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise CommandError("bad_request", f'"idempotency_key" is limited to {MAX_IDEMPOTENCY_KEY_CHARS} characters',
                           rid)
    if not value.isprintable():
        raise CommandError("bad_request", '"idempotency_key" must not contain control characters', rid)
    return value


# -- encoding ------------------------------------------------------------------------------

def ack(rid, seq: int | None = None) -> dict:
    doc = {"op": "ack", "id": rid}
    if seq is not None:
        doc["seq"] = seq
    return doc


def join_ack(rid, seq: int, epoch: str, recovered: bool | None = None) -> dict:
    """The answer to a join: the position the member continues from (and, with `since`,
    whether the missed range follows)."""
    doc = {"op": "ack", "id": rid, "seq": seq, "epoch": epoch} if rid is not None else \
        {"op": "ack", "seq": seq, "epoch": epoch}
    if recovered is not None:
        doc["recovered"] = recovered
    return doc


def error(code: str, message: str, rid=None) -> dict:
    doc = {"op": "error", "code": code, "message": message}
    if rid is not None:
        doc["id"] = rid
    return doc


def pong(rid=None) -> dict:
    doc = {"op": "pong"}
    if rid is not None:
        doc["id"] = rid
    return doc


def dropped(room: str, count: int) -> dict:
    return {"op": "dropped", "room": room, "count": count}


def unsubscribed(room: str, reason: str) -> dict:
    return {"op": "unsubscribed", "room": room, "reason": reason}


def encode_json(doc: dict) -> bytes:
    return orjson.dumps(doc)


def encode_msgpack(doc: dict) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def message_prefix(room: str) -> bytes:
    """Everything of a JSON message payload before the data; computed once per room."""
    return b'{"op":"message","room":' + orjson.dumps(room) + b',"data":'


def message_suffix(seq: int) -> bytes:
    return b',"seq":%d}' % seq


def json_message(room: str, data: bytes, seq: int) -> bytes:
    """The JSON payload of a message (reference form; the hub caches the prefix)."""
    return message_prefix(room) + data + message_suffix(seq)


def msgpack_message(room: str, data: bytes, seq: int) -> bytes:
    """The msgpack payload of a message: the one place data is decoded again, once per publication."""
    return msgpack.packb({"op": "message", "room": room, "data": orjson.loads(data), "seq": seq}, use_bin_type=True)
