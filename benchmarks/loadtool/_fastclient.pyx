# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load tool's compiled hot loops: handshake, fan-out and echo windows (Linux, IPv4).

Why: the pure-Python client (asyncio protocols on uvloop) spends ~1 µs of Python per
read and several µs per handshake, so in handshake and round fan-out modes it saturated
its own core before a fast server did (issue 19). Here each mode's measurement window is
one C loop over epoll(7) and non-blocking sockets: recv(2)/send(2) straight into
preallocated buffers, no Python object per read, per frame or per handshake.

What stays in Python (benchmarks/loadtool/{handshake,fanout,echo}.py): arguments, opening
and joining connections (not timed), closing them, the RESULT line. For fan-out and echo
the Python side opens the WebSockets as usual, pauses its transports and hands their file
descriptors to `run_fanout` / `run_echo` for warmup + window; the event loop does not run
meanwhile, and the C loop owns the sockets' reads and writes. Handshake mode runs whole
in `run_handshake` (its cycles are the measurement).

Pure-Python fallback: when this module is not built (`python setup.py build_ext
--inplace` builds it next to this file), or with `--client-impl python`, the modes run
their asyncio code; tests/system/test_loadtool.py runs both. Built only in place: it is
not part of the installed gateway packages (setup.py).

Must not import gateway code: only the standard library.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno, EAGAIN, EINPROGRESS, EINTR
from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from array import array


cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

cdef extern from "<string.h>" nogil:
    void *memrchr(const void *s, int c, size_t n)
    void *memmem(const void *h, size_t hl, const void *n, size_t nl)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *tp)
    int CLOCK_MONOTONIC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int AF_INET, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_ERROR, MSG_NOSIGNAL

cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    struct in_addr:
        in_addr_t s_addr
    struct sockaddr_in:
        int sin_family
        unsigned short sin_port
        in_addr sin_addr
    int IPPROTO_TCP, IPPROTO_IP
    unsigned short htons(unsigned short)

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    ctypedef epoll_data epoll_data_t
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLL_CLOEXEC

# Linux: defer the ephemeral port choice from bind() to connect() (as wsclient does).
DEF IP_BIND_ADDRESS_NO_PORT = 24
DEF MAX_EVENTS = 512
DEF HEAD_CAP = 4096          # the 101 response head and what follows it, per handshake slot
DEF TAIL = 48                # fan-out: bytes of a read kept to find a `"k":N,` cut by the read's end
DEF RECV_CAP = 262144


cdef inline double now() nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def errno_kind(int err):
    """The exception name Python gives an errno (ConnectionRefusedError, ...), as the asyncio path reports."""
    return type(OSError(err, "")).__name__


cdef class _Doubles:
    """A growable C array of doubles (latency samples), turned into array('d') at the end."""
    cdef double *data
    cdef Py_ssize_t n, cap

    def __cinit__(self):
        self.cap = 4096
        self.n = 0
        self.data = <double *>malloc(self.cap * sizeof(double))
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.data)

    cdef int append(self, double x) except -1:
        cdef double *grown
        if self.n == self.cap:
            grown = <double *>realloc(self.data, 2 * self.cap * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self.data = grown
            self.cap *= 2
        self.data[self.n] = x
        self.n += 1
        return 0

    cdef object to_array(self):
        out = array("d")
        cdef Py_ssize_t i
        for i in range(self.n):
            out.append(self.data[i])
        return out


cdef int _ipv4(str host, in_addr *out) except -1:
    if inet_pton(AF_INET, host.encode("ascii"), out) != 1:
        raise ValueError(f"the compiled client takes IPv4 addresses only, got {host!r}")
    return 0


# ---------------------------------------------------------------------------------------
# Handshake mode
# ---------------------------------------------------------------------------------------

cdef enum:
    S_IDLE = 0          # waiting for restart_at (after an error) or stopped
    S_CONNECTING = 1    # connect() in progress, request not sent yet (EPOLLOUT)
    S_UPGRADING = 2     # request sent, reading the 101 (EPOLLIN)
    S_CLOSING = 3       # our close frame sent, waiting for the server's close frame or EOF

cdef struct HSlot:
    int fd
    int state
    int req
    int blen
    double t0
    double t1
    double deadline
    double restart_at
    char buf[HEAD_CAP]

# epoll data of a lingering socket (waiting for the server's FIN after the close handshake)
DEF LINGER_BIT = 0x80000000


cdef int _head_ok(const char *head, int hlen, const char *accept, int alen) nogil:
    """1 if `head` (the response up to the blank line) is a 101 with the expected accept.

    RFC 6455 section 4.1 (client requirements): status 101, and Sec-WebSocket-Accept equal to
    base64(SHA-1(key + GUID)); header names compare case-insensitively. 0: not 101, -1: accept
    missing or wrong.
    """
    cdef const char *name = b"sec-websocket-accept"
    cdef int i = 0, j, k, line_end, colon, vstart, vend
    if hlen < 12 or memcmp(head, b"HTTP/1.", 7) != 0 or memcmp(head + 8, b" 101", 4) != 0:
        return 0
    if hlen > 12 and head[12] != c' ' and head[12] != c'\r':
        return 0     # 1010, 1011, ...
    # walk the header lines
    while i < hlen and head[i] != c'\n':
        i += 1
    i += 1
    while i < hlen:
        line_end = i
        while line_end < hlen and head[line_end] != c'\r' and head[line_end] != c'\n':
            line_end += 1
        colon = i
        while colon < line_end and head[colon] != c':':
            colon += 1
        if colon - i == 20:
            k = 1
            for j in range(20):
                if (head[i + j] | 0x20) != name[j] and not (name[j] == c'-' and head[i + j] == c'-'):
                    k = 0
                    break
            if k:
                vstart = colon + 1
                vend = line_end
                while vstart < vend and (head[vstart] == c' ' or head[vstart] == c'\t'):
                    vstart += 1
                while vend > vstart and (head[vend - 1] == c' ' or head[vend - 1] == c'\t'):
                    vend -= 1
                if vend - vstart == alen and memcmp(head + vstart, accept, alen) == 0:
                    return 1
                return -1
        i = line_end
        while i < hlen and (head[i] == c'\r' or head[i] == c'\n'):
            i += 1
    return -1


def head_ok(bytes head, bytes accept):
    """Python entry for the differential test against wsclient.check_response: 1 valid 101,
    0 another status, -1 accept missing or wrong."""
    return _head_ok(PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head), PyBytes_AS_STRING(accept), PyBytes_GET_SIZE(accept))


