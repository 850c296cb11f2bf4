"""The Redis broker beyond the shared contract: URLs and config, interest-based subscriptions,
seq shared by every process, batching, and faults (Redis killed, restarted, refusing us).

Every test starts its own redis-server on a free port (tests/redis_server.py); the cluster
tests share one 3-node cluster per module.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.broker import BrokerUnavailable, create_broker
from gateway.broker.redis import RedisBroker, parse_broker_url
from gateway.config import load
from gateway.errors import ConfigError
from tests.broker_helpers import Recorder
from tests.helpers import ROOT
from tests.redis_server import RedisServer


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def started(url: str, **options) -> tuple[RedisBroker, Recorder]:
    broker = RedisBroker(url, **{"prefix": "ws:", "reconnect_min": 0.02, "reconnect_max": 0.2, **options})
    rec = Recorder()
    await broker.start(rec)
    return broker, rec


# -- URLs and configuration ------------------------------------------------------------------

@pytest.mark.parametrize("url, cluster, expect", [
    ("redis://127.0.0.1:7000/3", False, [{"host": "127.0.0.1", "port": 7000, "db": 3}]),
    ("redis://h", False, [{"host": "h"}]),
    ("unix:///run/redis.sock?db=2", False, [{"path": "/run/redis.sock", "db": 2}]),
    ("redis+cluster://a:1,b:2", True, [{"host": "a", "port": 1}, {"host": "b", "port": 2}]),
    ("redis+cluster://user:pw@a:1,b:2/0", True, [{"host": "a", "port": 1, "username": "user", "password": "pw", "db": 0},
                                                 {"host": "b", "port": 2, "username": "user", "password": "pw", "db": 0}]),
])
def test_parse_urls(url, cluster, expect):
    is_cluster, seeds = parse_broker_url(url)
    assert is_cluster is cluster
    assert [{k: v for k, v in s.items() if k != "connection_class"} for s in seeds] == expect


def test_tls_url_uses_tls():
    _, [seed] = parse_broker_url("rediss://h:6380/0")
    assert seed["connection_class"].__name__ == "SSLConnection"


@pytest.mark.parametrize("url, words", [
    ("ftp://h", "scheme"),
    ("redis://h:notaport", "port"),
    ("redis://h:6379/abc", "not a number"),
    ("redis://:6379", "no host"),
    ("unix://", "no socket path"),
    ("redis+cluster://", "no cluster nodes"),
    ("redis+cluster://a:1/3", "only database 0"),
    ("localhost:6379", "expected redis://"),
])
def test_bad_urls_are_clear_value_errors(url, words):
    with pytest.raises(ValueError, match=words):
        parse_broker_url(url)


def test_bad_options():
    with pytest.raises(ValueError, match="braces"):
        RedisBroker("redis://h", prefix="a{b}")
    with pytest.raises(ValueError, match="seq_ttl"):
        RedisBroker("redis://h", seq_ttl=0)


@pytest.mark.parametrize("broker, field, words", [
    ("nats://h:4222", "broker", "unsupported scheme"),
    ("redis://h:port", "broker", "invalid Redis address"),
    ("redis://h:1/x", "broker", "not a number"),
    ("redis+cluster://a:1,b:x", "broker", "invalid Redis address"),
    ("redis+cluster://a:1/2", "broker", "only database 0"),
    ("unix://", "broker", "socket path"),
])
def test_config_rejects_bad_broker_urls(broker, field, words):
    with pytest.raises(ConfigError, match=words) as info:
        load(None, env={}, overrides={"broker": broker})
    assert "--broker" in str(info.value)


def test_config_redis_options():
    config = load(None, env={}, overrides={"broker": "redis+cluster://a:1,b:2", "redis_prefix": "app1:",
                                           "redis_seq_ttl": 60, "redis_timeout": 1.5})
    assert (config.redis_prefix, config.redis_seq_ttl, config.redis_timeout) == ("app1:", 60, 1.5)
    with pytest.raises(ConfigError, match="braces"):
        load(None, env={}, overrides={"redis_prefix": "{x}"})
    with pytest.raises(ConfigError, match="redis_seq_ttl"):
        load(None, env={}, overrides={"redis_seq_ttl": 0})


def test_workers_need_a_shared_broker():
    with pytest.raises(ConfigError, match="rooms would silently split"):
        load(None, env={}, overrides={"workers": 2, "broker": "memory://"})
    assert load(None, env={}, overrides={"workers": 2, "broker": "redis://127.0.0.1:6390/0"}).workers == 2


def test_cli_bad_broker_url_is_a_configuration_error():
    """The process exits 2 with one clear line, no traceback, and never echoes a password."""
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--broker",
                           "redis://user:s3cret@h:port/0"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "--broker" in proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "shared broker" in proc.stderr


def test_cli_flags_reach_the_config():
    from gateway.cli import build_parser, config_from_args
    args = build_parser().parse_args(["serve", "--broker", "redis://127.0.0.1:1/0", "--redis-prefix", "p:",
                                      "--redis-seq-ttl", "5", "--redis-timeout", "0.5"])
    config = config_from_args(args)
    assert (config.broker, config.redis_prefix, config.redis_seq_ttl, config.redis_timeout) == \
        ("redis://127.0.0.1:1/0", "p:", 5, 0.5)
