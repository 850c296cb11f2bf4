"""Pure-Python twin of `_frames_c`: the incremental RFC 6455 frame parser.

Theory of operation: bytes from the socket are appended to one buffer; `feed()` cuts
every complete frame out of it and returns them all at once (one Python call per read,
not per frame). A frame is the tuple `(opcode, fin, rsv1, payload)` with the payload
already unmasked. Everything that can be judged from a single frame is enforced here
(RFC 6455 section 5.2): reserved bits, reserved opcodes, control-frame rules
(section 5.5), client masking (section 5.3), the 63-bit length (section 5.2) and the
configured size cap. Rules that span frames (fragment sequencing, UTF-8 across
fragments, message size) belong to the protocol.

Errors: the frames that precede an invalid frame in the same read are still returned (a
peer's valid messages are handled before the connection is failed, as RFC 6455 section
7.1.7 expects); the error is then stored in `error`. If no frame precedes it, `feed()`
raises it at once. Once `error` is set the parser is dead: every later `feed()` raises it.

Imports only the standard library and its sibling twin `_mask_py`.
"""
from ._mask_py import apply_mask
from .errors import FrameError

_MAX_CONTROL_PAYLOAD = 125


class FrameParser:
    """Incremental frame parser; see the module docstring for the contract."""

    __slots__ = ("_buf", "max_frame_bytes", "require_mask", "allow_rsv1", "error")

    def __init__(self, max_frame_bytes: int = 1 << 20, require_mask: bool = True, allow_rsv1: bool = False) -> None:
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self.require_mask = require_mask
        self.allow_rsv1 = allow_rsv1
        self.error = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data) -> list:
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                fin = bool(b0 & 0x80)
                rsv1 = bool(b0 & 0x40)
                opcode = b0 & 0x0F
                masked = bool(b1 & 0x80)
                length = b1 & 0x7F
                self._check_header(b0, opcode, fin, rsv1, masked, length)
                header = 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                    header = 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    if length >> 63:
                        raise FrameError(1002, "payload length has the most significant bit set")
                    header = 10
                if length > self.max_frame_bytes:
                    raise FrameError(1009, f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit")
                if masked:
                    header += 4
                if end - pos < header + length:
                    break
                start = pos + header
                payload = bytes(buf[start:start + length])
                if masked:
                    payload = apply_mask(payload, buf[start - 4:start])
                frames.append((opcode, fin, rsv1, payload))
                pos = start + length
        except FrameError as exc:
            self.error = exc
            del buf[:]
            if not frames:
                raise
            return frames
        if pos:
            del buf[:pos]
        return frames

    def peek_payload(self, start: int = 0):
        """The frame still incomplete in the buffer, as far as it has arrived.

        Returns `(opcode, rsv1, payload[start:])` -- the payload bytes received so far from
        offset `start` on (a negative `start` counts as 0), unmasked -- or None when nothing is buffered, its header is not
        complete yet, or the parser is dead. After a `feed()` the buffer holds at most that
        one frame, so a caller can validate a long text frame as it arrives (RFC 6455
        section 8.1: fail as soon as the text is known to be invalid), each byte once.
        """
        buf = self._buf
        if len(buf) < 2 or self.error is not None:
            return None
        if start < 0:
            start = 0     # like the compiled twin: a negative offset means the whole payload
        b0, b1 = buf[0], buf[1]
        length = b1 & 0x7F
        header = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
        if len(buf) < header:
            return None
        payload = bytes(buf[header + start:])
        if b1 & 0x80 and payload:
            key = bytes(buf[header - 4:header])
            turn = start % 4                     # the mask's phase at byte `start`
            payload = apply_mask(payload, key[turn:] + key[:turn])
        return (b0 & 0x0F, bool(b0 & 0x40), payload)

    def _check_header(self, b0: int, opcode: int, fin: bool, rsv1: bool, masked: bool, length: int) -> None:
        # RFC 6455 section 5.2: RSV bits MUST be 0 unless an extension defines them;
        # permessage-deflate (RFC 7692 section 6) defines RSV1 on a message's first frame only.
        if b0 & 0x30:
            raise FrameError(1002, "reserved bits RSV2/RSV3 must be 0")
        if rsv1 and (not self.allow_rsv1 or opcode == 0 or opcode >= 8):
            raise FrameError(1002, "reserved bit RSV1 set without a negotiated extension")
        if opcode >= 8:
            if opcode > 0xA:
                raise FrameError(1002, f"reserved control opcode {opcode:#x}")
            # RFC 6455 section 5.5: control frames are never fragmented, payload <= 125.
            if not fin:
                raise FrameError(1002, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise FrameError(1002, "control frame payload longer than 125 bytes")
        elif opcode > 2:
            raise FrameError(1002, f"reserved data opcode {opcode:#x}")
        # RFC 6455 section 5.1: a server MUST close on an unmasked client frame.
        if masked != self.require_mask:
            raise FrameError(1002, "client frame is not masked" if self.require_mask else "server frame is masked")
