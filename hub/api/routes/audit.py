"""The auditors' routes: the log with who did what and when the hub knew it, a machine's or an
order's state as of a moment on either time axis, and the OEE "as reported" against "as known
now" with the events that changed it.

Two time axes (docs/audit.md): ``as_of`` is event time (what had happened by then, late reports
included); ``known_at`` is what the hub had recorded — a log position, or a time that stands for
the last position recorded by then. A ``known_at`` beyond what is stored is refused, not
guessed. Every route admits the ``admin`` and ``auditor`` roles only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from eventsourcing.utils import get_topic
from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, Field
from pydantic_core import to_jsonable_python

from hub.api.deps import Auditor, Plant, Reads, Site
from hub.api.problems import Problem
from hub.api.reads import JsonAnswer, ReadPool, ReadSources
from hub.api.routes.machines import ConditionView
from hub.api.routes.oee import From, OeeBucket, To, _window
from hub.api.routes.orders import OrderView
from hub.domain import (
    Machine,
    Order,
    machine_aggregate_id,
    order_aggregate_id,
    plant_aggregate_id,
)
from hub.reports import Reports, UnknownMachine
from projections.processes.forecast_watch import order_runs, progress_and_forecast
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.rules.progress import OrderProgress, order_progress
from projections.rules.report import GroupBy
from projections.views.audit_view import AuditEntry, AuditLogView, AuditQuery
from projections.views.facts_view import facts_of_runs

router = APIRouter(prefix="/audit", tags=["audit"])
diff_router = APIRouter(tags=["audit"])

MAX_PAGE = 1000
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)
SCRAP_TYPE = "mes.operator.scrap.v1"
SCENE = timedelta(days=1)  # how far before a window a late fact is looked for
# The stored event's own bookkeeping, shown as the entry's fields rather than in its data.
_BOOKKEEPING = {
    "originator_id", "originator_version", "timestamp", "event_id", "source", "event_time",
    "actor",
}  # fmt: skip
_TOPICS = frozenset(get_topic(cls) for cls in AuditLogView.event_classes)

KnownAt = Annotated[
    str | None,
    Query(
        description="What the hub knew: a log position (an integer), or an RFC 3339 time "
        "(the last position recorded by then). Default: everything stored.",
        max_length=64,
    ),
]
AsOf = Annotated[
    AwareDatetime | None,
    Query(description="Event time: what had happened by then. Default: the known_at moment."),
]


class Refused(ValueError):
    """A question the log cannot answer as asked (a ``known_at`` beyond what is stored)."""


class UnknownEntity(LookupError):
    """No such machine or order (as the hub knew it then)."""


# --- the answers ----------------------------------------------------------------------------


class AuditEvent(BaseModel):
    position: int = Field(description="Its place in the log: what the hub recorded before it")
    recorded_time: datetime = Field(description="When the hub stored it")
    event_time: datetime | None = Field(description="When it happened (the CloudEvent time)")
    type: str
    subject_kind: str | None = Field(description="machine, order, plant or webhooks")
    subject: str | None = Field(description="The machine's or order's id, or the site")
    event_id: str | None
    source: str | None
    actor: dict[str, str] | None = Field(
        description="Who sent it: an API key's id and role, an adapter's source, or a "
        "component of the hub; null for events stored before actors were kept"
    )
    version: int = Field(description="The machine's or order's version this event made")
    data: dict[str, Any] = Field(description="The fact as stored")


class AuditPage(BaseModel):
    events: list[AuditEvent]
    next_after: int | None = Field(
        description="Ask again with after=this for the next page; null: no more"
    )
    known_up_to: int = Field(description="The log position the audit log has read up to")


class KnownAtView(BaseModel):
    position: int
    recorded_time: datetime | None


class TimelineState(BaseModel):
    state: str
    reason: str | None
    order_id: str | None
    since: datetime


class MachineRecord(BaseModel):
    """What the hub's record of a machine said (its counters' totals are the views' work: see
    the state's timeline and the OEE)."""

    availability: str | None
    execution: str | None
    mode: str | None
    program: str | None
    state_since: datetime | None
    order_id: str | None
    conditions: list[ConditionView]
    last_event_time: datetime | None
    version: int

    @classmethod
    def of(cls, machine: Machine) -> MachineRecord:
        return cls(
            availability=machine.availability,
            execution=machine.execution,
            mode=machine.mode,
            program=machine.program,
            state_since=machine.state_since,
            order_id=machine.order_id,
            conditions=[ConditionView.model_validate(c) for c in machine.conditions.values()],
            last_event_time=machine.last_event_time,
            version=machine.version,
        )


