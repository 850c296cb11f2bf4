"""Fuzz harnesses: one function per target, `harness(data: bytes) -> None`, raising on a bug.

The same functions run under two drivers (tests/fuzz/README.md):
- atheris (coverage-guided, libFuzzer) for long runs: `python -m tests.fuzz NAME [libFuzzer flags]`;
- hypothesis for a short run collected by pytest (tests/fuzz/test_fuzz_short.py), so `.ci/run`
  runs every harness for a few seconds.

Each harness decodes its input bytes into structured actions with `Input` (so a random byte
string is mostly valid frames / requests, with the odd broken one), then checks:

- `frames`: both FrameParser twins, fed the same chunks, give the same frames, the same
  FrameError (code and reason) at the same read, the same `buffered`/`error` and the same
  `peek_payload` for starts -2, 0, 1 and 5 (differential);
- `protocol`: both ServerProtocol twins (with and without permessage-deflate, each with its own
  codec) give the same messages, the same bytes to send, state, close code/reason, failure
  and pong count after every read, and the same results for send/ping/close (differential);
- `handshake`: parse_request + validate_upgrade + select_subprotocol on a request head built
  from the input: None, a Request, or HandshakeRejected with a 4xx status; anything else
  (another exception, a 5xx) is a bug;
- `http`: the HTTP phase of a real `Connection` on a fake transport, in front of a Gateway
  with every route installed (open mode and JWT + Origin + trusted proxies): the bytes are fed
  in chunks; an exception out of data_received, an unexpected exception caught in the HTTP
  phase (answered 400 and counted in `stats.http_errors`), a 500 answer or an ERROR log line
  is a bug.

Imports gateway and gateway_ext (and the tests' frame builder); no sockets.
"""
from __future__ import annotations

import asyncio
import logging
import zlib

from gateway_ext import _frames_py, _protocol_py
from gateway_ext.errors import FrameError
from tests.ext_twins import build_frame, load_cython

# -- decoding the fuzzer's bytes ------------------------------------------------------------


