"""/metrics: valid Prometheus text (prometheus_client's parser), counters that move with traffic."""
import asyncio
import collections
import json
import logging
import time

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import (COUNTER, GAUGE, HISTOGRAM, MAX_LABEL_VALUES, GatewayCollector, LatencyHistogram,
                                 LoopLagMonitor, Metric)
from tests.helpers import raw_request, serve, ws_url


async def scrape(port: int, path: str = "/metrics") -> dict:
    """{(sample name, frozenset(labels)): value} from one scrape, parsed by prometheus_client."""
    data = await raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"Content-Type: text/plain; version=0.0.4" in head
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_with_echo_traffic(run):
    async def main():
        async with serve() as gw:
            before = await scrape(gw.port)
            async with websockets.connect(ws_url(gw)) as ws:
                for i in range(5):
                    await ws.send(f"message {i}")
                    assert await ws.recv() == f"message {i}"
                during = await scrape(gw.port)
                assert value(during, "ws_gateway_connections_open") == 1
            await raw_request(gw.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(_until_closed(gw), 5)
            after = await scrape(gw.port)
        assert value(after, "ws_gateway_messages_in_total") - value(before, "ws_gateway_messages_in_total") == 5
        assert value(after, "ws_gateway_frames_out_total") >= 5
        sent = sum(len(f"message {i}") for i in range(5))
        # Each client frame carries >= 6 bytes of header + mask; each echo >= 2 bytes of header.
        assert value(after, "ws_gateway_bytes_in_total") >= sent + 5 * 6
        assert value(after, "ws_gateway_bytes_out_total") >= sent + 5 * 2
        assert value(after, "ws_gateway_connections_opened_total") == 1
        assert value(after, "ws_gateway_connections_closed_total") == 1
        assert value(after, "ws_gateway_connections_closed_by_code_total", code="1000") == 1
        assert value(after, "ws_gateway_connections_open") == 0
        assert value(after, "ws_gateway_connections_rejected_total", reason="404") == 1
        # Scrapes are TCP connections too: 3 scrapes (the last one counts itself) + 1 ws + 1 404.
        assert value(after, "ws_gateway_connections_accepted_total") == 5
        assert value(after, "ws_gateway_handshake_seconds_count") == 1
        assert value(after, "ws_gateway_handshake_seconds_bucket", le="+Inf") == 1
        assert value(after, "ws_gateway_ready") == 1
        assert value(after, "process_resident_memory_bytes") > 0
        assert value(after, "process_open_fds") > 0
        assert ("ws_gateway_event_loop_lag_seconds", frozenset()) in after
    run(main())


async def _until_closed(gw):
    while gw.connections:
        await asyncio.sleep(0.01)


def test_rooms_counters_move(run):
    async def main():
        async with serve() as gw:
            before = await scrape(gw.port)
            async with websockets.connect(ws_url(gw, "/ws")) as a, websockets.connect(ws_url(gw, "/ws")) as b:
                for ws in (a, b):
                    await ws.send(json.dumps({"op": "join", "room": "r", "id": 1}))
                    assert json.loads(await ws.recv())["op"] == "ack"
                await a.send(json.dumps({"op": "publish", "room": "r", "data": {"x": 1}}))
                for ws in (a, b):
                    msg = json.loads(await ws.recv())
                    assert msg["op"] == "message" and msg["data"] == {"x": 1}
                during = await scrape(gw.port)
        assert value(during, "ws_gateway_hub_rooms") == 1
        assert value(during, "ws_gateway_hub_members") == 2
        assert value(during, "ws_gateway_hub_publishes_total") - value(before, "ws_gateway_hub_publishes_total") == 1
        assert value(during, "ws_gateway_hub_deliveries_total") - value(before, "ws_gateway_hub_deliveries_total") == 2
        assert value(during, "ws_gateway_hub_broker_connected") == 1
        # Fan-out latency: one observation per loop pass that delivered publications.
        fanout = value(during, "ws_gateway_hub_fanout_seconds_count") - value(before, "ws_gateway_hub_fanout_seconds_count")
        assert fanout >= 1
        assert value(during, "ws_gateway_hub_fanout_seconds_sum") > 0
        assert ("ws_gateway_hub_max_unflushed_bytes_total", frozenset()) not in during   # a setting, not a metric
        assert ("ws_gateway_queue_bytes", frozenset()) in during
    run(main())


def test_metrics_port_is_separate_and_private(run):
    async def main():
        async with serve(metrics_port=_free_port()) as gw:
            assert gw.metrics_port and gw.metrics_port != gw.port
            samples = await scrape(gw.metrics_port)
            assert value(samples, "ws_gateway_ready") == 1
            main_port = await raw_request(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert main_port.startswith(b"HTTP/1.1 404")
            health = await raw_request(gw.metrics_port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert health.startswith(b"HTTP/1.1 200")
            # The private listener never upgrades to WebSocket.
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(f"ws://127.0.0.1:{gw.metrics_port}/echo"):
                    pass
            # ... and its scrapes are not counted as client traffic.
            samples = await scrape(gw.metrics_port)
            assert value(samples, "ws_gateway_connections_accepted_total") == 1   # only the /metrics probe above
    run(main())


def _free_port():
    from tests.helpers import free_port
    return free_port()


def test_latency_histogram_buckets():
    h = LatencyHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(2.65)


class FakeGateway:
    """What GatewayCollector reads from a gateway, with sources a feature would register."""

    def __init__(self, sources):
        from gateway.server.process import Stats
        self.stats = Stats()
        self.connections = set()
        self.ready, self.draining = True, False
        self.config = type("Config", (), {"max_connections": 10})()
        self.metric_sources = sources


class FeatureStats:
    def __init__(self):
        self.things = 7
        self.renamed_from_old = 3
        self.by_kind = collections.Counter({"a": 4, "b": 1})
        self.latency = LatencyHistogram()
        self.latency.observe(0.002)


TABLE = (
    Metric("feature_things", COUNTER, "feature", "things", "things done"),
    Metric("feature_level", GAUGE, "feature", "old", "an attribute that was renamed"),
    Metric("feature_by_kind", COUNTER, "feature", "by_kind", "things by kind", ("kind",)),
    Metric("feature_latency_seconds", HISTOGRAM, "feature", "latency", "how long"),
    Metric("feature_dict_value", GAUGE, "feature_dict", "present", "from a callable returning a dict"),
    Metric("feature_dict_missing", GAUGE, "feature_dict", "absent", "a key this implementation lacks"),
    Metric("unregistered_thing", COUNTER, "nobody", "x", "a feature not in use"),
)


def _families(gateway, table, collector=None):
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector or GatewayCollector(gateway, table=table))
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_the_table_decides_what_is_exported(caplog):
    calls = []
    gw = FakeGateway({"feature": FeatureStats(), "feature_dict": lambda: calls.append(1) or {"present": 5}})
    collector = GatewayCollector(gw, table=TABLE)
    families = _families(gw, TABLE, collector)
    assert set(families) == {"ws_gateway_feature_things", "ws_gateway_feature_by_kind", "ws_gateway_feature_latency_seconds",
                             "ws_gateway_feature_dict_value"}
    assert families["ws_gateway_feature_things"].type == "counter"
    assert {s.labels["kind"]: s.value for s in families["ws_gateway_feature_by_kind"].samples
            if s.name.endswith("_total")} == {"a": 4, "b": 1}
    assert families["ws_gateway_feature_latency_seconds"].type == "histogram"
    assert families["ws_gateway_feature_dict_value"].samples[0].value == 5
    assert calls == [1]                     # a callable source is called once per scrape
    # An attribute the table names but the object lacks (a rename) is not exported under
    # another name: it is missing, and said once at ERROR.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ws_gateway_feature_level" in errors[0].getMessage()
    _families(gw, TABLE, collector)
    assert calls == [1, 1]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1   # once, not per scrape
    # Nothing else of the object is exported: not `renamed_from_old`, whatever its type.
    assert not any("renamed" in name for name in families)


def test_label_values_are_capped():
    stats = FeatureStats()
    stats.by_kind = collections.Counter({f"k{i}": i + 1 for i in range(MAX_LABEL_VALUES + 36)})
    stats.by_kind["other"] = 1000
    families = _families(FakeGateway({"feature": stats}), TABLE[2:3])
    samples = {s.labels["kind"]: s.value for s in families["ws_gateway_feature_by_kind"].samples
               if s.name.endswith("_total")}
    assert len(samples) <= MAX_LABEL_VALUES
    assert sum(samples.values()) == sum(stats.by_kind.values())    # nothing lost, only folded
    assert samples["other"] > 1000 and "k99" in samples and "k0" not in samples


def test_loop_lag_monitor_sees_a_blocked_loop(run):
    async def main():
        loop = asyncio.get_running_loop()
        monitor = LoopLagMonitor(loop, interval=0.05)
        monitor.start()
        time.sleep(0.3)   # block the loop on purpose: this is the lag being measured
        while monitor.histogram.count == 0:
            await asyncio.sleep(0.01)
        monitor.stop()
        assert monitor.take_max() >= 0.2
        assert monitor.max == 0.0   # take_max resets the per-scrape maximum
    run(main())
