"""A machine's timeline: contiguous intervals by event time, each with a state and a reason.

States: ``running``; ``stopped`` and ``offline`` (unplanned downtime); ``planned_stop``
(breaks, planned maintenance, stops an operator labelled with a planned reason); ``no_shift``;
``not_commissioned`` (before the machine existed: its first report or commissioning date).
A machine that reports execution but never availability is available while it reports;
``UNAVAILABLE`` in either means offline.
Facts are placed by their event time whatever order they arrived in, so a late or out-of-order
event re-slices the intervals it falls into, and a late reason re-labels the stop it covers.
A reason with no end ends where the machine next runs (``first_run``). When the machine ran by
its own reports alone, before any calendar (``running_stretches``), is what the API judges a
reason by.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from projections.rules.calendar import Calendar, Interval

UNASSIGNED = "unassigned"
RUNNING, STOPPED, OFFLINE, PLANNED_STOP, NO_SHIFT, NOT_COMMISSIONED = (
    "running",
    "stopped",
    "offline",
    "planned_stop",
    "no_shift",
    "not_commissioned",
)


@dataclass(frozen=True)
class StateReport:
    """An availability or execution report (one of the two is set)."""

    time: datetime
    availability: str | None = None
    execution: str | None = None
    program: str | None = None


@dataclass(frozen=True)
class OrderReport:
    time: datetime
    order_id: str | None  # None: the order ended


@dataclass(frozen=True)
class ReasonReport:
    """An operator's reason for the stop(s) in [start, end); where two overlap, the latest
    ``given_at`` wins. ``end`` None: open-ended, for the stop going on at ``start``: it ends
    where the machine next runs, the first moment at or after ``start`` that it is running
    (``first_run``: it reports executing ``ACTIVE`` and is not ``UNAVAILABLE``; a micro-stop
    counts as running), so a later stop, after the machine ran again, is not labelled by it;
    if the machine is running at ``start`` it covers nothing. *Example:* stopped 08:00-08:40,
    running 08:40-09:00, stopped 09:00-09:30; a reason from 08:00 with no end labels
    08:00-08:40 only, and 09:00-09:30 is ``unassigned`` (docs/oee.md, rule 14)."""

    start: datetime
    end: datetime | None
    reason: str
    given_at: datetime


@dataclass(frozen=True)
class TimelineInterval:
    start: datetime
    end: datetime
    state: str
    reason: str | None
    order_id: str | None
    program: str | None
    micro_stop: bool = False

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass(frozen=True)
class _Segment:
    start: datetime
    end: datetime
    state: str
    program: str | None


def _machine_segments(
    reports: Iterable[StateReport],
    window: Interval,
    micro_stop: timedelta,
    exists_from: datetime | None,
) -> list[_Segment]:
    """What the machine did, before any calendar or reason: running, stopped or offline.
    Before ``exists_from`` (None: it never reported) the machine did not exist yet; from then
    until its first report it is offline. Availability is implied by execution: a machine
    reporting execution but no availability is available. Silence is not a stop: a state lasts
    until the next report."""
    availability: str | None = None
    execution: str | None = None
    program: str | None = None
    segments: list[_Segment] = []

    def state(at: datetime) -> str:
        if exists_from is None or at < exists_from:
            return NOT_COMMISSIONED
        if availability == "UNAVAILABLE" or execution == "UNAVAILABLE":
            return OFFLINE
        if availability is None and execution is None:
            return OFFLINE  # commissioned, yet silent
        return RUNNING if _runs_with(availability, execution) else STOPPED

    cuts = [r for r in reports if r.time <= window.end]
    if exists_from is not None and window.start < exists_from < window.end:
        cuts.append(StateReport(exists_from))  # the moment the machine starts to exist
    # Reports of the very same moment are taken in the order they were stored (a simulator or
    # adapter sends READY then ACTIVE with one timestamp).
    cuts.sort(key=lambda r: r.time)
    cursor = window.start
    for report in cuts:
        if report.time > cursor:
            segments.append(_Segment(cursor, report.time, state(cursor), program))
            cursor = report.time
        if report.availability is not None:
            availability = report.availability
        if report.execution is not None:
            execution = report.execution
            if report.program is not None:
                program = report.program
    if cursor < window.end:
        segments.append(_Segment(cursor, window.end, state(cursor), program))
    merged: list[_Segment] = []
    for segment in segments:
        if merged and merged[-1].state == segment.state and merged[-1].program == segment.program:
            merged[-1] = replace(merged[-1], end=segment.end)
        else:
            merged.append(segment)
    # A stop shorter than the threshold between running stretches counts as running: a speed
    # loss, not an availability loss.
    for i, segment in enumerate(merged):
        if (
            segment.state == STOPPED
            and 0 < i < len(merged) - 1
            and merged[i - 1].state == RUNNING
            and merged[i + 1].state == RUNNING
            and segment.end - segment.start < micro_stop
        ):
            merged[i] = replace(segment, state="micro_stop")
    return merged


def _runs_with(availability: str | None, execution: str | None) -> bool:
    """Whether a machine whose last reports say ``availability`` and ``execution`` runs: it
    executes ``ACTIVE`` and is not ``UNAVAILABLE`` (the one test of the timeline's
    ``running``, of ``first_run`` and of ``running_stretches``)."""
    return execution == "ACTIVE" and availability != "UNAVAILABLE"


def _runs(reports: Iterable[StateReport]) -> list[tuple[datetime, bool]]:
    """Each moment a report may change whether the machine runs, in time order, with whether it
    runs from then on (after every report of that moment, in the order they are given)."""
    by_time = sorted(reports, key=lambda r: r.time)  # stable: one moment's in their order
    availability: str | None = None
    execution: str | None = None
    runs: list[tuple[datetime, bool]] = []
    for moment, same in itertools.groupby(by_time, key=lambda r: r.time):
        for report in same:
            availability = report.availability or availability
            execution = report.execution or execution
        runs.append((moment, _runs_with(availability, execution)))
    return runs


def first_run(reports: Iterable[StateReport], start: datetime) -> datetime | None:
    """The first moment at or after ``start`` that the machine runs (it reports executing
    ``ACTIVE`` and is not ``UNAVAILABLE``) by ``reports``, every one up to where it matters
    (those of one moment in the order they were stored): where a reason with no end given
    from ``start`` ends. None: it does not run in these reports."""
    return _first_run(_runs(reports), start)


def _first_run(runs: list[tuple[datetime, bool]], start: datetime) -> datetime | None:
    k = bisect.bisect_right(runs, start, key=lambda run: run[0]) - 1
    if k >= 0 and runs[k][1]:
        return start  # running at its start: it covers nothing
    return next((moment for moment, running in runs[k + 1 :] if running), None)


@dataclass(frozen=True)
class RunningStretch:
    """A stretch of time the machine ran by its own reports; ``micro_stops``: the stops in it
    shorter than the micro-stop threshold, which count as running."""

    start: datetime
    end: datetime
    micro_stops: tuple[Interval, ...] = ()


def running_stretches(
    reports: Iterable[StateReport], window: Interval, micro_stop: timedelta
) -> list[RunningStretch]:
    """The stretches of ``window`` in which the machine ran, by its availability and execution
    reports alone, before any calendar, commissioning date or reason: time it ran in a planned
    break, outside the shifts or before its commissioning is running here. Running as for
    ``first_run`` (executing ``ACTIVE``, not ``UNAVAILABLE``), and a stop shorter than
    ``micro_stop`` between two runs counts as running, as on the timeline. ``reports``: the
    machine's reports from the last of each kind before ``window.start - micro_stop`` up to
    ``window.end + micro_stop`` (a stop cut by an edge of the window is judged by its whole
    length), those of one moment in the order they were stored; none after what is known."""
    wide = Interval(window.start - micro_stop, window.end + micro_stop)
    # Existing from the wide window's start: before its first report a machine is silent, so
    # offline, which is not running either.
    segments = _machine_segments(reports, wide, micro_stop, exists_from=wide.start)
    stretches: list[RunningStretch] = []
    for segment in segments:
        if segment.state not in (RUNNING, "micro_stop"):
            continue
        part = Interval(segment.start, segment.end).clip(window)
        if part is None:
            continue
        micro = (part,) if segment.state == "micro_stop" else ()
        last = stretches[-1] if stretches else None
        if last is not None and last.end == part.start:
            stretches[-1] = RunningStretch(last.start, part.end, last.micro_stops + micro)
        else:
            stretches.append(RunningStretch(part.start, part.end, micro))
    return stretches


def build_timeline(
    window: Interval,
    calendar: Calendar,
    reports: Iterable[StateReport],
    orders: Iterable[OrderReport] = (),
    reasons: Iterable[ReasonReport] = (),
    planned_reasons: Mapping[str, bool] | None = None,
    micro_stop: timedelta = timedelta(seconds=120),
    exists_from: datetime | None = None,
) -> list[TimelineInterval]:
    """The machine's intervals in ``window``. ``planned_reasons`` maps a reason code to whether
    it is a planned stop (from the reason catalog); unknown codes are unplanned.
    ``exists_from``: the machine's first report or commissioning (None: the first of
    ``reports``; with none, the machine never reported). ``reports`` before the window set the
    scene, and decide where a reason with no end that began before the window ends."""
    planned_reasons = planned_reasons or {}
    reports = list(reports)
    if exists_from is None:
        exists_from = min((r.time for r in reports), default=None)
    segments = _machine_segments(reports, window, micro_stop, exists_from)
    shifts = calendar.shifts(window)
    order_reports = sorted(orders, key=lambda o: o.time)
    # Latest given reason wins where two overlap.
    reason_list = sorted(
        reasons, key=lambda r: (r.given_at, r.start, r.end or r.start, r.reason)
    )  # at one moment, in one order whatever order they were stored in

    # Where each reason ends: as given, or, with no end given, where the machine next runs.
    ends = _reason_ends(reason_list, reports, window)

    cuts = {window.start, window.end}
    cuts.update(s.start for s in segments)
    for each in shifts:
        cuts.update((each.interval.start, each.interval.end))
        for stop in each.planned_stops:
            cuts.update((stop.interval.start, stop.interval.end))
    cuts.update(o.time for o in order_reports if window.start < o.time < window.end)
    for report, until in zip(reason_list, ends, strict=True):
        cuts.update(t for t in (report.start, until) if t and window.start < t < window.end)
    boundaries = sorted(cuts)

    segment_starts = [s.start for s in segments]
    shift_starts = [s.interval.start for s in shifts]  # shifts are in time order, apart
    order_times = [o.time for o in order_reports]
    pieces: list[TimelineInterval] = []
    for start, end in itertools.pairwise(boundaries):
        segment = segments[bisect.bisect_right(segment_starts, start) - 1]
        k = bisect.bisect_right(order_times, start) - 1
        order_id = order_reports[k].order_id if k >= 0 else None
        state, reason, micro = segment.state, None, False
        if state == "micro_stop":
            state, micro = RUNNING, True
        k = bisect.bisect_right(shift_starts, start) - 1
        shift = shifts[k] if k >= 0 and start < shifts[k].interval.end else None
        planned = (
            next(
                (p for p in shift.planned_stops if p.interval.start <= start < p.interval.end), None
            )
            if shift
            else None
        )
        if state == NOT_COMMISSIONED:
            reason = None
        elif shift is None:
            state, reason = NO_SHIFT, None
        elif planned is not None:
            state, reason = PLANNED_STOP, planned.reason
        elif state in (STOPPED, OFFLINE):
            reason = UNASSIGNED
            for given, until in zip(reason_list, ends, strict=True):
                if given.start <= start and (until is None or start < until):
                    reason = given.reason
            if planned_reasons.get(reason, False):
                state = PLANNED_STOP
        pieces.append(TimelineInterval(start, end, state, reason, order_id, segment.program, micro))
    merged: list[TimelineInterval] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is not None and (
            last.state,
            last.reason,
            last.order_id,
            last.program,
            last.micro_stop,
        ) == (
            piece.state,
            piece.reason,
            piece.order_id,
            piece.program,
            piece.micro_stop,
        ):
            merged[-1] = replace(last, end=piece.end)
        else:
            merged.append(piece)
    return merged


def _reason_ends(
    reasons: list[ReasonReport], reports: list[StateReport], window: Interval
) -> list[datetime | None]:
    """Where each of ``reasons`` ends (None: not before the window's end): its end as given;
    with none, where the machine next runs (``first_run``). One that starts in a micro-stop
    ends where that stop ends, so labels nothing (the stop counts as running); one that
    started before the window may have been ended by a run before it (``reports`` are every
    report up to the window's end, or enough of them: the facts view gives those from the
    start of each such reason on)."""
    if all(given.end is not None for given in reasons):
        return [given.end for given in reasons]
    runs = _runs(r for r in reports if r.time <= window.end)
    return [
        given.end
        if given.end is not None or given.start >= window.end
        else _first_run(runs, given.start)
        for given in reasons
    ]
