"""Command line: `ws-gateway serve | version | check-config`.

Flags map one to one onto Config fields (see config.py); names are stable: add, don't rename.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys

from . import __version__
from .config import Config, load
from .errors import ConfigError

log = logging.getLogger("gateway.cli")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit: each connection is one fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - depends on the host
            log.warning("cannot raise RLIMIT_NOFILE", extra={"error": str(exc)})
    return soft, hard


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8080)")
    p.add_argument("--workers", type=int, help="processes sharing the port with SO_REUSEPORT (needs --broker redis://)")
    p.add_argument("--broker", metavar="URL", help="memory:// (default) or redis://host:port/db")
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


_SERVE_FIELDS = ("host", "port", "workers", "broker", "echo", "demo", "max_message_bytes", "handshake_timeout",
                 "ping_interval", "ping_timeout", "close_timeout", "max_connections", "log_level", "log_format")


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
    import dataclasses
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in dataclasses.asdict(config).items():
        print(f"{key} = {value!r}")
    return 0


def cmd_serve(config: Config) -> int:
    from .app import run
    return run(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return cmd_version()
    if args.command == "check-config":
        return cmd_check_config(args.file)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"ws-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return cmd_serve(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
