"""Test helpers for gateway_ext: both twins of a module, and an independent frame builder.

`twin_fixture("frames")` makes a fixture parametrized over the pure-Python twin and the
compiled one, so every unit test runs on both. The compiled param is skipped (with the
build command in the reason) when the extension is not built, unless
WS_GATEWAY_REQUIRE_EXT=1 says a missing build is a failure (set it in CI).
"""
from __future__ import annotations

import importlib
import os
import struct

import pytest

BUILD_HINT = "run `python setup.py build_ext --inplace` or `pip install -e .`"


def _require_ext() -> bool:
    return os.environ.get("WS_GATEWAY_REQUIRE_EXT", "") not in ("", "0")


def load_python(name: str):
    return importlib.import_module(f"gateway_ext._{name}_py")


def load_cython(name: str, *, module_level: bool = False):
    """The compiled module `gateway_ext._<name>_c`, or a skip when it is not built."""
    try:
        return importlib.import_module(f"gateway_ext._{name}_c")
    except ImportError as exc:
        if _require_ext():
            raise
        pytest.skip(f"gateway_ext._{name}_c is not built ({exc}); {BUILD_HINT}", allow_module_level=module_level)


def twin_fixture(name: str):
    """A fixture named `name` whose value is each implementation of `gateway_ext._<name>_*`."""

    @pytest.fixture(params=["python", "cython"], name=name)
    def _fixture(request):
        if request.param == "python":
            return load_python(name)
        return load_cython(name)

    return _fixture


def build_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                mask: bytes | None = b"\x01\x02\x03\x04", length: int | None = None,
                length_form: int | None = None) -> bytes:
    """Encode a frame by hand (independent of encode_frame), able to break every rule.

    rsv: the three RSV bits as 0b(RSV1)(RSV2)(RSV3); length: the advertised length
    (defaults to len(payload)); length_form: 7, 16 or 64 to force a length encoding.
    """
    n = len(payload) if length is None else length
    if length_form is None:
        length_form = 7 if n < 126 else 16 if n < 0x10000 else 64
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask is not None else 0
    if length_form == 7:
        head = bytes((b0, mbit | n))
    elif length_form == 16:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + xor_mask(payload, mask)


def xor_mask(payload: bytes, key: bytes) -> bytes:
    """Reference masking (RFC 6455 section 5.3), independent of both twins: byte j of
    every 4 is translated through a table XORing key[j]; fast enough for 16 MiB."""
    out = bytearray(payload)
    for j in range(4):
        table = bytes(i ^ key[j] for i in range(256))
        out[j::4] = out[j::4].translate(table)
    return bytes(out)
