# cython: language_level=3
"""Contract of `_mask_c`: XOR with the 4-byte masking key (RFC 6455 section 5.3).

The helpers below are `inline`, so every module that cimports them (`_frames_c`,
`_encode_c`) compiles its own copy and needs no runtime import of `_mask_c`. They let a
caller unmask *while copying* into a freshly allocated `bytes` object: one pass over the
payload, no intermediate buffer.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline void mask_copy(unsigned char* dst, const unsigned char* src, Py_ssize_t n,
                           const unsigned char* key) noexcept nogil:
    """dst[i] = src[i] ^ key[i % 4] for i < n. dst may equal src (in-place), not overlap otherwise.

    Word at a time: the key repeated twice is one uint64 with the same byte order in memory
    on any endianness, so every 8-byte word (which starts at a multiple of 4) XORs with it.
    memcpy() loads/stores compile to plain unaligned moves.
    """
    cdef uint32_t k32
    cdef uint64_t k64, w0, w1, w2, w3
    cdef Py_ssize_t i = 0
    memcpy(&k32, key, 4)
    k64 = (<uint64_t>k32 << 32) | k32
    # Four independent words per iteration keep the pipeline busy on long payloads.
    while i + 32 <= n:
        memcpy(&w0, src + i, 8)
        memcpy(&w1, src + i + 8, 8)
        memcpy(&w2, src + i + 16, 8)
        memcpy(&w3, src + i + 24, 8)
        w0 ^= k64
        w1 ^= k64
        w2 ^= k64
        w3 ^= k64
        memcpy(dst + i, &w0, 8)
        memcpy(dst + i + 8, &w1, 8)
        memcpy(dst + i + 16, &w2, 8)
        memcpy(dst + i + 24, &w3, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&w0, src + i, 8)
        w0 ^= k64
        memcpy(dst + i, &w0, 8)
        i += 8
    # i is a multiple of 8 here, so key[i & 3] is still in phase.
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef inline bytes mask_to_bytes(const unsigned char* src, Py_ssize_t n, const unsigned char* key):
    """New `bytes` of src[:n] XOR key, written directly into the object's storage."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    mask_copy(<unsigned char*>PyBytes_AS_STRING(out), src, n, key)
    return out
