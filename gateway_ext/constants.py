"""Wire constants of RFC 6455: opcodes (section 5.2) and close codes (section 7.4).

Leaf module: imports only the standard library.
"""
from enum import IntEnum


class Opcode(IntEnum):
    """Frame opcodes, RFC 6455 section 5.2 (3-7 and 11-15 are reserved)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close status codes, RFC 6455 section 7.4.1 (and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005          # never sent on the wire (section 7.4.1)
    ABNORMAL = 1006           # never sent on the wire (section 7.4.1)
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015      # never sent on the wire (section 7.4.1)


# Largest payload a control frame may carry (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD = 125

# Decompression amplification (RFC 7692 section 8.1 leaves resource limits to us): each
# message is capped at max_message_bytes, but one read can hold thousands of tiny
# compressed messages that each inflate to the cap, so the inflated total of one read is
# capped too, at this many messages' worth (at least 8 MiB).
INFLATE_BUDGET_MESSAGES = 4


def inflate_budget(max_message_bytes: int) -> int:
    """Bytes that the compressed messages of one read may inflate to, together."""
    return max(8 << 20, INFLATE_BUDGET_MESSAGES * max_message_bytes)


# Frames one fragmented message may span (RFC 6455 section 5.4 sets no limit). Counting bytes
# alone is not enough: empty continuation frames add nothing to the byte count, so without
# this a message that never ends keeps the connection busy (and, before the fragments were
# accumulated in one buffer, grew memory by every frame). Browsers send a message in one
# frame; a client that fragments a 1 MiB message in 1 KiB pieces needs 1024. Past the cap
# the connection closes with 1009 (section 7.4.1: "a message that is too big for it to
# process"; 1008 is the generic code "when there is no other more suitable status code
# (e.g., 1003 or 1009)"). Setting: `max_fragments` (--max-fragments).
MAX_FRAGMENTS = 1024

# Pongs one read may queue (RFC 6455 section 5.5.3: "If an endpoint receives a Ping frame and
# has not yet sent Pong frame(s) in response to previous Ping frame(s), the endpoint MAY elect
# to send a Pong frame for only the most recently processed Ping frame."). Up to this many
# pings of one read are answered one for one (Autobahn 2.10 sends 10 and expects 10 pongs);
# past it, the last pending pong is replaced by the latest ping's, so a read full of pings
# costs at most this many pongs, however many it holds.
MAX_PENDING_PONGS = 16


def is_valid_close_code(code: int) -> bool:
    """True when a peer may send `code` in a Close frame (RFC 6455 section 7.4).

    1005, 1006 and 1015 are reserved for local use; 1016-2999 are reserved for
    future RFCs; 3000-4999 belong to libraries and applications.
    """
    if 3000 <= code <= 4999:
        return True
    return code in _SENDABLE_RFC_CODES


_SENDABLE_RFC_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


# Life-cycle phases of a connection (gateway.connection, gateway_ext._stream_*): reading the
# request head, reading an HTTP body, HTTP response sent (ignore the rest), WebSocket open, gone.
HEAD, BODY, ANSWERED, OPEN, CLOSED = 0, 1, 2, 3, 4


class State(IntEnum):
    """Life cycle of a connection's protocol object (RFC 6455 section 7):
    OPEN -> CLOSING (a close frame was sent or received) -> CLOSED (the transport went away)."""

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


def encode_close_payload(code: int, reason: str = "") -> bytes:
    """Close frame body: 2-byte code + UTF-8 reason, at most 125 bytes (RFC 6455 section 5.5.1)."""
    if code == CloseCode.NO_STATUS:
        return b""
    raw = reason.encode("utf-8")[:123]
    # Truncating may cut a multi-byte character; drop the partial tail.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw
