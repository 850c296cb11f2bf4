"""Prometheus metrics: every exported metric is declared once, in the table METRICS.

The hot path never touches prometheus-client: connections, the hub, the broker and the
slow-consumer queues keep plain `int` attributes (and `collections.Counter`s for counts by
label) that they bump with `+= 1`. `GatewayCollector.collect()` reads them when /metrics is
scraped, so a message costs an integer increment, never a label lookup or a lock.

What is exported is the table, not whatever attributes an object happens to have: each
`Metric` names the public series (`ws_gateway_<name>`, `_total` added to counters), its type,
labels and help, and where its value is read (`source`, `read`). Renaming an attribute
therefore never renames a public metric: the table's read fails (logged once at ERROR, and
tests/unit/test_metrics_golden.py fails), and a rename of the public name is a visible diff
in the golden list. Model: centrifuge's metrics.go (one declaration per metric).

Sources are registered by the features that own them, by name:
    gateway.metric_sources["hub"] = hub                  # an object: `read` is an attribute
    gateway.metric_sources["broker"] = broker.stats      # a callable: called once per scrape
The value read is a number (COUNTER, GAUGE; a bool counts 0/1), a dict {label value: number}
for a metric with `labels` (a tuple of values for several labels), or a LatencyHistogram
(HISTOGRAM). A source that is not registered (a feature not in use) exports nothing; a dict
source may lack a key (the memory broker has no `reconnects`); an object must have every
attribute the table reads from it. The collector adds its own sources: `gateway_state`,
`queues`, `lag`, `build`.

Adding a metric is one line in METRICS plus its name in the golden list, e.g.
    Metric("history_appends", COUNTER, "history", "appends", "publications stored in room history"),
after registering the source once (`gateway.metric_sources["history"] = self.stats`).
Label values must be bounded and chosen by the gateway, never copied from a request (see
docs/security.md); as a second line of defence a labelled metric keeps its MAX_LABEL_VALUES
largest values and adds the rest to `other`.

Leaf module: imports prometheus-client, the standard library and `gateway_ext` (for the
build info) only, never `gateway.*` (the gateway is passed in and read by duck typing).
"""
from __future__ import annotations

import bisect
import logging
import platform
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("gateway.ops.metrics")

PREFIX = "ws_gateway"
# generate_latest() writes the classic text format; say so explicitly (every Prometheus and
# scraper understands 0.0.4, while "version=1.0.0" confuses older ones).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Default buckets (seconds) for latencies from sub-millisecond fan-out to multi-second handshakes.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# Distinct label values one metric exports at most; the rest are summed into "other".
MAX_LABEL_VALUES = 64


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


@dataclass(frozen=True, slots=True)
class Metric:
    """One exported metric: `ws_gateway_<name>` (+ `_total` for a counter)."""

    name: str
    kind: str                  # COUNTER | GAUGE | HISTOGRAM
    source: str                # a registered source (gateway.metric_sources) or a collector one
    read: str                  # the attribute (object source) or key (dict source) holding the value
    help: str
    labels: tuple[str, ...] = ()


