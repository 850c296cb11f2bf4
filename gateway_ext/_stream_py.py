"""Pure-Python twin of `_stream_c`: the per-read and per-write path of an open connection.

`WebSocketStream` is the base class of `gateway.connection.Connection` (the asyncio glue).
It holds the few fields that path touches and does, for every read of an upgraded
connection:

    bytes -> ServerProtocol.receive_data -> messages -> endpoint.on_messages(conn, messages)
          -> the frames queued meanwhile -> ONE transport write (corking)

and, for frames the hub pushes outside a read, `send_frame`/`send` + the `Corker`: every
connection that got frames during one event-loop pass is flushed once, at its end, so W
publications in one pass cost one write per member, not W. `send_shared` writes the
hub's per-pass batch (bytes shared by all members) straight to the transport.

Flow control lives here too, for every kind of write (echoes, replies, pongs, broadcasts):
when the transport's buffer passes its high-water mark (`pause_writing`) the connection
stops being read until it drains below the low-water mark (`resume_writing`), so a client
that does not read cannot make the gateway buffer replies to what it keeps sending
(docs/security.md, "Memory model"). An endpoint may hold reading too (`pause_reading` /
`resume_reading`, e.g. while a request waits on the broker); the transport reads only
when neither holds it.

Everything else -- the HTTP phase, closing, timers, logging -- stays in Connection, which
supplies two hooks: `_receive_http(data)` (reads before the upgrade) and
`_after_close_sent()` (a close frame just left).

Why compiled (ARCHITECTURE.md compiles only per-byte and per-frame loops): this runs once
per read and once per delivery; on the 1-in-flight echo benchmark the Python frames of
this path were the gap to picows (benchmarks/README.md).
Imports only `constants`: the protocol object and the transport are duck-typed.
"""
from .constants import CLOSED, HEAD


class StreamStats:
    """Process-wide hot-path counters (read by metrics at scrape time) and the coarse clock.

    `now` is the loop time of the gateway's last sweep: every read stamps `last_seen` with
    it instead of reading a clock (keepalive only needs sweep resolution).
    """

    __slots__ = ("messages_in", "frames_out", "bytes_in", "bytes_out", "now")

    def __init__(self) -> None:
        self.messages_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.now = 0.0


class Corker:
    """Flushes every connection that got frames during one event-loop pass, once, at its end.

    The hub pushes a broadcast frame to thousands of members; each member only appends it
    to its pending list and registers here. One `call_soon` per pass then flushes them all.
    """

    __slots__ = ("_loop", "_dirty", "_scheduled")

    def __init__(self, loop) -> None:
        self._loop = loop
        self._dirty: list = []
        self._scheduled = False

    def schedule(self, conn) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        dirty = self._dirty
        self._dirty = []
        self._scheduled = False
        for conn in dirty:
            conn.flush()


class WebSocketStream:
    """Base of Connection: the read -> messages -> one-write path (module docstring)."""

    __slots__ = ("transport", "ws", "endpoint", "limiter", "stats", "corker", "phase", "last_seen", "paused",
                 "_corked", "pinged", "_closing", "_read_held")

    def __init__(self, stats: StreamStats, corker: Corker) -> None:
        self.transport = None
        self.ws = None            # the ServerProtocol once upgraded, None in the HTTP phase
        self.endpoint = None      # on_messages(conn, messages) receives every read's messages
        self.limiter = None       # inbound message TokenBucket (gateway/security/limits.py); None: no rate limit
        self.stats = stats
        self.corker = corker
        self.phase = HEAD
        self.last_seen = 0.0
        self.paused = False       # the transport asked us to stop writing (pause_writing)
        self._corked = False      # registered with the Corker for this pass
        # Connection's own flags (kept here so the compiled twin packs them into C ints):
        self.pinged = False       # a keepalive ping is outstanding (server.py's sweep)
        self._closing = False     # the closing handshake has started (connection.py)
        self._read_held = False   # the endpoint asked not to be fed (pause_reading)

    def data_received(self, data) -> None:
        ws = self.ws
        if ws is None:
            self._receive_http(data)
            return
        stats = self.stats
        self.last_seen = stats.now
        stats.bytes_in += len(data)
        messages = ws.receive_data(data)
        if messages:
            n = len(messages)
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

    def _write(self, ws) -> None:
        """Everything `ws` has queued, in one transport write (uvloop: writev for several)."""
        out = ws.data_to_send()
        if out:
            stats = self.stats
            if len(out) == 1:
                frame = out[0]
                self.transport.write(frame)
                stats.bytes_out += len(frame)
                stats.frames_out += 1
            else:
                self.transport.writelines(out)
                stats.bytes_out += sum(map(len, out))
                stats.frames_out += len(out)
        if ws.close_sent:
            self._after_close_sent()

    def flush(self) -> None:
        self._corked = False
        ws = self.ws
        if ws is None or self.phase == CLOSED:
            return
        self._write(ws)

    def send(self, opcode: int, payload) -> None:
        """Queue one message; it leaves with this loop pass's single write."""
        self.ws.send(opcode, payload)
        if not self._corked:
            self._corked = True
            self.corker.schedule(self)

    def send_frame(self, frame: bytes) -> None:
        """Queue a pre-encoded frame; it leaves with this loop pass's single write."""
        self.ws.send_frame(frame)
        if not self._corked:
            self._corked = True
            self.corker.schedule(self)

    def send_shared(self, data: bytes) -> None:
        """Write bytes shared by many connections (the hub's per-pass batch) now, in order.

        Frames of this pass still corked here go first (the data joins their write);
        otherwise it goes straight to the transport, saving the Corker's extra pass.
        (When nothing is corked the protocol has nothing queued: see data_received/flush.)
        """
        if self._corked:
            self.send_frame(data)
            return
        if self.ws.close_sent or self.phase == CLOSED:
            return  # RFC 6455 section 5.5.1: nothing after our close frame
        self.transport.write(data)
        stats = self.stats
        stats.frames_out += 1
        stats.bytes_out += len(data)

    # -- flow control (asyncio.Protocol callbacks and the endpoint's holds) -----------------

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: stop reading this client."""
        self.paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """Drained below the low-water mark: the endpoint may write its backlog, then read again."""
        self.paused = False
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint.on_writable(self)
        self._update_reading()

    def pause_reading(self) -> None:
        """The endpoint holds reading (idempotent); see resume_reading."""
        self._read_held = True
        self._update_reading()

    def resume_reading(self) -> None:
        """The endpoint releases its hold; reading resumes unless the transport is still full."""
        self._read_held = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.phase == CLOSED or transport.is_closing():
            return
        want = not (self.paused or self._read_held)
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- hooks the subclass provides ------------------------------------------------------

    def _receive_http(self, data) -> None:
        raise NotImplementedError

    def _after_close_sent(self) -> None:
        raise NotImplementedError
