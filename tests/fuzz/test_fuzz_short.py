"""The fuzz harnesses (tests/fuzz/harnesses.py), briefly, under hypothesis: a few seconds each.

`.ci/run` runs them with the rest of the suite; long coverage-guided runs use atheris
(tests/fuzz/README.md). Hypothesis generates the raw bytes each harness decodes into frames
or requests; a failure prints the input as a bytes literal, which replays as
`harnesses.NAME(b"...")`: keep it in FOUND below.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import harnesses

# Examples per harness: a few seconds each on a CI machine (the frame twins see 1 MiB payloads).
EXAMPLES = {"frames": 1000, "protocol": 1000, "handshake": 2000, "http": 1000}


@pytest.mark.parametrize("name", sorted(harnesses.HARNESSES))
def test_harness_short_run(name):
    harness = harnesses.HARNESSES[name]

    # derandomize: CI runs the same examples every time (a failure is a regression, never luck);
    # finding new inputs is atheris's job (README.md).
    @settings(max_examples=EXAMPLES[name], deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(st.binary(min_size=0, max_size=2048))
    def run(data):
        harness(data)

    run()


def test_the_http_harness_sees_an_unexpected_exception():
    """The harness can fail: a route that raises (answered 400, counted as http_errors)."""
    loop, gateways = harnesses._gateways()
    gw = gateways[0]

    def broken(request, body):
        raise RuntimeError("boom")

    gw.http_routes["/broken"] = broken
    try:
        with pytest.raises(AssertionError):
            # gateway 0, raw mode, then the request as it goes on the wire
            harnesses.http(b"\x00\x00GET /broken HTTP/1.1\r\nHost: h\r\n\r\n")
        harnesses.http(b"\x00\x00GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")   # and passes a 200
    finally:
        del gw.http_routes["/broken"]


# Inputs the long runs found, kept so they stay fixed: (harness, input, xfail reason or None).
FOUND = [
    # atheris, `http`, 1 minute in: `POST /api/publish` with `Content-Length: \xb2` ("²" in
    # latin-1: str.isdigit() says yes, int() raises) answered 500 with an ERROR traceback.
    # Issue 12 item 3, fixed by 59b5b0f (header numbers are ASCII digits).
    ("http", b"\x13\xff\x13\x13\x13\xff\x1aA\x90\x7f\x1c@&YYYYYYY\x00\x13"),
]


@pytest.mark.parametrize("name, data", FOUND)
def test_found_inputs(name, data):
    harnesses.HARNESSES[name](data)
