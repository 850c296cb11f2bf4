# cython: language_level=3
"""Contract of `_frames_c`: the incremental RFC 6455 frame parser (see `_frames_c.pyx`)."""


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
    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n, list frames) except -1
    cdef int _fail(self, int code, str reason) except -1
    cdef int _reserve(self, Py_ssize_t total) except -1
    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef void _drop(self, Py_ssize_t consumed) noexcept
    cdef void _clear(self) noexcept
