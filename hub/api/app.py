"""The FastAPI application: routes under /api/v1, problem+json errors, keys and roles.

Open without a key: ``/healthz``, the OpenAPI document (``/openapi.json``) and its pages,
``/docs`` (Swagger UI) and ``/redoc``. The pages load their scripts and styles from the hub
itself (``/docs/static``, the files of the ``fastapi-offline`` package), never from the
internet: a plant network often has none."""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from hub.api.deps import ApiContext
from hub.api.problems import install_problem_handlers, problem_response, problems
from hub.api.routes import (
    audit,
    audit_proofs,
    erp,
    events,
    health,
    machines,
    oee,
    orders,
    partners,
    webhooks,
)
from hub.store import StoreUnavailable
from hub.ui.app import install_ui

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs/static"
# Swagger UI, ReDoc and a favicon, shipped by the fastapi-offline package.
_ASSETS_DIR = files("fastapi_offline") / "static"


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="mes-hub",
        version="1",
        description="Event-sourced IT-OT integration hub. Authenticate with "
        "`Authorization: Bearer <key>`; errors are RFC 9457 problem+json.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    install_problem_handlers(app)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    _document(app)
    app.include_router(health.router)
    # Every route under /api/v1 wants a key with an admitted role, and checks its parameters.
    every = (401, 403, 422)
    app.include_router(events.router, prefix="/api/v1", responses=problems(*every))
    app.include_router(health.me_router, prefix="/api/v1", responses=problems(*every))
    # The reads run in a bounded pool: when it is full they are refused for a while (429), and
    # when a worker of it dies the read is too (503); both say when to ask again (Retry-After).
    reads = problems(*every, 429, 503, retry_after=(429, 503))
    for module in (machines, orders):
        app.include_router(module.router, prefix="/api/v1", responses=reads)
    # (The ERP routes that read through the pool say so themselves.)
    app.include_router(erp.router, prefix="/api/v1", responses=problems(*every))
    # Partners and their webhook endpoints: a hub that keeps no views sends none (503).
    for module in (partners, webhooks):
        app.include_router(module.router, prefix="/api/v1", responses=problems(*every, 400, 503))
    # Both OEE routes name a machine, which may be unknown (404).
    app.include_router(oee.router, prefix="/api/v1", responses=reads | problems(404))
    # The auditors' log, states as of a moment and OEE as reported against as known now: a
    # known_at beyond what is stored is refused (422); a machine or order unknown (404).
    for router in (audit.router, audit.diff_router):
        app.include_router(router, prefix="/api/v1", responses=reads | problems(404))
    # Checkpoints and proofs (a proof that no longer checks: 409).
    app.include_router(audit_proofs.router, prefix="/api/v1", responses=reads | problems(404, 409))
    _serve_docs(app)
    if context.sessions is not None:
        install_ui(app)  # the floor's screens under /ui (hub.ui)
    return app


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    # The store's PostgreSQL does not answer (a read, or the checks of POST /events): the
    # operator finds where and why in the log, the client when to ask again.
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 503, "the store does not answer; ask again shortly", headers={"Retry-After": "5"}
    )


def _document(app: FastAPI) -> None:
    """The OpenAPI document gets the schemas that POST /events names in its request body (the
    route reads the body itself, so FastAPI does not know them)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, described in events.openapi_schemas().items():
                if known.setdefault(name, described) != described:
                    raise RuntimeError(f"two different OpenAPI schemas are named {name!r}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _serve_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with their assets served by the hub. They need no key: the
    OpenAPI document tells the API's shape, no data and no secret, and a newcomer reads it
    before having a key (Swagger UI asks for one, under Authorize, to try a route)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(_ASSETS_DIR)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            # Swagger UI would otherwise send the document's URL to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
