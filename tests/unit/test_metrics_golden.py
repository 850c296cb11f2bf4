"""The golden list of exported metric names: a rename, a new metric or a removed one is a diff here.

Every line is `<name as scraped> <type> [<labels>]`. Adding a metric to the table in
gateway/ops/metrics.py means adding its line here (keep the list sorted); renaming one means
changing a line -- and every dashboard and alert that uses the old name (deploy/grafana).
"""
import asyncio
import json
import os
import re

import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import METRICS, exported_name
from tests.auth_tokens import SECRET, hs256
from tests.helpers import ROOT, raw_request, serve

GOLDEN = [
    'ws_gateway_api_calls_total counter method',
    'ws_gateway_api_history_reads_total counter',
    'ws_gateway_api_published_total counter',
    'ws_gateway_api_rejected_total counter reason',
    'ws_gateway_backpressure_dropped_latest_total counter',
    'ws_gateway_backpressure_dropped_newest_total counter',
    'ws_gateway_backpressure_dropped_oldest_total counter',
    'ws_gateway_backpressure_frames_queued_total counter',
    'ws_gateway_backpressure_queues_opened_total counter',
    'ws_gateway_backpressure_slow_disconnects_total counter',
    'ws_gateway_broker_connect_failures_total counter',
    'ws_gateway_broker_connected gauge',
    'ws_gateway_broker_duplicates_total counter',
    'ws_gateway_broker_evicted_publications_total counter',
    'ws_gateway_broker_expired_rooms_total counter',
    'ws_gateway_broker_history_bytes gauge',
    'ws_gateway_broker_history_evictions_total counter',
    'ws_gateway_broker_history_reads_total counter',
    'ws_gateway_broker_history_rooms gauge',
    'ws_gateway_broker_local_deliveries_total counter',
    'ws_gateway_broker_messages_lost_total counter',
    'ws_gateway_broker_messages_received_total counter',
    'ws_gateway_broker_meta_touches_total counter',
    'ws_gateway_broker_publish_batches_total counter',
    'ws_gateway_broker_publish_errors_total counter',
    'ws_gateway_broker_publishes_total counter',
    'ws_gateway_broker_reconnects_total counter',
    'ws_gateway_broker_rooms gauge',
    'ws_gateway_broker_seq_resets_total counter',
    'ws_gateway_broker_shard_failures_total counter',
    'ws_gateway_broker_shards gauge',
    'ws_gateway_broker_shards_down gauge',
    'ws_gateway_broker_subscribe_errors_total counter',
    'ws_gateway_build_info gauge implementation,python',
    'ws_gateway_bytes_in_total counter',
    'ws_gateway_bytes_out_total counter',
    'ws_gateway_connections_accepted_total counter',
    'ws_gateway_connections_closed_by_code_total counter code',
    'ws_gateway_connections_closed_total counter',
    'ws_gateway_connections_open gauge',
    'ws_gateway_connections_opened_total counter',
    'ws_gateway_connections_rejected_total counter reason',
    'ws_gateway_deflate_bytes_after_total counter',
    'ws_gateway_deflate_bytes_before_total counter',
    'ws_gateway_deflate_compressed_in_total counter',
    'ws_gateway_deflate_compressed_out_total counter',
    'ws_gateway_deflate_declined_total counter',
    'ws_gateway_deflate_live_contexts gauge',
    'ws_gateway_deflate_negotiated_total counter',
    'ws_gateway_draining gauge',
    'ws_gateway_event_loop_lag_max_seconds gauge',
    'ws_gateway_event_loop_lag_seconds gauge',
    'ws_gateway_event_loop_lag_seconds_distribution histogram',
    'ws_gateway_frames_out_total counter',
    'ws_gateway_handshake_seconds histogram',
    'ws_gateway_history_bytes gauge',
    'ws_gateway_history_last_joins_total counter',
    'ws_gateway_history_read_failures_total counter',
    'ws_gateway_history_reads_total counter',
    'ws_gateway_history_recoveries_failed_total counter',
    'ws_gateway_history_recoveries_succeeded_total counter',
    'ws_gateway_history_replayed_total counter',
    'ws_gateway_history_resets_total counter',
    'ws_gateway_history_window_bytes gauge',
    'ws_gateway_http_errors_total counter',
    'ws_gateway_hub_batches_total counter',
    'ws_gateway_hub_broker_connected gauge',
    'ws_gateway_hub_connections gauge',
    'ws_gateway_hub_deliveries_total counter',
    'ws_gateway_hub_fanout_seconds histogram',
    'ws_gateway_hub_joins_total counter',
    'ws_gateway_hub_leaves_total counter',
    'ws_gateway_hub_member_errors_total counter',
    'ws_gateway_hub_members gauge',
    'ws_gateway_hub_publications_received_total counter',
    'ws_gateway_hub_publications_unrouted_total counter',
    'ws_gateway_hub_publish_failures_total counter',
    'ws_gateway_hub_publisher_pauses_total counter',
    'ws_gateway_hub_publishes_total counter',
    'ws_gateway_hub_rooms gauge',
    'ws_gateway_hub_subscribe_failures_total counter',
    'ws_gateway_hub_subscribes_total counter',
    'ws_gateway_hub_unflushed_bytes gauge',
    'ws_gateway_hub_unsubscribes_total counter',
    'ws_gateway_keepalive_timeouts_total counter',
    'ws_gateway_limits_auth_rejected_total counter reason',
    'ws_gateway_limits_forbidden_total counter',
    'ws_gateway_limits_origin_rejected_total counter',
    'ws_gateway_limits_per_ip_rejected_total counter',
    'ws_gateway_limits_rate_limited_total counter',
    'ws_gateway_limits_refresh_rejected_total counter',
    'ws_gateway_limits_refreshed_total counter',
    'ws_gateway_limits_revoked_total counter',
    'ws_gateway_limits_token_expired_total counter',
    'ws_gateway_max_connections gauge',
    'ws_gateway_messages_in_total counter',
    'ws_gateway_paused_connections gauge',
    'ws_gateway_presence_diffs_sent_total counter',
    'ws_gateway_presence_heartbeats_total counter',
    'ws_gateway_presence_joins_received_total counter',
    'ws_gateway_presence_leave_checks_total counter',
    'ws_gateway_presence_leaves_received_total counter',
    'ws_gateway_presence_pending_leaves gauge',
    'ws_gateway_presence_queries_total counter',
    'ws_gateway_presence_tracked_connections gauge',
    'ws_gateway_presence_tracked_rooms gauge',
    'ws_gateway_presence_update_errors_total counter',
    'ws_gateway_presence_updates_total counter',
    'ws_gateway_proxy_breaker_open gauge hook',
    'ws_gateway_proxy_breaker_opened_total counter hook',
    'ws_gateway_proxy_calls_total counter hook',
    'ws_gateway_proxy_decisions_total counter hook,outcome',
    'ws_gateway_proxy_failures_total counter hook,kind',
    'ws_gateway_queue_bytes gauge',
    'ws_gateway_queued_connections gauge',
    'ws_gateway_ready gauge',
    'ws_gateway_session_errors_total counter code',
    'ws_gateway_session_joins_total counter',
    'ws_gateway_session_leaves_total counter',
    'ws_gateway_session_pings_total counter',
    'ws_gateway_session_publishes_total counter',
    'ws_gateway_session_refreshes_total counter',
    'ws_gateway_session_requests_total counter',
    'ws_gateway_session_too_many_errors_closes_total counter',
    'ws_gateway_sse_events_total counter',
    'ws_gateway_sse_open gauge',
    'ws_gateway_sse_opened_total counter',
    'ws_gateway_sse_resets_total counter',
    'ws_gateway_sse_resumed_total counter',
    'ws_gateway_sse_slow_disconnects_total counter',
    'ws_gateway_transport_buffer_bytes gauge',
    'ws_gateway_user_limit_rejected_total counter',
    'ws_gateway_user_limit_unchecked_total counter',
    'ws_gateway_webhook_backend_errors_total counter',
    'ws_gateway_webhook_batches_total counter',
    'ws_gateway_webhook_claimed_total counter',
    'ws_gateway_webhook_delivery_lag_seconds histogram',
    'ws_gateway_webhook_dropped_total counter',
    'ws_gateway_webhook_failed_total counter reason',
    'ws_gateway_webhook_retried_total counter',
    'ws_gateway_webhook_sent_total counter',
    'ws_gateway_webhook_tracking_dropped_total counter',
]

