"""Delivery forecast: when will an order be done, and will it make its due date?

ETA = now + the production time still needed, placed into future planned busy time only (the
calendar's shifts minus breaks and planned stops). The time needed is the remaining quantity
times the observed effective cycle time: planned busy time per good part while the order ran,
so stops and scrap slow the forecast as they slow the floor. Before the first good part the
ideal cycle time stands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from projections.rules.calendar import Calendar, Interval

ForecastStatus = Literal["on_track", "at_risk", "late", "done"]
Basis = Literal["observed", "ideal", "none"]
HORIZON = timedelta(days=366)


@dataclass(frozen=True)
class Forecast:
    eta: datetime | None  # None: not within a year of shifts, or nothing to base it on
    status: ForecastStatus | None
    effective_cycle_time_s: float | None
    basis: Basis


def production_end(calendar: Calendar, start: datetime, seconds_needed: float) -> datetime | None:
    """The instant at which ``seconds_needed`` of planned busy time after ``start`` is used up."""
    left = seconds_needed
    cursor = start
    while cursor < start + HORIZON:
        window = Interval(cursor, cursor + timedelta(days=7))
        for shift in calendar.shifts(window):
            busy = [shift.interval]
            for stop in shift.planned_stops:
                busy = [piece for b in busy for piece in _minus(b, stop.interval)]
            for piece in sorted(busy):
                part = piece.clip(Interval(cursor, window.end))
                if part is None:
                    continue
                if part.seconds >= left:
                    return part.start + timedelta(seconds=left)
                left -= part.seconds
        cursor = window.end
    return None


def _minus(interval: Interval, hole: Interval) -> list[Interval]:
    if hole.clip(interval) is None:
        return [interval]
    pieces = [Interval(interval.start, hole.start), Interval(hole.end, interval.end)]
    return [p for p in pieces if p.start < p.end]


def forecast(
    calendar: Calendar,
    now: datetime,
    due: datetime | None,
    remaining: int | None,
    busy_time_s: float,
    good: int,
    ideal_cycle_time_s: float | None,
) -> Forecast:
    if remaining is None:
        return Forecast(None, None, None, "none")
    if remaining == 0:
        return Forecast(now, "done", None, "observed")
    basis: Basis
    if good > 0 and busy_time_s > 0:
        cycle, basis = busy_time_s / good, "observed"
    elif ideal_cycle_time_s:
        cycle, basis = ideal_cycle_time_s, "ideal"
    else:
        return Forecast(None, None, None, "none")
    eta = production_end(calendar, now, remaining * cycle)
    status: ForecastStatus | None = None
    if due is not None:
        if now > due:
            status = "late"
        elif eta is None or eta > due:
            status = "at_risk"
        else:
            status = "on_track"
    return Forecast(eta, status, cycle, basis)
