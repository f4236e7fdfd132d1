"""The auditors' routes: the log with who did what and when the hub knew it, a machine's or an
order's state as of a moment on either time axis, and the OEE "as reported" against "as known
now" with the events that changed it.

Two time axes (docs/audit.md): ``as_of`` is event time (what had happened by then, late reports
included); ``known_at`` is what the hub had recorded — a log position, or a time that stands for
the last position recorded by then. A ``known_at`` beyond what is stored is refused, not
guessed. Every route admits the ``admin`` and ``auditor`` roles only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, Field
from pydantic_core import to_jsonable_python

from hub.api.deps import Auditor, Plant, Reads, Site
from hub.api.problems import Problem
from hub.api.reads import JsonAnswer, ReadPool, ReadSources
from hub.api.routes.machines import ConditionView
from hub.api.routes.oee import EARLIEST, LATEST, From, OeeBucket, To, window_of
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
from projections.views.audit_view import AuditEntry, AuditQuery
from projections.views.facts_view import facts_of_runs
from projections.views.orders_view import OrdersView

router = APIRouter(prefix="/audit", tags=["audit"])
diff_router = APIRouter(tags=["audit"])

MAX_PAGE = 1000
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)
SCRAP_TYPE = "mes.operator.scrap.v1"
REASON_TYPE = "mes.operator.downtime_reason.v1"
PLANT_TYPE = "mes.hub.plant.configured.v1"
# A program sent to a machine (DNC) is kept for the auditors but changes no figure.
PROGRAM_SENT_TYPE = "mes.machine.program_sent.v1"
FIRST_CONFIGURATION = 2  # the Plant's version after its first configuration (1: registered)
# What the ERP and the operators say of an order (not the hub's own forecasts, confirmations
# and deliveries, which follow from these).
ORDER_FIELDS = ("mes.erp.order.released.v1", "mes.erp.order.changed.v1")
ORDER_FACTS = (
    *ORDER_FIELDS, "mes.erp.order.cancelled.v1", "mes.operator.order_started.v1",
    "mes.operator.order_ended.v1",
)  # fmt: skip
MAX_CHANGES = 500  # per bucket or order: more are cut (changes_truncated)
SCENE = timedelta(days=1)  # how far before a window a late fact is looked for
# The stored event's own bookkeeping, shown as the entry's fields rather than in its data.
_BOOKKEEPING = {
    "originator_id", "originator_version", "timestamp", "event_id", "source", "event_time",
    "actor",
}  # fmt: skip

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
    Query(
        description="Event time: what had happened by then (no later than the known_at "
        "moment). Default: the known_at moment."
    ),
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
    position: int = Field(description="The last log position known then")
    recorded_time: datetime | None = Field(description="When that position was recorded")
    moment: datetime = Field(description="The moment the answer speaks for")


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
    as_reported: OeeBucket | None = Field(
        description="The bucket as reported then; null: there was no such bucket then (a "
        "calendar change moved a shift since: see dropped)"
    )
    as_known_now: OeeBucket
    changed: bool
    changes: list[ChangeEvent] = Field(
        description="Events recorded after known_at that bear on this bucket, in log order"
    )
    changes_truncated: bool = Field(description=f"More than {MAX_CHANGES} changes: the first")


class OeeDiff(BaseModel):
    machine: str
    group_by: GroupBy | None
    known_at: KnownAtView
    now: KnownAtView
    buckets: list[DiffBucket]
    dropped: list[OeeBucket] = Field(
        description="Buckets reported then that are no longer cut so (a calendar change)"
    )


class ProgressDiff(BaseModel):
    order_id: str
    known_at: KnownAtView
    now: KnownAtView
    as_reported: OrderProgress | None = Field(description="null: the order was not known then")
    as_known_now: OrderProgress
    changed: bool
    changes: list[ChangeEvent]
    changes_truncated: bool


# --- reading the log ------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A ``known_at`` resolved: the last log position then, when that was recorded, and the
    moment it stands for (the time asked; for a position, when it was recorded; else now)."""

    position: int
    recorded_time: datetime | None
    moment: datetime

    def view(self) -> KnownAtView:
        return KnownAtView(
            position=self.position, recorded_time=self.recorded_time, moment=self.moment
        )


