# cython: language_level=3, binding=False, embedsignature.format=clinic
# binding=False: plain builtin functions/methods, called without the CyFunction layer
# (~80 fewer instructions per call, callgrind on encode_frame); embedsignature.format=clinic
# keeps inspect.signature() working on them.
"""Compiled twin of `_utf8_py`: incremental, fail-fast UTF-8 validation.

Text messages must be valid UTF-8 (RFC 6455 sections 5.6 and 8.1) as defined by RFC 3629
section 4: no overlong forms, no surrogates (U+D800-U+DFFF), nothing above U+10FFFF.
An invalid prefix fails on the very byte that makes it invalid (RFC 6455 section 8.1:
fail as soon as it is known), exactly like the twin.

Theory of operation: a shift-based DFA. Each state is a bit offset (a multiple of 6) and
`_TABLE[byte]` packs the next state of every state into one uint64, so one step is
`state = _TABLE[byte] >> (state & 63)`: one shift on the critical path, no second table
(Per Vognsen's shift-based DFA). REJECT is offset 0, so every transition not written
below rejects, and REJECT maps to itself: the state is tested once per 16-byte block,
not per byte. Runs of ASCII between characters are skipped 32/16 bytes at a time.
Imports nothing from `gateway`.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

# Intermediate states (UTF8_REJECT = 0 and UTF8_ACCEPT = 6 are in the .pxd).
cdef enum:
    _CONT1 = 12        # one continuation byte 80..BF left
    _CONT2 = 18        # two left
    _CONT3 = 24        # three left
    _E0 = 30           # after E0: A0..BF, else the code point would be overlong (< U+0800)
    _ED = 36           # after ED: 80..9F, else it would be a surrogate (U+D800..U+DFFF)
    _F0 = 42           # after F0: 90..BF, else overlong (< U+10000)
    _F4 = 48           # after F4: 80..8F, else above U+10FFFF

cdef uint64_t _TABLE[256]
cdef uint64_t _HIGH_BITS = 0x8080808080808080ULL


cdef void _edge(unsigned int src, int lo, int hi, unsigned int dst):
    cdef int b
    for b in range(lo, hi + 1):
        _TABLE[b] |= (<uint64_t>dst) << src


cdef void _build_table():
    cdef int b
    for b in range(256):
        _TABLE[b] = 0
    # RFC 3629 section 4, the UTF8-octets grammar, one edge per byte range.
    _edge(UTF8_ACCEPT, 0x00, 0x7F, UTF8_ACCEPT)
    _edge(UTF8_ACCEPT, 0xC2, 0xDF, _CONT1)      # C0, C1 would only start overlong forms
    _edge(UTF8_ACCEPT, 0xE0, 0xE0, _E0)
    _edge(UTF8_ACCEPT, 0xE1, 0xEC, _CONT2)
    _edge(UTF8_ACCEPT, 0xED, 0xED, _ED)
    _edge(UTF8_ACCEPT, 0xEE, 0xEF, _CONT2)
    _edge(UTF8_ACCEPT, 0xF0, 0xF0, _F0)
    _edge(UTF8_ACCEPT, 0xF1, 0xF3, _CONT3)
    _edge(UTF8_ACCEPT, 0xF4, 0xF4, _F4)         # F5..FF would be above U+10FFFF
    _edge(_CONT1, 0x80, 0xBF, UTF8_ACCEPT)
    _edge(_CONT2, 0x80, 0xBF, _CONT1)
    _edge(_CONT3, 0x80, 0xBF, _CONT2)
    _edge(_E0, 0xA0, 0xBF, _CONT1)
    _edge(_ED, 0x80, 0x9F, _CONT1)
    _edge(_F0, 0x90, 0xBF, _CONT2)
    _edge(_F4, 0x80, 0x8F, _CONT2)


_build_table()


cdef unsigned int utf8_scan(unsigned int state, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Run the DFA over p[:n] from `state`; returns the new state (UTF8_REJECT if any byte was bad).

    REJECT is absorbing, so the state is only tested once per 16-byte block: the block
    itself runs branch-free. `row >> (s & 63)` compiles to a single shift (x86 masks the
    count anyway), so the state's upper bits may hold garbage and the critical path is one
    instruction per byte.
    """
    cdef Py_ssize_t i = 0
    cdef uint64_t s = state, w0, w1, w2, w3
    cdef int k
    while n - i >= 16:
        if (s & 63) == UTF8_ACCEPT:
            # Between characters: skip pure-ASCII blocks without touching the DFA,
            # 32 bytes per test while the run lasts, then 16.
            while n - i >= 32:
                memcpy(&w0, p + i, 8)
                memcpy(&w1, p + i + 8, 8)
                memcpy(&w2, p + i + 16, 8)
                memcpy(&w3, p + i + 24, 8)
                if (w0 | w1 | w2 | w3) & _HIGH_BITS:
                    break
                i += 32
            while n - i >= 16:
                memcpy(&w0, p + i, 8)
                memcpy(&w1, p + i + 8, 8)
                if (w0 | w1) & _HIGH_BITS:
                    break
                i += 16
            if n - i < 16:
                break
        for k in range(16):
            s = _TABLE[p[i + k]] >> (s & 63)
        i += 16
        if (s & 63) == UTF8_REJECT:
            return UTF8_REJECT
    while i < n:
        s = _TABLE[p[i]] >> (s & 63)
        i += 1
    return <unsigned int>(s & 63)


cdef inline unsigned int _scan_object(unsigned int state, object data) except 1:  # 1 is never a state
    # Bytes-like objects only (like the twin after its fix): bytes fast path, else the buffer protocol.
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return utf8_scan(state, <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    state = utf8_scan(state, <const unsigned char*>view.buf, view.len)
    PyBuffer_Release(&view)
    return state


def validate_utf8(data) -> bool:
    """True when `data` is one complete, valid UTF-8 string."""
    return _scan_object(UTF8_ACCEPT, data) == UTF8_ACCEPT


cdef class Utf8Validator:
    """Validates a UTF-8 stream fed in arbitrary chunks.

    `feed(chunk)` returns False as soon as the bytes seen so far cannot be the start
    of valid UTF-8 and keeps returning False until `reset()`. `complete()` is True when
    no multi-byte sequence is left unfinished (check it on the final fragment).
    """

    def __cinit__(self):
        self._state = UTF8_ACCEPT

    cdef bint feed_ptr(self, const unsigned char* p, Py_ssize_t n) noexcept:
        if self._state != UTF8_REJECT:
            self._state = utf8_scan(self._state, p, n)
        return self._state != UTF8_REJECT

    def feed(self, data) -> bool:
        if self._state == UTF8_REJECT:
            return False
        self._state = _scan_object(self._state, data)
        return self._state != UTF8_REJECT

    def complete(self) -> bool:
        return self._state == UTF8_ACCEPT

    def reset(self) -> None:
        self._state = UTF8_ACCEPT
