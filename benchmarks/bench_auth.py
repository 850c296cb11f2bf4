"""Costs of authentication and the defences: per handshake (token verification, Origin,
client address) and per socket read (the inbound rate limiter on the hot path).

    pytest benchmarks/bench_auth.py --benchmark-only -q

The `data_received` group feeds the real Connection.data_received (protocol, frame parser,
endpoint call) with and without a TokenBucket, so the difference is the limiter's price
per read; the batch of 16 messages shows it does not grow with the number of messages.
"""
from __future__ import annotations

import pytest

from gateway.security.auth import Authenticator
from gateway.server.connection import OPEN, Connection
from gateway.ws.handshake import parse_request
from gateway.security.limits import ClientAddress, OriginPolicy, TokenBucket
from gateway.ws.protocol import ServerProtocol
from gateway.server.process import Stats
from gateway_ext import encode_frame
from tests import auth_tokens as t


class _Transport:
    def write(self, data):
        pass

    def writelines(self, data):
        pass


class _Gateway:
    def __init__(self):
        self.stats = Stats()
        self.clock = 0.0


class _Endpoint:
    def on_messages(self, conn, messages):
        pass


def _connection(limited: bool) -> Connection:
    conn = Connection(_Gateway())
    conn.transport = _Transport()
    conn.ws = ServerProtocol(1 << 20)
    conn.endpoint = _Endpoint()
    conn.phase = OPEN
    if limited:
        # A budget that never runs out during the benchmark: we measure the bookkeeping.
        conn.limiter = TokenBucket(rate=1e12, burst=1e12, exceeded=None)
    return conn


@pytest.mark.benchmark(group="data_received")
@pytest.mark.parametrize("messages", [1, 16])
@pytest.mark.parametrize("limited", [False, True], ids=["no-limiter", "token-bucket"])
def test_data_received(benchmark, limited, messages):
    conn = _connection(limited)
    data = b"".join(encode_frame(1, b'{"op":"publish","room":"r","data":1}', mask=b"abcd") for _ in range(messages))
    benchmark(conn.data_received, data)


@pytest.mark.benchmark(group="bucket")
def test_token_bucket_take(benchmark):
    bucket = TokenBucket(rate=1e12, burst=1e12)
    benchmark(bucket.take, 1)


AUTHS = {
    "HS256": (lambda: Authenticator(secret=t.SECRET), t.hs256),
    "RS256": (lambda: Authenticator(public_key_pem=t.RSA_PUBLIC_PEM), t.rs256),
    "ES256": (lambda: Authenticator(public_key_pem=t.EC_PUBLIC_PEM), t.es256),
}


@pytest.mark.benchmark(group="authenticate")
@pytest.mark.parametrize("alg", sorted(AUTHS))
def test_authenticate(benchmark, alg):
    make_auth, make_token = AUTHS[alg]
    auth = make_auth()
    request = parse_request(f"GET /ws?token={make_token(rooms=['chat:*'])} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    principal = benchmark(auth.authenticate, request)
    assert principal.can_join("chat:1")


@pytest.mark.benchmark(group="handshake-checks")
def test_origin_check(benchmark):
    policy = OriginPolicy(["https://app.example.com", "https://*.example.org"])
    assert benchmark(policy.check, "https://a.example.org") is None


@pytest.mark.benchmark(group="handshake-checks")
def test_client_address(benchmark):
    addresses = ClientAddress(["127.0.0.1", "10.0.0.0/8"])
    assert benchmark(addresses.resolve, "127.0.0.1:5555", "203.0.113.9, 10.1.1.1") == "203.0.113.9"
