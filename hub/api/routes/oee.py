"""Machine timelines and ISO 22400 OEE, computed from the machine facts view for the window
asked."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel

from hub.api.deps import ApiContext, Context, Reader
from hub.api.problems import Problem
from hub.domain import machine_aggregate_id
from projections.rules.calendar import Interval
from projections.rules.history import MachineFacts
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import PlantHistory
from projections.rules.report import (
    Bucket,
    FactsFor,
    GroupBy,
    facts_window,
    report_over_time,
    site_report,
    timeline_over_time,
)
from projections.rules.timeline import TimelineInterval

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


def _configured(plants: PlantHistory, window: Interval) -> set[str]:
    """The machines ``[plant.machines]`` names in any configuration in force over ``window``:
    they count before their first report (from their commissioning date, if they have one)."""
    return {m for _, plant in plants.segments(window) for m in plant.machines}


def _facts_for(context: ApiContext, machine_id: str, configured: Collection[str] = ()) -> FactsFor:
    known = machine_id in configured or machine_id in context.plant.machines
    if not known and not context.store.has_machine(context.site, machine_id):
        raise Problem(404, f"no machine {machine_id!r} at site {context.site!r}")
    machine = machine_aggregate_id(context.site, machine_id)

    def facts_for(window: Interval, plant: PlantConfig) -> MachineFacts:
        facts = context.facts.window(machine, facts_window(window, plant))
        return facts.settle(plant.machine_rules(machine_id))

    return facts_for


def _plants(context: ApiContext) -> PlantHistory:
    return PlantHistory.of(context.store.plant(context.site), context.plant)


def _machine_report(
    context: ApiContext,
    machine_id: str,
    window: Interval,
    group_by: GroupBy | None,
    plants: PlantHistory,
) -> list[Bucket]:
    return report_over_time(
        _facts_for(context, machine_id, _configured(plants, window)),
        partial(context.orders.ideal_cycle_times, context.site),
        window,
        group_by,
        plants,
        datetime.now(UTC),
    )


@router.get("/machines/{machine_id}/timeline", summary="A machine's state intervals")
async def timeline(
    machine_id: str, start: From, end: To, context: Context, _: Reader
) -> dict[str, Any]:
    window = _window(start, end)

    def build() -> list[TimelineInterval]:
        plants = _plants(context)
        facts_for = _facts_for(context, machine_id, _configured(plants, window))
        return timeline_over_time(facts_for, window, plants, datetime.now(UTC))

    view = TimelineView(
        machine=machine_id,
        start=window.start,
        end=window.end,
        intervals=await asyncio.to_thread(build),
    )
    body = view.model_dump(mode="json")
    body["from"], body["to"] = body.pop("start"), body.pop("end")
    return body


@router.get("/oee", summary="ISO 22400 OEE of a machine, or of the site without one")
async def oee(
    start: From,
    end: To,
    context: Context,
    _: Reader,
    machine: str | None = None,
    group_by: GroupBy | None = None,
) -> dict[str, Any]:
    window = _window(start, end)

    def build() -> list[Bucket]:
        plants = _plants(context)
        if machine is not None:
            return _machine_report(context, machine, window, group_by, plants)
        machines = sorted({*context.store.machine_ids(context.site), *_configured(plants, window)})
        reports = [_machine_report(context, m, window, group_by, plants) for m in machines]
        return site_report(reports, group_by)

    buckets = await asyncio.to_thread(build)
    view = OeeView(
        machine=machine,
        start=window.start,
        end=window.end,
        group_by=group_by,
        buckets=[OeeBucket.of(b) for b in buckets],
    )
    return view.to_json()
