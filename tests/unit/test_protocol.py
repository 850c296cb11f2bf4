"""Sans-I/O protocol: client frames in, messages and server frames out (RFC 6455 sections 5-7).

Every test runs on both twins (gateway_ext._protocol_py and _protocol_c).
"""
import os

import pytest

from gateway_ext import FrameParser, State, encode_frame
from tests.ext_twins import twin_fixture

protocol = twin_fixture("protocol")

MASK = os.urandom(4)


def cf(opcode, payload=b"", fin=True):
    """A masked client frame."""
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def sent(proto):
    """Decode what the server queued (server frames are unmasked)."""
    return FrameParser(1 << 24, require_mask=False).feed(b"".join(proto.data_to_send()))


def close_code(frames):
    (op, _, _, payload), = [f for f in frames if f[0] == 8]
    return int.from_bytes(payload[:2], "big")


def test_single_messages_and_pipelining(protocol):
    p = protocol.ServerProtocol()
    msgs = p.receive_data(cf(1, "héllo".encode()) + cf(2, b"\x00\xff") + cf(1, b"x")[:3])
    assert msgs == [(1, "héllo".encode()), (2, b"\x00\xff")]
    assert p.receive_data(cf(1, b"x")[3:]) == [(1, b"x")]


def test_fragmented_message_with_interleaved_ping(protocol):
    p = protocol.ServerProtocol()
    data = cf(1, b"ab", fin=False) + cf(9, b"p") + cf(0, b"cd", fin=False) + cf(0, b"ef")
    assert p.receive_data(data) == [(1, b"abcdef")]
    assert sent(p) == [(10, True, False, b"p")]


@pytest.mark.parametrize("data, code", [
    (cf(0, b"x"), 1002),                                   # continuation with nothing to continue
    (cf(1, b"a", fin=False) + cf(1, b"b"), 1002),          # new message inside a fragmented one
    (cf(1, b"\xc0\xaf"), 1007),                            # overlong encoding
    (cf(1, b"\xed\xa0\x80"), 1007),                        # surrogate
    (cf(1, b"\xce", fin=False) + cf(0, b"", fin=True), 1007),  # truncated at the end
    (cf(8, b"\x03"), 1002),                                # 1-byte close payload
    (cf(8, (999).to_bytes(2, "big")), 1002),               # invalid close code
    (cf(8, (1000).to_bytes(2, "big") + b"\xff"), 1007),    # invalid UTF-8 reason
    (encode_frame(1, b"unmasked"), 1002),                  # section 5.1
    (bytes([0x91, 0x80]) + MASK, 1002),                    # RSV1 without extension
    (cf(9, b"x" * 126), 1002),                             # control frame too long
])
def test_failures_send_the_right_close_code(protocol, data, code):
    p = protocol.ServerProtocol()
    assert p.receive_data(data) == []
    assert p.failed or p.close_received
    assert close_code(sent(p)) == code
    assert p.state is State.CLOSING


def test_message_too_big_across_fragments(protocol):
    p = protocol.ServerProtocol(max_message_bytes=200)
    p.receive_data(cf(2, b"a" * 150, fin=False) + cf(0, b"b" * 100))
    assert close_code(sent(p)) == 1009


def test_frame_too_big(protocol):
    p = protocol.ServerProtocol(max_message_bytes=200)
    p.receive_data(cf(2, b"a" * 201))
    assert close_code(sent(p)) == 1009


def test_valid_messages_before_a_failure_are_answered_before_the_close(protocol):
    p = protocol.ServerProtocol()
    msgs = p.receive_data(cf(1, b"first") + bytes([0x83, 0x80]) + MASK)
    assert msgs == [(1, b"first")]
    for op, payload in msgs:
        p.send(op, payload)
    frames = sent(p)
    assert [f[0] for f in frames] == [1, 8]


def test_close_handshake_initiated_by_client(protocol):
    p = protocol.ServerProtocol()
    p.receive_data(cf(8, (1001).to_bytes(2, "big") + b"bye"))
    assert p.close_received and p.close_code == 1001 and p.close_reason == "bye"
    assert close_code(sent(p)) == 1001
    assert p.wants_transport_closed
    assert p.receive_data(cf(1, b"late")) == []


def test_close_without_status_is_answered_with_1000(protocol):
    p = protocol.ServerProtocol()
    p.receive_data(cf(8))
    assert p.close_code == 1005
    assert close_code(sent(p)) == 1000


