# cython: language_level=3, binding=False, embedsignature.format=clinic
"""Compiled twin of `_protocol_py`: the sans-I/O WebSocket server protocol.

Same contract as the twin (read its docstring for the theory of operation): the same
methods, the same messages, the same close codes and reasons in the same order. What is
compiled here is the per-frame loop of `receive_data` and the per-message `send` /
`data_to_send`: frames come from the compiled parser (`feed_ptr`), text is validated by
the compiled UTF-8 scanner and replies are built by the compiled encoder, all through
C calls (cimport), so one echo costs no Python frame here.

A fragmented message is accumulated in one bytes object that this object alone references
and grows in place (`_PyBytes_Resize`, four-fold steps up to `max_message_bytes`), then
is shrunk to its length and handed out as the message: no list of parts, no join, no final
copy (the twin's bytearray needs one copy at the end).
Imports nothing from `gateway`.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF
from libc.string cimport memcpy

from ._encode_c cimport encode_ptr
from ._frames_c cimport FrameParser
from ._utf8_c cimport UTF8_ACCEPT, Utf8Validator, utf8_scan

from ._encode_c import encode_frame
from ._utf8_c import validate_utf8
from .constants import (
    MAX_FRAGMENTS, MAX_PENDING_PONGS, State, encode_close_payload, inflate_budget, is_valid_close_code,
)

cdef extern from "Python.h":
    # Resizes a bytes object whose only reference is *obj (CPython API, used by zlib and
    # others to grow their output in place); on failure *obj is released and set to NULL.
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t size) except -1
from .errors import FrameError

cdef enum:
    OP_CONT = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    # State as C ints (the `state` property maps them to the enum).
    S_OPEN = 1
    S_CLOSING = 2
    S_CLOSED = 3
    # Close codes used here (constants.CloseCode).
    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    MESSAGE_TOO_BIG = 1009


cdef tuple _STATES = (None, State.OPEN, State.CLOSING, State.CLOSED)
cdef Py_ssize_t _MAX_PENDING_PONGS = MAX_PENDING_PONGS
# First capacity of a fragment buffer (then grown four-fold as needed, up to max_message_bytes).
cdef Py_ssize_t _FRAG_MIN_CAPACITY = 4096
cdef bytes _EMPTY_PING = encode_ptr(OP_PING, NULL, 0, True, False, NULL)
cdef object _FrameError = FrameError


cdef inline bint _text_ok(object data):
    """validate_utf8 for a complete message; bytes (every parser payload) without a call."""
    if PyBytes_CheckExact(data):
        return utf8_scan(UTF8_ACCEPT, <const unsigned char*>PyBytes_AS_STRING(data),
                         PyBytes_GET_SIZE(data)) == UTF8_ACCEPT
    return validate_utf8(data)


cdef class SharedParser:
    """The frame parser of every connection with these settings; see the twin."""

    def __init__(self, max_bytes, bint allow_rsv1, Py_ssize_t max_fragments=MAX_FRAGMENTS):
        self.max_bytes = max_bytes
        self.allow_rsv1 = allow_rsv1
        self.max_fragments = max_fragments
        self.parser = FrameParser(max_bytes, allow_rsv1=allow_rsv1)

    cpdef FrameParser take(self):
        cdef FrameParser parser = self.parser
        self.parser = FrameParser(self.max_bytes, allow_rsv1=self.allow_rsv1)
        return parser


cdef dict _SHARED_PARSERS = {}   # (max_bytes, allow_rsv1, max_fragments) -> SharedParser (one event loop per process)


def shared_parser(max_bytes, bint allow_rsv1, Py_ssize_t max_fragments=MAX_FRAGMENTS):
    key = (max_bytes, allow_rsv1, max_fragments)
    shared = _SHARED_PARSERS.get(key)
    if shared is None:
        shared = _SHARED_PARSERS[key] = SharedParser(max_bytes, allow_rsv1, max_fragments)
    return shared


cdef class ServerProtocol:
    """One WebSocket connection's protocol state; see the twin's module docstring."""

    def __init__(self, max_message_bytes=1 << 20, deflate=None, Py_ssize_t max_fragments=MAX_FRAGMENTS):
        if max_fragments < 1:
            raise ValueError("max_fragments must be at least 1")
        self._state = S_OPEN
        self._shared = shared_parser(max_message_bytes, deflate is not None, max_fragments)
        self._parser = None
        self._utf8 = None
        self._frag_opcode = 0
        self._frag_buf = None
        self._frag_size = 0
        self._frag_count = 0
        self._out = None
        self.close_code = ABNORMAL
        self.close_reason = ""
        self.close_sent = False
        self.close_received = False
        self.failed = False
        self.pongs_received = 0
        self._pending_close = None
        self.deflate = deflate
        self._frag_compressed = False
        self._inflated = 0
        self._checked = 0

    @property
    def state(self):
        return _STATES[self._state]

    @property
    def max_message_bytes(self):
        return self._shared.max_bytes

    @property
    def max_fragments(self):
        return self._shared.max_fragments

    # -- receiving ----------------------------------------------------------------------

    cpdef list receive_data(self, data):
        """Feed bytes from the socket; return the complete messages they finish."""
        cdef FrameParser own, parser
        cdef list frames, messages
        cdef tuple frame
        cdef bytes payload
        cdef int opcode
        cdef bint fin
        cdef Py_ssize_t pongs = 0, pong_at = -1   # pongs queued by this read; the last one's index
        cdef bytes pong
        if self._state != S_OPEN and (self.close_received or self.failed or self._state == S_CLOSED):
            return []  # section 5.5.1: nothing after a close frame is processed
        self._inflated = 0
        own = self._parser
        parser = own if own is not None else self._shared.parser
        try:
            if PyBytes_CheckExact(data):
                frames = parser.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            else:
                frames = parser.feed(data)
        except _FrameError as exc:
            if own is None:
                self._parser = self._shared.take()   # dead now: it must not parse anybody else's bytes
            self._fail(exc.code, exc.reason)
            return []
        if parser._len or parser.error is not None:
            if own is None:
                self._parser = self._shared.take()   # it holds this connection's partial frame
        elif own is not None:
            self._parser = None   # drained: back to the shared parser
        messages = []
        for frame in frames:
            opcode = frame[0]
            fin = frame[1]
            payload = frame[3]
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if self._frag_opcode:
                    self._fail(PROTOCOL_ERROR, "new message started before the fragmented one finished")
                    break
                if frame[2]:  # RSV1: only possible when permessage-deflate was negotiated (parser rule)
                    if not self._start_compressed(frame[0], fin, payload, messages):
                        break
                elif fin:
                    if opcode == OP_TEXT and not self._text_complete(payload):
                        self._fail(INVALID_DATA, "text message is not valid UTF-8")
                        break
                    if self.close_sent:
                        continue  # we said goodbye; the peer's late data is discarded
                    messages.append((frame[0], payload))
                elif not self._start_fragments(opcode, payload):
                    break
            elif opcode == OP_CONT:
                if not self._continue_fragments(fin, payload, messages):
                    break
            elif opcode == OP_PING:
                if not self.close_sent:
                    # Section 5.5.2: a pong with the ping's payload; past MAX_PENDING_PONGS in
                    # one read, only the latest ping is answered (section 5.5.3).
                    pong = encode_ptr(OP_PONG, <const unsigned char*>PyBytes_AS_STRING(payload),
                                      PyBytes_GET_SIZE(payload), True, False, NULL)
                    if pongs < _MAX_PENDING_PONGS:
                        pongs += 1
                        self._queue(pong)
                        pong_at = len(self._out) - 1
                    else:
                        self._out[pong_at] = pong
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

    cdef inline bint _text_complete(self, bytes payload) except -1:
        """Is this unfragmented text frame valid UTF-8 (its checked prefix included)?"""
        cdef Py_ssize_t checked = self._checked
        if not checked:
            return utf8_scan(UTF8_ACCEPT, <const unsigned char*>PyBytes_AS_STRING(payload),
                             PyBytes_GET_SIZE(payload)) == UTF8_ACCEPT
        self._checked = 0
        return (self._utf8.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(payload) + checked,
                                    PyBytes_GET_SIZE(payload) - checked)
                and self._utf8._state == UTF8_ACCEPT)

    cdef int _check_partial(self, FrameParser parser) except -1:
        """Validate the text of a frame that has not fully arrived yet; see the twin."""
        cdef bytes data
        peek = parser.peek_payload(self._checked)
        if peek is None:
            return 0
        opcode, rsv1, data = peek
        if rsv1 or not data:
            return 0                     # compressed: UTF-8 applies after inflating
        if opcode == OP_TEXT:
            if self._frag_opcode:
                return 0                 # a protocol error, reported when the frame completes
            if not self._checked:
                if self._utf8 is None:
                    self._utf8 = Utf8Validator()
                else:
                    self._utf8.reset()
        elif opcode != OP_CONT or self._frag_opcode != OP_TEXT or self._frag_compressed:
            return 0
        self._checked += PyBytes_GET_SIZE(data)
        if not self._utf8.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")
        return 0

    cdef bint _start_fragments(self, int opcode, bytes payload) except -1:
        cdef Py_ssize_t checked = self._checked
        if opcode == OP_TEXT:
            if checked:                      # its start was validated while it arrived
                self._checked = 0
            elif self._utf8 is None:
                self._utf8 = Utf8Validator()
            else:
                self._utf8.reset()
            if not self._utf8.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(payload) + checked,
                                       PyBytes_GET_SIZE(payload) - checked):
                self._fail(INVALID_DATA, "text message is not valid UTF-8")
                return False
        self._frag_opcode = opcode
        self._frag_begin(payload)
        return True

    cdef int _frag_begin(self, bytes payload) except -1:
        """A new fragmented message: its buffer holds the first frame's payload."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t cap = n * 2 if n * 2 > _FRAG_MIN_CAPACITY else _FRAG_MIN_CAPACITY
        cdef Py_ssize_t limit = self._shared.max_bytes
        if cap > limit:
            cap = limit if limit > n else n
        self._frag_buf = PyBytes_FromStringAndSize(NULL, cap)
        memcpy(PyBytes_AS_STRING(self._frag_buf), PyBytes_AS_STRING(payload), n)
        self._frag_size = n
        self._frag_count = 1
        return 0

    cdef int _frag_resize(self, Py_ssize_t size) except -1:
        """Resize the buffer in place; it is referenced by this object only."""
        cdef PyObject* obj = <PyObject*>self._frag_buf
        Py_XINCREF(obj)            # our own reference ...
        self._frag_buf = None      # ... becomes the only one, as _PyBytes_Resize requires
        _PyBytes_Resize(&obj, size)   # raises MemoryError (obj released) on failure
        self._frag_buf = <bytes>obj
        Py_XDECREF(obj)
        return 0

    cdef int _frag_append(self, bytes payload) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t need = self._frag_size + n
        cdef Py_ssize_t cap = PyBytes_GET_SIZE(self._frag_buf)
        if need > cap:
            cap = cap * 4 if cap * 4 > need else need
            if cap > self._shared.max_bytes:      # need <= max_bytes: checked by the caller
                cap = self._shared.max_bytes if self._shared.max_bytes > need else need
            self._frag_resize(cap)
        memcpy(PyBytes_AS_STRING(self._frag_buf) + self._frag_size, PyBytes_AS_STRING(payload), n)
        self._frag_size = need
        return 0

    cdef bytes _frag_take(self):
        """The complete message: the buffer shrunk to its length, owned by the caller now."""
        cdef bytes data
        if PyBytes_GET_SIZE(self._frag_buf) != self._frag_size:
            self._frag_resize(self._frag_size)
        data = self._frag_buf
        self._frag_buf = None
        self._frag_size = 0
        self._frag_count = 0
        return data

    cdef bint _start_compressed(self, object opcode, bint fin, bytes payload, list messages) except -1:
        # RFC 7692 section 6: RSV1 on the first frame marks the whole message compressed.
        if fin:
            return self._finish_compressed(opcode, payload, messages)
        self._frag_opcode = opcode
        self._frag_compressed = True
        self._frag_begin(payload)
        return True

    cdef bint _finish_compressed(self, object opcode, object payload, list messages) except -1:
        try:
            data = self.deflate.decompress(payload)  # capped at max_message_bytes (1009)
        except _FrameError as exc:
            self._fail(exc.code, exc.reason)
            return False
        # RFC 7692 section 6.2 / RFC 6455 section 8.1: UTF-8 applies to the inflated text.
        if opcode == OP_TEXT and not _text_ok(data):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")
            return False
        self._inflated += len(data)
        budget = inflate_budget(self._shared.max_bytes)   # computed here: 8 bytes less per connection
        if self._inflated > budget:
            self._fail(MESSAGE_TOO_BIG, f"compressed messages in one read inflate past {budget} bytes")
            return False
        if not self.close_sent:
            messages.append((opcode, data))
        return True

    cdef bint _continue_fragments(self, bint fin, bytes payload, list messages) except -1:
        cdef int opcode = self._frag_opcode
        cdef Py_ssize_t checked
        if not opcode:
            self._fail(PROTOCOL_ERROR, "continuation frame without a message to continue")
            return False
        self._frag_count += 1
        if self._frag_count > self._shared.max_fragments:
            self._fail(MESSAGE_TOO_BIG, f"message exceeds the {self._shared.max_fragments}-fragment limit")
            return False
        if self._frag_size + PyBytes_GET_SIZE(payload) > self._shared.max_bytes:
            self._fail(MESSAGE_TOO_BIG, f"message exceeds the {self._shared.max_bytes}-byte limit")
            return False
        if self._frag_compressed:
            return self._continue_compressed(fin, payload, messages)
        checked = self._checked
        self._checked = 0
        if opcode == OP_TEXT and not self._utf8.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(payload) + checked,
                                                         PyBytes_GET_SIZE(payload) - checked):
            self._fail(INVALID_DATA, "text message is not valid UTF-8")
            return False
        self._frag_append(payload)
        if fin:
            if opcode == OP_TEXT and not self._utf8.complete():
                self._fail(INVALID_DATA, "text message ends inside a UTF-8 sequence")
                return False
            data = self._frag_take()
            self._frag_opcode = 0
            if not self.close_sent:
                messages.append((opcode, data))
        return True

    cdef bint _continue_compressed(self, bint fin, bytes payload, list messages) except -1:
        self._frag_append(payload)
        if not fin:
            return True
        opcode = self._frag_opcode
        self._frag_opcode = 0
        self._frag_compressed = False
        return self._finish_compressed(opcode, self._frag_take(), messages)

    cdef int _receive_close(self, bytes payload) except -1:
        # Section 5.5.1: a body, if present, starts with a 2-byte code; a 1-byte body is invalid.
        cdef int code
        self.close_received = True
        if len(payload) == 0:
            code, reason = NO_STATUS, ""
        elif len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "close frame with a 1-byte payload")
            return 0
        else:
            code = int.from_bytes(payload[:2], "big")
            if not is_valid_close_code(code):
                self._fail(PROTOCOL_ERROR, f"invalid close code {code}")
                return 0
            if not _text_ok(payload[2:]):
                self._fail(INVALID_DATA, "close reason is not valid UTF-8")
                return 0
            reason = payload[2:].decode("utf-8")
        if not self.close_sent:
            # Section 5.5.1: answer with a close frame echoing the code, after this read's answers.
            self.close_code, self.close_reason = code, reason
            self._pending_close = (NORMAL if code == NO_STATUS else code, "")
        elif self.close_code == ABNORMAL:
            self.close_code, self.close_reason = code, reason
        self._state = S_CLOSING
        return 0

    def receive_eof(self):
        """The peer half-closed or the transport ended."""
        self._state = S_CLOSED
        if self.deflate is not None:
            self.deflate.release()  # nothing more to inflate: return its context to the budget

    # -- sending ------------------------------------------------------------------------

    cdef int _queue(self, bytes frame) except -1:
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        return 0

    cpdef send(self, int opcode, payload):
        """Queue one unfragmented message (dropped once a close frame was sent, section 5.5.1)."""
        if self.close_sent:
            return
        if self.deflate is not None and len(payload) >= self.deflate.min_bytes:
            self._queue(self.deflate.encode(opcode, payload))
        elif PyBytes_CheckExact(payload):
            self._queue(encode_ptr(opcode, <const unsigned char*>PyBytes_AS_STRING(payload),
                                   PyBytes_GET_SIZE(payload), True, False, NULL))
        else:
            self._queue(encode_frame(opcode, payload))

    cpdef send_frame(self, bytes frame):
        """Queue an already encoded frame (the shared bytes of a broadcast)."""
        if not self.close_sent:
            self._queue(frame)

    def ping(self, payload=b""):
        if not self.close_sent:
            # The keepalive ping is always the same empty frame: build it once.
            self._queue(encode_frame(OP_PING, payload) if payload else _EMPTY_PING)

    def close(self, int code=NORMAL, str reason=""):
        """Start the closing handshake (section 7.1.2)."""
        if self.close_sent or self._state == S_CLOSED:
            return
        self.close_code, self.close_reason = code, reason
        self._send_close(code, reason)

    cdef int _send_close(self, int code, str reason) except -1:
        self._queue(encode_frame(OP_CLOSE, encode_close_payload(code, reason)))
        self.close_sent = True
        self._state = S_CLOSING
        return 0

    cdef int _fail(self, int code, str reason) except -1:
        """Section 7.1.7: close with `code` (if not done yet) and stop reading; see the twin."""
        self.failed = True
        if not self.close_sent and self._pending_close is None:
            self.close_code, self.close_reason = code, reason
            self._pending_close = (code, reason)
        self._state = S_CLOSING
        return 0

    @property
    def has_output(self):
        return bool(self._out) or self._pending_close is not None

    cpdef list data_to_send(self):
        """Everything queued since the last call, in order (a pending close frame last)."""
        cdef list out
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
    def wants_transport_closed(self):
        """Section 7.1.1: once both close frames crossed, the server closes TCP first."""
        return self.close_sent and self.close_received
