"""Differential tests: the compiled gateway_ext twins against the pure-Python ones (hypothesis).

Random frame streams (valid and invalid, with random config changes between reads) are cut
at random chunk boundaries and fed to both parsers: every feed must give the same frames,
or the same FrameError code and reason at the same read, and the same `buffered`/`error`.
Random byte soups rich in UTF-8 edge cases go to both validators chunk by chunk. Mask and
encode must agree on random inputs. Where an independent oracle exists (Python's UTF-8
codec, hand-built valid frames), both twins are checked against it too.
"""
import inspect

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_ext import _encode_py, _frames_py, _mask_py, _utf8_py
from gateway_ext.errors import FrameError
from tests.ext_twins import build_frame, load_cython, xor_mask

_encode_c = load_cython("encode", module_level=True)
_frames_c = load_cython("frames", module_level=True)
_mask_c = load_cython("mask", module_level=True)
_utf8_c = load_cython("utf8", module_level=True)

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LARGE_SIZES = [126, 65535, 65536, 66001]
LIMITS = [0, 10, 125, 126, 65535, 65536, 1 << 20]
KEYS = st.binary(min_size=4, max_size=4)


@st.composite
def sized_payload(draw):
    # Mostly small payloads; now and then one at a length-encoding boundary.
    n = draw(st.integers(0, 140)) if draw(st.integers(0, 9)) else draw(st.sampled_from(LARGE_SIZES))
    seed = draw(st.binary(min_size=1, max_size=16))
    return (seed * (n // len(seed) + 1))[:n]


@st.composite
def any_frame(draw):
    """One frame that may break any per-frame rule."""
    opcode = draw(st.one_of(st.sampled_from([0, 1, 2, 8, 9, 10]), st.integers(0, 15)))
    payload = draw(sized_payload())
    form = draw(st.sampled_from([None] * 6 + [16, 64]))
    if form == 16 and len(payload) > 0xFFFF:
        form = 64
    length = None
    if form == 64 and draw(st.booleans()):
        length = (1 << 63) | len(payload)              # section 5.2: the MSB must be 0
    return build_frame(
        opcode, payload,
        fin=draw(st.sampled_from([True, True, True, False])),
        rsv=draw(st.sampled_from([0] * 8 + [0b100, 0b010, 0b001, 0b111])),
        mask=draw(st.one_of(KEYS, KEYS, KEYS, st.none())),
        length=length, length_form=form,
    )


@st.composite
def valid_frame(draw):
    """A frame every default-config server parser accepts, and the tuple it must yield."""
    opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10]))
    payload = draw(sized_payload())
    fin = draw(st.booleans())
    if opcode >= 8:
        payload, fin = payload[:125], True
    return build_frame(opcode, payload, fin=fin, mask=draw(KEYS)), (opcode, fin, False, payload)


