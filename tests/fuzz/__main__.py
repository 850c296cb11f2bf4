"""Long fuzz runs with atheris (coverage-guided): `python -m tests.fuzz NAME [libFuzzer flags]`.

NAME is one of tests/fuzz/harnesses.py's HARNESSES (frames, protocol, handshake, http). Extra
arguments go to libFuzzer, e.g. `-max_total_time=600`, `-jobs=2`, a corpus directory, or a
crash file to replay. Needs the `fuzz` extra: `pip install -e '.[fuzz]'`. See README.md here.
"""
import os
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("frames", "protocol", "handshake", "http"):
        sys.exit("usage: python -m tests.fuzz {frames|protocol|handshake|http} [libFuzzer flags]")
    name = sys.argv.pop(1)
    import atheris

    sys.path.insert(0, os.getcwd())
    with atheris.instrument_imports(include=["gateway", "gateway_ext"]):
        import gateway_ext._frames_py  # noqa: F401  (instrumented: coverage guides the fuzzer)
        import gateway_ext._protocol_py  # noqa: F401
        import gateway.ws.handshake  # noqa: F401
        import gateway.ws.deflate  # noqa: F401
        import gateway.server.connection  # noqa: F401
        import gateway.security.defences  # noqa: F401
        import gateway.api.methods  # noqa: F401
    from tests.fuzz.harnesses import HARNESSES

    # One INFO line per refused request would be most of the run's time; the harness watches
    # ERROR records itself, so they must still pass the logger.
    import logging
    logging.getLogger("gateway").setLevel(logging.ERROR)
    harness = HARNESSES[name]
    atheris.Setup(sys.argv, harness)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
