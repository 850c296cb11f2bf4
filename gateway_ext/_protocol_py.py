"""Pure-Python twin of `_protocol_c`: the sans-I/O WebSocket server protocol.

Bytes in, messages out; frames to send accumulate (RFC 6455 sections 5-7):

    receive_data(bytes) -> [ (opcode, payload), ... ]   complete text/binary messages
    send(opcode, payload) / send_frame(frame_bytes)     queue outgoing frames (corked)
    data_to_send() -> [bytes, ...]                      everything queued, in order
    close(code, reason)                                 start the closing handshake

Theory of operation. The frame parser cuts frames and enforces per-frame rules; this class
enforces everything that spans frames: fragment sequencing (section 5.4), UTF-8 across
fragments (section 8.1), the message caps, and the closing handshake (sections 5.5.1, 7).
Pings are answered here (section 5.5.2); the answer joins the same corked write as the
messages of that read, and a read full of pings queues at most `MAX_PENDING_PONGS` pongs
(section 5.5.3: only the latest pending ping needs one).

Memory (docs/security.md, "Memory model"): a fragmented message is accumulated in one
growing buffer, capped by bytes (`max_message_bytes`) and by frames (`max_fragments`, so
empty continuation frames cannot keep a message open forever); both caps close with 1009. A protocol failure ("_Fail the WebSocket Connection_", section
7.1.7) queues a close frame with the matching code and sets `failed`: the connection then
half-closes the socket and discards what the peer still sends.

State: OPEN -> CLOSING (a close frame was sent or received) -> CLOSED (the transport went
away, `receive_eof`). This module does no I/O.

permessage-deflate (RFC 7692): when negotiated, `deflate` is the connection's codec
(gateway/ws/deflate.py, duck-typed: `decompress`, `encode`, `min_bytes`, `release`) and the
parser accepts RSV1. A message whose first frame has RSV1 is reassembled compressed,
inflated once complete (section 7.2.2), then its UTF-8 is validated. Replies of at least
`deflate.min_bytes` are compressed. The inflated total of one read is capped too
(`constants.inflate_budget`): one read can hold thousands of tiny messages that each
inflate to the per-message cap.

Why this is compiled (ARCHITECTURE.md keeps "state" in Python): `receive_data`'s loop runs
per frame and `send`/`data_to_send` per message; on the 1-in-flight echo benchmark these
three Python frames were most of the gateway's user-space time per message.
Imports only the standard library and its sibling twins.
"""
from ._encode_py import encode_frame
from ._frames_py import FrameParser
from ._utf8_py import Utf8Validator, validate_utf8
from .constants import (
    MAX_FRAGMENTS, MAX_PENDING_PONGS, State, encode_close_payload, inflate_budget, is_valid_close_code,
)
from .errors import FrameError

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes used here (constants.CloseCode), as plain ints on the hot path.
NORMAL, PROTOCOL_ERROR, NO_STATUS, ABNORMAL, INVALID_DATA, MESSAGE_TOO_BIG = 1000, 1002, 1005, 1006, 1007, 1009



class SharedParser:
    """The frame parser of every connection (with these settings) between partial frames.

    A FrameParser holds nothing between reads but the bytes of an unfinished frame, so a
    connection whose reads end on frame boundaries -- the usual case, and always when idle
    -- needs none of its own. When a read leaves a partial frame (or kills the parser),
    that connection `take()`s the shared parser, which holds exactly its bytes, and a fresh
    one takes its place here; once drained, the connection drops it again. This saves a
    parser per connection (~100 bytes at 50k) and the buffer a parser would otherwise
    keep for good after one large or split message.
    """

    __slots__ = ("parser", "max_bytes", "allow_rsv1", "max_fragments")

    def __init__(self, max_bytes: int, allow_rsv1: bool, max_fragments: int = MAX_FRAGMENTS) -> None:
        self.max_bytes = max_bytes
        self.allow_rsv1 = allow_rsv1
        # Kept here, not per connection: a setting shared by every connection (memory at 50k).
        self.max_fragments = max_fragments
        self.parser = FrameParser(max_bytes, allow_rsv1=allow_rsv1)

    def take(self):
        parser = self.parser
        self.parser = FrameParser(self.max_bytes, allow_rsv1=self.allow_rsv1)
        return parser


_SHARED_PARSERS: dict = {}   # (max_bytes, allow_rsv1, max_fragments) -> SharedParser (one event loop per process)


