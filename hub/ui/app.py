"""The floor's screens in the hub's FastAPI app: their static files, sign-in, live stream and
pages (``hub.ui``), each answer under ``/ui`` with headers that keep other sites out."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.ui import access, board, live, oee_pages, orders_page, station

STATIC = "/ui/static"
# The pages run our own script only (no inline script, nothing from elsewhere), talk to this
# hub only, and are framed by nobody (a tablet's taps cannot be clickjacked). Inline style
# attributes are allowed: the SVG charts and bars are sized with them.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
    "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    # A one-time sign-in link's token is in its URL: never sent on to another site.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def install_ui(app: FastAPI) -> None:
    access.install_access(app)
    app.mount(STATIC, StaticFiles(directory=str(files("hub.ui") / "static")), name="ui-static")
    for module in (access, live, board, station, oee_pages, orders_page):
        app.include_router(module.router)

    app.add_middleware(_Guarded)


class _Guarded:
    """Adds ``SECURITY_HEADERS`` to every answer under ``/ui`` (a plain ASGI middleware: the
    API's answers pass untouched, and the live stream is not buffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/ui" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers.append(name, value)
                if not path.startswith(STATIC) and "cache-control" not in headers:
                    headers.append("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, guarded)
