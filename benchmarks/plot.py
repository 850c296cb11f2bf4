"""Draw the published charts from the raw results in benchmarks/results/ (PNG, matplotlib).

    python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results]

Reads the RESULT records that benchmarks/run_matrix.py wrote (idle_<server>_<N>.json,
fanout_<server>_<N>.json) and draws:
  rss_vs_connections.png          server RSS per connection and in total vs connections
  deliveries_vs_subscribers.png   fan-out deliveries/s vs subscribers (64-byte messages)
  gateway_vs_peers.png            both at the largest size every server has, side by side
Nothing is measured here: rerun run_matrix.py (or any single loadtool run saved under the
same names) and this script redraws from whatever is there.
"""
import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ["gateway", "picows", "websockets", "aiohttp"]
COLORS = {"gateway": "#d62728", "picows": "#1f77b4", "websockets": "#2ca02c", "aiohttp": "#9467bd"}
_NAME = re.compile(r"^(idle|fanout)_(.+)_(\d+)\.json$")


def load(results: Path) -> dict:
    """{kind: {server: {n: record}}} from the raw files."""
    data: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(results.glob("*.json")):
        match = _NAME.match(path.name)
        if not match:
            continue
        kind, server, n = match.group(1), match.group(2), int(match.group(3))
        record = json.loads(path.read_text())
        if record.get("errors") or not record.get("rate"):
            continue   # a failed run is not a data point
        data[kind][server][n] = record
    return data


def _servers(series: dict) -> list:
    return [s for s in ORDER if s in series] + sorted(s for s in series if s not in ORDER)


def _plain_log_ticks(ax, ticks) -> None:
    """A log axis labelled 1, 2, 5, ... instead of 2x10^0."""
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def rss_chart(idle: dict, out: Path) -> Path:
    fig, (per, total) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in _servers(idle):
        points = sorted(idle[server].items())
        xs = [n for n, _ in points]
        per.plot(xs, [r["rate"] / 1024 for _, r in points], "o-", label=server, color=COLORS.get(server))
        total.plot(xs, [(r["extra"]["server_rss_kb_end"] - r["extra"]["server_rss_kb_before"]) / 1024
                        for _, r in points], "o-", label=server, color=COLORS.get(server))
    per.set_yscale("log")
    _plain_log_ticks(per, [1, 2, 5, 10, 20, 50])
    per.axhline(2.0, color="grey", linestyle="--", linewidth=1)
    per.text(per.get_xlim()[0], 2.1, " goal 2 KB", color="grey", fontsize=8, va="bottom")
    per.set(title="server RSS per idle connection (joined, keepalive on)", xlabel="connections",
            ylabel="KB per connection (log)")
    total.set(title="server RSS growth", xlabel="connections", ylabel="MB")
    for ax in (per, total):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "rss_vs_connections.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def deliveries_chart(fanout: dict, out: Path) -> Path:
    fig, (rate, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in _servers(fanout):
        points = sorted(fanout[server].items())
        xs = [n for n, _ in points]
        rate.plot(xs, [r["rate"] / 1000 for _, r in points], "o-", label=server, color=COLORS.get(server))
        lat.plot(xs, [r["p50_ms"] for _, r in points], "o-", label=server, color=COLORS.get(server))
    rate.set(title="fan-out throughput (64-byte messages, 8 in flight)", xlabel="subscribers in the room",
             ylabel="thousand deliveries/s")
    lat.set(title="time to the last subscriber (p50)", xlabel="subscribers in the room", ylabel="ms")
    lat.set_yscale("log")
    _plain_log_ticks(lat, [1, 10, 100, 1000, 10000])
    for ax in (rate, lat):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "deliveries_vs_subscribers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_chart(data: dict, out: Path) -> Path | None:
    panels = []
    for kind, title, value, unit in (
        ("idle", "server RSS per idle connection", lambda r: r["rate"] / 1024, "KB (lower is better)"),
        ("fanout", "fan-out deliveries/s", lambda r: r["rate"] / 1000, "thousand/s (higher is better)"),
    ):
        series = data.get(kind) or {}
        common = set.intersection(*(set(v) for v in series.values())) if series else set()
        if common:
            n = max(common)
            servers = _servers(series)
            panels.append((f"{title} at {n:,}", unit, servers, [value(series[s][n]) for s in servers]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (title, unit, servers, values) in zip(axes, panels):
        bars = ax.bar(servers, values, color=[COLORS.get(s, "grey") for s in servers])
        ax.bar_label(bars, fmt="%.1f")
        ax.set(title=title, ylabel=unit)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "gateway_vs_peers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"), help="directory of raw JSON results")
    p.add_argument("--out", default=str(HERE / "results"), help="where the PNGs go")
    args = p.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(results)
    written = []
    if data.get("idle"):
        written.append(rss_chart(data["idle"], out))
    if data.get("fanout"):
        written.append(deliveries_chart(data["fanout"], out))
    chart = comparison_chart(data, out)
    if chart is not None:
        written.append(chart)
    if not written:
        print(f"no idle_*/fanout_* results in {results}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
