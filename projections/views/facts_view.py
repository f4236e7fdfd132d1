"""The machine facts view: every machine fact the timeline, OEE and order progress need, one row
per stored event, indexed by machine and event time (and by order for parts and scrap).

Counter readings are kept as read (one ``reading`` row each); what they add is decided when
they are read back (``projections.rules.counters``), so a late reading takes its share.

A query for a window reads only that window's facts plus the few that set the scene (the last
availability and execution before it, the two counter readings before it, the machine's order
starts and ends, the reasons that overlap it, its first report), instead of the machine's whole
history. A reason with no end that began before the window comes only if the machine has not
run since, and then with the machine's reports from its start on (``_open_reasons``). What it
returns, settled, is what ``projections.rules.history.machine_facts`` makes of the whole
history, for that window. When a machine ran is read from its availability and execution
reports alone (``states``), as the API's check of a downtime reason does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any
from uuid import UUID

from hub.domain import Machine, machine_aggregate_id
from projections.rules.calendar import Interval
from projections.rules.counters import (
    CONTEXT,
    IMPLAUSIBLE,
    RESET,
    CounterReading,
    CounterStep,
    CounterTotals,
    fold_counts,
    reading_order,
)
from projections.rules.history import MachineFacts, order_reports
from projections.rules.oee import ScrapReport
from projections.rules.plant import PlantConfig
from projections.rules.progress import Run
from projections.rules.report import facts_window
from projections.rules.timeline import ReasonReport, StateReport, first_run
from projections.views.database import Cursor, ViewDatabase

# v2: counter readings as read (v1 kept increments decided at arrival); a new name, so a hub
# upgraded from v1 builds it from the store.
TABLE = "mes_view_machine_facts_v2"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(time: datetime) -> int:
    """Event time as integer microseconds since the epoch: exact, and ordered by the index."""
    return (time - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


# kinds of fact
AVAILABILITY, EXECUTION, SCRAP, ORDER_START, ORDER_END, REASON = (
    "availability",
    "execution",
    "scrap",
    "order_start",
    "order_end",
    "reason",
)
# A counter reading's kind names its counter, so the index finds the last ones of each.
READINGS = {"all": "reading_all", "bad": "reading_bad"}
_COLUMNS = "position, machine, kind, time, value, program, quantity, order_id, end_time, given_at"


def _row(position: int, event: Any) -> tuple[Any, ...] | None:
    """The fact row of one stored machine event (None: nothing the views need)."""
    machine = event.originator_id.hex
    time = to_micros(event.event_time)
    match event:
        case Machine.AvailabilityReported():
            return (position, machine, AVAILABILITY, time, event.availability, *[None] * 5)
        case Machine.ExecutionReported():
            return (position, machine, EXECUTION, time, event.execution, event.program, *[None] * 4)
        case Machine.PartCountReported():
            return (position, machine, READINGS[event.kind], time, event.kind, None,
                    event.count, None, None, None)  # fmt: skip
        case Machine.ScrapReported():
            return (position, machine, SCRAP, time, None, None, event.quantity, event.order_id,
                    None, None)  # fmt: skip
        case Machine.OrderStarted():
            return (position, machine, ORDER_START, time, event.order_id, *[None] * 5)
        case Machine.OrderEnded():
            return (position, machine, ORDER_END, time, event.order_id, *[None] * 5)
        case Machine.DowntimeReasonGiven():
            end = to_micros(event.end) if event.end is not None else None
            return (position, machine, REASON, to_micros(event.start), event.reason, None, None,
                    None, end, time)  # fmt: skip
    return None


class MachineFactsView:
    """The projection: how the table is made, and what each event adds to it."""

    name = "machine_facts_v2"
    event_classes: tuple[type, ...] = (
        Machine.AvailabilityReported,
        Machine.ExecutionReported,
        Machine.PartCountReported,
        Machine.ScrapReported,
        Machine.OrderStarted,
        Machine.OrderEnded,
        Machine.DowntimeReasonGiven,
    )

    def create(self, cursor: Cursor, dialect: str) -> None:
        # SQLite: INTEGER PRIMARY KEY is the rowid itself (no second index); PostgreSQL: 64 bits.
        key = "INTEGER" if dialect == "sqlite" else "BIGINT"
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (position {key} PRIMARY KEY, "
            "machine TEXT NOT NULL, kind TEXT NOT NULL, time BIGINT NOT NULL, value TEXT, "
            "program TEXT, quantity BIGINT, order_id TEXT, end_time BIGINT, given_at BIGINT)"
        )

    def create_indexes(self, cursor: Cursor) -> None:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {TABLE}_by_time ON {TABLE} (machine, kind, time)"
        )
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_by_order ON {TABLE} (order_id)")
        # The readings stored since a machine's counters were last read (``counter_totals``):
        # one small index per counter kind.
        for tag in READINGS.values():
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {TABLE}_{tag}_since ON {TABLE} "
                f"(machine, position) WHERE kind = '{tag}'"
            )
        # The last program before a window, found without walking back through every execution
        # of a machine that never reports one (PLCs). The kind is a column too: with the same
        # columns as the index by time SQLite takes this smaller, partial one (with one column
        # fewer it took the index by time and walked back through every execution).
        cursor.execute(f"DROP INDEX IF EXISTS {TABLE}_programs")
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {TABLE}_programs_by_kind ON {TABLE} (machine, kind, time) "
            "WHERE kind = 'execution' AND program IS NOT NULL"
        )
        # The reasons a window needs, without reading every reason the machine ever had: those
        # with an end by where they end, those without one by where they start (``window``,
        # ``_open_reasons``). ``end_time IS NULL`` is an equality on it, so SQLite takes it over
        # the index by time, and finds the open reasons before a window without walking back
        # through the closed ones.
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {TABLE}_reasons ON {TABLE} "
            "(machine, kind, end_time, time) WHERE kind = 'reason'"
        )

    def drop(self, cursor: Cursor) -> None:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        rows = [row for position, event in events if (row := _row(position, event)) is not None]
        if rows:
            # A row per stored event, keyed by its position: applying a batch twice (a rebuild
            # racing the live worker) changes nothing.
            cursor.executemany(
                f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES ({', '.join('?' * 10)}) "
                "ON CONFLICT (position) DO NOTHING",
                rows,
            )


class FactsReader:
    """Queries on the view, answered as ``MachineFacts``."""

    def __init__(self, db: ViewDatabase, known_at: int | None = None) -> None:
        self._db = db
        # Only the facts stored up to this log position (``as_known_at``), in every query.
        self.known_at = known_at
        self._upto = "" if known_at is None else f" AND position <= {int(known_at)}"
        # What each counter added up to, and how far it was read (see ``counter_totals``).
        self._counters: dict[tuple[str, str, int], _Counter] = {}
        self._lock = threading.Lock()

    def as_known_at(self, position: int) -> FactsReader:
        """This view as it stood when the log ended at ``position``: every answer is made of
        the facts stored up to it only (a late reason or reading stored after it is not
        there). A filter on each fact's position, not a replay."""
        return FactsReader(self._db, known_at=position)

    def window(self, machine: UUID, window: Interval, parts_only: bool = False) -> MachineFacts:
        """The raw facts that decide the machine's timeline, parts and scrap within ``window``
        (settle them with the machine's rules before use). ``parts_only``: only what decides
        the parts and scrap and the orders they belong to (no timeline: half the queries, for
        the production confirmations)."""
        key, start, end = machine.hex, to_micros(window.start), to_micros(window.end)
        select = f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ? AND kind = ?{self._upto}"
        latest = " AND time < ? ORDER BY time DESC, position DESC LIMIT 1"
        with self._db.transaction(write=False) as cursor:
            rows: list[tuple[Any, ...]] = []

            def fetch(sql: str, *params: Any) -> None:
                cursor.execute(sql, params)
                rows.extend(cursor.fetchall())

            if not parts_only:
                # What the machine was doing when the window opened, then what happened in it.
                fetch(select + latest, key, AVAILABILITY, start)
                fetch(select + latest, key, EXECUTION, start)
                # Literal kind, so the planner can use the partial index on programs.
                programs = (
                    f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ? AND kind = 'execution' "
                    f"AND program IS NOT NULL{self._upto}"
                )
                fetch(programs + latest, key, start)
            # The readings that decide what the window's first readings add.
            for kind in READINGS.values():
                fetch(
                    select + f" AND time <= ? ORDER BY time DESC, quantity DESC LIMIT {CONTEXT}",
                    key,
                    kind,
                    start,
                )
                fetch(select + " AND time > ? AND time <= ?", key, kind, start, end)
            for kind in (SCRAP,) if parts_only else (AVAILABILITY, EXECUTION, SCRAP):
                fetch(select + " AND time >= ? AND time <= ?", key, kind, start, end)
            # Which order runs is a fold over all the machine's order starts and ends.
            for kind in (ORDER_START, ORDER_END):
                fetch(select + " AND time <= ?", key, kind, end)
            if not parts_only:
                # The reasons that overlap the window, the kind written out so that the planner
                # can use the partial index of reasons: those with an end, by where they end;
                # those without one that start in it; those without one that started before it
                # and still go on when it opens, with the reports that decide where they end.
                reasons = f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ? AND kind = 'reason'"
                fetch(
                    reasons + f" AND end_time IS NOT NULL{self._upto} AND end_time > ? "
                    "AND time <= ?",
                    key,
                    start,
                    end,
                )
                fetch(
                    reasons + f" AND end_time IS NULL{self._upto} AND time >= ? AND time <= ?",
                    key,
                    start,
                    end,
                )
                rows.extend(_open_reasons(cursor, key, start, self._upto))
            first = None if parts_only else _first_report(cursor, key, self._upto)
        facts = _facts(rows)
        facts.first_report = first
        facts.scrap = [s for s in facts.scrap if s.time <= window.end]
        return facts

    def states(self, machine: UUID, window: Interval) -> list[StateReport]:
        """The machine's availability and execution reports in ``window`` (both ends
        included), after the last of each kind before it: all that says whether it ran
        (``running_stretches``), without its counter readings, orders or reasons. In event-time
        order, those of one moment in the order they were stored."""
        key, start, end = machine.hex, to_micros(window.start), to_micros(window.end)
        select = f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ? AND kind = ?{self._upto}"
        rows: list[tuple[Any, ...]] = []
        with self._db.transaction(write=False) as cursor:
            for kind in (AVAILABILITY, EXECUTION):
                cursor.execute(
                    select + " AND time < ? ORDER BY time DESC, position DESC LIMIT 1",
                    (key, kind, start),
                )
                rows.extend(cursor.fetchall())
                cursor.execute(select + " AND time >= ? AND time <= ?", (key, kind, start, end))
                rows.extend(cursor.fetchall())
        return _facts(rows).states

    def order_scrap(self, order_id: str) -> dict[str, list[ScrapReport]]:
        """Scrap reported naming the order, whenever it was reported, by machine (aggregate id
        hex): an inspection may find it days after the order ran."""
        return self.orders_scrap([order_id]).get(order_id, {})

    def orders_scrap(self, order_ids: Sequence[str]) -> dict[str, dict[str, list[ScrapReport]]]:
        """``order_scrap`` of each of ``order_ids`` (those with scrap), in a few queries."""
        found: dict[str, dict[str, list[ScrapReport]]] = {}
        unique = sorted(set(order_ids))
        with self._db.transaction(write=False) as cursor:
            for first in range(0, len(unique), 500):
                chunk = unique[first : first + 500]
                cursor.execute(
                    f"SELECT {_COLUMNS} FROM {TABLE} WHERE kind = ?{self._upto} "
                    f"AND order_id IN ({', '.join('?' * len(chunk))})",
                    (SCRAP, *chunk),
                )
                for row in cursor.fetchall():
                    order_id = str(row[7])
                    found.setdefault(order_id, {}).setdefault(row[1], []).append(
                        ScrapReport(from_micros(row[3]), row[6], order_id)
                    )
        return found

    def orders_started(self, machine: UUID, before: datetime) -> set[str]:
        """The orders ever started on the machine before ``before`` (event time)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT DISTINCT value FROM {TABLE} WHERE machine = ? AND kind = ? AND time < ?"
                + self._upto,
                (machine.hex, ORDER_START, to_micros(before)),
            )
            return {str(row[0]) for row in cursor.fetchall()}

    def current_order(self, machine: UUID) -> str | None:
        """The order the machine runs now, by event time (the fold over its starts and ends)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT time, value, kind FROM {TABLE} WHERE machine = ? AND kind IN (?, ?)"
                + self._upto,
                (machine.hex, ORDER_START, ORDER_END),
            )
            rows = cursor.fetchall()
        reports = order_reports(
            (from_micros(time), order_id, kind == ORDER_START) for time, order_id, kind in rows
        )
        return reports[-1].order_id if reports else None

    def counter_totals(self, machine: UUID, max_per_reading: int) -> CounterTotals:
        """What the machine's counters add over its whole history. The first call folds every
        reading (in event-time order, from the index, as plain integers); later calls fold only
        the readings stored since, when they all come after the last one by event time, and
        fold everything again when a late reading arrived."""
        totals = CounterTotals()
        with self._db.transaction(write=False) as cursor:
            for kind, tag in READINGS.items():
                key = (machine.hex, tag, max_per_reading)
                with self._lock:
                    known = self._counters.get(key)
                counter = _counter_since(
                    cursor, machine.hex, tag, max_per_reading, known, self._upto
                )
                with self._lock:
                    self._counters[key] = counter
                    if len(self._counters) > _COUNTER_CACHE:
                        self._counters.pop(next(iter(self._counters)))
                totals.count_many(kind, counter.added, counter.resets, counter.implausible)
                jump = counter.last_implausible
                if jump is not None:
                    time, count, before = jump
                    reading = CounterReading(from_micros(time), kind, count)
                    mine = totals.last_implausible
                    if mine is None or reading_order(reading) > reading_order(mine.reading):
                        totals.last_implausible = CounterStep(reading, 0, IMPLAUSIBLE, before)
        return totals


