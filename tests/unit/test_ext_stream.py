"""WebSocketStream, Corker and StreamStats (gateway_ext._stream_py and _stream_c): bytes in, writes out.

Every test runs on both twin pairs (`_stream_py` driving `_protocol_py.ServerProtocol`, and
`_stream_c` driving the compiled `_protocol_c.ServerProtocol`) through a small subclass that
records its hooks, a fake transport that records each `write`/`writelines` call (one call =
one syscall), a fake endpoint, limiter and event loop, and checks: reads before the upgrade
go to `_receive_http` only; a read's echoes and pongs leave in exactly one transport call
with the right stats and `last_seen`; partial frames write nothing; frames sent through the
connection during a read are corked and flushed once per loop pass by the Corker, for every
connection touched in that pass; `send_shared`'s direct write, its joining of corked frames
and its silence after our close frame or once CLOSED; the close answer joining the echoes'
write and calling `_after_close_sent`; the limiter path; the sends of a connection that is
not upgraded raising instead of crashing; and that both twins expose the same public surface.
"""
import asyncio
import inspect

import pytest

from gateway_ext import FrameParser, encode_frame
from gateway_ext.constants import CLOSED, HEAD, OPEN
from tests.ext_twins import build_frame, load_cython, load_python

MASK = b"abcd"


@pytest.fixture(params=["python", "cython"])
def twin(request):
    """(stream module, protocol module): each WebSocketStream with the ServerProtocol it drives."""
    if request.param == "python":
        return load_python("stream"), load_python("protocol")
    return load_cython("stream"), load_cython("protocol")


# -- helpers ------------------------------------------------------------------------------

def cf(opcode, payload=b"", fin=True):
    """A masked client frame."""
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def sf(opcode, payload=b""):
    """The exact bytes of an unmasked server frame (independent encoder)."""
    return build_frame(opcode, payload, mask=None)


def close_frame(code):
    return sf(8, code.to_bytes(2, "big"))


def decode(data):
    """Server frames (unmasked) as (opcode, fin, rsv1, payload)."""
    return FrameParser(1 << 24, require_mask=False).feed(bytes(data))


class Transport:
    """Records every write call; each call is one syscall."""

    def __init__(self):
        self.calls = []

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, lines):
        self.calls.append(("writelines", [bytes(x) for x in lines]))

    def wire(self):
        """Every byte written so far, in order."""
        out = []
        for kind, data in self.calls:
            out.append(data if kind == "write" else b"".join(data))
        return b"".join(out)


class Loop:
    """call_soon stores callbacks; `run_pass` runs the ones stored so far (one loop pass)."""

    def __init__(self):
        self.callbacks = []

    def call_soon(self, callback, *args):
        self.callbacks.append((callback, args))

    def run_pass(self):
        callbacks, self.callbacks = self.callbacks, []
        for callback, args in callbacks:
            callback(*args)
        return len(callbacks)


class Endpoint:
    """Records every on_messages call; by default echoes each message through `conn.ws.send`."""

    def __init__(self, handler=None):
        self.calls = []
        self.handler = handler

    def on_messages(self, conn, messages):
        self.calls.append((conn, list(messages)))
        if self.handler is not None:
            self.handler(conn, messages)
            return
        for opcode, payload in messages:
            conn.ws.send(opcode, payload)


class Limiter:
    """take(n) allows at most `allow` messages; exceeded records its arguments and, like
    defences.rate_limited, hands the allowed ones on, then queues an error and close 4002."""

    def __init__(self, allow):
        self.allow = allow
        self.taken = []
        self.exceeded_calls = []

    def take(self, n):
        self.taken.append(n)
        return min(n, self.allow)

    def exceeded(self, conn, messages, allowed):
        self.exceeded_calls.append((conn, list(messages), allowed))
        conn.ws.send(1, b"rate limited")
        conn.ws.close(4002, "")


_CLASSES = {}


