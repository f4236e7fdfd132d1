from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from hub.api.deps import ApiContext, Context, Reader
from hub.api.problems import Problem
from hub.domain import Order
from projections.processes.forecast_watch import progress_and_forecast
from projections.rules.forecast import Forecast
from projections.rules.progress import OrderProgress

router = APIRouter(prefix="/orders", tags=["orders"])

Status = Literal["unreleased", "released", "running", "ended", "cancelled"]


class OrderRun(BaseModel):
    machine_id: str
    start: datetime
    end: datetime | None


class OrderView(BaseModel):
    site: str
    order_id: str
    status: str
    part_number: str | None
    quantity: int | None
    due: datetime | None
    customer: str | None
    machine_id: str | None
    ideal_cycle_time_s: float | None
    released_at: datetime | None
    cancelled_reason: str | None
    running_on: list[str]
    runs: list[OrderRun]
    changes: int
    version: int
    progress: OrderProgress
    forecast: Forecast
    published_forecast: dict[str, Any] | None  # the last forecast change the hub announced
    published_forecast_changes: int

    @classmethod
    def of(cls, order: Order, progress: OrderProgress, forecast: Forecast) -> OrderView:
        return cls(
            site=order.site,
            order_id=order.order_id,
            status=order.status,
            part_number=order.part_number,
            quantity=order.quantity,
            due=order.due,
            customer=order.customer,
            machine_id=order.machine_id,
            ideal_cycle_time_s=order.ideal_cycle_time_s,
            released_at=order.released_at,
            cancelled_reason=order.cancelled_reason,
            running_on=list(order.running_on),
            runs=[OrderRun.model_validate(r) for r in order.runs],
            changes=order.changes,
            version=order.version,
            progress=progress,
            forecast=forecast,
            published_forecast=order.delivery_forecast,
            published_forecast_changes=order.delivery_forecast_changes,
        )


def _views(context: ApiContext, orders: list[Order]) -> list[OrderView]:
    """Each order with its progress and delivery forecast."""
    now = datetime.now(UTC)
    views = []
    for order in orders:
        progress, expected = progress_and_forecast(order, context.facts, context.plant, now)
        views.append(OrderView.of(order, progress, expected))
    return views


@router.get("", summary="Orders with their progress, filtered by status, customer or machine")
async def list_orders(
    context: Context,
    _: Reader,
    status: Status | None = None,
    customer: str | None = None,
    machine: str | None = None,
) -> list[OrderView]:
    def build() -> list[OrderView]:
        orders = [
            o
            for o in context.store.orders(context.site)
            if (status is None or o.status == status)
            and (customer is None or o.customer == customer)
            and (
                machine is None
                or machine == o.machine_id
                or any(r["machine_id"] == machine for r in o.runs)
            )
        ]
        return _views(context, orders)

    return await asyncio.to_thread(build)


@router.get("/{order_id}", summary="One order: what the ERP released and what the floor made")
async def get_order(order_id: str, context: Context, _: Reader) -> OrderView:
    order = await asyncio.to_thread(context.store.order, context.site, order_id)
    if order is None:
        raise Problem(404, f"no order {order_id!r} at site {context.site!r}")
    return (await asyncio.to_thread(_views, context, [order]))[0]
