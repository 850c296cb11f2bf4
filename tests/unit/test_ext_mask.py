"""apply_mask (RFC 6455 section 5.3) on both twins: vectors, every tail length, buffers, errors."""
from array import array

import pytest

from tests.ext_twins import twin_fixture, xor_mask

mask = twin_fixture("mask")

KEY = b"\x37\xfa\x21\x3d"


def test_rfc_6455_section_5_7_example(mask):
    # "A single-frame masked text message" carrying "Hello".
    assert mask.apply_mask(b"Hello", KEY) == bytes.fromhex("7f9f4d5158")


@pytest.mark.parametrize("n", [*range(0, 41), 63, 64, 65, 1000, 4099])
def test_every_length_matches_the_reference(mask, n):
    # Covers the 32-byte, 8-byte and byte-tail loops of the compiled twin.
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    out = mask.apply_mask(data, KEY)
    assert type(out) is bytes
    assert out == xor_mask(data, KEY)
    assert mask.apply_mask(out, KEY) == data  # masking is an involution


@pytest.mark.parametrize("offset", [1, 2, 3, 5, 7])
def test_unaligned_memoryview_slices(mask, offset):
    raw = bytes(range(256)) * 3
    view = memoryview(raw)[offset:offset + 301]
    assert mask.apply_mask(view, memoryview(KEY * 2)[offset % 4:offset % 4 + 4]) == xor_mask(
        raw[offset:offset + 301], (KEY * 2)[offset % 4:offset % 4 + 4])


def test_accepts_any_bytes_like_and_returns_new_bytes(mask):
    data = bytearray(b"payload bytes, 29 bytes long.")
    out = mask.apply_mask(data, bytearray(KEY))
    assert type(out) is bytes and out == xor_mask(bytes(data), KEY)
    assert data == bytearray(b"payload bytes, 29 bytes long.")  # input untouched
    assert mask.apply_mask(memoryview(data), KEY) == out


def test_multibyte_item_buffers_are_masked_bytewise(mask):
    data = array("H", [0x0102, 0x0304, 0x0506])
    assert mask.apply_mask(data, KEY) == xor_mask(data.tobytes(), KEY)


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_mask_must_be_four_bytes(mask, key):
    with pytest.raises(ValueError, match="mask must be exactly 4 bytes"):
        mask.apply_mask(b"data", key)


@pytest.mark.parametrize("data", [5, "text", None])
def test_non_bytes_like_data_is_a_type_error(mask, data):
    with pytest.raises(TypeError):
        mask.apply_mask(data, KEY)
