"""The demo page in headless Chromium (Selenium + Debian's chromium/chromedriver).

A message published from a Python client appears on the page, one published from the
page reaches the Python client, `?token=` is passed on to the WebSocket URL, after a
gateway restart the page (the JS SDK under it) reconnects with backoff and re-joins its room
by itself, and a reload resumes the room from the position kept in sessionStorage.
A first visit (nothing in sessionStorage) joins `lobby`, the #room field's default, by
itself (issue 20 item 10); a room the user left is not joined again by a reload.
"""
import time
import urllib.request

import orjson
import pytest

from tests.helpers import GatewayProcess, free_port, join_ack
from tests.requires import binary, require

CHROMIUM = require("chromium", "chromedriver", module_level=True)
CHROMEDRIVER = binary("chromedriver")

selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

pytestmark = pytest.mark.timeout(120)
GATEWAY_ARGS = ("--demo", "--log-level", "warning", "--drain-window", "0", "--ping-interval", "0")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1000,800"):
        options.add_argument(arg)
    # An explicit chromedriver: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_lines(driver):
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#log li")]


def wait_for(driver, predicate, what, timeout=30):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))
    except Exception:
        raise AssertionError(f"timed out waiting for {what}; page log: {log_lines(driver)}") from None


def page_state(driver):
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def page_shows(text):
    return lambda d: any(line.endswith(text) for line in log_lines(d))


class PythonClient:
    """A websockets (sync) client joined to `room`; a context manager."""

    def __init__(self, port, room):
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.room = room

    def __enter__(self):
        self.ws = connect(self.url, open_timeout=10, compression=None).__enter__()
        self.ws.send(orjson.dumps({"op": "join", "room": self.room, "id": "j"}).decode())
        assert join_ack(orjson.loads(self.ws.recv(timeout=10))) == {"op": "ack", "id": "j"}
        return self

    def __exit__(self, *exc):
        self.ws.__exit__(*exc)

    def publish(self, text):
        self.ws.send(orjson.dumps({"op": "publish", "room": self.room, "data": {"text": text}}).decode())

    def wait_text(self, text, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = orjson.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if doc.get("op") == "message" and doc["data"].get("text") == text:
                return doc
        raise AssertionError(f"{text!r} never arrived")


def test_demo_page_round_trip_and_reconnect(browser):
    port = free_port()
    gw = GatewayProcess(*GATEWAY_ARGS, port=port).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/demo.js", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
        browser.get(f"http://127.0.0.1:{port}/?token=abc.def")
        wait_for(browser, lambda d: page_state(d) == "open", "the page to connect")
        assert browser.execute_script("return window.wsGatewayDemo.url") == f"ws://127.0.0.1:{port}/ws?token=abc.def"
        # Chromium always offers permessage-deflate (RFC 7692); the gateway accepts it by default.
        extensions = browser.execute_script("return window.wsGatewayDemo.extensions")
        assert extensions.startswith("permessage-deflate; server_no_context_takeover"), extensions

        # First visit: nothing stored for the tab, so the page joins the #room field's room
        # (lobby) by itself, and receives what is published there.
        subs = "return [...window.wsGatewayDemo.client.subscriptions.keys()]"
        assert browser.execute_script(subs) == ["lobby"]
        wait_for(browser, lambda d: "ok: join lobby" in log_lines(d), "the first visit's own join of lobby")
        stored = browser.execute_script('return JSON.parse(sessionStorage.getItem("ws-gateway-demo"))')
        assert list(stored["rooms"]) == ["lobby"]
        with PythonClient(port, "lobby") as py:
            py.publish("hello lobby")
            wait_for(browser, page_shows("hello lobby"), "a message in lobby without any click")

        room = browser.find_element(By.ID, "room")
        room.clear()
        room.send_keys("demo")
        browser.find_element(By.ID, "join").click()
        wait_for(browser, lambda d: "ok: join demo" in log_lines(d), "the join's ack")

        with PythonClient(port, "demo") as py:
            py.publish("hello from python")
            wait_for(browser, page_shows("hello from python"), "the Python client's message on the page")
            browser.find_element(By.ID, "text").send_keys("hello from the browser")
            browser.find_element(By.ID, "publish").click()
            doc = py.wait_text("hello from the browser")
            assert doc["room"] == "demo" and doc["seq"] == 2
            # Above compression_min_bytes: compressed to the page and (by Chromium) from it.
            long_text = "compressed both ways " * 30 + "end"
            py.publish(long_text)
            wait_for(browser, page_shows(long_text), "a compressed message on the page")
            browser.find_element(By.ID, "text").send_keys(long_text + " from the browser")
            browser.find_element(By.ID, "publish").click()
            py.wait_text(long_text + " from the browser")

        # Restart the gateway on the same port: the page notices, backs off, reconnects and re-joins.
        gw.stop()
        wait_for(browser, lambda d: page_state(d) == "closed", "the page to notice the restart")
        gw = GatewayProcess(*GATEWAY_ARGS, port=port).start()
        wait_for(browser, lambda d: page_state(d) == "open", "the page to reconnect")
        wait_for(browser, lambda d: log_lines(d).count("ok: join demo") >= 2, "the re-join after reconnecting")
        with PythonClient(port, "demo") as py:
            py.publish("after the restart")
            wait_for(browser, page_shows("after the restart"), "a message after the reconnect")
            position = browser.execute_script('return window.wsGatewayDemo.client.subscriptions.get("demo").position')
            assert position["seq"] == 1                    # a fresh gateway numbers the room from 1

            # A reload resumes from sessionStorage: the page re-joins "demo" by itself, from its
            # position. With history on the server (issue 14) what was published meanwhile is
            # replayed; without it the join ack has no epoch and the page just continues live.
            # Leave lobby first: the tab has state now, so the reload must not join it again.
            room.clear()
            room.send_keys("lobby")
            browser.find_element(By.ID, "leave").click()
            wait_for(browser, lambda d: "left lobby" in log_lines(d), "leaving lobby")
            stored = browser.execute_script('return JSON.parse(sessionStorage.getItem("ws-gateway-demo"))')
            assert list(stored["rooms"]) == ["demo"] and stored["rooms"]["demo"]["seq"] == 1
            browser.refresh()
            py.publish("while the page reloads")
            wait_for(browser, lambda d: page_state(d) == "open", "the reloaded page to connect")
            wait_for(browser, lambda d: "ok: join demo" in log_lines(d), "the re-join from sessionStorage")
            assert browser.execute_script(subs) == ["demo"]     # the stored rooms only: no lobby
            sub = 'window.wsGatewayDemo.client.subscriptions.get("demo")'
            if browser.execute_script(f"return {sub}.position && {sub}.position.epoch") is not None:
                wait_for(browser, page_shows("while the page reloads"), "the replay of the missed message")
            py.publish("after the reload")
            wait_for(browser, page_shows("after the reload"), "a live message after the reload")
            assert browser.execute_script(f"return {sub}.position.seq") == 3
    finally:
        gw.stop()