cdef int _has_close_frame(const char *buf, int n) nogil:
    """1 if the server's (unmasked) frames in buf[0:n] include a close frame; -1 if a frame
    header is cut off (need more bytes); 0 if only other whole frames."""
    cdef int pos = 0, header, plen
    while n - pos >= 2:
        plen = (<uint8_t>buf[pos + 1]) & 0x7F
        header = 2 + (2 if plen == 126 else (8 if plen == 127 else 0))
        if n - pos < header:
            return -1
        if (<uint8_t>buf[pos]) & 0x0F == 0x8:
            return 1
        if plen == 126:
            plen = ((<uint8_t>buf[pos + 2]) << 8) | (<uint8_t>buf[pos + 3])
        elif plen == 127:
            return 0   # no server sends 8-byte lengths during a handshake cycle; stop looking
        pos += header + plen
    return -1 if pos < n else 0


cdef class _HandshakeRun:
    cdef HSlot *slots
    cdef int nslots
    cdef int epfd
    cdef int *linger_gen        # per fd: generation of its linger, 0 = not lingering
    cdef int maxfd
    cdef int *lq_fd             # FIFO of lingering sockets (deadlines are in order)
    cdef int *lq_gen
    cdef double *lq_deadline
    cdef int lq_head, lq_tail, lq_cap
    cdef int gen
    cdef int lingering
    cdef sockaddr_in dest
    cdef in_addr *sources
    cdef int nsources, next_source
    cdef list requests          # keep the bytes alive
    cdef list accepts
    cdef const char **req_ptr
    cdef int *req_len
    cdef const char **acc_ptr
    cdef int *acc_len
    cdef int nreq
    cdef bytes close_frame
    cdef object error_cb
    cdef double connect_timeout
    cdef double window_start, window_end
    cdef bint stopping
    cdef public long counted
    cdef _Doubles lat

    def __cinit__(self):
        self.slots = NULL
        self.epfd = -1

    def __dealloc__(self):
        free(self.slots)
        free(self.linger_gen)
        free(self.lq_fd)
        free(self.lq_gen)
        free(self.lq_deadline)
        free(self.sources)
        free(self.req_ptr)
        free(self.req_len)
        free(self.acc_ptr)
        free(self.acc_len)
        if self.epfd >= 0:
            close(self.epfd)

    cdef int error(self, HSlot *s, str kind) except -1:
        if s.fd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.fd, NULL)
            close(s.fd)
            s.fd = -1
        s.state = S_IDLE
        s.restart_at = now() + 0.01   # a refused port must not become a busy loop
        self.error_cb(kind)
        return 0

    cdef int start(self, int index) except -1:
        cdef HSlot *s = &self.slots[index]
        cdef int fd, one = 1, err
        cdef sockaddr_in src
        cdef epoll_event ev
        cdef ssize_t n
        s.state = S_IDLE
        s.fd = -1
        if self.stopping:
            return 0
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return self.error(s, errno_kind(errno))
        s.fd = fd
        if fd >= self.maxfd:
            return self.error(s, "fd above RLIMIT_NOFILE")
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        if self.nsources:
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
            memset(&src, 0, sizeof(src))
            src.sin_family = AF_INET
            src.sin_addr = self.sources[self.next_source]
            self.next_source = (self.next_source + 1) % self.nsources
            if bind(fd, <sockaddr *>&src, sizeof(src)) < 0:
                return self.error(s, errno_kind(errno))
        s.t0 = now()
        s.deadline = s.t0 + self.connect_timeout
        s.blen = 0
        s.req = (s.req + 1) % self.nreq
        if connect(fd, <sockaddr *>&self.dest, sizeof(self.dest)) < 0 and errno != EINPROGRESS:
            return self.error(s, errno_kind(errno))
        # On loopback the TCP handshake has usually finished when connect() returns: try the
        # request at once and fall back to waiting for writability.
        n = send(fd, self.req_ptr[s.req], self.req_len[s.req], MSG_NOSIGNAL)
        ev.data.u64 = <uint64_t>index
        if n == self.req_len[s.req]:
            s.state = S_UPGRADING
            ev.events = EPOLLIN
        elif n < 0 and (errno == EAGAIN or errno == EWOULDBLOCK):
            s.state = S_CONNECTING
            ev.events = EPOLLOUT
        elif n < 0:
            return self.error(s, errno_kind(errno))
        else:
            return self.error(s, "short write of the upgrade request")
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            return self.error(s, errno_kind(errno))
        return 0

    cdef int on_writable(self, int index) except -1:
        cdef HSlot *s = &self.slots[index]
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        cdef ssize_t n
        cdef epoll_event ev
        getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
        if err:
            return self.error(s, errno_kind(err))
        n = send(s.fd, self.req_ptr[s.req], self.req_len[s.req], MSG_NOSIGNAL)
        if n < 0 and (errno == EAGAIN or errno == EWOULDBLOCK):
            return 0
        if n != self.req_len[s.req]:
            return self.error(s, errno_kind(errno) if n < 0 else "short write of the upgrade request")
        s.state = S_UPGRADING
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>index
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, s.fd, &ev)
        return 0

    cdef int on_readable(self, int index) except -1:
        cdef HSlot *s = &self.slots[index]
        cdef ssize_t n
        cdef const char *end
        cdef int hlen, ok, rest, found
        cdef double t2
        if s.blen >= HEAD_CAP:
            return self.error(s, "handshake: response head too long")
        n = recv(s.fd, s.buf + s.blen, HEAD_CAP - s.blen, 0)
        if n < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
                return 0
            return self.error(s, errno_kind(errno))
        if n == 0:
            if s.state == S_UPGRADING:
                return self.error(s, "handshake: connection lost during the upgrade")
            return self.done(index, 0)      # EOF instead of a close frame ends the cycle too
        s.blen += n
        if s.state == S_UPGRADING:
            end = <const char *>memmem(s.buf, s.blen, b"\r\n\r\n", 4)
            if end == NULL:
                return 0
            hlen = end - s.buf
            ok = _head_ok(s.buf, hlen, self.acc_ptr[s.req], self.acc_len[s.req])
            if ok == 0:
                return self.error(s, "handshake: status " + s.buf[9:min(hlen, 40)].decode("latin-1", "replace").split("\r")[0])
            if ok < 0:
                return self.error(s, "handshake: wrong or no Sec-WebSocket-Accept")
            s.t1 = now()
            n = send(s.fd, PyBytes_AS_STRING(self.close_frame), PyBytes_GET_SIZE(self.close_frame), MSG_NOSIGNAL)
            if n != PyBytes_GET_SIZE(self.close_frame):
                return self.error(s, errno_kind(errno) if n < 0 else "short write of the close frame")
            rest = s.blen - hlen - 4
            memcpy(s.buf, s.buf + hlen + 4, rest)
            s.blen = rest
            s.state = S_CLOSING
        found = _has_close_frame(s.buf, s.blen)
        if found == 1:
            return self.done(index, 1)
        if found == 0:
            s.blen = 0      # only other whole frames: drop them
        return 0

    cdef int done(self, int index, bint linger) except -1:
        """The cycle ended (server close frame, or EOF): count it, keep the socket for the
        server's FIN if asked (RFC 6455 section 7.1.1: the server closes TCP first, so
        TIME_WAIT stays on its side), start the next cycle."""
        cdef HSlot *s = &self.slots[index]
        cdef double t2 = now()
        cdef epoll_event ev
        cdef int fd = s.fd
        if self.window_start <= t2 < self.window_end:
            self.counted += 1
            self.lat.append(s.t1 - s.t0)
        s.fd = -1
        if linger and self.lq_tail - self.lq_head < self.lq_cap:
            self.gen += 1
            if self.gen == 0:
                self.gen = 1
            self.linger_gen[fd] = self.gen
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>(LINGER_BIT | <uint32_t>fd)
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)
            self.lq_fd[self.lq_tail % self.lq_cap] = fd
            self.lq_gen[self.lq_tail % self.lq_cap] = self.gen
            self.lq_deadline[self.lq_tail % self.lq_cap] = t2 + 1.0
            self.lq_tail += 1
            self.lingering += 1
        else:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
            close(fd)
        if t2 >= self.window_end:
            self.stopping = True
        return self.start(index)

    cdef void end_linger(self, int fd) noexcept nogil:
        self.linger_gen[fd] = 0
        self.lingering -= 1
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        close(fd)

    cdef void on_linger_readable(self, int fd) noexcept nogil:
        cdef char scratch[512]
        cdef ssize_t n
        if self.linger_gen[fd] == 0:
            return
        n = recv(fd, scratch, sizeof(scratch), 0)
        if n > 0 or (n < 0 and (errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR)):
            return
        self.end_linger(fd)     # the server's FIN (or an error): the socket is done

    cdef void expire_lingers(self, double t, bint all_) noexcept nogil:
        cdef int i, fd
        while self.lq_head < self.lq_tail:
            i = self.lq_head % self.lq_cap
            if not all_ and self.lq_deadline[i] > t:
                break
            fd = self.lq_fd[i]
            if self.linger_gen[fd] == self.lq_gen[i]:
                self.end_linger(fd)
            self.lq_head += 1

    def run(self, on_start, on_end, double warmup, double duration, double close_timeout):
        cdef epoll_event events[MAX_EVENTS]
        cdef int i, n, index, timeout_ms
        cdef uint64_t data
        cdef uint32_t ev
        cdef double t, started = now(), busy_until
        cdef bint window_open = False, window_closed = False
        cdef int active
        self.window_start = started + warmup
        self.window_end = self.window_start + duration
        for i in range(self.nslots):
            self.start(i)
        while True:
            t = now()
            if not window_open and t >= self.window_start:
                window_open = True
                on_start()
            if not window_closed and t >= self.window_end:
                window_closed = True
                self.stopping = True
                on_end()
                busy_until = t + self.connect_timeout   # cycles under way finish (or time out)
            active = 0
            for i in range(self.nslots):
                s = &self.slots[i]
                if s.state == S_IDLE:
                    if not self.stopping and t >= s.restart_at:
                        self.start(i)
                        active += 1
                else:
                    active += 1
                    if t > s.deadline:
                        self.error(s, "timeout")
            if window_closed:
                if active == 0 or t >= busy_until:
                    break
            self.expire_lingers(t, False)
            timeout_ms = 10
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
            for i in range(n):
                data = events[i].data.u64
                ev = events[i].events
                if data & LINGER_BIT:
                    self.on_linger_readable(<int>(data & 0x7FFFFFFF))
                    continue
                index = <int>data
                s = &self.slots[index]
                if s.fd < 0:
                    continue
                if s.state == S_CONNECTING:
                    self.on_writable(index)
                elif s.state == S_UPGRADING or s.state == S_CLOSING:
                    self.on_readable(index)
        for i in range(self.nslots):
            s = &self.slots[i]
            if s.fd >= 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.fd, NULL)
                close(s.fd)
                s.fd = -1
        # Sockets still waiting for the server's FIN: give them the grace, then close.
        t = now()
        busy_until = t + min(1.0, close_timeout)
        while self.lingering and t < busy_until:
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 10)
            for i in range(n):
                data = events[i].data.u64
                if data & LINGER_BIT:
                    self.on_linger_readable(<int>(data & 0x7FFFFFFF))
            t = now()
            self.expire_lingers(t, False)
        self.expire_lingers(t, True)
        return self.lat.to_array()


