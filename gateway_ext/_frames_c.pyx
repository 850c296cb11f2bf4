# cython: language_level=3
"""Compiled twin of `_frames_py`: the incremental RFC 6455 frame parser.

Same contract as the twin (read its docstring): `feed(data)` returns every complete frame
of a read as `(opcode, fin, rsv1, payload)` tuples with the payload unmasked; per-frame
rules of RFC 6455 section 5.2 are checked in the same order with the same FrameError code
and reason; frames that precede an invalid one are returned and the error is kept in
`error`; a dead parser raises `error` on every later `feed()`.

Theory of operation. The parser is a state machine over one frame at a time, driven by
offsets into a contiguous byte range: HEADER (2 bytes: judge RSV/opcode/control/mask
rules at once, before the rest of the frame arrives) -> EXTENDED LENGTH (0, 2 or 8
bytes; the 63-bit and size-cap checks) -> MASKING KEY (0 or 4 bytes) -> PAYLOAD (copied
and unmasked in one pass into a new `bytes`) -> next HEADER. A frame whose bytes are not
all there yet stops the scan; its state is rebuilt from the buffered header on the next
feed (a few nanoseconds), so changes to `max_frame_bytes`/`require_mask`/`allow_rsv1`
between reads apply to it exactly as in the twin.

The byte range is the caller's read itself whenever nothing is buffered (the common case:
reads end on frame boundaries), so no byte is copied twice. Otherwise the read is
appended to the internal buffer (geometric growth, so a 16 MiB frame in many chunks is
linear) and the consumed prefix is dropped once per feed, not once per frame.
Imports nothing from `gateway`.
"""
import math
import operator

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport INT64_MAX, uint64_t
from libc.string cimport memcpy, memmove

from ._mask_c cimport mask_to_bytes

from .errors import FrameError

cdef enum:
    _MAX_CONTROL_PAYLOAD = 125       # RFC 6455 section 5.5
    _MIN_CAPACITY = 4096
    # Give memory back after a large frame once the buffer is mostly empty.
    _SHRINK_ABOVE = 256 * 1024

cdef object _FrameError = FrameError