class MachineAsOf(BaseModel):
    machine_id: str
    as_of: datetime
    known_at: KnownAtView
    state: TimelineState | None = Field(
        description="What the machine was doing at as_of, from the facts known at known_at"
    )
    record: MachineRecord | None = Field(
        description="The machine's record as the hub held it at known_at (its latest facts "
        "then, whatever their event time); null: not known yet"
    )


class OrderAsOf(BaseModel):
    order_id: str
    as_of: datetime
    known_at: KnownAtView
    progress: OrderProgress = Field(description="Made by as_of, from the facts known then")
    record: OrderView = Field(description="The order as the hub held it at known_at")


class ChangeEvent(BaseModel):
    position: int
    recorded_time: datetime
    event_time: datetime | None
    type: str
    actor: dict[str, str] | None
    summary: str


class DiffBucket(BaseModel):
    start: datetime
    end: datetime
    label: str | None
    as_reported: OeeBucket
    as_known_now: OeeBucket
    changed: bool
    changes: list[ChangeEvent] = Field(
        description="Events recorded after known_at that bear on this bucket"
    )


class OeeDiff(BaseModel):
    machine: str
    group_by: GroupBy | None
    known_at: KnownAtView
    now: KnownAtView
    buckets: list[DiffBucket]


class ProgressDiff(BaseModel):
    order_id: str
    known_at: KnownAtView
    now: KnownAtView
    as_reported: OrderProgress
    as_known_now: OrderProgress
    changed: bool
    changes: list[ChangeEvent]


# --- reading the log ------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A ``known_at`` resolved: the last log position then, and when it was recorded."""

    position: int
    recorded_time: datetime | None

    def view(self) -> KnownAtView:
        return KnownAtView(position=self.position, recorded_time=self.recorded_time)


