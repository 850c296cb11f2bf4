"""Command line: `ws-gateway serve | version | check-config`.

Flags map one to one onto Config fields (see config.py); names are stable: add, don't rename.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from gateway import __version__
from gateway.config import Config, load
from gateway.errors import ConfigError

log = logging.getLogger("gateway.cli")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8080)")
    p.add_argument("--workers", type=int, help="processes sharing the port with SO_REUSEPORT (needs --broker redis://)")
    p.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=None,
                   help="set SO_REUSEPORT with one worker too, so independent instances may share the port "
                        "(default off: a port in use fails at start)")
    p.add_argument("--broker", metavar="URL",
                   help="memory:// (default), redis://host:port/db, rediss://..., unix:///path?db=N, "
                        "or redis+cluster://host:port,host:port (Redis Cluster: sharded pub/sub)")
    p.add_argument("--redis-prefix", metavar="PREFIX", help="prefix of Redis channels and keys (default ws:)")
    p.add_argument("--redis-seq-ttl", type=int, metavar="S", help="seconds an idle room's seq key lives (default 86400)")
    p.add_argument("--redis-timeout", type=float, metavar="S", help="Redis connect/command timeout (default 5)")
    p.add_argument("--echo", action="store_const", const=True, help="serve a raw echo endpoint at /echo")
    p.add_argument("--demo", action="store_const", const=True, help="serve the demo page at /")
    p.add_argument("--max-message-bytes", type=int, metavar="N", help="largest message accepted (default 1 MiB)")
    p.add_argument("--handshake-timeout", type=float, metavar="S")
    p.add_argument("--ping-interval", type=float, metavar="S", help="ping connections silent this long (0: off)")
    p.add_argument("--ping-timeout", type=float, metavar="S")
    p.add_argument("--close-timeout", type=float, metavar="S")
    p.add_argument("--max-connections", type=int, metavar="N")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "text"])
    p.add_argument("--backlog", type=int, metavar="N", help="listen() backlog (default 4096; see deploy/sysctl)")
    p.add_argument("--certfile", metavar="PEM", help="serve TLS natively with this certificate chain (needs --keyfile)")
    p.add_argument("--keyfile", metavar="PEM", help="private key for --certfile")
    p.add_argument("--drain-window", type=float, metavar="S",
                   help="on shutdown, spread the close frames over S seconds (default 2)")
    p.add_argument("--drain-timeout", type=float, metavar="S",
                   help="the whole graceful shutdown ends within S seconds (default 10)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve /metrics, /healthz, /readyz on a separate listener (default: /metrics on the main port)")
    p.add_argument("--max-rooms-per-connection", type=int, metavar="N", help="rooms one connection may join (default 100)")
    p.add_argument("--max-room-name-bytes", type=int, metavar="N", help="longest room name in UTF-8 bytes (default 200)")
    p.add_argument("--max-consecutive-errors", type=int, metavar="N",
                   help="invalid requests in a row before closing with 4003 (default 10)")
    p.add_argument("--write-buffer-high-bytes", type=int, metavar="N",
                   help="transport buffer above which broadcast frames queue (default 65536)")
    p.add_argument("--max-queue-bytes", type=int, metavar="N",
                   help="per-connection queue of a slow consumer before its policy acts (default 1 MiB)")
    p.add_argument("--send-buffer-bytes", type=int, metavar="N",
                   help="SO_SNDBUF of /ws sockets, bounding kernel memory per slow client (default 0: kernel autotuning)")
    p.add_argument("--slow-consumer-policy", choices=["disconnect", "drop_oldest", "drop_newest", "latest"],
                   help="default policy for a full queue (default disconnect; per room: [[rooms.policy]])")
    p.add_argument("--metrics-host", metavar="ADDR", help="address of the --metrics-port listener (default 127.0.0.1)")
    p.add_argument("--metrics-public", action=argparse.BooleanOptionalAction, default=None,
                   help="/metrics on the main port answers every client (default: loopback and "
                        "--trusted-proxies only, 403 otherwise)")
    # authentication and defences (docs/security.md)
    p.add_argument("--jwt-secret", metavar="SECRET",
                   help="HS256 secret (>= 32 bytes); visible in `ps`: prefer --jwt-secret-file or $WS_GATEWAY_JWT_SECRET")
    p.add_argument("--jwt-secret-file", metavar="FILE", help="read the HS256 secret from FILE")
    p.add_argument("--jwt-public-key-file", metavar="PEM", help="public key verifying RS256/ES256/EdDSA tokens")
    p.add_argument("--jwt-algorithms", metavar="LIST", help="accepted algorithms, e.g. RS256 (default: by key)")
    p.add_argument("--jwt-issuer", metavar="ISS", help="required token issuer (iss)")
    p.add_argument("--jwt-audience", metavar="LIST", help="accepted audiences (aud), comma-separated")
    p.add_argument("--jwt-leeway", type=float, metavar="S", help="clock skew tolerated on exp/nbf (default 10)")
    p.add_argument("--token-cookie", metavar="NAME", help="also read the token from this cookie")
    p.add_argument("--default-rooms", metavar="GLOBS", help="join patterns when a token has no rooms claim (default *)")
    p.add_argument("--default-publish", metavar="GLOBS",
                   help="publish patterns when a token has neither publish nor rooms claims (default *)")
    p.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="key for POST /api/publish (repeatable); prefer $WS_GATEWAY_API_KEYS or TOML api_keys")
    p.add_argument("--allowed-origins", metavar="LIST",
                   help="Origin allow-list: https://app.example.com,https://*.example.com (default: any)")
    p.add_argument("--trusted-proxies", metavar="LIST",
                   help="proxies (IPs/CIDRs) whose X-Forwarded-For / X-Real-IP are believed")
    p.add_argument("--max-connections-per-ip", type=int, metavar="N", help="per client IP (IPv6: /64); 0 = unlimited")
    p.add_argument("--rate-limit", type=float, metavar="MSGS",
                   help="inbound messages/s per connection, then close 4002 (default 100; 0 = off)")
    p.add_argument("--rate-limit-burst", type=int, metavar="N", help="messages allowed at once (default 200)")
    p.add_argument("--compression", action=argparse.BooleanOptionalAction, default=None,
                   help="negotiate permessage-deflate (RFC 7692) when clients offer it (default on)")
    p.add_argument("--compression-level", type=int, metavar="0-9", help="zlib level (default 6)")
    p.add_argument("--compression-min-bytes", type=int, metavar="N",
                   help="send messages shorter than N uncompressed (default 256)")
    p.add_argument("--compression-server-max-window-bits", type=int, metavar="8-15", help="default 15")
    p.add_argument("--compression-client-max-window-bits", type=int, metavar="9-15", help="default 12")
    p.add_argument("--compression-client-context-takeover", action=argparse.BooleanOptionalAction, default=None,
                   help="let clients keep their compression context (one inflater per connection; default off)")
    p.add_argument("--compression-max-contexts", type=int, metavar="N",
                   help="cap on per-connection inflaters (default 1000)")
    p.add_argument("--compression-exclude-rooms", metavar="GLOBS",
                   help="comma-separated room patterns broadcast uncompressed (e.g. 'bin.*,video.*')")


# Flags whose dest is a Config field become overrides (any field added to Config and given
# a flag is picked up without listing it here).
_SERVE_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "extra")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ws-gateway", description="High-performance WebSocket gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    _add_serve_flags(serve)
    sub.add_parser("version", help="print the version and which implementation (Cython or Python) is in use")
    check = sub.add_parser("check-config", help="print the effective configuration or every error")
    check.add_argument("file")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name, None) for name in _SERVE_FIELDS}
    return load(getattr(args, "config", None), overrides=overrides)


def cmd_version() -> int:
    import gateway_ext
    print(f"ws-gateway {__version__} ({gateway_ext.IMPLEMENTATION} hot path)")
    return 0


def cmd_check_config(path: str) -> int:
    """Print the effective configuration (file + environment) as TOML, or every error; exit 2 on errors."""
    from gateway import config as config_mod
    _import_features()
    try:
        loaded = config_mod.load_with_sources(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 2
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from gateway.security import defences
    try:
        # Key files readable and usable, origins and proxies well-formed (what `serve` checks first).
        defences.preflight(loaded.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"{path}: 1 error(s)", file=sys.stderr)
        return 2
    print(f"# effective configuration: {path} + environment (WS_GATEWAY_*)")
    sys.stdout.write(config_mod.to_toml(loaded.config, loaded.sources))
    return 0


def _import_features() -> None:
    """Import every gateway module so that each feature registers its config section checks
    (features are otherwise imported lazily, when `serve` wires them)."""
    import importlib
    import pkgutil

    from gateway import __path__ as package_path
    for module in pkgutil.walk_packages(package_path, prefix=f"{__package__}."):
        if module.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # a broken or optional feature must not hide config errors
            print(f"warning: cannot import {module.name} ({exc!r}); its section is not checked", file=sys.stderr)


def cmd_serve(config: Config, reload=None) -> int:
    from gateway.app import run
    return run(config, reload)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return cmd_version()
    if args.command == "check-config":
        return cmd_check_config(args.file)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"ws-gateway: configuration error: {error}", file=sys.stderr)
        return 2
    # SIGHUP re-reads the same sources: the file, the environment and these flags.
    return cmd_serve(config, reload=lambda: config_from_args(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
