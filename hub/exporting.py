"""Stored events back to the CloudEvents the hub received (the replay export), and an export
read back for an import (docs/replay.md).

Ingest (``hub.ingest.Ingestor._apply``) turns each CloudEvent into one stored event — two for an
operator's order start or end, on the machine and on the order — keeping its id, source, event
time and everything its data says. ``cloud_event_of`` is the reverse, case by case: applying the
CloudEvent it gives stores the same fields again. Each exported CloudEvent carries, as extension
attributes, where and when it was stored (``mesposition``, ``mesrecordedtime``), its site
(``messite``: the site is in the NATS subject, not in the CloudEvent) and its actor
(``mesactorkind``, ``mesactorid``, ``mesactorrole``) when it has one.

Errors::

    MesHubError
    └── ExportError       a stored event with no CloudEvent to give (a reverse is missing or
                          it no longer passes its contract), or an export line that is not one
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from pydantic import ValidationError

from contracts import (
    ACTOR_ID,
    ACTOR_KIND,
    ACTOR_ROLE,
    EVENT_TYPES,
    CloudEvent,
    ContractViolation,
    OrderChangedV1,
    encode_event,
    validate_envelope,
)
from hub.domain import Machine, Order, Plant, Webhooks, actor_of
from hub.errors import MesHubError
from hub.store import Entity

# Extension attributes of an export (lower-case letters and digits: CloudEvents 1.0, 3.1.1).
POSITION = "mesposition"  # the stored event's position in the log
RECORDED_TIME = "mesrecordedtime"  # when the hub stored it (RFC 3339)
SITE = "messite"  # the site (the first token after ``mes.`` of its NATS subject)
# What an import drops before publishing: the new hub records its own positions and times, and
# the site goes into the NATS subject. The actor attributes stay (ingest takes them from the
# hub's signed publisher).
WHERE_STORED = (POSITION, RECORDED_TIME, SITE)
# A CloudEvents Integer is 32-bit: a position past it is written as a string.
_INTEGER_MAX = 2**31 - 1


class ExportError(MesHubError):
    """A stored event that cannot be exported, or an export line that cannot be imported."""


# --- one stored event -> its CloudEvent ---------------------------------------------------------

# (type, subject, data) of one stored event, given the entity it belongs to.
Reverse = Callable[[Any, Entity], tuple[str, str, dict[str, Any]]]


def _fields(event: Any, names: Iterable[str]) -> dict[str, Any]:
    # (``__dict__``: fields added since some events were stored are absent from those.)
    return {name: event.__dict__.get(name) for name in names}


def _machine(type_name: str, *names: str) -> Reverse:
    """A machine's or operator's event: the subject is the machine, the data its fields."""

    def reverse(event: Any, entity: Entity) -> tuple[str, str, dict[str, Any]]:
        return type_name, entity.entity_id, _fields(event, names)

    return reverse


def _order(type_name: str, name: str, drop: tuple[str, ...] = ()) -> Reverse:
    """An order's event whose data ingest kept whole (less the order id) in field ``name``;
    ``drop``: what ingest added to it."""

    def reverse(event: Any, entity: Entity) -> tuple[str, str, dict[str, Any]]:
        kept = {k: v for k, v in dict(getattr(event, name)).items() if k not in drop}
        return type_name, entity.entity_id, {"order_id": entity.entity_id, **kept}

    return reverse


def _order_cancelled(event: Any, entity: Entity) -> tuple[str, str, dict[str, Any]]:
    data = {"order_id": entity.entity_id, "reason": event.reason}
    return "mes.erp.order.cancelled.v1", entity.entity_id, data


def _plant_configured(event: Any, entity: Entity) -> tuple[str, str, dict[str, Any]]:
    data = {"plant": event.config, "effective_from": event.effective_from}
    return "mes.hub.plant.configured.v1", entity.entity_id, data  # (the plant's id: its site)


def _webhooks_changed(event: Any, entity: Entity) -> tuple[str, str, dict[str, Any]]:
    return "mes.hub.webhooks.changed.v1", entity.entity_id, dict(event.change)


def _made(aggregate: type[Any], name: str) -> type[Any]:
    """An event class the library makes from a decorated method (``@event("Released")``):
    there at run time, unknown to the type checker."""
    found: type[Any] = getattr(aggregate, name)
    return found


REVERSES: dict[type[Any], Reverse] = {
    Machine.AvailabilityReported: _machine("mes.machine.availability.v1", "availability"),
    Machine.ExecutionReported: _machine("mes.machine.execution.v1", "execution", "mode", "program"),
    # (Counter readings stored before counting moved to the projections carry decisions too:
    # ``increment``, ``reset``…; the CloudEvent had only these.)
    Machine.PartCountReported: _machine("mes.machine.partcount.v1", "count", "kind"),
    Machine.ConditionReported: _machine(
        "mes.machine.condition.v1", "level", "native_code", "message"
    ),
    Machine.DowntimeReasonGiven: _machine(
        "mes.operator.downtime_reason.v1", "reason", "start", "end", "operator", "note"
    ),
    Machine.OrderStarted: _machine("mes.operator.order_started.v1", "order_id"),
    Machine.OrderEnded: _machine("mes.operator.order_ended.v1", "order_id"),
    Machine.ScrapReported: _machine("mes.operator.scrap.v1", "order_id", "quantity", "reason"),
    Machine.ProgramSent: _machine(
        "mes.machine.program_sent.v1",
        "program",
        "file",
        "sha256",
        "size_bytes",
        "sent_bytes",
        "outcome",
        "started_at",
        "port",
        "sent_by",
        "message",
    ),
    _made(Order, "Released"): _order("mes.erp.order.released.v1", "fields"),
    _made(Order, "Changed"): _order("mes.erp.order.changed.v1", "fields"),
    _made(Order, "Cancelled"): _order_cancelled,
    _made(Order, "DeliveryForecastChanged"): _order(
        "mes.hub.delivery_forecast.changed.v1", "forecast"
    ),
    _made(Order, "Progressed"): _order("mes.hub.order.progressed.v1", "progress"),
    _made(Order, "ConfirmationDue"): _order(
        "mes.hub.order.confirmation_due.v1", "confirmation", drop=("site", "decided_at")
    ),
    _made(Order, "WebhookDue"): _order("mes.hub.webhook.due.v1", "webhook", drop=("site",)),
    _made(Order, "DeliveryAttempted"): _order("mes.hub.delivery.attempted.v1", "attempt"),
    _made(Plant, "Configured"): _plant_configured,
    _made(Webhooks, "Changed"): _webhooks_changed,
}
# Stored events that are no CloudEvent of their own: an aggregate's creation, and the order's
# half of an operator's start or end (its CloudEvent is exported once, with the machine's).
NOT_CLOUD_EVENTS: frozenset[type[Any]] = frozenset(
    [_made(a, "Registered") for a in (Machine, Order, Plant, Webhooks)]
    + [_made(Order, "Started"), _made(Order, "Ended")]
)


def _without_unset(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the optional fields that are None by default, as a producer leaves
    them out; applying it again gives the same fields. Not for an order change: there a field
    given as null is a change (to nothing), one left out is none."""
    model = EVENT_TYPES[type_name].data_model
    if model is OrderChangedV1:
        return data
    fields = model.model_fields
    return {
        k: v
        for k, v in data.items()
        if not (v is None and k in fields and not fields[k].is_required())
    }


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def cloud_event_of(event: Any, entity: Entity, position: int) -> CloudEvent | None:
    """The CloudEvent ingest applied to store ``event`` (of ``entity``, at ``position``), with
    the export's extension attributes; None for a stored event that is none
    (``NOT_CLOUD_EVENTS``). Raises ``ExportError`` for an event with no reverse, or whose
    CloudEvent no longer passes its contract."""
    kind = type(event)
    if kind in NOT_CLOUD_EVENTS:
        return None
    reverse = REVERSES.get(kind)
    if reverse is None:
        raise ExportError(f"position {position}: no CloudEvent known for {kind.__qualname__}")
    type_name, subject, data = reverse(event, entity)
    extensions: dict[str, Any] = {
        POSITION: position if position <= _INTEGER_MAX else str(position),
        RECORDED_TIME: rfc3339(event.timestamp),
        SITE: entity.site,
    }
    actor = actor_of(event)
    if actor is not None:
        extensions[ACTOR_KIND] = str(actor.get("kind", ""))
        extensions[ACTOR_ID] = str(actor.get("id", ""))
        if actor.get("role") is not None:
            extensions[ACTOR_ROLE] = str(actor["role"])
    try:
        cloud_event = CloudEvent(
            specversion="1.0",
            id=event.event_id,
            source=event.source,
            type=type_name,
            time=event.event_time,
            subject=subject,
            data=_without_unset(type_name, data),
            **extensions,
        )
        # The data as its type's contract says (raises as ingest would refuse it).
        validate_envelope(cloud_event)
    except (ValidationError, ContractViolation) as refused:
        raise ExportError(
            f"position {position} ({kind.__qualname__}): its CloudEvent does not pass the "
            f"contract: {refused}"
        ) from None
    return cloud_event


