"""Command line: `ws-gateway serve | check-config | version` (and `ws-gateway --version`).

Flags map one to one onto Config fields (see config.py); names are stable: add, don't rename.
Every flag is text handed to config.py, which parses and validates it like the same setting
from the file or the environment (one validator per setting: `--port abc` and `port = "abc"`
get the same message). `serve` and `check-config` take the same flags and run the same
validation (`load_config`): what check-config accepts, serve starts with.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from gateway import __version__
from gateway.config import (ENV_PREFIX, LOG_FORMATS, LOG_LEVELS, SLOW_CONSUMER_POLICIES, Config, Loaded,
                            load_with_sources)
from gateway.errors import ConfigError

CONFIG_ENV = "WS_GATEWAY_CONFIG"   # the file, when --config is not given
_DEFAULTS = Config()

# (group title, [(flag, field or None, metavar or action, help), ...]). The help gets the
# setting's environment variable and default appended, so each flag documents all three.
_FLAGS: list[tuple[str, list[tuple]]] = [
    ("listening", [
        ("--config", None, "FILE", f"TOML configuration file (deploy/gateway.toml lists every setting) [${CONFIG_ENV}]"),
        ("--host", "host", "ADDR", "address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 (every IPv4 "
                                   "address) or :: (IPv6)"),
        ("--port", "port", "N", "TCP port (0: any free port)"),
        ("--workers", "workers", "N", "processes sharing the port (SO_REUSEPORT); N > 1 needs --broker redis://..."),
        ("--reuse-port", "reuse_port", "bool", "set SO_REUSEPORT with one worker too, so independent instances may "
                                               "share the port (off: a port in use fails at start)"),
        ("--backlog", "backlog", "N", "listen() backlog: connections waiting to be accepted (see deploy/sysctl)"),
        ("--certfile", "certfile", "PEM", "serve TLS natively with this certificate chain (needs --keyfile)"),
        ("--keyfile", "keyfile", "PEM", "private key of --certfile"),
    ]),
    ("endpoints", [
        ("--echo", "echo", "flag", "serve a raw echo endpoint at /echo (conformance tests, benchmarks)"),
        ("--demo", "demo", "flag", "serve the demo page at / (open it in a browser)"),
        ("--api-key", "api_keys", "append", "key for POST /api/<method> (docs/api.md), at least 16 characters "
                                            "(repeatable; the variable takes a comma-separated list: keep keys out "
                                            "of `ps`)"),
        ("--api-port", "api_port", "PORT", "serve the server API (/api/*) only on this private listener "
                                           "(0: on the main port)"),
        ("--api-host", "api_host", "ADDR", "address of the --api-port listener"),
        ("--metrics-port", "metrics_port", "PORT", "serve /metrics, /healthz, /readyz on a separate listener "
                                                   "(0: /metrics on the main port)"),
        ("--metrics-host", "metrics_host", "ADDR", "address of the --metrics-port listener (keep it private)"),
        ("--metrics-public", "metrics_public", "bool", "/metrics on the main port answers every client (off: loopback "
                                                       "and --trusted-proxies only, 403 otherwise)"),
    ]),
    ("connections and protocol limits", [
        ("--max-message-bytes", "max_message_bytes", "N", "largest message accepted, after decompression"),
        ("--max-fragments", "max_fragments", "N", "frames one fragmented message may span; more: close 1009"),
        ("--max-connections", "max_connections", "N", "open connections per process; beyond it upgrades get 503"),
        ("--handshake-timeout", "handshake_timeout", "S", "seconds for the HTTP upgrade to complete (slowloris guard)"),
        ("--ping-interval", "ping_interval", "S", "ping a connection silent this many seconds (0: no pings)"),
        ("--ping-timeout", "ping_timeout", "S", "close a pinged connection still silent this many seconds later"),
        ("--close-timeout", "close_timeout", "S", "seconds to wait for the peer's close frame"),
        ("--send-buffer-bytes", "send_buffer_bytes", "N", "SO_SNDBUF of /ws sockets, bounding kernel memory per slow "
                                                          "client (0: the kernel's autotuning)"),
    ]),
    ("rooms (/ws)", [
        ("--max-rooms-per-connection", "max_rooms_per_connection", "N", "rooms one connection may join"),
        ("--max-room-name-bytes", "max_room_name_bytes", "N", "longest room name, in UTF-8 bytes"),
        ("--max-consecutive-errors", "max_consecutive_errors", "N", "invalid requests in a row before closing with 4003"),
        ("--write-buffer-high-bytes", "write_buffer_high_bytes", "N", "transport buffer above which broadcast frames "
                                                                      "queue (slow consumers)"),
        ("--max-queue-bytes", "max_queue_bytes", "N", "a slow consumer's queue before its policy acts"),
        ("--slow-consumer-policy", "slow_consumer_policy", "POLICY",
         f"what a full queue does: {' | '.join(SLOW_CONSUMER_POLICIES)} (per room: [[rooms.policy]] in --config)"),
    ]),
    ("history and recovery (docs/history.md)", [
        ("--history-size", "history_size", "N", "publications each room keeps for recovery (0: off; per room: "
                                                "[[rooms.policy]] history_size)"),
        ("--history-ttl", "history_ttl", "S", "seconds a room's history lives after its last publication (also "
                                              "the idempotency window)"),
        ("--history-max-bytes", "history_max_bytes", "N", "memory broker: cap on all rooms' history (the rooms "
                                                          "published to longest ago are evicted first)"),
    ]),
    ("broker (several processes and machines)", [
        ("--broker", "broker", "URL", "memory://, redis://host:port/db, rediss://..., unix:///path/redis.sock?db=N, "
                                      "redis+cluster://host:port,host:port or rediss+cluster://..."),
        ("--redis-prefix", "redis_prefix", "PREFIX", "prefix of Redis channels and keys (gateways sharing a Redis "
                                                     "see each other only with the same prefix)"),
        ("--redis-timeout", "redis_timeout", "S", "Redis connect/command timeout; silent this long counts as down"),
    ]),
    ("presence, join/leave, cluster-wide limits (docs/api.md; per room: [[rooms.policy]] presence, join_leave)", [
        ("--presence-ttl", "presence_ttl", "S", "a crashed process's room members disappear within S seconds"),
        ("--join-leave-debounce", "join_leave_debounce", "S", "a user back within S seconds emits no leave/join"),
        ("--presence-info-claim", "presence_info_claim", "CLAIM", "token claim shown as a user's presence info"),
        ("--presence-page-size", "presence_page_size", "N", "members per presence answer"),
        ("--max-connections-per-user", "max_connections_per_user", "N",
         "concurrent connections per token sub across every process; 0: unlimited"),
        ("--revocation-ttl", "revocation_ttl", "S", "keep revocations without an explicit until this long"),
    ]),
    ("authentication (docs/security.md)", [
        ("--jwt-secret", "jwt_secret", "SECRET", "HS256 secret, >= 32 bytes; visible in `ps`: prefer "
                                                 "--jwt-secret-file or the variable"),
        ("--jwt-secret-file", "jwt_secret_file", "FILE", "read the HS256 secret from FILE"),
        ("--jwt-public-key-file", "jwt_public_key_file", "PEM", "public key verifying RS256/ES256/EdDSA tokens"),
        ("--jwt-algorithms", "jwt_algorithms", "LIST", "accepted algorithms, comma-separated (default: by key)"),
        ("--jwt-issuer", "jwt_issuer", "ISS", "required token issuer (iss)"),
        ("--jwt-audience", "jwt_audience", "LIST", "accepted audiences (aud), comma-separated"),
        ("--jwt-leeway", "jwt_leeway", "S", "clock skew tolerated on exp/nbf/iat, seconds"),
        ("--token-cookie", "token_cookie", "NAME", "also read the token from this cookie"),
        ("--default-rooms", "default_rooms", "GLOBS", "join patterns for tokens without a rooms claim"),
        ("--default-publish", "default_publish", "GLOBS", "publish patterns for tokens with neither publish nor rooms"),
    ]),
    ("defences", [
        ("--allowed-origins", "allowed_origins", "LIST", "Origin allow-list: https://app.example.com,"
                                                         "https://*.example.com (empty: any)"),
        ("--trusted-proxies", "trusted_proxies", "LIST", "proxies (IPs/CIDRs) whose X-Forwarded-For / X-Real-IP "
                                                         "are believed"),
        ("--max-connections-per-ip", "max_connections_per_ip", "N", "per client IP (IPv6: per /64); 0: unlimited"),
        ("--rate-limit", "rate_limit", "MSGS", "inbound messages/s per connection, then close 4002 (0: off)"),
        ("--rate-limit-burst", "rate_limit_burst", "N", "messages a connection may send at once"),
    ]),
    ("backend hooks (docs/backend.md; need the hooks extra: aiohttp)", [
        ("--connect-proxy-url", "connect_proxy_url", "URL", "ask this backend URL to admit each WebSocket handshake "
                                                            "without a JWT (cookie sessions)"),
        ("--join-proxy-url", "join_proxy_url", "URL", "ask this backend URL before joins of --join-proxy-rooms"),
        ("--join-proxy-rooms", "join_proxy_rooms", "GLOBS", "room patterns whose joins ask the join proxy"),
        ("--publish-proxy-url", "publish_proxy_url", "URL", "ask this backend URL before publishes to "
                                                            "--publish-proxy-rooms (allow, deny, replace the data)"),
        ("--publish-proxy-rooms", "publish_proxy_rooms", "GLOBS", "room patterns whose publishes ask the publish proxy"),
        ("--proxy-headers", "proxy_headers", "LIST", "handshake headers forwarded to the connect proxy"),
        ("--proxy-timeout", "proxy_timeout", "S", "a proxy call (with its wait for a slot) ends within S seconds"),
        ("--proxy-max-concurrency", "proxy_max_concurrency", "N", "proxy calls in flight per hook per process"),
        ("--proxy-breaker-failures", "proxy_breaker_failures", "N", "failures in a row that open a hook's circuit "
                                                                    "breaker"),
        ("--proxy-breaker-reset", "proxy_breaker_reset", "S", "seconds the open breaker refuses before one probe call"),
        ("--webhook-url", "webhook_url", "URL", "POST signed event batches to this URL"),
        ("--webhook-secret", "webhook_secret", "SECRET", "HMAC key of X-WS-Gateway-Signature, >= 16 characters; "
                                                         "visible in `ps`: prefer the variable"),
        ("--webhook-events", "webhook_events", "LIST", "events sent: room_occupied, room_vacated, user_online, "
                                                       "user_offline, client_published"),
        ("--webhook-publish-rooms", "webhook_publish_rooms", "GLOBS", "rooms whose publications send client_published"),
        ("--webhook-timeout", "webhook_timeout", "S", "one delivery attempt's timeout"),
        ("--webhook-batch-size", "webhook_batch_size", "N", "events per POST at most"),
        ("--webhook-retry-min", "webhook_retry_min", "S", "first retry backoff (doubling, full jitter)"),
        ("--webhook-retry-max", "webhook_retry_max", "S", "longest retry backoff"),
        ("--webhook-max-age", "webhook_max_age", "S", "drop events undelivered this long (counted)"),
        ("--webhook-debounce", "webhook_debounce", "S", "a user or room back within S seconds emits no "
                                                        "offline/vacated"),
        ("--webhook-ttl", "webhook_ttl", "S", "a crashed process's users go offline within S seconds"),
    ]),
    ("compression (permessage-deflate, RFC 7692)", [
        ("--compression", "compression", "bool", "negotiate permessage-deflate when clients offer it"),
        ("--compression-level", "compression_level", "0-9", "zlib level, paid once per broadcast"),
        ("--compression-min-bytes", "compression_min_bytes", "N", "send shorter messages uncompressed"),
        ("--compression-server-max-window-bits", "compression_server_max_window_bits", "8-15",
         "window of the shared compressors"),
        ("--compression-client-max-window-bits", "compression_client_max_window_bits", "9-15",
         "window asked of clients (bounds each inflater)"),
        ("--compression-client-context-takeover", "compression_client_context_takeover", "bool",
         "let clients keep their compression context (one inflater per connection)"),
        ("--compression-max-contexts", "compression_max_contexts", "N", "cap on those per-connection inflaters"),
        ("--compression-exclude-rooms", "compression_exclude_rooms", "GLOBS",
         "comma-separated room patterns broadcast uncompressed (e.g. 'bin.*,video.*')"),
    ]),
    ("shutdown", [
        ("--drain-window", "drain_window", "S", "on SIGTERM, spread the close frames over S seconds"),
        ("--drain-timeout", "drain_timeout", "S", "the whole graceful shutdown ends within S seconds"),
    ]),
    ("logging", [
        ("--log-level", "log_level", "LEVEL", f"{' | '.join(LOG_LEVELS)}; debug also prints tracebacks"),
        ("--log-format", "log_format", "FORMAT", f"{' | '.join(LOG_FORMATS)} (auto: text on a terminal, JSON "
                                                 "otherwise, e.g. under systemd)"),
    ]),
]

# Flags whose dest is a Config field become overrides.
_SERVE_FIELDS = tuple(name for _title, flags in _FLAGS for _flag, name, _kind, _help in flags if name)
# The flag that sets each field, for messages ("--api-key", not "--api-keys").
FLAG_OF = {name: flag for _title, flags in _FLAGS for flag, name, _kind, _help in flags if name}


def _env_and_default(name: str) -> str:
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = ",".join(default) or "none"
    else:
        shown = str(default) if default != "" else "none"
    return f"[${ENV_PREFIX}{name.upper()}; default {shown}]"


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: the message, one usage line and where the full help is
    (not the whole 35-line usage of every flag)."""

    def parse_args(self, args=None, namespace=None):
        # Unknown options are reported by the subcommand's parser: its usage line, its options.
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parser = action.choices.get(getattr(namespace, action.dest, None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, 1)
                if word.startswith("-") and close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message}{hint}\n{self.format_usage().strip()}\n"
                     f"Run `{self.prog} --help` for every option.\n")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and the hot path in use, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit(0)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    for title, flags in _FLAGS:
        group = p.add_argument_group(title)
        for flag, name, kind, text in flags:
            if name is None:
                group.add_argument(flag, metavar=kind, help=text)
                continue
            text = f"{text} {_env_and_default(name)}"
            if kind == "flag":
                group.add_argument(flag, dest=name, action="store_const", const=True, help=text)
            elif kind == "bool":
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif kind == "append":
                group.add_argument(flag, dest=name, action="append", metavar="KEY", help=text)
            else:
                group.add_argument(flag, dest=name, metavar=kind, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ws-gateway", description="High-performance WebSocket gateway: rooms, fan-out, Redis.",
                     epilog="Run `ws-gateway serve --help` for the options. Settings come from (lowest first) "
                            "defaults, the TOML file, WS_GATEWAY_* variables, flags.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,check-config,version}",
                                parser_class=_Parser)
    usage = "%(prog)s [--config FILE] [--host ADDR] [--port N] [options]"
    serve = sub.add_parser("serve", help="run the gateway", usage=usage,
                           description="Run the gateway. Every option is also a WS_GATEWAY_* variable and a "
                                       "key of the --config file; flags win over both.")
    _add_serve_flags(serve)
    sub.add_parser("version", help="print the version and which implementation (Cython or Python) is in use")
    check = sub.add_parser("check-config", help="validate the configuration; print the effective one or every error",
                           usage="%(prog)s [FILE] [--config FILE] [options of serve]",
                           description="Validate exactly as `serve` does (the file, WS_GATEWAY_* variables and the "
                                       "same flags as serve) and print the effective configuration with where each "
                                       "value came from, or every error with its file:line. Exit status 2 on errors.")
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML configuration file (same as --config)")
    _add_serve_flags(check)
    return parser


