"""The plant's shift calendar: when the plant plans to produce.

Shift patterns recur per local weekday in the site's time zone; a shift whose end is not after
its start crosses midnight. Breaks inside a shift, holidays and one-off planned stops (planned
maintenance) are planned stops: ISO 22400 takes them out of the planned busy time. Local times
are turned into instants with the time zone's rules, so a night shift over a DST change is 7 or
9 hours long, as the clock on the wall says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open stretch of time [start, end), in aware datetimes."""

    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds())

    def clip(self, other: Interval) -> Interval | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Interval(start, end) if start < end else None


@dataclass(frozen=True)
class ShiftPattern:
    name: str
    start: time
    end: time
    weekdays: frozenset[int] = frozenset(range(7))  # 0 = Monday, as date.weekday()
    breaks: tuple[tuple[time, time], ...] = ()


@dataclass(frozen=True)
class PlannedStop:
    interval: Interval
    reason: str


@dataclass(frozen=True)
class Shift:
    """One occurrence of a shift pattern, with its planned stops (breaks, maintenance)."""

    name: str
    day: date  # the local day the shift starts on
    interval: Interval
    planned_stops: tuple[PlannedStop, ...] = ()


@dataclass(frozen=True)
class Calendar:
    time_zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    patterns: tuple[ShiftPattern, ...] = (ShiftPattern("day", time(0), time(0)),)
    holidays: frozenset[date] = frozenset()
    planned_stops: tuple[PlannedStop, ...] = ()

    def _instant(self, day: date, at: time) -> datetime:
        # fold=0: an ambiguous local time (the repeated hour in autumn) is its first occurrence.
        return datetime.combine(day, at, tzinfo=self.time_zone).astimezone(UTC)

    def _local_span(self, day: date, start: time, end: time) -> Interval:
        end_day = day + timedelta(days=1) if end <= start else day
        return Interval(self._instant(day, start), self._instant(end_day, end))

    def shifts(self, window: Interval) -> list[Shift]:
        """The shifts that overlap ``window``, clipped to it, in time order."""
        first = window.start.astimezone(self.time_zone).date() - timedelta(days=1)
        last = window.end.astimezone(self.time_zone).date()
        found: list[Shift] = []
        day = first
        while day <= last:
            if day not in self.holidays:
                for pattern in self.patterns:
                    if day.weekday() in pattern.weekdays:
                        shift = self._shift(pattern, day, window)
                        if shift is not None:
                            found.append(shift)
            day += timedelta(days=1)
        return sorted(found, key=lambda s: s.interval.start)

    def _shift(self, pattern: ShiftPattern, day: date, window: Interval) -> Shift | None:
        whole = self._local_span(day, pattern.start, pattern.end)
        clipped = whole.clip(window)
        if clipped is None:
            return None
        stops: list[PlannedStop] = []
        for break_start, break_end in pattern.breaks:
            # A break belongs to the shift's day, or the next day when the shift crossed
            # midnight before the break began.
            break_day = day
            if pattern.end <= pattern.start and break_start < pattern.start:
                break_day = day + timedelta(days=1)
            span = self._local_span(break_day, break_start, break_end).clip(clipped)
            if span is not None:
                stops.append(PlannedStop(span, "planned/break"))
        for stop in self.planned_stops:
            span = stop.interval.clip(clipped)
            if span is not None:
                stops.append(PlannedStop(span, stop.reason))
        return Shift(pattern.name, day, clipped, tuple(sorted(stops, key=lambda s: s.interval)))


def local_days(window: Interval, time_zone: ZoneInfo) -> list[Interval]:
    """``window`` split at local midnights (a DST day is 23 or 25 hours long)."""
    out: list[Interval] = []
    day = window.start.astimezone(time_zone).date()
    while True:
        start = datetime.combine(day, time(0), tzinfo=time_zone).astimezone(UTC)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=time_zone).astimezone(UTC)
        part = Interval(start, end).clip(window)
        if part is not None:
            out.append(part)
        if end >= window.end:
            return out
        day += timedelta(days=1)
