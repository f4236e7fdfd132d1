"""The browser harness: Debian's headless Chromium driven by Playwright's sync API, a tablet-sized
page per test, axe-core's accessibility check, a cuttable shop-floor Wi-Fi and screenshots.

Fixtures: ``browser`` (launched once for this package), ``context`` and ``page`` (new for each
test, a 10-inch tablet in landscape), ``wifi`` (a factory of ``WifiLink``). Helpers, imported
from here: ``axe_check(page)``, ``screenshot(page, name)``, ``TABLET``, ``WifiLink``.

Why the sync API, and why the browser lives only as long as this package: between two sync calls
Playwright leaves its own event loop marked as running in the main thread, so any async test
(pytest-asyncio) run while it is alive fails ("Cannot run the event loop while another loop is
running"). So the tests here are plain functions (an async one is refused at collection), and
the browser is closed before pytest moves on to the other packages. A hub under test runs in a
thread of its own with its own loop.

No browser is ever downloaded: ``MES_HUB_CHROMIUM``, else Debian's ``chromium`` (``make test``
installs it as root with apt-get). Without one, or without Playwright, the tests skip naming why;
``MES_HUB_BROWSER_REQUIRED=1`` makes that a failure instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import selectors
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# A 10-inch tablet held landscape (1280x800 CSS pixels), touch, English; every context gets it.
TABLET: dict[str, Any] = {
    "viewport": {"width": 1280, "height": 800},
    "device_scale_factor": 1,
    "has_touch": True,
    "locale": "en-US",
}
# Root in a container has no usable sandbox. (Playwright passes --no-sandbox by default too, and
# --headless, --disable-dev-shm-usage, --disable-extensions...: nothing else is needed.)
LAUNCH_ARGS = ["--no-sandbox"]
# Each Playwright wait and expect(): a page not there in 30 s is broken. (Usually it takes well
# under a second, but on a 2-CPU CI machine busy with other runs the hub's views, in a process of
# their own, and Chromium's wait their turn: seconds each. An EventSource whose stream broke
# comes back in 0.1-0.3 s here, but about 1 time in 10 only after ~3 s.)
TIMEOUT_MS = 30_000
SERIOUS = ("serious", "critical")

NOT_INSTALLED = "Debian's chromium is not installed (make test installs it as root with apt): "


def find_chromium() -> str | None:
    """``MES_HUB_CHROMIUM``, else ``/usr/bin/chromium``, else ``chromium`` on PATH. Debian's
    ``/usr/bin/chromium`` is a shell launcher that adds flags of its own (extensions, GPU) from
    /etc/chromium.d: the binary it runs, /usr/lib/chromium/chromium, is taken instead."""
    configured = os.environ.get("MES_HUB_CHROMIUM")
    if configured:
        return configured
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            real = Path(candidate).resolve().parent.parent / "lib" / "chromium" / "chromium"
            return str(real) if os.access(real, os.X_OK) else candidate
    return None


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("MES_HUB_BROWSER_REQUIRED") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse async tests here: they cannot run while the sync browser is open (see above)."""
    async_here = [
        item.nodeid
        for item in items
        if isinstance(item, pytest.Function)
        and HERE in Path(str(item.path)).resolve().parents
        and inspect.iscoroutinefunction(item.obj)
    ]
    if async_here:
        raise pytest.UsageError(
            "tests/browser uses Playwright's sync API: write these as plain (sync) tests, with "
            "the hub in a thread of its own: " + ", ".join(async_here)
        )


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Headless Chromium, launched once for the tests of this package."""
    try:
        from playwright.sync_api import Error, expect, sync_playwright
    except ImportError as exc:
        _unavailable(f"Playwright is not installed (pip install -e '.[dev]'): {exc}")
    executable = find_chromium()
    if executable is None:
        _unavailable(NOT_INSTALLED + "no MES_HUB_CHROMIUM, /usr/bin/chromium or chromium on PATH")
    elif not os.access(executable, os.X_OK):
        _unavailable(NOT_INSTALLED + f"{executable} is not an executable file")
    expect.set_options(timeout=TIMEOUT_MS)  # (its own default is 5 s)
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=LAUNCH_ARGS, timeout=60_000
        )
    except Error as exc:
        playwright.stop()
        lines = str(exc).strip().splitlines()
        said = [line.strip(" -")[:200] for line in lines if "[err]" in line or "exitCode" in line]
        summary = " / ".join([lines[0], *dict.fromkeys(said)][:6])  # not the flags it echoes
        _unavailable(f"Debian's chromium at {executable} failed to launch: {summary}")
    try:
        yield launched
    finally:
        launched.close()
        playwright.stop()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (cookies, storage, offline state) for each test: the tablet."""
    fresh = browser.new_context(**TABLET)
    fresh.set_default_timeout(TIMEOUT_MS)
    try:
        yield fresh
    finally:
        fresh.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def axe_check(
    page: Page,
    *,
    impacts: tuple[str, ...] = SERIOUS,
    context: str | list[Any] | dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """axe-core's violations of the page as it is now, of the given impacts (serious and
    critical by default), one readable line each: ``rule (impact): help — node, node``.
    ``context``/``options``: axe.run's own (e.g. ``{"exclude": [["#chart"]]}``). An empty list
    is a pass: ``assert axe_check(page) == []`` shows them all when it fails."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, context=context, options=options or {"resultTypes": ["violations"]})
    found = []
    for violation in results.response["violations"]:
        if violation["impact"] not in impacts:
            continue
        nodes = ", ".join(" ".join(map(str, node["target"])) for node in violation["nodes"])
        found.append(f"{violation['id']} ({violation['impact']}): {violation['help']} — {nodes}")
    return found


def screenshot(page: Page, name: str, *, full_page: bool = False) -> Path | None:
    """``docs/img/<name>.png`` of the page, only with ``MES_HUB_SCREENSHOTS=1`` (refreshing the
    docs' pictures is a deliberate act: a test run never dirties the work tree)."""
    if os.environ.get("MES_HUB_SCREENSHOTS") != "1":
        return None
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"screenshot name {name!r}: lower-case letters, digits, '-' and '_'")
    path = REPO / "docs" / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, full_page=full_page, animations="disabled", caret="hide")
    return path


