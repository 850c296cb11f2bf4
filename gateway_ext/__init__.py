"""The compiled hot path of ws-gateway, and the one place that picks its implementation.

Every compiled module `_x_c` has a pure-Python twin `_x_py` with the same names,
signatures, exceptions and return types. This module exports one of them:

- `WS_GATEWAY_PURE_PYTHON=1` forces the pure-Python twins (debugging, differential tests);
- `WS_GATEWAY_REQUIRE_EXT=1` makes a missing compiled extension an ImportError instead of
  a silent fallback (set it in production so a broken build cannot halve throughput).

`IMPLEMENTATION` is "cython" or "python". Leaf package: never imports `gateway`.
"""
import os

from .constants import CloseCode, Opcode, State, encode_close_payload, is_valid_close_code
from .errors import FrameError

IMPLEMENTATION = "python"

if os.environ.get("WS_GATEWAY_PURE_PYTHON", "") not in ("", "0"):
    from ._encode_py import encode_frame
    from ._frames_py import FrameParser
    from ._mask_py import apply_mask
    from ._protocol_py import ServerProtocol
    from ._stream_py import Corker, StreamStats, WebSocketStream
    from ._utf8_py import Utf8Validator, validate_utf8
else:
    try:
        from ._encode_c import encode_frame
        from ._frames_c import FrameParser
        from ._mask_c import apply_mask
        from ._protocol_c import ServerProtocol
        from ._stream_c import Corker, StreamStats, WebSocketStream
        from ._utf8_c import Utf8Validator, validate_utf8
        IMPLEMENTATION = "cython"
    except ImportError as exc:
        if os.environ.get("WS_GATEWAY_REQUIRE_EXT", "") not in ("", "0"):
            raise ImportError(
                "gateway_ext: compiled extensions are missing and WS_GATEWAY_REQUIRE_EXT is set; "
                "rebuild with `pip install -e .` (needs a C compiler and Cython)"
            ) from exc
        from ._encode_py import encode_frame
        from ._frames_py import FrameParser
        from ._mask_py import apply_mask
        from ._protocol_py import ServerProtocol
        from ._stream_py import Corker, StreamStats, WebSocketStream
        from ._utf8_py import Utf8Validator, validate_utf8

__all__ = [
    "IMPLEMENTATION", "CloseCode", "Opcode", "FrameError", "is_valid_close_code",
    "apply_mask", "validate_utf8", "Utf8Validator", "FrameParser", "encode_frame",
    "State", "encode_close_payload", "ServerProtocol", "Corker", "StreamStats", "WebSocketStream",
]
