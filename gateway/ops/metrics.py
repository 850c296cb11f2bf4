"""Prometheus metrics, read at scrape time from plain-integer counters.

The hot path never touches prometheus-client: connections, the hub, the broker and the
slow-consumer queues keep `int` attributes (and `collections.Counter`s for counts by reason)
that they bump with `+= 1`. `GatewayCollector.collect()` reads them when `/metrics` is
scraped, so a message costs an integer increment, never a label lookup or a lock.

What a stats object must look like to be exported (the contract for other features):
  - `int`/`float` attributes are counters (`ws_gateway_<source>_<name>_total`), except the
    names listed in its `gauges` attribute (a tuple/set) or in `GAUGE_NAMES` (current values
    such as `rooms`, `members`, `queue_bytes`), which become gauges;
  - a `collections.Counter` (or dict of str -> int) is a counter with one label, named by the
    object's `labels` dict (`{"dropped": "policy"}`) or `reason` by default;
  - a `LatencyHistogram` becomes a histogram (`..._seconds`), e.g. fan-out latency;
  - a `str` is a state: a gauge `..._state{state="connected"} 1` (broker state);
  - names starting with `_` or `max_` (settings) and anything else are ignored.
Sources are discovered defensively (they land as features do): `gateway.metric_sources`
({name: object}), then the `SOURCE_ATTRS` attributes (`hub`, `broker`, `limits`, ...) of the
gateway, of its endpoints and of what was found there (the hub's broker). What is exported
of a found object depends on its `stats`:
  - an instance attribute: only that object (the owner's own numbers are settings);
  - a method: only what it returns (an object or a dict of numbers);
  - a property: what it returns (current values) and the owner's own plain numbers;
  - none: the object's own plain numbers.

Leaf module: imports prometheus-client, the standard library and `gateway_ext` (for the
build info) only, never `gateway.*` (the gateway is passed in and read by duck typing).
"""
from __future__ import annotations

import bisect
import platform
import time

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "ws_gateway"
# generate_latest() writes the classic text format; say so explicitly (every Prometheus and
# scraper understands 0.0.4, while "version=1.0.0" confuses older ones).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Default buckets (seconds) for latencies from sub-millisecond fan-out to multi-second handshakes.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Attribute names that are current values, not monotonic counts, wherever they appear.
GAUGE_NAMES = frozenset({
    "rooms", "members", "subscriptions", "queue_bytes", "queued_bytes", "queued_frames",
    "paused", "connected", "state", "pending", "inflight", "open", "connections", "shards",
    "contexts", "queues", "unflushed_bytes",
})

# Where to look for feature stats on the gateway (and on its endpoints), by source name.
SOURCE_ATTRS = ("hub", "broker", "limits", "backpressure", "api")