_COUNTER_CACHE = 20_000  # counters remembered by a reader (two per machine)


@dataclass(frozen=True)
class _Counter:
    """One counter's fold over its readings up to ``position``: the sums, the last implausible
    reading (time, count, compared with), and the last two readings (time, count) by event
    time, which decide what the next readings add."""

    position: int
    added: int
    resets: int
    implausible: int
    last_implausible: tuple[int, int, int | None] | None
    tail: tuple[tuple[int, int], ...]


def _counter_since(
    cursor: Cursor, machine: str, tag: str, limit: int, known: _Counter | None, upto: str = ""
) -> _Counter:
    # The kind written out (one of ours, not input), so the planner can use the partial index.
    select = (
        f"SELECT position, time, quantity FROM {TABLE} WHERE machine = ? AND kind = '{tag}'{upto}"
    )
    if known is not None:
        cursor.execute(select + " AND position > ?", (machine, known.position))
        fresh = sorted(cursor.fetchall(), key=lambda row: (row[1], row[2]))
        if not fresh:
            return known
        first = (fresh[0][1], fresh[0][2])
        if not known.tail or first >= known.tail[-1]:
            # Every new reading comes after the known ones: fold them on from the tail.
            return _fold(fresh, limit, known)
    cursor.execute(select + " ORDER BY time, quantity", (machine,))
    return _fold(cursor.fetchall(), limit, None)


