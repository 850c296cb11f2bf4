"""Headless Chromium (which always offers permessage-deflate) against /ws with compression.

The page joins a room, publishes a ~3 KiB message (Chromium compresses it; the gateway
inflates it), receives the broadcast back (the gateway compresses it once; Chromium inflates
it -- a bad stream would make Chromium close with 1002 instead) and publishes a report with
`ws.extensions` and whether the round trip was intact. A websockets client in the same room,
without compression, reads both publications.
"""
import asyncio
import os
import signal
import tempfile

import orjson
import pytest
import websockets

from gateway.ws.handshake import response
from tests.helpers import serve
from tests.requires import binary, requires

pytestmark = pytest.mark.timeout(90)

CHROMIUM = binary("chromium")

PAGE = """<!doctype html><title>deflate</title><script>
const big = "hello chromium, permessage-deflate here. ".repeat(70);
const ws = new WebSocket("ws://127.0.0.1:PORT/ws");
ws.onopen = () => ws.send(JSON.stringify({op: "join", room: "chromium", id: 1}));
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.op === "ack" && m.id === 1) ws.send(JSON.stringify({op: "publish", room: "chromium", data: {big}}));
  else if (m.op === "message" && m.data.big !== undefined)
    ws.send(JSON.stringify({op: "publish", room: "chromium", data: {extensions: ws.extensions, intact: m.data.big === big}}));
};
ws.onclose = (e) => { document.title = "closed " + e.code; };
</script>"""


@requires("chromium")
def test_chromium_negotiates_and_round_trips_compressed(run):
    async def main():
        async with serve() as gw:
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", compression=None) as observer:
                await observer.send(orjson.dumps({"op": "join", "room": "chromium", "id": 1}).decode())
                assert orjson.loads(await observer.recv())["op"] == "ack"
                # Served by the gateway itself: Chromium blocks pages from opaque origins (data:)
                # from reaching loopback addresses (Local Network Access).
                page = PAGE.replace("PORT", str(gw.port)).encode()
                gw.http_routes["/deflate-test.html"] = lambda request, body: response(200, page, "text/html")
                url = f"http://127.0.0.1:{gw.port}/deflate-test.html"
                # Chromium's helper processes may still be writing the profile while it is removed.
                with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
                    browser = await asyncio.create_subprocess_exec(
                        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={profile}", "--remote-debugging-port=0", url,
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                        start_new_session=True)
                    try:
                        first = orjson.loads(await asyncio.wait_for(observer.recv(), 60))
                        report = orjson.loads(await asyncio.wait_for(observer.recv(), 30))
                    finally:
                        # The whole process group: renderer/GPU/crashpad children too.
                        try:
                            os.killpg(browser.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        await browser.wait()
            assert first["data"]["big"].startswith("hello chromium")
            extensions = report["data"]["extensions"]
            assert extensions.startswith("permessage-deflate") and "server_no_context_takeover" in extensions
            assert report["data"]["intact"] is True
            assert gw.deflate.negotiated >= 1
            assert gw.deflate.compressed_in >= 1      # Chromium's publish arrived compressed
            assert gw.deflate.compressed_out >= 1     # the broadcast to Chromium left compressed
    run(main())