class LatencyHistogram:
    """A fixed-bucket histogram of plain numbers: observe() is a bisect and three increments.

    Cheaper than prometheus_client.Histogram (no lock, no label lookup) and readable by the
    collector at scrape time. `counts[i]` counts observations <= bounds[i] and > bounds[i-1];
    the last slot counts those above every bound (+Inf).
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds=LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((_float_str(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _float_str(value: float) -> str:
    return repr(float(value))


class LoopLagMonitor:
    """Event-loop lag: how late a timer fires. A blocked loop delays every client at once.

    One timer every `interval` seconds (not per message); `last` is the latest lag, `max` the
    worst since the previous scrape, `histogram` every sample.
    """

    def __init__(self, loop, interval: float = 0.25) -> None:
        self.loop = loop
        self.interval = interval
        self.last = 0.0
        self.max = 0.0
        self.histogram = LatencyHistogram()
        self._handle = None
        self._expected = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._schedule()

    def _schedule(self) -> None:
        self._expected = self.loop.time() + self.interval
        self._handle = self.loop.call_at(self._expected, self._tick)

    def _tick(self) -> None:
        lag = max(0.0, self.loop.time() - self._expected)
        self.last = lag
        if lag > self.max:
            self.max = lag
        self.histogram.observe(lag)
        self._schedule()

    def take_max(self) -> float:
        worst, self.max = max(self.max, self.last), 0.0
        return worst

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# The gateway's own counters (server.Stats): attribute -> (metric name, kind, help).
_GATEWAY_STATS = {
    "accepted": ("connections_accepted", "counter", "TCP connections accepted (before the handshake)"),
    "opened": ("connections_opened", "counter", "WebSocket connections established (101 sent)"),
    "closed": ("connections_closed", "counter", "WebSocket connections closed"),
    "messages_in": ("messages_in", "counter", "WebSocket messages received from clients"),
    "messages_out": ("messages_out", "counter", "WebSocket data messages sent to clients"),
    "frames_out": ("frames_out", "counter", "WebSocket frames written to clients (data + control)"),
    "bytes_in": ("bytes_in", "counter", "bytes received on WebSocket connections (after the handshake)"),
    "bytes_out": ("bytes_out", "counter", "bytes written to WebSocket connections (after the handshake)"),
    "keepalive_timeouts": ("keepalive_timeouts", "counter", "connections closed because pings went unanswered"),
    "http_errors": ("http_errors", "counter",
                    "unexpected errors while handling a request before the 101, answered 400 (tracebacks at debug)"),
}
_GATEWAY_LABELLED = {
    "rejected": ("connections_rejected", "reason", "HTTP requests / upgrades refused, by status or reason"),
    "close_codes": ("connections_closed_by_code", "code", "WebSocket connections closed, by close code"),
}


class GatewayCollector:
    """A prometheus-client custom collector over one Gateway (duck-typed, see the docstring)."""

    def __init__(self, gateway, lag: LoopLagMonitor | None = None) -> None:
        self.gateway = gateway
        self.lag = lag

    @staticmethod
    def _queues(gw) -> list:
        """Outbound bytes waiting, summed over connections at scrape time (O(connections), not per message).

        `queue_bytes` is the gateway-owned slow-consumer queue (conn.state.queue.bytes);
        `transport_buffer_bytes` is what the event loop's transport still holds.
        """
        queued = buffered = paused = behind = 0
        for conn in list(gw.connections):
            if getattr(conn, "paused", False):
                paused += 1
            queue = getattr(getattr(conn, "state", None), "queue", None)
            size = getattr(queue, "bytes", 0) if queue is not None else 0
            if size:
                queued += size
                behind += 1
            transport = getattr(conn, "transport", None)
            if transport is not None:
                try:
                    buffered += transport.get_write_buffer_size()
                except Exception:  # closed transports may refuse; they hold nothing we can count
                    pass
        return [
            _gauge("queue_bytes", "bytes in the gateway's slow-consumer queues", queued),
            _gauge("queued_connections", "connections with a non-empty slow-consumer queue", behind),
            _gauge("transport_buffer_bytes", "bytes buffered in event-loop transports (not yet in the kernel)",
                   buffered),
            _gauge("paused_connections", "connections whose transport asked us to pause writing", paused),
        ]

    @staticmethod
    def _build_info() -> GaugeMetricFamily:
        import gateway_ext  # a leaf package (stdlib only), not `gateway`
        family = GaugeMetricFamily(f"{PREFIX}_build_info", "1; labels say which hot path and Python are in use",
                                   labels=["implementation", "python"])
        family.add_metric([gateway_ext.IMPLEMENTATION, platform.python_version()], 1)
        return family

    def describe(self):
        return []  # unchecked collector: the set of metrics grows as features land

    def collect(self):
        gw = self.gateway
        yield _gauge("connections_open", "WebSocket connections currently open", len(gw.connections))
        yield _gauge("ready", "1 while /readyz says ready (accepting and dependencies up)", int(bool(gw.ready)))
        yield _gauge("draining", "1 while a graceful shutdown is closing clients", int(bool(getattr(gw, "draining", False))))
        yield _gauge("max_connections", "configured per-process connection limit", gw.config.max_connections)
        stats = gw.stats
        for attr, (name, kind, help_text) in _GATEWAY_STATS.items():
            value = getattr(stats, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield _counter(name, help_text, value)
        for attr, (name, label, help_text) in _GATEWAY_LABELLED.items():
            value = getattr(stats, attr, None)
            if isinstance(value, dict):
                yield _labelled_counter(name, help_text, label, value)
        yield from self._queues(gw)
        handshake = getattr(stats, "handshake", None)
        if isinstance(handshake, LatencyHistogram):
            yield _histogram("handshake_seconds", "time from TCP accept to the 101 response", handshake)
        if self.lag is not None:
            yield _gauge("event_loop_lag_seconds", "latest event-loop lag sample", self.lag.last)
            yield _gauge("event_loop_lag_max_seconds", "worst event-loop lag since the previous scrape",
                         self.lag.take_max())
            yield _histogram("event_loop_lag_seconds_distribution", "event-loop lag samples", self.lag.histogram)
        yield self._build_info()
        seen: set[int] = {id(stats)}
        names: set[str] = set()
        for source, obj in discover_sources(gw):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for family in export_object(source, obj):
                if family.name not in names:   # two objects exporting one name: keep the first
                    names.add(family.name)
                    yield family


def discover_sources(gw) -> list[tuple[str, object]]:
    """(name, stats object or dict) pairs for every feature that has landed on this gateway."""
    found: list[tuple[str, object]] = []
    explicit = getattr(gw, "metric_sources", None)
    if isinstance(explicit, dict):
        found.extend(explicit.items())
    holders = [gw, *getattr(gw, "endpoints", {}).values()]
    seen = {id(h) for h in holders}
    while holders:
        holder = holders.pop(0)
        for attr in SOURCE_ATTRS:
            obj = getattr(holder, attr, None)
            if obj is None or isinstance(obj, (int, float, str, dict)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append((attr, obj))
            holders.append(obj)     # one level down: the hub's broker
    out = []
    for name, obj in found:
        kind = getattr(type(obj), "stats", None)
        stats = getattr(obj, "stats", None)
        if stats is None:
            out.append((name, obj))
        elif isinstance(kind, property):
            out.append((name, stats))
            out.append((name, obj))
        elif callable(stats):
            try:
                out.append((name, stats()))
            except Exception:  # a feature's stats() must not break the scrape
                continue
        else:
            out.append((name, stats))
    return out


def _attributes(obj) -> dict:
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items() if not str(k).startswith("_")}
    names: list[str] = []
    for cls in type(obj).__mro__:
        names.extend(getattr(cls, "__slots__", ()))
    if hasattr(obj, "__dict__"):
        names.extend(vars(obj))
    out = {}
    for name in dict.fromkeys(names):
        # `max_*` are settings (limits), not measurements: not exported from feature objects.
        if name.startswith(("_", "max_")) or name in ("gauges", "labels"):
            continue
        try:
            out[name] = getattr(obj, name)
        except AttributeError:
            continue
    return out


def export_object(source: str, obj) -> list:
    """Metric families for the plain numbers of one stats object (see the module docstring)."""
    gauges = set(getattr(obj, "gauges", ()) or ()) | GAUGE_NAMES
    labels = getattr(obj, "labels", None)
    labels = labels if isinstance(labels, dict) else {}
    families = []
    for name, value in _attributes(obj).items():
        metric = f"{source}_{name}"
        if isinstance(value, bool):
            families.append(_gauge(metric, f"{source}.{name}", int(value)))
        elif isinstance(value, (int, float)):
            if name in gauges:
                families.append(_gauge(metric, f"{source}.{name} (current value)", value))
            else:
                families.append(_counter(metric, f"{source}.{name}", value))
        elif isinstance(value, LatencyHistogram):
            base = metric if metric.endswith("_seconds") else metric + "_seconds"
            families.append(_histogram(base, f"{source}.{name}", value))
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value.values()):
            families.append(_labelled_counter(metric, f"{source}.{name} by {labels.get(name, 'reason')}",
                                              labels.get(name, "reason"), value))
        elif isinstance(value, str) and name in ("state", "status"):
            family = GaugeMetricFamily(f"{PREFIX}_{metric}", f"{source}.{name}: 1 for the current value",
                                       labels=[name])
            family.add_metric([value], 1)
            families.append(family)
    return families


def _gauge(name: str, help_text: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _counter(name: str, help_text: str, value) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _labelled_counter(name: str, help_text: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family


def _histogram(name: str, help_text: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(f"{PREFIX}_{name}", help_text, buckets=hist.buckets(), sum_value=hist.sum)


class Metrics:
    """One registry per Gateway: its collector, the loop-lag monitor and process RSS/fds/CPU."""

    def __init__(self, gateway, loop=None, lag_interval: float = 0.25) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.lag = LoopLagMonitor(loop or gateway.loop, lag_interval)
        self.registry.register(GatewayCollector(gateway, self.lag))
        # process_resident_memory_bytes, process_open_fds, process_max_fds, process_cpu_seconds_total.
        ProcessCollector(registry=self.registry)
        self.started = time.time()

    def start(self) -> None:
        self.lag.start()

    def stop(self) -> None:
        self.lag.stop()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "GatewayCollector", "LatencyHistogram", "LoopLagMonitor", "Metrics",
           "discover_sources", "export_object"]