def stream_class(stream_mod):
    """A subclass of the twin's WebSocketStream that records its hooks (like Connection)."""
    cls = _CLASSES.get(stream_mod)
    if cls is None:
        class RecordingStream(stream_mod.WebSocketStream):
            def __init__(self, stats, corker):
                super().__init__(stats, corker)
                self.http = []
                self.closes_sent = 0

            def _receive_http(self, data):
                self.http.append(data)

            def _after_close_sent(self):
                self.closes_sent += 1

        cls = _CLASSES[stream_mod] = RecordingStream
    return cls


class Harness:
    """One stats object, one Corker on a fake loop, and connections made on them."""

    def __init__(self, twin):
        self.stream, self.protocol = twin
        self.loop = Loop()
        self.stats = self.stream.StreamStats()
        self.corker = self.stream.Corker(self.loop)

    def conn(self, endpoint=None, upgraded=True):
        conn = stream_class(self.stream)(self.stats, self.corker)
        conn.transport = Transport()
        conn.endpoint = endpoint if endpoint is not None else Endpoint()
        if upgraded:
            conn.ws = self.protocol.ServerProtocol()
            conn.phase = OPEN
        return conn


@pytest.fixture
def h(twin):
    return Harness(twin)


# -- 1. before the upgrade ------------------------------------------------------------------

def test_before_the_upgrade_reads_go_to_receive_http_only(h):
    conn = h.conn(upgraded=False)
    assert conn.ws is None and conn.phase == HEAD
    conn.last_seen = 12.5
    h.stats.now = 99.0
    data = b"GET /ws HTTP/1.1\r\nHost: x\r\n"
    conn.data_received(data)
    conn.data_received(cf(1, b"looks like a frame"))
    assert conn.http == [data, cf(1, b"looks like a frame")]
    assert conn.transport.calls == []
    assert conn.endpoint.calls == []
    assert conn.closes_sent == 0
    assert conn.last_seen == 12.5
    assert (h.stats.messages_in, h.stats.bytes_in, h.stats.frames_out, h.stats.bytes_out) == (0, 0, 0, 0)
    assert h.loop.callbacks == []


# -- 2. one read, one write ---------------------------------------------------------------

def test_pipelined_messages_and_a_ping_leave_in_one_writelines(h):
    conn = h.conn()
    h.stats.now = 123.25
    data = cf(1, "héllo".encode()) + cf(2, b"\x00\xff") + cf(9, b"p") + cf(1, b"x")
    conn.data_received(data)

    assert [msgs for _, msgs in conn.endpoint.calls] == [[(1, "héllo".encode()), (2, b"\x00\xff"), (1, b"x")]]
    assert conn.endpoint.calls[0][0] is conn
    # The pong is queued while parsing, the echoes by the endpoint after: one call, in that order.
    expected = [sf(10, b"p"), sf(1, "héllo".encode()), sf(2, b"\x00\xff"), sf(1, b"x")]
    assert conn.transport.calls == [("writelines", expected)]
    assert decode(conn.transport.wire()) == [
        (10, True, False, b"p"), (1, True, False, "héllo".encode()), (2, True, False, b"\x00\xff"),
        (1, True, False, b"x"),
    ]
    assert h.stats.messages_in == 3
    assert h.stats.bytes_in == len(data)
    assert h.stats.frames_out == 4
    assert h.stats.bytes_out == sum(map(len, expected))
    assert conn.last_seen == 123.25
    assert conn.closes_sent == 0
    assert conn.http == []
    assert h.loop.callbacks == []
    assert conn._corked is False


def test_a_single_frame_leaves_in_one_write_and_stats_accumulate(h):
    conn = h.conn()
    h.stats.now = 5.0
    first = cf(1, b"one")
    conn.data_received(first)
    assert conn.transport.calls == [("write", sf(1, b"one"))]
    h.stats.now = 6.5
    second = cf(2, b"two") + cf(2, b"three")
    conn.data_received(second)
    assert conn.transport.calls == [("write", sf(1, b"one")), ("writelines", [sf(2, b"two"), sf(2, b"three")])]
    assert h.stats.messages_in == 3
    assert h.stats.bytes_in == len(first) + len(second)
    assert h.stats.frames_out == 3
    assert h.stats.bytes_out == len(sf(1, b"one")) + len(sf(2, b"two")) + len(sf(2, b"three"))
    assert conn.last_seen == 6.5


