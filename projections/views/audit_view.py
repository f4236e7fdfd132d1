"""The audit log view: one row per stored event — its log position, what it is about, its type,
who sent it, its event time and the moment the hub recorded it — indexed for an auditor's
questions (this machine's or order's history, this actor's, this type's, in this stretch of
event time or recorded time), and the map between positions and recorded times that "as known
at" needs.

The event itself stays in the store: a page of this view names the positions, and the API reads
those events whole (``hub.api.routes.audit``). Every fact the hub stores is listed, the hub's
own included (forecasts, confirmations, delivery attempts, configuration).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from hub.domain import Machine, Order, Plant, Webhooks, actor_of, cloud_event_type
from projections.views.database import Cursor, ViewDatabase, position_of
from projections.views.facts_view import MachineFactsView, from_micros, to_micros

TABLE = "mes_view_audit_log"
ENTITIES = "mes_view_audit_entities"
# What each aggregate is about, as its ``Registered`` event names it.
_KINDS: dict[type, tuple[str, str]] = {
    Machine: ("machine", "machine_id"),
    Order: ("order", "order_id"),
    Plant: ("plant", "site"),
    Webhooks: ("webhooks", "site"),
}
REGISTERED = "registered"  # the type listed for the event that brought an aggregate into being
_COLUMNS = (
    "position, aggregate, version, type, event_id, source, actor_kind, actor_id, actor_role, "
    "event_time, recorded_time"
)


@functools.cache
def audited_classes() -> tuple[type, ...]:
    """Every event class of the hub's aggregates (the library makes most of them from the
    ``@event`` decorators, so they are found rather than named)."""
    found: list[type] = []
    for aggregate in _KINDS:
        for value in vars(aggregate).values():
            if isinstance(value, type) and issubclass(value, Aggregate.Event):
                found.append(value)
    return tuple(found)


def _registered(event: Any) -> tuple[str, str, str] | None:
    """(kind, site, entity id) of an aggregate's first event; None for any other event."""
    for aggregate, (kind, field) in _KINDS.items():
        if isinstance(event, getattr(aggregate, "Registered")):  # noqa: B009
            return kind, event.site, getattr(event, field)
    return None


def _span(event: Any) -> tuple[int | None, int | None]:
    if not isinstance(event, Machine.DowntimeReasonGiven):
        return None, None
    return to_micros(event.start), to_micros(event.end) if event.end is not None else None