def run_handshake(str host, int port, requests, accepts, bytes close_frame, int concurrency,
                  double warmup, double duration, double connect_timeout, double close_timeout,
                  sources, on_start, on_end, error_cb, int maxfd):
    """Handshake cycles from `concurrency` slots for warmup + duration seconds.

    requests[i] / accepts[i]: a pre-built upgrade request and the Sec-WebSocket-Accept it
    must get back (slots cycle through them). Returns (cycles completed inside the window,
    array('d') of their connect-to-101 latencies). Errors go to error_cb(kind).
    """
    cdef _HandshakeRun r = _HandshakeRun()
    cdef int i
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    r.nslots = concurrency
    r.slots = <HSlot *>calloc(concurrency, sizeof(HSlot))
    r.maxfd = maxfd
    r.linger_gen = <int *>calloc(maxfd, sizeof(int))
    r.lq_cap = 1 << 18
    r.lq_fd = <int *>malloc(r.lq_cap * sizeof(int))
    r.lq_gen = <int *>malloc(r.lq_cap * sizeof(int))
    r.lq_deadline = <double *>malloc(r.lq_cap * sizeof(double))
    if r.slots == NULL or r.linger_gen == NULL or r.lq_fd == NULL or r.lq_gen == NULL or r.lq_deadline == NULL:
        raise MemoryError()
    for i in range(concurrency):
        r.slots[i].fd = -1
        r.slots[i].req = i
    memset(&r.dest, 0, sizeof(r.dest))
    r.dest.sin_family = AF_INET
    r.dest.sin_port = htons(port)
    _ipv4(host, &r.dest.sin_addr)
    r.nsources = len(sources)
    r.sources = <in_addr *>calloc(max(1, r.nsources), sizeof(in_addr))
    for i in range(r.nsources):
        _ipv4(sources[i], &r.sources[i])
    r.requests = list(requests)
    r.accepts = list(accepts)
    r.nreq = len(r.requests)
    if r.nreq < 1 or len(r.accepts) != r.nreq:
        raise ValueError("requests and accepts: same non-zero length")
    r.req_ptr = <const char **>malloc(r.nreq * sizeof(char *))
    r.req_len = <int *>malloc(r.nreq * sizeof(int))
    r.acc_ptr = <const char **>malloc(r.nreq * sizeof(char *))
    r.acc_len = <int *>malloc(r.nreq * sizeof(int))
    for i in range(r.nreq):
        r.req_ptr[i] = PyBytes_AS_STRING(r.requests[i])
        r.req_len[i] = PyBytes_GET_SIZE(r.requests[i])
        r.acc_ptr[i] = PyBytes_AS_STRING(r.accepts[i])
        r.acc_len[i] = PyBytes_GET_SIZE(r.accepts[i])
    r.close_frame = close_frame
    r.error_cb = error_cb
    r.connect_timeout = connect_timeout
    r.lat = _Doubles()
    r.epfd = epoll_create1(EPOLL_CLOEXEC)
    if r.epfd < 0:
        raise OSError(errno, "epoll_create1")
    lat = r.run(on_start, on_end, warmup, duration, close_timeout)
    return r.counted, lat


