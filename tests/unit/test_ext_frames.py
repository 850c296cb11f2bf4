"""FrameParser on both twins: every per-frame rule of RFC 6455 section 5, chunking, errors.

Frames are built by hand with `build_frame` (not encode_frame) so rules can be broken.
"""
import pytest

from gateway_ext.errors import FrameError
from tests.ext_twins import build_frame, twin_fixture, xor_mask

frames = twin_fixture("frames")


def parse_all(mod, data, **config):
    return mod.FrameParser(**config).feed(data)


def expect_error(mod, data, code, reason, **config):
    parser = mod.FrameParser(**config)
    with pytest.raises(FrameError) as info:
        parser.feed(data)
    assert (info.value.code, info.value.reason) == (code, reason)
    assert parser.error is info.value
    assert parser.buffered == 0
    return parser


# -- well-formed frames ---------------------------------------------------------------

def test_one_masked_text_frame(frames):
    # RFC 6455 section 5.7: masked "Hello" from a client.
    data = bytes.fromhex("818537fa213d7f9f4d5158")
    result = parse_all(frames, data)
    assert result == [(1, True, False, b"Hello")]
    opcode, fin, rsv1, payload = result[0]
    assert (type(opcode), type(fin), type(rsv1), type(payload)) == (int, bool, bool, bytes)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_length_boundaries_of_the_7_16_64_bit_forms(frames, n):
    payload = bytes(i & 0xFF for i in range(n))
    data = build_frame(2, payload, mask=b"\xa1\xb2\xc3\xd4")
    assert len(data) - n == 4 + (2 if n < 126 else 4 if n < 65536 else 10)
    assert parse_all(frames, data) == [(2, True, False, payload)]


@pytest.mark.parametrize("form", [16, 64])
def test_non_minimal_length_encodings_are_accepted(frames, form):
    # Section 5.2 asks senders for the minimal form; like the twin we do not fail on it.
    assert parse_all(frames, build_frame(1, b"hi", length_form=form)) == [(1, True, False, b"hi")]


def test_zero_length_payloads(frames):
    data = build_frame(1, b"") + build_frame(9, b"") + build_frame(0, b"", fin=True)
    assert parse_all(frames, data) == [(1, True, False, b""), (9, True, False, b""), (0, True, False, b"")]
    assert parse_all(frames, build_frame(2, b"", mask=None), require_mask=False) == [(2, True, False, b"")]


def test_unmasked_frames_when_mask_is_not_required(frames):
    assert parse_all(frames, build_frame(2, b"srv", mask=None), require_mask=False) == [(2, True, False, b"srv")]


def test_fragments_and_controls_pass_through(frames):
    data = (build_frame(1, b"fra", fin=False) + build_frame(9, b"ping") + build_frame(0, b"g", fin=False)
            + build_frame(10, b"") + build_frame(0, b"ment") + build_frame(8, b"\x03\xe8bye"))
    assert parse_all(frames, data) == [
        (1, False, False, b"fra"), (9, True, False, b"ping"), (0, False, False, b"g"),
        (10, True, False, b""), (0, True, False, b"ment"), (8, True, False, b"\x03\xe8bye"),
    ]


def test_control_payload_of_exactly_125_bytes(frames):
    assert parse_all(frames, build_frame(9, b"p" * 125)) == [(9, True, False, b"p" * 125)]


def test_rsv1_after_negotiation_on_first_data_frame(frames):
    data = build_frame(1, b"deflated", rsv=0b100, fin=False)
    assert parse_all(frames, data, allow_rsv1=True) == [(1, False, True, b"deflated")]


def test_config_is_settable_between_reads(frames):
    parser = frames.FrameParser()
    assert (parser.max_frame_bytes, parser.require_mask, parser.allow_rsv1) == (1 << 20, True, False)
    parser.allow_rsv1 = True           # permessage-deflate negotiated after construction
    assert parser.feed(build_frame(2, b"x", rsv=0b100)) == [(2, True, True, b"x")]
    parser.max_frame_bytes = 3
    assert parser.max_frame_bytes == 3
    assert parser.feed(build_frame(2, b"abc")) == [(2, True, False, b"abc")]
    with pytest.raises(FrameError) as info:
        parser.feed(build_frame(2, b"abcd"))
    assert (info.value.code, info.value.reason) == (1009, "frame of 4 bytes exceeds the 3-byte limit")


