"""UTF-8 validation (RFC 3629 section 4, required by RFC 6455 sections 5.6 and 8.1) on both twins.

Fail-fast is part of the contract: fed one byte at a time, `feed()` must turn False on
the very byte that makes the prefix invalid.
"""
import pytest

from tests.ext_twins import twin_fixture

utf8 = twin_fixture("utf8")

VALID = [
    "", "a", "\x00", "\x7f",                          # 1 byte
    "\x80", "\u07ff", "é",                            # 2 bytes, first and last
    "\u0800", "\ud7ff", "\ue000", "\uffff", "€",      # 3 bytes around the surrogate gap
    "\U00010000", "\U0010ffff", "𝄞",                  # 4 bytes, first and last
    "mixed ascii, é, €, 𝄞 and more ascii " * 5,
]

# (bytes, index of the byte at which the prefix becomes invalid)
INVALID = [
    # Overlong forms: C0/C1 can never start one; E0 needs A0..BF; F0 needs 90..BF.
    (b"\xc0\x80", 0), (b"\xc1\xbf", 0), (b"\xe0\x80\x80", 1), (b"\xe0\x9f\xbf", 1),
    (b"\xf0\x80\x80\x80", 1), (b"\xf0\x8f\xbf\xbf", 1),
    # UTF-16 surrogates U+D800..U+DFFF (ED A0..BF ..).
    (b"\xed\xa0\x80", 1), (b"\xed\xbf\xbf", 1), (b"ab\xed\xb0\x80", 3),
    # Above U+10FFFF.
    (b"\xf4\x90\x80\x80", 1), (b"\xf5\x80\x80\x80", 0), (b"\xf8\x88\x80\x80\x80", 0), (b"\xff", 0), (b"\xfe", 0),
    # Continuation byte without a lead, or one too many.
    (b"\x80", 0), (b"\xbf", 0), (b"a\x80", 1), (b"\xc3\xa9\xa9", 2), (b"\xe2\x82\xac\x80", 3),
    # A multi-byte sequence cut short by a non-continuation byte.
    (b"\xc3a", 1), (b"\xe2\x82a", 2), (b"\xf0\x9f\x98a", 3), (b"\xf0\x9fa", 2), (b"\xe2\xc3\xa9", 1),
]

TRUNCATED = [b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"abc\xf4\x8f"]


@pytest.mark.parametrize("text", VALID)
def test_valid_strings(utf8, text):
    data = text.encode()
    assert utf8.validate_utf8(data) is True
    v = utf8.Utf8Validator()
    assert v.feed(data) is True
    assert v.complete() is True


@pytest.mark.parametrize(("data", "bad"), INVALID)
def test_invalid_sequences_fail_at_the_first_bad_byte(utf8, data, bad):
    assert utf8.validate_utf8(data) is False
    v = utf8.Utf8Validator()
    results = [v.feed(data[i:i + 1]) for i in range(len(data))]
    assert results == [True] * bad + [False] * (len(data) - bad)
    assert v.complete() is False
    whole = utf8.Utf8Validator()
    assert whole.feed(data) is False


@pytest.mark.parametrize("data", TRUNCATED)
def test_truncated_sequence_is_a_valid_prefix_but_not_complete(utf8, data):
    assert utf8.validate_utf8(data) is False
    v = utf8.Utf8Validator()
    assert v.feed(data) is True
    assert v.complete() is False


@pytest.mark.parametrize("text", ["é", "€", "𝄞", "a€b𝄞c"])
def test_sequences_split_at_every_boundary(utf8, text):
    data = text.encode()
    for cut in range(len(data) + 1):
        v = utf8.Utf8Validator()
        assert v.feed(data[:cut]) is True
        assert v.complete() is (cut == 0 or data[:cut].decode("utf-8", "ignore").encode() == data[:cut])
        assert v.feed(data[cut:]) is True
        assert v.complete() is True


@pytest.mark.parametrize("pos", [0, 7, 8, 15, 16, 17, 31, 32, 33, 47, 1000, 4095])
def test_invalid_byte_inside_long_ascii_runs(utf8, pos):
    # Exercises the 32- and 16-byte ASCII skips and the 16-byte DFA blocks of the compiled twin.
    data = bytearray(b"x" * 4096)
    data[pos] = 0xFF
    assert utf8.validate_utf8(bytes(data)) is False
    data[pos:pos + 3] = "€".encode()
    assert utf8.validate_utf8(bytes(data)) is True


def test_failure_is_sticky_until_reset(utf8):
    v = utf8.Utf8Validator()
    assert v.feed(b"\xff") is False
    assert v.feed(b"valid") is False
    assert v.complete() is False
    v.reset()
    assert v.feed(b"valid") is True
    assert v.complete() is True


def test_reset_forgets_a_pending_sequence(utf8):
    v = utf8.Utf8Validator()
    assert v.feed(b"\xe2\x82") is True
    v.reset()
    assert v.complete() is True
    assert v.feed(b"\xac") is False  # a lone continuation byte after the reset


def test_accepts_bytes_like_objects(utf8):
    data = "h€llo".encode()
    assert utf8.validate_utf8(bytearray(data)) is True
    assert utf8.validate_utf8(memoryview(data)[1:4]) is True
    assert utf8.validate_utf8(memoryview(data)[1:3]) is False
    assert utf8.Utf8Validator().feed(memoryview(data)) is True


@pytest.mark.parametrize("data", [5, "text", None])
def test_non_bytes_like_is_a_type_error(utf8, data):
    with pytest.raises(TypeError):
        utf8.validate_utf8(data)
    with pytest.raises(TypeError):
        utf8.Utf8Validator().feed(data)
