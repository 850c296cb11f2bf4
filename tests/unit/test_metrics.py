"""/metrics: valid Prometheus text (prometheus_client's parser), counters that move with traffic."""
import asyncio
import collections
import json
import time

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import LatencyHistogram, LoopLagMonitor, export_object
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


class FakeHubStats:
    """A stats object as a feature would write it (see the contract in gateway/ops/metrics.py)."""

    gauges = ("inflight_things",)
    labels = {"dropped": "policy"}

    def __init__(self):
        self.publishes = 7
        self.inflight_things = 3
        self.rooms = 2
        self.dropped = collections.Counter({"drop_oldest": 4, "latest": 1})
        self.fanout = LatencyHistogram()
        self.fanout.observe(0.002)
        self.state = "connected"
        self._private = 99


def test_export_object_contract():
    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self):
            return export_object("hub", FakeHubStats())

    registry = CollectorRegistry()
    registry.register(Collector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert families["ws_gateway_hub_publishes"].type == "counter"
    assert families["ws_gateway_hub_inflight_things"].type == "gauge"
    assert families["ws_gateway_hub_rooms"].type == "gauge"
    dropped = {s.labels["policy"]: s.value for s in families["ws_gateway_hub_dropped"].samples}
    assert dropped == {"drop_oldest": 4, "latest": 1}
    assert families["ws_gateway_hub_fanout_seconds"].type == "histogram"
    assert [s.labels for s in families["ws_gateway_hub_state"].samples] == [{"state": "connected"}]
    assert not any("private" in name for name in families)


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
