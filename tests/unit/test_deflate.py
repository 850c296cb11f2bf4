"""permessage-deflate without sockets: negotiation matrix, the codec, the protocol integration.

The negotiation answers are checked against an independent implementation (the websockets
client's RFC 7692 response validation) for every combination of offer parameters.
"""
import itertools
import os
import tracemalloc
import zlib

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from gateway.ws.deflate import (
    Deflate, DeflateSettings, Offer, OfferError, PerMessageDeflate, negotiate, parse_extensions,
    parse_offer,
)
from gateway_ext import FrameError, FrameParser, encode_frame
from tests.ext_twins import twin_fixture

MASK = b"\x01\x02\x03\x04"
SETTINGS = DeflateSettings()


def client_deflate(data: bytes, wbits: int = 15, comp=None) -> bytes:
    """What a client sends: raw deflate, sync-flushed, tail removed (RFC 7692 section 7.2.1)."""
    comp = comp or zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes, wbits: int = 15) -> bytes:
    return zlib.decompressobj(-wbits).decompress(data + b"\x00\x00\xff\xff")


def header_params(answer: str):
    [(name, params)] = parse_extensions(answer)
    assert name == "permessage-deflate"
    return params


# -- header syntax -----------------------------------------------------------------------------

def test_parse_extensions_grammar():
    assert parse_extensions('permessage-deflate; client_max_window_bits, x-foo;a="b" ; c , ,') == [
        ("permessage-deflate", [("client_max_window_bits", None)]),
        ("x-foo", [("a", "b"), ("c", None)]),
    ]
    assert parse_extensions("Permessage-Deflate ; Server_Max_Window_Bits = 10") == [
        ("permessage-deflate", [("server_max_window_bits", "10")])]
    assert parse_extensions("") == []


@pytest.mark.parametrize("header", [
    "permessage-deflate; server_max_window_bits=\"1",      # unterminated quote
    "permessage-deflate; =10",                             # no parameter name
    "permessage-deflate server_no_context_takeover",       # missing ';'
    "permessage-deflate; a=\"b c\"",                       # quoted value must unescape to a token
    "permessage-deflate; a=",                              # missing value
    "(bad)",
])
def test_malformed_header_declines_everything(header):
    with pytest.raises(OfferError):
        parse_extensions(header)
    agreement, declined = negotiate(header, SETTINGS)
    assert agreement is None and declined and "malformed" in declined[0]


# -- offer validation (RFC 7692 section 5: decline) --------------------------------------------

@pytest.mark.parametrize("params, reason", [
    ([("foo", None)], "unknown parameter"),
    ([("server_no_context_takeover", None), ("server_no_context_takeover", None)], "duplicate"),
    ([("client_max_window_bits", None), ("client_max_window_bits", "10")], "duplicate"),
    ([("server_no_context_takeover", "1")], "takes no value"),
    ([("client_no_context_takeover", "true")], "takes no value"),
    ([("server_max_window_bits", None)], "8-15"),
    ([("server_max_window_bits", "7")], "8-15"),
    ([("server_max_window_bits", "16")], "8-15"),
    ([("server_max_window_bits", "010")], "leading zeros"),
    ([("client_max_window_bits", "9x")], "8-15"),
    ([("client_max_window_bits", "0")], "8-15"),
])
def test_invalid_offer_is_declined(params, reason):
    with pytest.raises(OfferError, match=reason):
        parse_offer(params)


def test_quoted_values_are_tokens():
    [(_, params)] = parse_extensions('permessage-deflate; server_max_window_bits="10"; client_max_window_bits="9"')
    assert parse_offer(params) == Offer(server_max_window_bits=10, client_max_window_bits=9)


def test_first_acceptable_offer_wins_and_declines_are_reported():
    header = "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7, permessage-deflate; server_max_window_bits=10, permessage-deflate"
    agreement, declined = negotiate(header, SETTINGS)
    assert agreement.server_window_bits == 10
    assert agreement.header == "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_no_context_takeover"
    assert len(declined) == 1 and "server_max_window_bits" in declined[0]


def test_no_deflate_offer_means_no_agreement():
    assert negotiate("x-foo; bar", SETTINGS) == (None, [])
    assert negotiate("permessage-deflate; bogus", SETTINGS)[0] is None


# -- every combination of offer parameters, validated by an independent client ---------------

def _offers():
    for snct, cnct in itertools.product((False, True), repeat=2):
        for smwb in (None, 8, 9, 12, 15):
            for cmwb in (None, True, 9, 12, 15):
                yield snct, cnct, smwb, cmwb


