"""Sans-I/O handshake: bytes in, Request or HandshakeRejected(status) out."""
import pytest

from gateway.errors import HandshakeRejected
from gateway.ws.handshake import MAX_HEADERS, accept, accept_key, parse_request, select_subprotocol, validate_upgrade
from tests.helpers import upgrade_request


def test_rfc6455_sample_accept_key():
    # RFC 6455 section 1.3 worked example.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_parse_waits_for_blank_line():
    assert parse_request(b"GET /echo HTTP/1.1\r\nHost: x\r\n") is None


def test_valid_upgrade_parses_and_validates():
    req = parse_request(upgrade_request("/echo?token=abc", extra="X-Thing: a\r\nX-Thing: b\r\n"))
    assert req.path == "/echo" and req.query == "token=abc"
    assert req.headers["x-thing"] == "a, b"
    assert validate_upgrade(req) == "dGhlIHNhbXBsZSBub25jZQ=="
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accept("dGhlIHNhbXBsZSBub25jZQ==")


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    (b"GET echo HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\n\r\n", 400),              # no Host (RFC 9112 section 3.2)
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-A: " + b"b" * 20000, 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
])
def test_malformed_heads_are_rejected_with_status(raw, status):
    with pytest.raises(HandshakeRejected) as exc:
        parse_request(raw)
    assert exc.value.status == status
    assert exc.value.reason


@pytest.mark.parametrize("mutate, status", [
    (lambda r: r.replace(b"GET", b"POST"), 405),
    (lambda r: r.replace(b"Upgrade: websocket\r\n", b""), 426),
    (lambda r: r.replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400),
    (lambda r: r.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    (lambda r: r.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="), 400),
    (lambda r: r.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!notbase64!!!!!!!!!!!"), 400),
])
def test_invalid_upgrades(mutate, status):
    req = parse_request(mutate(upgrade_request()))
    with pytest.raises(HandshakeRejected) as exc:
        validate_upgrade(req)
    assert exc.value.status == status
    if status == 426 and "Version" in exc.value.reason:
        assert exc.value.headers["Sec-WebSocket-Version"] == "13"


def test_connection_header_token_list():
    req = parse_request(upgrade_request().replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"))
    validate_upgrade(req)


def test_subprotocol_selection_prefers_server_order():
    req = parse_request(upgrade_request(extra="Sec-WebSocket-Protocol: a, ws-gateway.msgpack, ws-gateway.json\r\n"))
    assert select_subprotocol(req, ("ws-gateway.json", "ws-gateway.msgpack")) == "ws-gateway.json"
    assert select_subprotocol(req, ("other",)) is None