M = Metric
METRICS: tuple[Metric, ...] = (
    # -- connections and the HTTP phase (server/process.py Stats; collector state) -----------
    M("connections_open", GAUGE, "gateway_state", "connections_open", "WebSocket connections currently open"),
    M("connections_accepted", COUNTER, "gateway", "accepted", "TCP connections accepted (before the handshake)"),
    M("connections_opened", COUNTER, "gateway", "opened", "WebSocket connections established (101 sent)"),
    M("connections_closed", COUNTER, "gateway", "closed", "WebSocket connections closed"),
    M("connections_rejected", COUNTER, "gateway", "rejected",
      "HTTP requests / upgrades refused, by status or reason", ("reason",)),
    M("connections_closed_by_code", COUNTER, "gateway", "close_codes",
      "WebSocket connections closed, by close code (codes outside RFC 6455/IANA and the gateway's 4000-4006: other)", ("code",)),
    M("handshake_seconds", HISTOGRAM, "gateway", "handshake", "time from TCP accept to the 101 response"),
    M("http_errors", COUNTER, "gateway", "http_errors",
      "unexpected errors while handling a request before the 101, answered 400 (tracebacks at debug)"),
    M("keepalive_timeouts", COUNTER, "gateway", "keepalive_timeouts",
      "connections closed because pings went unanswered"),
    M("messages_in", COUNTER, "gateway", "messages_in", "WebSocket messages received from clients"),
    M("frames_out", COUNTER, "gateway", "frames_out", "WebSocket frames written to clients (data + control)"),
    M("bytes_in", COUNTER, "gateway", "bytes_in", "bytes received on WebSocket connections (after the handshake)"),
    M("bytes_out", COUNTER, "gateway", "bytes_out", "bytes written to WebSocket connections (after the handshake)"),
    M("ready", GAUGE, "gateway_state", "ready", "1 while /readyz says ready (accepting and dependencies up)"),
    M("draining", GAUGE, "gateway_state", "draining", "1 while a graceful shutdown is closing clients"),
    M("max_connections", GAUGE, "gateway_state", "max_connections", "configured per-process connection limit"),
    # -- outbound buffers, summed over connections at scrape time (GatewayCollector._queues) --
    M("queue_bytes", GAUGE, "queues", "queue_bytes", "bytes in the gateway's slow-consumer queues"),
    M("queued_connections", GAUGE, "queues", "queued_connections", "connections with a non-empty slow-consumer queue"),
    M("transport_buffer_bytes", GAUGE, "queues", "transport_buffer_bytes",
      "bytes buffered in event-loop transports (not yet in the kernel)"),
    M("paused_connections", GAUGE, "queues", "paused_connections",
      "connections whose transport asked us to pause writing"),
    # -- the process ----------------------------------------------------------------------
    M("event_loop_lag_seconds", GAUGE, "lag", "last", "latest event-loop lag sample"),
    M("event_loop_lag_max_seconds", GAUGE, "lag", "max", "worst event-loop lag since the previous scrape"),
    M("event_loop_lag_seconds_distribution", HISTOGRAM, "lag", "histogram", "event-loop lag samples"),
    M("build_info", GAUGE, "build", "info", "1; labels say which hot path and Python are in use",
      ("implementation", "python")),
    # -- rooms (rooms/hub.py Hub; its HubGauges; rooms/session.py; rooms/backpressure.py) ----
    M("hub_rooms", GAUGE, "hub_gauges", "rooms", "rooms with local members"),
    M("hub_members", GAUGE, "hub_gauges", "members", "memberships (a connection in 3 rooms counts 3)"),
    M("hub_connections", GAUGE, "hub_gauges", "connections", "connections in at least one room"),
    M("hub_broker_connected", GAUGE, "hub", "broker_connected", "1 while the hub's broker is connected"),
    M("hub_unflushed_bytes", GAUGE, "hub", "unflushed_bytes", "fan-out bytes written but not yet flushed this pass"),
    M("hub_publishes", COUNTER, "hub", "publishes", "publications this process handed to the broker"),
    M("hub_publish_failures", COUNTER, "hub", "publish_failures", "publications the broker refused"),
    M("hub_publications_received", COUNTER, "hub", "publications_received",
      "publications the broker delivered for a local room"),
    M("hub_publications_unrouted", COUNTER, "hub", "publications_unrouted",
      "publications delivered for a room with no local members left"),
    M("hub_deliveries", COUNTER, "hub", "deliveries", "frames handed to members (one per member per publication)"),
    M("hub_batches", COUNTER, "hub", "batches", "(room, loop pass) flushes: deliveries / batches = batching factor"),
    M("hub_joins", COUNTER, "hub", "joins", "room joins"),
    M("hub_leaves", COUNTER, "hub", "leaves", "room leaves"),
    M("hub_subscribes", COUNTER, "hub", "subscribes", "broker subscriptions (first local member of a room)"),
    M("hub_unsubscribes", COUNTER, "hub", "unsubscribes", "broker unsubscriptions (last local member left)"),
    M("hub_subscribe_failures", COUNTER, "hub", "subscribe_failures", "broker subscriptions that failed"),
    M("hub_member_errors", COUNTER, "hub", "member_errors", "deliveries that raised (a bug; the member is dropped)"),
    M("hub_publisher_pauses", COUNTER, "hub", "publisher_pauses",
      "times a publisher was paused until the fan-out caught up"),
    M("hub_fanout_seconds", HISTOGRAM, "hub", "fanout", "first publication of a loop pass -> that pass's writes done"),
    M("session_requests", COUNTER, "session", "requests", "requests received on /ws"),
    M("session_joins", COUNTER, "session", "joins", "join requests on /ws"),
    M("session_leaves", COUNTER, "session", "leaves", "leave requests on /ws"),
    M("session_publishes", COUNTER, "session", "publishes", "publish requests on /ws"),
    M("session_refreshes", COUNTER, "session", "refreshes", "token refresh requests on /ws"),
    M("session_pings", COUNTER, "session", "pings", "application pings on /ws (answered with pong)"),
    M("session_errors", COUNTER, "session", "errors", "error replies on /ws, by error code", ("code",)),
    M("session_too_many_errors_closes", COUNTER, "session", "too_many_errors_closes",
      "connections closed 4003 after too many invalid requests in a row"),
    M("backpressure_dropped_oldest", COUNTER, "backpressure", "dropped_oldest",
      "queued frames evicted by drop_oldest (and latest past its byte limit)"),
    M("backpressure_dropped_newest", COUNTER, "backpressure", "dropped_newest",
      "incoming frames refused by drop_newest / a full queue"),
    M("backpressure_dropped_latest", COUNTER, "backpressure", "dropped_latest",
      "queued frames replaced by a newer one of the same room (latest)"),
    M("backpressure_slow_disconnects", COUNTER, "backpressure", "slow_disconnects", "connections closed with 4000"),
    M("backpressure_queues_opened", COUNTER, "backpressure", "queues_opened",
      "times a connection fell behind and got a queue"),
    M("backpressure_frames_queued", COUNTER, "backpressure", "frames_queued", "frames put in slow-consumer queues"),
    # -- broker (broker/*.py stats(): a dict; the memory broker has only publishes and rooms) --
    M("broker_connected", GAUGE, "broker", "connected", "1 while connected to Redis"),
    M("broker_publishes", COUNTER, "broker", "publishes", "publications sent to the broker"),
    M("broker_publish_errors", COUNTER, "broker", "publish_errors", "publications refused or unanswered (never acked)"),
    M("broker_publish_batches", COUNTER, "broker", "publish_batches", "pipelined publish round trips"),
    M("broker_subscribe_errors", COUNTER, "broker", "subscribe_errors", "subscribe commands that failed"),
    M("broker_reconnects", COUNTER, "broker", "reconnects", "reconnections to Redis"),
    M("broker_connect_failures", COUNTER, "broker", "connect_failures", "failed connection attempts to Redis"),
    M("broker_messages_received", COUNTER, "broker", "messages_received", "publications received from Redis"),
    M("broker_messages_lost", COUNTER, "broker", "messages_lost", "seq gaps seen by this process"),
    M("broker_seq_resets", COUNTER, "broker", "seq_resets", "rooms whose seq restarted (TTL or Redis restart)"),
    M("broker_local_deliveries", COUNTER, "broker", "local_deliveries",
      "publications delivered to local members only while Redis was down (seq 0)"),
    M("broker_rooms", GAUGE, "broker", "rooms", "rooms the broker holds for this process"),
    M("broker_shards", GAUGE, "broker", "shards", "Redis connections for pub/sub (Cluster: one per shard)"),
    M("broker_shards_down", GAUGE, "broker", "shards_down",
      "Redis Cluster shards out of service (their rooms get broker_unavailable; the others flow)"),
    M("broker_shard_failures", COUNTER, "broker", "shard_failures", "times a Redis Cluster shard went down"),
    M("broker_duplicates", COUNTER, "broker", "duplicates",
      "idempotent publishes answered with the original seq (nothing published)"),
    M("broker_history_reads", COUNTER, "broker", "history_reads", "history reads sent to Redis"),
    M("broker_meta_touches", COUNTER, "broker", "meta_touches", "EXPIREs keeping idle held rooms' numbering alive"),
    M("broker_history_bytes", GAUGE, "broker", "history_bytes", "memory broker: bytes of all rooms' history"),
    M("broker_history_rooms", GAUGE, "broker", "history_rooms", "memory broker: rooms with a numbering or history"),
    M("broker_history_evictions", COUNTER, "broker", "history_evictions",
      "memory broker: room histories evicted by history_max_bytes (oldest rooms first)"),
    M("broker_evicted_publications", COUNTER, "broker", "evicted_publications",
      "memory broker: publications those evictions dropped"),
    M("broker_expired_rooms", COUNTER, "broker", "expired_rooms", "memory broker: rooms forgotten after their TTL"),
    # -- history and recovery (rooms/history.py HistoryStats) ---------------------------------
    M("history_reads", COUNTER, "history", "reads", "history reads this process made from the broker"),
    M("history_read_failures", COUNTER, "history", "read_failures", "history reads that failed"),
    M("history_recoveries_succeeded", COUNTER, "history", "recoveries_succeeded",
      "joins with since answered recovered:true"),
    M("history_recoveries_failed", COUNTER, "history", "recoveries_failed",
      "joins with since answered recovered:false (too old, another epoch)"),
    M("history_replayed", COUNTER, "history", "replayed", "publications replayed to recovering members"),
    M("history_resets", COUNTER, "history", "resets", "reset ops: a room's numbering restarted under its members"),
    M("history_last_joins", COUNTER, "history", "last_joins", "joins with last:true"),
    M("history_bytes", GAUGE, "history", "bytes", "history bytes held by this process (windows + memory broker)"),
    M("history_window_bytes", GAUGE, "history", "window_bytes", "bytes of the hub's replay windows"),
    # -- permessage-deflate (ws/deflate.py Deflate) -----------------------------------------
    M("deflate_negotiated", COUNTER, "deflate", "negotiated", "connections that agreed on permessage-deflate"),
    M("deflate_declined", COUNTER, "deflate", "declined", "permessage-deflate offers declined as invalid"),
    M("deflate_live_contexts", GAUGE, "deflate", "live_contexts", "per-connection inflaters alive now"),
    M("deflate_compressed_in", COUNTER, "deflate", "compressed_in", "compressed messages received (inflated)"),
    M("deflate_compressed_out", COUNTER, "deflate", "compressed_out",
      "messages sent compressed (once per broadcast and window)"),
    M("deflate_bytes_before", COUNTER, "deflate", "bytes_before", "size of messages sent compressed, before deflate"),
    M("deflate_bytes_after", COUNTER, "deflate", "bytes_after", "... and after deflate"),
    # -- auth and defences (security/defences.py DefenceStats) --------------------------------
    M("limits_origin_rejected", COUNTER, "limits", "origin_rejected", "upgrades refused 403: Origin not allowed"),
    M("limits_per_ip_rejected", COUNTER, "limits", "per_ip_rejected", "upgrades refused 429: too many from one IP"),
    M("limits_forbidden", COUNTER, "limits", "forbidden", "upgrades refused 403: a valid token that grants nothing"),
    M("limits_rate_limited", COUNTER, "limits", "rate_limited", "connections closed 4002 (message rate)"),
    M("limits_token_expired", COUNTER, "limits", "token_expired", "connections closed 4001 (token expired)"),
    M("limits_refreshed", COUNTER, "limits", "refreshed", "accepted token refreshes"),
    M("limits_refresh_rejected", COUNTER, "limits", "refresh_rejected", "refused token refreshes"),
    M("limits_auth_rejected", COUNTER, "limits", "auth_rejected", "upgrades refused 401/400, by reason", ("reason",)),
    M("limits_revoked", COUNTER, "limits", "revoked", "upgrades refused 401 and refreshes refused: token revoked"),
    # -- the per-user connection cap (security/user_limit.py UserLimitStats) -------------------
    M("user_limit_rejected", COUNTER, "user_limit", "rejected", "upgrades refused 429: max_connections_per_user"),
    M("user_limit_unchecked", COUNTER, "user_limit", "unchecked",
      "upgrades admitted without the per-user check (the presence backend was unavailable)"),
    # -- the backend API (api/methods.py ApiStats) ----------------------------------------------
    M("api_published", COUNTER, "api", "published", "publications made by the server API (publish, broadcast)"),
    M("api_rejected", COUNTER, "api", "rejected", "server API requests refused, by reason", ("reason",)),
    M("api_calls", COUNTER, "api", "calls", "server API calls answered 200, by method", ("method",)),
    M("api_history_reads", COUNTER, "api", "history_reads", "POST /api/history requests answered"),
    # -- Server-Sent Events (server/sse.py SseStats) --------------------------------------------
    M("sse_opened", COUNTER, "sse", "opened", "GET /sse streams started"),
    M("sse_open", GAUGE, "sse", "open", "event streams open now"),
    M("sse_resumed", COUNTER, "sse", "resumed", "streams that came back with a Last-Event-ID"),
    M("sse_resets", COUNTER, "sse", "resets", "rooms of a stream that could not resume (reset event)"),
    M("sse_events", COUNTER, "sse", "events", "events written to streams"),
    M("sse_slow_disconnects", COUNTER, "sse", "slow_disconnects", "streams ended by the disconnect policy"),
    # -- proxy hooks (api/proxy.py Proxies.metrics) --------------------------------------------
    M("proxy_calls", COUNTER, "proxy", "calls", "calls to a proxy hook (connect, join, publish)", ("hook",)),
    M("proxy_decisions", COUNTER, "proxy", "decisions",
      "proxy hook outcomes: admitted/allowed, refused, replaced, unavailable, bad_answer", ("hook", "outcome")),
    M("proxy_failures", COUNTER, "proxy", "failures",
      "proxy calls that failed: timeout, connect, status, bad_answer, breaker_open", ("hook", "kind")),
    M("proxy_breaker_open", GAUGE, "proxy", "breaker_open", "1 while a hook's circuit breaker refuses calls", ("hook",)),
    M("proxy_breaker_opened", COUNTER, "proxy", "breaker_opened", "times a hook's circuit breaker opened", ("hook",)),
    # -- webhooks (api/webhooks.py Webhooks.metrics) ------------------------------------------
    M("webhook_sent", COUNTER, "webhook", "sent", "webhook events delivered (the backend answered 2xx)"),
    M("webhook_batches", COUNTER, "webhook", "batches", "webhook batches delivered"),
    M("webhook_retried", COUNTER, "webhook", "retried", "webhook events sent again after a failed attempt"),
    M("webhook_failed", COUNTER, "webhook", "failed", "failed webhook attempts: timeout, connect, status", ("reason",)),
    M("webhook_dropped", COUNTER, "webhook", "dropped", "webhook events dropped undelivered after webhook_max_age"),
    M("webhook_claimed", COUNTER, "webhook", "claimed", "webhook events taken over from a dead process's consumer"),
    M("webhook_backend_errors", COUNTER, "webhook", "backend_errors",
      "calls to the outbox/tracking store (Redis) that failed"),
    M("webhook_delivery_lag_seconds", HISTOGRAM, "webhook", "lag", "event time -> the backend acknowledged it"),
    M("webhook_tracking_dropped", COUNTER, "webhook", "tracking_dropped",
      "user/room transitions not reported: queued past 100,000 while Redis was down"),
    # -- presence and join/leave events (rooms/presence.py PresenceStats, PresenceTracker) -------
    M("presence_updates", COUNTER, "presence", "updates", "room updates sent to the presence backend"),
    M("presence_update_errors", COUNTER, "presence", "update_errors", "room updates the presence backend refused"),
    M("presence_diffs_sent", COUNTER, "presence", "diffs_sent", "presence_diff frames built (one per room per pass)"),
    M("presence_joins_received", COUNTER, "presence", "joins_received", "user joins received for local rooms"),
    M("presence_leaves_received", COUNTER, "presence", "leaves_received", "user leaves received for local rooms"),
    M("presence_queries", COUNTER, "presence", "queries", "presence and presence_stats queries (/ws and API)"),
    M("presence_heartbeats", COUNTER, "presence", "heartbeats", "presence heartbeats (every presence_ttl / 3)"),
    M("presence_leave_checks", COUNTER, "presence", "leave_checks",
      "pending leaves checked after the debounce (published, or cancelled by a return)"),
    M("presence_pending_leaves", GAUGE, "presence", "pending_leaves", "leaves waiting out join_leave_debounce"),
    M("presence_tracked_rooms", GAUGE, "presence_state", "tracked_rooms", "rooms with presence tracked here"),
    M("presence_tracked_connections", GAUGE, "presence_state", "tracked_connections",
      "memberships with presence tracked here"),
)
del M


