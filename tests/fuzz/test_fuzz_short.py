"""The fuzz harnesses (tests/fuzz/harnesses.py), briefly, under hypothesis: a few seconds each.

`.ci/run` runs them with the rest of the suite; long coverage-guided runs use atheris
(tests/fuzz/README.md). Hypothesis generates the raw bytes each harness decodes into frames
or requests; a failure prints the input as a bytes literal, which replays as
`harnesses.NAME(b"...")`: keep it as a regression test next to the fix.
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

    @settings(max_examples=EXAMPLES[name], deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(min_size=0, max_size=2048))
    def run(data):
        harness(data)

    run()


def test_the_http_harness_sees_a_500():
    """The harness can fail: a route that raises answers 500 (and logs an ERROR)."""
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