def resolve_known_at(sources: ReadSources, text: str | None, now: datetime) -> Known:
    """``known_at`` as a position the audit log has read; raises ``Refused`` beyond it."""
    audit = sources.audit
    indexed = audit.known_up_to()
    if text is None:
        return Known(indexed, audit.recorded_at(indexed))
    text = text.strip()
    if text.isdigit():
        position = int(text)
        stored = sources.store.last_position()
        if position > stored:
            raise Refused(f"known_at {position} is beyond the log, which ends at {stored}")
        if position > indexed:
            raise Refused(
                f"known_at {position} is not in the audit log yet (it has read up to "
                f"{indexed}); ask again in a moment"
            )
        return Known(position, audit.recorded_at(position))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Refused("known_at must be a log position (an integer) or an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise Refused("known_at needs a UTC offset (e.g. 2026-03-02T06:00:00Z)")
    if moment > now:
        raise Refused("known_at is in the future: what the hub will know is not known yet")
    position = audit.position_at(moment)
    return Known(position, audit.recorded_at(position) if position else None)


def _data(event: Any) -> dict[str, Any]:
    fields = {k: v for k, v in event.__dict__.items() if k not in _BOOKKEEPING}
    found = to_jsonable_python(fields, fallback=str)
    assert isinstance(found, dict)
    return found


def _stored(sources: ReadSources, positions: Sequence[int]) -> dict[int, Any]:
    """The stored events at ``positions`` (ascending), read in runs: one read of the log for
    positions close together, not one each."""
    found: dict[int, Any] = {}
    index = 0
    while index < len(positions):
        first = last = positions[index]
        # Extend the run while the next wanted position is near (a page of one machine's
        # events is mostly contiguous; reading a few unwanted ones costs less than a query).
        while index + 1 < len(positions) and positions[index + 1] - last <= 16:
            index += 1
            last = positions[index]
        _, events = sources.store.read(first - 1, last - first + 1, _TOPICS)
        found.update(events)
        index += 1
    return found


def _events(sources: ReadSources, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
    stored = _stored(sources, [e.position for e in entries])
    return [
        AuditEvent(
            position=entry.position,
            recorded_time=entry.recorded_time,
            event_time=entry.event_time,
            type=entry.type,
            subject_kind=entry.kind,
            subject=entry.entity,
            event_id=entry.event_id,
            source=entry.source,
            actor=entry.actor,
            version=entry.version,
            data=_data(stored[entry.position]) if entry.position in stored else {},
        )
        for entry in entries
    ]


def read_log(sources: ReadSources, query: AuditQuery, limit: int) -> bytes:
    """A page of the audit log, as the answer's JSON (in the read pool)."""
    entries = sources.audit.page(query, limit + 1)
    more = len(entries) > limit
    entries = entries[:limit]
    page = AuditPage(
        events=_events(sources, entries),
        next_after=entries[-1].position if more and entries else None,
        known_up_to=sources.audit.known_up_to(),
    )
    return page.model_dump_json().encode()


# --- as of a moment -------------------------------------------------------------------------


def _reports(sources: ReadSources, site: str, plant: PlantConfig, known: Known) -> Reports:
    reports = Reports(sources.store, sources.facts, sources.orders, site, plant)
    plant_version = sources.audit.version_at(plant_aggregate_id(site).hex, known.position)
    return reports.as_known_at(known.position, plant_version)


def _as_of(as_of: datetime | None, known: Known) -> datetime:
    if as_of is not None:
        return as_of.astimezone(UTC)
    return known.recorded_time or datetime.now(UTC)


def read_machine_as_of(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    machine_id: str,
    as_of: datetime | None,
    known_at: str | None,
) -> bytes:
    known = resolve_known_at(sources, known_at, datetime.now(UTC))
    moment = _as_of(as_of, known)
    aggregate = machine_aggregate_id(site, machine_id)
    version = sources.audit.version_at(aggregate.hex, known.position)
    record = None
    if version:
        machine: object = sources.store.application.repository.get(aggregate, version=version)
        assert isinstance(machine, Machine)
        record = MachineRecord.of(machine)
    reports = _reports(sources, site, plant, known)
    try:
        # A day back is enough to know the state at the moment (the window's first facts
        # include the last state before it).
        window = Interval(moment - timedelta(days=1), moment + timedelta(microseconds=1))
        intervals = reports.machine_timeline(machine_id, window, moment)
    except UnknownMachine:
        raise UnknownEntity(f"no machine {machine_id!r} at site {site!r}") from None
    state = None
    if intervals:
        last = intervals[-1]
        state = TimelineState(
            state=last.state,
            reason=last.reason,
            order_id=last.order_id,
            since=last.start,
        )
    answer = MachineAsOf(
        machine_id=machine_id, as_of=moment, known_at=known.view(), state=state, record=record
    )
    return answer.model_dump_json().encode()


def _progress_as_of(
    sources: ReadSources, plant: PlantConfig, order: Order, known: Known, moment: datetime
) -> tuple[OrderProgress, OrderView]:
    facts = sources.facts.as_known_at(known.position)
    progress, forecast = progress_and_forecast(order, facts, plant, moment)
    # What had been made by ``moment``: the runs as they stood then.
    runs = [
        replace(run, end=None if run.end is None or run.end > moment else run.end)
        for run in order_runs(order)
        if run.start <= moment
    ]
    ideal = plant.order_ideal_cycle_time(order.ideal_cycle_time_s, order.part_number)
    made = order_progress(
        order.order_id,
        order.quantity,
        ideal,
        runs,
        facts_of_runs(facts, order.site, order.order_id, runs, plant, moment),
        plant,
        moment,
    )
    return made, OrderView.of(order, progress, forecast)


def _order_at(sources: ReadSources, site: str, order_id: str, known: Known) -> Order:
    aggregate = order_aggregate_id(site, order_id)
    version = sources.audit.version_at(aggregate.hex, known.position)
    if not version:
        raise UnknownEntity(f"no order {order_id!r} at site {site!r} (known at {known.position})")
    order: object = sources.store.application.repository.get(aggregate, version=version)
    assert isinstance(order, Order)
    return order


def read_order_as_of(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    order_id: str,
    as_of: datetime | None,
    known_at: str | None,
) -> bytes:
    known = resolve_known_at(sources, known_at, datetime.now(UTC))
    moment = _as_of(as_of, known)
    order = _order_at(sources, site, order_id, known)
    progress, record = _progress_as_of(sources, plant, order, known, moment)
    answer = OrderAsOf(
        order_id=order_id, as_of=moment, known_at=known.view(), progress=progress, record=record
    )
    return answer.model_dump_json().encode()


# --- as reported against as known now -------------------------------------------------------


def _summary(event: AuditEvent) -> str:
    data = event.data
    match event.type:
        case "mes.operator.downtime_reason.v1":
            span = f"{data.get('start')} to {data.get('end') or 'open'}"
            return f"reason {data.get('reason')!r} for {span}"
        case "mes.machine.execution.v1":
            return f"execution {data.get('execution')}"
        case "mes.machine.availability.v1":
            return f"availability {data.get('availability')}"
        case "mes.machine.partcount.v1":
            return f"{data.get('kind')} counter read {data.get('count')}"
        case "mes.operator.scrap.v1":
            return f"{data.get('quantity')} scrapped ({data.get('reason')})"
        case "mes.operator.order_started.v1" | "mes.operator.order_ended.v1":
            verb = "started" if event.type.endswith("started.v1") else "ended"
            return f"order {data.get('order_id')} {verb}"
        case "mes.hub.plant.configured.v1":
            return f"plant configuration, effective from {data.get('effective_from') or 'start'}"
        case "mes.erp.order.released.v1" | "mes.erp.order.changed.v1":
            return f"order fields {sorted(data.get('fields', {}))}"
    return event.type


def _change(event: AuditEvent) -> ChangeEvent:
    return ChangeEvent(
        position=event.position,
        recorded_time=event.recorded_time,
        event_time=event.event_time,
        type=event.type,
        actor=event.actor,
        summary=_summary(event),
    )


def _later(
    sources: ReadSources,
    aggregates: Sequence[str],
    known: Known,
    window: Interval | None = None,
    types: Sequence[str] = (),
) -> list[AuditEvent]:
    """The events of ``aggregates`` recorded after ``known`` (every page); with ``window``,
    those dated from a day before it to its end only (what may bear on it: a reason is given
    after the stop it labels begins; the day before holds the state the window opens in)."""
    query = AuditQuery(aggregates=aggregates, types=types, after=known.position)
    if window is not None:
        query = replace(query, event_from=window.start - SCENE, event_to=window.end)
    found: list[AuditEvent] = []
    while True:
        entries = sources.audit.page(query, MAX_PAGE)
        found += _events(sources, [e for e in entries if e.type != "registered"])
        if len(entries) < MAX_PAGE:
            return found
        query = replace(query, after=entries[-1].position)


def _bears_on(event: AuditEvent, start: datetime, end: datetime, first: bool) -> bool:
    """Whether a fact recorded late may change a bucket from ``start`` to ``end``: a reason
    whose span meets it, a plant configuration in force by its end, any other fact dated in it
    (or, for the window's first bucket, before it: the state it opened in)."""
    data = event.data
    if event.type == "mes.operator.downtime_reason.v1":
        reason_start = datetime.fromisoformat(str(data["start"]))
        reason_end = datetime.fromisoformat(str(data["end"])) if data.get("end") else None
        return reason_start < end and (reason_end is None or reason_end > start)
    if event.type == "mes.hub.plant.configured.v1":
        effective = data.get("effective_from")
        return effective is None or datetime.fromisoformat(str(effective)) < end
    if event.event_time is None:
        return False
    return event.event_time < end and (first or event.event_time >= start)


def read_oee_diff(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    machine_id: str,
    window: Interval,
    group_by: GroupBy | None,
    known_at: str,
) -> bytes:
    now = datetime.now(UTC)
    known = resolve_known_at(sources, known_at, now)
    latest = resolve_known_at(sources, None, now)
    current = Reports(sources.store, sources.facts, sources.orders, site, plant)
    try:
        then = _reports(sources, site, plant, known).machine_oee(
            machine_id, window, group_by, known.recorded_time or now
        )
        today = current.machine_oee(machine_id, window, group_by, now)
    except UnknownMachine:
        raise UnknownEntity(f"no machine {machine_id!r} at site {site!r}") from None
    machine = [machine_aggregate_id(site, machine_id).hex]
    later = _later(sources, machine, known, window)
    later += _later(sources, [plant_aggregate_id(site).hex], known)  # (configurations: few)
    buckets = []
    # The buckets of both reports are cut alike (same window, grouping and calendar segments),
    # unless a calendar change moved a shift: then they are matched by their start.
    by_start = {b.figures.start: b for b in then}
    for index, bucket in enumerate(today):
        before = by_start.get(bucket.figures.start)
        reported = OeeBucket.of(before if before is not None else bucket)
        known_now = OeeBucket.of(bucket)
        start, end = bucket.figures.start, bucket.figures.end
        changes = [_change(e) for e in later if _bears_on(e, start, end, index == 0)]
        reported_figures = reported.model_dump(exclude={"provisional"})
        buckets.append(
            DiffBucket(
                start=start,
                end=end,
                label=bucket.label,
                as_reported=reported,
                as_known_now=known_now,
                changed=before is None
                or reported_figures != known_now.model_dump(exclude={"provisional"}),
                changes=changes,
            )
        )
    answer = OeeDiff(
        machine=machine_id,
        group_by=group_by,
        known_at=known.view(),
        now=latest.view(),
        buckets=buckets,
    )
    return answer.model_dump_json().encode()


def read_progress_diff(
    sources: ReadSources, site: str, plant: PlantConfig, order_id: str, known_at: str
) -> bytes:
    now = datetime.now(UTC)
    known = resolve_known_at(sources, known_at, now)
    latest = resolve_known_at(sources, None, now)
    order_then = _order_at(sources, site, order_id, known)
    order_now = _order_at(sources, site, order_id, latest)
    then, _ = _progress_as_of(sources, plant, order_then, known, known.recorded_time or now)
    today, _ = _progress_as_of(sources, plant, order_now, latest, now)
    runs = order_runs(order_now)
    machines = [machine_aggregate_id(site, m).hex for m in sorted({r.machine_id for r in runs})]
    later = _later(sources, [order_aggregate_id(site, order_id).hex], known)
    if runs:
        # The machines' facts over the order's runs, and scrap naming it whenever reported
        # (an inspection days after).
        span = Interval(min(r.start for r in runs), max(r.end or now for r in runs))
        seen = {e.position for e in later}
        nearby = _later(sources, machines, known, span)
        scrap = _later(sources, machines, known, types=[SCRAP_TYPE])
        for event in sorted([*nearby, *scrap], key=lambda e: e.position):
            if event.position not in seen and _names_order(event, order_id, order_now):
                seen.add(event.position)
                later.append(event)
        later.sort(key=lambda e: e.position)
    answer = ProgressDiff(
        order_id=order_id,
        known_at=known.view(),
        now=latest.view(),
        as_reported=then,
        as_known_now=today,
        changed=_figures(then) != _figures(today),
        changes=[_change(e) for e in later],
    )
    return answer.model_dump_json().encode()


def _figures(progress: OrderProgress) -> tuple[int, int, int, int]:
    return progress.produced, progress.good, progress.bad, progress.scrapped


def _names_order(event: AuditEvent, order_id: str, order: Order) -> bool:
    """A machine fact that bears on the order: one naming it, or one bearing on one of its
    runs (dated in it; a reason, overlapping it)."""
    if event.data.get("order_id") == order_id:
        return True
    return any(
        _bears_on(event, run.start, run.end or FOREVER, first=False) for run in order_runs(order)
    )


# --- the routes -----------------------------------------------------------------------------


async def _answer(
    request: Request, reads: ReadPool, work: Callable[..., bytes], *args: Any
) -> Response:
    try:
        return JsonAnswer(await reads.run(request, work, *args))
    except Refused as refused:
        raise Problem(422, str(refused)) from None
    except UnknownEntity as unknown:
        raise Problem(404, str(unknown)) from None


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Events per page")]
After = Annotated[int, Query(ge=0, description="The cursor: next_after of the page before")]


@router.get(
    "/events",
    summary="The log, by position: who did what, when it happened and when the hub knew",
    response_model=AuditPage,
)
async def audit_events(
    request: Request,
    reads: Reads,
    site: Site,
    _: Auditor,
    machine: Annotated[list[str] | None, Query(max_length=100)] = None,
    order: Annotated[list[str] | None, Query(max_length=100)] = None,
    type: Annotated[list[str] | None, Query(max_length=50)] = None,
    actor: Annotated[str | None, Query(max_length=300, description="An actor's id")] = None,
    event_from: AwareDatetime | None = None,
    event_to: AwareDatetime | None = None,
    recorded_from: AwareDatetime | None = None,
    recorded_to: AwareDatetime | None = None,
    after: After = 0,
    limit: Limit = 100,
) -> Response:
    aggregates = [machine_aggregate_id(site, m).hex for m in machine or []]
    aggregates += [order_aggregate_id(site, o).hex for o in order or []]
    query = AuditQuery(
        aggregates=aggregates,
        types=type or [],
        actor=actor,
        event_from=event_from,
        event_to=event_to,
        recorded_from=recorded_from,
        recorded_to=recorded_to,
        after=after,
    )
    return await _answer(request, reads, read_log, query, limit)


@router.get(
    "/machines/{machine_id}/history",
    summary="Every stored event of one machine, in log order",
    response_model=AuditPage,
)
async def machine_history(
    request: Request,
    machine_id: str,
    reads: Reads,
    site: Site,
    _: Auditor,
    after: After = 0,
    limit: Limit = 100,
) -> Response:
    query = AuditQuery(aggregates=[machine_aggregate_id(site, machine_id).hex], after=after)
    return await _answer(request, reads, read_log, query, limit)


@router.get(
    "/orders/{order_id}/history",
    summary="Every stored event of one order, in log order",
    response_model=AuditPage,
)
async def order_history(
    request: Request,
    order_id: str,
    reads: Reads,
    site: Site,
    _: Auditor,
    after: After = 0,
    limit: Limit = 100,
) -> Response:
    query = AuditQuery(aggregates=[order_aggregate_id(site, order_id).hex], after=after)
    return await _answer(request, reads, read_log, query, limit)


@router.get(
    "/machines/{machine_id}/state",
    summary="A machine's state as of an event time, as the hub knew it at a position or time",
    response_model=MachineAsOf,
)
async def machine_as_of(
    request: Request,
    machine_id: str,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Auditor,
    as_of: AsOf = None,
    known_at: KnownAt = None,
) -> Response:
    work = read_machine_as_of
    return await _answer(request, reads, work, site, plant, machine_id, as_of, known_at)


@router.get(
    "/orders/{order_id}/state",
    summary="An order's progress as of an event time, as the hub knew it at a position or time",
    response_model=OrderAsOf,
)
async def order_as_of(
    request: Request,
    order_id: str,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Auditor,
    as_of: AsOf = None,
    known_at: KnownAt = None,
) -> Response:
    work = read_order_as_of
    return await _answer(request, reads, work, site, plant, order_id, as_of, known_at)


@router.get(
    "/orders/{order_id}/progress/diff",
    summary="An order's progress as reported at known_at against as known now, and why",
    response_model=ProgressDiff,
)
async def progress_diff(
    request: Request,
    order_id: str,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Auditor,
    known_at: Annotated[str, Query(max_length=64, description="A log position or RFC 3339 time")],
) -> Response:
    return await _answer(request, reads, read_progress_diff, site, plant, order_id, known_at)


@diff_router.get(
    "/oee/diff",
    summary="A machine's OEE as reported at known_at against as known now, and why",
    response_model=OeeDiff,
)
async def oee_diff(
    request: Request,
    start: From,
    end: To,
    machine: str,
    reads: Reads,
    site: Site,
    plant: Plant,
    _: Auditor,
    known_at: Annotated[str, Query(max_length=64, description="A log position or RFC 3339 time")],
    group_by: GroupBy | None = None,
) -> Response:
    window = _window(start, end)
    work = read_oee_diff
    return await _answer(request, reads, work, site, plant, machine, window, group_by, known_at)
