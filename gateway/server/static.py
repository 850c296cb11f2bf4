"""Static files the gateway serves: the JS SDK always (`/ws-gateway.js`, `/ws-gateway.d.ts`),
the demo page with `--demo` (demo.py).

Files are read once, at start (small, and a deploy restarts the process). Each answer carries
a strong ETag and `Cache-Control: no-cache`: browsers keep the file and revalidate it with
`If-None-Match` (304, no body), so a new gateway's SDK is picked up at once and an unchanged
one costs a header round trip. The SDK is an ES module: `Access-Control-Allow-Origin: *` lets
pages on other origins `import` it (module scripts are fetched in CORS mode).
Imports only handshake.response.
"""
from __future__ import annotations

import hashlib
import os

from gateway.ws.handshake import response

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
JS = "text/javascript; charset=utf-8"
SDK_FILES = {
    "/ws-gateway.js": ("ws-gateway.js", JS),
    "/ws-gateway.d.ts": ("ws-gateway.d.ts", "application/typescript; charset=utf-8"),
}


def file_route(name: str, content_type: str, cors: bool = False):
    """A route handler answering one file: 200 with an ETag, or 304 when If-None-Match has it."""
    with open(os.path.join(STATIC, name), "rb") as fh:
        body = fh.read()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"Cache-Control": "no-cache", "ETag": etag, "X-Content-Type-Options": "nosniff"}
    if cors:
        headers["Access-Control-Allow-Origin"] = "*"
    full = response(200, body, content_type, headers)
    # RFC 9110 section 8.6: a 304 must not carry a Content-Length other than the 200's, and
    # has no body; built here because response() always writes the length of its body.
    not_modified = ("HTTP/1.1 304 Not Modified\r\nConnection: close\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")

    def handler(request, _body):
        # RFC 9110 section 13.1.2: a list of entity tags, or "*"; weak comparison for GET.
        wanted = request.header("if-none-match")
        if wanted:
            tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
            if etag in tags or "*" in tags:
                return not_modified
        return full
    return handler


def sdk_routes() -> dict:
    """HTTP routes for the JS SDK: path -> handler(request, body) -> response bytes."""
    return {path: file_route(name, ctype, cors=True) for path, (name, ctype) in SDK_FILES.items()}