def _fold(rows: list[tuple[Any, ...]], limit: int, known: _Counter | None) -> _Counter:
    tail = list(known.tail) if known is not None else []
    counts = [count for _, count in tail] + [count for _, _, count in rows]
    added = known.added if known is not None else 0
    resets = known.resets if known is not None else 0
    implausible = known.implausible if known is not None else 0
    jump = known.last_implausible if known is not None else None
    for i, (step, status, before) in enumerate(fold_counts(counts, limit)):
        if i < len(tail):
            continue  # the tail's own steps are already counted
        added += step
        resets += status == RESET
        if status == IMPLAUSIBLE:
            implausible += 1
            _, time, count = rows[i - len(tail)]
            jump = (time, count, before)
    position = max([row[0] for row in rows] + [known.position if known else 0])
    readings = tail + [(time, count) for _, time, count in rows]
    return _Counter(position, added, resets, implausible, jump, tuple(readings[-CONTEXT:]))


# Reports read at a time (per kind) while looking for where an open reason ended: the first
# page is small (the machine usually runs again soon after), the next ones larger.
_FIRST_PAGE, _LAST_PAGE = 50, 2000
# Reasons without an end read at a time, latest start first, while looking for those still
# going on when a window opens (``_open_reasons``): usually the first page ends the search.
_REASON_PAGE = 20


