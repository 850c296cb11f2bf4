"""docs/backend.md's webhook checks (hookcheck.py, the part a backend copies) accept the
gateway's own signatures and refuse tampered, foreign, replayed and duplicate deliveries."""
import os
import re
import time

from gateway.api.webhooks import sign
from tests.helpers import ROOT


def _hookcheck() -> dict:
    text = open(os.path.join(ROOT, "docs", "backend.md"), encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# hookcheck.py"))
    namespace: dict = {}
    exec(compile(block, "docs/backend.md:hookcheck.py", "exec"), namespace)
    return namespace


def test_the_documented_checks_accept_the_gateways_signature_and_refuse_the_rest():
    check = _hookcheck()
    verify = check["verify_signature"]
    secret, body = b"doc-secret-0123456789abcdef", b'{"events":[{"id":"1-0-ab","type":"user_online"}]}'
    now = int(time.time())
    header = sign(secret, body, now)
    assert verify(secret, body, header)
    assert not verify(secret, body.replace(b"online", b"offline"), header)
    assert not verify(b"someone-else-0123456789", body, header)
    assert not verify(secret, body, sign(secret, body, now - 301))      # replayed 5 minutes later
    assert not verify(secret, body, "")
    seen = check["SeenIds"]()
    assert seen.first_time("1-0-ab") and not seen.first_time("1-0-ab") and seen.first_time("2-0-ab")