@pytest.mark.parametrize("settings", [
    DeflateSettings(),
    DeflateSettings(server_max_window_bits=10, client_max_window_bits=9),
    DeflateSettings(server_max_window_bits=8, client_max_window_bits=15, client_context_takeover=True),
], ids=["default", "small-windows", "takeover"])
def test_offer_matrix_answers_are_valid_rfc7692(settings):
    for snct, cnct, smwb, cmwb in _offers():
        client = ClientPerMessageDeflateFactory(
            server_no_context_takeover=snct, client_no_context_takeover=cnct,
            server_max_window_bits=smwb, client_max_window_bits=cmwb)
        offer = "; ".join(["permessage-deflate"] + [k if v is None else f"{k}={v}" for k, v in client.get_request_params()])
        agreement, declined = negotiate(offer, settings, settings.client_context_takeover)
        assert agreement is not None and declined == [], offer
        params = header_params(agreement.header)
        # The independent validator raises NegotiationError on an answer RFC 7692 forbids
        # (e.g. client_max_window_bits when not offered, a larger window than offered).
        ext = client.process_response_params(params, [])
        # Our own side of the agreement matches what the client will do.
        assert ext.remote_no_context_takeover is True                      # we never take over
        assert ext.remote_max_window_bits == agreement.server_window_bits  # client inflates with this
        assert agreement.server_window_bits <= (smwb or 15)
        assert agreement.server_window_bits <= settings.server_max_window_bits
        assert ext.local_max_window_bits <= agreement.client_window_bits   # the client deflates within our inflater
        assert ext.local_no_context_takeover == agreement.client_no_context_takeover
        if not settings.client_context_takeover:
            assert ext.local_no_context_takeover, offer


def test_client_window_only_answered_when_offered():
    agreement, _ = negotiate("permessage-deflate", SETTINGS)
    assert "client_max_window_bits" not in agreement.header
    assert agreement.client_window_bits == 15
    agreement, _ = negotiate("permessage-deflate; client_max_window_bits", SETTINGS)
    assert "client_max_window_bits=12" in agreement.header and agreement.client_window_bits == 12
    agreement, _ = negotiate("permessage-deflate; client_max_window_bits=10", SETTINGS)
    assert "client_max_window_bits=10" in agreement.header


def test_client_takeover_budget():
    deflate = Deflate(DeflateSettings(client_context_takeover=True, max_contexts=1))
    first, answer1, _ = deflate.negotiate("permessage-deflate; client_max_window_bits", 1000)
    assert "client_no_context_takeover" not in answer1 and deflate.live_contexts == 1
    second, answer2, _ = deflate.negotiate("permessage-deflate; client_max_window_bits", 1000)
    assert "client_no_context_takeover" in answer2 and deflate.live_contexts == 1
    first.release()
    first.release()  # idempotent
    second.release()
    assert deflate.live_contexts == 0
    third, answer3, _ = deflate.negotiate("permessage-deflate", 1000)
    assert "client_no_context_takeover" not in answer3 and deflate.live_contexts == 1


# -- the codec ----------------------------------------------------------------------------------

def test_shared_compressor_makes_independent_messages():
    deflate = Deflate(DeflateSettings(min_bytes=0))
    a = b'{"user":"alice","text":"the quick brown fox jumps over the lazy dog"}' * 4
    b = b'{"user":"bob","text":"the quick brown fox jumps over the lazy dog"}' * 4
    ca, cb = deflate.compress(a, 15), deflate.compress(b, 15)
    # b shares most of its bytes with a; a fresh inflater proves it does not refer to a
    # (server_no_context_takeover, RFC 7692 section 7.1.1.1).
    assert inflate(ca) == a and inflate(cb) == b
    assert deflate.compress(b, 15) == cb  # the stream depends only on the message


@pytest.mark.parametrize("wbits", range(8, 16))
def test_every_window_size_inflates_with_that_window(wbits):
    deflate = Deflate(DeflateSettings(min_bytes=0))
    data = (b"abcdefgh" * 40 + os.urandom(300)) * 200  # repeats far beyond any small window
    out = deflate.compress(data, wbits)
    assert inflate(out, wbits) == data  # zlib refuses distances beyond the window


def test_small_and_incompressible_messages_go_plain():
    deflate = Deflate(DeflateSettings(min_bytes=100))
    assert deflate.frame(1, b"x" * 99, 15) == encode_frame(1, b"x" * 99)
    noise = os.urandom(2000)
    assert deflate.frame(2, noise, 15) == encode_frame(2, noise)
    frame = deflate.frame(1, b"y" * 1000, 15)
    assert frame[0] == 0xC1  # FIN + RSV1 + text (RFC 7692 section 6)
    [(opcode, fin, rsv1, payload)] = FrameParser(1 << 20, require_mask=False, allow_rsv1=True).feed(frame)
    assert rsv1 and inflate(payload) == b"y" * 1000


