# cython: language_level=3
"""Contract of `_encode_c`: build one outgoing frame as immutable bytes (RFC 6455 section 5.2)."""

# encode_frame() for compiled callers that already hold a pointer to the payload;
# `key` is NULL for an unmasked (server) frame, else 4 bytes.
cdef bytes encode_ptr(int opcode, const unsigned char* p, Py_ssize_t n, bint fin, bint rsv1,
                      const unsigned char* key)
