# cython: language_level=3
"""Contract of `_stream_c`: the per-read and per-write path of an open connection (see `_stream_py`)."""

from ._protocol_c cimport ServerProtocol


cdef class StreamStats:
    cdef public long long messages_in
    cdef public long long frames_out
    cdef public long long bytes_in
    cdef public long long bytes_out
    # Loop time of the gateway's last sweep (stamps last_seen without a clock read per read).
    cdef public double now


cdef class WebSocketStream


cdef class Corker:
    cdef object _loop
    cdef list _dirty
    cdef bint _scheduled

    cdef int _schedule(self, WebSocketStream conn) except -1


cdef class WebSocketStream:
    cdef public object transport
    cdef public ServerProtocol ws
    cdef public object endpoint
    cdef public object limiter
    cdef public StreamStats stats
    cdef public Corker corker
    cdef public double last_seen
    cdef public int phase
    cdef public bint paused
    cdef public bint _corked
    # Connection's own flags, here because C ints pack into this struct's padding where
    # Python slots cost 8 bytes each (memory at 50k): keepalive ping outstanding, and the
    # closing handshake started.
    cdef public bint pinged
    # send_shared's direct send(2): the socket's fd for a plain uvloop TCP transport, -1 for
    # any other transport (TLS, tests' fakes, asyncio's), -2 not looked up yet. An int here
    # fits the struct's padding: no bytes per connection.
    cdef int _fd
    # Two 1-byte flags (Python sees 0/1), so that with _fd the struct stays at 104 bytes:
    # the closing handshake started (connection.py), and the endpoint holds reading
    # (pause_reading; the transport reads only when neither this nor `paused` holds it).
    cdef public char _closing
    cdef public char _read_held

    cdef int _write(self, ServerProtocol ws) except -1
    cdef int _flush(self) except -1
    cdef int _send_frame(self, bytes frame) except -1
    cdef int _direct_fd(self) except -2
    cdef int _update_reading(self) except -1
