"""permessage-deflate (RFC 7692): negotiation, the per-connection codec, compress-once frames.

Memory model (the point of this module). Naive implementations keep one zlib compressor and
one decompressor per connection: 64-300 KiB each, most of it idle. Here:

- Server -> client: the server always answers `server_no_context_takeover` (RFC 7692 section
  7.1.1.1 lets it do so unasked), so every outgoing message is an independent deflate stream.
  One compressor per window size serves the whole process: after each message a
  Z_FULL_FLUSH resets its state, so nothing of one message (or one client) can be referenced
  by the next. Because the stream depends only on the message and the window size, a
  broadcast is compressed ONCE per publication and window size and the same frame bytes go
  to every member (`Deflate.frame`, called by rooms.Hub per group of members with the same
  window). Per-connection compressor state: none.
- Client -> server: by default the server also answers `client_no_context_takeover`
  (section 7.1.1.2: a server MAY include it, a client MUST support it), so each inbound
  message is inflated by a short-lived decompressor that is dropped right after. With
  `compression_client_context_takeover` the client may keep its context (better ratio on
  chatty clients); each such connection then holds one decompressor, counted against
  `compression_max_contexts` -- past the cap, new connections get no-context-takeover.
- Messages shorter than `compression_min_bytes`, and those deflate would not shrink, are sent
  uncompressed (section 6: RSV1 is per message, a sender may always send a plain message).
- Inflating is capped: output beyond `max_message_bytes` closes the connection with 1009
  before anything larger is allocated (zlib's `max_length`).

Negotiation (section 5): the server answers the first acceptable permessage-deflate offer.
An offer with an unknown, duplicated or ill-valued parameter is declined (section 5: "MUST
decline"); the handshake still succeeds, without compression for that offer.

Imports only the standard library and gateway_ext; no sockets, no asyncio.
"""
from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass

from gateway_ext import FrameError, encode_frame

EXTENSION = "permessage-deflate"
# RFC 7692 section 7.2.1: a sender removes the 4 octets 0x00 0x00 0xff 0xff that end a
# sync-flushed stream; section 7.2.2: the receiver appends them before inflating.
_TAIL = b"\x00\x00\xff\xff"
_MEM_LEVEL = 8
MESSAGE_TOO_BIG, PROTOCOL_ERROR = 1009, 1002


# -- settings -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeflateSettings:
    """The server's compression policy (built from the `compression_*` config fields)."""

    level: int = 6                        # zlib level; paid once per broadcast, not per member
    min_bytes: int = 256                  # shorter messages are sent uncompressed
    server_max_window_bits: int = 15      # shared compressors: size costs nothing per connection
    client_max_window_bits: int = 12      # bounds each inflater (answered when the client offers it)
    client_context_takeover: bool = False  # let clients keep their context (one inflater each)
    max_contexts: int = 1000              # cap on live per-connection inflaters
    exclude_rooms: tuple = ()             # fnmatch patterns of rooms broadcast uncompressed

    @classmethod
    def from_config(cls, config) -> "DeflateSettings":
        patterns = tuple(p.strip() for p in config.compression_exclude_rooms.split(",") if p.strip())
        return cls(
            level=config.compression_level,
            min_bytes=config.compression_min_bytes,
            server_max_window_bits=config.compression_server_max_window_bits,
            client_max_window_bits=config.compression_client_max_window_bits,
            client_context_takeover=config.compression_client_context_takeover,
            max_contexts=config.compression_max_contexts,
            exclude_rooms=patterns,
        )


# -- Sec-WebSocket-Extensions parsing (RFC 6455 section 9.1) ----------------------------------

class OfferError(ValueError):
    """Why an offer (or the whole header) is declined."""


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_OWS = re.compile(r"[ \t]*")
_UNESCAPE = re.compile(r"\\(.)")