def _open_reasons(
    cursor: Cursor, machine: str, start: int, upto: str = ""
) -> list[tuple[Any, ...]]:
    """The rows of the reasons with no end that started before ``start`` and still go on at
    it, with the report rows that decide where they end. A reason with no end ends where the
    machine next runs (``first_run``): one that started before the window and was ended by a
    run before it labels nothing in the window and is left out; one still going on when the
    window opens comes with the machine's reports from its start on (the last availability and
    execution at its start, every report after it), so that the timeline finds the end the
    whole history gives. Reasons are read latest start first, a page at a time on the index of
    reasons, each moment's whole: once one ran out before the window, every one that started
    before it did too, and the reading stops there (not at the machine's first reason)."""
    select = (
        f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ? AND kind = 'reason' "
        f"AND end_time IS NULL{upto}"
    )
    found: list[tuple[Any, ...]] = []
    upper = before = start
    while True:
        cursor.execute(
            select + f" AND time < ? ORDER BY time DESC, position DESC LIMIT {_REASON_PAGE}",
            (machine, before),
        )
        page = cursor.fetchall()
        if not page:
            return found
        last = page[-1][3]
        if len(page) == _REASON_PAGE:
            # The page may cut the reasons of its last moment: that moment's, all of them.
            cursor.execute(select + " AND time = ?", (machine, last))
            page = [row for row in page if row[3] != last] + cursor.fetchall()
        for begin in sorted({row[3] for row in page}, reverse=True):
            reports, ran = _reports_until_run(cursor, machine, begin, upper, upto)
            if ran:
                return found
            # Nothing ran from ``begin`` to the window: its reasons are still open.
            found.extend(reports)
            found.extend(row for row in page if row[3] == begin)
            upper = begin
        if len(page) < _REASON_PAGE:
            return found
        before = last


