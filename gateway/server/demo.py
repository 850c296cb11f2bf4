"""The opt-in demo page (`--demo`): `/` serves gateway/static/index.html, `/demo.js` its script
(built on the JS SDK, which static.py serves always). Imports only static.py.
"""
from __future__ import annotations

from gateway.server.static import JS, file_route

FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/demo.js": ("demo.js", JS)}


def routes() -> dict:
    """HTTP routes for the Gateway: path -> handler(request, body) -> response bytes."""
    return {path: file_route(name, content_type) for path, (name, content_type) in FILES.items()}