def _config_path(args: argparse.Namespace) -> str | None:
    file, option = getattr(args, "file", None), getattr(args, "config", None)
    if file and option and file != option:
        raise ConfigError(f"two configuration files given ({file} and --config {option}): pass one")
    return file or option or os.environ.get(CONFIG_ENV) or None


def loaded_from_args(args: argparse.Namespace, env: dict | None = None) -> Loaded:
    """The file, the environment and the flags, validated (config.py); raises ConfigError."""
    overrides = {name: getattr(args, name, None) for name in _SERVE_FIELDS}
    return load_with_sources(_config_path(args), env, overrides, FLAG_OF)


def config_from_args(args: argparse.Namespace) -> Config:
    return loaded_from_args(args).config


def load_config(args: argparse.Namespace) -> Loaded:
    """What serve and check-config both run: the settings, then what they name outside the file
    (key and certificate files, origins, proxies: gateway.app.preflight). Raises ConfigError."""
    from gateway.app import preflight
    loaded = loaded_from_args(args)
    try:
        preflight(loaded.config)
    except ConfigError as exc:
        # Its messages start with the setting ("jwt_public_key_file: cannot read ..."): say where
        # that setting came from, like every other error (file:line, $VARIABLE or --flag).
        errors = [f"{loaded.sources[name]}: {error}" if (name := error.split(":", 1)[0]) in loaded.sources
                  else error for error in exc.errors]
        raise ConfigError("; ".join(errors), errors) from None
    return loaded


