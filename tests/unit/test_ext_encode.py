"""encode_frame (RFC 6455 section 5.2) on both twins: header forms, bits, masking, round trips."""
import struct
from array import array

import pytest

from tests.ext_twins import load_cython, load_python, twin_fixture, xor_mask

encode = twin_fixture("encode")


@pytest.mark.parametrize(("n", "header"), [
    (0, b"\x82\x00"), (125, b"\x82\x7d"),
    (126, b"\x82\x7e" + struct.pack("!H", 126)), (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f" + struct.pack("!Q", 65536)), (70001, b"\x82\x7f" + struct.pack("!Q", 70001)),
])
def test_minimal_length_forms(encode, n, header):
    payload = bytes(i & 0xFF for i in range(n))
    out = encode.encode_frame(2, payload)
    assert type(out) is bytes
    assert out == header + payload


def test_defaults_are_a_final_unmasked_empty_frame(encode):
    assert encode.encode_frame(1) == b"\x81\x00"
    assert encode.encode_frame(opcode=9, payload=b"hb") == b"\x89\x02hb"


@pytest.mark.parametrize(("fin", "rsv1", "opcode", "b0"), [
    (True, False, 1, 0x81), (False, False, 1, 0x01), (False, True, 2, 0x42), (True, True, 0, 0xC0),
    (True, False, 0x1A, 0x8A),  # opcode is taken modulo 16, as the twin's `opcode & 0x0F`
])
def test_first_byte_bits(encode, fin, rsv1, opcode, b0):
    assert encode.encode_frame(opcode, b"x", fin=fin, rsv1=rsv1)[0] == b0


def test_masked_rfc_6455_section_5_7_example(encode):
    out = encode.encode_frame(1, b"Hello", mask=b"\x37\xfa\x21\x3d")
    assert out == bytes.fromhex("818537fa213d7f9f4d5158")


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 125, 126, 65536])
def test_masked_lengths(encode, n):
    payload = bytes((i * 13) & 0xFF for i in range(n))
    key = bytearray(b"\xde\xad\xbe\xef")
    out = encode.encode_frame(2, payload, mask=key)
    head = 2 if n < 126 else 4 if n < 65536 else 10
    assert out[1] & 0x80
    assert out[head:head + 4] == key
    assert out[head + 4:] == xor_mask(payload, key)


def test_bytes_like_payloads_give_immutable_bytes(encode):
    assert encode.encode_frame(2, bytearray(b"ab")) == b"\x82\x02ab"
    assert encode.encode_frame(2, memoryview(b"xaby")[1:3]) == b"\x82\x02ab"
    out = encode.encode_frame(2, memoryview(bytearray(b"ab")))
    assert type(out) is bytes


def test_length_field_counts_bytes_not_items(encode):
    # The twin used len(payload); an array("H") of 2 items is 4 bytes on the wire.
    assert encode.encode_frame(2, array("H", [1, 2])) == b"\x82\x04" + array("H", [1, 2]).tobytes()


@pytest.mark.parametrize("key", [b"abc", b"abcde", b""])
def test_mask_must_be_four_bytes(encode, key):
    with pytest.raises(ValueError, match="mask must be exactly 4 bytes"):
        encode.encode_frame(1, b"x", mask=key)


@pytest.mark.parametrize("payload", [5, "text", None])
def test_non_bytes_like_payload_is_a_type_error(encode, payload):
    with pytest.raises(TypeError):
        encode.encode_frame(1, payload)


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_round_trip_through_the_parser_of_the_same_twin(encode, n):
    frames = load_python("frames") if encode.__name__.endswith("_py") else load_cython("frames")
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    client = encode.encode_frame(2, payload, fin=False, mask=b"\x01\x10\xaa\x55")
    server = encode.encode_frame(9 if n <= 125 else 1, payload)
    assert frames.FrameParser().feed(client) == [(2, False, False, payload)]
    assert frames.FrameParser(require_mask=False).feed(server) == [(9 if n <= 125 else 1, True, False, payload)]