def parse_extensions(value: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Parse a Sec-WebSocket-Extensions value into [(name, [(param, value-or-None), ...]), ...].

    Grammar (RFC 6455 section 9.1): extension-list = 1#( token *( ";" token [ "=" (token |
    quoted-string) ] ) ); a quoted value must unescape to a token. Names are lower-cased.
    Raises OfferError on a syntax error (the caller then declines every offer).
    """
    out = []
    pos, end = 0, len(value)

    def ows(i: int) -> int:
        return _OWS.match(value, i).end()

    def token(i: int, what: str) -> tuple[str, int]:
        m = _TOKEN.match(value, i)
        if not m:
            raise OfferError(f"expected {what} at offset {i}")
        return m.group(), m.end()

    while True:
        pos = ows(pos)
        if pos < end and value[pos] == ",":  # empty list elements are allowed (RFC 9110 5.6.1)
            pos += 1
            continue
        if pos >= end:
            break
        name, pos = token(pos, "an extension name")
        params = []
        pos = ows(pos)
        while pos < end and value[pos] == ";":
            pname, pos = token(ows(pos + 1), "a parameter name")
            pos = ows(pos)
            pvalue = None
            if pos < end and value[pos] == "=":
                pos = ows(pos + 1)
                m = _QUOTED.match(value, pos)
                if m:
                    pvalue = _UNESCAPE.sub(r"\1", m.group(1))
                    if not _TOKEN.fullmatch(pvalue):
                        raise OfferError(f"quoted value of {pname} is not a token (RFC 6455 section 9.1)")
                    pos = m.end()
                else:
                    pvalue, pos = token(pos, f"a value for {pname}")
                pos = ows(pos)
            params.append((pname.lower(), pvalue))
        if pos < end and value[pos] != ",":
            raise OfferError(f"unexpected {value[pos]!r} at offset {pos}")
        out.append((name.lower(), params))
    return out


# -- offers and the agreement (RFC 7692 sections 5 and 7.1) ------------------------------------

@dataclass(frozen=True, slots=True)
class Offer:
    """One permessage-deflate offer. client_max_window_bits is True when offered without a value."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int | None = None
    client_max_window_bits: int | bool | None = None


def _window_bits(name: str, value: str | None) -> int:
    # Section 7.1.2.1/7.1.2.2: a decimal integer 8-15 without leading zeros.
    # ASCII digits only (str.isdigit() also takes '²', which int() then refuses), and short:
    # int() of thousands of digits raises ValueError too.
    if (value is None or len(value) > 2 or not value.isascii() or not value.isdigit() or value.startswith("0")
            or not 8 <= int(value) <= 15):
        raise OfferError(f"{name} must be an integer 8-15 without leading zeros, got {value!r}")
    return int(value)


def parse_offer(params: list[tuple[str, str | None]]) -> Offer:
    """Validate one offer's parameters; raise OfferError when section 5 says to decline it."""
    seen = set()
    fields = {}
    for name, value in params:
        if name in seen:
            raise OfferError(f"duplicate parameter {name}")
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:  # sections 7.1.1.1 / 7.1.1.2: these have no value
                raise OfferError(f"{name} takes no value")
            fields[name] = True
        elif name == "server_max_window_bits":
            fields[name] = _window_bits(name, value)
        elif name == "client_max_window_bits":
            # Section 7.1.2.2: in an offer the value is optional.
            fields[name] = True if value is None else _window_bits(name, value)
        else:
            raise OfferError(f"unknown parameter {name}")
    return Offer(**fields)


@dataclass(frozen=True, slots=True)
class Agreement:
    """What was agreed with one client, and the response header that says so."""

    server_window_bits: int          # our compressor's window (also the compress-once key)
    client_window_bits: int          # the window our inflater needs
    client_no_context_takeover: bool
    header: str                      # the Sec-WebSocket-Extensions response value


def accept_offer(offer: Offer, settings: DeflateSettings, allow_client_takeover: bool) -> Agreement:
    """Answer an acceptable offer within our settings (RFC 7692 section 7.1)."""
    params = [EXTENSION, "server_no_context_takeover"]   # section 7.1.1.1: always, even unasked
    # Section 7.1.2.1: answer with the offered value or less; unasked, we may still limit it.
    server_bits = settings.server_max_window_bits
    if offer.server_max_window_bits is not None:
        server_bits = min(server_bits, offer.server_max_window_bits)
    if offer.server_max_window_bits is not None or server_bits < 15:
        params.append(f"server_max_window_bits={server_bits}")
    # Section 7.1.1.2: the server MAY tell the client not to take over its context.
    no_takeover = offer.client_no_context_takeover or not allow_client_takeover
    if no_takeover:
        params.append("client_no_context_takeover")
    # Section 7.1.2.2: client_max_window_bits only if offered, with a value <= the offered one.
    # Unanswered, the client may use a 15-bit window and our inflater must allow it.
    client_bits = 15
    if offer.client_max_window_bits is not None:
        offered = 15 if offer.client_max_window_bits is True else offer.client_max_window_bits
        client_bits = min(offered, settings.client_max_window_bits)
        params.append(f"client_max_window_bits={client_bits}")
    return Agreement(server_bits, client_bits, no_takeover, "; ".join(params))