def test_a_ping_alone_is_answered_without_calling_the_endpoint(h):
    conn = h.conn()
    data = cf(9, b"are you there")
    conn.data_received(data)
    assert conn.endpoint.calls == []
    assert conn.transport.calls == [("write", sf(10, b"are you there"))]
    assert (h.stats.messages_in, h.stats.bytes_in, h.stats.frames_out) == (0, len(data), 1)
    assert h.stats.bytes_out == len(sf(10, b"are you there"))


# -- 3. partial frames ------------------------------------------------------------------------

def test_a_read_without_a_complete_frame_writes_nothing(h):
    conn = h.conn()
    h.stats.now = 7.0
    frame = cf(1, b"hello world")
    conn.data_received(frame[:1])
    conn.data_received(frame[1:5])
    assert conn.transport.calls == []
    assert conn.endpoint.calls == []
    assert (h.stats.messages_in, h.stats.bytes_in, h.stats.frames_out, h.stats.bytes_out) == (0, 5, 0, 0)
    assert conn.last_seen == 7.0   # any read counts as activity
    conn.data_received(frame[5:])
    assert [msgs for _, msgs in conn.endpoint.calls] == [[(1, b"hello world")]]
    assert conn.transport.calls == [("write", sf(1, b"hello world"))]
    assert h.stats.bytes_in == len(frame)
    assert h.stats.messages_in == 1


# -- 4. corking ---------------------------------------------------------------------------------

SHARED = build_frame(2, b"broadcast", mask=None)


def test_sends_through_the_connection_during_a_read_are_corked_until_the_pass_ends(h):
    def handler(conn, messages):
        for opcode, payload in messages:
            conn.send(opcode, payload.upper())
            conn.send_frame(SHARED)

    conn = h.conn(Endpoint(handler))
    conn.data_received(cf(1, b"a") + cf(9, b"p") + cf(1, b"b"))
    assert conn.transport.calls == []          # corked: the read itself writes nothing
    assert conn._corked is True
    assert len(h.loop.callbacks) == 1
    assert (h.stats.messages_in, h.stats.frames_out) == (2, 0)

    assert h.loop.run_pass() == 1
    expected = [sf(10, b"p"), sf(1, b"A"), SHARED, sf(1, b"B"), SHARED]
    assert conn.transport.calls == [("writelines", expected)]
    assert conn._corked is False
    assert h.loop.callbacks == []
    assert h.stats.frames_out == 5
    assert h.stats.bytes_out == sum(map(len, expected))
    assert conn.closes_sent == 0

    # The next pass schedules the Corker again.
    conn.send(2, b"later")
    assert conn._corked is True and len(h.loop.callbacks) == 1
    h.loop.run_pass()
    assert conn.transport.calls[1:] == [("write", sf(2, b"later"))]
    assert conn._corked is False


def test_ws_send_and_conn_send_in_one_read_keep_their_order(h):
    def handler(conn, messages):
        conn.ws.send(1, b"direct")
        conn.send(1, b"corked")
        conn.ws.send(1, b"direct again")

    conn = h.conn(Endpoint(handler))
    conn.data_received(cf(1, b"go"))
    assert conn.transport.calls == []
    h.loop.run_pass()
    assert conn.transport.calls == [("writelines", [sf(1, b"direct"), sf(1, b"corked"), sf(1, b"direct again")])]


