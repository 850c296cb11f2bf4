"""The load tool's compiled client (benchmarks/loadtool/_fastclient.pyx) against its
pure-Python reference twins, property by property (hypothesis):

- `last_k`: the subscriber's count rule (fanout.last_k) on arbitrary server output cut
  at arbitrary points, with marks split across reads and decoys;
- `publication`: the masked publish frame equals wsclient.client_frame(prefix +
  fanout.data_of(k, size) + "}") byte for byte, and the server-side parser unmasks it to
  valid JSON with the right k;
- `head_ok`: accepts exactly the 101 heads that wsclient.check_response accepts.

Skips (with the reason) when the extension is not built.
"""
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from benchmarks.loadtool import fanout, fastclient, wsclient
from gateway_ext import FrameParser, Opcode, encode_frame

fc = fastclient.module()
pytestmark = pytest.mark.skipif(fc is None, reason="benchmarks/loadtool/_fastclient not built "
                                                   "(python setup.py build_ext --inplace)")

_pieces = st.one_of(
    st.integers(0, 10**15).map(lambda k: b'{"op":"message","room":"r","data":{"k":%d,"p":"xx"}}' % k),
    st.sampled_from([b'"k":', b'"k":,', b'"k":12', b'"k":1x,', b'"', b'"k"', b",", b"k", b":"]),
    st.binary(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12), st.integers(0, 400))
def test_last_k_matches_python_rule(pieces, cut):
    data = b"".join(pieces)
    for buf in (data, data[:cut], data[cut:]):
        assert fc.last_k(buf) == fanout.last_k(buf)


def test_last_k_examples():
    assert fc.last_k(b'..."k":7,"p":"" ..."k":8,') == 8
    assert fc.last_k(b'..."k":7,"p":"" ..."k":8') == 7      # the last mark is cut off
    assert fc.last_k(b'no mark') == -1
    assert fc.last_k(b'"k":') == -1


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(0, 10**12), st.integers(0, 70000), st.binary(min_size=4, max_size=4))
def test_publication_matches_python_frame(room, k, size, mask):
    prefix = b'{"op":"publish","room":' + orjson.dumps(room) + b',"data":'
    payload = prefix + fanout.data_of(k, size) + b"}"
    expected = wsclient.client_frame(Opcode.TEXT, payload, mask)
    assert fc.publication(prefix, k, size, mask) == expected
    [(opcode, fin, _rsv, got)] = FrameParser(1 << 20, require_mask=True).feed(expected)
    assert opcode == Opcode.TEXT and fin
    assert orjson.loads(got)["data"]["k"] == k


def _python_ok(head, accept):
    try:
        wsclient.check_response(head, accept)
    except wsclient.HandshakeError:
        return False
    return True


_header_names = st.sampled_from(["Upgrade", "Connection", "Sec-WebSocket-Accept", "sec-websocket-accept",
                                 "SEC-WEBSOCKET-ACCEPT", "Sec-WebSocket-Acceptx", "Server", "X"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"101", b"200", b"400", b"1010"]),
       st.lists(st.tuples(_header_names, st.booleans(), st.sampled_from(["", " ", "  "])), max_size=5))
def test_head_ok_matches_check_response(status, headers):
    key = wsclient.new_key()
    accept = wsclient.accept_for(key)
    lines = [b"HTTP/1.1 " + status + b" Switching Protocols"]
    for name, right, space in headers:
        value = accept if right else wsclient.accept_for(wsclient.new_key())
        lines.append(name.encode() + b":" + space.encode() + value + space.encode())
    head = b"\r\n".join(lines)
    assert (fc.head_ok(head, accept) == 1) == _python_ok(head, accept)