class AuditLogView:
    name = "audit_log_v1"

    @property
    def event_classes(self) -> tuple[type, ...]:
        return audited_classes()

    def create(self, cursor: Cursor, dialect: str) -> None:
        key = "INTEGER" if dialect == "sqlite" else "BIGINT"
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (position {key} PRIMARY KEY, "
            "aggregate TEXT NOT NULL, version BIGINT NOT NULL, type TEXT NOT NULL, "
            "event_id TEXT, source TEXT, actor_kind TEXT, actor_id TEXT, actor_role TEXT, "
            "event_time BIGINT, recorded_time BIGINT NOT NULL, recorded_by BIGINT NOT NULL, "
            # A downtime reason's span (start, end: null while open): an OEE diff finds the
            # late reasons that meet its window by these, however late they were given.
            "span_start BIGINT, span_end BIGINT)"
        )
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {ENTITIES} (aggregate TEXT PRIMARY KEY, "
            "kind TEXT NOT NULL, site TEXT NOT NULL, entity TEXT NOT NULL)"
        )

    def create_indexes(self, cursor: Cursor) -> None:
        for name, columns in (
            ("aggregate", "aggregate, position"),
            ("aggregate_time", "aggregate, event_time"),
            ("recorded_by", "recorded_by"),
            ("actor", "actor_id, position"),
            ("type", "type, position"),
            ("event_time", "event_time"),
            ("recorded_time", "recorded_time"),
            ("event_id", "event_id"),
        ):
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE} ({columns})")

    def drop(self, cursor: Cursor) -> None:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"DROP TABLE IF EXISTS {ENTITIES}")

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        rows, entities = [], []
        # "Recorded by": the latest recorded time up to each position. Recorded times are
        # stamped when ingest prepares a batch, so with several partitions they are not in
        # position order; this one is, so "what was known at T" is a prefix of the log.
        cursor.execute(f"SELECT MAX(recorded_by) FROM {TABLE}")
        found = cursor.fetchone()
        recorded_by = int(found[0]) if found and found[0] is not None else 0
        for position, event in events:
            registered = _registered(event)
            if registered is not None:
                entities.append((event.originator_id.hex, *registered))
            actor = actor_of(event) or {}
            event_time = getattr(event, "event_time", None)
            rows.append(
                (
                    position,
                    event.originator_id.hex,
                    event.originator_version,
                    REGISTERED if registered else cloud_event_type(event),
                    getattr(event, "event_id", None),
                    getattr(event, "source", None),
                    actor.get("kind"),
                    actor.get("id"),
                    actor.get("role"),
                    to_micros(event_time) if event_time is not None else None,
                    to_micros(event.timestamp),
                    (recorded_by := max(recorded_by, to_micros(event.timestamp))),
                    *_span(event),
                )
            )
        if rows:
            cursor.executemany(
                f"INSERT INTO {TABLE} ({_COLUMNS}, recorded_by, span_start, span_end) "
                f"VALUES ({', '.join('?' * 14)}) "
                "ON CONFLICT (position) DO NOTHING",
                rows,
            )
        if entities:
            cursor.executemany(
                f"INSERT INTO {ENTITIES} VALUES (?, ?, ?, ?) ON CONFLICT (aggregate) DO NOTHING",
                entities,
            )


@dataclass(frozen=True)
class AuditEntry:
    """One stored event as the audit log lists it."""

    position: int
    aggregate: str  # hex
    version: int
    type: str
    event_id: str | None
    source: str | None
    actor: dict[str, str] | None
    event_time: datetime | None
    recorded_time: datetime
    kind: str | None  # machine, order, plant, webhooks
    entity: str | None  # the machine's or order's id, or the site


@dataclass(frozen=True)
class AuditQuery:
    """What an auditor asks of the log; every part optional. ``aggregates``: the machines' and
    orders' aggregate ids (hex) to keep; ``after``: the cursor (the last position seen)."""

    aggregates: Sequence[str] = ()
    types: Sequence[str] = ()
    actor: str | None = None
    event_from: datetime | None = None
    event_to: datetime | None = None
    recorded_from: datetime | None = None
    recorded_to: datetime | None = None
    after: int = 0
    until: int | None = None  # positions up to this one only
    # Downtime reasons whose span meets this stretch only (other events are not kept).
    spans_meeting: tuple[datetime, datetime] | None = None


