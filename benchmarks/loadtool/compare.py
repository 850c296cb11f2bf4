"""compare: A/B two server commands under the same load, in alternating rounds.

Each round starts server A (its command with `{port}` filled in), waits until the port
accepts connections, runs the mode in a client subprocess, stops A; then the same for B.
Alternating rounds spread slow drifts of a shared machine (other jobs, thermal state)
over both sides, and the median of per-round ratios ignores one bad round.

When the machine has both CPUs, servers are pinned to `--server-cpus` (default 0) and the
client to `--client-cpus` (default 1), so the two never compete for a core and a server's
number is what one core of it can do. The client runs as `python -m benchmarks.loadtool`
and is read back through its RESULT line, exactly what a user would see.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .cpu import CLIENT_BOUND
from .registry import MODES
from .servers import Server, ServerFailed, pin_to
from .stats import median

_REPO_ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="A/B two server commands in alternating rounds; median ratio A/B",
        description=__doc__.splitlines()[0] + " Unknown options are passed to the mode (e.g. --connections).",
    )
    p.add_argument("--a", required=True, help="server A command; {port} is replaced by a free port")
    p.add_argument("--b", required=True, help="server B command; {port} is replaced by a free port")
    p.add_argument("--mode", required=True, choices=sorted(MODES))
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--path", default="/echo", help="URL path on both servers (default /echo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--server-cpus", default="0", help="CPU list for servers, e.g. 0 or 0,2 ('' = no pinning)")
    p.add_argument("--client-cpus", default="1", help="CPU list for the client ('' = no pinning)")
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds for a server to listen")
    p.add_argument("--settle", type=float, default=0.5, help="seconds between listening and load")


def _cpus(text: str):
    if not text:
        return None
    wanted = {int(x) for x in text.split(",") if x.strip()}
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not wanted <= available:
        print(f"compare: CPUs {sorted(wanted)} not all available ({sorted(available)}); not pinning", file=sys.stderr)
        return None
    return wanted


def _check_mode_args(mode_name: str, extra: list) -> None:
    """Fail before starting any server if the forwarded options are wrong for the mode."""
    import argparse

    from .cli import add_common_arguments

    for forbidden in ("--url", "--label", "--server-pgid"):
        if any(a == forbidden or a.startswith(forbidden + "=") for a in extra):
            raise SystemExit(f"compare sets {forbidden} itself")
    probe = argparse.ArgumentParser(prog=f"compare --mode {mode_name}")
    add_common_arguments(probe)
    MODES[mode_name].add_arguments(probe)
    probe.parse_args(["--url", "ws://127.0.0.1:1/", *extra])


def _client_budget(extra: list) -> float:
    import argparse

    from .cli import add_common_arguments

    probe = argparse.ArgumentParser()
    add_common_arguments(probe)
    known, _ = probe.parse_known_args(["--url", "ws://x/", *extra])
    return known.open_timeout + known.warmup + known.duration + known.close_timeout + 60


def run_side(command: str, label: str, args, extra: list, server_cpus, client_cpus) -> dict:
    server = Server(command, host=args.host, cpus=server_cpus)
    failed = True
    try:
        server.wait_listening(args.start_timeout)
        time.sleep(args.settle)
        url = f"ws://{args.host}:{server.port}{args.path}"
        # start_new_session made the server's pid its process group id.
        cmd = [sys.executable, "-m", "benchmarks.loadtool", args.mode, "--url", url, "--label", label,
               "--server-pgid", str(server.proc.pid), *extra]
        try:
            proc = subprocess.run(
                cmd, cwd=_REPO_ROOT, capture_output=True, text=True, timeout=_client_budget(extra),
                preexec_fn=pin_to(client_cpus),
            )
        except subprocess.TimeoutExpired:
            return {"server": label, "rate": 0.0, "errors": 1, "error_kinds": {"client timed out": 1}}
        if proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr)
        record = _result_of(proc.stdout)
        if record is None:
            return {"server": label, "rate": 0.0, "errors": 1,
                    "error_kinds": {f"no RESULT line (exit {proc.returncode})": 1}}
        failed = False
        return record
    except ServerFailed as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return {"server": label, "rate": 0.0, "errors": 1, "error_kinds": {"server failed to start": 1}}
    finally:
        server.stop()
        if failed:
            print(f"compare: server log kept at {server.log.name}", file=sys.stderr)
        else:
            server.discard_log()


def _result_of(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def _ratio(a, b):
    return a / b if a and b else None


def _per_server_core(rec: dict):
    """Rate per fully used server core: steadier than the rate on a shared machine, where
    another job can take part of the server's core (then both drop, this one less)."""
    cpu = (rec.get("extra") or {}).get("server_cpu")
    return rec["rate"] / cpu if cpu and rec.get("rate") else None