# --- the log -> an export ----------------------------------------------------------------------


class ExportLog(Protocol):
    """What the export reads of the store (``hub.store.EventStore``)."""

    def read_log(self, after: int, limit: int) -> list[tuple[int, Any]]: ...

    def entities(self) -> list[Entity]: ...

    def last_position(self) -> int: ...


@dataclass(frozen=True)
class Selection:
    """Which stored events to export: positions ``first`` to ``last`` (both included; None:
    the end of the log when the export begins) recorded from ``since`` (included) until
    ``until`` (excluded)."""

    first: int = 1
    last: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def takes(self, recorded: datetime) -> bool:
        return (self.since is None or recorded >= self.since) and (
            self.until is None or recorded < self.until
        )


@dataclass
class ExportStats:
    read: int = 0  # stored events read
    exported: int = 0
    not_cloud_events: int = 0  # registrations, the order's half of a start or end
    outside: int = 0  # recorded outside the selection's times
    position: int = 0  # the last read
    last: int = 0  # where the export ends
    sites: set[str] = field(default_factory=set)


def exported_events(
    log: ExportLog,
    selection: Selection,
    stats: ExportStats,
    batch: int = 1000,
    on_batch: Callable[[ExportStats], None] | None = None,
) -> Iterator[CloudEvent]:
    """The selected stored events as CloudEvents, in log order (``stats`` follows the way;
    ``on_batch`` is told after each batch read, for a progress bar)."""
    # The end first, then the entities: everything stored up to that end has its entity
    # (written in the same transaction), so a hub that runs meanwhile changes nothing here.
    end = log.last_position()
    last = end if selection.last is None else min(selection.last, end)
    stats.last = last
    where: dict[UUID, Entity] = {e.aggregate_id: e for e in log.entities()}
    after = max(selection.first - 1, 0)
    stats.position = after
    while after < last:
        rows = log.read_log(after, batch)
        if not rows:
            return
        for position, event in rows:
            if position > last:
                return
            stats.position = position
            stats.read += 1
            entity = where.get(event.originator_id)
            if entity is None:  # (not an aggregate ingest keeps: no CloudEvent made it)
                stats.not_cloud_events += 1
                continue
            if not selection.takes(event.timestamp):
                stats.outside += 1
                continue
            cloud_event = cloud_event_of(event, entity, position)
            if cloud_event is None:
                stats.not_cloud_events += 1
                continue
            stats.exported += 1
            stats.sites.add(entity.site)
            yield cloud_event
        after = rows[-1][0]
        if on_batch is not None:
            on_batch(stats)