# ---------------------------------------------------------------------------------------
# Fan-out mode (subscribers count by their last `"k":N,`; see fanout.py)
# ---------------------------------------------------------------------------------------

cdef inline int64_t _last_k(const char *buf, Py_ssize_t size) nogil:
    """The N of the last complete `"k":N,` in buf[0:size], or -1. Same rule as
    fanout.SubscriberProtocol: a mark whose `,` is not within 30 bytes is cut off by the
    read's end; then the mark before it counts."""
    cdef Py_ssize_t end = size, i, j, lim
    cdef const char *p
    cdef int64_t k
    while end >= 4:
        p = <const char *>memrchr(buf, c'"', end - 3)
        if p == NULL:
            return -1
        i = p - buf
        if p[1] == c'k' and p[2] == c'"' and p[3] == c':':
            lim = min(i + 30, size)
            j = i + 4
            while j < lim and buf[j] != c',':
                j += 1
            if j < lim and j > i + 4:
                k = 0
                p = buf + i + 4
                while p < buf + j:
                    if p[0] < c'0' or p[0] > c'9':
                        return -1
                    k = k * 10 + (p[0] - c'0')
                    p += 1
                return k
            end = i       # cut off: try the mark before
        else:
            end = i + 3   # not a mark: the next candidates start left of this quote
    return -1


def last_k(bytes data):
    """Python entry for the differential test against fanout's rfind rule."""
    return _last_k(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef Py_ssize_t _publication(char *out, const char *prefix, Py_ssize_t plen, int64_t k, int size,
                             const uint8_t *mask) nogil:
    """Writes one masked text frame `prefix + {"k":k,"p":"xx.."} + }` (data padded to `size`
    bytes, as fanout.data_of) at `out`; returns its length."""
    cdef char digits[24]
    cdef int nd = 0, i, pad
    cdef int64_t v = k
    cdef Py_ssize_t L, pos, hdr
    if v == 0:
        digits[0] = c'0'
        nd = 1
    while v > 0:
        digits[nd] = c'0' + <char>(v % 10)
        v //= 10
        nd += 1
    pad = size - (13 + nd)
    if pad < 0:
        pad = 0
    L = plen + 13 + nd + pad + 1
    out[0] = <char>0x81
    if L < 126:
        out[1] = <char>(0x80 | L)
        hdr = 2
    elif L < 65536:
        out[1] = <char>(0x80 | 126)
        out[2] = <char>(L >> 8)
        out[3] = <char>(L & 0xFF)
        hdr = 4
    else:
        out[1] = <char>(0x80 | 127)
        for i in range(8):
            out[2 + i] = <char>((L >> (8 * (7 - i))) & 0xFF)
        hdr = 10
    memcpy(out + hdr, mask, 4)
    hdr += 4
    pos = hdr
    memcpy(out + pos, prefix, plen)
    pos += plen
    memcpy(out + pos, b'{"k":', 5)
    pos += 5
    for i in range(nd):
        out[pos + i] = digits[nd - 1 - i]
    pos += nd
    memcpy(out + pos, b',"p":"', 6)
    pos += 6
    memset(out + pos, c'x', pad)
    pos += pad
    memcpy(out + pos, b'"}}', 3)
    pos += 3
    # RFC 6455 section 5.3: client frames are masked
    for i in range(L):
        out[hdr + i] = out[hdr + i] ^ mask[i & 3]
    return pos


def publication(bytes prefix, int64_t k, int size, bytes mask):
    """Python entry for the differential test against wsclient.client_frame + fanout.data_of."""
    cdef Py_ssize_t cap = PyBytes_GET_SIZE(prefix) + size + 64
    cdef char *out = <char *>malloc(cap)
    try:
        n = _publication(out, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix), k, size,
                         <const uint8_t *>PyBytes_AS_STRING(mask))
        return out[:n]
    finally:
        free(out)


