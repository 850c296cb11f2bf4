# cython: language_level=3, binding=False, embedsignature.format=clinic
"""Compiled twin of `_stream_py`: the per-read and per-write path of an open connection.

Same contract as the twin (read its docstring): `WebSocketStream` is the base class of
`gateway.connection.Connection`; `data_received` of an upgraded connection runs here
without a Python frame until the endpoint's `on_messages`, and the protocol calls
(`receive_data`, `data_to_send`) are C calls into `_protocol_c`. The Corker flushes its
connections through C calls too. Hooks into Connection (`_receive_http`,
`_after_close_sent`) are ordinary Python method calls: they run once per connection.
Flow control (pause_writing/resume_writing, the endpoint's read holds) is the twin's: a
transport over its high-water mark is not read, whatever filled it.
Imports nothing from `gateway`.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT, MSG_NOSIGNAL

from ._protocol_c cimport ServerProtocol

from . import constants

cdef enum:
    _CLOSED = 4     # constants.CLOSED, as a C constant

assert constants.CLOSED == _CLOSED


cdef class StreamStats:
    """Process-wide hot-path counters and the coarse clock; see the twin."""

    def __init__(self):
        self.messages_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.now = 0.0


cdef class Corker:
    """Flushes every connection that got frames during one event-loop pass, once, at its end."""

    def __init__(self, loop):
        self._loop = loop
        self._dirty = []
        self._scheduled = False

    def schedule(self, WebSocketStream conn):
        self._schedule(conn)

    cdef int _schedule(self, WebSocketStream conn) except -1:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_all)
        return 0

    def _flush_all(self):
        cdef list dirty = self._dirty
        cdef WebSocketStream conn
        self._dirty = []
        self._scheduled = False
        for conn in dirty:
            conn._flush()


cdef class WebSocketStream:
    """Base of Connection: the read -> messages -> one-write path (see the twin)."""

    def __init__(self, StreamStats stats, Corker corker):
        self.transport = None
        self.ws = None
        self.endpoint = None
        self.limiter = None
        self.stats = stats
        self.corker = corker
        self.phase = constants.HEAD
        self.last_seen = 0.0
        self.paused = False
        self._corked = False
        self.pinged = False
        self._closing = False
        self._fd = -2
        self._read_held = False

    def data_received(self, data):
        cdef ServerProtocol ws = self.ws
        cdef StreamStats stats
        cdef list messages
        cdef Py_ssize_t n
        if ws is None:
            self._receive_http(data)
            return
        stats = self.stats
        self.last_seen = stats.now
        stats.bytes_in += len(data)
        messages = ws.receive_data(data)
        n = len(messages)
        if n:
            stats.messages_in += n
            limiter = self.limiter
            if limiter is None:
                self.endpoint.on_messages(self, messages)
            else:
                # One clock read and a few float operations per read, whatever the batch size.
                allowed = limiter.take(n)
                if allowed == n:
                    self.endpoint.on_messages(self, messages)
                else:
                    limiter.exceeded(self, messages, allowed)   # the allowed ones, an error reply, close 4002
        if self._corked:
            return  # the Corker will flush this pass
        self._write(ws)

    cdef int _write(self, ServerProtocol ws) except -1:
        """Everything `ws` has queued, in one transport write (uvloop: writev for several)."""
        cdef list out = ws.data_to_send()
        cdef Py_ssize_t n = len(out), total = 0
        cdef bytes frame
        cdef StreamStats stats = self.stats
        if n == 1:
            frame = out[0]
            self.transport.write(frame)
            stats.bytes_out += PyBytes_GET_SIZE(frame)
            stats.frames_out += 1
        elif n:
            self.transport.writelines(out)
            for frame in out:
                total += PyBytes_GET_SIZE(frame)
            stats.bytes_out += total
            stats.frames_out += n
        if ws.close_sent:
            self._after_close_sent()
        return 0

    def flush(self):
        self._flush()

    cdef int _flush(self) except -1:
        self._corked = False
        if self.ws is None or self.phase == _CLOSED:
            return 0
        return self._write(self.ws)

    def send(self, int opcode, payload):
        """Queue one message; it leaves with this loop pass's single write."""
        if self.ws is None:
            raise RuntimeError("the connection is not open")
        self.ws.send(opcode, payload)
        if not self._corked:
            self._corked = True
            self.corker._schedule(self)

    def send_frame(self, bytes frame):
        """Queue a pre-encoded frame; it leaves with this loop pass's single write."""
        self._send_frame(frame)

    cdef int _send_frame(self, bytes frame) except -1:
        if self.ws is None:
            raise RuntimeError("the connection is not open")
        self.ws.send_frame(frame)
        if not self._corked:
            self._corked = True
            self.corker._schedule(self)
        return 0

    def send_shared(self, bytes data):
        """Write bytes shared by many connections (the hub's per-pass batch) now, in order; see the twin."""
        cdef StreamStats stats
        if self._corked:
            self._send_frame(data)
            return
        if self.ws is None:
            raise RuntimeError("the connection is not open")
        if self.ws.close_sent or self.phase == _CLOSED:
            return  # RFC 6455 section 5.5.1: nothing after our close frame
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef ssize_t n
        cdef int fd = self._fd
        if fd == -2:
            fd = self._direct_fd()
        # Direct send(2) when the transport holds nothing (order is kept): one system call and
        # no uvloop buffering per delivery, the round fan-out's whole per-member cost. What the
        # kernel does not take (or an error, which the transport then reports its own way)
        # goes through the transport, so flow control (pause_writing) works as before.
        # is_closing(): libuv closes the fd inside transport.close()/abort(), and a new
        # connection may get the same number before connection_lost marks this one CLOSED.
        if fd >= 0 and not self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            n = send(fd, PyBytes_AS_STRING(data), size, MSG_DONTWAIT | MSG_NOSIGNAL)
            if n == size:
                pass
            elif n > 0:
                self.transport.write(data[n:])
            else:
                self.transport.write(data)
        else:
            self.transport.write(data)
        stats = self.stats
        stats.frames_out += 1
        stats.bytes_out += size

    cdef int _direct_fd(self) except -2:
        """The fd for send_shared's direct send, looked up once: only a plain (not TLS) uvloop
        TCP transport qualifies, whose socket libuv keeps non-blocking."""
        cdef int fd = -1
        transport = self.transport
        if (type(transport).__name__ == "TCPTransport" and type(transport).__module__.startswith("uvloop")
                and transport.get_extra_info("sslcontext") is None):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                fd = sock.fileno()
        self._fd = fd
        return fd

    # -- flow control (asyncio.Protocol callbacks and the endpoint's holds); see the twin ---

    def pause_writing(self):
        """The transport's buffer passed its high-water mark: stop reading this client."""
        self.paused = True
        self._update_reading()

    def resume_writing(self):
        """Drained below the low-water mark: the endpoint may write its backlog, then read again."""
        self.paused = False
        if self.endpoint is not None:
            self.endpoint.on_writable(self)
        self._update_reading()

    def pause_reading(self):
        """The endpoint holds reading (idempotent); see resume_reading."""
        self._read_held = True
        self._update_reading()

    def resume_reading(self):
        """The endpoint releases its hold; reading resumes unless the transport is still full."""
        self._read_held = False
        self._update_reading()

    cdef int _update_reading(self) except -1:
        cdef bint want
        transport = self.transport
        if transport is None or self.phase == _CLOSED or transport.is_closing():
            return 0
        want = not (self.paused or self._read_held)
        if want != bool(transport.is_reading()):
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()
        return 0

    # -- hooks the subclass provides ------------------------------------------------------

    def _receive_http(self, data):
        raise NotImplementedError

    def _after_close_sent(self):
        raise NotImplementedError