def test_close_initiated_by_server_then_data_is_discarded(protocol):
    p = protocol.ServerProtocol()
    p.close(1001, "going away")
    assert close_code(sent(p)) == 1001
    p.send(1, b"dropped")
    assert p.data_to_send() == []
    assert p.receive_data(cf(1, b"late") + cf(8, (1001).to_bytes(2, "big"))) == []
    assert p.wants_transport_closed


def test_close_reason_is_truncated_to_fit_control_frame(protocol):
    p = protocol.ServerProtocol()
    p.close(1000, "é" * 100)
    (frame,) = sent(p)
    assert len(frame[3]) <= 125
    frame[3][2:].decode("utf-8")


def test_connections_share_one_parser_between_partial_frames(protocol):
    # Idle memory: no parser of its own while reads end on frame boundaries; one while a
    # partial frame is pending, dropped again once it is complete.
    a, b = protocol.ServerProtocol(), protocol.ServerProtocol()
    assert a.receive_data(cf(1, b"one")) == [(1, b"one")]
    assert a._parser is None and b._parser is None
    fa, fb = cf(1, b"a" * 300), cf(2, b"b" * 200)
    assert a.receive_data(fa[:150]) == []
    assert b.receive_data(fb[:7]) == []         # interleaved partial frames stay apart
    assert a._parser is not None and b._parser is not None and a._parser is not b._parser
    assert b.receive_data(fb[7:] + cf(1, b"c")) == [(2, b"b" * 200), (1, b"c")]
    assert a.receive_data(fa[150:]) == [(1, b"a" * 300)]
    assert a._parser is None and b._parser is None
    assert protocol.ServerProtocol().receive_data(cf(1, b"x")) == [(1, b"x")]


def test_a_broken_stream_does_not_break_the_shared_parser(protocol):
    bad, good = protocol.ServerProtocol(), protocol.ServerProtocol()
    bad.receive_data(encode_frame(1, b"unmasked"))       # 1002: client frames must be masked
    assert bad.failed and close_code(sent(bad)) == 1002
    good.receive_data(cf(1, b"x")[:2])
    assert good.receive_data(cf(1, b"x")[2:]) == [(1, b"x")]
    bad2 = protocol.ServerProtocol()
    assert bad2.receive_data(cf(1, b"ok") + encode_frame(1, b"no")) == [(1, b"ok")]  # frames before the error
    assert bad2.failed
    assert protocol.ServerProtocol().receive_data(cf(2, b"fine")) == [(2, b"fine")]


# -- fail fast: invalid UTF-8 inside a frame that has not fully arrived (RFC 6455 section 8.1,
#    Autobahn 6.4.3/6.4.4) --------------------------------------------------------------------

