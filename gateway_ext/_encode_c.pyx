# cython: language_level=3, binding=False, embedsignature.format=clinic
# binding=False: plain builtin functions/methods, called without the CyFunction layer
# (~80 fewer instructions per call, callgrind on encode_frame); embedsignature.format=clinic
# keeps inspect.signature() working on them.
"""Compiled twin of `_encode_py`: build one outgoing frame as immutable bytes.

The result is shared by every recipient of a broadcast, so it is `bytes`, allocated
once at its final size: header and payload are written straight into it (and masked
while copying when a key is given). Imports nothing from `gateway`.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from ._mask_c cimport mask_copy


cdef bytes encode_ptr(int opcode, const unsigned char* p, Py_ssize_t n, bint fin, bint rsv1,
                      const unsigned char* key):
    cdef Py_ssize_t header = 2
    cdef unsigned char mbit = 0x80 if key is not NULL else 0
    cdef unsigned char* out
    cdef bytes frame
    cdef uint64_t length = <uint64_t>n
    cdef int i
    # RFC 6455 section 5.2: the minimal length encoding (7 bits, then 16, then 64).
    if n >= 0x10000:
        header = 10
    elif n >= 126:
        header = 4
    if key is not NULL:
        header += 4
    frame = PyBytes_FromStringAndSize(NULL, header + n)
    out = <unsigned char*>PyBytes_AS_STRING(frame)
    out[0] = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    if n < 126:
        out[1] = mbit | <unsigned char>n
        out += 2
    elif n < 0x10000:
        out[1] = mbit | 126
        out[2] = <unsigned char>(n >> 8)
        out[3] = <unsigned char>n
        out += 4
    else:
        out[1] = mbit | 127
        for i in range(8):
            out[2 + i] = <unsigned char>(length >> (56 - 8 * i))
        out += 10
    if key is not NULL:
        memcpy(out, key, 4)
        mask_copy(out + 4, p, n, key)
    elif n:
        memcpy(out, p, n)
    return frame


cdef inline bytes _encode_masked(int opcode, const unsigned char* p, Py_ssize_t n, bint fin, bint rsv1, object mask):
    cdef Py_buffer mview
    PyObject_GetBuffer(mask, &mview, PyBUF_SIMPLE)
    try:
        if mview.len != 4:
            raise ValueError("mask must be exactly 4 bytes")
        return encode_ptr(opcode, p, n, fin, rsv1, <const unsigned char*>mview.buf)
    finally:
        PyBuffer_Release(&mview)


def encode_frame(int opcode, payload=b"", bint fin=True, bint rsv1=False, mask=None) -> bytes:
    """Encode a frame header + payload (RFC 6455 section 5.2).

    Servers send unmasked frames (`mask=None`); clients pass a 4-byte key.
    """
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t n
    if PyBytes_CheckExact(payload):
        # Fast path (every broadcast): no buffer export.
        p = <const unsigned char*>PyBytes_AS_STRING(payload)
        n = PyBytes_GET_SIZE(payload)
        if mask is None:
            return encode_ptr(opcode, p, n, fin, rsv1, NULL)
        return _encode_masked(opcode, p, n, fin, rsv1, mask)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if mask is None:
            return encode_ptr(opcode, <const unsigned char*>view.buf, view.len, fin, rsv1, NULL)
        return _encode_masked(opcode, <const unsigned char*>view.buf, view.len, fin, rsv1, mask)
    finally:
        PyBuffer_Release(&view)
