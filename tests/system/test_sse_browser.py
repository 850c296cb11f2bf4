"""SSE in headless Chromium: the browser's own EventSource resumes with Last-Event-ID
after the gateway restarts, and nothing is missed (issue 14).

Two gateways share a real redis-server: the page streams from A, a Python publisher sends
~200 messages/s through B. A is stopped (SIGTERM: the drain ends the stream) and started
again on the same port while B keeps publishing; EventSource reconnects by itself
(`retry: 1000`), sends the last `id:` as Last-Event-ID, and A replays what the page missed
from Redis before going live. The page's seqs must be contiguous, without duplicates.
"""
import threading
import time
import urllib.request

import orjson
import pytest

from tests.helpers import GatewayProcess, free_port
from tests.redis_server import RedisServer
from tests.requires import binary, require

CHROMIUM = require("chromium", "chromedriver", "redis-server", module_level=True)
CHROMEDRIVER = binary("chromedriver")

selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

pytestmark = pytest.mark.timeout(150)
ARGS = ("--log-level", "warning", "--drain-window", "0", "--history-size", "5000", "--rate-limit", "0")

PAGE_SCRIPT = """
window.seqs = []; window.ids = []; window.kinds = []; window.opens = 0;
const es = new EventSource('/sse?room=feed');
window.es = es;
es.onopen = () => { window.opens += 1; };
es.onmessage = (e) => { window.seqs.push(JSON.parse(e.data).seq); window.ids.push(e.lastEventId); };
es.addEventListener('ack', (e) => window.kinds.push('ack:' + JSON.parse(e.data).recovered));
es.addEventListener('reset', (e) => window.kinds.push('reset'));
"""


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Publisher(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.last = 0

    def run(self) -> None:
        with connect(self.url, open_timeout=10, compression=None) as ws:
            n = 0
            while not self.done.is_set():
                for _ in range(2):
                    ws.send(orjson.dumps({"op": "publish", "room": "feed", "data": n}).decode())
                    n += 1
                time.sleep(0.01)
            ws.send(orjson.dumps({"op": "publish", "room": "feed", "data": "end", "id": "end"}).decode())
            while True:
                doc = orjson.loads(ws.recv(timeout=20))
                if doc.get("id") == "end":
                    self.last = doc["seq"]
                    return


def wait(driver, predicate, what, timeout=60):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))
    except Exception:
        raise AssertionError(f"timed out waiting for {what}: {driver.execute_script('return window.kinds')}, "
                             f"{len(driver.execute_script('return window.seqs'))} seqs") from None


def test_event_source_resumes_after_a_gateway_restart(browser):
    with RedisServer() as redis:
        port = free_port()
        with GatewayProcess(*ARGS, "--broker", redis.url) as b:
            a = GatewayProcess(*ARGS, "--broker", redis.url, port=port).start()
            try:
                browser.get(f"http://127.0.0.1:{port}/healthz")      # same origin as /sse
                browser.execute_script(PAGE_SCRIPT)
                wait(browser, lambda d: d.execute_script("return window.kinds.length") >= 1, "the first ack")
                publisher = Publisher(b.url())
                publisher.start()
                wait(browser, lambda d: len(d.execute_script("return window.seqs")) >= 100, "live messages")
                assert a.stop() == 0                                  # SIGTERM: drained, exit 0
                time.sleep(1.0)                                       # B keeps publishing meanwhile
                a = GatewayProcess(*ARGS, "--broker", redis.url, port=port).start()
                wait(browser, lambda d: d.execute_script("return window.opens") >= 2, "the reconnect")
                wait(browser, lambda d: len(d.execute_script("return window.seqs")) >= 500, "more messages")
                publisher.done.set()
                publisher.join(30)
                wait(browser, lambda d: d.execute_script("return window.seqs[window.seqs.length - 1]")
                     == publisher.last, "the end marker")
                seqs = browser.execute_script("return window.seqs")
                kinds = browser.execute_script("return window.kinds")
                first = seqs[0]
                assert seqs == list(range(first, publisher.last + 1)), "a gap or a duplicate"
                assert kinds == ["ack:undefined", "ack:true"]             # the second join recovered
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    metrics = r.read().decode()
                assert "ws_gateway_sse_resumed_total 1.0" in metrics
                assert "ws_gateway_history_recoveries_succeeded_total 1.0" in metrics
            finally:
                a.stop()
