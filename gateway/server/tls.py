"""Native TLS: the server's SSLContext, built from `certfile`/`keyfile`.

Used by the server (the listener, SIGHUP certificate rotation) and by `gateway.app.preflight`,
which builds it once before start-up so a bad certificate or key is a one-line configuration
error for `serve` and `check-config` alike. Imports only the standard library and `config`.
"""
from __future__ import annotations

import ssl

from gateway.config import Config


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context for native TLS, or None when certfile/keyfile are not set."""
    if not config.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.certfile, config.keyfile)
    # Only HTTP/1.1 carries the WebSocket upgrade (RFC 8441 over h2 is not supported).
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
