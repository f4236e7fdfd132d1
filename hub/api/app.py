"""The FastAPI application: routes under /api/v1, problem+json errors, keys and roles."""

from __future__ import annotations

from fastapi import FastAPI

from hub.api.deps import ApiContext
from hub.api.problems import install_problem_handlers, problems
from hub.api.routes import events, health, machines, oee, orders


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="mes-hub",
        version="1",
        description="Event-sourced IT-OT integration hub. Authenticate with "
        "`Authorization: Bearer <key>`; errors are RFC 9457 problem+json.",
    )
    app.state.context = context
    install_problem_handlers(app)
    app.include_router(health.router)
    # Every route under /api/v1 wants a key with an admitted role, and checks its parameters.
    for module in (machines, orders, events, oee):
        app.include_router(module.router, prefix="/api/v1", responses=problems(401, 403, 422))
    return app
