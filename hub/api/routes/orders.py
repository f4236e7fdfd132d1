from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from hub.api.deps import ApiContext, Context, Reader
from hub.api.problems import Problem
from hub.domain import Order, machine_aggregate_id
from projections.calendar import Interval
from projections.forecast import Forecast, forecast
from projections.history import MachineFacts
from projections.progress import OrderProgress, Run, order_progress
from projections.report import facts_window

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
        )


def _facts_of_runs(
    context: ApiContext, order_id: str, runs: list[Run], now: datetime
) -> dict[str, MachineFacts]:
    """What each machine the order ran on did during its runs, with the parts and scrap it
    counted for the order (whenever they were reported)."""
    counted = context.facts.order_counts(order_id)
    facts: dict[str, MachineFacts] = {}
    for machine_id in sorted({run.machine_id for run in runs}):
        spans = [run for run in runs if run.machine_id == machine_id]
        start = min(run.start for run in spans)
        end = max(now if run.end is None else run.end for run in spans)
        if end <= start:
            continue
        machine = machine_aggregate_id(context.site, machine_id)
        window = context.facts.window(machine, facts_window(Interval(start, end), context.plant))
        counts = counted.get(machine.hex, MachineFacts())
        window.parts, window.scrap = counts.parts, counts.scrap
        facts[machine_id] = window
    return facts


def _views(context: ApiContext, orders: list[Order]) -> list[OrderView]:
    """Each order with its progress and delivery forecast."""
    views = []
    now = datetime.now(UTC)
    for order in orders:
        runs = [Run(r.machine_id, r.start, r.end) for r in map(OrderRun.model_validate, order.runs)]
        progress = order_progress(
            order.order_id,
            order.quantity,
            order.ideal_cycle_time_s,
            runs,
            _facts_of_runs(context, order.order_id, runs, now),
            context.plant,
            now,
        )
        expected = (
            forecast(
                context.plant.calendar(),
                now,
                order.due,
                progress.remaining,
                progress.busy_time_s,
                progress.good,
                order.ideal_cycle_time_s,
            )
            if order.status not in ("cancelled",)
            else Forecast(None, None, None, "none")
        )
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
