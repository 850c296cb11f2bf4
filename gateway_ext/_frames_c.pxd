# cython: language_level=3
"""Contract of `_frames_c`: the incremental RFC 6455 frame parser (see `_frames_c.pyx`)."""

from libc.stdint cimport uint64_t

# Which per-frame rule was broken (the order matches _FAULT_CODES in the .pyx).
cdef enum FrameFault:
    FAULT_NONE = 0
    FAULT_RSV23 = 1
    FAULT_RSV1 = 2
    FAULT_CONTROL_OPCODE = 3
    FAULT_FRAGMENTED_CONTROL = 4
    FAULT_CONTROL_LENGTH = 5
    FAULT_DATA_OPCODE = 6
    FAULT_UNMASKED = 7
    FAULT_MASKED = 8
    FAULT_LENGTH_MSB = 9
    FAULT_TOO_BIG = 10

# Result of the header pass over one read.
cdef struct Scan:
    Py_ssize_t count        # complete, valid frames at the start of the input
    Py_ssize_t end          # bytes those frames use
    int fault               # FAULT_NONE, or the rule the next frame breaks
    unsigned int opcode     # the reserved opcode, for the error text
    uint64_t length         # the oversized length, for the error text


cdef class FrameParser:
    # One growable byte buffer holding the unparsed tail: _buf[0:_len], capacity _cap.
    # It stays empty (and unallocated) while every read ends on a frame boundary.
    cdef unsigned char* _buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    # max_frame_bytes as given (for the error text) and as a clamped C integer (for the check).
    cdef object _max_obj
    cdef long long _max_bytes
    cdef public bint require_mask
    cdef public bint allow_rsv1
    # None while alive; the FrameError that killed the parser afterwards.
    cdef public object error

    # feed() for compiled callers that already hold a pointer to the bytes of one read.
    cdef list feed_ptr(self, const unsigned char* p, Py_ssize_t n)
    cdef str _reason(self, Scan* scan)
    cdef int _reserve(self, Py_ssize_t total) except -1
    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef void _drop(self, Py_ssize_t consumed) noexcept
    cdef void _clear(self) noexcept
