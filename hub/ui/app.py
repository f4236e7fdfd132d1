"""The floor's screens in the hub's FastAPI app: their static files, sign-in, live stream and
pages (``hub.ui``)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from hub.ui import access, board, live, oee_pages, orders_page, station

STATIC = "/ui/static"


def install_ui(app: FastAPI) -> None:
    access.install_access(app)
    app.mount(STATIC, StaticFiles(directory=str(files("hub.ui") / "static")), name="ui-static")
    for module in (access, live, board, station, oee_pages, orders_page):
        app.include_router(module.router)
