"""The gateway serves the JS SDK at /ws-gateway.js (and its types) without --demo: content
types, ETag revalidation (304 without a body), no-cache, CORS for cross-origin module imports.
The peer is aiohttp's HTTP client and a raw socket."""
import os

import aiohttp
import pytest

from tests.helpers import ROOT, raw_request, serve

pytestmark = pytest.mark.timeout(60)
STATIC = os.path.join(ROOT, "gateway", "static")


def test_sdk_is_served_always_with_caching_headers(run):
    async def main():
        async with serve(echo=False) as gw:
            base = f"http://127.0.0.1:{gw.port}"
            etags = {}
            async with aiohttp.ClientSession() as session:
                for path, ctype in (("/ws-gateway.js", "text/javascript"), ("/ws-gateway.d.ts", "application/typescript")):
                    async with session.get(base + path) as resp:
                        body = await resp.read()
                        assert resp.status == 200
                        assert resp.headers["Content-Type"] == f"{ctype}; charset=utf-8"
                        assert resp.headers["Cache-Control"] == "no-cache"
                        assert resp.headers["Access-Control-Allow-Origin"] == "*"
                        assert resp.headers["X-Content-Type-Options"] == "nosniff"
                        etag = etags[path] = resp.headers["ETag"]
                    with open(os.path.join(STATIC, path.lstrip("/")), "rb") as fh:
                        assert body == fh.read()
                    async with session.get(base + path, headers={"If-None-Match": f'"other", W/{etag}'}) as resp:
                        assert resp.status == 304 and await resp.read() == b""
                        assert resp.headers["ETag"] == etag
                    async with session.get(base + path, headers={"If-None-Match": '"stale"'}) as resp:
                        assert resp.status == 200 and await resp.read() == body
                async with session.get(base + "/") as resp:
                    assert resp.status == 404   # the demo page only with --demo
            head = await raw_request(gw.port, b"GET /ws-gateway.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: "
                                     + etags["/ws-gateway.js"].encode() + b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 304 ") and b"Content-Length" not in head and head.endswith(b"\r\n\r\n")
    run(main())
def test_demo_routes_with_demo(run):
    async def main():
        async with serve(echo=False, demo=True) as gw:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{gw.port}/") as resp:
                    assert resp.status == 200 and "ws-gateway demo" in await resp.text()
                async with session.get(f"http://127.0.0.1:{gw.port}/demo.js") as resp:
                    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/javascript")
                    assert "ws-gateway.js" in await resp.text()
    run(main())
