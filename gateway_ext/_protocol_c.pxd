# cython: language_level=3
"""Contract of `_protocol_c`: the sans-I/O WebSocket server protocol (see `_protocol_py`)."""

from ._frames_c cimport FrameParser
from ._utf8_c cimport Utf8Validator


cdef class SharedParser:
    cdef public FrameParser parser
    cdef public object max_bytes
    cdef public bint allow_rsv1
    # Frames one fragmented message may span (constants.MAX_FRAGMENTS): a setting shared by
    # every connection with these settings, so it costs no connection anything.
    cdef public Py_ssize_t max_fragments

    cpdef FrameParser take(self)


cdef class ServerProtocol:
    # Fields ordered pointers, then 8-byte, then 4-byte ones: no padding (memory at 50k).
    cdef SharedParser _shared
    # This connection's own parser while a read left a partial frame in it (or it died).
    cdef readonly FrameParser _parser
    cdef Utf8Validator _utf8
    # The message being reassembled: a bytes object referenced only here, grown in place;
    # _frag_size bytes of it are used (see _frag_append). None between messages.
    cdef bytes _frag_buf
    cdef list _out
    cdef public str close_reason
    cdef tuple _pending_close
    cdef public object deflate
    cdef Py_ssize_t _frag_size
    cdef public Py_ssize_t pongs_received
    cdef long long _inflated   # bytes inflated during the current read (permessage-deflate)
    # Payload bytes of the frame still arriving already fed to `_utf8` (see _check_partial).
    cdef Py_ssize_t _checked
    # State.OPEN / CLOSING / CLOSED as a C int (the `state` property gives the enum).
    cdef int _state
    cdef int _frag_opcode
    cdef int _frag_count       # frames of the message being reassembled (<= max_fragments)
    cdef public int close_code
    cdef public bint close_sent
    cdef public bint close_received
    cdef public bint failed
    cdef bint _frag_compressed

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
    cdef int _frag_begin(self, bytes payload) except -1
    cdef int _frag_resize(self, Py_ssize_t size) except -1
    cdef int _frag_append(self, bytes payload) except -1
    cdef bytes _frag_take(self)
    cdef int _receive_close(self, bytes payload) except -1
    cdef bint _text_complete(self, bytes payload) except -1
    cdef int _check_partial(self, FrameParser parser) except -1
