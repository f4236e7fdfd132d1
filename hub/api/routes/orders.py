from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from hub.api.deps import Context, Reader
from hub.api.problems import Problem
from hub.domain import Order

router = APIRouter(prefix="/orders", tags=["orders"])


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

    @classmethod
    def of(cls, order: Order) -> OrderView:
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
        )


@router.get("/{order_id}", summary="What the order aggregate knows of one order")
async def get_order(order_id: str, context: Context, _: Reader) -> OrderView:
    order = await asyncio.to_thread(context.store.order, context.site, order_id)
    if order is None:
        raise Problem(404, f"no order {order_id!r} at site {context.site!r}")
    return OrderView.of(order)
