"""Pure-Python twin of `_utf8_c`: incremental, fail-fast UTF-8 validation.

Text messages must be valid UTF-8 (RFC 6455 sections 5.6 and 8.1): no overlong forms,
no surrogates (U+D800-U+DFFF), nothing above U+10FFFF. A fragmented message is validated
as it arrives, and an invalid prefix fails at once instead of at the final fragment
(RFC 6455 section 8.1: "MUST _Fail the WebSocket Connection_" as soon as it is known).

The stdlib incremental decoder does the work; it already rejects every invalid byte as
soon as it sees it, except a surrogate lead pair (ED A0..BF), which it only reports when
the third byte arrives -- `_pending_ok` closes that gap so both twins fail at the same byte.
Imports only the standard library.
"""
import codecs

_Decoder = codecs.getincrementaldecoder("utf-8")


def validate_utf8(data) -> bool:
    """True when `data` is one complete, valid UTF-8 string."""
    try:
        str(data, "utf-8")  # bytes-like only: bytes(5) would "validate" five NUL bytes
    except UnicodeDecodeError:
        return False
    return True


def _pending_ok(pending: bytes) -> bool:
    # ED followed by A0..BF would encode a UTF-16 surrogate (RFC 3629 section 4).
    return not (len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0)


class Utf8Validator:
    """Validates a UTF-8 stream fed in arbitrary chunks.

    `feed(chunk)` returns False as soon as the bytes seen so far cannot be the start
    of valid UTF-8 and keeps returning False until `reset()`. `complete()` is True when
    no multi-byte sequence is left unfinished (check it on the final fragment).
    """

    __slots__ = ("_decoder", "_failed")

    def __init__(self) -> None:
        self._decoder = _Decoder("strict")
        self._failed = False

    def feed(self, data) -> bool:
        if self._failed:
            return False
        try:
            self._decoder.decode(data, False)  # bytes-like only, as in validate_utf8
        except UnicodeDecodeError:
            self._failed = True
            return False
        if not _pending_ok(self._decoder.getstate()[0]):
            self._failed = True
            return False
        return True

    def complete(self) -> bool:
        return not self._failed and self._decoder.getstate()[0] == b""

    def reset(self) -> None:
        self._decoder.reset()
        self._failed = False
