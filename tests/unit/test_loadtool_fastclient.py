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
from gateway_ext import FrameParser, Opcode

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
