"""Pure-Python twin of `_encode_c`: build one outgoing frame as immutable bytes.

The result is shared by every recipient of a broadcast, so it must be `bytes`
(never a mutable buffer the caller could change after the write was queued).
Imports only the standard library and its sibling twin `_mask_py`.
"""
from ._mask_py import apply_mask


def encode_frame(opcode: int, payload=b"", fin: bool = True, rsv1: bool = False, mask=None) -> bytes:
    """Encode a frame header + payload (RFC 6455 section 5.2).

    Servers send unmasked frames (`mask=None`); clients pass a 4-byte key.
    """
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    n = memoryview(payload).nbytes  # bytes, not items (an array("H") would get a wrong length field)
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((b0, mbit | n))
    elif n < 0x10000:
        header = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is not None:
        return header + bytes(mask) + apply_mask(payload, mask)
    return header + bytes(payload)