# Numbers only the Redis broker has (the memory broker's stats() has publishes and rooms);
# tests/system/test_metrics_names.py checks a Redis-backed gateway exports the whole list.
REDIS_ONLY = {
    "ws_gateway_broker_connected", "ws_gateway_broker_publish_errors_total", "ws_gateway_broker_publish_batches_total",
    "ws_gateway_broker_subscribe_errors_total", "ws_gateway_broker_reconnects_total",
    "ws_gateway_broker_connect_failures_total", "ws_gateway_broker_messages_received_total",
    "ws_gateway_broker_messages_lost_total", "ws_gateway_broker_seq_resets_total",
    "ws_gateway_broker_local_deliveries_total", "ws_gateway_broker_shards",
    "ws_gateway_broker_history_reads_total", "ws_gateway_broker_meta_touches_total",
    "ws_gateway_broker_shards_down", "ws_gateway_broker_shard_failures_total",
}
# Numbers only the memory broker has (its capped history lives in the process).
MEMORY_ONLY = {
    "ws_gateway_broker_history_bytes", "ws_gateway_broker_history_rooms", "ws_gateway_broker_history_evictions_total",
    "ws_gateway_broker_evicted_publications_total", "ws_gateway_broker_expired_rooms_total",
}
# Only with backend hooks configured (proxy hooks, webhooks: tests/system/test_proxy_hooks.py
# and test_webhook_delivery.py scrape them).
HOOKS_ONLY_PREFIXES = ("ws_gateway_proxy_", "ws_gateway_webhook_")
# prometheus_client's ProcessCollector, outside the table.
PROCESS = ["process_cpu_seconds_total counter", "process_max_fds gauge", "process_open_fds gauge",
           "process_resident_memory_bytes gauge", "process_start_time_seconds gauge",
           "process_virtual_memory_bytes gauge"]