def version_line() -> str:
    import gateway_ext
    return f"ws-gateway {__version__} ({gateway_ext.IMPLEMENTATION} hot path)"


def cmd_version() -> int:
    print(version_line())
    return 0


def _print_errors(exc: ConfigError, prefix: str) -> None:
    for error in exc.errors:
        print(f"{prefix}{error}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (file + environment + flags) as TOML, or every error; exit 2 on errors."""
    try:
        path = _config_path(args)
        loaded = load_config(args)
    except ConfigError as exc:
        _print_errors(exc, "error: ")
        print(f"{getattr(args, 'file', None) or getattr(args, 'config', None) or 'configuration'}: "
              f"{len(exc.errors)} error(s)", file=sys.stderr)
        return 2
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from gateway import config as config_mod
    print(f"# effective configuration: {path or 'defaults'} + environment (WS_GATEWAY_*) + flags")
    sys.stdout.write(config_mod.to_toml(loaded.config, loaded.sources))
    return 0


def cmd_serve(config: Config, reload=None) -> int:
    from gateway.app import run
    return run(config, reload)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return cmd_version()
    if args.command == "check-config":
        return cmd_check_config(args)
    try:
        loaded = load_config(args)
    except ConfigError as exc:
        _print_errors(exc, "ws-gateway: configuration error: ")
        return 2
    for warning in loaded.warnings:
        print(f"ws-gateway: warning: {warning}", file=sys.stderr)
    # SIGHUP re-reads the same sources: the file, the environment and these flags.
    return cmd_serve(loaded.config, reload=lambda: config_from_args(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
