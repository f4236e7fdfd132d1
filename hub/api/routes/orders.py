from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, TypeAdapter

from contracts import DeliveryStatus
from hub.api.deps import Plant, Reader, Reads, Site
from hub.api.problems import Problem, problems
from hub.api.reads import JsonAnswer, ReadSources
from hub.domain import Order
from projections.processes.forecast_watch import progress_and_forecast
from projections.rules.forecast import Forecast
from projections.rules.plant import PlantConfig
from projections.rules.progress import OrderProgress
from projections.views.facts_view import FactsReader

router = APIRouter(prefix="/orders", tags=["orders"])

Status = Literal["unreleased", "released", "running", "ended", "cancelled"]
MAX_PAGE = 1000
# No text holds NUL (contracts refuse it in events; PostgreSQL cannot compare with it).
NO_NUL = r"^[^\x00]*$"


class OrderRun(BaseModel):
    machine_id: str
    start: datetime
    end: datetime | None


class PublishedForecast(BaseModel):
    """The last delivery forecast change the hub announced for the order (the data of its
    ``mes.hub.delivery_forecast.changed.v1`` event, without the order id)."""

    status: DeliveryStatus | None
    eta: datetime | None
    due: datetime | None
    remaining: int | None
    effective_cycle_time_s: float | None
    basis: Literal["observed", "ideal", "none"]
    previous_status: DeliveryStatus | None = None
    previous_eta: datetime | None = None


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
    published_forecast: PublishedForecast | None
    published_forecast_changes: int

    @classmethod
    def of(cls, order: Order, progress: OrderProgress, forecast: Forecast) -> OrderView:
        published = order.delivery_forecast
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
            published_forecast=PublishedForecast.model_validate(published) if published else None,
            published_forecast_changes=order.delivery_forecast_changes,
        )


def _views(facts: FactsReader, plant: PlantConfig, orders: list[Order]) -> list[OrderView]:
    """Each order with its progress and delivery forecast."""
    now = datetime.now(UTC)
    views = []
    for order in orders:
        progress, expected = progress_and_forecast(order, facts, plant, now)
        views.append(OrderView.of(order, progress, expected))
    return views


_ORDERS = TypeAdapter(list[OrderView])


def read_orders(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    status: Status | None,
    customer: str | None,
    machine: str | None,
    after: str | None,
    limit: int,
) -> tuple[bytes, str | None]:
    """A page of orders as the answer's JSON (in the read pool), and the order id the next page
    starts after, if there is one."""
    # One more than asked, to know whether there is a next page.
    listed = sources.orders.page(
        site, status=status, customer=customer, machine=machine, after=after, limit=limit + 1
    )
    more = listed[limit - 1][0] if len(listed) > limit else None
    found = (sources.store.load(aggregate_id) for _, aggregate_id in listed[:limit])
    views = _views(sources.facts, plant, [o for o in found if isinstance(o, Order)])
    return _ORDERS.dump_json(views), more


def read_order(sources: ReadSources, site: str, plant: PlantConfig, order_id: str) -> bytes:
    """One order as the answer's JSON, or nothing for an order never heard of."""
    order = sources.store.order(site, order_id)
    if order is None:
        return b""
    return _views(sources.facts, plant, [order])[0].model_dump_json().encode()


@router.get(
    "",
    summary="Orders with their progress, a page at a time, filtered by status, customer or machine",
    description="Orders by order id, at most `limit` (default 100, at most 1000) a page. When "
    'there are more, the `Link` header gives the next page (`rel="next"`): the same query with '
    "`after` set to the last order id of this one. The filters are those of the order list "
    "view, which follows the store within moments; each order is shown as the store has it.",
    responses={
        200: {
            "headers": {
                "Link": {
                    "description": 'The next page, `<url>; rel="next"`, when there is one',
                    "schema": {"type": "string"},
                }
            }
        }
    },
    response_model=list[OrderView],
)
async def list_orders(
    request: Request,
    reads: Reads,
    plant: Plant,
    site: Site,
    _: Reader,
    status: Status | None = None,
    customer: Annotated[str | None, Query(pattern=NO_NUL, description="the ERP's customer")] = None,
    machine: Annotated[
        str | None,
        Query(pattern=NO_NUL, description="the machine the ERP named, or one the order ran on"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="orders per page")] = 100,
    after: Annotated[
        str | None,
        Query(pattern=NO_NUL, description="the cursor: list the orders after this order id"),
    ] = None,
) -> Response:
    listed, more = await reads.run(
        request, read_orders, site, plant, status, customer, machine, after, limit
    )
    answer = JsonAnswer(listed)
    if more is not None:
        following = request.url.include_query_params(after=more)
        answer.headers["Link"] = f'<{following}>; rel="next"'
    return answer


@router.get(
    "/{order_id}",
    summary="One order: what the ERP released and what the floor made",
    responses=problems(404),
    response_model=OrderView,
)
async def get_order(
    request: Request, order_id: str, reads: Reads, plant: Plant, site: Site, _: Reader
) -> Response:
    answer = await reads.run(request, read_order, site, plant, order_id)
    if not answer:
        raise Problem(404, f"no order {order_id!r} at site {site!r}")
    return JsonAnswer(answer)
