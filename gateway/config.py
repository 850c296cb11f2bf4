"""The gateway's configuration: one dataclass, loaded from TOML, environment and flags.

Precedence (lowest to highest): defaults < TOML file (`--config FILE`) < environment
variables < command-line flags. One name everywhere: the field `max_connections` is the TOML
key `max_connections`, the variable `WS_GATEWAY_MAX_CONNECTIONS` and the flag
`--max-connections`.

Settings that are more than one scalar are typed too: `[[rooms.policy]]` tables become
`RoomPolicy` rules in `Config.room_policies` (TOML only). The file is checked against this
schema: unknown keys and tables are errors with a did-you-mean, and a value of the wrong TOML
type is an error (`port = "8080"` is a string, not a port). Environment variables and flags
are text and are parsed.

This is the one place settings are validated: `serve` and `check-config` both load through
`load_with_sources` (and then `gateway.app.preflight`, which opens the key and certificate
files), the broker URL is checked by its one parser (`gateway/broker/url.py`), and the lists of
names (policies, log levels and formats) are defined here once.

Every problem is collected, not just the first: `ConfigError.errors` lists each one with its
location -- `file:line` for the file, `$VARIABLE` for the environment, `--flag` for a flag --
so `ws-gateway check-config FILE` can print all of them at once.

Adding an option: add a field (with a comment: it is the documentation), a check in
`_problems` if it has constraints, and a flag in cli.py. Adding a per-room setting: one line
in `RoomPolicy`.
Leaf module: imports only the standard library, `errors` and `broker.url` (a stdlib-only parser).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from gateway.broker.url import parse as parse_broker_url
from gateway.errors import ConfigError

ENV_PREFIX = "WS_GATEWAY_"
# Variables read elsewhere (gateway_ext, setup.py, the tests): not settings, not reported as unknown.
OTHER_ENV = frozenset({"WS_GATEWAY_PURE_PYTHON", "WS_GATEWAY_REQUIRE_EXT", "WS_GATEWAY_NO_EXT",
                       "WS_GATEWAY_TEST_REQUIRE_ALL", "WS_GATEWAY_CONFIG"})
# The slow-consumer policies gateway/rooms/backpressure.py implements (it imports this list).
SLOW_CONSUMER_POLICIES = ("disconnect", "drop_oldest", "drop_newest", "latest")
LOG_LEVELS = ("debug", "info", "warning", "error")
# auto: text on a terminal (a person is reading), JSON otherwise (journald, files, log shippers).
LOG_FORMATS = ("auto", "json", "text")
MIN_API_KEY_CHARS = 16


def _rule(kind: type, default: Any = None, *, minimum: float | None = None, choices: tuple = (),
          required: bool = False) -> Any:
    """A RoomPolicy setting: its TOML type (str, int, float or bool; a float setting takes an
    integer too) and constraints, checked by `_room_policy`."""
    return field(default=default, metadata={"kind": kind, "minimum": minimum, "choices": choices,
                                            "required": required})


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    """One `[[rooms.policy]]` rule: settings for the rooms whose name matches `pattern`.

    The first rule whose pattern matches a room wins (gateway/rooms/backpressure.py); a setting left
    out (None) falls back to the global one. Adding a setting is one line here: it is then
    type-checked, range-checked, printed by check-config and read back like the others.
    """

    pattern: str = _rule(str, "", required=True)                     # fnmatch glob, case-sensitive: "cursor.*"
    policy: str | None = _rule(str, choices=SLOW_CONSUMER_POLICIES)  # default: slow_consumer_policy
    max_queue_bytes: int | None = _rule(int, minimum=1)              # this room's share of a connection's queue
    history_size: int | None = _rule(int, minimum=0)                 # publications kept for recovery (0: none)
    history_ttl: int | None = _rule(int, minimum=1)                  # seconds they live after the last publication
    presence: bool | None = _rule(bool)      # who is here: {"op":"presence"}, presence_stats (rooms/presence.py)
    join_leave: bool | None = _rule(bool)    # {"op":"presence_diff"} events to the room's members


@dataclass(slots=True)
class Config:
    # listening
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    backlog: int = 4096
    # SO_REUSEPORT on the main port with one worker too: several independent processes on one
    # port on purpose (e.g. start the new version before stopping the old). Off: a second
    # instance on a port in use fails at start. --workers N shares its port without this.
    reuse_port: bool = False
    # native TLS (for setups without nginx in front): PEM files; both or neither
    certfile: str = ""
    keyfile: str = ""
    # endpoints
    echo: bool = False                 # serve /echo (conformance tests, benchmarks)
    demo: bool = False                 # serve the demo page at /
    # protocol limits
    max_message_bytes: int = 1 << 20
    # frames one fragmented message may span; past it: close 1009 (gateway_ext.constants.MAX_FRAGMENTS)
    max_fragments: int = 1024
    handshake_timeout: float = 10.0    # slowloris guard: head + upgrade must finish in this time
    ping_interval: float = 20.0        # ping a connection silent for this long; 0 disables
    ping_timeout: float = 20.0         # ... and close it if still silent this much later
    close_timeout: float = 5.0         # wait this long for the peer's close frame / EOF
    max_connections: int = 100_000     # per process; beyond it the upgrade gets 503
    # graceful shutdown
    drain_window: float = 2.0          # spread the 1001/1012 close frames over this many seconds
    drain_timeout: float = 10.0        # the whole shutdown ends within this; stragglers are aborted
    # permessage-deflate (RFC 7692; gateway/ws/deflate.py). On by default: the server never keeps
    # per-connection compressor state (server_no_context_takeover, compress-once broadcasts)
    # and by default not per-connection inflaters either (client_no_context_takeover).
    compression: bool = True
    compression_level: int = 6                     # zlib level 0-9, paid once per broadcast
    compression_min_bytes: int = 256               # shorter messages are sent uncompressed
    compression_server_max_window_bits: int = 15   # 8-15; shared compressors, no per-connection cost
    compression_client_max_window_bits: int = 12   # 9-15; bounds each inflater (when the client offers it)
    compression_client_context_takeover: bool = False  # let clients keep context: one inflater each
    compression_max_contexts: int = 1000           # cap on those inflaters; beyond it: no takeover
    compression_exclude_rooms: str = ""            # comma-separated fnmatch patterns sent uncompressed
    # broker
    broker: str = "memory://"
    # Redis broker (gateway/broker/redis.py): channels are <prefix>{room}, keys <prefix>meta:{room} etc.;
    # gateways sharing one Redis see each other only with the same prefix
    redis_prefix: str = "ws:"
    redis_timeout: float = 5.0         # connect/command timeout; a Redis silent this long counts as down
    # history and recovery (docs/history.md): each room keeps its last history_size publications
    # for history_ttl seconds after its last publication (0: no history, numbering only); per
    # room pattern in [[rooms.policy]] (history_size, history_ttl). The idempotency window is
    # history_ttl too. The position (epoch, seq) lives 2 x history_ttl, and while any process
    # holds the room. The memory broker caps all its history at history_max_bytes.
    history_size: int = 100
    history_ttl: int = 300
    history_max_bytes: int = 64 << 20
    # rooms on /ws (protocol and error codes: gateway/rooms/commands.py)
    max_rooms_per_connection: int = 100    # a join beyond this gets the error too_many_rooms
    max_room_name_bytes: int = 200         # longer room names (UTF-8) get room_name_too_long
    max_consecutive_errors: int = 10       # this many invalid requests in a row: close with 4003
    # slow consumers (gateway/rooms/backpressure.py): once a connection's transport buffer passes
    # write_buffer_high_bytes, broadcast frames queue up to max_queue_bytes, then the policy
    # decides; [[rooms.policy]] tables (pattern, policy, max_queue_bytes) override it per room
    write_buffer_high_bytes: int = 65536
    max_queue_bytes: int = 1 << 20
    slow_consumer_policy: str = "disconnect"   # disconnect | drop_oldest | drop_newest | latest
    # SO_SNDBUF of /ws sockets (the kernel doubles it); 0 keeps the kernel's autotuning, which
    # lets one stalled client pin up to tcp_wmem's max (often 4 MiB) of kernel memory
    send_buffer_bytes: int = 0
    # authentication (gateway/security/auth.py, docs/security.md); no key configured = open mode
    jwt_secret: str = ""               # HS256 secret, >= 32 bytes; prefer jwt_secret_file or $WS_GATEWAY_JWT_SECRET
    jwt_secret_file: str = ""          # file holding the HS256 secret (surrounding whitespace ignored)
    jwt_public_key_file: str = ""      # PEM public key (RSA >= 2048 / EC / Ed25519) for RS256/ES256/EdDSA tokens
    jwt_algorithms: tuple = ()         # accepted algorithms; default HS256 and/or the public key's (RS256, ES256, ...)
    jwt_issuer: str = ""               # when set, tokens must carry exactly this `iss`
    jwt_audience: tuple = ()           # when set, `aud` must contain one of these; tokens with `aud` need it set
    jwt_leeway: float = 10.0           # clock skew tolerated on exp/nbf/iat, seconds
    token_cookie: str = ""             # also read the token from this cookie (then cross-origin requests are refused)
    default_rooms: tuple = ("*",)      # join patterns for tokens without a `rooms` claim
    default_publish: tuple = ("*",)    # publish patterns for tokens with neither `publish` nor `rooms`
    api_keys: tuple = ()               # bearer keys for POST /api/<method> (docs/api.md); none: the API is off
    # backend hooks (gateway/api/proxy.py, gateway/api/webhooks.py, docs/backend.md); need aiohttp
    connect_proxy_url: str = ""        # POST each /ws handshake's chosen headers here; the answer admits or refuses
    join_proxy_url: str = ""           # POST joins of rooms matching join_proxy_rooms here: allow or deny
    join_proxy_rooms: tuple = ("*",)   # fnmatch patterns of rooms whose joins ask join_proxy_url
    publish_proxy_url: str = ""        # POST publishes to rooms matching publish_proxy_rooms: allow, deny, replace
    publish_proxy_rooms: tuple = ("*",)
    proxy_headers: tuple = ("cookie", "authorization", "origin", "user-agent", "accept-language")  # forwarded
    proxy_timeout: float = 2.0         # a hook call (including its wait for a slot) ends within this
    proxy_max_concurrency: int = 64    # hook calls in flight per process; more wait (within the timeout)
    proxy_breaker_failures: int = 5    # this many failures in a row open the circuit breaker ...
    proxy_breaker_reset: float = 5.0   # ... which refuses at once for this long, then lets one call probe
    webhook_url: str = ""              # POST signed event batches here (none: webhooks off)
    webhook_secret: str = ""           # HMAC-SHA256 key of X-WS-Gateway-Signature (>= 16 chars); prefer the env
    webhook_events: tuple = ("room_occupied", "room_vacated", "user_online", "user_offline")
    webhook_publish_rooms: tuple = ()  # client_published events for publications in rooms matching these
    webhook_timeout: float = 5.0       # one delivery attempt (a batch) ends within this
    webhook_batch_size: int = 100      # events per POST at most
    webhook_retry_min: float = 1.0     # backoff after a failed attempt: doubling from this ...
    webhook_retry_max: float = 60.0    # ... up to this (full jitter)
    webhook_max_age: float = 86400.0   # an event undelivered this long is dropped (counted)
    webhook_debounce: float = 3.0      # a user/room back within this emits neither offline/vacated nor online/occupied
    webhook_ttl: float = 30.0          # a crashed process's users go offline (rooms vacated) within this
    api_port: int = 0                  # >0: the server API (/api/*) only on this private listener
    api_host: str = "127.0.0.1"        # address of that listener (keep it private)
    # presence, join/leave events, cluster-wide limits (gateway/rooms/presence.py, docs/api.md);
    # which rooms: presence / join_leave in the [[rooms.policy]] rules (RoomPolicy) of the config file
    presence_ttl: float = 30.0         # a crashed process's members disappear within this; heartbeat every ttl/3
    join_leave_debounce: float = 3.0   # a user back within this many seconds causes no leave/join events
    presence_info_claim: str = ""      # token claim shown as each user's "info" in presence (<= 1 KiB JSON)
    presence_page_size: int = 1000     # members per {"op":"presence"} answer; the rest by "after" cursor
    max_connections_per_user: int = 0  # concurrent connections per token `sub`, across every process; 0: unlimited
    revocation_ttl: float = 86400.0    # revocations without "until" are kept this long (your longest token lifetime)
    # defences (gateway/security/limits.py, gateway/security/defences.py)
    allowed_origins: tuple = ()        # Origin allow-list: https://app.example.com, https://*.example.com, null, *
    trusted_proxies: tuple = ()        # addresses/CIDRs whose X-Forwarded-For / X-Real-IP are believed
    max_connections_per_ip: int = 0    # concurrent connections per client IP (IPv6: per /64); 0: unlimited
    rate_limit: float = 100.0          # inbound messages/s per connection (token bucket); 0 disables
    rate_limit_burst: int = 200        # messages a connection may send at once before the rate applies
    # metrics
    metrics_port: int = 0              # >0: /metrics (+ /healthz, /readyz) on its own listener only
    metrics_host: str = "127.0.0.1"    # address of that listener (keep it private)
    metrics_public: bool = False       # /metrics on the main port answers everyone (default: loopback
                                       # and trusted_proxies only, others get 403; docs/security.md)
    # logging
    log_level: str = "info"            # debug | info | warning | error
    log_format: str = "auto"           # auto (text on a terminal, else json) | json | text
    # [[rooms.policy]] rules (TOML only): per room pattern, see RoomPolicy and backpressure.py
    room_policies: tuple = ()

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


# Scalar and list settings: each has a TOML key, a $WS_GATEWAY_* variable and a --flag.
_FIELD_TYPES = {f.name: f.type for f in fields(Config) if f.name != "room_policies"}
# TOML tables: table -> {key: Config field holding a tuple of that rule type}.
_TABLES = {"rooms": {"policy": ("room_policies", RoomPolicy)}}
_RULE_FIELDS = {f.name: f.metadata for f in fields(RoomPolicy)}

# Options of earlier releases that no longer exist: a file that still sets one loads, with a warning.
RETIRED = {
    "redis_seq_ttl": "a room's Redis keys now live as long as its history (history_ttl; docs/history.md)",
}

# Never printed by check-config (to_toml) nor logged.
SECRET_FIELDS = frozenset({"jwt_secret", "api_keys", "webhook_secret"})

# Fields a running process can take from a new configuration on SIGHUP (see server.py);
# the rest (sockets, processes, broker connection) need a restart.
RELOADABLE = frozenset({
    "log_level", "log_format", "max_message_bytes", "max_fragments", "handshake_timeout", "ping_interval",
    "ping_timeout", "close_timeout", "max_connections", "drain_window", "drain_timeout",
    "certfile", "keyfile",
})
# Auth and defence settings apply to new handshakes on SIGHUP; defences.Defences.reload also
# re-reads the key files, so keys rotate without dropping anyone.
RELOADABLE = RELOADABLE | {
    "jwt_secret", "jwt_secret_file", "jwt_public_key_file", "jwt_algorithms", "jwt_issuer", "jwt_audience",
    "jwt_leeway", "token_cookie", "default_rooms", "default_publish", "allowed_origins", "trusted_proxies",
    "max_connections_per_ip", "rate_limit", "rate_limit_burst", "metrics_public",
}

# -- where each value came from ------------------------------------------------------------

def locate_keys(text: str) -> dict[tuple, int]:
    """Map (table..., key) -> line number for a TOML text: enough for error messages.

    tomllib returns values without positions, so this scans for `[table]` headers and
    `key =` lines. Multi-line strings/arrays can fool it only into a missing line number.
    """
    where: dict[tuple, int] = {}
    table: tuple = ()
    arrays: dict[tuple, int] = {}   # [[array.of.tables]] path -> entries seen so far
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", stripped)
        if header:
            table = _split_dotted(header.group(2))
            for n in range(1, len(table) + 1):   # [a.b] also defines [a] (for "unknown table [a]")
                where.setdefault(table[:n], number)
            if header.group(1) == "[[":
                index = arrays[table] = arrays.get(table, -1) + 1
                table = table + (index,)        # keys below belong to entry `index`
                where.setdefault(table, number)
            continue
        key = re.match(r'^((?:[A-Za-z0-9_\-. ]|"[^"]*"|\'[^\']*\')+?)\s*=', stripped)
        if key:
            where.setdefault(table + _split_dotted(key.group(1)), number)
    return where


def _split_dotted(text: str) -> tuple:
    """`a."b.c".d` -> ("a", "b.c", "d"): dots inside quotes belong to the key."""
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([^."\']+)', text)
    return tuple((dq or sq or bare).strip() for dq, sq, bare in parts if (dq or sq or bare).strip() or dq or sq)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _coerce(name: str, value: Any, *, text: bool) -> Any:
    """Convert a value to the field's type, or raise ValueError saying why.

    `text`: the value comes from the environment or a flag and is parsed ("8080" -> 8080).
    Otherwise it is a TOML value and must already have the right TOML type: `port = "8080"`
    is a mistake worth reporting (quotes around a number, a boolean written as a word).
    """
    kind = _FIELD_TYPES[name]
    if kind == "tuple":
        # A list setting: a TOML array, or comma-separated text (also accepted in the file).
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a single {kind} value, got {_describe(value)}")
    if not text:
        unquote = (f" (write {name} = {value}, without quotes)"
                   if isinstance(value, str) and _parses_as(kind, value) else "")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"expected a boolean (true or false), got {_describe(value)}{unquote}")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"expected an integer, got {_describe(value)}{unquote}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"expected a number, got {_describe(value)}{unquote}")
        if kind == "str" and not isinstance(value, str):
            raise ValueError(f'expected a string, got {_describe(value)} (write {name} = "{value}")')
        return float(value) if kind == "float" else value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text_value = str(value).strip().lower()
        if text_value in ("1", "true", "yes", "on"):
            return True
        if text_value in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError("expected a number of seconds, got a boolean")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _parses_as(kind: str, text: str) -> bool:
    if kind == "bool":
        return text.strip().lower() in ("true", "false")
    try:
        (int if kind == "int" else float)(text)
        return kind in ("int", "float")
    except ValueError:
        return False


def _did_you_mean(word: str, candidates) -> str:
    hint = difflib.get_close_matches(word, list(candidates), 1, 0.6)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false)"}


def _room_policy(entry: Any) -> tuple[RoomPolicy | None, list[tuple[str, str]]]:
    """One [[rooms.policy]] table -> (the rule or None, [(key, problem), ...])."""
    if not isinstance(entry, dict):
        return None, [("", "must be a table: write [[rooms.policy]] with pattern = \"...\" below it")]
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in entry.items():
        meta = _RULE_FIELDS.get(key)
        if meta is None:
            problems.append((key, f"unknown key{_did_you_mean(key, _RULE_FIELDS)}; "
                                  f"a rule has {', '.join(_RULE_FIELDS)}"))
            continue
        kind = meta["kind"]
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, accepted):
            unquote = (" (without quotes)" if isinstance(value, str) and kind in (int, float, bool)
                       and _parses_as(kind.__name__, value) else "")
            problems.append((key, f"expected {_KIND_NAMES[kind]}, got {_describe(value)}{unquote}"))
        elif meta["choices"] and value not in meta["choices"]:
            problems.append((key, f"{value!r} is not one of {', '.join(meta['choices'])}"
                                  f"{_did_you_mean(value, meta['choices'])}"))
        elif meta["minimum"] is not None and value < meta["minimum"]:
            problems.append((key, f"must be at least {meta['minimum']}, got {value}"))
        elif meta["required"] and not value:
            problems.append((key, "must not be empty"))
        else:
            values[key] = float(value) if kind is float else value
    for key, meta in _RULE_FIELDS.items():
        if meta["required"] and key not in entry:
            problems.append((key, "is missing (e.g. pattern = \"cursor.*\")"))
    return (None if problems else RoomPolicy(**values)), problems


def _broker_problems(config: Config) -> list[tuple[str, str]]:
    """The broker URL (its one parser: gateway/broker/url.py) and the Redis options."""
    out = []
    try:
        parse_broker_url(config.broker)
    except ValueError as exc:   # the message never echoes the URL: it may hold a password
        out.append(("broker", str(exc)))
    if "{" in config.redis_prefix or "}" in config.redis_prefix:
        out.append(("redis_prefix", "must not contain braces (they would change the Redis Cluster hash tag)"))
    if config.history_size < 0:
        out.append(("history_size", "must be >= 0 (0 turns history off)"))
    if config.history_ttl < 1:
        out.append(("history_ttl", "must be at least 1 second"))
    if config.history_max_bytes < 0:
        out.append(("history_max_bytes", "must be >= 0"))
    if not config.redis_timeout > 0:
        out.append(("redis_timeout", "must be positive"))
    return out


def _problems(config: Config) -> list[tuple[str, str]]:
    """Every constraint violated by `config`, as (field, message)."""
    out = []
    if not 0 <= config.port <= 65535:
        out.append(("port", f"{config.port} is not a TCP port (0-65535)"))
    if config.workers < 1:
        out.append(("workers", "must be at least 1"))
    if config.backlog < 1:
        out.append(("backlog", "must be at least 1"))
    if config.max_message_bytes < 125:
        out.append(("max_message_bytes", "must be at least 125"))
    if config.max_fragments < 1:
        out.append(("max_fragments", "must be at least 1"))
    if config.max_connections < 1:
        out.append(("max_connections", "must be at least 1"))
    for name in ("handshake_timeout", "close_timeout", "ping_timeout", "drain_timeout"):
        if not getattr(config, name) > 0:
            out.append((name, "must be positive"))
    if config.ping_interval < 0:
        out.append(("ping_interval", "must be >= 0 (0 disables keepalive pings)"))
    if config.drain_window < 0:
        out.append(("drain_window", "must be >= 0 (0 closes every client at once)"))
    elif config.drain_window >= config.drain_timeout > 0:
        out.append(("drain_window", f"must be shorter than drain_timeout ({config.drain_timeout}) "
                                    "so clients have time to answer the close frame"))
    if config.log_format not in LOG_FORMATS:
        out.append(("log_format", f"{config.log_format!r} is not one of {', '.join(LOG_FORMATS)}"))
    if config.log_level.lower() not in LOG_LEVELS:
        out.append(("log_level", f"{config.log_level!r} is not one of {', '.join(LOG_LEVELS)}"))
    if config.workers > 1 and config.broker in ("", "memory", "memory://"):
        out.append(("workers", "N > 1 needs a shared broker (--broker redis://...); "
                               "with the memory broker rooms would silently split between processes"))
    out.extend(_broker_problems(config))
    if not 0 <= config.metrics_port <= 65535:
        out.append(("metrics_port", f"{config.metrics_port} is not a TCP port (0-65535)"))
    elif config.metrics_port and config.metrics_port == config.port:
        out.append(("metrics_port", "must differ from port (0 serves /metrics on the main port)"))
    for name in ("max_rooms_per_connection", "max_room_name_bytes", "max_consecutive_errors",
                 "write_buffer_high_bytes", "max_queue_bytes"):
        if getattr(config, name) < 1:
            out.append((name, "must be at least 1"))
    if not 0 <= config.api_port <= 65535:
        out.append(("api_port", f"{config.api_port} is not a TCP port (0-65535)"))
    elif config.api_port and config.api_port in (config.port, config.metrics_port):
        out.append(("api_port", "must differ from port and metrics_port (0 serves /api on the main port)"))
    if not config.presence_ttl >= 1:
        out.append(("presence_ttl", "must be at least 1 second"))
    if config.join_leave_debounce < 0:
        out.append(("join_leave_debounce", "must be >= 0 seconds"))
    if config.presence_page_size < 1:
        out.append(("presence_page_size", "must be at least 1"))
    if config.max_connections_per_user < 0:
        out.append(("max_connections_per_user", "must be >= 0 (0: unlimited)"))
    if not config.revocation_ttl > 0:
        out.append(("revocation_ttl", "must be positive"))
    if config.send_buffer_bytes < 0:
        out.append(("send_buffer_bytes", "must be >= 0 (0 keeps the kernel's autotuning)"))
    if config.slow_consumer_policy not in SLOW_CONSUMER_POLICIES:
        out.append(("slow_consumer_policy", f"{config.slow_consumer_policy!r} is not one of "
                                            f"{', '.join(SLOW_CONSUMER_POLICIES)}"))
    if config.rate_limit < 0:
        out.append(("rate_limit", "must be >= 0 messages/s (0 disables)"))
    if config.rate_limit_burst < 1:
        out.append(("rate_limit_burst", "must be at least 1"))
    if config.max_connections_per_ip < 0:
        out.append(("max_connections_per_ip", "must be >= 0 (0: unlimited)"))
    if config.jwt_leeway < 0:
        out.append(("jwt_leeway", "must be >= 0 seconds"))
    if config.jwt_secret and config.jwt_secret_file:
        out.append(("jwt_secret_file", "jwt_secret and jwt_secret_file are mutually exclusive"))
    if any(len(k) < MIN_API_KEY_CHARS for k in config.api_keys):
        out.append(("api_keys", f"every key needs at least {MIN_API_KEY_CHARS} characters "
                                "(e.g. `openssl rand -hex 32`)"))
    if any("none" == a.lower() for a in config.jwt_algorithms):
        out.append(("jwt_algorithms", "'none' disables signatures and is never accepted (RFC 8725 section 3.1)"))
    out.extend(_hook_problems(config))
    out.extend(_tls_problems(config))
    out.extend(_compression_problems(config))
    return out


WEBHOOK_EVENTS = ("room_occupied", "room_vacated", "user_online", "user_offline", "client_published")


def _hook_problems(config: Config) -> list[tuple[str, str]]:
    """Proxy hooks and webhooks (docs/backend.md)."""
    out = []
    for name in ("connect_proxy_url", "join_proxy_url", "publish_proxy_url", "webhook_url"):
        url = getattr(config, name)
        if url and not re.match(r"^https?://[^/\s]+", url):
            out.append((name, "must be an http:// or https:// URL"))
    for name in ("proxy_timeout", "proxy_breaker_reset", "webhook_timeout", "webhook_retry_min", "webhook_max_age",
                 "webhook_ttl"):
        if not getattr(config, name) > 0:
            out.append((name, "must be positive"))
    for name in ("proxy_max_concurrency", "proxy_breaker_failures", "webhook_batch_size"):
        if getattr(config, name) < 1:
            out.append((name, "must be at least 1"))
    if config.webhook_retry_max < config.webhook_retry_min:
        out.append(("webhook_retry_max", "must be >= webhook_retry_min"))
    if config.webhook_debounce < 0:
        out.append(("webhook_debounce", "must be >= 0 seconds"))
    elif config.webhook_ttl < 1:
        out.append(("webhook_ttl", "must be at least 1 second"))
    if config.webhook_url and len(config.webhook_secret) < 16:
        out.append(("webhook_secret", "webhook_url needs a webhook_secret of at least 16 characters "
                                      "(e.g. `openssl rand -hex 32`) to sign the batches"))
    unknown = [e for e in config.webhook_events if e not in WEBHOOK_EVENTS]
    if unknown:
        out.append(("webhook_events", f"unknown event {unknown[0]!r} (known: {', '.join(WEBHOOK_EVENTS)})"))
    bad = [h for h in config.proxy_headers if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", h)]
    if bad:
        out.append(("proxy_headers", f"{bad[0]!r} is not a header name (RFC 9110 section 5.1)"))
    return out


def _compression_problems(config: Config) -> list[tuple[str, str]]:
    out = []
    if not 0 <= config.compression_level <= 9:
        out.append(("compression_level", "must be 0-9 (zlib levels)"))
    if config.compression_min_bytes < 0:
        out.append(("compression_min_bytes", "must be >= 0"))
    # RFC 7692 section 7.1.2: window bits are 8-15. zlib cannot deflate with an 8-bit window, so
    # clients built on it cannot honour client_max_window_bits=8: never ask for it.
    if not 8 <= config.compression_server_max_window_bits <= 15:
        out.append(("compression_server_max_window_bits", "must be 8-15 (RFC 7692 section 7.1.2.1)"))
    if not 9 <= config.compression_client_max_window_bits <= 15:
        out.append(("compression_client_max_window_bits", "must be 9-15 (zlib cannot deflate with 8)"))
    if config.compression_max_contexts < 0:
        out.append(("compression_max_contexts", "must be >= 0"))
    return out


def _tls_problems(config: Config) -> list[tuple[str, str]]:
    """Both files or neither, readable. Loading them (a real certificate and its key) is
    `gateway.server.tls.make_ssl_context`, run by `gateway.app.preflight` for serve and check-config."""
    if config.certfile and not config.keyfile:
        return [("certfile", "native TLS needs keyfile too (the certificate's private key)")]
    if config.keyfile and not config.certfile:
        return [("keyfile", "native TLS needs certfile too (the certificate chain)")]
    return [(name, f"cannot read {path!r}") for name in ("certfile", "keyfile")
            if (path := getattr(config, name)) and not os.access(path, os.R_OK)]


def validate(config: Config) -> Config:
    problems = _problems(config)
    if problems:
        errors = [f"{name}: {msg}" for name, msg in problems]
        raise ConfigError("; ".join(errors), errors)
    return config


@dataclass
class Loaded:
    """The effective configuration and, for each setting, where its value came from."""

    config: Config
    sources: dict[str, str]
    warnings: list[str]


def load_with_sources(path: str | None = None, env: dict[str, str] | None = None,
                      overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None) -> Loaded:
    """Build the effective configuration; raise ConfigError listing every problem with its location.

    `overrides` are flag values by field name (None: not given); `flags` names the flag that set
    each one in messages (default `--field-name`; e.g. the field api_keys is the flag --api-key).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    errors: list[str] = []
    warnings: list[str] = []
    where: dict[tuple, int] = {}
    flags = flags or {}

    def at(key: tuple) -> str:
        for n in range(len(key), 0, -1):   # the key's own line, else its table's
            line = where.get(key[:n])
            if line:
                return f"{path}:{line}"
        return str(path)

    if path:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}", [f"{path}: cannot read: {exc.strerror}"]) from None
        text = raw.decode("utf-8", "replace")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            line = re.search(r"line (\d+)", msg)
            loc = f"{path}:{line.group(1)}" if line else path
            raise ConfigError(f"{loc}: invalid TOML: {msg}", [f"{loc}: invalid TOML: {msg}"]) from None
        where = locate_keys(text)
        for key, value in data.items():
            if key in _FIELD_TYPES and not isinstance(value, dict):
                try:
                    values[key] = _coerce(key, value, text=False)
                    sources[key] = at((key,))
                except ValueError as exc:
                    errors.append(f"{at((key,))}: {key}: {exc}")
            elif key in _TABLES and isinstance(value, dict):
                errors.extend(_load_table(key, value, values, sources, at))
            elif key in _FIELD_TYPES:
                errors.append(f"{at((key,))}: [{key}] is not a table: {key} is a single setting "
                              f"(write {key} = ... at the top of the file)")
            elif key in RETIRED:
                warnings.append(f"{at((key,))}: {key} is no longer used and is ignored: {RETIRED[key]}")
            else:
                kind = "table" if isinstance(value, dict) else "option"
                shown = f"[{key}]" if isinstance(value, dict) else repr(key)
                candidates = [*_TABLES, *_FIELD_TYPES] if isinstance(value, dict) else [*_FIELD_TYPES, *_TABLES]
                errors.append(f"{at((key,))}: unknown {kind} {shown}{_did_you_mean(key, candidates)}")

    env = os.environ if env is None else env
    for name in _FIELD_TYPES:
        var = ENV_PREFIX + name.upper()
        raw_value = env.get(var)
        if raw_value is not None:
            try:
                values[name] = _coerce(name, raw_value, text=True)
                sources[name] = f"${var}"
            except ValueError as exc:
                errors.append(f"${var}: {exc}")
    known_vars = {ENV_PREFIX + name.upper() for name in _FIELD_TYPES}
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in known_vars and var not in OTHER_ENV:
            warnings.append(f"${var}: not a setting, ignored{_did_you_mean(var, known_vars)}")

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        flag = flags.get(key) or f"--{key.replace('_', '-')}"
        if key not in _FIELD_TYPES:
            errors.append(f"{flag}: unknown option")
            continue
        try:
            values[key] = _coerce(key, value, text=True)
            sources[key] = flag
        except ValueError as exc:
            errors.append(f"{flag}: {exc}")

    config = Config(**values)
    for name, msg in _problems(config):
        errors.append(f"{sources.get(name, 'default')}: {name}: {msg}")
    if errors:
        raise ConfigError("; ".join(errors), errors)
    return Loaded(config, sources, warnings)