@st.composite
def chunked(draw, data):
    """`data` cut at random points, each chunk as bytes, bytearray or a memoryview."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=10))))
    bounds = [0, *cuts, len(data)]
    chunks = []
    for a, b in zip(bounds, bounds[1:]):
        wrap = draw(st.sampled_from([bytes, bytes, bytearray, memoryview]))
        chunks.append(wrap(data[a:b]))
    return chunks


@st.composite
def frame_scenario(draw):
    valid = valid_frame().map(lambda fv: fv[0])
    frames = draw(st.lists(st.one_of(valid, valid, any_frame()), max_size=6))
    data = b"".join(frames) + draw(st.one_of(st.just(b""), st.binary(max_size=12)))
    chunks = draw(chunked(data))
    config = dict(
        max_frame_bytes=draw(st.sampled_from(LIMITS)),
        require_mask=draw(st.sampled_from([True, True, True, False])),
        allow_rsv1=draw(st.booleans()),
    )
    # Config changes between reads (permessage-deflate negotiated, limit changed).
    changes = draw(st.lists(st.tuples(
        st.integers(0, len(chunks)),
        st.sampled_from(["max_frame_bytes", "require_mask", "allow_rsv1"]),
    ), max_size=3))
    values = {"max_frame_bytes": draw(st.sampled_from(LIMITS)), "require_mask": draw(st.booleans()),
              "allow_rsv1": draw(st.booleans())}
    return config, chunks, [(at, name, values[name]) for at, name in changes]


def run_parser(module, config, chunks, changes):
    parser = module.FrameParser(**config)
    log = []
    for i, chunk in enumerate([*chunks, b""]):     # one more feed: a dead parser must still raise
        for at, name, value in changes:
            if at == i:
                setattr(parser, name, value)
        try:
            outcome = ("frames", parser.feed(chunk))
        except FrameError as exc:
            outcome = ("error", exc.code, exc.reason)
        error = None if parser.error is None else (parser.error.code, parser.error.reason)
        peeks = [parser.peek_payload(start) for start in (-2, 0, 1, 5)]   # the frame still arriving
        log.append((outcome, parser.buffered, error, peeks))
    return log


@SETTINGS
@given(frame_scenario())
def test_parsers_agree_on_any_stream(scenario):
    config, chunks, changes = scenario
    assert run_parser(_frames_c, config, chunks, changes) == run_parser(_frames_py, config, chunks, changes)


@SETTINGS
@given(st.lists(valid_frame(), max_size=8).flatmap(
    lambda fvs: st.tuples(st.just([v for _, v in fvs]), chunked(b"".join(f for f, _ in fvs)))))
def test_both_parsers_return_exactly_the_frames_that_were_sent(case):
    expected, chunks = case
    for module in (_frames_c, _frames_py):
        parser = module.FrameParser()
        got = []
        for chunk in chunks:
            got += parser.feed(chunk)
        assert got == expected
        assert parser.buffered == 0 and parser.error is None


# -- UTF-8 --------------------------------------------------------------------------------

TRICKY = [b"\xed\xa0", b"\xed\x9f\xbf", b"\xe0\xa0", b"\xe0\x9f", b"\xf0\x90", b"\xf0\x8f", b"\xf4\x8f",
          b"\xf4\x90", b"\xc0", b"\xc1", b"\xc2", b"\xf5", b"\x80", b"\xbf", b"\xff", b"\xef\xbf\xbf"]
UTF8_ATOM = st.one_of(
    st.text(max_size=8).map(str.encode),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF).map(lambda c: c.encode("utf-8", "surrogatepass")),
    st.binary(max_size=3),
    st.sampled_from(TRICKY),
    st.integers(0, 40).map(lambda k: b"a" * k),     # ASCII runs for the word-at-a-time path
)
UTF8_SOUP = st.lists(UTF8_ATOM, max_size=12).map(b"".join)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@SETTINGS
@given(UTF8_SOUP.flatmap(lambda d: st.tuples(st.just(d), chunked(d))))
def test_utf8_validators_agree_chunk_by_chunk(case):
    data, chunks = case
    c, py = _utf8_c.Utf8Validator(), _utf8_py.Utf8Validator()
    for chunk in chunks:
        assert c.feed(chunk) == py.feed(chunk)
        assert c.complete() == py.complete()
    assert c.complete() == py.complete() == _decodes(data)
    assert _utf8_c.validate_utf8(data) == _utf8_py.validate_utf8(data) == _decodes(data)


@SETTINGS
@given(UTF8_SOUP)
def test_utf8_validators_agree_byte_by_byte(data):
    c, py = _utf8_c.Utf8Validator(), _utf8_py.Utf8Validator()
    assert [c.feed(data[i:i + 1]) for i in range(len(data))] == [py.feed(data[i:i + 1]) for i in range(len(data))]


# -- mask and encode ---------------------------------------------------------------------

@SETTINGS
@given(sized_payload(), KEYS, st.integers(0, 7))
def test_mask_twins_agree(payload, key, offset):
    view = memoryview(b"\x00" * offset + payload)[offset:]       # unaligned start
    expected = xor_mask(payload, key)
    assert _mask_c.apply_mask(view, key) == _mask_py.apply_mask(view, key) == expected


@SETTINGS
@given(st.integers(0, 15), sized_payload(), st.booleans(), st.booleans(), st.one_of(st.none(), KEYS))
def test_encode_twins_agree(opcode, payload, fin, rsv1, key):
    out = _encode_c.encode_frame(opcode, payload, fin, rsv1, key)
    assert out == _encode_py.encode_frame(opcode, payload, fin=fin, rsv1=rsv1, mask=key)
    assert type(out) is bytes


# -- the API itself ----------------------------------------------------------------------

def _params(func):
    return [(p.name, p.default) for p in inspect.signature(func).parameters.values() if p.name != "self"]


def test_public_signatures_match():
    pairs = [
        (_mask_c.apply_mask, _mask_py.apply_mask),
        (_utf8_c.validate_utf8, _utf8_py.validate_utf8),
        (_utf8_c.Utf8Validator.feed, _utf8_py.Utf8Validator.feed),
        (_utf8_c.Utf8Validator.complete, _utf8_py.Utf8Validator.complete),
        (_utf8_c.Utf8Validator.reset, _utf8_py.Utf8Validator.reset),
        (_frames_c.FrameParser.feed, _frames_py.FrameParser.feed),
        (_encode_c.encode_frame, _encode_py.encode_frame),
    ]
    for compiled, python in pairs:
        assert _params(compiled) == _params(python), python.__qualname__
    # Constructors: the same keywords and defaults, observable through the attributes.
    c, py = _frames_c.FrameParser(), _frames_py.FrameParser()
    for name in ("max_frame_bytes", "require_mask", "allow_rsv1", "buffered", "error"):
        assert getattr(c, name) == getattr(py, name), name
    c = _frames_c.FrameParser(max_frame_bytes=5, require_mask=False, allow_rsv1=True)
    assert (c.max_frame_bytes, c.require_mask, c.allow_rsv1) == (5, False, True)


# -- the protocol state machine ------------------------------------------------------------

@st.composite
def client_frame(draw):
    """A client frame for the protocol: mostly well-formed, with fragments, control frames,
    closes with random bodies, text that may not be UTF-8, and now and then a broken frame."""
    kind = draw(st.sampled_from(["data"] * 5 + ["cont"] * 3 + ["ping", "pong", "close", "any"]))
    if kind == "any":
        return draw(any_frame())
    if kind == "close":
        body = draw(st.one_of(st.just(b""), st.binary(max_size=1),
                              st.integers(0, 5000).map(lambda c: c.to_bytes(2, "big")).flatmap(
                                  lambda code: UTF8_SOUP.map(lambda r: code + r[:60]))))
        return build_frame(8, body[:125], mask=draw(KEYS))
    if kind in ("ping", "pong"):
        return build_frame(9 if kind == "ping" else 10, draw(st.binary(max_size=20)), mask=draw(KEYS))
    payload = draw(st.one_of(UTF8_SOUP, sized_payload()))
    opcode = 0 if kind == "cont" else draw(st.sampled_from([1, 2]))
    return build_frame(opcode, payload, fin=draw(st.booleans()), mask=draw(KEYS))


@st.composite
def protocol_scenario(draw):
    frames = draw(st.lists(client_frame(), max_size=8))
    chunks = draw(chunked(b"".join(frames)))
    # Between reads the application may send a message or start the close itself.
    actions = draw(st.lists(st.tuples(st.integers(0, len(chunks)), st.sampled_from(["send", "close", "ping"])),
                            max_size=3))
    return draw(st.sampled_from([125, 300, 1 << 20])), chunks, actions


def run_protocol(module, max_bytes, chunks, actions):
    p = module.ServerProtocol(max_bytes)
    log = []
    for i, chunk in enumerate(chunks):
        for at, action in actions:
            if at == i:
                if action == "send":
                    p.send(2, b"reply %d" % i)
                elif action == "close":
                    p.close(4000 + i, "bye")
                else:
                    p.ping()
        log.append(("messages", p.receive_data(chunk)))
        log.append(("out", b"".join(p.data_to_send())))
    log.append(("end", p.state, p.close_code, p.close_reason, p.close_sent, p.close_received, p.failed,
                p.pongs_received, p.has_output, p.wants_transport_closed))
    return log


@SETTINGS
@given(protocol_scenario())
def test_protocol_twins_agree_on_any_stream(scenario):
    _protocol_c = load_cython("protocol")
    from gateway_ext import _protocol_py
    assert run_protocol(_protocol_c, *scenario) == run_protocol(_protocol_py, *scenario)