cdef class _FanoutRun:
    cdef int epfd
    cdef int nsubs
    cdef int *fds
    cdef int64_t *k
    cdef char *tails
    cdef uint8_t *taillen
    cdef uint8_t *alive
    cdef int64_t *count       # subscribers per k, ring of `ring` slots (k % ring)
    cdef double *sent_at
    cdef int64_t ring
    cdef public int64_t low, top, deliveries
    cdef int window
    cdef bint running, measuring
    cdef int pub_fd
    cdef bytes prefix
    cdef int size
    cdef uint8_t mask[4]
    cdef char *out
    cdef Py_ssize_t out_cap, out_len, out_pos
    cdef bint pub_waiting
    cdef char *rbuf
    cdef _Doubles lat
    cdef object error_cb
    cdef public long lost

    def __cinit__(self):
        self.epfd = -1

    def __dealloc__(self):
        free(self.fds)
        free(self.k)
        free(self.tails)
        free(self.taillen)
        free(self.alive)
        free(self.count)
        free(self.sent_at)
        free(self.out)
        free(self.rbuf)
        if self.epfd >= 0:
            close(self.epfd)

    cdef int completed(self, int64_t old_low, int64_t low) except -1:
        cdef double t = now()
        cdef int64_t kk
        if self.measuring:
            for kk in range(old_low + 1, low + 1):
                self.lat.append(t - self.sent_at[kk % self.ring])
        if self.running:
            self.top_up()
        return 0

    cdef int advanced(self, int64_t old, int64_t new) except -1:
        """One subscriber moved from k = old to k = new (lowwater.LowWater.advanced)."""
        cdef int64_t low, old_low
        self.count[new % self.ring] += 1
        self.count[old % self.ring] -= 1
        if self.count[old % self.ring] or old != self.low:
            return 0
        low = old
        while self.count[low % self.ring] == 0:
            low += 1
        old_low = self.low
        self.low = low
        return self.completed(old_low, low)

    cdef int top_up(self) except -1:
        cdef int64_t n = self.window - (self.top - self.low), kk
        cdef Py_ssize_t need, plen = PyBytes_GET_SIZE(self.prefix)
        cdef double t
        cdef char *grown
        if n <= 0:
            return 0
        need = self.out_len + n * (plen + self.size + 64)
        if need > self.out_cap:
            grown = <char *>realloc(self.out, need)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
            self.out_cap = need
        t = now()
        for kk in range(self.top + 1, self.top + n + 1):
            self.out_len += _publication(self.out + self.out_len, PyBytes_AS_STRING(self.prefix), plen,
                                         kk, self.size, self.mask)
            self.sent_at[kk % self.ring] = t
        self.top += n
        return self.flush()

    cdef int flush(self) except -1:
        cdef ssize_t n
        cdef epoll_event ev
        while self.out_pos < self.out_len:
            n = send(self.pub_fd, self.out + self.out_pos, self.out_len - self.out_pos, MSG_NOSIGNAL)
            if n < 0:
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    if not self.pub_waiting:
                        self.pub_waiting = True
                        ev.events = EPOLLIN | EPOLLOUT
                        ev.data.u64 = <uint64_t>self.nsubs
                        epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.pub_fd, &ev)
                    return 0
                if errno == EINTR:
                    continue
                self.error_cb("publisher lost: " + errno_kind(errno))
                self.out_pos = self.out_len
                break
            self.out_pos += n
        self.out_pos = self.out_len = 0
        if self.pub_waiting:
            self.pub_waiting = False
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>self.nsubs
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.pub_fd, &ev)
        return 0

    cdef int on_sub(self, int i) except -1:
        cdef char *buf = self.rbuf
        cdef int tl = self.taillen[i]
        cdef ssize_t n
        cdef Py_ssize_t total
        cdef int64_t kk, old
        if not self.alive[i]:
            return 0
        memcpy(buf, self.tails + i * TAIL, tl)
        n = recv(self.fds[i], buf + tl, RECV_CAP, 0)
        if n <= 0:
            if n < 0 and (errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR):
                return 0
            self.alive[i] = 0
            self.lost += 1
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.fds[i], NULL)
            self.error_cb("subscriber lost" if n == 0 else "subscriber lost: " + errno_kind(errno))
            return 0
        total = tl + n
        tl = TAIL if total > TAIL else total
        memcpy(self.tails + i * TAIL, buf + total - tl, tl)
        self.taillen[i] = tl
        kk = _last_k(buf, total)
        old = self.k[i]
        if kk > old:
            if kk > self.top:
                self.error_cb("subscriber got a k never published")
                return 0
            self.k[i] = kk
            self.deliveries += kk - old
            self.advanced(old, kk)
        return 0

    cdef int on_pub(self, uint32_t ev) except -1:
        cdef ssize_t n
        if ev & EPOLLOUT:
            self.flush()
        if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
            n = recv(self.pub_fd, self.rbuf, RECV_CAP, 0)
            if n > 0:
                if memmem(self.rbuf, n, b'"error"', 7) != NULL:
                    self.error_cb("publish refused")
            elif n == 0 or not (errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR):
                self.error_cb("publisher lost")
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.pub_fd, NULL)
                self.running = False
        return 0

    def run(self, on_start, on_end, double warmup, double duration):
        cdef epoll_event events[MAX_EVENTS]
        cdef int i, n
        cdef double t, t0 = now(), window_start, window_end, d_start = 0, stop_at
        cdef int64_t d0 = 0, p0 = 0
        cdef bint window_open = False
        window_start = t0 + warmup
        window_end = window_start + duration
        self.running = True
        self.top_up()
        while True:
            t = now()
            if not window_open and t >= window_start:
                window_open = True
                on_start()
                d0, p0, d_start = self.deliveries, self.low, t
                self.measuring = True
            if window_open and t >= window_end:
                break
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 10)
            for i in range(n):
                if events[i].data.u64 == <uint64_t>self.nsubs:
                    self.on_pub(events[i].events)
                else:
                    self.on_sub(<int>events[i].data.u64)
        t = now()
        count = self.deliveries - d0
        elapsed = t - d_start
        published = self.low - p0
        self.measuring = False
        self.running = False
        on_end()
        # Let the last window arrive so the close handshakes are not stuck behind it.
        stop_at = t + 1.0
        while self.low < self.top and t < stop_at:
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 10)
            for i in range(n):
                if events[i].data.u64 == <uint64_t>self.nsubs:
                    self.on_pub(events[i].events)
                else:
                    self.on_sub(<int>events[i].data.u64)
            t = now()
        for i in range(self.nsubs):
            if self.alive[i]:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.fds[i], NULL)
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.pub_fd, NULL)
        ks = array("q")
        for i in range(self.nsubs):
            ks.append(self.k[i])
        lost = [i for i in range(self.nsubs) if not self.alive[i]]
        return {"count": count, "elapsed": elapsed, "published": published, "latencies": self.lat.to_array(),
                "k": ks, "lost": lost, "low": self.low, "top": self.top, "deliveries": self.deliveries}