def _side_text(rec: dict) -> str:
    p50 = rec.get("p50_ms")
    p99 = rec.get("p99_ms")
    lat = f"p50 {p50:.3f} p99 {p99:.3f} ms" if p50 is not None and p99 is not None else "latency n/a"
    cpu = rec.get("extra") or {}
    client = f"{cpu['client_cpu']:.0%}" if "client_cpu" in cpu else "n/a"
    server = f"{cpu['server_cpu']:.0%}" if "server_cpu" in cpu else "n/a"
    cpu_text = f" cpu client {client} server {server}"
    if rec.get("client_bound"):
        cpu_text += " CLIENT-BOUND"
    impl = rec.get("client_impl")
    return f"{rec['rate']:>12,.0f} {rec.get('unit', '')} {lat} err {rec['errors']}{cpu_text}" + (f" [{impl} client]" if impl else "")


def run(args, extra: list) -> int:
    _check_mode_args(args.mode, extra)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    server_cpus, client_cpus = _cpus(args.server_cpus), _cpus(args.client_cpus)
    print(f"compare {args.mode} {' '.join(extra)}", flush=True)
    print(f"  A ({args.label_a}): {args.a}\n  B ({args.label_b}): {args.b}", flush=True)
    print(f"  servers on CPUs {sorted(server_cpus) if server_cpus else 'any'}, "
          f"client on {sorted(client_cpus) if client_cpus else 'any'}", flush=True)
    rounds = []
    for number in range(1, args.rounds + 1):
        a = run_side(args.a, args.label_a, args, extra, server_cpus, client_cpus)
        print(f"round {number} A {_side_text(a)}", flush=True)
        b = run_side(args.b, args.label_b, args, extra, server_cpus, client_cpus)
        ratio = _ratio(a["rate"], b["rate"])
        print(f"round {number} B {_side_text(b)}   A/B {ratio:.2f}" if ratio else f"round {number} B {_side_text(b)}", flush=True)
        core_ratio = _ratio(_per_server_core(a), _per_server_core(b))
        rounds.append({"a": a, "b": b, "ratio": ratio, "core_ratio": core_ratio})
    summary = {
        "mode": "compare",
        "compare_mode": args.mode,
        "a": args.a,
        "b": args.b,
        "label_a": args.label_a,
        "label_b": args.label_b,
        "mode_args": extra,
        "median_ratio": _round(median(r["ratio"] for r in rounds)),
        "median_ratio_per_server_core": _round(median(r["core_ratio"] for r in rounds)),
        "a_median_rate": _round(median(r["a"]["rate"] for r in rounds)),
        "b_median_rate": _round(median(r["b"]["rate"] for r in rounds)),
        "a_median_p50_ms": _round(median(r["a"].get("p50_ms") for r in rounds)),
        "b_median_p50_ms": _round(median(r["b"].get("p50_ms") for r in rounds)),
        "a_median_p99_ms": _round(median(r["a"].get("p99_ms") for r in rounds)),
        "b_median_p99_ms": _round(median(r["b"].get("p99_ms") for r in rounds)),
        "errors": sum(r["a"]["errors"] + r["b"]["errors"] for r in rounds),
        "client_bound_rounds": sum(bool(r["a"].get("client_bound")) + bool(r["b"].get("client_bound")) for r in rounds),
        "rounds": [{"a": _brief(r["a"]), "b": _brief(r["b"]), "ratio": _round(r["ratio"]),
                    "core_ratio": _round(r["core_ratio"])} for r in rounds],
    }
    ratio = summary["median_ratio"]
    print(f"median A/B = {ratio:.2f}" if ratio else "median A/B = n/a", end="")
    print(f"  (A {summary['a_median_rate']:,.0f} vs B {summary['b_median_rate']:,.0f}, errors {summary['errors']})", flush=True)
    core = summary["median_ratio_per_server_core"]
    if core:
        print(f"median A/B per server core = {core:.2f}  (rate / server CPU share; steadier on a busy machine)", flush=True)
    if summary["client_bound_rounds"]:
        print(f"CLIENT-BOUND: in {summary['client_bound_rounds']} of {2 * len(rounds)} runs the client used more than "
              f"{CLIENT_BOUND:.0%} of its core; those rates are the client's limit, not the server's", flush=True)
    print("RESULT " + json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ratio and summary["errors"] == 0 else 1


def _brief(rec: dict) -> dict:
    keys = ("rate", "unit", "p50_ms", "p99_ms", "errors", "error_kinds", "count", "extra", "client_impl", "client_bound")
    return {k: rec.get(k) for k in keys}


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)
