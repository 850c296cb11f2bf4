"""Command line: one sub-command per mode, plus `compare`.

Prints a human summary, then as the very last line `RESULT {json}` for scripts (compare.py
parses it). Exit status: 0 when something was measured without errors, 1 otherwise.
"""
import argparse
import json
import sys

import gateway_ext

from . import fastclient, runner
from .cpu import client_bound
from .registry import MODES


def add_common_arguments(parser) -> None:
    parser.add_argument("--url", required=True, help="ws://host:port/path of the server under test")
    parser.add_argument("--procs", type=int, default=1, help="client worker processes (default 1)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument(
        "--source-address", action="append", metavar="IP",
        help="bind client sockets to this address, round-robin over repeats "
             "(e.g. 127.0.0.2 127.0.0.3 ...: ~28k ports each)",
    )
    parser.add_argument("--header", action="append", metavar="'Name: value'", help="extra upgrade request header")
    parser.add_argument("--label", help="server label for the RESULT line (default: the URL)")
    parser.add_argument(
        "--server-pgid", type=int, metavar="PGID",
        help="report the CPU use of this server process group during the window (Linux)",
    )
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="per connect + upgrade (default 10)")
    parser.add_argument("--open-timeout", type=float, default=60.0, help="for opening all connections (default 60)")
    parser.add_argument("--close-timeout", type=float, default=2.0, help="for the closing handshakes (default 2)")
    fastclient.add_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadtool", description="Load-test a WebSocket server."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for mode in MODES.values():
        p = sub.add_parser(mode.name, help=mode.help, description=mode.help)
        add_common_arguments(p)
        mode.add_arguments(p)
    from . import compare

    compare.add_parser(sub)
    return parser


def validate(args) -> None:
    for name in ("procs", "connections", "inflight", "concurrency"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if getattr(args, "size", 0) < 0 or args.duration <= 0 or args.warmup < 0:
        raise SystemExit("--size/--warmup must be >= 0 and --duration > 0")


def run_mode(args) -> int:
    mode = MODES[args.command]
    validate(args)
    if gateway_ext.IMPLEMENTATION != "cython":
        runner.warn("gateway_ext is the pure-Python build: frames the fast path cannot count cost more client CPU")
    impl = fastclient.impl_for(mode.name, args, runner.parse_url(args.url).family)
    args.client_impl = impl      # the workers read the decision, not "auto"
    summary = runner.run(mode, args)
    record = {
        "mode": mode.name,
        "server": args.label or args.url,
        "url": args.url,
        "params": {
            **mode.params(args), "procs": args.procs, "duration": args.duration, "warmup": args.warmup,
            "source_addresses": len(args.source_address or ()),
        },
        mode.rate_key: round(summary.rate, 1),
        "rate": round(summary.rate, 1),
        "unit": mode.unit,
        "count": summary.count,
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "p999_ms": summary.p999_ms,
        "max_ms": summary.max_ms,
        "samples": summary.samples,
        "errors": summary.errors,
        "error_kinds": summary.error_kinds,
        "extra": summary.extra,
        "client_ext": gateway_ext.IMPLEMENTATION,
        "client_impl": impl,
        "client_bound": client_bound(summary.extra, args.procs),
    }
    print(human_summary(record), flush=True)
    print("RESULT " + json.dumps(record, sort_keys=True), flush=True)
    return 0 if summary.count > 0 and summary.errors == 0 else 1


def _fmt_ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def human_summary(record: dict) -> str:
    params = " ".join(f"{k}={v}" for k, v in record["params"].items())
    lines = [
        f"{record['mode']} against {record['server']}  ({params})  client {record.get('client_impl', 'python')}",
        f"  {record['rate']:>14,.0f} {record['unit']}   count {record['count']:,}",
        f"  latency p50 {_fmt_ms(record['p50_ms'])}  p99 {_fmt_ms(record['p99_ms'])}  "
        f"p99.9 {_fmt_ms(record['p999_ms'])}  max {_fmt_ms(record['max_ms'])}  ({record['samples']:,} samples)",
        f"  errors {record['errors']}" + (f"  {record['error_kinds']}" if record["errors"] else ""),
    ]
    cpu = record["extra"]
    if "client_cpu" in cpu:
        server = f"  server {cpu['server_cpu']:.0%}" if "server_cpu" in cpu else ""
        procs = record["params"].get("procs", 1)
        flag = "   CLIENT-BOUND: the client's core limited this run" if record.get("client_bound") else ""
        lines.append(f"  cpu (share of one core) client {cpu['client_cpu'] / procs:.0%}"
                     f"{' per worker' if procs > 1 else ''}{server}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    # compare forwards the arguments it does not know to the mode it runs.
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare":
        from . import compare

        return compare.run(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_mode(args)


if __name__ == "__main__":
    sys.exit(main())