def table_lines() -> list[str]:
    return sorted(f"{exported_name(m)} {m.kind}" + (f" {','.join(m.labels)}" if m.labels else "") for m in METRICS)


def scraped_lines(text: str) -> list[str]:
    """The golden-list form of a scrape (family names as a scrape shows them)."""
    lines = []
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = sorted({k for s in family.samples for k in s.labels if k != "le"})
        lines.append(f"{name} {family.type}" + (f" {','.join(labels)}" if labels else ""))
    return sorted(lines)


def test_the_table_is_the_golden_list():
    assert GOLDEN == sorted(GOLDEN), "keep GOLDEN sorted"
    assert table_lines() == GOLDEN


async def _traffic_and_scrape(gw) -> str:
    """Touch every labelled metric so its label names show in the scrape, then scrape."""
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={hs256()}") as ws:
        await ws.send(json.dumps({"op": "nonsense", "id": 1}))          # session_errors{code}
        await ws.recv()
    await raw_request(gw.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")   # connections_rejected{reason}
    await raw_request(gw.port, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n\r\n")   # api_rejected{reason}
    await raw_request(gw.port, b"POST /api/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"k" * 32
                      + b"\r\n\r\n")                                                # api_calls{method}
    await raw_request(gw.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    while gw.stats.closed < 1:
        await asyncio.sleep(0.01)
    return gw.metrics.render().decode()


def test_a_gateway_exports_exactly_the_golden_list(run):
    async def main():
        async with serve(api_keys=("k" * 32,), jwt_secret=SECRET) as gw:
            return await _traffic_and_scrape(gw)

    text = run(main())
    expected = sorted([line for line in GOLDEN if line.split()[0] not in REDIS_ONLY
                       and not line.startswith(HOOKS_ONLY_PREFIXES)] + PROCESS)
    assert scraped_lines(text) == expected


def test_the_dashboard_uses_only_golden_names():
    """deploy/grafana/ws-gateway.json queries names from this list (a rename here breaks it)."""
    dashboard = json.load(open(os.path.join(ROOT, "deploy", "grafana", "ws-gateway.json")))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    used = set(re.findall(r"\b((?:ws_gateway|process)_[a-z_]+)\b", " ".join(exprs)))
    known = {line.split()[0] for line in GOLDEN + PROCESS}
    histograms = {line.split()[0] for line in GOLDEN if line.split()[1] == "histogram"}
    known |= {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    assert len(used) > 30 and not sorted(used - known)