def test_two_connections_corked_in_one_pass_are_flushed_by_one_call_soon(h):
    members = []

    def broadcast(conn, messages):   # a room: the sender's message goes to every member
        for _, payload in messages:
            frame = build_frame(1, b"from sender: " + payload, mask=None)
            for member in members:
                member.send_frame(frame)

    sender = h.conn(Endpoint(broadcast))
    other = h.conn()
    members[:] = [sender, other]
    sender.data_received(cf(1, b"hi") + cf(1, b"there"))
    assert sender.transport.calls == [] and other.transport.calls == []
    assert sender._corked and other._corked
    assert len(h.loop.callbacks) == 1

    # A hub push outside any read, in the same pass, joins the same flush.
    other.send(2, b"direct")
    assert len(h.loop.callbacks) == 1

    assert h.loop.run_pass() == 1
    hi, there = sf(1, b"from sender: hi"), sf(1, b"from sender: there")
    assert sender.transport.calls == [("writelines", [hi, there])]
    assert other.transport.calls == [("writelines", [hi, there, sf(2, b"direct")])]
    assert not sender._corked and not other._corked
    assert h.loop.callbacks == []
    assert h.stats.frames_out == 5


def test_the_corker_on_a_real_asyncio_loop(twin):
    stream, protocol = twin
    loop = asyncio.new_event_loop()
    try:
        stats = stream.StreamStats()
        corker = stream.Corker(loop)
        conns = []
        for _ in range(3):
            conn = stream_class(stream)(stats, corker)
            conn.transport = Transport()
            conn.ws = protocol.ServerProtocol()
            conn.phase = OPEN
            conns.append(conn)
        for i, conn in enumerate(conns):
            conn.send_frame(SHARED)
            conn.send(1, str(i).encode())
        assert all(conn.transport.calls == [] for conn in conns)
        loop.call_soon(loop.stop)      # after the Corker's callback: one loop pass
        loop.run_forever()
        for i, conn in enumerate(conns):
            assert conn.transport.calls == [("writelines", [SHARED, sf(1, str(i).encode())])]
            assert conn._corked is False
    finally:
        loop.close()


# -- 5. send_shared ---------------------------------------------------------------------------

def test_send_shared_writes_straight_to_the_transport_when_not_corked(h):
    conn = h.conn()
    batch = SHARED + sf(1, b"second message of the batch")
    conn.send_shared(batch)
    assert conn.transport.calls == [("write", batch)]
    assert h.loop.callbacks == []
    assert conn._corked is False
    assert (h.stats.frames_out, h.stats.bytes_out) == (1, len(batch))


def test_send_shared_joins_the_corked_frames_after_them(h):
    conn = h.conn()
    conn.send_frame(sf(1, b"first"))
    conn.send_shared(SHARED)
    conn.send(1, b"last")
    assert conn.transport.calls == []
    assert len(h.loop.callbacks) == 1
    h.loop.run_pass()
    assert conn.transport.calls == [("writelines", [sf(1, b"first"), SHARED, sf(1, b"last")])]
    assert h.stats.frames_out == 3


def test_send_shared_is_dropped_after_our_close_frame(h):
    conn = h.conn()
    conn.ws.close(1001, "bye")
    conn.flush()
    closing = sf(8, (1001).to_bytes(2, "big") + b"bye")
    assert conn.transport.calls == [("write", closing)]
    assert conn.closes_sent == 1
    conn.send_shared(SHARED)
    assert conn.transport.calls == [("write", closing)]
    assert (h.stats.frames_out, h.stats.bytes_out) == (1, len(closing))
    assert h.loop.callbacks == []


def test_send_shared_is_dropped_once_closed(h):
    conn = h.conn()
    conn.phase = CLOSED
    conn.send_shared(SHARED)
    assert conn.transport.calls == []
    assert (h.stats.frames_out, h.stats.bytes_out) == (0, 0)
    assert h.loop.callbacks == []


def test_flush_once_closed_writes_nothing(h):
    conn = h.conn()
    conn.ws.send(1, b"queued")
    conn.phase = CLOSED
    conn.flush()
    assert conn.transport.calls == []
    # Also through the Corker: the connection closed between its send and the pass's end.
    conn.phase = OPEN
    conn.send(1, b"corked")
    conn.phase = CLOSED
    h.loop.run_pass()
    assert conn.transport.calls == []
    assert conn._corked is False
    assert h.stats.frames_out == 0
    assert conn.closes_sent == 0