def test_limit_change_applies_to_a_frame_already_partly_buffered(frames):
    parser = frames.FrameParser(max_frame_bytes=100)
    data = build_frame(2, b"z" * 50)
    assert parser.feed(data[:10]) == []
    parser.max_frame_bytes = 20
    with pytest.raises(FrameError) as info:
        parser.feed(data[10:])
    assert info.value.reason == "frame of 50 bytes exceeds the 20-byte limit"


def test_unbounded_limit(frames):
    parser = frames.FrameParser(max_frame_bytes=float("inf"))
    assert parser.feed(build_frame(2, b"q" * 70000)) == [(2, True, False, b"q" * 70000)]


# -- chunking and buffering -------------------------------------------------------------

def test_many_frames_in_one_read_and_a_partial_tail(frames):
    parts = [build_frame(1, bytes([65 + i]) * i) for i in range(16)]
    tail = build_frame(2, b"tail" * 40)
    parser = frames.FrameParser()
    got = parser.feed(b"".join(parts) + tail[:7])
    assert got == [(1, True, False, bytes([65 + i]) * i) for i in range(16)]
    assert parser.buffered == 7
    assert parser.feed(tail[7:]) == [(2, True, False, b"tail" * 40)]
    assert parser.buffered == 0


def test_byte_by_byte(frames):
    raw = [build_frame(1, b"a" * 130), build_frame(2, b"b" * 3), build_frame(2, b"c" * 70000)]
    data = b"".join(raw)
    parser = frames.FrameParser()
    got = []
    for i in range(len(data)):
        got += parser.feed(data[i:i + 1])
        # Everything fed so far, minus the frames already returned, is still buffered.
        assert parser.buffered == i + 1 - sum(len(f) for f in raw[:len(got)])
    assert got == [(1, True, False, b"a" * 130), (2, True, False, b"bbb"), (2, True, False, b"c" * 70000)]
    assert parser.buffered == 0


def test_buffered_counts_unparsed_bytes(frames):
    data = build_frame(2, b"x" * 300)
    parser = frames.FrameParser()
    for i, cut in enumerate((1, 3, 8, 200)):
        assert parser.feed(data[(0, 1, 3, 8)[i]:cut]) == []
        assert parser.buffered == cut
    assert parser.feed(data[200:]) == [(2, True, False, b"x" * 300)]
    assert parser.buffered == 0


def test_accepts_bytearray_and_unaligned_memoryview(frames):
    data = build_frame(2, bytes(range(200)), mask=b"\x99\x88\x77\x66")
    padded = b"?" + data + b"?"
    parser = frames.FrameParser()
    assert parser.feed(memoryview(padded)[1:60]) == []
    assert parser.feed(bytearray(padded[60:-1])) == [(2, True, False, bytes(range(200)))]


def test_16_mib_frame_in_64_kib_chunks(frames):
    payload = bytes(range(256)) * (1 << 16)
    key = b"\x5a\xa5\x0f\xf0"
    data = build_frame(2, payload, mask=key)
    parser = frames.FrameParser(max_frame_bytes=16 << 20)
    got = []
    for i in range(0, len(data), 65536):
        got += parser.feed(data[i:i + 65536])
    assert len(got) == 1 and got[0][3] == payload
    assert parser.buffered == 0
    assert xor_mask(payload, key) == data[14:]


# -- every per-frame rule, with the exact code and reason -------------------------------

@pytest.mark.parametrize(("rsv", "opcode", "reason"), [
    (0b010, 1, "reserved bits RSV2/RSV3 must be 0"),
    (0b001, 1, "reserved bits RSV2/RSV3 must be 0"),
    (0b111, 1, "reserved bits RSV2/RSV3 must be 0"),
    (0b100, 1, "reserved bit RSV1 set without a negotiated extension"),
])
def test_reserved_bits(frames, rsv, opcode, reason):
    expect_error(frames, build_frame(opcode, b"x", rsv=rsv), 1002, reason)


