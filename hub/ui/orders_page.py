"""Orders (``GET /ui/orders?status=&customer=&machine=``): each order's progress (good of the
quantity ordered), its ETA and delivery status (late, at risk, on track, done), late and at
risk first.

The orders are the API's answer to ``GET /api/v1/orders`` (``read_orders``, in its read pool),
linked from the page; ``partial=1`` answers the table only, which ``static/oee.js`` fetches
again when the live stream says a machine the orders ran on changed (and once a minute, for
what the ERP changes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, cast, get_args
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from hub.api.deps import Context
from hub.api.routes.orders import MAX_PAGE, Status, read_orders
from hub.ui import charts
from hub.ui.access import ScreenUser, render
from hub.ui.oee_pages import Clock

router = APIRouter(prefix="/ui", include_in_schema=False)

STATUSES: tuple[str, ...] = get_args(Status)
# Late first, then at risk; orders without a forecast before those done.
DELIVERY_RANK = {"late": 0, "at_risk": 1, "on_track": 2, None: 3, "done": 4}
DELIVERY_WORDS = {
    "late": "Late",
    "at_risk": "At risk",
    "on_track": "On track",
    "done": "Done",
    None: "No forecast",
}
_LAST = datetime.max.replace(tzinfo=UTC)


def delivery_first(order: dict[str, Any]) -> tuple[int, datetime, str]:
    """Late, then at risk, then on track, then done; by due date within each (none last)."""
    status = order["forecast"]["status"]
    due = datetime.fromisoformat(order["due"]) if order["due"] else _LAST
    return (DELIVERY_RANK.get(status, 3), due, str(order["order_id"]))


def machines_of(orders: list[dict[str, Any]]) -> list[str]:
    """The machines the orders name, run or ran on (the page's live stream follows them)."""
    found: set[str] = set()
    for order in orders:
        if order.get("machine_id"):
            found.add(order["machine_id"])
        found.update(order.get("running_on") or [])
        found.update(run["machine_id"] for run in order.get("runs") or [])
        found.update(order["progress"].get("machines") or [])
    return sorted(found)


def api_orders_url(status: str | None, customer: str | None, machine: str | None) -> str:
    query = {"status": status, "customer": customer, "machine": machine, "limit": str(MAX_PAGE)}
    return "/api/v1/orders?" + urlencode({k: v for k, v in query.items() if v}, safe=":")


@router.get("/orders")
async def orders_page(
    request: Request,
    context: Context,
    caller: ScreenUser,
    status: Annotated[str | None, Query(max_length=16)] = None,
    customer: Annotated[str | None, Query(max_length=256)] = None,
    machine: Annotated[str | None, Query(max_length=128)] = None,
    partial: bool = False,
) -> Response:
    status = status or None
    customer = (customer or "").strip() or None
    machine = (machine or "").strip() or None
    error = None
    if status is not None and status not in STATUSES:
        error = f"status must be one of: {', '.join(STATUSES)}"
        status = None
    if any("\x00" in (v or "") for v in (customer, machine)):
        error, customer, machine = "no text may hold a NUL character", None, None
    listed, more = await context.reads.run(
        request, read_orders, context.site, context.plant, cast(Status | None, status),
        customer, machine, None, MAX_PAGE,
    )  # fmt: skip
    orders = sorted(json.loads(listed), key=delivery_first)
    values = {
        "orders": orders,
        "more": more is not None,
        "status": status,
        "customer": customer,
        "machine": machine,
        "statuses": STATUSES,
        "error": error,
        "api": api_orders_url(status, customer, machine),
        "live_machines": " ".join(machines_of(orders)),
        "words": DELIVERY_WORDS,
        "clock": Clock(ZoneInfo(context.plant.time_zone)),
        "zone": context.plant.time_zone,
        "percent": charts.percent,
        "grouped": charts.grouped,
        "now": datetime.now(UTC),
        "limit": MAX_PAGE,
    }
    name = "orders_table.html" if partial else "orders.html"
    answer = render(request, name, caller, status_code=422 if error else 200, **values)
    answer.headers["Cache-Control"] = "no-store"
    return answer
