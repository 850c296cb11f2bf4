"""gateway_ext micro-benchmarks: each compiled module against its pure-Python twin.

Run (outside `testpaths`, so the default test run never collects it):

    pytest benchmarks/bench_ext.py --benchmark-only -q
    pytest benchmarks/bench_ext.py --benchmark-only -q --benchmark-json=/tmp/ext.json
    python benchmarks/bench_ext.py /tmp/ext.json      # markdown table: medians and speedups

Every benchmark group holds the same operation on the same input for both twins, so the
ratio is measured side by side in one run (absolute numbers move with machine load).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

SIZES = {"16B": 16, "1KiB": 1024, "64KiB": 65536, "1MiB": 1 << 20}
IMPLS = ["cython", "python"]
KEY = b"\x37\xfa\x21\x3d"


def twin(name: str, impl: str):
    suffix = "c" if impl == "cython" else "py"
    try:
        return importlib.import_module(f"gateway_ext._{name}_{suffix}")
    except ImportError as exc:
        pytest.skip(f"gateway_ext._{name}_{suffix} is not built ({exc}): python setup.py build_ext --inplace")


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def text(n: int, kind: str) -> bytes:
    """Valid UTF-8 of at most n bytes: JSON-ish ASCII, or a mix with 2/3/4-byte characters."""
    unit = '{"room":"lobby","text":"hello there"} ' if kind == "ascii" else "Hello wörld, привет мир, 你好 🎉. "
    data = (unit * (n // len(unit) + 1)).encode()[:n]
    return data.decode("utf-8", "ignore").encode()     # drop a character cut at the end


def client_frame(data: bytes) -> bytes:
    """A masked client frame (what the server parses), built with the pure-Python encoder."""
    from gateway_ext._encode_py import encode_frame
    return encode_frame(2, data, mask=KEY)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mask(benchmark, impl, size):
    mod = twin("mask", impl)
    benchmark.group = f"mask {size}"
    data = payload(SIZES[size])
    assert benchmark(mod.apply_mask, data, KEY) == twin("mask", "python").apply_mask(data, KEY)


@pytest.mark.parametrize("kind", ["mixed", "ascii"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_validate_utf8(benchmark, impl, size, kind):
    mod = twin("utf8", impl)
    benchmark.group = f"validate_utf8 {kind} {size}"
    assert benchmark(mod.validate_utf8, text(SIZES[size], kind)) is True


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_feed_one_frame(benchmark, impl, size):
    mod = twin("frames", impl)
    benchmark.group = f"feed 1 frame {size}"
    parser = mod.FrameParser(max_frame_bytes=2 << 20)
    data = client_frame(payload(SIZES[size]))
    frames = benchmark(parser.feed, data)
    assert len(frames) == 1 and len(frames[0][3]) == SIZES[size] and parser.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_feed_16_pipelined_32B_frames(benchmark, impl):
    # One socket read carrying 16 small masked messages: the per-call overhead case.
    mod = twin("frames", impl)
    benchmark.group = "feed 16 x 32B frames in one read"
    parser = mod.FrameParser()
    data = b"".join(client_frame(payload(32)) for _ in range(16))
    frames = benchmark(parser.feed, data)
    assert len(frames) == 16 and parser.buffered == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_feed_1MiB_frame_in_16KiB_reads(benchmark, impl):
    # A large message arriving over many reads: buffering must stay linear.
    mod = twin("frames", impl)
    benchmark.group = "feed 1MiB frame as 64 reads of 16KiB"
    data = client_frame(payload(1 << 20))
    chunks = [data[i:i + 16384] for i in range(0, len(data), 16384)]

    def run():
        parser = mod.FrameParser(max_frame_bytes=2 << 20)
        frames = []
        for chunk in chunks:
            frames += parser.feed(chunk)
        return frames

    frames = benchmark(run)
    assert len(frames) == 1 and len(frames[0][3]) == 1 << 20


@pytest.mark.parametrize("size", {"32B": 32, **SIZES})
@pytest.mark.parametrize("impl", IMPLS)
def test_encode_frame(benchmark, impl, size):
    # Unmasked server frame: the once-per-broadcast encode.
    mod = twin("encode", impl)
    benchmark.group = f"encode_frame {size}"
    n = {"32B": 32, **SIZES}[size]
    data = payload(n)
    assert len(benchmark(mod.encode_frame, 2, data)) == n + (2 if n < 126 else 4 if n < 65536 else 10)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_frame_masked_1KiB(benchmark, impl):
    mod = twin("encode", impl)
    benchmark.group = "encode_frame masked 1KiB"
    benchmark(mod.encode_frame, 2, payload(1024), True, False, KEY)


class _Transport:
    __slots__ = ()

    def write(self, data):
        pass

    def writelines(self, data):
        pass


class _EchoEndpoint:
    """gateway/server/echo.py's on_messages, inlined (this file imports gateway_ext only)."""

    def on_messages(self, conn, messages):
        send = conn.ws.send
        for opcode, payload in messages:
            send(opcode, payload)