cdef inline uint64_t _load_be64(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40) | (<uint64_t>p[3] << 32)
            | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef class FrameParser:
    """Incremental frame parser; see the module docstring of `_frames_py` for the contract."""

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0

    def __init__(self, max_frame_bytes=1 << 20, require_mask=True, allow_rsv1=False):
        self.max_frame_bytes = max_frame_bytes
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1
        self.error = None

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def max_frame_bytes(self):
        return self._max_obj

    @max_frame_bytes.setter
    def max_frame_bytes(self, value):
        # The twin compares `length > max_frame_bytes` with any real number; an integer
        # clamped to [-1, 2**63 - 1] (lengths are < 2**63) gives the same answers.
        try:
            limit = operator.index(value)
        except TypeError:
            real = float(value)             # TypeError for non-numbers, like the twin's compare
            if real != real or real == math.inf:
                limit = INT64_MAX           # NaN and +inf never compare smaller
            elif real == -math.inf:
                limit = -1
            else:
                limit = math.floor(value)
        self._max_bytes = -1 if limit < 0 else (INT64_MAX if limit > INT64_MAX else limit)
        self._max_obj = value

    @property
    def buffered(self):
        """Bytes received but not yet part of a complete frame."""
        return self._len

    def feed(self, data) -> list:
        cdef Py_buffer view
        if self.error is not None:
            raise self.error
        if PyBytes_CheckExact(data):
            return self.feed_ptr(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.feed_ptr(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef list feed_ptr(self, const unsigned char* p, Py_ssize_t n):
        cdef list frames = []
        cdef Py_ssize_t consumed
        if self.error is not None:
            raise self.error
        if self._len == 0:
            # Parse straight from the caller's bytes; keep only the unfinished tail.
            consumed = self._parse(p, n, frames)
            if self.error is None and consumed < n:
                self._keep(p + consumed, n - consumed)
        else:
            self._keep(p, n)
            consumed = self._parse(self._buf, self._len, frames)
            if self.error is None:
                self._drop(consumed)
        if self.error is not None:
            self._clear()
            if not frames:
                raise self.error
        return frames

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n, list frames) except -1:
        """Append the complete frames of p[:n] to `frames`; return how many bytes they used.

        On a protocol violation, store the FrameError in `error` and return the bytes used
        by the frames before it (the caller then discards the rest).
        """
        cdef Py_ssize_t pos = 0, header, avail
        cdef unsigned int b0, b1, opcode
        cdef bint fin, rsv1, masked
        cdef uint64_t length
        cdef bytes payload
        while n - pos >= 2:
            # -- HEADER: every rule that two bytes can decide, in the twin's order.
            b0 = p[pos]
            b1 = p[pos + 1]
            fin = (b0 & 0x80) != 0
            rsv1 = (b0 & 0x40) != 0
            opcode = b0 & 0x0F
            masked = (b1 & 0x80) != 0
            length = b1 & 0x7F
            # RFC 6455 section 5.2: RSV bits MUST be 0 unless an extension defines them;
            # permessage-deflate (RFC 7692 section 6) defines RSV1 on a message's first frame only.
            if b0 & 0x30:
                self._fail(1002, "reserved bits RSV2/RSV3 must be 0")
                return pos
            if rsv1 and (not self.allow_rsv1 or opcode == 0 or opcode >= 8):
                self._fail(1002, "reserved bit RSV1 set without a negotiated extension")
                return pos
            if opcode >= 8:
                if opcode > 0xA:
                    self._fail(1002, f"reserved control opcode {opcode:#x}")
                    return pos
                # RFC 6455 section 5.5: control frames are never fragmented, payload <= 125.
                if not fin:
                    self._fail(1002, "fragmented control frame")
                    return pos
                if length > _MAX_CONTROL_PAYLOAD:
                    self._fail(1002, "control frame payload longer than 125 bytes")
                    return pos
            elif opcode > 2:
                self._fail(1002, f"reserved data opcode {opcode:#x}")
                return pos
            # RFC 6455 section 5.1: a server MUST close on an unmasked client frame.
            if masked != self.require_mask:
                self._fail(1002, "client frame is not masked" if self.require_mask else "server frame is masked")
                return pos
            # -- EXTENDED LENGTH (section 5.2: 126 -> 16-bit, 127 -> 64-bit with MSB 0).
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (<uint64_t>p[pos + 2] << 8) | p[pos + 3]
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = _load_be64(p + pos + 2)
                if length >> 63:
                    self._fail(1002, "payload length has the most significant bit set")
                    return pos
                header = 10
            if <long long>length > self._max_bytes:
                self._fail(1009, f"frame of {length} bytes exceeds the {self._max_obj}-byte limit")
                return pos
            # -- MASKING KEY and PAYLOAD: wait until the whole frame is here.
            if masked:
                header += 4
            avail = n - pos - header
            if avail < 0 or <uint64_t>avail < length:
                break
            pos += header
            if masked:
                payload = mask_to_bytes(p + pos, <Py_ssize_t>length, p + pos - 4)
            else:
                payload = PyBytes_FromStringAndSize(<char*>p + pos, <Py_ssize_t>length)
            frames.append((opcode, fin, rsv1, payload))
            pos += <Py_ssize_t>length
        return pos

    cdef int _fail(self, int code, str reason) except -1:
        self.error = _FrameError(code, reason)
        return 0

    cdef int _reserve(self, Py_ssize_t total) except -1:
        """Make room for `total` buffered bytes (geometric growth: appends are amortised O(1))."""
        cdef Py_ssize_t cap
        cdef unsigned char* buf
        if total <= self._cap:
            return 0
        cap = self._cap * 2
        if cap < total:
            cap = total
        if cap < _MIN_CAPACITY:
            cap = _MIN_CAPACITY
        buf = <unsigned char*>PyMem_Realloc(self._buf, cap)
        if buf is NULL:
            raise MemoryError()
        self._buf = buf
        self._cap = cap
        return 0

    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Append p[:n] to the buffer."""
        if n:
            self._reserve(self._len + n)
            memcpy(self._buf + self._len, p, n)
            self._len += n
        return 0

    cdef void _drop(self, Py_ssize_t consumed) noexcept:
        """Forget the first `consumed` buffered bytes (once per feed, whatever the frame count)."""
        cdef Py_ssize_t rest = self._len - consumed
        cdef unsigned char* buf
        if consumed == 0:
            return
        if rest == 0:
            self._clear()
            return
        memmove(self._buf, self._buf + consumed, rest)
        self._len = rest
        if self._cap > _SHRINK_ABOVE and rest < self._cap // 8:
            buf = <unsigned char*>PyMem_Realloc(self._buf, rest * 2 if rest * 2 > _MIN_CAPACITY else _MIN_CAPACITY)
            if buf is not NULL:
                self._buf = buf
                self._cap = rest * 2 if rest * 2 > _MIN_CAPACITY else _MIN_CAPACITY

    cdef void _clear(self) noexcept:
        """Empty the buffer; free it if it grew large (a big frame is usually a one-off)."""
        self._len = 0
        if self._cap > _SHRINK_ABOVE:
            PyMem_Free(self._buf)
            self._buf = NULL
            self._cap = 0
