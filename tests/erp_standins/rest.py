"""A generic REST ERP: serves production orders with modification stamps and takes production
confirmations the way an API with idempotency keys does.

- ``GET /api/v1/production-orders`` — ``{"data": [...], "count": n}`` (or a bare list),
  ``?modified_since=<RFC 3339>`` (inclusive) or ``?after_id=<n>``;
- ``POST /api/v1/confirmations`` — needs ``Idempotency-Key``; a repeated key is answered
  ``409 Conflict`` naming the key (and echoing it in the ``Idempotency-Key`` header), nothing
  stored twice; every attempt is counted per key, and the ``Mes-Hub-Checkpoint`` header of
  what is taken kept.

Auth: ``Authorization: Bearer <token>`` or basic (user + password). On demand (``app.state``):
``down`` → 503 with ``Retry-After``, ``error`` → 500, ``slow`` → sleeps that many seconds first,
``reject_login`` → 401 whatever the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections import Counter
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

ORDERS_PATH = "/api/v1/production-orders"
CONFIRM_PATH = "/api/v1/confirmations"
CONFIRMATION_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "order_id": (str,),
    "sequence": (int,),
    "machine_id": (str, type(None)),
    "operation": (str, type(None)),
    "yield_quantity": (int,),
    "scrap_quantity": (int,),
    "start": (str, type(None)),
    "end": (str, type(None)),
    "final": (bool,),
    "correction_of": (int, type(None)),
    "posted_at": (str,),
    "yield_total": (int, type(None)),
    "scrap_total": (int, type(None)),
    "checkpoint": (str, type(None)),
}


def rest_erp(
    *,
    token: str = "rest-token-0123456789",
    user: str | None = None,
    password: str | None = None,
    wrap: str | None = "data",
) -> FastAPI:
    """The stand-in. With ``user`` and ``password`` it takes basic auth, else the bearer
    ``token``. ``wrap``: the key of the orders list in the answer (None: a bare list)."""
    app = FastAPI()
    state = app.state
    state.orders = []  # the records served, as the ERP keeps them
    state.order_queries = []  # the query of every orders GET
    state.known_orders = None  # a set: confirmations for other orders are refused (400)
    state.confirmations = {}  # Idempotency-Key -> the body first taken
    state.attempts = Counter()  # Idempotency-Key -> every POST that carried it
    state.checkpoint_headers = {}  # Idempotency-Key -> its first POST's Mes-Hub-Checkpoint
    state.authorizations = []  # the Authorization header of every request
    state.down = False
    state.error = False
    state.slow = 0.0
    state.reject_login = False

    async def trouble(request: Request) -> Response | None:
        state.authorizations.append(request.headers.get("authorization"))
        if state.slow:
            await asyncio.sleep(state.slow)
        if state.down:
            return JSONResponse(
                {"error": "maintenance"}, status_code=503, headers={"Retry-After": "120"}
            )
        if state.reject_login or not _authorized(request, token, user, password):
            return JSONResponse(
                {"error": "invalid credentials"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer" if user is None else "Basic"},
            )
        if state.error:
            return JSONResponse({"error": "internal error"}, status_code=500)
        return None

    @app.get(ORDERS_PATH)
    async def orders(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        query = dict(request.query_params)
        state.order_queries.append(query)
        records: list[dict[str, Any]] = list(state.orders)
        if "modified_since" in query:
            since = datetime.fromisoformat(query["modified_since"])
            records = [r for r in records if datetime.fromisoformat(r["modified"]) >= since]
        if "after_id" in query:
            after = int(query["after_id"])
            records = [r for r in records if int(r["id"]) > after]
        if wrap is None:
            return JSONResponse(records)
        return JSONResponse({wrap: records, "count": len(records)})

    @app.post(CONFIRM_PATH)
    async def confirm(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "Idempotency-Key header required"}, status_code=400)
        state.attempts[key] += 1
        if key in state.confirmations:
            return JSONResponse(
                {"error": "duplicate request", "idempotency_key": key},
                status_code=409,
                headers={"Idempotency-Key": key},
            )
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        problem = _problem(body)
        known = state.known_orders
        if problem is None and known is not None and body["order_id"] not in known:
            problem = f"order {body['order_id']} does not exist"
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=400)
        state.confirmations[key] = body
        state.checkpoint_headers[key] = request.headers.get("mes-hub-checkpoint")
        number = len(state.confirmations)
        return JSONResponse({"id": number, "status": "accepted"}, status_code=201)

    return app


def _authorized(request: Request, token: str, user: str | None, password: str | None) -> bool:
    given = request.headers.get("authorization", "")
    if user is None:
        return secrets.compare_digest(given.encode(), f"Bearer {token}".encode())
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return secrets.compare_digest(given.encode(), f"Basic {pair}".encode())


def _problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    unknown = sorted(set(body) - set(CONFIRMATION_FIELDS))
    if unknown:
        return f"unknown field {unknown[0]}"
    for name, types in CONFIRMATION_FIELDS.items():
        if name not in body:
            return f"field {name} is required"
        value = body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"field {name} has the wrong type"
    if body["yield_quantity"] < 0 or body["scrap_quantity"] < 0:
        return "quantities must not be negative"
    return None


def order_record(
    number: int,
    modified: str,
    *,
    order_id: str | None = None,
    quantity: Any = 100,
    status: str = "released",
    due: str = "2026-03-10T14:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    """One record as the stand-in serves it (an ERP's own field names, nested)."""
    record: dict[str, Any] = {
        "id": number,
        "number": order_id or f"WO-{number}",
        "product": {"code": f"P-{number}", "name": "Bracket"},
        "qty": quantity,
        "due_at": due,
        "customer": {"name": "ACME"},
        "state": status,
        "modified": modified,
    }
    record.update(extra)
    return record


# The [erp.mapping] that reads ``order_record``'s shape.
ORDER_MAPPING = {
    "order_id": "number",
    "part_number": "product.code",
    "quantity": "qty",
    "due": "due_at",
    "customer": "customer.name",
    "machine_id": "",
    "ideal_cycle_time_s": "cycle_s",
    "status": "state",
    "modified": "modified",
    "cancelled_when": ["cancelled"],
    "released_when": ["released"],
}