# -- 6. closing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, answer", [
    ((1000).to_bytes(2, "big") + b"done", 1000),
    (b"", 1000),                                    # no status: answered with 1000
    ((4001).to_bytes(2, "big"), 4001),              # echoed code
])
def test_a_client_close_is_answered_in_the_same_write_as_the_echoes(h, payload, answer):
    conn = h.conn()
    conn.data_received(cf(1, b"last words") + cf(8, payload) + cf(1, b"ignored after close"))
    assert [msgs for _, msgs in conn.endpoint.calls] == [[(1, b"last words")]]
    assert conn.transport.calls == [("writelines", [sf(1, b"last words"), close_frame(answer)])]
    assert conn.closes_sent == 1
    assert conn.ws.close_sent and conn.ws.close_received


def test_a_protocol_failure_closes_after_the_preceding_echoes(h):
    conn = h.conn()
    conn.data_received(cf(1, b"fine") + cf(1, b"\xc0\xaf"))
    failure = sf(8, (1007).to_bytes(2, "big") + b"text message is not valid UTF-8")
    assert conn.transport.calls == [("writelines", [sf(1, b"fine"), failure])]
    assert conn.closes_sent == 1
    assert conn.ws.failed


def test_a_close_alone_leaves_in_one_write(h):
    conn = h.conn()
    conn.data_received(cf(8, (1000).to_bytes(2, "big")))
    assert conn.endpoint.calls == []
    assert conn.transport.calls == [("write", close_frame(1000))]
    assert conn.closes_sent == 1
    assert (h.stats.frames_out, h.stats.bytes_out) == (1, len(close_frame(1000)))


# -- 7. the limiter -------------------------------------------------------------------------------

def test_limiter_allowing_every_message_hands_them_to_the_endpoint(h):
    conn = h.conn()
    conn.limiter = limiter = Limiter(allow=10)
    conn.data_received(cf(1, b"a") + cf(1, b"b") + cf(1, b"c"))
    assert limiter.taken == [3]
    assert limiter.exceeded_calls == []
    assert [msgs for _, msgs in conn.endpoint.calls] == [[(1, b"a"), (1, b"b"), (1, b"c")]]
    assert conn.transport.calls == [("writelines", [sf(1, b"a"), sf(1, b"b"), sf(1, b"c")])]


def test_limiter_refusing_calls_exceeded_and_not_the_endpoint(h):
    conn = h.conn()
    conn.limiter = limiter = Limiter(allow=1)
    conn.data_received(cf(1, b"a") + cf(1, b"b") + cf(1, b"c"))
    assert limiter.taken == [3]
    assert limiter.exceeded_calls == [(conn, [(1, b"a"), (1, b"b"), (1, b"c")], 1)]
    assert conn.endpoint.calls == []
    assert h.stats.messages_in == 3
    # What exceeded queued leaves in the read's one write, and the close is reported.
    assert conn.transport.calls == [("writelines", [sf(1, b"rate limited"), close_frame(4002)])]
    assert conn.closes_sent == 1


def test_limiter_is_not_consulted_for_reads_without_messages(h):
    conn = h.conn()
    conn.limiter = limiter = Limiter(allow=0)
    conn.data_received(cf(9, b"") + cf(1, b"partial")[:3])
    assert limiter.taken == []
    assert limiter.exceeded_calls == []
    assert conn.transport.calls == [("write", sf(10, b""))]


# -- 8. not upgraded ------------------------------------------------------------------------------

def test_sends_before_the_upgrade_raise(h):
    conn = h.conn(upgraded=False)
    with pytest.raises((RuntimeError, AttributeError)):
        conn.send(1, b"x")
    with pytest.raises((RuntimeError, AttributeError)):
        conn.send_frame(SHARED)
    with pytest.raises((RuntimeError, AttributeError)):
        conn.send_shared(SHARED)
    assert conn._corked is False
    assert h.loop.callbacks == []
    assert conn.transport.calls == []
    conn.flush()                    # nothing to flush: a no-op, not an error
    assert conn.transport.calls == []
    assert h.stats.frames_out == 0


