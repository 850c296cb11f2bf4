# cython: language_level=3, binding=False, embedsignature.format=clinic
# binding=False: plain builtin functions/methods, called without the CyFunction layer
# (~80 fewer instructions per call, callgrind on encode_frame); embedsignature.format=clinic
# keeps inspect.signature() working on them.
"""Compiled twin of `_frames_py`: the incremental RFC 6455 frame parser.

Same contract as the twin (read its docstring): `feed(data)` returns every complete frame
of a read as `(opcode, fin, rsv1, payload)` tuples with the payload unmasked; per-frame
rules of RFC 6455 section 5.2 are checked in the same order with the same FrameError code
and reason; frames that precede an invalid one are returned and the error is kept in
`error`; a dead parser raises `error` on every later `feed()`.

Theory of operation. Each read goes through two passes over a contiguous byte range.
Pass 1 (`_scan`, pure C, no Python objects) is the per-frame state machine driven by
offsets: HEADER (2 bytes: judge RSV/opcode/control/mask rules at once, before the rest of
the frame arrives) -> EXTENDED LENGTH (0, 2 or 8 bytes; the 63-bit and size-cap checks)
-> MASKING KEY (0 or 4 bytes) -> PAYLOAD -> next HEADER; it stops at the first
incomplete frame or broken rule and reports how many frames are complete. Pass 2 (`_cut`)
allocates the result list at that size and copies each payload once, unmasking while
copying, into a new `bytes`. An incomplete frame is re-judged from its buffered header on
the next feed (a few nanoseconds), so changes to `max_frame_bytes`/`require_mask`/
`allow_rsv1` between reads apply to it exactly as in the twin.

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
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_INCREF
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
# The 16 opcode ints, fetched by index instead of converted per frame.
cdef tuple _OPCODES = tuple(range(16))

# Close code of each fault (RFC 6455 section 7.4.1): 1002 protocol error, 1009 too big.
cdef int _FAULT_CODES[11]
_FAULT_CODES[:] = [0, 1002, 1002, 1002, 1002, 1002, 1002, 1002, 1002, 1002, 1009]


cdef inline uint64_t _load_be64(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40) | (<uint64_t>p[3] << 32)
            | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef Py_ssize_t _scan(const unsigned char* p, Py_ssize_t n, bint require_mask, bint allow_rsv1,
                      long long max_bytes, Scan* out) noexcept nogil:
    """Pass 1, pure C: validate the headers in p[:n] and count the complete frames.

    Sets out.count, out.end (bytes used by those frames) and out.fault (+ the opcode or
    length the error text needs) at the first rule broken; returns out.count.
    """
    cdef Py_ssize_t pos = 0, header, avail
    cdef unsigned int b0, b1, opcode
    cdef bint masked
    cdef uint64_t length
    out.count = 0
    out.fault = FAULT_NONE
    while n - pos >= 2:
        # -- HEADER: every rule that two bytes can decide, in the twin's order.
        b0 = p[pos]
        b1 = p[pos + 1]
        opcode = b0 & 0x0F
        masked = (b1 & 0x80) != 0
        length = b1 & 0x7F
        # RFC 6455 section 5.2: RSV bits MUST be 0 unless an extension defines them;
        # permessage-deflate (RFC 7692 section 6) defines RSV1 on a message's first frame only.
        if b0 & 0x30:
            out.fault = FAULT_RSV23
            break
        if (b0 & 0x40) and (not allow_rsv1 or opcode == 0 or opcode >= 8):
            out.fault = FAULT_RSV1
            break
        if opcode >= 8:
            if opcode > 0xA:
                out.fault = FAULT_CONTROL_OPCODE
                out.opcode = opcode
                break
            # RFC 6455 section 5.5: control frames are never fragmented, payload <= 125.
            if not (b0 & 0x80):
                out.fault = FAULT_FRAGMENTED_CONTROL
                break
            if length > _MAX_CONTROL_PAYLOAD:
                out.fault = FAULT_CONTROL_LENGTH
                break
        elif opcode > 2:
            out.fault = FAULT_DATA_OPCODE
            out.opcode = opcode
            break
        # RFC 6455 section 5.1: a server MUST close on an unmasked client frame.
        if masked != require_mask:
            out.fault = FAULT_UNMASKED if require_mask else FAULT_MASKED
            break
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
                out.fault = FAULT_LENGTH_MSB
                break
            header = 10
        if <long long>length > max_bytes:
            out.fault = FAULT_TOO_BIG
            out.length = length
            break
        # -- MASKING KEY and PAYLOAD: wait until the whole frame is here.
        if masked:
            header += 4
        avail = n - pos - header
        if avail < 0 or <uint64_t>avail < length:
            break
        pos += header + <Py_ssize_t>length
        out.count += 1
    out.end = pos
    return out.count


cdef list _cut(const unsigned char* p, Py_ssize_t count):
    """Pass 2: build the `count` frames that _scan() validated at the start of p.

    The list is allocated at its final size; each payload is copied (and unmasked) once,
    straight into its new bytes object.
    """
    cdef list frames = PyList_New(count)
    cdef Py_ssize_t i, pos = 0
    cdef unsigned int b0, b1
    cdef Py_ssize_t length
    cdef bytes payload
    cdef tuple frame
    for i in range(count):
        b0 = p[pos]
        b1 = p[pos + 1]
        length = b1 & 0x7F
        pos += 2
        if length == 126:
            length = (<Py_ssize_t>p[pos] << 8) | p[pos + 1]
            pos += 2
        elif length == 127:
            length = <Py_ssize_t>_load_be64(p + pos)
            pos += 8
        if b1 & 0x80:
            payload = mask_to_bytes(p + pos + 4, length, p + pos)
            pos += 4
        else:
            payload = PyBytes_FromStringAndSize(<char*>p + pos, length)
        pos += length
        frame = (_OPCODES[b0 & 0x0F], (b0 & 0x80) != 0, (b0 & 0x40) != 0, payload)
        Py_INCREF(frame)                  # PyList_SET_ITEM steals the reference
        PyList_SET_ITEM(frames, i, frame)
    return frames


cdef class FrameParser:
    """Incremental frame parser; see the module docstring of `_frames_py` for the contract."""

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0

    def __init__(self, max_frame_bytes=1 << 20, require_mask=True, allow_rsv1=False):
        self._len = 0                       # like the twin, (re-)initialising empties the buffer
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
        cdef list frames
        cdef Scan scan
        if self.error is not None:
            raise self.error
        if self._len == 0:
            # Parse straight from the caller's bytes; keep only the unfinished tail.
            _scan(p, n, self.require_mask, self.allow_rsv1, self._max_bytes, &scan)
            frames = _cut(p, scan.count)
            if scan.fault == FAULT_NONE:
                self._keep(p + scan.end, n - scan.end)
        else:
            self._keep(p, n)
            _scan(self._buf, self._len, self.require_mask, self.allow_rsv1, self._max_bytes, &scan)
            frames = _cut(self._buf, scan.count)
            if scan.fault == FAULT_NONE:
                self._drop(scan.end)
        if scan.fault != FAULT_NONE:
            # The frames before the invalid one are returned; the rest of the input is dropped.
            self._clear()
            self.error = _FrameError(_FAULT_CODES[scan.fault], self._reason(&scan))
            if not frames:
                raise self.error
        return frames

    def peek_payload(self, Py_ssize_t start=0):
        """The frame still incomplete in the buffer, as far as it has arrived; see the twin."""
        cdef unsigned int b0, b1, length
        cdef Py_ssize_t header, n, i
        cdef unsigned char key[4]
        cdef bytes payload
        if self._len < 2 or self.error is not None:
            return None
        b0 = self._buf[0]
        b1 = self._buf[1]
        length = b1 & 0x7F
        header = 2 + (2 if length == 126 else (8 if length == 127 else 0)) + (4 if b1 & 0x80 else 0)
        if self._len < header:
            return None
        if start < 0:
            start = 0
        n = self._len - header - start
        if n < 0:
            n = 0
        if b1 & 0x80 and n:
            for i in range(4):              # the mask's phase at byte `start`
                key[i] = self._buf[header - 4 + (start + i) % 4]
            payload = mask_to_bytes(self._buf + header + start, n, key)
        else:
            payload = PyBytes_FromStringAndSize(<char*>self._buf + header + start, n)
        return (_OPCODES[b0 & 0x0F], (b0 & 0x40) != 0, payload)

    cdef str _reason(self, Scan* scan):
        """The twin's exact reason text for a fault."""
        if scan.fault == FAULT_RSV23:
            return "reserved bits RSV2/RSV3 must be 0"
        if scan.fault == FAULT_RSV1:
            return "reserved bit RSV1 set without a negotiated extension"
        if scan.fault == FAULT_CONTROL_OPCODE:
            return f"reserved control opcode {scan.opcode:#x}"
        if scan.fault == FAULT_FRAGMENTED_CONTROL:
            return "fragmented control frame"
        if scan.fault == FAULT_CONTROL_LENGTH:
            return "control frame payload longer than 125 bytes"
        if scan.fault == FAULT_DATA_OPCODE:
            return f"reserved data opcode {scan.opcode:#x}"
        if scan.fault == FAULT_UNMASKED:
            return "client frame is not masked"
        if scan.fault == FAULT_MASKED:
            return "server frame is masked"
        if scan.fault == FAULT_LENGTH_MSB:
            return "payload length has the most significant bit set"
        return f"frame of {scan.length} bytes exceeds the {self._max_obj}-byte limit"

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