@pytest.mark.parametrize("opcode", [0, 8, 9, 10])
def test_rsv1_is_never_allowed_on_continuation_or_control_frames(frames, opcode):
    # RFC 7692 section 6.1: RSV1 marks the first frame of a compressed message only.
    expect_error(frames, build_frame(opcode, b"x", rsv=0b100), 1002,
                 "reserved bit RSV1 set without a negotiated extension", allow_rsv1=True)


@pytest.mark.parametrize("opcode", range(3, 8))
def test_reserved_data_opcodes(frames, opcode):
    expect_error(frames, build_frame(opcode, b"x"), 1002, f"reserved data opcode {opcode:#x}")


@pytest.mark.parametrize("opcode", range(0xB, 0x10))
def test_reserved_control_opcodes(frames, opcode):
    expect_error(frames, build_frame(opcode, b"x"), 1002, f"reserved control opcode {opcode:#x}")


@pytest.mark.parametrize("opcode", [8, 9, 10])
def test_fragmented_control_frame(frames, opcode):
    expect_error(frames, build_frame(opcode, b"x", fin=False), 1002, "fragmented control frame")


@pytest.mark.parametrize(("n", "form"), [(126, None), (5, 16), (5, 64)])
def test_control_frame_longer_than_125(frames, n, form):
    # Judged on the 7-bit field: the 16/64-bit forms are themselves too long for a control frame.
    expect_error(frames, build_frame(9, b"p" * n, length_form=form), 1002,
                 "control frame payload longer than 125 bytes")


def test_unmasked_client_frame(frames):
    expect_error(frames, build_frame(1, b"hi", mask=None), 1002, "client frame is not masked")


def test_masked_server_frame(frames):
    expect_error(frames, build_frame(1, b"hi"), 1002, "server frame is masked", require_mask=False)


def test_64_bit_length_with_the_most_significant_bit(frames):
    data = build_frame(2, b"", length=(1 << 63) | 5, length_form=64)
    expect_error(frames, data, 1002, "payload length has the most significant bit set")


@pytest.mark.parametrize(("limit", "n"), [(0, 1), (125, 126), (65535, 65536), (1 << 20, (1 << 20) + 1)])
def test_frame_over_the_size_limit_is_1009_before_the_payload_arrives(frames, limit, n):
    header = build_frame(2, b"", length=n)   # only the header: the payload never comes
    expect_error(frames, header, 1009, f"frame of {n} bytes exceeds the {limit}-byte limit", max_frame_bytes=limit)


@pytest.mark.parametrize(("n", "form"), [(300, 16), (300, 64)])
def test_extended_length_is_judged_only_once_complete(frames, n, form):
    # Byte by byte: the size cap may only fire once the last length byte is in.
    header = build_frame(2, b"", length=n, length_form=form)[:4 if form == 16 else 10]  # no key
    parser = frames.FrameParser(max_frame_bytes=n - 1)
    for i in range(len(header) - 1):
        assert parser.feed(header[i:i + 1]) == []
    with pytest.raises(FrameError) as info:
        parser.feed(header[-1:])
    assert info.value.reason == f"frame of {n} bytes exceeds the {n - 1}-byte limit"


def test_frame_of_exactly_the_limit(frames):
    assert parse_all(frames, build_frame(2, b"m" * 200), max_frame_bytes=200) == [(2, True, False, b"m" * 200)]


def test_header_rules_are_judged_on_the_first_two_bytes(frames):
    parser = frames.FrameParser()
    with pytest.raises(FrameError) as info:
        parser.feed(build_frame(3, b"x" * 1000)[:2])
    assert info.value.reason == "reserved data opcode 0x3"


@pytest.mark.parametrize(("data", "reason"), [
    # RSV2 beats everything else; RSV1 beats the opcode; the opcode beats the mask; control
    # length beats the mask.
    (build_frame(0xB, b"x", rsv=0b110, fin=False, mask=None), "reserved bits RSV2/RSV3 must be 0"),
    (build_frame(0xB, b"x", rsv=0b100, mask=None), "reserved bit RSV1 set without a negotiated extension"),
    (build_frame(0xB, b"x", fin=False, mask=None), "reserved control opcode 0xb"),
    (build_frame(9, b"x" * 200, fin=False, mask=None), "fragmented control frame"),
    (build_frame(9, b"x" * 200, mask=None), "control frame payload longer than 125 bytes"),
    (build_frame(4, b"x", mask=None), "reserved data opcode 0x4"),
])
def test_rules_are_checked_in_the_twins_order(frames, data, reason):
    expect_error(frames, data, 1002, reason)


