"""Run the published benchmark matrix and keep every raw RESULT in benchmarks/results/.

    python benchmarks/run_matrix.py                       # everything (about 15 minutes here)
    python benchmarks/run_matrix.py --only idle --servers gateway,picows --sizes 1000,10000

For each server (the gateway and the rooms peers in benchmarks/peers/) and each size:
  idle    `loadtool idle --join lobby`: N subscribers joined to one room, keepalive on,
          server RSS per connection and CPU per idle connection over 25 s, i.e. with the
          gateway's (10 s) and websockets'/aiohttp's (20 s) pings (-> idle_<server>_<N>.json)
  fanout  `loadtool fanout --window 8`: N subscribers, 64-byte publications, deliveries/s
          and time to last subscriber (-> fanout_<server>_<N>.json); servers do not ping
          here (the fanout client does not answer pings).
Every server starts fresh for every run (servers.Server: its own process group, stopped
by group id). `benchmarks/plot.py` draws the charts from these files.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.loadtool.servers import Server, ServerFailed  # noqa: E402

PY = sys.executable
# {ping}: keepalive for idle runs (on: the gateway 10 s; the peers keep their own defaults).
SERVERS = {
    # The rate limiter stays on (its per-connection cost is measured) but must not stop the
    # benchmark's one publisher.
    "gateway": PY + " -m gateway serve --host 127.0.0.1 --port {port} --log-level warning --ping-interval {ping}"
                    " --rate-limit 1000000 --rate-limit-burst 1000000",
    "picows": PY + " benchmarks/peers/picows_rooms.py --port {port}",
    "websockets": PY + " benchmarks/peers/websockets_rooms.py --port {port}",
    "aiohttp": PY + " benchmarks/peers/aiohttp_rooms.py --port {port}",
}
RESULTS = REPO / "benchmarks" / "results"
SOURCES = ["--source-address", "127.0.0.2", "--source-address", "127.0.0.3",
           "--source-address", "127.0.0.4", "--source-address", "127.0.0.5"]


def run_loadtool(args: list, timeout: float) -> dict | None:
    try:
        proc = subprocess.run([PY, "-m", "benchmarks.loadtool", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    return None


def one(kind: str, server: str, n: int) -> dict | None:
    command = SERVERS[server].replace("{ping}", "10" if kind == "idle" else "0")
    srv = Server(command, cwd=REPO)
    try:
        srv.wait_listening(30)
        time.sleep(1.0)
        url = f"ws://127.0.0.1:{srv.port}/ws"
        common = ["--url", url, "--label", server, "--server-pgid", str(srv.proc.pid)]
        if kind == "idle":
            procs = str(max(1, -(-n // 9000)))
            result = run_loadtool(["idle", *common, "--connections", str(n), "--join", "lobby", "--procs", procs,
                                   "--warmup", "3", "--duration", "25", *SOURCES], timeout=600)
        else:
            result = run_loadtool(["fanout", *common, "--subscribers", str(n), "--window", "8", "--size", "64",
                                   "--warmup", "2", "--duration", "6", "--close-timeout", "30", *SOURCES], timeout=600)
    except ServerFailed as exc:
        print(f"{server}: {exc}", file=sys.stderr)
        result = None
    finally:
        srv.stop()
        srv.discard_log()
    if result is not None:
        result["server_cmd"] = command
        result["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (RESULTS / f"{kind}_{server}_{n}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("idle", "fanout"), help="one kind of run only")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma list (default: all)")
    p.add_argument("--sizes", default="1000,5000,10000,19000", help="comma list of N (default 1000,5000,10000,19000)")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for kind in ("idle", "fanout"):
        if args.only and kind != args.only:
            continue
        for n in (int(x) for x in args.sizes.split(",")):
            for server in args.servers.split(","):
                r = one(kind, server, n)
                if r is None:
                    failed += 1
                    print(f"{kind:6} {server:10} {n:>6}: FAILED", flush=True)
                    continue
                if kind == "idle":
                    extra = r["extra"]
                    print(f"{kind:6} {server:10} {n:>6}: {r['rate']:>9,.0f} B/conn RSS  "
                          f"{extra.get('cpu_us_per_conn_s', 0):.3f} us CPU/conn/s  errors {r['errors']}", flush=True)
                else:
                    print(f"{kind:6} {server:10} {n:>6}: {r['rate']:>11,.0f} deliveries/s  p50 {r['p50_ms']} ms "
                          f"to last  errors {r['errors']}", flush=True)
                failed += bool(r["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