# -- 8b. flow control: a transport over its high-water mark is not read (issue 12, item 2) -------

class ReadingTransport(Transport):
    """A Transport that also records pause_reading/resume_reading (asyncio's API)."""

    def __init__(self):
        super().__init__()
        self.reading = True
        self.closing = False
        self.toggles = []

    def is_reading(self):
        return self.reading

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        assert self.reading, "pause_reading on a paused transport"
        self.reading = False
        self.toggles.append("pause")

    def resume_reading(self):
        assert not self.reading, "resume_reading on a reading transport"
        self.reading = True
        self.toggles.append("resume")


class WritableEndpoint(Endpoint):
    def __init__(self, on_writable=None):
        super().__init__()
        self.writable = 0
        self.hook = on_writable

    def on_writable(self, conn):
        self.writable += 1
        if self.hook is not None:
            self.hook(conn)


def test_pause_writing_stops_reading_until_the_transport_drains(h):
    conn = h.conn(WritableEndpoint())
    conn.transport = t = ReadingTransport()
    conn.pause_writing()                      # any write filled it: a pong, an echo, a broadcast
    assert conn.paused and not t.reading
    conn.pause_writing()                      # idempotent
    conn.resume_writing()
    assert not conn.paused and t.reading and conn.endpoint.writable == 1
    assert t.toggles == ["pause", "resume"]


def test_an_endpoint_hold_outlives_the_drain_and_the_drain_outlives_the_hold(h):
    conn = h.conn(WritableEndpoint())
    conn.transport = t = ReadingTransport()
    conn.pause_reading()                      # e.g. a request waits on the broker
    conn.pause_writing()
    conn.resume_writing()
    assert not t.reading                      # the endpoint still holds it
    conn.resume_reading()
    assert t.reading
    conn.pause_writing()
    conn.pause_reading()
    conn.resume_reading()
    assert not t.reading                      # still over the high-water mark
    conn.resume_writing()
    assert t.reading


def test_on_writable_that_fills_the_transport_again_keeps_reading_paused(h):
    conn = h.conn(WritableEndpoint(on_writable=lambda c: c.pause_writing()))
    conn.transport = t = ReadingTransport()
    conn.pause_writing()
    conn.resume_writing()                     # the endpoint's backlog refilled it
    assert conn.paused and not t.reading


def test_flow_control_leaves_a_closing_or_closed_transport_alone(h):
    conn = h.conn(WritableEndpoint())
    conn.transport = t = ReadingTransport()
    t.closing = True
    conn.pause_writing()
    assert t.toggles == []
    t.closing = False
    conn.phase = CLOSED
    conn.pause_reading()
    assert t.toggles == []


# -- 9. the public surface --------------------------------------------------------------------------

def _public(obj):
    return {name for name in dir(obj) if not name.startswith("_")}


def test_both_twins_have_the_same_public_surface():
    py = load_python("stream")
    c = load_cython("stream")
    methods = {"data_received", "flush", "send", "send_frame", "send_shared",
               "pause_writing", "resume_writing", "pause_reading", "resume_reading"}
    fields = {"transport", "ws", "endpoint", "limiter", "stats", "corker", "phase", "last_seen", "paused", "pinged"}
    assert _public(py.WebSocketStream) == _public(c.WebSocketStream) == methods | fields
    for name in methods | {"_receive_http", "_after_close_sent"}:
        assert callable(getattr(py.WebSocketStream, name)) and callable(getattr(c.WebSocketStream, name))
    for name in methods:
        params = [list(inspect.signature(getattr(m.WebSocketStream, name)).parameters)[1:] for m in (py, c)]
        assert params[0] == params[1], name

    stats_fields = {"messages_in", "frames_out", "bytes_in", "bytes_out", "now"}
    assert _public(py.StreamStats) == _public(c.StreamStats) == stats_fields
    for m in (py, c):
        s = m.StreamStats()
        assert [getattr(s, f) for f in ("messages_in", "frames_out", "bytes_in", "bytes_out")] == [0, 0, 0, 0]
        assert s.now == 0.0 and isinstance(s.now, float)

    assert _public(py.Corker) == _public(c.Corker) == {"schedule"}
    assert callable(py.Corker.schedule) and callable(c.Corker.schedule)


