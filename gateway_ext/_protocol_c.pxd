# cython: language_level=3
"""Contract of `_protocol_c`: the sans-I/O WebSocket server protocol (see `_protocol_py`)."""

from ._frames_c cimport FrameParser
from ._utf8_c cimport Utf8Validator


cdef class SharedParser:
    cdef public FrameParser parser
    cdef public object max_bytes
    cdef public bint allow_rsv1

    cpdef FrameParser take(self)


cdef class ServerProtocol:
    # State.OPEN / CLOSING / CLOSED as a C int (the `state` property gives the enum).
    cdef int _state
    cdef SharedParser _shared
    # This connection's own parser while a read left a partial frame in it (or it died).
    cdef readonly FrameParser _parser
    cdef Utf8Validator _utf8
    cdef int _frag_opcode
    cdef list _frag_parts
    cdef Py_ssize_t _frag_size
    cdef list _out
    cdef public int close_code
    cdef public str close_reason
    cdef public bint close_sent
    cdef public bint close_received
    cdef public bint failed
    cdef public Py_ssize_t pongs_received
    cdef tuple _pending_close
    cdef public object deflate
    cdef bint _frag_compressed
    cdef Py_ssize_t _min_bytes
    cdef Py_ssize_t _inflated
    cdef Py_ssize_t _inflate_budget

    cpdef list receive_data(self, data)
    cpdef send(self, int opcode, payload)
    cpdef send_frame(self, bytes frame)
    cpdef list data_to_send(self)
    cdef int _queue(self, bytes frame) except -1
    cdef int _fail(self, int code, str reason) except -1
    cdef int _send_close(self, int code, str reason) except -1
    cdef bint _start_fragments(self, int opcode, bytes payload) except -1
    cdef bint _start_compressed(self, object opcode, bint fin, bytes payload, list messages) except -1
    cdef bint _finish_compressed(self, object opcode, object payload, list messages) except -1
    cdef bint _continue_fragments(self, bint fin, bytes payload, list messages) except -1
    cdef bint _continue_compressed(self, bint fin, bytes payload, list messages) except -1
    cdef int _receive_close(self, bytes payload) except -1
