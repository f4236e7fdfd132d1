"""ISO 22400-2 OEE from a machine's timeline and production counts.

Availability = APT / PBT, Performance = PRI * PQ / APT, Quality = GQ / PQ, OEE = A * P * Q.
- PBT (planned busy time): time inside shifts that is not a planned stop.
- APT (actual production time): running time inside PBT (micro-stops count as running).
- PQ: parts produced (what the ``all`` counter's readings add, ``projections.counters``) by
  event time in the bucket: a reading belongs to the bucket (start, end] it falls in, since it
  reports what was made up to then; GQ = PQ - bad parts - operator-reported scrap.
- PRI: the running order's ideal cycle time, else the plant's for its part number, its
  program, the machine (``[plant]``); parts with none are counted and flagged.
Every figure comes with the raw times and counts behind it; a zero denominator gives None.
Site figures add times and counts across machines; they never average ratios.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from projections.rules.calendar import Interval
from projections.rules.timeline import (
    OFFLINE,
    PLANNED_STOP,
    RUNNING,
    STOPPED,
    UNASSIGNED,
    TimelineInterval,
)


@dataclass(frozen=True)
class PartsReport:
    time: datetime
    kind: str  # "all" or "bad"
    increment: int
    order_id: str | None
    program: str | None = None  # running when the parts were made (a PRI fallback)


@dataclass(frozen=True)
class ScrapReport:
    time: datetime
    quantity: int
    order_id: str | None


@dataclass
class OeeFigures:
    start: datetime
    end: datetime
    planned_busy_time_s: float = 0.0
    actual_production_time_s: float = 0.0
    ideal_time_s: float = 0.0
    produced: int = 0
    bad: int = 0
    scrapped: int = 0
    parts_without_ideal_time: int = 0
    # Warnings: counter readings not counted as implausible; stops labelled with a reason
    # code the catalog does not have (counted as unplanned).
    implausible_readings: int = 0
    stops_with_unknown_reason: int = 0
    downtime_s_by_reason: dict[str, float] = field(default_factory=dict)
    planned_stop_s_by_reason: dict[str, float] = field(default_factory=dict)
    provisional: bool = False

    @property
    def good(self) -> int:
        return max(0, self.produced - self.bad - self.scrapped)

    @property
    def availability(self) -> float | None:
        return _ratio(self.actual_production_time_s, self.planned_busy_time_s)

    @property
    def performance(self) -> float | None:
        return _ratio(self.ideal_time_s, self.actual_production_time_s)

    @property
    def quality(self) -> float | None:
        return _ratio(self.good, self.produced)

    @property
    def oee(self) -> float | None:
        a, p, q = self.availability, self.performance, self.quality
        return None if a is None or p is None or q is None else a * p * q

    def add(self, other: OeeFigures) -> None:
        """Sum another machine's (or bucket's) raw figures into this one."""
        self.planned_busy_time_s += other.planned_busy_time_s
        self.actual_production_time_s += other.actual_production_time_s
        self.ideal_time_s += other.ideal_time_s
        self.produced += other.produced
        self.bad += other.bad
        self.scrapped += other.scrapped
        self.parts_without_ideal_time += other.parts_without_ideal_time
        self.implausible_readings += other.implausible_readings
        self.stops_with_unknown_reason += other.stops_with_unknown_reason
        for mine, theirs in (
            (self.downtime_s_by_reason, other.downtime_s_by_reason),
            (self.planned_stop_s_by_reason, other.planned_stop_s_by_reason),
        ):
            for reason, seconds in theirs.items():
                mine[reason] = mine.get(reason, 0.0) + seconds
        self.provisional = self.provisional or other.provisional


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


IdealTimeOf = Callable[[PartsReport], float | None]


def by_order(ideal_cycle_time_s: Mapping[str, float]) -> IdealTimeOf:
    """PRI from the running order alone."""
    return lambda report: ideal_cycle_time_s.get(report.order_id or "")


def compute_oee(
    bucket: Interval,
    timeline: Iterable[TimelineInterval],
    parts: Iterable[PartsReport],
    scrap: Iterable[ScrapReport],
    ideal_time_of: IdealTimeOf,
    now: datetime,
    order_id: str | None = None,
    known_reasons: Collection[str] | None = None,
) -> OeeFigures:
    """OEE of one machine over ``bucket``; with ``order_id``, only while that order ran.
    ``known_reasons``: the catalog's codes, to count stops labelled with any other."""
    figures = OeeFigures(bucket.start, bucket.end, provisional=bucket.end > now)
    downtime: dict[str, float] = defaultdict(float)
    planned: dict[str, float] = defaultdict(float)
    for interval in timeline:
        if order_id is not None and interval.order_id != order_id:
            continue
        part = Interval(interval.start, interval.end).clip(bucket)
        if part is None:
            continue
        seconds = part.seconds
        if interval.state in (RUNNING, STOPPED, OFFLINE):
            figures.planned_busy_time_s += seconds
        if interval.state == RUNNING:
            figures.actual_production_time_s += seconds
        elif interval.state in (STOPPED, OFFLINE):
            downtime[interval.reason or "unassigned"] += seconds
            if (
                known_reasons is not None
                and interval.reason not in (None, UNASSIGNED)
                and interval.reason not in known_reasons
            ):
                figures.stops_with_unknown_reason += 1
        elif interval.state == PLANNED_STOP:
            planned[interval.reason or "planned"] += seconds
    for report in parts:
        if not bucket.start < report.time <= bucket.end:
            continue
        if order_id is not None and report.order_id != order_id:
            continue
        if report.kind == "bad":
            figures.bad += report.increment
            continue
        figures.produced += report.increment
        pri = ideal_time_of(report)
        if pri is None:
            figures.parts_without_ideal_time += report.increment
        else:
            figures.ideal_time_s += pri * report.increment
    for scrapped in scrap:
        if bucket.start < scrapped.time <= bucket.end and (
            order_id is None or scrapped.order_id == order_id
        ):
            figures.scrapped += scrapped.quantity
    figures.downtime_s_by_reason = dict(downtime)
    figures.planned_stop_s_by_reason = dict(planned)
    return figures
