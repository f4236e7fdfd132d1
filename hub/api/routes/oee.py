"""Machine timelines and ISO 22400 OEE over the window asked, from the OEE entry point
(``hub.reports``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime, BaseModel, Field

from hub.api.deps import Facts, Orders, Plant, Reader, Site, Store
from hub.api.problems import Problem
from hub.reports import Reports, UnknownMachine
from projections.rules.calendar import Interval
from projections.rules.report import Bucket, GroupBy
from projections.rules.timeline import TimelineInterval

T = TypeVar("T")
router = APIRouter(tags=["oee"])
MAX_WINDOW = timedelta(days=400)

From = Annotated[AwareDatetime, Query(alias="from", description="RFC 3339 with offset")]
To = Annotated[AwareDatetime, Query(alias="to", description="RFC 3339 with offset")]


# The contract's field names for the window are "from" and "to" (``start`` and ``end`` in
# Python); they come last in the answer, as they always have.
WindowStart = Annotated[datetime, Field(serialization_alias="from")]
WindowEnd = Annotated[datetime, Field(serialization_alias="to")]


class TimelineView(BaseModel):
    machine: str
    intervals: list[TimelineInterval]
    start: WindowStart
    end: WindowEnd


class OeeBucket(BaseModel):
    start: datetime
    end: datetime
    label: str | None
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None
    planned_busy_time_s: float
    actual_production_time_s: float
    ideal_time_s: float
    produced: int
    good: int
    bad: int
    scrapped: int
    parts_without_ideal_time: int
    implausible_readings: int
    stops_with_unknown_reason: int
    downtime_s_by_reason: dict[str, float]
    planned_stop_s_by_reason: dict[str, float]
    provisional: bool

    @classmethod
    def of(cls, bucket: Bucket) -> OeeBucket:
        f = bucket.figures
        return cls(
            start=f.start,
            end=f.end,
            label=bucket.label,
            availability=f.availability,
            performance=f.performance,
            quality=f.quality,
            oee=f.oee,
            planned_busy_time_s=f.planned_busy_time_s,
            actual_production_time_s=f.actual_production_time_s,
            ideal_time_s=f.ideal_time_s,
            produced=f.produced,
            good=f.good,
            bad=f.bad,
            scrapped=f.scrapped,
            parts_without_ideal_time=f.parts_without_ideal_time,
            implausible_readings=f.implausible_readings,
            stops_with_unknown_reason=f.stops_with_unknown_reason,
            downtime_s_by_reason=f.downtime_s_by_reason,
            planned_stop_s_by_reason=f.planned_stop_s_by_reason,
            provisional=f.provisional,
        )


class OeeView(BaseModel):
    machine: str | None
    group_by: GroupBy | None
    buckets: list[OeeBucket]
    start: WindowStart
    end: WindowEnd


def _window(start: datetime, end: datetime) -> Interval:
    if end <= start:
        raise Problem(422, "to must be after from")
    if end - start > MAX_WINDOW:
        raise Problem(422, f"the window may be at most {MAX_WINDOW.days} days")
    return Interval(start.astimezone(UTC), end.astimezone(UTC))


async def _reports(store: Store, facts: Facts, orders: Orders, site: Site, plant: Plant) -> Reports:
    return Reports(store, facts, orders, site, plant)


OeeReports = Annotated[Reports, Depends(_reports)]


async def _off_the_loop(build: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(build)
    except UnknownMachine as exc:
        raise Problem(404, str(exc)) from None


@router.get("/machines/{machine_id}/timeline", summary="A machine's state intervals")
async def timeline(
    machine_id: str, start: From, end: To, reports: OeeReports, _: Reader
) -> TimelineView:
    window = _window(start, end)

    def build() -> list[TimelineInterval]:
        return reports.machine_timeline(machine_id, window, datetime.now(UTC))

    return TimelineView(
        machine=machine_id,
        intervals=await _off_the_loop(build),
        start=window.start,
        end=window.end,
    )


@router.get("/oee", summary="ISO 22400 OEE of a machine, or of the site without one")
async def oee(
    start: From,
    end: To,
    reports: OeeReports,
    _: Reader,
    machine: str | None = None,
    group_by: GroupBy | None = None,
) -> OeeView:
    window = _window(start, end)

    def build() -> list[Bucket]:
        now = datetime.now(UTC)
        if machine is not None:
            return reports.machine_oee(machine, window, group_by, now)
        return reports.site_oee(window, group_by, now)

    buckets = await _off_the_loop(build)
    return OeeView(
        machine=machine,
        group_by=group_by,
        buckets=[OeeBucket.of(b) for b in buckets],
        start=window.start,
        end=window.end,
    )