def negotiate(header: str, settings: DeflateSettings, allow_client_takeover: bool = False
              ) -> tuple[Agreement | None, list[str]]:
    """Pick the first acceptable permessage-deflate offer in `header` (RFC 7692 section 5).

    Returns (agreement or None, reasons for every declined offer). Never raises: a bad
    offer is declined, not a reason to refuse the WebSocket handshake.
    """
    declined = []
    try:
        extensions = parse_extensions(header)
    except OfferError as exc:
        return None, [f"malformed Sec-WebSocket-Extensions: {exc}"]
    for name, params in extensions:
        if name != EXTENSION:
            continue  # other extensions (e.g. x-webkit-deflate-frame) are not supported
        try:
            offer = parse_offer(params)
        except OfferError as exc:
            declined.append(str(exc))
            continue
        return accept_offer(offer, settings, allow_client_takeover), declined
    return None, declined


# -- the process-wide part: shared compressors, the context budget, stats --------------------

class Deflate:
    """One per process: settings, one shared compressor per window size, the context budget.

    Its plain integer attributes are read by the `deflate` entries of gateway/ops/metrics.py METRICS.
    """

    def __init__(self, settings: DeflateSettings) -> None:
        self.settings = settings
        self._compressors: dict[int, object] = {}
        self.live_contexts = 0            # per-connection inflaters alive now
        self.negotiated = 0               # connections that agreed on permessage-deflate
        self.declined = 0                 # offers declined as invalid
        self.compressed_in = 0            # compressed messages received (inflated)
        self.compressed_out = 0           # messages sent compressed (once per broadcast and window)
        self.bytes_before = 0             # their size before ...
        self.bytes_after = 0              # ... and after deflate
        self._exclude = settings.exclude_rooms
        self._room_cache: dict[str, bool] = {}

    @classmethod
    def from_config(cls, config) -> "Deflate | None":
        return cls(DeflateSettings.from_config(config)) if config.compression else None

    def negotiate(self, header: str, max_bytes: int) -> tuple["PerMessageDeflate | None", str | None, list[str]]:
        """For an upgrade request: (codec or None, response header value or None, declined reasons).

        `max_bytes` caps each inflated message (the connection's max_message_bytes).
        """
        allow = self.settings.client_context_takeover and self.live_contexts < self.settings.max_contexts
        agreement, declined = negotiate(header, self.settings, allow)
        self.declined += len(declined)
        if agreement is None:
            return None, None, declined
        self.negotiated += 1
        return PerMessageDeflate(self, agreement, max_bytes), agreement.header, declined

    def _compressor(self, wbits: int):
        comp = self._compressors.get(wbits)
        if comp is None:
            if wbits == 8:
                # zlib cannot deflate with an 8-bit window (deflateInit2 rejects -8). Z_RLE only
                # emits distance-1 matches, which are valid for any window, so a 9-bit
                # compressor in RLE mode produces a stream a 256-byte window can inflate.
                comp = zlib.compressobj(self.settings.level, zlib.DEFLATED, -9, _MEM_LEVEL, zlib.Z_RLE)
            else:
                comp = zlib.compressobj(self.settings.level, zlib.DEFLATED, -wbits, _MEM_LEVEL)
            self._compressors[wbits] = comp
        return comp

    def compress(self, payload, wbits: int) -> bytes | None:
        """One message as an independent raw deflate stream without the tail; None if no gain."""
        comp = self._compressor(wbits)
        try:
            # Z_FULL_FLUSH ends on a byte boundary with 00 00 ff ff like Z_SYNC_FLUSH and also
            # resets the match state: the next message cannot refer to this one, which is
            # what server_no_context_takeover promises (RFC 7692 section 7.1.1.1).
            data = comp.compress(payload) + comp.flush(zlib.Z_FULL_FLUSH)
        except Exception:
            self._compressors.pop(wbits, None)  # state unknown after a failure: start afresh
            raise
        n = len(payload)
        if len(data) - 4 >= n:
            return None  # incompressible: plain is smaller (section 6 allows plain messages)
        self.compressed_out += 1
        self.bytes_before += n
        self.bytes_after += len(data) - 4
        return data[:-4]  # section 7.2.1: drop the 00 00 ff ff tail

    def frame(self, opcode: int, payload, wbits: int) -> bytes:
        """A complete frame for a member with window `wbits`: compressed (RSV1) when it pays."""
        if len(payload) >= self.settings.min_bytes:
            data = self.compress(payload, wbits)
            if data is not None:
                return encode_frame(opcode, data, True, True)  # section 6: RSV1 on the first frame
        return encode_frame(opcode, payload)

    def room_compressed(self, room: str) -> bool:
        """False for rooms matching `compression_exclude_rooms` (e.g. binary feeds)."""
        result = self._room_cache.get(room)
        if result is None:
            result = not any(fnmatch.fnmatchcase(room, p) for p in self._exclude)
            if len(self._room_cache) < 65536:
                self._room_cache[room] = result
        return result