def shared_parser(max_bytes: int, allow_rsv1: bool, max_fragments: int = MAX_FRAGMENTS) -> SharedParser:
    key = (max_bytes, allow_rsv1, max_fragments)
    shared = _SHARED_PARSERS.get(key)
    if shared is None:
        shared = _SHARED_PARSERS[key] = SharedParser(max_bytes, allow_rsv1, max_fragments)
    return shared


_EMPTY_PING = encode_frame(OP_PING, b"")
_OPEN = State.OPEN   # module constant: one global load on the per-read check


class ServerProtocol:
    """One WebSocket connection's protocol state; see the module docstring."""

    __slots__ = (
        "state", "_shared", "_parser", "_utf8", "_frag_opcode", "_frag_buf",
        "_frag_count", "_out", "close_code", "close_reason", "close_sent", "close_received",
        "failed", "pongs_received", "_pending_close", "deflate", "_frag_compressed",
        "_inflated", "_checked",
    )

    def __init__(self, max_message_bytes: int = 1 << 20, deflate=None, max_fragments: int = MAX_FRAGMENTS) -> None:
        if max_fragments < 1:
            raise ValueError("max_fragments must be at least 1")
        self.state = State.OPEN
        # A single frame can never be larger than the largest message. RFC 7692 section 6:
        # with permessage-deflate, RSV1 means "compressed".
        self._shared = shared_parser(max_message_bytes, deflate is not None, max_fragments)
        # This connection's own parser, only while a read has left a partial frame in it
        # (or it died); otherwise the shared one (see SharedParser).
        self._parser = None
        self._utf8 = None               # created on the first fragmented text message
        self._frag_opcode = 0           # opcode of the message being reassembled, 0 if none
        # The message being reassembled, in one buffer that grows (never a list of parts
        # joined at the end: that costs an object per frame and a join peak per part);
        # None until needed, so an idle connection holds no empty buffer (memory at 50k).
        self._frag_buf: bytearray | None = None
        self._frag_count = 0            # frames of that message so far (capped: max_fragments)
        self._out: list | None = None   # frames queued since the last data_to_send()
        self.close_code = ABNORMAL      # what the connection ended with (1006 until known)
        self.close_reason = ""
        self.close_sent = False
        self.close_received = False
        self.failed = False             # we failed the connection (section 7.1.7)
        self.pongs_received = 0
        self._pending_close = None      # (code, reason) to send after this read's answers
        self.deflate = deflate          # permessage-deflate codec, None if not negotiated
        self._frag_compressed = False   # the message being reassembled had RSV1 (RFC 7692 6)
        self._inflated = 0              # bytes inflated during the current read
        # Payload bytes of the frame still arriving that were already fed to `_utf8`
        # (_check_partial); the frame's completion feeds only the rest.
        self._checked = 0

    @property
    def max_message_bytes(self) -> int:
        return self._shared.max_bytes

    @property
    def max_fragments(self) -> int:
        return self._shared.max_fragments

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data) -> list:
        """Feed bytes from the socket; return the complete messages they finish."""
        if self.state is not _OPEN and (self.close_received or self.failed or self.state is State.CLOSED):
            return []  # section 5.5.1: nothing after a close frame is processed
        self._inflated = 0
        own = self._parser
        parser = own or self._shared.parser
        try:
            frames = parser.feed(data)
        except FrameError as exc:
            if own is None:
                self._parser = self._shared.take()   # dead now: it must not parse anybody else's bytes
            self._fail(exc.code, exc.reason)
            return []
        if parser.buffered or parser.error is not None:
            if own is None:
                self._parser = self._shared.take()   # it holds this connection's partial frame
        elif own is not None:
            self._parser = None   # drained: back to the shared parser, freeing this one and its buffer
        messages = []
        pongs = 0        # pongs queued by this read, and where the last one sits in _out
        pong_at = -1
        for opcode, fin, rsv1, payload in frames:
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if self._frag_opcode:
                    self._fail(PROTOCOL_ERROR, "new message started before the fragmented one finished")
                    break
                if rsv1:  # only possible when permessage-deflate was negotiated (parser rule)
                    if not self._start_compressed(opcode, fin, payload, messages):
                        break
                elif fin:
                    if opcode == OP_TEXT and not self._text_complete(payload):
                        self._fail(INVALID_DATA, "text message is not valid UTF-8")
                        break
                    if self.close_sent:
                        continue  # we said goodbye; the peer's late data is discarded
                    messages.append((opcode, payload))
                elif not self._start_fragments(opcode, payload):
                    break
            elif opcode == OP_CONT:
                if not self._continue_fragments(fin, payload, messages):
                    break
            elif opcode == OP_PING:
                if not self.close_sent:
                    # Section 5.5.2: a pong with the ping's payload; past MAX_PENDING_PONGS
                    # in one read, only the latest ping is answered (section 5.5.3).
                    if pongs < MAX_PENDING_PONGS:
                        pongs += 1
                        self._queue(encode_frame(OP_PONG, payload))
                        pong_at = len(self._out) - 1
                    else:
                        self._out[pong_at] = encode_frame(OP_PONG, payload)
            elif opcode == OP_PONG:
                self.pongs_received += 1
            else:  # OP_CLOSE
                self._receive_close(payload)
                break
        else:
            if parser.error is not None:
                self._fail(parser.error.code, parser.error.reason)
            elif self._parser is not None:
                self._check_partial(self._parser)
        return messages

    def _text_complete(self, payload: bytes) -> bool:
        """Is this unfragmented text frame valid UTF-8 (its checked prefix included)?"""
        checked = self._checked
        if not checked:
            return validate_utf8(payload)
        self._checked = 0
        return self._utf8.feed(payload[checked:]) and self._utf8.complete()

    def _check_partial(self, parser) -> None:
        """Validate the text of a frame that has not fully arrived yet.

        RFC 6455 section 8.1: invalid UTF-8 fails the connection as soon as it is known
        (Autobahn 6.4.3/6.4.4 send one frame in chunks and check that). Only the bytes that
        arrived since the last read are scanned, into the message's validator, so a long
        frame costs one pass in all.
        """
        peek = parser.peek_payload(self._checked)
        if peek is None:
            return
        opcode, rsv1, data = peek
        if rsv1 or not data:
            return                       # compressed: UTF-8 applies after inflating
        if opcode == OP_TEXT:
            if self._frag_opcode:
                return                   # a protocol error, reported when the frame completes
            if not self._checked:
                if self._utf8 is None:
                    self._utf8 = Utf8Validator()
                else:
                    self._utf8.reset()
        elif opcode != OP_CONT or self._frag_opcode != OP_TEXT or self._frag_compressed:
            return
        self._checked += len(data)
        if not self._utf8.feed(data):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")

    def _start_fragments(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_TEXT:
            checked = self._checked
            if checked:                      # its start was validated while it arrived
                self._checked = 0
                payload_rest = payload[checked:]
            else:
                payload_rest = payload
                if self._utf8 is None:
                    self._utf8 = Utf8Validator()
                else:
                    self._utf8.reset()
            if not self._utf8.feed(payload_rest):
                self._fail(INVALID_DATA, "text message is not valid UTF-8")
                return False
        self._frag_opcode = opcode
        self._frag_buf = bytearray(payload)
        self._frag_count = 1
        return True

    def _start_compressed(self, opcode: int, fin: bool, payload: bytes, messages: list) -> bool:
        # RFC 7692 section 6: RSV1 on the first frame marks the whole message compressed;
        # continuation frames carry RSV1 = 0 (the parser rejects it there).
        if fin:
            return self._finish_compressed(opcode, payload, messages)
        self._frag_opcode = opcode
        self._frag_compressed = True
        self._frag_buf = bytearray(payload)
        self._frag_count = 1
        return True

    def _finish_compressed(self, opcode: int, payload: bytes, messages: list) -> bool:
        try:
            data = self.deflate.decompress(payload)  # capped at max_message_bytes (1009)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)
            return False
        # RFC 7692 section 6.2 / RFC 6455 section 8.1: UTF-8 applies to the inflated text.
        if opcode == OP_TEXT and not validate_utf8(data):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")
            return False
        self._inflated += len(data)
        budget = inflate_budget(self.max_message_bytes)
        if self._inflated > budget:
            self._fail(MESSAGE_TOO_BIG, f"compressed messages in one read inflate past {budget} bytes")
            return False
        if not self.close_sent:
            messages.append((opcode, data))
        return True

    def _continue_fragments(self, fin: bool, payload: bytes, messages: list) -> bool:
        opcode = self._frag_opcode
        if not opcode:
            self._fail(PROTOCOL_ERROR, "continuation frame without a message to continue")
            return False
        shared = self._shared
        self._frag_count += 1
        if self._frag_count > shared.max_fragments:
            self._fail(MESSAGE_TOO_BIG, f"message exceeds the {shared.max_fragments}-fragment limit")
            return False
        if len(self._frag_buf) + len(payload) > shared.max_bytes:
            self._fail(MESSAGE_TOO_BIG, f"message exceeds the {shared.max_bytes}-byte limit")
            return False
        if self._frag_compressed:
            return self._continue_compressed(fin, payload, messages)
        checked, self._checked = self._checked, 0
        if opcode == OP_TEXT and not self._utf8.feed(payload[checked:] if checked else payload):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")
            return False
        buf = self._frag_buf
        buf += payload
        if fin:
            if opcode == OP_TEXT and not self._utf8.complete():
                self._fail(INVALID_DATA, "text message ends inside a UTF-8 sequence")
                return False
            data = bytes(buf)   # the one copy: messages are bytes (the compiled twin resizes in place)
            self._frag_opcode = 0
            self._frag_buf = None
            self._frag_count = 0
            if not self.close_sent:
                messages.append((opcode, data))
        return True

    def _continue_compressed(self, fin: bool, payload: bytes, messages: list) -> bool:
        # The compressed size is bounded by the checks above; the inflated size by the codec.
        buf = self._frag_buf
        buf += payload
        if not fin:
            return True
        opcode = self._frag_opcode
        self._frag_opcode = 0
        self._frag_compressed = False
        self._frag_buf = None
        self._frag_count = 0
        return self._finish_compressed(opcode, buf, messages)

    def _receive_close(self, payload: bytes) -> None:
        # Section 5.5.1: a body, if present, starts with a 2-byte code; a 1-byte body is invalid.
        self.close_received = True
        if len(payload) == 0:
            code, reason = NO_STATUS, ""
        elif len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "close frame with a 1-byte payload")
            return
        else:
            code = int.from_bytes(payload[:2], "big")
            if not is_valid_close_code(code):
                self._fail(PROTOCOL_ERROR, f"invalid close code {code}")
                return
            if not validate_utf8(payload[2:]):
                self._fail(INVALID_DATA, "close reason is not valid UTF-8")
                return
            reason = payload[2:].decode("utf-8")
        if not self.close_sent:
            # Section 5.5.1: answer with a close frame, echoing the code we received; it is
            # queued after the answers to the messages that preceded it (see data_to_send).
            self.close_code, self.close_reason = code, reason
            self._pending_close = (NORMAL if code == NO_STATUS else code, "")
        elif self.close_code == ABNORMAL:
            self.close_code, self.close_reason = code, reason
        self.state = State.CLOSING

    def receive_eof(self) -> None:
        """The peer half-closed or the transport ended."""
        self.state = State.CLOSED
        if self.deflate is not None:
            self.deflate.release()  # nothing more to inflate: return its context to the budget

    # -- sending ------------------------------------------------------------------------

    def _queue(self, frame: bytes) -> None:
        out = self._out
        if out is None:
            self._out = [frame]
        else:
            out.append(frame)

    def send(self, opcode: int, payload) -> None:
        """Queue one unfragmented message (dropped once a close frame was sent, section 5.5.1)."""
        if not self.close_sent:
            deflate = self.deflate
            if deflate is None or len(payload) < deflate.min_bytes:   # short replies skip the codec
                self._queue(encode_frame(opcode, payload))
            else:
                self._queue(deflate.encode(opcode, payload))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already encoded frame (the shared bytes of a broadcast)."""
        if not self.close_sent:
            self._queue(frame)

    def ping(self, payload: bytes = b"") -> None:
        if not self.close_sent:
            # The keepalive ping is always the same empty frame: build it once.
            self._queue(encode_frame(OP_PING, payload) if payload else _EMPTY_PING)

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the closing handshake (section 7.1.2)."""
        if self.close_sent or self.state is State.CLOSED:
            return
        self.close_code, self.close_reason = code, reason
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        self._queue(encode_frame(OP_CLOSE, encode_close_payload(code, reason)))
        self.close_sent = True
        self.state = State.CLOSING

    def _fail(self, code: int, reason: str) -> None:
        """Section 7.1.7: close with `code` (if not done yet) and stop reading.

        The close frame is queued by the next `data_to_send()`, after whatever the endpoint
        sends in answer to the valid messages that preceded the failure in the same read.
        """
        self.failed = True
        if not self.close_sent and self._pending_close is None:
            self.close_code, self.close_reason = code, reason
            self._pending_close = (code, reason)
        self.state = State.CLOSING

    @property
    def has_output(self) -> bool:
        return bool(self._out) or self._pending_close is not None

    def data_to_send(self) -> list:
        """Everything queued since the last call, in order (a pending close frame last)."""
        if self._pending_close is not None:
            code, reason = self._pending_close
            self._pending_close = None
            if not self.close_sent:
                self._send_close(code, reason)
        out = self._out
        if out is None:
            return []
        self._out = None
        return out

    @property
    def wants_transport_closed(self) -> bool:
        """Section 7.1.1: once both close frames crossed, the server closes TCP first."""
        return self.close_sent and self.close_received