def export_line(event: CloudEvent) -> bytes:
    """One line of an export (JSON Lines): the CloudEvent in JSON structured mode."""
    return encode_event(event) + b"\n"


# --- an export -> CloudEvents to publish ---------------------------------------------------------


@dataclass(frozen=True)
class ToImport:
    """One line of an export, ready to publish: its site (None: not said) and original
    position, and the CloudEvent without ``WHERE_STORED``."""

    line: int
    site: str | None
    position: int | None
    event: CloudEvent


def events_to_import(lines: Iterable[bytes]) -> Iterator[ToImport]:
    """The CloudEvents of an export's lines (blank lines skipped). Raises ``ExportError``
    naming the line of one that is not a CloudEvent its contract takes."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            site = document.pop(SITE, None)
            position = document.pop(POSITION, None)
            document.pop(RECORDED_TIME, None)
            event = CloudEvent.model_validate(document)
            validate_envelope(event)
            if position is not None and (
                isinstance(position, bool) or not isinstance(position, int)
            ):
                raise ValueError(f"{POSITION} must be an integer, not {position!r}")
        except (ValueError, ContractViolation) as refused:  # (ValidationError is a ValueError)
            raise ExportError(f"line {number}: not a CloudEvent to import: {refused}") from None
        yield ToImport(number, str(site) if site is not None else None, position, event)