def test_fresh_stream_fields(h):
    conn = stream_class(h.stream)(h.stats, h.corker)
    assert conn.transport is None and conn.ws is None and conn.endpoint is None and conn.limiter is None
    assert conn.stats is h.stats and conn.corker is h.corker
    assert conn.phase == HEAD and conn.last_seen == 0.0
    assert not conn.paused and not conn._corked and not conn.pinged and not conn._closing
    assert not conn._read_held


def test_the_compiled_stream_only_drives_the_compiled_protocol():
    c = load_cython("stream")
    py_protocol = load_python("protocol")
    conn = stream_class(c)(c.StreamStats(), c.Corker(Loop()))
    with pytest.raises(TypeError):
        conn.ws = py_protocol.ServerProtocol()
    conn.ws = load_cython("protocol").ServerProtocol()


# -- 6. send_shared's direct send(2) on a real uvloop TCP transport ----------------------------

def test_send_shared_direct_send_keeps_order_with_the_transport_over_a_real_socket(twin):
    """Both twins on a real uvloop connection whose peer does not read at first (small
    receive buffer): send_shared interleaved with corked frames and plain transport writes
    must reach the peer byte for byte in order, however much the kernel takes per send
    (the compiled twin sends directly while the transport is empty and falls back to it
    for the rest). Also: nothing is sent directly once the transport is closing."""
    import random
    import socket

    import uvloop

    stream_mod, protocol_mod = twin
    rng = random.Random(7)
    chunks = [bytes([i % 251]) * rng.choice([10, 100, 3000, 70000]) for i in range(300)]

    async def main():
        loop = asyncio.get_running_loop()
        stats = stream_mod.StreamStats()
        corker = stream_mod.Corker(loop)
        made = loop.create_future()

        def factory():
            conn = stream_class(stream_mod)(stats, corker)
            conn.endpoint = Endpoint()

            def connection_made(transport, conn=conn):
                conn.transport = transport
                conn.ws = protocol_mod.ServerProtocol()
                conn.phase = OPEN
                made.set_result(conn)

            conn.connection_made = connection_made
            conn.connection_lost = lambda exc: None
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port))
        peer.setblocking(False)
        conn = await made
        conn.send_shared(b"first")
        if stream_mod.__name__.endswith("_c"):
            # sent by send(2) itself: uvloop holds nothing (its own write waits for the loop)
            assert conn.transport.get_write_buffer_size() == 0
        expected = [b"first"]
        for i, chunk in enumerate(chunks):
            if i % 7 == 3:
                conn.transport.write(chunk)          # another writer on the same transport
            else:
                conn.send_shared(chunk)
            expected.append(chunk)
            if i % 50 == 49:
                await asyncio.sleep(0)               # let uvloop write what it holds
        want = b"".join(expected)
        got = bytearray()
        while len(got) < len(want):
            try:
                data = peer.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            assert data, "the peer was closed early"
            got += data
        assert bytes(got) == want
        assert stats.bytes_out == 5 + sum(len(c) for i, c in enumerate(chunks) if i % 7 != 3)
        conn.transport.close()
        conn.send_shared(b"after close")             # must not reach any socket directly
        await asyncio.sleep(0.05)
        peer.setblocking(True)
        peer.settimeout(2)
        rest = peer.recv(1 << 16)
        assert b"after close" not in rest
        peer.close()
        server.close()
        await server.wait_closed()

    uvloop.run(main())