class WifiLink:
    """The shop-floor Wi-Fi between the tablet and a server: a TCP hop on 127.0.0.1 that a test
    can cut. Load the page from ``link.url``; ``drop()`` closes every open connection through it
    (an EventSource's stream too) and refuses new ones, and by default also puts the browser
    context offline (``navigator.onLine`` false, the ``offline`` event); ``restore()`` undoes
    both. Neither ``context.set_offline(True)`` nor ``context.route(...).abort()`` alone cuts a
    stream that is already open: they fail only new requests."""

    def __init__(self, upstream: str, context: BrowserContext | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream {upstream!r}: give http://host:port")
        self._upstream = (parts.hostname, parts.port)
        self._context = context
        self._down = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{parts.scheme}://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name="wifi-link", daemon=True)
        self._acceptor.start()

    @property
    def is_down(self) -> bool:
        return self._down

    def drop(self, *, offline: bool = True) -> None:
        """The Wi-Fi goes. ``offline=False``: the sockets die but the tablet still believes it
        is online (an access point whose uplink is gone)."""
        self._down = True
        if offline and self._context is not None:
            self._context.set_offline(True)
        self._cut()

    def restore(self) -> None:
        self._down = False
        if self._context is not None:
            self._context.set_offline(False)

    def close(self) -> None:
        self._down = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._cut()
        self._acceptor.join(timeout=5)

    def _cut(self) -> None:
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the pipe's thread sees it and closes

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        other = {client: server, server: client}
        with client, server, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(server, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        other[key.fileobj].sendall(data)  # type: ignore[index]
            except OSError:
                return
            finally:
                with self._lock:
                    self._open -= {client, server}


@pytest.fixture
def wifi(context: BrowserContext) -> Iterator[Callable[[str], WifiLink]]:
    """``wifi(server_url)``: a ``WifiLink`` to that server for this test's browser context."""
    links: list[WifiLink] = []

    def make(upstream: str) -> WifiLink:
        links.append(WifiLink(upstream, context))
        return links[-1]

    yield make
    for link in links:
        link.close()


# --- a real hub for the pages -------------------------------------------------------------------


class ServedHub:
    """A real hub (its NATS, store, ingest and views) and its API with the screens on
    127.0.0.1:<a free port>, in a thread with its own event loop (the browser's sync API keeps
    the main thread's). Touch the hub only through ``run(coroutine)``."""

    def __init__(self, settings: Any, plant: Any = None) -> None:
        self.settings, self.plant = settings, plant
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hub", daemon=True)
        self.thread.start()
        self.hub, self.api = self.run(self._start())
        self.url: str = self.api.url

    async def _start(self) -> tuple[Any, Any]:
        from hub.api.app import create_app
        from hub.bootstrap import api_context, build_hub
        from hub.server import ApiServer

        hub = await build_hub(self.settings, plant=self.plant)
        api = ApiServer(create_app(api_context(hub, self.plant)), "127.0.0.1", 0)
        api.start()
        return hub, api

    def run(self, coroutine: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def publish(self, *events: Any) -> None:
        """Publish ``events`` to NATS and wait until they are stored and the views have them."""
        from tests.conftest import eventually

        async def publish() -> None:
            before = self.hub.ingest_stats().applied
            await self.hub.publisher.publish_many(list(events))
            await eventually(lambda: self.hub.ingest_stats().applied >= before + len(events))
            await self.hub.wait_projected()

        self.run(publish())

    def link(self, role: str, to: str = "/ui/") -> str:
        """A one-time sign-in link of ``role`` (the demo's way in) that opens page ``to``."""
        from hub.api.deps import key_id
        from hub.nats_auth import signing_key
        from hub.ui.sessions import SESSIONS_FILE, Sessions
        from tests.conftest import api_key

        secret = signing_key(self.settings.data_dir)
        sessions = Sessions(self.settings.data_dir / SESSIONS_FILE, {})
        try:
            token = sessions.issue_link(key_id(api_key(role), secret), role)  # type: ignore[arg-type]
        finally:
            sessions.close()
        return f"{self.url}/ui/enter/{token}?next={to}"

    def close(self) -> None:
        async def stop() -> None:
            try:
                await self.api.stop()
            finally:
                await self.hub.close()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def serve_hub(settings: Any) -> Iterator[Callable[..., ServedHub]]:
    """``serve_hub(plant=None)``: a ``ServedHub`` on the test's settings (keys for every role:
    ``tests.conftest.api_key``), closed after the test. Ask for it before ``page`` so the
    browser goes first."""
    served: list[ServedHub] = []

    def start(plant: Any = None) -> ServedHub:
        served.append(ServedHub(settings, plant))
        return served[-1]

    yield start
    for each in served:
        each.close()


def sign_in(page: Page, served: ServedHub, role: str, to: str = "/ui/") -> None:
    """Open ``to`` in ``page``, signed in as ``role`` through a one-time link."""
    answer = page.goto(served.link(role, to))
    assert answer is not None and answer.ok, answer and answer.status
    with page.expect_navigation():
        page.click("#enter")  # the link's page asks first (a mail scanner must not use it up)
