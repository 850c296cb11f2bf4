"""Pure-Python twin of `_mask_c`: XOR a payload with the 4-byte masking key (RFC 6455 section 5.3).

Word-at-a-time without a byte loop: the payload and the repeated key are read as two
big integers, XORed once, and written back. Imports only the standard library.
"""


def apply_mask(data, mask) -> bytes:
    """Return `data` XOR the repeating 4-byte `mask` as new immutable bytes.

    Masking is an involution: the same call masks and unmasks.
    """
    if len(mask) != 4:
        raise ValueError("mask must be exactly 4 bytes")
    n = memoryview(data).nbytes  # bytes, not items: len() of an array("H") would count items
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
