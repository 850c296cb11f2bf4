"""Browser-realistic auth: headless Chromium on a page of another origin that passes its own
`?token=` to the WebSocket URL (browsers cannot set headers on a WebSocket request).

The page is served by a small HTTP server of its own (like an app at app.example.com using a
gateway at ws.example.com), so the browser's real `Origin` header meets the allow-list:
a valid token connects, joins and publishes; a bad token and a foreign origin are refused;
an expiring token is closed with 4001 and the browser's close event shows that code.
The project's own demo page (`--demo`, same origin) is driven too, with auth on.
"""
import http.server
import threading
import time
import urllib.parse

import jwt
import pytest
import uvloop

from gateway.errors import GatewayCloseCode
from tests import auth_tokens as t
from tests.helpers import free_port, serve
from tests.requires import binary, requires

CHROMIUM = binary("chromium")
CHROMEDRIVER = binary("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
pytestmark = [pytest.mark.timeout(120), requires("chromium", "chromedriver")]

# The application page: it takes the token from its own URL and hands it to the gateway.
PAGE = b"""<!doctype html><meta charset="utf-8"><title>app</title>
<script>
function connect(gatewayUrl, done) {
  const token = new URLSearchParams(location.search).get("token");
  const ws = new WebSocket(gatewayUrl + "?token=" + encodeURIComponent(token));
  const events = [];
  ws.onopen = () => {
    events.push("open");
    ws.send(JSON.stringify({op: "join", room: "lobby", id: 1}));
  };
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    events.push(m);
    if (m.op === "ack" && m.id === 1) ws.send(JSON.stringify({op: "publish", room: "lobby", data: {hi: "chromium"}, id: 2}));
    if (m.op === "message" && !window.keepOpen) ws.close(1000, "done");
  };
  ws.onerror = () => events.push("error");
  ws.onclose = (e) => done({events: events, code: e.code, reason: e.reason});
}
</script>"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


async def in_browser(driver, page_url, gateway_url, keep_open=False):
    """Load the app page and run connect(); the browser's result dict (events, close code)."""
    import asyncio

    def go():
        driver.get(page_url)
        driver.execute_script(f"window.keepOpen = {'true' if keep_open else 'false'};")
        return driver.execute_async_script("connect(arguments[0], arguments[1]);", gateway_url)
    return await asyncio.to_thread(go)


def test_token_in_query_from_a_browser_page(browser, page_port):
    async def main():
        async with serve(jwt_secret=t.SECRET, jwt_leeway=0,
                         allowed_origins=f"http://127.0.0.1:{page_port}") as gw:
            gateway_url = f"ws://127.0.0.1:{gw.port}/ws"
            page = f"http://127.0.0.1:{page_port}/app"

            token = t.hs256(sub="browser-user", rooms=["lobby"])
            result = await in_browser(browser, f"{page}?token={urllib.parse.quote(token)}", gateway_url)
            assert result["events"][0] == "open", result
            assert any(isinstance(e, dict) and e.get("op") == "ack" and e.get("id") == 1 and "epoch" in e
                       for e in result["events"])
            message = [e for e in result["events"] if isinstance(e, dict) and e.get("op") == "message"]
            assert message and message[0]["data"] == {"hi": "chromium"} and result["code"] == 1000
            assert gw.limits.stats.auth_rejected == {} and gw.limits.stats.origin_rejected == 0

            # a bad token: the browser only sees a failed connection (1006); the gateway says why
            bad = t.hs256(secret=t.OTHER_SECRET, sub="browser-user")
            result = await in_browser(browser, f"{page}?token={urllib.parse.quote(bad)}", gateway_url)
            assert "open" not in result["events"] and result["code"] == 1006
            assert gw.limits.stats.auth_rejected["signature"] == 1

            # a valid token on a page of a foreign origin: cross-site WebSocket hijacking refused
            foreign = f"http://localhost:{page_port}/app?token={urllib.parse.quote(token)}"
            result = await in_browser(browser, foreign, gateway_url)
            assert "open" not in result["events"] and result["code"] == 1006
            assert gw.limits.stats.origin_rejected == 1

            # an expiring token: the browser's close event carries 4001 at expiry
            exp = int(time.time()) + 2
            short = jwt.encode({"sub": "browser-user", "exp": exp}, t.SECRET, algorithm="HS256")
            result = await in_browser(browser, f"{page}?token={urllib.parse.quote(short)}", gateway_url,
                                      keep_open=True)
            assert result["events"][0] == "open"
            assert (result["code"], result["reason"]) == (GatewayCloseCode.TOKEN_EXPIRED, "token expired")
            assert time.time() >= exp
    uvloop.run(main())


def test_demo_page_passes_its_query_token(browser, tmp_path):
    """The project's own demo page (`--demo`) with auth on, through the CLI flags."""
    from selenium.webdriver.common.by import By
    from tests.helpers import GatewayProcess
    from tests.system.test_demo_browser import log_lines, page_state, wait_for   # the demo test's helpers

    secret = tmp_path / "jwt.secret"
    secret.write_text(t.SECRET)
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    gw = GatewayProcess("--demo", "--jwt-secret-file", str(secret), "--allowed-origins", origin,
                        "--ping-interval", "0", "--drain-window", "0", port=port).start()
    try:
        token = t.hs256(sub="demo-user", rooms=["lobby"])
        browser.get(f"{origin}/?token={urllib.parse.quote(token)}")
        wait_for(browser, lambda d: page_state(d) == "open", "the page to connect with its token")
        browser.find_element(By.ID, "join").click()                          # the default room: lobby
        wait_for(browser, lambda d: "ok: join lobby" in log_lines(d), "the join's ack")
        room = browser.find_element(By.ID, "room")
        room.clear()
        room.send_keys("admin")
        browser.find_element(By.ID, "join").click()
        wait_for(browser, lambda d: any(line.startswith("error (forbidden) for join admin") for line in log_lines(d)),
                 "the forbidden join's error")

        bad = t.hs256(secret=t.OTHER_SECRET, sub="demo-user")
        browser.get(f"{origin}/?token={urllib.parse.quote(bad)}")
        wait_for(browser, lambda d: "closed (1006" in d.find_element(By.ID, "detail").text,
                 "the refused connection")
        assert page_state(browser) == "closed"
        # The SDK's pre-flight GET learned the 401 the WebSocket API hides: it stopped for good.
        wait_for(browser, lambda d: "handshake refused (401)" in d.find_element(By.ID, "detail").text,
                 "the SDK to tell the 401 apart")
        assert "reconnecting" not in browser.find_element(By.ID, "detail").text
        assert browser.execute_script("return window.wsGatewayDemo.client.state") == "disconnected"
    finally:
        gw.stop()
    out = gw.output()
    assert '"user":"demo-user"' in out and '"event":"close"' in out
    assert "signature verification failed" in out and '"status":401' in out
    assert token not in out and bad not in out                               # never logged