def _play_echo_server(sock, script, seen):
    """A blocking echo server on one end of a socketpair: echoes data frames unmasked; after
    `script[0]` echoes sends a ping (split across two writes), after `script[1]` a close."""
    import threading

    def serve():
        parser = FrameParser(1 << 20, require_mask=True)
        echoed = 0
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for opcode, fin, _rsv, payload in parser.feed(data):
                    if opcode == Opcode.TEXT and echoed < script[1]:   # nothing after our close
                        out = encode_frame(Opcode.TEXT, payload)
                        echoed += 1
                        if echoed == script[0]:
                            ping = encode_frame(Opcode.PING, b"are you there")
                            out += ping[:1]
                            sock.sendall(out)
                            out = ping[1:]
                        if echoed == script[1]:
                            out += encode_frame(Opcode.CLOSE, (1001).to_bytes(2, "big"))
                        sock.sendall(out)
                    elif opcode != Opcode.TEXT:
                        seen.append((opcode, payload))
        except OSError:
            return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_run_echo_answers_ping_and_close_over_a_real_socket():
    import socket

    client, server = socket.socketpair()
    client.setblocking(False)
    mask = b"\x11\x22\x33\x44"
    payload = b"0123456789abcdefghijklmnopqrstuv"
    seen, errors = [], []
    thread = _play_echo_server(server, (50, 400), seen)
    out = fc.run_echo([client.fileno()], [wsclient.client_frame(Opcode.TEXT, payload, mask)], [mask],
                      wsclient.server_frame(Opcode.TEXT, payload), 4, 0.0, 1.0, 1.0,
                      lambda: None, lambda: None, errors.append)
    client.close()
    thread.join(5)
    server.close()
    assert errors == ["server closed the connection (1001)"]
    assert (Opcode.PONG, b"are you there") in seen          # unmasked by the server's parser
    assert (Opcode.CLOSE, (1000).to_bytes(2, "big")) in seen
    alive, closing, partial, slow, sent, recv = out["states"][0]
    assert closing and recv == 400 and out["count"] == 400
    assert recv <= sent <= recv + 4       # at most K in flight; none replaced after the close


_ECHO_PAYLOAD = b"0123456789abcdefghijklmnopqrstuv"

# What a server may send an echo client: exact echoes, pings and pongs, a differently sized
# data frame (a fragment or another message; counted when fin, as the Python client does),
# and at most one close at the end. Not generated: a data frame of the echo's exact size with
# other content, which the compiled client rejects as a wrong echo (the Python client counts it).
_server_frame = st.one_of(
    st.just(("echo", b"")),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("pong"), st.binary(max_size=20)),
    st.tuples(st.sampled_from(["text", "binary", "cont", "frag"]),
              st.binary(max_size=300).filter(lambda b: len(b) != len(_ECHO_PAYLOAD))),
)


def _server_bytes(kind, payload):
    if kind == "echo":
        return encode_frame(Opcode.TEXT, _ECHO_PAYLOAD)
    opcode = {"ping": Opcode.PING, "pong": Opcode.PONG, "text": Opcode.TEXT, "binary": Opcode.BINARY,
              "cont": Opcode.CONTINUATION, "frag": Opcode.TEXT}[kind]
    return encode_frame(opcode, payload, fin=kind != "frag")


@settings(max_examples=300, deadline=None)
@given(st.lists(_server_frame, max_size=30), st.booleans(), st.lists(st.integers(0, 200), max_size=12))
def test_echo_counter_matches_the_python_client(frames, close_at_end, cuts):
    import asyncio

    from benchmarks.loadtool import echo, stats

    stream = b"".join(_server_bytes(k, p) for k, p in frames)
    if close_at_end:
        stream += encode_frame(Opcode.CLOSE, (1001).to_bytes(2, "big"))
    points = sorted({min(c * 7, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]

    class Transport:
        def __init__(self):
            self.written = []

        def write(self, data):
            self.written.append(bytes(data))

        def abort(self):
            pass

        def is_closing(self):
            return False

    async def python_side():
        result = stats.WorkerResult()
        shared = echo._Shared(result)
        shared.sending = False               # count only: no replacement writes to compare
        proto = echo.EchoProtocol(shared, Opcode.TEXT, _ECHO_PAYLOAD, inflight=1)
        proto.connection_made(Transport())
        counts, controls = [], []
        for chunk in chunks:
            before, seen = shared.received, len(proto.transport.written)
            proto.data_received(chunk)
            counts.append(shared.received - before)
            controls.append(b"".join(proto.transport.written[seen:]))
        return proto.mask, counts, controls, result.errors

    mask, counts, controls, errors = asyncio.run(python_side())
    c_counts, c_controls, c_errors = fc.count_echoes(wsclient.server_frame(Opcode.TEXT, _ECHO_PAYLOAD), mask, chunks)
    assert c_counts == counts
    assert c_controls == controls                # the same masked pongs and close answer, in the same read
    assert len(c_errors) == errors