def _load_table(table: str, data: dict, values: dict, sources: dict, at) -> list[str]:
    """A known TOML table (e.g. [rooms]): its arrays of rules become typed tuples in `values`."""
    errors = []
    schema = _TABLES[table]
    for key, value in data.items():
        if key not in schema:
            errors.append(f"{at((table, key))}: unknown key {table}.{key}"
                          f"{_did_you_mean(key, schema)}; [{table}] has {', '.join(f'[[{table}.{k}]]' for k in schema)}")
            continue
        name, _rule_type = schema[key]
        if not isinstance(value, list):
            errors.append(f"{at((table, key))}: {table}.{key} must be an array of tables: "
                          f"write [[{table}.{key}]] (two brackets) once per rule")
            continue
        rules = []
        for index, entry in enumerate(value):
            rule, problems = _room_policy(entry)
            for field_name, msg in problems:
                label = f"{table}.{key}[{index}]" + (f".{field_name}" if field_name else "")
                errors.append(f"{at((table, key, index, field_name) if field_name else (table, key, index))}: "
                              f"{label}: {msg}")
            if rule is not None:
                rules.append(rule)
                sources[f"{table}.{key}[{index}]"] = at((table, key, index))
        values[name] = tuple(rules)
        sources[name] = at((table, key))
    return errors


