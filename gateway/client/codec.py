"""Frame encoding of the Python SDK: JSON text frames, or msgpack binary frames with the
subprotocol `ws-gateway.msgpack` (same shapes; gateway/commands.py is the server's side).

orjson when installed (ws-gateway depends on it; several times faster than json on the
receive path), else the standard json module. msgpack is imported only when asked for.
Leaf module: must not import any other gateway module.
"""
from __future__ import annotations

from typing import Any

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by the import-isolation test
    _orjson = None
import json as _json

MSGPACK_SUBPROTOCOL = "ws-gateway.msgpack"


class JsonCodec:
    """Text frames: encode(doc) -> str, decode(str | bytes) -> object."""

    name = "json"
    subprotocol = None

    if _orjson is not None:
        @staticmethod
        def encode(doc: dict) -> str:
            return _orjson.dumps(doc).decode()

        @staticmethod
        def decode(frame) -> Any:
            return _orjson.loads(frame)
    else:  # pragma: no cover
        @staticmethod
        def encode(doc: dict) -> str:
            return _json.dumps(doc, separators=(",", ":"), ensure_ascii=False)

        @staticmethod
        def decode(frame) -> Any:
            return _json.loads(frame)


class MsgpackCodec:
    """Binary frames with msgpack (the server decodes them to the same shapes)."""

    name = "msgpack"
    subprotocol = MSGPACK_SUBPROTOCOL

    def __init__(self) -> None:
        import msgpack  # only when the application chose msgpack
        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def encode(self, doc: dict) -> bytes:
        return self._packb(doc, use_bin_type=True)

    def decode(self, frame) -> Any:
        if isinstance(frame, str):
            # The server answers text when it did not accept the subprotocol; read it as JSON.
            return JsonCodec.decode(frame)
        return self._unpackb(frame, raw=False, strict_map_key=False)


def codec_for(encoding: str):
    if encoding == "json":
        return JsonCodec()
    if encoding == "msgpack":
        return MsgpackCodec()
    raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