def resolve_known_at(sources: ReadSources, text: str | None, now: datetime) -> Known:
    """``known_at`` as a position the audit log has read; raises ``Refused`` beyond it."""
    audit = sources.audit
    indexed = audit.known_up_to()
    if text is None:
        return Known(indexed, audit.recorded_at(indexed), now)
    text = text.strip()
    if text.isascii() and text.isdigit():
        position = int(text)
        stored = sources.store.last_position()
        if position > stored:
            raise Refused(f"known_at {position} is beyond the log, which ends at {stored}")
        if position > indexed:
            raise Refused(
                f"known_at {position} is not in the audit log yet (it has read up to "
                f"{indexed}); ask again in a moment"
            )
        recorded = audit.recorded_at(position)
        return Known(position, recorded, recorded or now)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Refused("known_at must be a log position (an integer) or an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise Refused("known_at needs a UTC offset (e.g. 2026-03-02T06:00:00Z)")
    if moment > now:
        raise Refused("known_at is in the future: what the hub will know is not known yet")
    position = min(audit.position_at(moment), indexed)
    return Known(position, audit.recorded_at(position) if position else None, moment)


def _data(event: Any) -> dict[str, Any]:
    fields = {k: v for k, v in event.__dict__.items() if k not in _BOOKKEEPING}
    found = to_jsonable_python(fields, fallback=str)
    assert isinstance(found, dict)
    return found


def _events(sources: ReadSources, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
    stored = sources.store.events_at([e.position for e in entries])
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
    """The reports as the hub could have made them at ``known``: the facts, the plant's
    configurations and the orders' ideal cycle times as they stood at its position."""
    reports = Reports(sources.store, sources.facts, sources.orders, site, plant)
    plant_version = sources.audit.version_at(plant_aggregate_id(site).hex, known.position)

    def cycle_facts(
        site: str, order_ids: Collection[str]
    ) -> dict[str, tuple[float | None, str | None]]:
        # As the orders view has them now, but for the orders the ERP released or changed
        # since: those as they stood then (read at their version, a few).
        found = sources.orders.order_cycle_facts(site, order_ids)
        since = sources.audit.touched(ORDER_FIELDS, known.position, sources.store.last_position())
        # (An orders view read further than the audit log, rebuilt alone: every order is read
        # at its version then, the slow way, rather than take a change not indexed yet.)
        every = sources.audit.ahead_of_me(OrdersView.name)
        for order_id in order_ids:
            if not every and order_aggregate_id(site, order_id).hex not in since:
                continue
            order = _order_known(sources, site, order_id, known)
            if order is None:
                found.pop(order_id, None)
            else:
                found[order_id] = (order.ideal_cycle_time_s, order.part_number)
        return found

    return reports.as_known_at(known.position, plant_version, cycle_facts)


def _as_of(as_of: datetime | None, known: Known) -> datetime:
    """The event time asked for; no later than the moment known_at stands for (what happened
    after it was not known then: the answer would count a run on to a moment no one saw)."""
    return min(as_of.astimezone(UTC), known.moment) if as_of is not None else known.moment


def _order_known(sources: ReadSources, site: str, order_id: str, known: Known) -> Order | None:
    """The order as it stood at ``known`` (None: not known then)."""
    aggregate = order_aggregate_id(site, order_id)
    version = sources.audit.version_at(aggregate.hex, known.position)
    found = sources.store.aggregate_at(aggregate, version) if version else None
    return found if isinstance(found, Order) else None


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
    machine = sources.store.aggregate_at(aggregate, version) if version else None
    record = MachineRecord.of(machine) if isinstance(machine, Machine) else None
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
    # The record as the hub held it (its progress and forecast then, at the moment known_at
    # stands for); what was made by ``moment`` below.
    progress, forecast = progress_and_forecast(order, facts, plant, known.moment)
    # What had been made by ``moment``: the runs as they stood then.
    runs = [
        replace(run, end=None if run.end is None or run.end > moment else run.end)
        for run in order_runs(order)
        if run.start <= moment
    ]
    ideal = plant.order_ideal_cycle_time(order.ideal_cycle_time_s, order.part_number)
    by_machine = facts_of_runs(facts, order.site, order.order_id, runs, plant, moment)
    for machine_facts in by_machine.values():
        # Scrap naming the order counts whenever reported: by ``moment``, what was reported
        # by then only.
        machine_facts.scrap = [s for s in machine_facts.scrap if s.time <= moment]
    made = order_progress(order.order_id, order.quantity, ideal, runs, by_machine, plant, moment)
    return made, OrderView.of(order, progress, forecast)


def _order_at(sources: ReadSources, site: str, order_id: str, known: Known) -> Order:
    order = _order_known(sources, site, order_id, known)
    if order is None:
        raise UnknownEntity(f"no order {order_id!r} at site {site!r} (known at {known.position})")
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
    latest: Known,
    window: Interval | None = None,
    types: Sequence[str] = (),
    spans: Interval | None = None,
) -> list[AuditEvent]:
    """The events of ``aggregates`` recorded after ``known`` up to ``latest``, at most
    ``MAX_CHANGES`` + 1; with ``window``, those dated from a day before it to its end only (the
    day before holds the state the window opens in)."""
    query = AuditQuery(
        aggregates=aggregates, types=types, after=known.position, until=latest.position
    )
    if window is not None:
        query = replace(query, event_from=window.start - SCENE, event_to=window.end)
    if spans is not None:
        query = replace(query, spans_meeting=(spans.start, spans.end))
    found: list[AuditEvent] = []
    while len(found) <= MAX_CHANGES:
        entries = sources.audit.page(query, MAX_PAGE)
        found += _events(sources, [e for e in entries if e.type != "registered"])
        if len(entries) < MAX_PAGE:
            break
        query = replace(query, after=entries[-1].position)
    return found


def _machine_changes(
    sources: ReadSources, site: str, machine_id: str, known: Known, latest: Known, window: Interval
) -> list[AuditEvent]:
    """What was recorded late about a machine's window: its facts dated in it (or the day
    before), its reasons whenever given (an operator labels last night's stop this morning),
    the plant's configurations, and changes of the orders it ran then."""
    machine = [machine_aggregate_id(site, machine_id).hex]
    found = _later(sources, machine, known, latest, window)
    # Reasons whenever given, whose span meets the window (found by their span, not read all).
    found += _later(sources, machine, known, latest, types=[REASON_TYPE], spans=window)
    found += _later(sources, [plant_aggregate_id(site).hex], known, latest)
    # The ERP's changes, since, of the orders that ran on the machine in the window (the few
    # changed since, checked against their runs).
    changed = sources.audit.touched(ORDER_FIELDS, known.position, latest.position)
    started = sources.facts.orders_started(machine_aggregate_id(site, machine_id), window.end)
    orders = []
    for aggregate in sorted(changed & {order_aggregate_id(site, o).hex for o in started}):
        order = sources.store.load(UUID(aggregate))
        if isinstance(order, Order) and any(
            run.machine_id == machine_id and run.start < window.end
            and (run.end is None or run.end > window.start)
            for run in order_runs(order)
        ):  # fmt: skip
            orders.append(aggregate)
    if orders:
        found += _later(sources, orders, known, latest, types=ORDER_FIELDS)
    unique = {e.position: e for e in found}
    return [unique[p] for p in sorted(unique)]


def _bears_on(event: AuditEvent, start: datetime, end: datetime) -> bool:
    """Whether a fact recorded late may change a bucket from ``start`` to ``end``: a reason
    whose span meets it; a plant configuration in force by its end; an order's fields (its
    ideal cycle time); any other fact dated before its end (a state, a counter reading, an
    order start goes on counting until the next one). Not a program sent: it changes none."""
    data = event.data
    if event.type == PROGRAM_SENT_TYPE:
        return False
    if event.type == REASON_TYPE:
        reason_start = datetime.fromisoformat(str(data["start"]))
        reason_end = datetime.fromisoformat(str(data["end"])) if data.get("end") else None
        return reason_start < end and (reason_end is None or reason_end > start)
    if event.type == PLANT_TYPE:
        # The first configuration applies from the beginning; a later one without a date
        # from when it was recorded (``projections.rules.plant_history``).
        effective = data.get("effective_from")
        if effective is not None:
            return datetime.fromisoformat(str(effective)) < end
        return event.version <= FIRST_CONFIGURATION or (
            event.event_time is not None and event.event_time < end
        )
    if event.type in ORDER_FIELDS:
        return True
    return event.event_time is not None and event.event_time < end


def _changes(later: Sequence[AuditEvent], start: datetime, end: datetime) -> list[ChangeEvent]:
    return [_change(e) for e in later if _bears_on(e, start, end)][: MAX_CHANGES + 1]


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
    # Now, as the views have it: both views up to the same position, as the past one is.
    latest = resolve_known_at(sources, None, now)
    try:
        then = _reports(sources, site, plant, known).machine_oee(
            machine_id, window, group_by, known.moment
        )
        today = _reports(sources, site, plant, latest).machine_oee(
            machine_id, window, group_by, latest.moment
        )
    except UnknownMachine:
        raise UnknownEntity(f"no machine {machine_id!r} at site {site!r}") from None
    later = _machine_changes(sources, site, machine_id, known, latest, window)
    # The buckets of both reports are cut alike (same window, grouping and calendar), unless
    # a calendar change moved a shift: matched by start and label, the others told apart.
    reported = {(b.figures.start, b.figures.end, b.label): b for b in then}
    buckets = []
    for bucket in today:
        before = reported.pop((bucket.figures.start, bucket.figures.end, bucket.label), None)
        as_reported = OeeBucket.of(before) if before is not None else None
        known_now = OeeBucket.of(bucket)
        changes = _changes(later, bucket.figures.start, bucket.figures.end)
        same = as_reported is not None and as_reported.model_dump(
            exclude={"provisional"}
        ) == known_now.model_dump(exclude={"provisional"})
        buckets.append(
            DiffBucket(
                start=bucket.figures.start,
                end=bucket.figures.end,
                label=bucket.label,
                as_reported=as_reported,
                as_known_now=known_now,
                changed=not same,
                changes=changes[:MAX_CHANGES],
                changes_truncated=len(changes) > MAX_CHANGES,
            )
        )
    answer = OeeDiff(
        machine=machine_id,
        group_by=group_by,
        known_at=known.view(),
        now=latest.view(),
        buckets=buckets,
        dropped=[OeeBucket.of(b) for b in reported.values()],
    )
    return answer.model_dump_json().encode()


def read_progress_diff(
    sources: ReadSources, site: str, plant: PlantConfig, order_id: str, known_at: str
) -> bytes:
    now = datetime.now(UTC)
    known = resolve_known_at(sources, known_at, now)
    latest = resolve_known_at(sources, None, now)
    order_now = _order_at(sources, site, order_id, latest)
    order_then = _order_known(sources, site, order_id, known)
    then = None
    if order_then is not None:
        then, _ = _progress_as_of(sources, plant, order_then, known, known.moment)
    today, _ = _progress_as_of(sources, plant, order_now, latest, latest.moment)
    order = [order_aggregate_id(site, order_id).hex]
    later = _later(sources, order, known, latest, types=ORDER_FACTS)
    runs = order_runs(order_now)
    if runs:
        # The machines' facts over the order's runs, and scrap naming it whenever reported
        # (an inspection days after).
        machines = sorted({machine_aggregate_id(site, r.machine_id).hex for r in runs})
        span = Interval(min(r.start for r in runs), max(r.end or now for r in runs))
        nearby = _later(sources, machines, known, latest, span)
        scrap = _later(sources, machines, known, latest, types=[SCRAP_TYPE])
        seen = {e.position for e in later}
        for event in [*nearby, *scrap]:
            if event.position not in seen and _names_order(event, order_id, order_now):
                seen.add(event.position)
                later.append(event)
        later.sort(key=lambda e: e.position)
    changes = [_change(e) for e in later]
    answer = ProgressDiff(
        order_id=order_id,
        known_at=known.view(),
        now=latest.view(),
        as_reported=then,
        as_known_now=today,
        changed=then is None or _figures(then) != _figures(today),
        changes=changes[:MAX_CHANGES],
        changes_truncated=len(changes) > MAX_CHANGES,
    )
    return answer.model_dump_json().encode()


def _figures(progress: OrderProgress) -> tuple[int, int, int, int]:
    return progress.produced, progress.good, progress.bad, progress.scrapped


def _names_order(event: AuditEvent, order_id: str, order: Order) -> bool:
    """A machine fact that bears on the order: one naming it, or one bearing on one of its
    runs (dated before its end, as a state goes on; a reason, overlapping it)."""
    if event.data.get("order_id") == order_id:
        return True
    return any(_bears_on(event, run.start, run.end or FOREVER) for run in order_runs(order))


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
After = Annotated[
    int, Query(ge=0, le=2**63 - 1, description="The cursor: next_after of the page before")
]


def _checked(as_of: datetime | None) -> datetime | None:
    """``as_of`` in UTC, within the years the reports can look a day around."""
    if as_of is None:
        return None
    try:
        moment = as_of.astimezone(UTC)
    except OverflowError:
        moment = EARLIEST
    if not EARLIEST + SCENE <= moment <= LATEST - SCENE:
        raise Problem(422, f"as_of must be between the years {EARLIEST.year} and {LATEST.year - 1}")
    return moment


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
    work, moment = read_machine_as_of, _checked(as_of)
    return await _answer(request, reads, work, site, plant, machine_id, moment, known_at)


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
    work, moment = read_order_as_of, _checked(as_of)
    return await _answer(request, reads, work, site, plant, order_id, moment, known_at)


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
    window = window_of(start, end)
    work = read_oee_diff
    return await _answer(request, reads, work, site, plant, machine, window, group_by, known_at)
