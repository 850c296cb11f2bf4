"""CI's single pytest command also runs the JS SDK's own suite: `node --test tests/sdk/js/`
(the shared conformance transcripts against gateway/static/ws-gateway.js, with fakes)."""
import os
import subprocess

import pytest

from tests.helpers import ROOT
from tests.requires import binary, requires

NODE = binary("node")


@pytest.mark.timeout(300)
@requires("node")
def test_node_test_runner_passes_the_js_sdk_suite():
    proc = subprocess.run([NODE, "--experimental-websocket", "--no-warnings", "--test", os.path.join("tests", "sdk", "js")],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    summary = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("# ", "not ok")))
    assert proc.returncode == 0, f"node --test failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert "# pass 0" not in summary and "# fail 0" in summary, summary