def run_fanout(sub_fds, int pub_fd, bytes prefix, int size, bytes mask, int window,
               double warmup, double duration, on_start, on_end, error_cb):
    """Warmup + window of fan-out on already joined subscriber sockets and a publisher socket.

    prefix: the publish frame's JSON up to `"data":`; each publication is
    prefix + {"k":N,"p":"x.."} + } masked with `mask`. All subscribers start at k = 0.
    """
    cdef _FanoutRun r = _FanoutRun()
    cdef int i
    cdef epoll_event ev
    cdef int64_t ring = 1
    if len(mask) != 4 or window < 1:
        raise ValueError("mask must be 4 bytes and window at least 1")
    r.nsubs = len(sub_fds)
    while ring < window + 2:
        ring <<= 1
    r.ring = ring
    r.fds = <int *>malloc(max(1, r.nsubs) * sizeof(int))
    r.k = <int64_t *>calloc(max(1, r.nsubs), sizeof(int64_t))
    r.tails = <char *>malloc(max(1, r.nsubs) * TAIL)
    r.taillen = <uint8_t *>calloc(max(1, r.nsubs), 1)
    r.alive = <uint8_t *>malloc(max(1, r.nsubs))
    r.count = <int64_t *>calloc(ring, sizeof(int64_t))
    r.sent_at = <double *>calloc(ring, sizeof(double))
    r.rbuf = <char *>malloc(RECV_CAP + TAIL)
    if (r.fds == NULL or r.k == NULL or r.tails == NULL or r.taillen == NULL or r.alive == NULL
            or r.count == NULL or r.sent_at == NULL or r.rbuf == NULL):
        raise MemoryError()
    r.count[0] = r.nsubs
    r.window = window
    r.pub_fd = pub_fd
    r.prefix = prefix
    r.size = size
    memcpy(r.mask, PyBytes_AS_STRING(mask), 4)
    r.lat = _Doubles()
    r.error_cb = error_cb
    r.epfd = epoll_create1(EPOLL_CLOEXEC)
    if r.epfd < 0:
        raise OSError(errno, "epoll_create1")
    for i in range(r.nsubs):
        r.fds[i] = sub_fds[i]
        r.alive[i] = 1
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>i
        if epoll_ctl(r.epfd, EPOLL_CTL_ADD, r.fds[i], &ev) < 0:
            raise OSError(errno, "epoll_ctl")
    ev.events = EPOLLIN
    ev.data.u64 = <uint64_t>r.nsubs
    if epoll_ctl(r.epfd, EPOLL_CTL_ADD, pub_fd, &ev) < 0:
        raise OSError(errno, "epoll_ctl")
    return r.run(on_start, on_end, warmup, duration)


# ---------------------------------------------------------------------------------------
# Echo mode (see echo.py): K frames in flight per connection, n replacements per n echoes
# ---------------------------------------------------------------------------------------

cdef enum:
    E_ECHO = 0       # matching the bytes of the expected echo, `off` bytes into it
    E_HEADER = 1     # collecting the header of a frame that is not our echo
    E_PAYLOAD = 2    # collecting (ping/close, <= 125 bytes) or skipping its payload

cdef struct EConn:
    int fd
    int alive
    int closing          # the server closed: answered, nothing more is sent
    int state
    int off
    int hlen
    uint8_t hbuf[14]
    int opcode
    int fin
    int64_t plen         # payload bytes of the current non-echo frame
    int64_t pgot         # of which arrived
    uint8_t pbuf[125]
    int64_t sent
    int64_t recv
    int64_t probe
    double probe_t
    int64_t wpend        # bytes of the frame stream not written yet
    int64_t woff         # position of the next unwritten byte within one frame
    int ctl_len          # pong/close frames to write once the data stream is flushed
    int ctl_cap
    uint8_t *ctl
    int waiting_out
    uint8_t mask[4]
    char *wbuf           # the connection's frame, K + 1 times