# -- error handling ----------------------------------------------------------------------

def test_frames_before_an_invalid_one_are_returned_and_the_error_kept(frames):
    # RFC 6455 section 7.1.7: the peer's valid messages are handled before failing.
    parser = frames.FrameParser()
    data = build_frame(1, b"one") + build_frame(2, b"two") + build_frame(1, b"bad", mask=None) + build_frame(1, b"3")
    assert parser.feed(data) == [(1, True, False, b"one"), (2, True, False, b"two")]
    assert (parser.error.code, parser.error.reason) == (1002, "client frame is not masked")
    assert parser.buffered == 0
    with pytest.raises(FrameError) as info:
        parser.feed(build_frame(1, b"later"))
    assert info.value is parser.error


def test_a_dead_parser_raises_the_same_error_forever(frames):
    parser = expect_error(frames, build_frame(7, b""), 1002, "reserved data opcode 0x7")
    first = parser.error
    for _ in range(2):
        with pytest.raises(FrameError) as info:
            parser.feed(b"")
        assert info.value is first


def test_empty_feed(frames):
    parser = frames.FrameParser()
    assert parser.feed(b"") == []
    assert parser.buffered == 0


@pytest.mark.parametrize("data", [5, "text", None])
def test_non_bytes_like_is_a_type_error(frames, data):
    with pytest.raises(TypeError):
        frames.FrameParser().feed(data)


# -- peek_payload: the frame still arriving (for fail-fast UTF-8, RFC 6455 section 8.1) ------

def test_peek_payload_of_the_incomplete_frame(frames):
    payload = "naïve café, 你好".encode() * 20            # 126+ bytes: the 16-bit length form
    wire = build_frame(1, payload, mask=b"\x11\x22\x33\x44")
    header = len(wire) - len(payload)
    p = frames.FrameParser()
    assert p.peek_payload() is None                      # nothing buffered
    p.feed(wire[:3])
    assert p.peek_payload() is None                      # header not complete yet
    for cut in (header, header + 1, header + 7, len(wire) - 1):
        p = frames.FrameParser()
        assert p.feed(wire[:cut]) == []
        got = cut - header
        for start in (0, 1, 2, 3, 4, 9):
            assert p.peek_payload(start) == (1, False, payload[start:max(start, got)])


@pytest.mark.parametrize("start", [-1, -2, -4, -5, -(1 << 40)])
def test_peek_payload_clamps_a_negative_start_to_zero(frames, start):
    # Both twins alike (the Python one used to slice into the header and unmask it with the
    # wrong key phase): a negative offset means "from the start of the payload".
    payload = b"hello, world"
    for mask in (b"\x11\x22\x33\x44", None):
        p = frames.FrameParser(require_mask=mask is not None)
        p.feed(build_frame(1, payload, mask=mask)[:-3])
        assert p.peek_payload(start) == p.peek_payload(0) == (1, False, payload[:-3])


def test_peek_payload_sees_only_the_frame_after_the_complete_ones(frames):
    first = build_frame(2, b"done", mask=b"abcd")
    second = build_frame(0, b"\xff\xfe rest", fin=True, mask=b"wxyz")
    p = frames.FrameParser()
    assert p.feed(first + second[:9]) == [(2, True, False, b"done")]
    assert p.peek_payload(0) == (0, False, b"\xff\xfe ")
    assert p.peek_payload(2) == (0, False, b" ")
    p.feed(second[9:])
    assert p.peek_payload() is None and p.buffered == 0


def test_peek_payload_of_an_unmasked_frame_and_a_dead_parser(frames):
    p = frames.FrameParser(require_mask=False)
    p.feed(build_frame(1, b"hello", mask=None)[:5])
    assert p.peek_payload(1) == (1, False, b"el")
    dead = frames.FrameParser()
    with pytest.raises(FrameError):
        dead.feed(build_frame(1, b"x", mask=None))     # unmasked client frame
    assert dead.peek_payload() is None