def exported_name(metric: Metric) -> str:
    """The series name a scrape shows (counters end in _total)."""
    name = f"{PREFIX}_{metric.name}"
    return name + "_total" if metric.kind == COUNTER else name


def _check_table(table) -> None:
    seen = set()
    for metric in table:
        if metric.name in seen or metric.kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"metrics table: duplicate name or unknown kind in {metric}")
        seen.add(metric.name)


_check_table(METRICS)
_MISSING = object()


class GatewayCollector:
    """A prometheus-client custom collector over one Gateway and a metrics table."""

    def __init__(self, gateway, lag: "LoopLagMonitor | None" = None, table: tuple = METRICS) -> None:
        _check_table(table)
        self.gateway = gateway
        self.lag = lag
        self.table = table
        self._complained: set[str] = set()   # metrics whose read failed (logged once each)

    def describe(self):
        return []  # unchecked collector: which sources are registered is known at scrape time

    # -- the collector's own sources -------------------------------------------------------

    def _builtin_sources(self) -> dict:
        gw = self.gateway
        sources = {
            "gateway": gw.stats,
            "gateway_state": lambda: {
                "connections_open": len(gw.connections), "ready": int(bool(gw.ready)),
                "draining": int(bool(gw.draining)), "max_connections": gw.config.max_connections},
            "queues": lambda: self._queues(gw),
            "build": self._build_info,
        }
        lag = self.lag
        if lag is not None:
            sources["lag"] = lambda: {"last": lag.last, "max": lag.take_max(), "histogram": lag.histogram}
        return sources

    @staticmethod
    def _queues(gw) -> dict:
        """Outbound bytes waiting, summed over connections at scrape time (O(connections), not per message).

        `queue_bytes` is the gateway-owned slow-consumer queue (conn.state.queue.bytes);
        `transport_buffer_bytes` is what the event loop's transport still holds.
        """
        queued = buffered = paused = behind = 0
        for conn in list(gw.connections):
            if conn.paused:
                paused += 1
            queue = getattr(conn.state, "queue", None)     # endpoint state: the rooms Session has one
            size = queue.bytes if queue is not None else 0
            if size:
                queued += size
                behind += 1
            transport = conn.transport
            if transport is not None:
                try:
                    buffered += transport.get_write_buffer_size()
                except Exception:  # closed transports may refuse; they hold nothing we can count
                    pass
        return {"queue_bytes": queued, "queued_connections": behind, "transport_buffer_bytes": buffered,
                "paused_connections": paused}

    @staticmethod
    def _build_info() -> dict:
        import gateway_ext  # a leaf package (stdlib only), not `gateway`
        return {"info": {(gateway_ext.IMPLEMENTATION, platform.python_version()): 1}}

    # -- scrape -----------------------------------------------------------------------------

    def collect(self):
        registered = getattr(self.gateway, "metric_sources", None) or {}
        sources = {**registered, **self._builtin_sources()}
        resolved: dict = {}
        for metric in self.table:
            name = metric.source
            if name not in resolved:
                resolved[name] = self._resolve(name, sources.get(name))
            source = resolved[name]
            if source is None:
                continue                       # the feature is not in use on this gateway
            if isinstance(source, dict):
                value = source.get(metric.read, _MISSING)
                if value is _MISSING:
                    continue                   # this implementation has no such number (see docstring)
            else:
                value = getattr(source, metric.read, _MISSING)
                if value is _MISSING:
                    self._complain(metric, f"{type(source).__name__} has no attribute {metric.read!r}")
                    continue
            family = self._family(metric, value)
            if family is not None:
                yield family

    def _resolve(self, name: str, source):
        if callable(source) and not isinstance(source, type):
            try:
                return source()
            except Exception:   # a feature's stats() must not break the scrape
                if name not in self._complained:
                    self._complained.add(name)
                    log.exception("metrics source %r failed; its metrics are left out", name,
                                  extra={"event": "metrics_error", "source": name})
                return None
        return source

    def _complain(self, metric: Metric, why: str) -> None:
        if metric.name not in self._complained:
            self._complained.add(metric.name)
            log.error("metric %s not exported: %s", exported_name(metric), why,
                      extra={"event": "metrics_error", "metric": metric.name})

    def _family(self, metric: Metric, value):
        full = f"{PREFIX}_{metric.name}"
        if metric.kind == HISTOGRAM:
            if value is None:
                return None
            if not isinstance(value, LatencyHistogram):
                self._complain(metric, f"expected a LatencyHistogram, got {type(value).__name__}")
                return None
            return HistogramMetricFamily(full, metric.help, buckets=value.buckets(), sum_value=value.sum)
        family_type = CounterMetricFamily if metric.kind == COUNTER else GaugeMetricFamily
        if metric.labels:
            if not isinstance(value, dict):
                self._complain(metric, f"expected a dict of label values, got {type(value).__name__}")
                return None
            family = family_type(full, metric.help, labels=list(metric.labels))
            for key, number in _bounded(metric, value):
                family.add_metric([str(k) for k in key] if isinstance(key, tuple) else [str(key)], number)
            return family
        if not isinstance(value, (int, float)):
            self._complain(metric, f"expected a number, got {type(value).__name__}")
            return None
        return family_type(full, metric.help, value=int(value) if isinstance(value, bool) else value)