def load(path: str | None = None, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None,
         flags: dict[str, str] | None = None) -> Config:
    """Build the effective configuration (see the module docstring for precedence)."""
    return load_with_sources(path, env, overrides, flags).config


def redact_url(url: str) -> str:
    """A URL with the password of its userinfo part replaced (RFC 3986 section 3.2.1)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:<redacted>@{hostpart}"


def to_toml(config: Config, sources: dict[str, str] | None = None) -> str:
    """The configuration as a TOML document that `load` reads back to the same values."""
    sources = sources or {}
    lines = []
    for name in _FIELD_TYPES:
        value = getattr(config, name)
        origin = sources.get(name, "default")
        if name in SECRET_FIELDS and value:
            # check-config output lands in terminals, tickets and CI logs: never print secrets.
            lines.append(f'{name} = "<redacted>"'.ljust(40) + f"  # {origin}")
            continue
        if isinstance(value, str) and "://" in value:
            value = redact_url(value)   # e.g. redis://:password@host -> redis://:<redacted>@host
        lines.append(f"{name} = {_toml_value(value)}".ljust(40) + f"  # {origin}")
    for table, schema in _TABLES.items():
        for key, (name, _rule_type) in schema.items():
            for index, rule in enumerate(getattr(config, name)):
                origin = sources.get(f"{table}.{key}[{index}]", "")
                lines.append("")
                lines.append(f"[[{table}.{key}]]".ljust(40) + (f"  # {origin}" if origin else ""))
                for f in fields(rule):
                    if (value := getattr(rule, f.name)) is not None:
                        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return _toml_value(str(value))
