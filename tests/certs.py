"""Self-signed certificates for TLS tests, generated with the `openssl` command line tool."""
from __future__ import annotations

import os
import ssl
import subprocess

from tests.requires import require


def make_cert(directory, name: str = "server", cn: str = "localhost") -> tuple[str, str]:
    """(certfile, keyfile) for `cn`, valid for 127.0.0.1 and localhost, ECDSA P-256 (fast to make)."""
    require("openssl")
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=30)
    return cert, key


def client_context(certfile: str) -> ssl.SSLContext:
    """A client context that trusts exactly this self-signed certificate."""
    ctx = ssl.create_default_context(cafile=certfile)
    ctx.check_hostname = True
    return ctx