@pytest.mark.parametrize("impl", IMPLS)
def test_protocol_echo_one_message(benchmark, impl):
    """ServerProtocol: one 32-byte text frame in, its echo queued and taken out."""
    mod = twin("protocol", impl)
    proto = mod.ServerProtocol(1 << 20)
    data = client_frame(text(32, "ascii")).replace(b"\x82", b"\x81", 1)

    def echo():
        for opcode, payload in proto.receive_data(data):
            proto.send(opcode, payload)
        return proto.data_to_send()

    benchmark.group = "protocol: 1 x 32B text in, echo out"
    assert len(benchmark(echo)) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_protocol_fragmented_1MiB(benchmark, impl):
    """ServerProtocol: a 1 MiB binary message in 256 fragments of 4 KiB, reassembled."""
    mod = twin("protocol", impl)
    proto = mod.ServerProtocol(2 << 20)
    from gateway_ext._encode_py import encode_frame
    part = payload(4096)
    data = (encode_frame(2, part, fin=False, mask=KEY)
            + encode_frame(0, part, fin=False, mask=KEY) * 254 + encode_frame(0, part, mask=KEY))
    benchmark.group = "protocol: 1MiB message in 256 fragments"
    assert len(benchmark(proto.receive_data, data)[0][1]) == 1 << 20


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_echo_read(benchmark, impl):
    """WebSocketStream.data_received of an open /echo connection: the whole per-read path."""
    stream_mod, proto_mod = twin("stream", impl), twin("protocol", impl)

    class Conn(stream_mod.WebSocketStream):
        def _after_close_sent(self):
            pass

    conn = Conn(stream_mod.StreamStats(), stream_mod.Corker(None))
    conn.transport, conn.ws, conn.endpoint = _Transport(), proto_mod.ServerProtocol(1 << 20), _EchoEndpoint()
    conn.phase = 3
    data = client_frame(text(32, "ascii")).replace(b"\x82", b"\x81", 1)
    benchmark.group = "stream: data_received, 1 x 32B text echoed"
    benchmark(conn.data_received, data)
    assert conn.stats.messages_in == conn.stats.frames_out > 0


def _fmt(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.0f} ns"


def markdown(report: dict) -> str:
    """One row per benchmark group: median of each twin and the speedup."""
    groups: dict[str, dict[str, float]] = {}
    for bench in report["benchmarks"]:
        impl = bench["params"]["impl"]
        groups.setdefault(bench["group"], {})[impl] = bench["stats"]["median"]
    lines = ["| benchmark | Cython median | Python median | speedup |", "|---|---:|---:|---:|"]
    for group, med in groups.items():
        c, py = med.get("cython"), med.get("python")
        speed = f"{py / c:.1f}x" if c and py else "-"
        lines.append(f"| {group} | {_fmt(c) if c else '-'} | {_fmt(py) if py else '-'} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else os.path.join("/tmp", "ext.json")) as fh:
        print(markdown(json.load(fh)))