class AuditLogReader:
    def __init__(self, db: ViewDatabase) -> None:
        self._db = db

    def page(self, query: AuditQuery, limit: int) -> list[AuditEntry]:
        """Up to ``limit`` entries after ``query.after``, in log order."""
        where: list[str] = ["a.position > ?"]
        params: list[Any] = [query.after]
        if query.until is not None:
            where.append("a.position <= ?")
            params.append(query.until)
        if query.aggregates:
            where.append(f"a.aggregate IN ({', '.join('?' * len(query.aggregates))})")
            params.extend(query.aggregates)
        if query.types:
            where.append(f"a.type IN ({', '.join('?' * len(query.types))})")
            params.extend(query.types)
        if query.actor is not None:
            where.append("a.actor_id = ?")
            params.append(query.actor)
        for column, bound, operator in (
            ("event_time", query.event_from, ">="),
            ("event_time", query.event_to, "<"),
            ("recorded_time", query.recorded_from, ">="),
            ("recorded_time", query.recorded_to, "<"),
        ):
            if bound is not None:
                where.append(f"a.{column} {operator} ?")
                params.append(to_micros(bound))
        if query.spans_meeting is not None:
            start, end = query.spans_meeting
            where.append("a.span_start < ? AND (a.span_end IS NULL OR a.span_end > ?)")
            params += [to_micros(end), to_micros(start)]
        sql = (
            f"SELECT {', '.join('a.' + c.strip() for c in _COLUMNS.split(','))}, e.kind, "
            f"e.entity FROM {TABLE} a LEFT JOIN {ENTITIES} e ON e.aggregate = a.aggregate "
            f"WHERE {' AND '.join(where)} ORDER BY a.position LIMIT {int(limit)}"
        )
        with self._db.transaction(write=False) as cursor:
            cursor.execute(sql, params)
            return [_entry(row) for row in cursor.fetchall()]

    def known_up_to(self) -> int:
        """The log position both this view and the machine facts view have read up to: what
        an answer made of the two may speak for."""
        with self._db.transaction(write=False) as cursor:
            return min(
                position_of(cursor, AuditLogView.name), position_of(cursor, MachineFactsView.name)
            )

    def ahead_of_me(self, view: str) -> bool:
        """Whether ``view`` has read further than this one (one rebuilt alone, catching up):
        what it holds past this one's position is not indexed here yet."""
        with self._db.transaction(write=False) as cursor:
            return position_of(cursor, view) > position_of(cursor, AuditLogView.name)

    def position_at(self, recorded: datetime) -> int:
        """The last position recorded at or before ``recorded`` (0: none)."""
        with self._db.transaction(write=False) as cursor:
            # (On the index: the last position all of whose log was recorded by then.)
            cursor.execute(
                f"SELECT position FROM {TABLE} WHERE recorded_by <= ? "
                "ORDER BY recorded_by DESC, position DESC LIMIT 1",
                (to_micros(recorded),),
            )
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def recorded_at(self, position: int) -> datetime | None:
        """When the hub recorded the event at ``position`` or the last one before it."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT recorded_time FROM {TABLE} WHERE position <= ? "
                "ORDER BY position DESC LIMIT 1",
                (position,),
            )
            row = cursor.fetchone()
        return from_micros(int(row[0])) if row else None

    def version_at(self, aggregate: str, position: int) -> int:
        """The aggregate's version as of ``position`` (0: it did not exist yet)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT version FROM {TABLE} WHERE aggregate = ? AND position <= ? "
                "ORDER BY position DESC LIMIT 1",
                (aggregate, position),
            )
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def touched(self, types: Sequence[str], after: int, until: int) -> set[str]:
        """The aggregates (hex) with an event of ``types`` stored after ``after`` up to
        ``until`` (on the index by type and position: the few since, not the whole log)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT DISTINCT aggregate FROM {TABLE} WHERE type IN "
                f"({', '.join('?' * len(types))}) AND position > ? AND position <= ?",
                (*types, after, until),
            )
            return {str(row[0]) for row in cursor.fetchall()}

    def positions_of(self, event_id: str) -> list[int]:
        """Where the events of one CloudEvent id are stored (an order's start is stored on
        the machine and on the order)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT position FROM {TABLE} WHERE event_id = ? ORDER BY position", (event_id,)
            )
            return [int(row[0]) for row in cursor.fetchall()]


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    actor = None
    if row[7] is not None:
        actor = {"kind": row[6], "id": row[7]}
        if row[8] is not None:
            actor["role"] = row[8]
    return AuditEntry(
        position=int(row[0]),
        aggregate=row[1],
        version=int(row[2]),
        type=row[3],
        event_id=row[4],
        source=row[5],
        actor=actor,
        event_time=from_micros(int(row[9])) if row[9] is not None else None,
        recorded_time=from_micros(int(row[10])),
        kind=row[11],
        entity=row[12],
    )