def _reports_until_run(
    cursor: Cursor, machine: str, begin: int, upper: int, upto: str
) -> tuple[list[tuple[Any, ...]], bool]:
    """The machine's availability and execution rows from ``begin`` (the last of each at it,
    then those after it) up to the first moment it runs or to ``upper`` (not included), and
    whether it ran in that stretch. Read a page at a time, on the index of each kind, each
    moment's reports whole."""
    select = f"SELECT {_COLUMNS} FROM {TABLE} WHERE machine = ?{upto} AND "
    found: list[tuple[Any, ...]] = []
    for kind in (AVAILABILITY, EXECUTION):
        cursor.execute(
            select + "kind = ? AND time <= ? ORDER BY time DESC, position DESC LIMIT 1",
            (machine, kind, begin),
        )
        found.extend(cursor.fetchall())
    after, size = begin, _FIRST_PAGE
    while True:
        page: list[tuple[Any, ...]] = []
        cut = None  # a kind's page was full: what comes after its last moment is still unread
        for kind in (AVAILABILITY, EXECUTION):
            cursor.execute(
                select + f"kind = ? AND time > ? AND time < ? ORDER BY time, position LIMIT {size}",
                (machine, kind, after, upper),
            )
            rows = cursor.fetchall()
            page.extend(rows)
            if len(rows) == size:
                cut = rows[-1][3] if cut is None else min(cut, rows[-1][3])
        if cut is not None:
            # Both kinds are whole before ``cut``; at ``cut``, all of its reports.
            page = [row for row in page if row[3] < cut]
            cursor.execute(
                select + "kind IN (?, ?) AND time = ? ORDER BY position",
                (machine, AVAILABILITY, EXECUTION, cut),
            )
            page.extend(cursor.fetchall())
            after, size = cut, min(2 * size, _LAST_PAGE)
        found.extend(page)
        run = first_run(_facts(found).states, from_micros(begin))
        if run is not None and to_micros(run) < upper:
            return found, True
        if cut is None:
            return found, False


