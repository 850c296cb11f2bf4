"""Every --broker URL form that `check-config` accepts also starts (issue 13): a real gateway
process per form, against redis-server processes this module starts (plain, with a password and
an ACL user, over a Unix socket, over TLS, a 3-node cluster and a 3-node TLS cluster), must
become ready and carry a publication from a join to its ack and its message. Every form it
refuses, `serve` refuses with the same one line.

rediss+cluster:// used to pass check-config and then fail at start: create_broker did not know it.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import websockets

from tests.certs import make_cert
from tests.helpers import ROOT, GatewayProcess, free_port, join_ack
from tests.redis_server import RedisCluster, RedisServer

pytestmark = pytest.mark.timeout(300)

PASSWORD = "pw-0123456789"
ACL = ("--user", "alice", "on", ">alice-pw", "~*", "&*", "+@all")

# (id, URL template). Fields: plain, unix, secret (requirepass), tls (TLS port), ca (its
# certificate), cluster / tls_cluster (seed lists), one_seed. "" is "no --broker flag at all".
ACCEPTED = [
    ("default", ""),
    ("memory", "memory"),
    ("memory-url", "memory://"),
    ("redis-no-db", "redis://127.0.0.1:{plain}"),
    ("redis-db0", "redis://127.0.0.1:{plain}/0"),
    ("redis-db5", "redis://127.0.0.1:{plain}/5"),
    ("redis-hostname", "redis://localhost:{plain}/0"),
    ("redis-upper-scheme", "REDIS://127.0.0.1:{plain}/0"),
    ("redis-acl-user", "redis://alice:alice-pw@127.0.0.1:{plain}/0"),
    ("redis-password", "redis://:" + PASSWORD + "@127.0.0.1:{secret}/0"),
    ("unix", "unix://{unix}"),
    ("unix-db", "unix://{unix}?db=3"),
    ("rediss-ca", "rediss://127.0.0.1:{tls}/0?ssl_ca_certs={ca}"),
    ("rediss-hostname-checked", "rediss://localhost:{tls}/0?ssl_ca_certs={ca}&ssl_check_hostname=true"),
    ("rediss-no-verify", "rediss://127.0.0.1:{tls}?ssl_cert_reqs=none"),
    ("cluster", "redis+cluster://{cluster}"),
    ("cluster-one-seed-db0", "redis+cluster://{one_seed}/0"),
    ("tls-cluster", "rediss+cluster://{tls_cluster}?ssl_ca_certs={ca}"),
]

REFUSED = [
    ("http://127.0.0.1:{plain}", "unsupported scheme 'http'"),
    ("redis+clustr://127.0.0.1:{plain}", "unsupported scheme 'redis+clustr'"),
    ("127.0.0.1:{plain}", "not a URL (no scheme://)"),
    ("redis://127.0.0.1:{plain}/x", "the Redis database 'x' is not a number"),
    ("redis://127.0.0.1:{plain}?db=1", "unsupported URL parameter 'db'"),
    ("redis://127.0.0.1:{plain}/0?socket_timeout=1", "unsupported URL parameter 'socket_timeout'"),
    ("redis://127.0.0.1:{plain}/0?ssl_cert_reqs=none", "TLS parameters need rediss://"),
    ("rediss://127.0.0.1:{tls}/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs: cannot read"),
    ("rediss://127.0.0.1:{tls}/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
    ("redis+cluster://{cluster}/2", "Redis Cluster has only database 0"),
    ("redis+cluster://", "needs at least one seed node"),
    ("unix://127.0.0.1/redis.sock", "unix:// takes a socket path, not a host"),
    ("redis://:" + PASSWORD + "@127.0.0.1:99999/0", "Port out of range"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    cert, key = make_cert(str(tmp_path_factory.mktemp("redis-tls")), cn="localhost")
    with RedisServer(unix_socket=True, extra_args=ACL) as plain, RedisServer(password=PASSWORD) as secret, \
            RedisServer(tls=(cert, key)) as tls, RedisCluster() as cluster, RedisCluster(tls=(cert, key)) as tls_cluster:
        yield {
            "plain": plain.port, "unix": plain.unix_path, "secret": secret.port, "tls": tls.tls_port, "ca": cert,
            "cluster": ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes),
            "one_seed": f"127.0.0.1:{cluster.nodes[1].port}",
            "tls_cluster": ",".join(f"127.0.0.1:{n.tls_port}" for n in tls_cluster.nodes),
        }


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _ready(gw: GatewayProcess, timeout: float = 30.0) -> None:
    """/readyz is 200 once the broker is connected (it says which part is not, while it is not)."""
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/readyz", timeout=5):
                return
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {detail}\n{gw.output()}")


async def _round_trip(gw: GatewayProcess) -> dict:
    async with websockets.connect(gw.url("/ws")) as ws:
        await ws.send(json.dumps({"op": "join", "room": "url-test", "id": 1}))
        assert join_ack(json.loads(await ws.recv())) == {"op": "ack", "id": 1}
        await ws.send(json.dumps({"op": "publish", "room": "url-test", "data": {"ok": True}, "id": 2}))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
    ack = next(r for r in replies if r["op"] == "ack")
    message = next(r for r in replies if r["op"] == "message")
    assert message["data"] == {"ok": True} and message["seq"] == ack["seq"] >= 1, replies
    return ack


@pytest.mark.parametrize("template", [t for _id, t in ACCEPTED], ids=[i for i, _t in ACCEPTED])
def test_every_url_check_config_accepts_starts(servers, template):
    url = template.format(**servers)
    flags = ["--broker", url] if url else []
    check = _cli("check-config", *flags)
    assert check.returncode == 0, check.stderr
    with GatewayProcess(*flags, "--log-level", "warning", "--redis-timeout", "3") as gw:
        _ready(gw)
        asyncio.run(_round_trip(gw))
        assert "Traceback" not in gw.output() and PASSWORD not in gw.output()


@pytest.mark.parametrize("template, message", REFUSED, ids=[m for _t, m in REFUSED])
def test_every_url_check_config_refuses_serve_refuses_alike(servers, template, message):
    url = template.format(**servers)
    check = _cli("check-config", "--broker", url)
    serve = _cli("serve", "--broker", url, "--port", str(free_port()))
    assert check.returncode == serve.returncode == 2
    assert check.stderr.splitlines()[0] == "error: --broker: broker: " + serve.stderr.splitlines()[0].split(
        "--broker: broker: ", 1)[1]
    assert message in serve.stderr and PASSWORD not in serve.stderr + check.stderr
    assert serve.stderr.splitlines() == [serve.stderr.splitlines()[0]]   # one line