cdef class _EchoRun:
    cdef int epfd
    cdef EConn *c
    cdef int nconn
    cdef const char *expect
    cdef int flen            # the echo (unmasked server frame)
    cdef int slen            # what we send (the same frame masked: 4 bytes longer)
    cdef int inflight
    cdef bint sending, measuring
    cdef public int64_t received
    cdef _Doubles lat
    cdef object error_cb
    cdef char *rbuf
    cdef list frames

    def __cinit__(self):
        self.epfd = -1

    def __dealloc__(self):
        cdef int i
        if self.c != NULL:
            for i in range(self.nconn):
                free(self.c[i].wbuf)
                free(self.c[i].ctl)
        free(self.c)
        free(self.rbuf)
        if self.epfd >= 0:
            close(self.epfd)

    cdef int watch(self, int i, bint out) nogil:
        cdef epoll_event ev
        ev.events = EPOLLIN | (EPOLLOUT if out else 0)
        ev.data.u64 = <uint64_t>i
        self.c[i].waiting_out = out
        return epoll_ctl(self.epfd, EPOLL_CTL_MOD, self.c[i].fd, &ev)

    cdef int fail(self, int i, str kind) except -1:
        cdef EConn *c = &self.c[i]
        if c.alive:
            c.alive = 0
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
            self.error_cb(kind)
        return 0

    cdef int flush(self, int i) except -1:
        cdef EConn *c = &self.c[i]
        cdef ssize_t n
        while c.wpend > 0 or c.ctl_len > 0:
            if c.wpend > 0:
                n = send(c.fd, c.wbuf + c.woff, c.wpend, MSG_NOSIGNAL)
            else:
                n = send(c.fd, c.ctl, c.ctl_len, MSG_NOSIGNAL)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    if not c.waiting_out:
                        self.watch(i, True)
                    return 0
                return self.fail(i, "connection lost: " + errno_kind(errno))
            if c.wpend > 0:
                c.wpend -= n
                c.woff = (c.woff + n) % self.slen
            else:
                if n != c.ctl_len:
                    memmove(c.ctl, c.ctl + n, c.ctl_len - n)
                c.ctl_len -= n
        if c.waiting_out:
            self.watch(i, False)
        return 0

    cdef int control(self, EConn *c, int opcode, const uint8_t *payload, int n) except -1:
        """Queue a masked control frame (RFC 6455 section 5.5: payload <= 125 bytes) after
        those already queued (a read may bring several pings, or a ping and the close)."""
        cdef int j
        cdef uint8_t *grown
        cdef uint8_t *out
        if c.ctl_len + 6 + n > c.ctl_cap:
            grown = <uint8_t *>realloc(c.ctl, 2 * c.ctl_cap + 6 + n)
            if grown == NULL:
                raise MemoryError()
            c.ctl = grown
            c.ctl_cap = 2 * c.ctl_cap + 6 + n
        out = c.ctl + c.ctl_len
        out[0] = <uint8_t>(0x80 | opcode)
        out[1] = <uint8_t>(0x80 | n)
        memcpy(out + 2, c.mask, 4)
        for j in range(n):
            out[6 + j] = payload[j] ^ c.mask[j & 3]
        c.ctl_len += 6 + n
        return 0

    cdef int frame_done(self, int i) except -1:
        """A whole non-echo frame arrived (header in hbuf, short payloads in pbuf); 1 if it
        completes a data message (counted like an echo, as echo.EchoProtocol._parse does)."""
        cdef EConn *c = &self.c[i]
        cdef int code
        c.state = E_ECHO
        c.off = 0
        c.hlen = 0
        if c.opcode <= 2:
            return c.fin
        if c.opcode == 9:
            if not c.closing:
                self.control(c, 0xA, c.pbuf, <int>c.plen)
            return 0
        if c.opcode == 8:
            code = (c.pbuf[0] << 8 | c.pbuf[1]) if c.plen >= 2 else 1005
            if not c.closing:
                c.closing = 1
                self.error_cb(f"server closed the connection ({code})")
                self.control(c, 0x8, b"\x03\xe8", 2)
            return 0
        return 0    # pong: ignored

    cdef int64_t feed(self, int i, const char *data, Py_ssize_t n) except -1:
        """Consume one read; returns the data messages it completed."""
        cdef EConn *c = &self.c[i]
        cdef Py_ssize_t p = 0, chunk, m, need
        cdef int64_t count = 0, take
        cdef int plen7
        while p < n and c.alive:
            if c.state == E_ECHO:
                chunk = min(<Py_ssize_t>(self.flen - c.off), n - p)
                if memcmp(data + p, self.expect + c.off, chunk) == 0:
                    c.off += chunk
                    p += chunk
                    if c.off == self.flen:
                        c.off = 0
                        count += 1
                    continue
                m = 0
                while data[p + m] == self.expect[c.off + m]:
                    m += 1
                if c.off + m >= 2:
                    self.fail(i, "bad echo: not the frame that was sent")
                    return count
                # Another frame starts here (a ping, a close, a fragment): parse it for real.
                memcpy(c.hbuf, self.expect, c.off)
                c.hlen = c.off
                c.off = 0
                c.state = E_HEADER
            elif c.state == E_HEADER:
                c.hbuf[c.hlen] = <uint8_t>data[p]
                c.hlen += 1
                p += 1
                if c.hlen >= 2 and (c.hbuf[1] & 0x80):
                    self.fail(i, "bad frame from server: masked")
                    return count
                if c.hlen < 2:
                    continue
                plen7 = c.hbuf[1] & 0x7F
                need = 2 + (2 if plen7 == 126 else (8 if plen7 == 127 else 0))
                if c.hlen < need:
                    continue
                c.opcode = c.hbuf[0] & 0x0F
                c.fin = (c.hbuf[0] & 0x80) != 0
                if plen7 == 126:
                    c.plen = (c.hbuf[2] << 8) | c.hbuf[3]
                elif plen7 == 127:
                    c.plen = 0
                    for m in range(8):
                        c.plen = (c.plen << 8) | c.hbuf[2 + m]
                else:
                    c.plen = plen7
                if c.opcode >= 8 and (c.plen > 125 or not c.fin):
                    self.fail(i, "bad frame from server: bad control frame")
                    return count
                if c.opcode not in (0, 1, 2, 8, 9, 10):
                    self.fail(i, f"bad frame from server: opcode {c.opcode}")
                    return count
                c.pgot = 0
                c.state = E_PAYLOAD
                if c.plen == 0:
                    count += self.frame_done(i)
            else:
                take = min(<int64_t>(n - p), c.plen - c.pgot)
                if c.opcode >= 8:
                    memcpy(c.pbuf + c.pgot, data + p, take)
                c.pgot += take
                p += take
                if c.pgot == c.plen:
                    count += self.frame_done(i)
        return count

    cdef int on_event(self, int i, uint32_t ev) except -1:
        cdef EConn *c = &self.c[i]
        cdef ssize_t n
        cdef int64_t k
        cdef double t
        if not c.alive:
            return 0
        if ev & EPOLLOUT:
            self.flush(i)
        if not (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)):
            return 0
        n = recv(c.fd, self.rbuf, RECV_CAP, 0)
        if n <= 0:
            if n < 0 and (errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR):
                return 0
            if c.closing:
                c.alive = 0
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
                return 0
            return self.fail(i, "connection lost" if n == 0 else "connection lost: " + errno_kind(errno))
        k = self.feed(i, self.rbuf, n)
        if k:
            self.received += k
            c.recv += k
            if self.sending and not c.closing:
                if self.measuring:
                    t = now()
                    if c.probe and c.recv >= c.probe:
                        self.lat.append(t - c.probe_t)
                        c.probe = 0
                    if not c.probe:
                        c.probe = c.sent + k
                        c.probe_t = t
                c.wpend += k * self.slen
                c.sent += k
        if c.alive and (c.wpend or c.ctl_len):
            self.flush(i)
        return 0

    def run(self, on_start, on_end, double warmup, double duration, double close_timeout):
        cdef epoll_event events[MAX_EVENTS]
        cdef int i, n, left
        cdef double t, t0 = now(), window_start, window_end, d_start = 0, stop_at
        cdef int64_t r0 = 0
        cdef bint window_open = False
        window_start = t0 + warmup
        window_end = window_start + duration
        self.sending = True
        for i in range(self.nconn):
            if self.c[i].alive:
                self.c[i].wpend = self.inflight * self.slen
                self.c[i].sent = self.inflight
                self.flush(i)
        while True:
            t = now()
            if not window_open and t >= window_start:
                window_open = True
                on_start()
                r0, d_start = self.received, t
                self.measuring = True
            if window_open and t >= window_end:
                break
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 10)
            for i in range(n):
                self.on_event(<int>events[i].data.u64, events[i].events)
        t = now()
        count = self.received - r0
        elapsed = t - d_start
        self.measuring = False
        self.sending = False
        on_end()
        # Finish writing what was already promised, so the frame streams end on a boundary
        # before the Python side sends its close frames.
        stop_at = t + close_timeout
        while t < stop_at:
            left = 0
            for i in range(self.nconn):
                if self.c[i].alive and (self.c[i].wpend or self.c[i].ctl_len):
                    left += 1
            if not left:
                break
            with nogil:   # lets other threads run (tests play the server in one)
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 10)
            for i in range(n):
                self.on_event(<int>events[i].data.u64, events[i].events)
            t = now()
        states = []
        for i in range(self.nconn):
            c = &self.c[i]
            if c.alive:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd, NULL)
                if c.wpend or c.ctl_len:
                    self.fail(i, "writes not flushed at the end of the window")
            # what the Python protocol must take over: its state and the bytes of a partial frame
            if c.state == E_ECHO:
                partial = self.expect[:c.off]
                slow = b""
            elif c.state == E_HEADER:
                partial = b""
                slow = bytes(c.hbuf[:c.hlen])
            else:
                partial = b""
                slow = bytes(c.hbuf[:c.hlen]) + (bytes(c.pbuf[:c.pgot]) if c.opcode >= 8 else b"\0" * c.pgot)
            states.append((bool(c.alive), bool(c.closing), partial, slow, c.sent, c.recv))
        return {"count": count, "elapsed": elapsed, "latencies": self.lat.to_array(), "states": states}