def test_invalid_utf8_fails_before_the_text_frame_is_complete(protocol):
    p = protocol.ServerProtocol()
    wire = cf(1, "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"edited" * 20)   # > U+10FFFF in the middle
    assert p.receive_data(wire[:12]) == []
    assert not p.failed                              # a valid prefix so far
    assert p.receive_data(wire[12:22]) == []         # the invalid sequence has arrived
    assert p.failed and close_code(sent(p)) == 1007
    assert p.receive_data(wire[22:]) == []           # the rest is ignored


def test_invalid_utf8_fails_before_a_continuation_frame_is_complete(protocol):
    p = protocol.ServerProtocol()
    wire = cf(1, b"valid start ", fin=False) + cf(0, b"more \xc0\xaf and the rest of it")
    cut = len(cf(1, b"valid start ", fin=False)) + 2 + 4 + 8     # inside the continuation, after \xc0\xaf
    assert p.receive_data(wire[:cut]) == []
    assert p.failed and close_code(sent(p)) == 1007


def test_a_valid_text_frame_split_at_every_byte_is_delivered_once(protocol):
    text = "ascii, é, ☃, 🎉 and more ascii".encode()
    for fin_first in (True, False):
        wire = cf(1, text, fin=fin_first) + (b"" if fin_first else cf(0, text))
        p = protocol.ServerProtocol()
        got = []
        for i in range(len(wire)):                       # one byte per read
            got += p.receive_data(wire[i:i + 1])
        assert not p.failed
        assert got == [(1, text if fin_first else text + text)]


def test_binary_and_split_multibyte_characters_do_not_fail_early(protocol):
    p = protocol.ServerProtocol()
    wire = cf(2, b"\xff\xfe not text")
    assert p.receive_data(wire[:9]) == [] and not p.failed
    assert p.receive_data(wire[9:]) == [(2, b"\xff\xfe not text")]
    q = protocol.ServerProtocol()
    wire = cf(1, "é".encode() * 3)                      # cut inside the second character
    assert q.receive_data(wire[:2 + 4 + 3]) == [] and not q.failed
    assert q.receive_data(wire[9:]) == [(1, "é".encode() * 3)]


# -- fragment accounting: frames and bytes (issue 12, item 1) ---------------------------------

def close_reason(frames):
    (op, _, _, payload), = [f for f in frames if f[0] == 8]
    return payload[2:].decode()


def test_empty_continuation_frames_are_capped_by_count(protocol):
    # Empty continuations add no bytes: only the frame count stops a message that never ends.
    p = protocol.ServerProtocol(max_message_bytes=1 << 20, max_fragments=4)
    assert p.max_fragments == 4
    assert p.receive_data(cf(1, b"{", fin=False) + cf(0, b"", fin=False) * 2) == []
    assert p.receive_data(cf(0, b"", fin=False)) == [] and not p.failed      # 4 frames: at the cap
    assert p.receive_data(cf(0, b"", fin=False)) == []                         # the 5th
    frames = sent(p)
    assert close_code(frames) == 1009
    assert close_reason(frames) == "message exceeds the 4-fragment limit"
    assert p.failed


def test_a_message_of_exactly_max_fragments_frames_is_delivered(protocol):
    p = protocol.ServerProtocol(max_fragments=3)
    data = cf(2, b"a", fin=False) + cf(0, b"b", fin=False) + cf(0, b"c")
    assert p.receive_data(data * 2) == [(2, b"abc"), (2, b"abc")]   # the count restarts per message
    assert not p.failed


def test_max_fragments_must_be_positive(protocol):
    with pytest.raises(ValueError):
        protocol.ServerProtocol(max_fragments=0)


def test_many_fragments_reassemble_into_one_buffer(protocol):
    # Sizes that cross the buffer's growth steps (4 KiB first capacity, then doubling).
    rnd = __import__("random").Random(7)
    parts = [os.urandom(rnd.choice((0, 1, 7, 100, 4095, 4096, 9000))) for _ in range(300)]
    message = b"".join(parts)
    p = protocol.ServerProtocol(max_message_bytes=len(message), max_fragments=len(parts))
    wire = cf(2, parts[0], fin=False) + b"".join(cf(0, x, fin=False) for x in parts[1:-1]) + cf(0, parts[-1])
    got = []
    for i in range(0, len(wire), 65536):           # across reads, as a socket delivers it
        got += p.receive_data(wire[i:i + 65536])
    assert got == [(2, message)] and type(got[0][1]) is bytes
    assert not p.failed


def test_byte_cap_across_fragments_is_exact(protocol):
    p = protocol.ServerProtocol(max_message_bytes=300)
    assert p.receive_data(cf(2, b"a" * 100, fin=False) + cf(0, b"b" * 100, fin=False) + cf(0, b"c" * 100)) == [
        (2, b"a" * 100 + b"b" * 100 + b"c" * 100)]
    p.receive_data(cf(2, b"a" * 100, fin=False) + cf(0, b"b" * 100, fin=False) + cf(0, b"c" * 101))
    frames = sent(p)
    assert close_code(frames) == 1009
    assert close_reason(frames) == "message exceeds the 300-byte limit"



# -- pongs: at most MAX_PENDING_PONGS per read, then only the latest (issue 12, item 2) ---------

def test_each_ping_of_a_read_is_answered_up_to_the_cap(protocol):
    from gateway_ext.constants import MAX_PENDING_PONGS
    p = protocol.ServerProtocol()
    pings = [f"payload-{i}".encode() for i in range(10)]       # Autobahn 2.10
    assert MAX_PENDING_PONGS >= 10
    p.receive_data(b"".join(cf(9, x) for x in pings))
    assert [f[3] for f in sent(p)] == pings


def test_a_read_full_of_pings_queues_a_bounded_number_of_pongs(protocol):
    from gateway_ext.constants import MAX_PENDING_PONGS
    p = protocol.ServerProtocol()
    pings = [i.to_bytes(4, "big") * 31 for i in range(2000)]   # 124-byte payloads
    data = b"".join(cf(9, x) for x in pings[:1000]) + cf(1, b"text") + b"".join(cf(9, x) for x in pings[1000:])
    assert p.receive_data(data) == [(1, b"text")]
    p.send(1, b"text")
    frames = sent(p)
    pongs = [f[3] for f in frames if f[0] == 10]
    # RFC 6455 section 5.5.3: the first pings one for one, then only the most recent one.
    assert pongs == pings[:MAX_PENDING_PONGS - 1] + [pings[-1]]
    assert frames[-1] == (1, True, False, b"text")
    # The next read starts a new budget.
    p.receive_data(cf(9, b"again"))
    assert sent(p) == [(10, True, False, b"again")]
