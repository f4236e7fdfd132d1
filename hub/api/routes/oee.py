"""Machine timelines and ISO 22400 OEE over the window asked, from the OEE entry point
(``hub.reports``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, Field

from hub.api.deps import Plant, Reader, Reads, Site
from hub.api.problems import Problem
from hub.api.reads import JsonAnswer, ReadPool, ReadSources
from hub.reports import Reports, UnknownMachine
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.rules.report import Bucket, GroupBy
from projections.rules.timeline import TimelineInterval

router = APIRouter(tags=["oee"])
MAX_WINDOW = timedelta(days=400)
EARLIEST, LATEST = datetime(1900, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)

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


def window_of(start: datetime, end: datetime) -> Interval:
    """The window asked for, in UTC; a problem (422) for one out of range, reversed or too long."""
    in_range = f"from and to must be between the years {EARLIEST.year} and {LATEST.year - 1}"
    try:
        window = Interval(start.astimezone(UTC), end.astimezone(UTC))
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before the first UTC time there is
        raise Problem(422, in_range) from None
    if window.end <= window.start:
        raise Problem(422, "to must be after from")
    if window.end - window.start > MAX_WINDOW:
        raise Problem(422, f"the window may be at most {MAX_WINDOW.days} days")
    # The reports look a little past the window (a day's bucket, a shift running over it).
    if not (window.start >= EARLIEST and window.end <= LATEST):
        raise Problem(422, in_range)
    return window


def _reports(sources: ReadSources, site: str, plant: PlantConfig) -> Reports:
    return Reports(sources.store, sources.facts, sources.orders, site, plant)


def read_timeline(
    sources: ReadSources, site: str, plant: PlantConfig, machine_id: str, window: Interval
) -> bytes:
    """The machine's timeline as the answer's JSON (in the read pool); raises
    ``UnknownMachine``."""
    intervals = _reports(sources, site, plant).machine_timeline(
        machine_id, window, datetime.now(UTC)
    )
    view = TimelineView(machine=machine_id, intervals=intervals, start=window.start, end=window.end)
    return view.model_dump_json(by_alias=True).encode()


def read_oee(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    machine: str | None,
    window: Interval,
    group_by: GroupBy | None,
) -> bytes:
    """A machine's OEE, or the site's, as the answer's JSON (in the read pool)."""
    reports, now = _reports(sources, site, plant), datetime.now(UTC)
    if machine is not None:
        buckets = reports.machine_oee(machine, window, group_by, now)
    else:
        buckets = reports.site_oee(window, group_by, now)
    view = OeeView(
        machine=machine,
        group_by=group_by,
        buckets=[OeeBucket.of(b) for b in buckets],
        start=window.start,
        end=window.end,
    )
    return view.model_dump_json(by_alias=True).encode()


async def _answer(
    request: Request, reads: ReadPool, work: Callable[..., bytes], *args: Any
) -> Response:
    try:
        return JsonAnswer(await reads.run(request, work, *args))
    except UnknownMachine as exc:
        raise Problem(404, str(exc)) from None


@router.get(
    "/machines/{machine_id}/timeline",
    summary="A machine's state intervals",
    response_model=TimelineView,
)
async def timeline(
    request: Request,
    machine_id: str,
    start: From,
    end: To,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Reader,
) -> Response:
    window = window_of(start, end)
    return await _answer(request, reads, read_timeline, site, plant, machine_id, window)


@router.get(
    "/oee",
    summary="ISO 22400 OEE of a machine, or of the site without one",
    response_model=OeeView,
)
async def oee(
    request: Request,
    start: From,
    end: To,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Reader,
    machine: str | None = None,
    group_by: GroupBy | None = None,
) -> Response:
    window = window_of(start, end)
    return await _answer(request, reads, read_oee, site, plant, machine, window, group_by)