def run_echo(fds, frames, masks, bytes expect, int inflight, double warmup, double duration,
             double close_timeout, on_start, on_end, error_cb):
    """Warmup + window of echo on already upgraded sockets.

    frames[i]: connection i's masked frame (masks[i] its 4-byte key, for pongs and close);
    expect: the unmasked frame an echo server returns. Each connection starts with
    `inflight` frames in one write and writes n replacements for every n echoes.
    """
    cdef _EchoRun r = _EchoRun()
    cdef int i, j
    cdef EConn *c
    cdef epoll_event ev
    cdef bytes frame
    if inflight < 1 or not expect:
        raise ValueError("inflight >= 1 and a non-empty expected frame")
    r.nconn = len(fds)
    r.c = <EConn *>calloc(max(1, r.nconn), sizeof(EConn))
    r.rbuf = <char *>malloc(RECV_CAP)
    if r.c == NULL or r.rbuf == NULL:
        raise MemoryError()
    r.frames = [expect]
    r.expect = PyBytes_AS_STRING(expect)
    r.flen = PyBytes_GET_SIZE(expect)
    r.slen = r.flen + 4
    r.inflight = inflight
    r.lat = _Doubles()
    r.error_cb = error_cb
    r.epfd = epoll_create1(EPOLL_CLOEXEC)
    if r.epfd < 0:
        raise OSError(errno, "epoll_create1")
    for i in range(r.nconn):
        frame = frames[i]
        if PyBytes_GET_SIZE(frame) != r.flen + 4 or len(masks[i]) != 4:
            raise ValueError("each frame: the expected echo's size + 4 (mask key), mask 4 bytes")
        c = &r.c[i]
        c.fd = fds[i]
        c.alive = 1
        memcpy(c.mask, PyBytes_AS_STRING(masks[i]), 4)
        c.wbuf = <char *>malloc((inflight + 1) * r.slen)
        if c.wbuf == NULL:
            raise MemoryError()
        for j in range(inflight + 1):
            memcpy(c.wbuf + j * r.slen, PyBytes_AS_STRING(frame), r.slen)
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>i
        if epoll_ctl(r.epfd, EPOLL_CTL_ADD, c.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
    return r.run(on_start, on_end, warmup, duration, close_timeout)


def count_echoes(bytes expect, bytes mask, chunks):
    """Test entry: feed `chunks` (reads) to one echo connection's counter without a socket.

    Returns (echoes completed per chunk, control frames it queued per chunk, errors): what
    the differential test compares with echo.EchoProtocol, the Python reference.
    """
    cdef _EchoRun r = _EchoRun()
    cdef EConn *c
    errors = []
    counts = []
    controls = []
    r.nconn = 1
    r.c = <EConn *>calloc(1, sizeof(EConn))
    if r.c == NULL:
        raise MemoryError()
    r.frames = [expect]
    r.expect = PyBytes_AS_STRING(expect)
    r.flen = PyBytes_GET_SIZE(expect)
    r.slen = r.flen + 4
    r.error_cb = errors.append
    c = &r.c[0]
    c.fd = -1
    c.alive = 1
    memcpy(c.mask, PyBytes_AS_STRING(mask), 4)
    for chunk in chunks:
        counts.append(r.feed(0, PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk)) if c.alive else 0)
        controls.append(bytes(c.ctl[:c.ctl_len]))
        c.ctl_len = 0
    return counts, controls, errors