def test_room_exclusion_patterns():
    deflate = Deflate(DeflateSettings(exclude_rooms=("bin.*", "video-?")))
    assert not deflate.room_compressed("bin.frames")
    assert not deflate.room_compressed("video-1")
    assert deflate.room_compressed("chat.lobby")
    assert deflate.room_compressed("video-12")


def codec(max_bytes=1 << 20, **settings):
    deflate = Deflate(DeflateSettings(**settings))
    header = "permessage-deflate; client_max_window_bits"
    pmd, _, _ = deflate.negotiate(header, max_bytes)
    return pmd


def test_zip_bomb_stops_at_the_limit_without_allocating_it():
    limit = 1 << 20
    bomb = client_deflate(b"\x00" * (64 << 20))  # 64 MiB of zeros -> ~64 KiB
    pmd = codec(limit)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError) as err:
            pmd.decompress(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == 1009
    assert peak < 3 * limit, f"peak {peak} bytes"  # without max_length it would be 64 MiB


def test_corrupt_data_is_a_protocol_error():
    with pytest.raises(FrameError) as err:
        codec().decompress(b"\xff\xff\xff\xff garbage")
    assert err.value.code == 1002


def test_client_ending_stream_with_bfinal_is_accepted():
    pmd = codec(client_context_takeover=True)
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    final = comp.compress(b"one message") + comp.flush(zlib.Z_FINISH)
    assert pmd.decompress(final) == b"one message"
    assert pmd.decompress(client_deflate(b"next one", 12)) == b"next one"


# -- the protocol ---------------------------------------------------------------------------------

protocol = twin_fixture("protocol")   # every protocol test runs on both twins


@pytest.fixture
def proto(protocol):
    def make(max_bytes=1 << 20, **settings):
        return protocol.ServerProtocol(max_bytes, codec(max_bytes, **settings))
    return make


def close_code(p):
    out = b"".join(p.data_to_send())
    frames = FrameParser(1 << 20, require_mask=False).feed(out)
    assert frames[-1][0] == 8
    return int.from_bytes(frames[-1][3][:2], "big")


def test_compressed_message_single_and_fragmented(proto):
    p = proto()
    text = "héllo wörld " * 50
    data = client_deflate(text.encode())
    wire = encode_frame(1, data, rsv1=True, mask=MASK)
    # Fragmented: RSV1 only on the first frame (RFC 7692 section 6).
    wire += encode_frame(2, data[:10], fin=False, rsv1=True, mask=MASK)
    wire += encode_frame(0, data[10:20], fin=False, mask=MASK)
    wire += encode_frame(9, b"ping in between", mask=MASK)
    wire += encode_frame(0, data[20:], mask=MASK)
    wire += encode_frame(1, b"plain", mask=MASK)
    assert p.receive_data(wire) == [(1, text.encode()), (2, text.encode()), (1, b"plain")]
    assert not p.failed


def test_context_takeover_client_stream(proto):
    p = proto(client_context_takeover=True)
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    msgs = [b"the same words again and again " * 5, b"the same words again and again " * 6]
    wire = b"".join(encode_frame(1, client_deflate(m, comp=comp), rsv1=True, mask=MASK) for m in msgs)
    assert p.receive_data(wire) == [(1, m) for m in msgs]


def test_client_ignoring_no_context_takeover_is_failed(proto):
    p = proto()  # we answered client_no_context_takeover: each message must stand alone
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    first = client_deflate(b"a long repeated sentence, quite long indeed" * 3, comp=comp)
    second = client_deflate(b"a long repeated sentence, quite long indeed", comp=comp)  # refers back
    p.receive_data(encode_frame(1, first, rsv1=True, mask=MASK))
    assert p.receive_data(encode_frame(1, second, rsv1=True, mask=MASK)) == []
    assert p.failed and close_code(p) == 1002


BOMB = client_deflate(b"\x00" * 50_000)


@pytest.mark.parametrize("wire, code", [
    # RSV1 on a continuation frame (RFC 7692 section 6)
    (encode_frame(1, client_deflate(b"abc"), fin=False, rsv1=True, mask=MASK)
     + encode_frame(0, b"", rsv1=True, mask=MASK), 1002),
    # RSV1 on a control frame (RFC 7692 section 6: only data messages are compressed)
    (encode_frame(9, b"", rsv1=True, mask=MASK), 1002),
    # invalid UTF-8 once inflated (RFC 6455 section 8.1)
    (encode_frame(1, client_deflate(b"\xff\xfe bad"), rsv1=True, mask=MASK), 1007),
    # not deflate data
    (encode_frame(2, b"\xff\xff\xff\xff garbage", rsv1=True, mask=MASK), 1002),
    # inflates past max_message_bytes
    (encode_frame(2, client_deflate(b"\x00" * 5000), rsv1=True, mask=MASK), 1009),
    (encode_frame(2, BOMB[:5], fin=False, rsv1=True, mask=MASK) + encode_frame(0, BOMB[5:], mask=MASK), 1009),
])
def test_compressed_protocol_errors(proto, wire, code):
    p = proto(max_bytes=4096)
    p.receive_data(wire)
    assert p.failed and close_code(p) == code


def test_rsv1_without_negotiation_is_a_protocol_error(protocol):
    p = protocol.ServerProtocol()
    p.receive_data(encode_frame(1, client_deflate(b"hello"), rsv1=True, mask=MASK))
    assert p.failed and close_code(p) == 1002


def test_replies_are_compressed_when_worth_it(proto):
    p = proto(min_bytes=64)
    p.send(1, b"short")
    p.send(1, b"long and repetitive " * 20)
    frames = FrameParser(1 << 20, require_mask=False, allow_rsv1=True).feed(b"".join(p.data_to_send()))
    assert [(f[0], f[2]) for f in frames] == [(1, False), (1, True)]
    assert frames[0][3] == b"short" and inflate(frames[1][3]) == b"long and repetitive " * 20


def test_eof_releases_the_context(proto):
    p = proto(client_context_takeover=True)
    deflate = p.deflate._deflate
    assert deflate.live_contexts == 1
    p.receive_eof()
    p.receive_eof()
    assert deflate.live_contexts == 0


def test_empty_compressed_message(proto):
    # RFC 7692 section 7.2.3.6: an empty message may be sent compressed (a lone 0x00 byte or nothing).
    p = proto()
    wire = encode_frame(1, b"", rsv1=True, mask=MASK) + encode_frame(2, b"\x00", rsv1=True, mask=MASK)
    assert p.receive_data(wire) == [(1, b""), (2, b"")]
    assert not p.failed


def test_one_read_of_many_small_bombs_is_capped_per_read(proto):
    # Each message inflates to just under the per-message cap (allowed on its own), but 12 of
    # them in one read would allocate 12 MiB from ~12 KiB: the per-read budget (8 MiB here) stops it.
    limit = 1 << 20
    one = encode_frame(1, client_deflate(b"a" * (limit - 16)), rsv1=True, mask=b"\x01\x02\x03\x04")
    p = proto(limit)
    messages = p.receive_data(one * 12)
    assert 0 < len(messages) < 12          # the messages within the budget are still delivered
    assert p.failed and close_code(p) == 1009
    # Spread over separate reads, the same messages are fine.
    q = proto(limit)
    assert sum(len(q.receive_data(one)) for _ in range(12)) == 12
    assert not q.failed


def test_compressed_fragments_are_capped_by_count(protocol):
    # Issue 12, item 1 on the compressed path: empty continuations after an RSV1 first frame.
    p = protocol.ServerProtocol(1 << 20, codec(1 << 20), max_fragments=8)
    data = client_deflate(b"x" * 1000)
    assert p.receive_data(encode_frame(1, data[:3], fin=False, rsv1=True, mask=MASK)
                          + encode_frame(0, b"", fin=False, mask=MASK) * 7) == []
    assert not p.failed
    p.receive_data(encode_frame(0, b"", fin=False, mask=MASK))
    assert close_code(p) == 1009


def test_compressed_message_in_many_fragments(protocol):
    text = os.urandom(3000).hex().encode()          # 6000 bytes, compresses a little
    data = client_deflate(text)
    p = protocol.ServerProtocol(1 << 20, codec(1 << 20), max_fragments=len(data))
    wire = encode_frame(1, data[:1], fin=False, rsv1=True, mask=MASK)
    wire += b"".join(encode_frame(0, data[i:i + 1], fin=False, mask=MASK) for i in range(1, len(data) - 1))
    wire += encode_frame(0, data[-1:], mask=MASK)
    assert p.receive_data(wire) == [(1, text)]
    assert not p.failed


def test_inflating_does_not_copy_the_compressed_payload():
    # Memory model: the payload is not joined to the 4-byte tail (a second message-sized copy).
    data = os.urandom(1 << 20)                       # incompressible: compressed ~ 1 MiB
    payload = client_deflate(data)
    pmd = codec(2 << 20)
    tracemalloc.start()
    try:
        assert pmd.decompress(payload) == data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # zlib builds the output in blocks and joins them (~2x the output); a copy of the input
    # would add ~1x more.
    assert peak < 2 * len(data) + len(payload) // 2, f"peak {peak} bytes"
