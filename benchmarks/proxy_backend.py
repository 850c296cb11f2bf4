"""A minimal connect-proxy backend for the handshake benchmark (benchmarks/README.md):
aiohttp.web on uvloop, a dict of cookie sessions, the answer docs/backend.md describes.

    python benchmarks/proxy_backend.py --port 9100
    # cookie "session=bench" is user "bench"; anything else is refused with 401
"""
import argparse

import uvloop
from aiohttp import web

SESSIONS = {"bench": "bench"}


async def connect(request: web.Request) -> web.Response:
    user = SESSIONS.get(request.cookies.get("session", ""))
    if user is None:
        return web.json_response({"reason": "no session"}, status=401)
    return web.json_response({"user": user, "rooms": ["*"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/connect", connect)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