class Input:
    """Reads choices from the fuzzer's bytes; past the end every choice is 0 / empty."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, options):
        return options[self.byte() % len(options)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


_TEXTS = [b"", b"hello", "h\u00e9llo w\u00f6rld".encode(), "\u4f60\u597d".encode(), "\U0001f389".encode(),
          b'{"op":"join","room":"r"}', b"\xce", b"\xa9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
          b"\xf0\x9f", b"\x98\x80"]
_OPCODES = [0, 0, 1, 1, 2, 2, 8, 9, 9, 10, 3, 0xB]
_KEYS = [b"\x00\x00\x00\x00", b"\x01\x02\x03\x04", b"\xff\x00\xaa\x55", None]


def _payload(inp: Input) -> bytes:
    kind = inp.byte() % 6
    if kind == 0:
        return inp.take(inp.byte() % 40)
    if kind == 1:
        return b"".join(inp.pick(_TEXTS) for _ in range(inp.byte() % 5))
    if kind == 2:
        return bytes([inp.byte()]) * inp.pick([0, 1, 125, 126, 127, 300, 65535, 65536, 70000])
    if kind == 3:   # a close body: a code (valid or not) and a reason
        return inp.pick([1000, 1001, 1005, 1006, 1011, 999, 2999, 3000, 4999, 5000]).to_bytes(2, "big") + \
            inp.pick(_TEXTS)
    return b"".join(inp.pick(_TEXTS) for _ in range(inp.byte() % 3)) + inp.take(inp.byte() % 8)


def frame_stream(inp: Input, compress_ok: bool = False) -> list[bytes]:
    """Wire bytes cut into reads: mostly well-formed masked frames, some broken ones, some junk."""
    wire = bytearray()
    for _ in range(1 + inp.byte() % 12):
        if inp.left == 0:
            break
        b = inp.byte()
        if b % 16 == 15:
            wire += inp.take(inp.byte() % 12)            # raw junk
            continue
        opcode = _OPCODES[b % len(_OPCODES)]
        payload = _payload(inp)
        rsv = 0
        flags = inp.byte()
        if compress_ok and opcode in (1, 2) and flags & 1:
            comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = (comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
            rsv = 0b100
        if flags & 0x80:
            rsv |= inp.pick([0b100, 0b010, 0b001])
        form = inp.pick([None, None, None, None, 16, 64])
        if form == 16 and len(payload) > 0xFFFF:
            form = 64
        wire += build_frame(opcode, payload, fin=not (flags & 2), rsv=rsv, mask=_KEYS[(flags >> 2) % 4 if flags & 0x40
                                                                                    else 1], length_form=form)
    cuts, pos = [], 0
    while pos < len(wire):
        step = inp.pick([1, 2, 3, 7, 64, 1000, 1 << 20]) if inp.left else len(wire)   # out of input: the rest at once
        cuts.append(bytes(wire[pos:pos + step]))
        pos += step
    return cuts or [b""]


# -- 1. the frame parser twins ----------------------------------------------------------------

def _feed(parser, chunk):
    try:
        return ("frames", parser.feed(chunk))
    except FrameError as exc:
        return ("error", exc.code, exc.reason)


def frames(data: bytes) -> None:
    frames_c = load_cython("frames")
    inp = Input(data)
    limit = inp.pick([0, 10, 125, 126, 1000, 65535, 65536, 1 << 20])
    require_mask, allow_rsv1 = bool(inp.byte() & 1), bool(inp.byte() & 1)
    py = _frames_py.FrameParser(limit, require_mask=require_mask, allow_rsv1=allow_rsv1)
    c = frames_c.FrameParser(limit, require_mask=require_mask, allow_rsv1=allow_rsv1)
    for chunk in frame_stream(inp, compress_ok=allow_rsv1):
        a, b = _feed(py, chunk), _feed(c, chunk)
        assert a == b, (a, b)
        assert py.buffered == c.buffered, (py.buffered, c.buffered)
        assert (py.error is None) == (c.error is None) and py.error == c.error
        for start in (-2, 0, 1, 5):
            assert py.peek_payload(start) == c.peek_payload(start), start


# -- 2. the protocol twins ----------------------------------------------------------------------

def _codec(max_bytes: int, takeover: bool):
    from gateway.ws.deflate import Deflate, DeflateSettings
    offer = "permessage-deflate; client_max_window_bits" + ("" if takeover else "; client_no_context_takeover")
    codec, _, _ = Deflate(DeflateSettings(client_context_takeover=takeover)).negotiate(offer, max_bytes)
    return codec


def _observe(proto, messages):
    return (messages, b"".join(proto.data_to_send()), proto.state, proto.close_code, proto.close_reason,
            proto.failed, proto.close_sent, proto.close_received, proto.pongs_received, proto.has_output,
            proto.wants_transport_closed)


def protocol(data: bytes) -> None:
    protocol_c = load_cython("protocol")
    inp = Input(data)
    max_bytes = inp.pick([125, 200, 1000, 70000, 1 << 20])
    max_fragments = inp.pick([1, 2, 3, 8, 1024])
    deflate = inp.byte() % 3          # 0: off, 1: no context takeover, 2: takeover
    twins = []
    for mod in (_protocol_py, protocol_c):
        codec = _codec(max_bytes, deflate == 2) if deflate else None
        twins.append(mod.ServerProtocol(max_bytes, codec, max_fragments))
    py, c = twins
    for chunk in frame_stream(inp, compress_ok=bool(deflate)):
        a = _observe(py, _call(py.receive_data, chunk))
        b = _observe(c, _call(c.receive_data, chunk))
        assert a == b, (a, b)
        action = inp.byte() % 8
        if action == 1:
            opcode, payload = inp.pick([1, 2]), inp.pick(_TEXTS) * inp.pick([1, 100])
            for p in twins:
                p.send(opcode, payload)
        elif action == 2:
            for p in twins:
                p.ping(b"k")
        elif action == 3:
            code = inp.pick([1000, 1001, 4000, 1011])
            for p in twins:
                p.close(code, "bye")
        elif action == 4:
            for p in twins:
                p.receive_eof()
        if action:
            a, b = _observe(py, []), _observe(c, [])
            assert a == b, (a, b)


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:   # both twins must raise alike (they should not raise at all)
        return ("raised", type(exc).__name__, str(exc))


# -- 3. the handshake parser ------------------------------------------------------------------

_METHODS = [b"GET", b"POST", b"get", b"G\xc9T", b"", b"OPTIONS"]
_TARGETS = [b"/echo", b"/ws", b"/ws?token=abc&x=%ff", b"/%2e%2e/x", b"*", b"http://h/ws", b"/\xff", b"/api/publish",
            b"/metrics", b"/healthz", b"/readyz", b"/" + b"a" * 9000]
_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ", b"http/1.1", b""]
_NAMES = [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Origin",
          b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions", b"Content-Length", b"Transfer-Encoding",
          b"Authorization", b"Cookie", b"X-Forwarded-For", b"X-Real-IP", b"Content-Type", b"host ", b"",
          b"X-\xff"]
_VALUES = {
    b"Host": [b"127.0.0.1", b"", b"h:80", b"[::1]:8080"],
    b"Upgrade": [b"websocket", b"WebSocket, h2c", b"", b"websocket\x00"],
    b"Connection": [b"Upgrade", b"keep-alive, upgrade", b"close", b""],
    b"Sec-WebSocket-Key": [b"dGhlIHNhbXBsZSBub25jZQ==", b"short", b"", b"dGhlIHNhbXBsZSBub25jZQ"],
    b"Sec-WebSocket-Version": [b"13", b"8", b"", b"\xb2\xb3", b"13, 8"],
    b"Origin": [b"https://a.example.com", b"null", b"https://h:\xb2", b"https://h:99999", b"http://[::1", b"*",
                b"https://a.example.com:-1", b"file://"],
    b"Sec-WebSocket-Protocol": [b"ws-gateway.msgpack", b"a, b", b",", b""],
    b"Sec-WebSocket-Extensions": [b"permessage-deflate", b"permessage-deflate; client_max_window_bits",
                                  b"permessage-deflate; server_max_window_bits=8", b"permessage-deflate; x=\"",
                                  b"permessage-deflate; client_max_window_bits=\xb9\xb5", b";;,,"],
    b"Content-Length": [b"0", b"10", b"\xb2", b"-1", b"1e3", b" 5", b"99999999999999999999", b"+5", b"0x10"],
    b"Transfer-Encoding": [b"chunked", b"gzip", b"chunked, gzip", b""],
    b"Authorization": [b"Bearer " + b"k" * 32, b"Bearer", b"Basic abc", b"Bearer a.b.c", b"Bearer \xff"],
    b"Cookie": [b"t=abc", b"=", b"t", b"a=b; t=\xff"],
    b"X-Forwarded-For": [b"1.2.3.4", b"1.2.3.4, 127.0.0.1", b"::1", b"999.1.1.1", b"", b"fe80::1%eth0", b"\xb2"],
    b"X-Real-IP": [b"1.2.3.4", b"junk", b""],
    b"Content-Type": [b"application/json", b"text/plain", b""],
}


def request_head(inp: Input) -> bytes:
    """A request head: mostly a plausible upgrade or API request, mutated field by field."""
    line = b" ".join((inp.pick(_METHODS), inp.pick(_TARGETS), inp.pick(_VERSIONS)))
    headers = []
    for _ in range(inp.byte() % 14):
        name = inp.pick(_NAMES)
        values = _VALUES.get(name.strip(), [b"x"])
        value = inp.pick(values)
        if inp.byte() % 7 == 0:
            value += inp.take(inp.byte() % 6)            # arbitrary bytes in the value
        sep = inp.pick([b": ", b":", b" : ", b":\t"])
        headers.append(name + sep + value)
    if inp.byte() % 5 == 0:
        headers.insert(0, inp.take(inp.byte() % 20))     # a junk line
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def handshake(data: bytes) -> None:
    from gateway.errors import HandshakeRejected
    from gateway.ws.handshake import parse_request, select_subprotocol, validate_upgrade
    inp = Input(data)
    head = request_head(inp) if inp.byte() % 4 else inp.take(inp.left)
    for cut in (len(head), len(head) // 2):
        try:
            request = parse_request(head[:cut], "127.0.0.1:1")
        except HandshakeRejected as exc:
            assert 400 <= exc.status < 500, exc.status
            continue
        if request is None:
            continue
        request.tokens("connection")
        request.query_params()
        try:
            validate_upgrade(request)
            select_subprotocol(request, ("ws-gateway.msgpack",))
        except HandshakeRejected as exc:
            assert 400 <= exc.status < 500, exc.status


# -- 4. the HTTP phase of Connection --------------------------------------------------------------

class FakeTransport:
    """Enough of an asyncio transport for the HTTP phase; records what is written."""

    def __init__(self):
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data):
        self.out += data

    def writelines(self, lines):
        for line in lines:
            self.out += line

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def is_reading(self):
        return self.reading

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


_GATEWAYS: dict = {}


def _gateways():
    """Two gateways (open mode; JWT + Origin allow-list + trusted proxies) on one private loop."""
    if _GATEWAYS:
        return _GATEWAYS["loop"], _GATEWAYS["list"]
    from gateway import config as config_mod
    from gateway.app import install_rooms
    from gateway.api.methods import install as install_api
    from gateway.security import defences
    from gateway.server.process import Gateway

    loop = asyncio.new_event_loop()
    gateways = []
    for overrides in (
        dict(echo=True, demo=True, api_keys=("k" * 32,)),
        dict(echo=True, jwt_secret="s" * 32, allowed_origins=("https://*.example.com", "null"),
             trusted_proxies=("127.0.0.1",), max_connections_per_ip=2, api_keys=("k" * 32,), token_cookie="t"),
    ):
        config = config_mod.load(None, env={}, overrides=dict(host="127.0.0.1", port=0, log_level="warning",
                                                              **overrides))

        async def build(config=config):
            gw = Gateway(config, asyncio.get_running_loop())
            defences.install(gw, config)
            install_api(gw, config)
            hub = install_rooms(gw, config)
            await hub.start()
            return gw
        gateways.append(loop.run_until_complete(build()))
    _GATEWAYS["loop"], _GATEWAYS["list"] = loop, gateways
    return loop, gateways


def http(data: bytes) -> None:
    from gateway.server.connection import Connection
    loop, gateways = _gateways()
    inp = Input(data)
    gw = gateways[inp.byte() % len(gateways)]
    if inp.byte() % 8 == 0:
        wire = inp.take(inp.left)            # raw bytes as they came
    else:
        wire = request_head(inp) + inp.take(inp.byte() % 64)
        wire += inp.take(inp.left)
    errors = _Errors()
    root = logging.getLogger("gateway")
    root.addHandler(errors)
    conn = Connection(gw)
    transport = FakeTransport()
    unexpected = gw.stats.http_errors        # exceptions nobody anticipated, answered 400
    try:
        conn.connection_made(transport)
        pos = 0
        while pos < len(wire) and not transport.closed:
            step = inp.pick([1, 5, 64, 1 << 16]) if inp.left else len(wire)
            conn.data_received(wire[pos:pos + step])
            pos += step
        for _ in range(3):                   # async routes (the API) finish on the loop
            loop.run_until_complete(asyncio.sleep(0))
        status = bytes(transport.out[:12])
        assert not status.startswith(b"HTTP/1.1 5") or status.startswith((b"HTTP/1.1 503", b"HTTP/1.1 501")), \
            bytes(transport.out[:200])
        assert not errors.records, [r.getMessage() for r in errors.records]
        assert gw.stats.http_errors == unexpected, bytes(transport.out[:200])
    finally:
        root.removeHandler(errors)
        if conn.phase != 4:
            conn.connection_lost(None)
        gw.handshaking.pop(conn, None)


HARNESSES = {"frames": frames, "protocol": protocol, "handshake": handshake, "http": http}