def _first_report(cursor: Cursor, machine: str, upto: str = "") -> datetime | None:
    """The machine's first report by event time: its first availability, execution or
    counter reading (each found on the index)."""
    times = []
    for kind in (AVAILABILITY, EXECUTION, *READINGS.values()):
        cursor.execute(
            f"SELECT MIN(time) FROM {TABLE} WHERE machine = ? AND kind = ?{upto}", (machine, kind)
        )
        found = cursor.fetchall()
        if found and found[0][0] is not None:
            times.append(int(found[0][0]))
    return from_micros(min(times)) if times else None


def _facts(rows: list[tuple[Any, ...]]) -> MachineFacts:
    """Rows into facts, in the order the whole history would give them: by event time, then by
    position (the order they were stored); reasons by the time they were given."""
    facts = MachineFacts()
    order_events: list[tuple[datetime, str, bool]] = []
    unique = {row[0]: row for row in rows}  # the "latest before" queries may overlap
    reasons = sorted((r for r in unique.values() if r[2] == REASON), key=itemgetter(9, 0))
    others = sorted((r for r in unique.values() if r[2] != REASON), key=itemgetter(3, 0))
    for _, _, kind, time, value, program, quantity, order_id, _, _ in others:
        at = from_micros(time)
        match kind:
            case "availability":
                facts.states.append(StateReport(at, availability=value))
            case "execution":
                facts.states.append(StateReport(at, execution=value, program=program))
            case "reading_all" | "reading_bad":
                facts.readings.append(CounterReading(at, value, quantity))
            case "scrap":
                facts.scrap.append(ScrapReport(at, quantity, order_id))
            case "order_start" | "order_end":
                order_events.append((at, value, kind == ORDER_START))
    for _, _, _, start, reason, _, _, _, end, given_at in reasons:
        until = from_micros(end) if end is not None else None
        facts.reasons.append(ReasonReport(from_micros(start), until, reason, from_micros(given_at)))
    facts.orders = order_reports(order_events)
    return facts


def facts_of_runs(
    reader: FactsReader,
    site: str,
    order_id: str,
    runs: Sequence[Run],
    plant: PlantConfig,
    now: datetime,
    parts_only: bool = False,
) -> dict[str, MachineFacts]:
    """From the facts view, settled: what each machine the order ran on did during its runs.
    Parts belong to the order running, by event time, when they were made; scrap naming the
    order counts whenever it was reported, scrap naming none belongs to the order running.
    ``parts_only``: the parts and scrap, without what the timeline needs."""
    named_scrap = reader.order_scrap(order_id)
    facts: dict[str, MachineFacts] = {}
    for machine_id in sorted({run.machine_id for run in runs}):
        spans = [run for run in runs if run.machine_id == machine_id]
        start = min(run.start for run in spans)
        end = max(now if run.end is None else run.end for run in spans)
        machine = machine_aggregate_id(site, machine_id)
        window = (
            reader.window(machine, facts_window(Interval(start, end), plant), parts_only)
            if end > start
            else MachineFacts()
        )
        window.scrap = [s for s in window.scrap if s.order_id is None] + named_scrap.get(
            machine.hex, []
        )
        facts[machine_id] = window.settle(plant.machine_rules(machine_id))
    return facts
