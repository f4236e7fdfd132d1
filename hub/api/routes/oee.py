"""Machine timelines and ISO 22400 OEE over the window asked, from the OEE entry point
(``hub.reports``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime, BaseModel

from hub.api.deps import Context, Reader
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


class TimelineView(BaseModel):
    machine: str
    start: datetime
    end: datetime
    intervals: list[TimelineInterval]


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
    start: datetime
    end: datetime
    group_by: GroupBy | None
    buckets: list[OeeBucket]

    # The contract's field names: "from" and "to".
    def to_json(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        body["from"], body["to"] = body.pop("start"), body.pop("end")
        return body


def _window(start: datetime, end: datetime) -> Interval:
    if end <= start:
        raise Problem(422, "to must be after from")
    if end - start > MAX_WINDOW:
        raise Problem(422, f"the window may be at most {MAX_WINDOW.days} days")
    return Interval(start.astimezone(UTC), end.astimezone(UTC))


async def _reports(context: Context) -> Reports:
    return Reports(context.store, context.facts, context.orders, context.site, context.plant)


OeeReports = Annotated[Reports, Depends(_reports)]


async def _off_the_loop(build: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(build)
    except UnknownMachine as exc:
        raise Problem(404, str(exc)) from None


@router.get("/machines/{machine_id}/timeline", summary="A machine's state intervals")
async def timeline(
    machine_id: str, start: From, end: To, reports: OeeReports, _: Reader
) -> dict[str, Any]:
    window = _window(start, end)

    def build() -> list[TimelineInterval]:
        return reports.machine_timeline(machine_id, window, datetime.now(UTC))

    view = TimelineView(
        machine=machine_id,
        start=window.start,
        end=window.end,
        intervals=await _off_the_loop(build),
    )
    body = view.model_dump(mode="json")
    body["from"], body["to"] = body.pop("start"), body.pop("end")
    return body


@router.get("/oee", summary="ISO 22400 OEE of a machine, or of the site without one")
async def oee(
    start: From,
    end: To,
    reports: OeeReports,
    _: Reader,
    machine: str | None = None,
    group_by: GroupBy | None = None,
) -> dict[str, Any]:
    window = _window(start, end)

    def build() -> list[Bucket]:
        now = datetime.now(UTC)
        if machine is not None:
            return reports.machine_oee(machine, window, group_by, now)
        return reports.site_oee(window, group_by, now)

    buckets = await _off_the_loop(build)
    view = OeeView(
        machine=machine,
        start=window.start,
        end=window.end,
        group_by=group_by,
        buckets=[OeeBucket.of(b) for b in buckets],
    )
    return view.to_json()