# -- the per-connection codec ----------------------------------------------------------------

class PerMessageDeflate:
    """One connection's agreed parameters. Holds zlib state only with client context takeover."""

    __slots__ = ("_deflate", "key", "_client_wbits", "_inflater", "_persistent", "max_bytes", "min_bytes")

    def __init__(self, deflate: Deflate, agreement: Agreement, max_bytes: int = 1 << 20) -> None:
        self._deflate = deflate
        self.key = agreement.server_window_bits   # compress-once key: same window, same frame
        # zlib-based clients cannot deflate with 8 bits and use 9; a 9-bit inflater accepts both.
        self._client_wbits = max(9, agreement.client_window_bits)
        self._persistent = not agreement.client_no_context_takeover
        self._inflater = None
        self.max_bytes = max_bytes
        self.min_bytes = deflate.settings.min_bytes   # replies shorter than this go plain
        if self._persistent:
            deflate.live_contexts += 1

    def decompress(self, payload) -> bytes:
        """Inflate one message (RFC 7692 section 7.2.2); FrameError 1009 past `max_bytes`, 1002 if corrupt."""
        inflater = self._inflater
        if inflater is None:
            inflater = zlib.decompressobj(-self._client_wbits)
            if self._persistent:
                self._inflater = inflater
        limit = self.max_bytes
        try:
            # max_length bounds what zlib allocates: a zip bomb stops at limit + 1 bytes. The
            # payload and the 4-byte tail (section 7.2.2) go in two calls, not `payload + tail`:
            # that copy would hold one more message-sized buffer at the peak (memory model).
            data = inflater.decompress(payload, limit + 1) if payload else b""
            if len(data) <= limit:
                # Output below max_length means zlib consumed all of the payload.
                rest = inflater.decompress(_TAIL, limit + 1 - len(data))
                if rest:
                    data += rest
        except zlib.error as exc:
            raise FrameError(PROTOCOL_ERROR, f"invalid compressed data ({exc})") from None
        if len(data) > limit:
            raise FrameError(MESSAGE_TOO_BIG, f"decompressed message exceeds the {limit}-byte limit")
        self._deflate.compressed_in += 1
        if inflater.eof:
            # The client ended its stream with a BFINAL block: the next message starts a new one.
            self._inflater = None
        return data

    def encode(self, opcode: int, payload) -> bytes:
        """The frame for a direct reply (echo, errors): compressed when it is worth it."""
        return self._deflate.frame(opcode, payload, self.key)

    def release(self) -> None:
        """The connection ended: give the inflater back to the budget (idempotent)."""
        if self._persistent:
            self._persistent = False
            self._inflater = None
            self._deflate.live_contexts -= 1
