"""The opt-in demo page (`--demo`): `/` serves gateway/static/index.html, `/demo.js` its client.

Files are read once, at start; they are static and small. Imports only handshake.response.
"""
from __future__ import annotations

import os

from gateway.ws.handshake import response

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/demo.js": ("demo.js", "text/javascript; charset=utf-8")}


def routes() -> dict:
    """HTTP routes for the Gateway: path -> handler(request, body) -> response bytes."""
    out = {}
    for path, (name, content_type) in FILES.items():
        with open(os.path.join(STATIC, name), "rb") as fh:
            answer = response(200, fh.read(), content_type, {"Cache-Control": "no-cache",
                                                              "X-Content-Type-Options": "nosniff"})
        out[path] = lambda request, body, answer=answer: answer
    return out
