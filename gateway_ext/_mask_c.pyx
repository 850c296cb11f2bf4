# cython: language_level=3, binding=False, embedsignature.format=clinic
# binding=False: plain builtin functions/methods, called without the CyFunction layer
# (~80 fewer instructions per call, callgrind on encode_frame); embedsignature.format=clinic
# keeps inspect.signature() working on them.
"""Compiled twin of `_mask_py`: XOR a payload with the 4-byte masking key (RFC 6455 section 5.3).

The work is done by the inline helpers of `_mask_c.pxd` (shared with `_frames_c` and
`_encode_c`); this module only exposes them to Python. Imports nothing from `gateway`.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE


def apply_mask(data, mask) -> bytes:
    """Return `data` XOR the repeating 4-byte `mask` as new immutable bytes.

    Both arguments are bytes-like objects (bytes, bytearray, memoryview, ...).
    Masking is an involution: the same call masks and unmasks.
    """
    cdef Py_buffer dview
    cdef Py_buffer mview
    cdef const unsigned char* key
    # Same order of checks as the twin: the key is judged before the data.
    PyObject_GetBuffer(mask, &mview, PyBUF_SIMPLE)
    try:
        if mview.len != 4:
            raise ValueError("mask must be exactly 4 bytes")
        key = <const unsigned char*>mview.buf
        if PyBytes_CheckExact(data):
            # Fast path: no buffer export needed for the common case.
            return mask_to_bytes(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), key)
        PyObject_GetBuffer(data, &dview, PyBUF_SIMPLE)
        try:
            return mask_to_bytes(<const unsigned char*>dview.buf, dview.len, key)
        finally:
            PyBuffer_Release(&dview)
    finally:
        PyBuffer_Release(&mview)
