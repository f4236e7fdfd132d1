"""The harness itself, without the hub: a tiny station page on a local HTTP server (a live
EventSource stream and a fetch, under a strict CSP), the shop-floor Wi-Fi dropping and coming
back, and axe-core failing a bad page and passing a good one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.browser import conftest as harness
from tests.browser.conftest import axe_check, screenshot

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
).expect

STATION = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Station 1</title>
<script src="/station.js" defer></script></head>
<body><main><h1>Station 1</h1><p>Hub: <span id="link">connecting</span></p></main></body></html>
"""
STATION_JS = b"""
window.ticks = 0; window.opens = 0; window.errors = 0;
const link = document.getElementById('link');
const stream = new EventSource('/events');
stream.onopen = () => { opens++; link.textContent = 'live'; };
stream.onmessage = () => { ticks++; };
stream.onerror = () => { errors++; link.textContent = 'reconnecting'; };
window.ping = async () => {
  try { return (await fetch('/ping')).status; } catch (error) { return String(error); }
};
"""
BAD = """<!doctype html><html><body>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw="><button></button></body></html>"""
GOOD = """<!doctype html><html lang="en"><head><title>Good</title></head><body><main>
<h1>Good</h1><img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" alt="Machine M1">
<button>Start order</button></main></body></html>"""


class Station(BaseHTTPRequestHandler):
    """The page, its script, ``/ping`` and ``/events`` (a tick each 50 ms, for 60 s at most)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                self.wfile.write(b"retry: 200\n\n")
                for tick in range(1200):
                    self.wfile.write(f"data: {tick}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the browser went away (or the Wi-Fi did)
            self.close_connection = True
            return
        routes = {
            "/": (STATION, "text/html; charset=utf-8"),
            "/station.js": (STATION_JS, "text/javascript"),
            "/ping": (b'{"ok": true}', "application/json"),
        }
        if self.path not in routes:
            self.send_error(404)
            return
        body, content_type = routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # As strict as the hub's pages may be: no inline script (axe must still run).
        self.send_header("Content-Security-Policy", "default-src 'self'")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def station() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Station)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_offline_or_routed_fails_new_requests_but_not_an_open_stream(page, context, station):
    """What Chromium does with Playwright's two switches, to 127.0.0.1: either fails a new
    fetch, neither cuts the EventSource already open (hence ``WifiLink``)."""
    page.goto(station)
    expect(page.locator("#link")).to_have_text("live")
    assert page.evaluate("ping()") == 200

    context.set_offline(True)
    assert page.evaluate("navigator.onLine") is False
    assert page.evaluate("ping()") == "TypeError: Failed to fetch"
    ticks = page.evaluate("ticks")
    page.wait_for_function("n => ticks >= n", arg=ticks + 3)  # still streaming
    context.set_offline(False)

    context.route("**/ping", lambda route: route.abort("internetdisconnected"))
    assert page.evaluate("ping()") == "TypeError: Failed to fetch"
    assert page.evaluate("navigator.onLine") is True  # routing says nothing to the page
    ticks = page.evaluate("ticks")
    page.wait_for_function("n => ticks >= n", arg=ticks + 3)
    context.unroute("**/ping")

    assert page.evaluate("ping()") == 200
    assert page.evaluate("[opens, errors]") == [1, 0]


@pytest.mark.parametrize("offline", [True, False], ids=["wifi-gone", "uplink-gone"])
def test_the_wifi_dropping_cuts_the_stream_and_fetches_until_it_is_back(
    page, wifi, station, offline
):
    link = wifi(station)
    page.goto(link.url)
    expect(page.locator("#link")).to_have_text("live")

    link.drop(offline=offline)
    expect(page.locator("#link")).to_have_text("reconnecting")
    assert page.evaluate("navigator.onLine") is not offline
    assert page.evaluate("ping()") == "TypeError: Failed to fetch"
    ticks = page.evaluate("ticks")
    page.wait_for_timeout(300)  # six ticks' time: none arrives, the stream is really cut
    assert page.evaluate("ticks") == ticks

    link.restore()
    expect(page.locator("#link")).to_have_text("live")  # EventSource reconnects by itself
    page.wait_for_function("n => ticks > n", arg=ticks)
    assert page.evaluate("ping()") == 200
    assert page.evaluate("opens") >= 2


def test_axe_fails_a_bad_page_and_passes_a_good_one(page, station):
    page.set_content(BAD)
    found = axe_check(page)
    rules = [line.split(" ")[0] for line in found]
    assert rules == ["button-name", "document-title", "html-has-lang", "image-alt"], found
    assert found[3].startswith("image-alt (critical): Images must have alternative text — img")

    page.set_content(GOOD)
    assert axe_check(page) == []

    page.goto(station)  # served with a strict CSP: axe is injected all the same
    expect(page.locator("#link")).to_have_text("live")
    assert axe_check(page) == []
    assert axe_check(page, impacts=("moderate", "minor", "serious", "critical")) == []


def test_screenshots_only_when_asked(page, station, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(harness, "REPO", tmp_path)
    page.goto(station)
    monkeypatch.delenv("MES_HUB_SCREENSHOTS", raising=False)
    assert screenshot(page, "station") is None
    assert not (tmp_path / "docs").exists()

    monkeypatch.setenv("MES_HUB_SCREENSHOTS", "1")
    path = screenshot(page, "station")
    assert path == tmp_path / "docs" / "img" / "station.png"
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 800)  # the tablet's viewport
    with pytest.raises(ValueError):
        screenshot(page, "../escape")
