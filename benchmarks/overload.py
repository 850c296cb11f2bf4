"""Overload: established clients' fan-out latency while the gateway, full, sheds a handshake storm.

    python -m benchmarks.overload --subscribers 2000 --storm 200 --duration 10

One gateway process (`--max-connections S+1`, memory broker, logs at info to /dev/null as in
production) is filled by the load tool's fan-out mode (S subscribers + 1 publisher in round
mode: the next publication leaves when the last subscriber got the previous one, so each sample
is one publication's time to its last subscriber). Then, in a second run, the load tool's
handshake mode hammers the full gateway with --storm concurrent connect+upgrade loops; every
attempt must be refused with 503 + Retry-After, and the fan-out's p50/p99 are compared with
the run without the storm. Both load tool runs are plain `python -m benchmarks.loadtool`
commands (printed), so any number here can be reproduced by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_connections(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ws_gateway_connections_open "):
                return float(line.split()[1])
    return 0.0


def result_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"no RESULT line:\n{out[-2000:]}\n{err[-2000:]}")


def run_once(args, storm: bool) -> dict:
    port, metrics_port = free_port(), free_port()
    limit = args.subscribers + 1
    env = {**os.environ, "PYTHONPATH": ROOT}
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--max-connections", str(limit), "--metrics-port", str(metrics_port),
                           "--ping-interval", "0", "--rate-limit", "0", "--log-level", "info",
                           "--no-compression"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                open_connections(metrics_port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/ws"
        warmup = 4.0
        fanout_cmd = [sys.executable, "-m", "benchmarks.loadtool", "fanout", "--url", url, "--subscribers",
                      str(args.subscribers), "--window", "1", "--duration", str(args.duration),
                      "--warmup", str(warmup), "--label", "storm" if storm else "baseline"]
        print("$", " ".join(fanout_cmd[1:]), flush=True)
        fanout = subprocess.Popen(fanout_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        storm_result = None
        if storm:
            # The storm starts once the fan-out holds every slot (the gateway is at max_connections).
            deadline = time.monotonic() + 60
            while open_connections(metrics_port) < limit:
                if time.monotonic() > deadline or fanout.poll() is not None:
                    raise RuntimeError("the fan-out did not fill the gateway")
                time.sleep(0.05)
            storm_cmd = [sys.executable, "-m", "benchmarks.loadtool", "handshake", "--url", url,
                         "--concurrency", str(args.storm), "--procs", str(args.storm_procs),
                         "--duration", str(args.duration), "--warmup", "0", "--label", "storm"]
            print("$", " ".join(storm_cmd[1:]), flush=True)
            hs = subprocess.Popen(storm_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
            storm_result = result_of(hs)
        result = result_of(fanout)
        return {"fanout": result, "storm": storm_result}
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=2000)
    p.add_argument("--storm", type=int, default=200, help="concurrent connect+upgrade loops against the full gateway")
    p.add_argument("--storm-procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "overload.json"))
    args = p.parse_args(argv)
    base = run_once(args, storm=False)
    under = run_once(args, storm=True)
    rows = [("baseline", base["fanout"], None), ("handshake storm", under["fanout"], under["storm"])]
    print(f"{'':16} {'fan-out p50 ms':>15} {'p99 ms':>9} {'p99.9 ms':>9} {'max ms':>8} {'pubs/s':>8}  storm")
    for name, f, s in rows:
        storm = ""
        if s:
            refused = sum(v for k, v in s["error_kinds"].items() if "503" in k)
            storm = (f"{s['errors']} attempts refused ({refused} with 503), {s['count']} admitted, "
                     f"{s['errors'] / args.duration:.0f} refusals/s")
        print(f"{name:16} {f['p50_ms']:>15} {f['p99_ms']:>9} {f['p999_ms']:>9} {f['max_ms']:>8} "
              f"{f['extra'].get('publications_per_s', 0):>8}  {storm}")
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "baseline": base, "storm": under}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