def _bounded(metric: Metric, values: dict) -> list:
    """(label value, number) pairs sorted by label; past MAX_LABEL_VALUES the smallest are summed as "other"."""
    items = list(values.items())
    if len(items) > MAX_LABEL_VALUES and len(metric.labels) == 1:
        items.sort(key=lambda kv: kv[1], reverse=True)
        kept = dict(items[:MAX_LABEL_VALUES - 1])
        kept["other"] = kept.get("other", 0) + sum(v for _, v in items[MAX_LABEL_VALUES - 1:])
        items = list(kept.items())
    return sorted(items, key=lambda kv: str(kv[0]))


class Metrics:
    """One registry per Gateway: its collector, the loop-lag monitor and process RSS/fds/CPU."""

    def __init__(self, gateway, loop=None, lag_interval: float = 0.25) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.lag = LoopLagMonitor(loop or gateway.loop, lag_interval)
        self.registry.register(GatewayCollector(gateway, self.lag))
        # process_resident_memory_bytes, process_open_fds, process_max_fds, process_cpu_seconds_total.
        ProcessCollector(registry=self.registry)

    def start(self) -> None:
        self.lag.start()

    def stop(self) -> None:
        self.lag.stop()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "COUNTER", "GAUGE", "HISTOGRAM", "METRICS", "GatewayCollector", "LatencyHistogram",
           "LoopLagMonitor", "Metric", "Metrics", "exported_name"]
