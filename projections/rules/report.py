"""OEE reports: one machine or the whole site, over a window, grouped by hour, shift, day or
order."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from projections.rules.calendar import Interval, local_days
from projections.rules.history import MachineFacts, machine_facts
from projections.rules.oee import OeeFigures, PartsReport, ScrapReport, compute_oee
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import PlantHistory
from projections.rules.timeline import TimelineInterval, build_timeline

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
    facts: MachineFacts, window: Interval, plant: PlantConfig, now: datetime | None = None
) -> list[TimelineInterval]:
    """The machine's timeline over ``window``, up to ``now`` at most: the future is unknown."""
    if now is not None and window.end > now:
        if window.start >= now:
            return []
        window = Interval(window.start, now)
    # Built on the wider window, then clipped back.
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    wide = facts_window(window, plant)
    if now is not None and wide.end > now:
        wide = Interval(wide.start, now)  # the micro-stop margin does not reach past now
    timeline = build_timeline(
        wide,
        plant.calendar(),
        facts.states,
        facts.orders,
        facts.reasons,
        plant.planned_reasons(),
        micro_stop=margin,
        exists_from=facts.exists_from,
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
    """``facts`` settled; ``ideal_cycle_time_s``: the PRI of each order (its own, or its part
    number's), before the program's and the machine's fallbacks."""
    if not facts.settled:
        raise ValueError("settle the facts with the machine's rules first")
    rules = facts.rules
    timeline = machine_timeline(facts, window, plant, now)
    known = set(plant.reason_codes())

    def ideal_time_of(report: PartsReport) -> float | None:
        return (
            ideal_cycle_time_s.get(report.order_id or "")
            or rules.program_cycle_times.get(report.program or "")
            or rules.ideal_cycle_time_s
        )

    def figures(
        bucket: Interval,
        intervals: list[TimelineInterval],
        parts: list[PartsReport],
        scrap: list[ScrapReport],
        order_id: str | None = None,
    ) -> OeeFigures:
        result = compute_oee(bucket, intervals, parts, scrap, ideal_time_of, now, order_id, known)
        result.implausible_readings = sum(
            1
            for step, running in facts.implausible
            if bucket.start < step.reading.time <= bucket.end
            and (order_id is None or running == order_id)
        )
        return result

    if group_by == "order":
        buckets = []
        for order_id in sorted({i.order_id for i in timeline if i.order_id}):
            spans = [i for i in timeline if i.order_id == order_id]
            span = Interval(spans[0].start, spans[-1].end)
            result = figures(span, timeline, facts.parts, facts.scrap, order_id)
            # Still running at now (the timeline ends there): its figures are not final.
            result.provisional = result.provisional or span.end >= now
            buckets.append(Bucket(result, order_id))
        return buckets
    # Each bucket gets only the intervals and counts that can fall in it (the timeline is in
    # time order; counts are sorted once), instead of every bucket scanning everything. A count
    # belongs to the bucket (start, end] it falls in: it reports what was made up to then.
    parts = sorted(facts.parts, key=lambda p: p.time)
    scrap = sorted(facts.scrap, key=lambda s: s.time)
    part_times, scrap_times = [p.time for p in parts], [s.time for s in scrap]
    interval_ends = [i.end for i in timeline]
    buckets = []
    for bucket, label in bucket_windows(window, group_by, plant):
        if group_by is not None and bucket.start >= now:
            break  # the future is unknown: no buckets for it
        first = bisect.bisect_right(interval_ends, bucket.start)
        last = bisect.bisect_left(interval_ends, bucket.end) + 1
        p0, p1 = (bisect.bisect_right(part_times, t) for t in (bucket.start, bucket.end))
        s0, s1 = (bisect.bisect_right(scrap_times, t) for t in (bucket.start, bucket.end))
        buckets.append(
            Bucket(figures(bucket, timeline[first:last], parts[p0:p1], scrap[s0:s1]), label)
        )
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


# What each of the orders named says of its PRI: (its own ideal cycle time, its part number);
# an order not known is left out. The plant's fallbacks are applied here, in the rules.
OrderCycleFacts = Callable[[Collection[str]], Mapping[str, tuple[float | None, str | None]]]


def report_from_facts(
    facts: MachineFacts,
    order_cycle_facts: OrderCycleFacts,
    window: Interval,
    group_by: GroupBy | None,
    plant: PlantConfig,
    now: datetime,
) -> list[Bucket]:
    """A machine's report from its settled facts."""
    ideal = {
        order_id: seconds
        for order_id, (own, part_number) in order_cycle_facts(facts.order_ids()).items()
        if (seconds := plant.order_ideal_cycle_time(own, part_number))
    }
    return machine_report(facts, window, group_by, plant, ideal, now)


def report_from_history(
    history: Iterable[Any],
    machine_id: str,
    order_cycle_facts: OrderCycleFacts,
    window: Interval,
    group_by: GroupBy | None,
    plant: PlantConfig,
    now: datetime,
) -> list[Bucket]:
    """A machine's report from all its stored events (what the view must agree with)."""
    facts = machine_facts(history).settle(plant.machine_rules(machine_id))
    return report_from_facts(facts, order_cycle_facts, window, group_by, plant, now)


# The settled facts of one machine over a window, under a plant configuration.
FactsFor = Callable[[Interval, PlantConfig], MachineFacts]


def timeline_over_time(
    facts_for: FactsFor, window: Interval, plants: PlantHistory, now: datetime
) -> list[TimelineInterval]:
    """A machine's timeline up to ``now``, each stretch judged by the plant configuration in
    force then."""
    return [
        interval
        for piece, plant in plants.segments(window)
        for interval in machine_timeline(facts_for(piece, plant), piece, plant, now)
    ]


def report_over_time(
    facts_for: FactsFor,
    order_cycle_facts: OrderCycleFacts,
    window: Interval,
    group_by: GroupBy | None,
    plants: PlantHistory,
    now: datetime,
) -> list[Bucket]:
    """A machine's report over ``window``, cut where the plant configuration changed (a shift,
    hour or day bucket spanning a change comes in two parts); one bucket or one per order stay
    one, by adding the parts' raw figures."""
    reports = [
        report_from_facts(facts_for(piece, plant), order_cycle_facts, piece, group_by, plant, now)
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
