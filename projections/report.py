"""OEE reports: one machine or the whole site, over a window, grouped by hour, shift, day or
order."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from projections.calendar import Interval, local_days
from projections.history import MachineFacts, machine_facts
from projections.oee import OeeFigures, compute_oee
from projections.plant import PlantConfig
from projections.plant_history import PlantHistory
from projections.timeline import TimelineInterval, build_timeline

GroupBy = Literal["hour", "shift", "day", "order"]


@dataclass
class Bucket:
    figures: OeeFigures
    label: str | None = None  # the shift name or order id


def facts_window(window: Interval, plant: PlantConfig) -> Interval:
    """The stretch of facts a report on ``window`` needs: a little wider than asked, so a stop
    cut by the window edge is judged by its whole length against the micro-stop threshold."""
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    return Interval(window.start - margin, window.end + margin)


def machine_timeline(
    facts: MachineFacts, window: Interval, plant: PlantConfig
) -> list[TimelineInterval]:
    # Built on the wider window, then clipped back.
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    wide = facts_window(window, plant)
    timeline = build_timeline(
        wide,
        plant.calendar(),
        facts.states,
        facts.orders,
        facts.reasons,
        plant.planned_reasons(),
        micro_stop=margin,
    )
    clipped = []
    for interval in timeline:
        part = Interval(interval.start, interval.end).clip(window)
        if part is not None:
            clipped.append(
                TimelineInterval(
                    part.start,
                    part.end,
                    interval.state,
                    interval.reason,
                    interval.order_id,
                    interval.program,
                    interval.micro_stop,
                )
            )
    return clipped


def bucket_windows(
    window: Interval, group_by: GroupBy | None, plant: PlantConfig
) -> list[tuple[Interval, str | None]]:
    calendar = plant.calendar()
    if group_by is None:
        return [(window, None)]
    if group_by == "day":
        return [(day, None) for day in local_days(window, calendar.time_zone)]
    if group_by == "shift":
        return [(s.interval, s.name) for s in calendar.shifts(window)]
    if group_by == "hour":
        hours: list[tuple[Interval, str | None]] = []
        for day in local_days(window, calendar.time_zone):
            start = day.start
            while start < day.end:
                # Local hours: whole UTC hours except in zones with a half-hour offset.
                local = start.astimezone(calendar.time_zone)
                step = timedelta(minutes=60 - local.minute, seconds=-local.second)
                end = min(start + step, day.end)
                hours.append((Interval(start, end), None))
                start = end
        return hours
    raise ValueError(f"group_by {group_by!r}: use hour, shift, day or order")


def machine_report(
    facts: MachineFacts,
    window: Interval,
    group_by: GroupBy | None,
    plant: PlantConfig,
    ideal_cycle_time_s: Mapping[str, float],
    now: datetime,
) -> list[Bucket]:
    timeline = machine_timeline(facts, window, plant)
    if group_by == "order":
        buckets = []
        for order_id in sorted({i.order_id for i in timeline if i.order_id}):
            spans = [i for i in timeline if i.order_id == order_id]
            span = Interval(spans[0].start, spans[-1].end)
            figures = compute_oee(
                span, timeline, facts.parts, facts.scrap, ideal_cycle_time_s, now, order_id
            )
            buckets.append(Bucket(figures, order_id))
        return buckets
    # Each bucket gets only the intervals and counts that can fall in it (the timeline is in
    # time order; counts are sorted once), instead of every bucket scanning everything.
    parts = sorted(facts.parts, key=lambda p: p.time)
    scrap = sorted(facts.scrap, key=lambda s: s.time)
    part_times, scrap_times = [p.time for p in parts], [s.time for s in scrap]
    interval_ends = [i.end for i in timeline]
    buckets = []
    for bucket, label in bucket_windows(window, group_by, plant):
        first = bisect.bisect_right(interval_ends, bucket.start)
        last = bisect.bisect_left(interval_ends, bucket.end) + 1
        p0, p1 = (bisect.bisect_left(part_times, t) for t in (bucket.start, bucket.end))
        s0, s1 = (bisect.bisect_left(scrap_times, t) for t in (bucket.start, bucket.end))
        figures = compute_oee(
            bucket, timeline[first:last], parts[p0:p1], scrap[s0:s1], ideal_cycle_time_s, now
        )
        buckets.append(Bucket(figures, label))
    return buckets


def site_report(machine_reports: list[list[Bucket]], group_by: GroupBy | None) -> list[Bucket]:
    """Adds times and counts bucket by bucket (orders by order id, across the machines that ran
    them): never averages ratios."""
    totals: dict[object, Bucket] = {}
    for report in machine_reports:
        for bucket in report:
            f = bucket.figures
            key = bucket.label if group_by == "order" else (f.start, f.end, bucket.label)
            if key not in totals:
                totals[key] = Bucket(OeeFigures(f.start, f.end), bucket.label)
            total = totals[key].figures
            total.start, total.end = min(total.start, f.start), max(total.end, f.end)
            total.add(f)
    if group_by == "order":  # by order id, as for one machine
        return sorted(totals.values(), key=lambda b: b.label or "")
    return sorted(totals.values(), key=lambda b: (b.figures.start, b.label or ""))


IdealCycleTimes = Callable[[Collection[str]], Mapping[str, float]]


def report_from_facts(
    facts: MachineFacts,
    ideal_cycle_times: IdealCycleTimes,
    window: Interval,
    group_by: GroupBy | None,
    plant: PlantConfig,
    now: datetime,
) -> list[Bucket]:
    """A machine's report; ``ideal_cycle_times`` looks up the PRI of the orders it ran (an
    order without one is left out)."""
    ideal = {o: s for o, s in ideal_cycle_times(facts.order_ids()).items() if s}
    return machine_report(facts, window, group_by, plant, ideal, now)


def report_from_history(
    history: Iterable[Any],
    ideal_cycle_times: IdealCycleTimes,
    window: Interval,
    group_by: GroupBy | None,
    plant: PlantConfig,
    now: datetime,
) -> list[Bucket]:
    """A machine's report from all its stored events (what the view must agree with)."""
    return report_from_facts(
        machine_facts(history), ideal_cycle_times, window, group_by, plant, now
    )


FactsFor = Callable[[Interval, PlantConfig], MachineFacts]


def timeline_over_time(
    facts_for: FactsFor, window: Interval, plants: PlantHistory
) -> list[TimelineInterval]:
    """A machine's timeline, each stretch judged by the plant configuration in force then."""
    return [
        interval
        for piece, plant in plants.segments(window)
        for interval in machine_timeline(facts_for(piece, plant), piece, plant)
    ]


def report_over_time(
    facts_for: FactsFor,
    ideal_cycle_times: IdealCycleTimes,
    window: Interval,
    group_by: GroupBy | None,
    plants: PlantHistory,
    now: datetime,
) -> list[Bucket]:
    """A machine's report over ``window``, cut where the plant configuration changed (a shift,
    hour or day bucket spanning a change comes in two parts); one bucket or one per order stay
    one, by adding the parts' raw figures."""
    reports = [
        report_from_facts(facts_for(piece, plant), ideal_cycle_times, piece, group_by, plant, now)
        for piece, plant in plants.segments(window)
    ]
    if len(reports) == 1:
        return reports[0]
    if group_by == "order":
        return site_report(reports, "order")
    if group_by is None:
        total = Bucket(OeeFigures(window.start, window.end))
        for report in reports:
            for bucket in report:
                total.figures.add(bucket.figures)
        return [total]
    return [bucket for report in reports for bucket in report]
