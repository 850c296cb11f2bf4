# cython: language_level=3
"""Contract of `_utf8_c`: incremental, fail-fast UTF-8 validation (RFC 6455 sections 5.6, 8.1).

`utf8_scan` is exported for other compiled modules (runtime cimport); `Utf8Validator` is the
stateful validator, with `feed_ptr` for compiled callers that already hold a pointer.
"""

# DFA states are bit offsets into a 64-bit transition row (see _utf8_c.pyx).
cdef enum:
    UTF8_REJECT = 0
    UTF8_ACCEPT = 6

cdef unsigned int utf8_scan(unsigned int state, const unsigned char* p, Py_ssize_t n) noexcept nogil


cdef class Utf8Validator:
    # UTF8_ACCEPT between characters, UTF8_REJECT (absorbing) once the prefix is invalid,
    # any other value in the middle of a multi-byte sequence.
    cdef unsigned int _state

    cdef bint feed_ptr(self, const unsigned char* p, Py_ssize_t n) noexcept
