"""A machine's stored events, as the facts the timeline and OEE need, placed by event time.

Facts are gathered raw (counter readings as read, scrap with the order it names, if any) and
then *settled* by the plant's rules for the machine: which parts each reading adds, and which
order was running, by event time, when the parts were made. Settling is the one place those
decisions are taken, whether the facts came from the whole history or from the view.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from operator import attrgetter
from typing import Any

from hub.domain import Machine
from projections.rules.counters import (
    IMPLAUSIBLE,
    CounterReading,
    CounterStep,
    by_kind,
    fold_counts,
)
from projections.rules.oee import PartsReport, ScrapReport
from projections.rules.plant import MachineRules
from projections.rules.timeline import OrderReport, ReasonReport, StateReport


@dataclass
class MachineFacts:
    states: list[StateReport] = field(default_factory=list)
    orders: list[OrderReport] = field(default_factory=list)
    reasons: list[ReasonReport] = field(default_factory=list)
    # Raw: every counter reading (plus the two before a window), and scrap with its stated order.
    readings: list[CounterReading] = field(default_factory=list)
    scrap: list[ScrapReport] = field(default_factory=list)
    # The machine's first report by event time (availability, execution or a counter).
    first_report: datetime | None = None
    # Settled (``settle``): what the readings add, with the order and program of their time.
    parts: list[PartsReport] = field(default_factory=list)
    # Implausible readings, each with the order running when it was read.
    implausible: list[tuple[CounterStep, str | None]] = field(default_factory=list)
    exists_from: datetime | None = None
    rules: MachineRules = field(default_factory=MachineRules)
    settled: bool = False

    def order_ids(self) -> set[str]:
        return {o.order_id for o in self.orders if o.order_id} | {
            p.order_id for p in self.parts if p.order_id
        }

    def settle(self, rules: MachineRules) -> MachineFacts:
        """The facts with each reading's parts counted and attributed (see module doc)."""
        if self.settled:
            return self
        order_times = [o.time for o in self.orders]
        programs = _program_changes(self.states)
        program_times = [time for time, _ in programs]

        def running_order(time: datetime) -> str | None:
            # Parts reported at ``time`` were made before it: the order running just before.
            k = bisect.bisect_left(order_times, time) - 1
            return self.orders[k].order_id if k >= 0 else None

        def running_program(time: datetime) -> str | None:
            k = bisect.bisect_left(program_times, time) - 1
            return programs[k][1] if k >= 0 else None

        parts: list[PartsReport] = []
        implausible: list[tuple[CounterStep, str | None]] = []
        limit = rules.max_parts_per_reading
        for kind, readings in by_kind(self.readings).items():
            counts = [reading.count for reading in readings]
            for reading, (added, status, before) in zip(
                readings, fold_counts(counts, limit), strict=True
            ):
                at = reading.time
                if status == IMPLAUSIBLE:
                    implausible.append((CounterStep(reading, 0, status, before), running_order(at)))
                elif added:
                    parts.append(
                        PartsReport(at, kind, added, running_order(at), running_program(at))
                    )
        parts.sort(key=attrgetter("time", "kind"))
        scrap = [
            s if s.order_id is not None else replace(s, order_id=running_order(s.time))
            for s in self.scrap
        ]
        return replace(
            self,
            parts=parts,
            scrap=scrap,
            implausible=implausible,
            exists_from=rules.commissioned or self.first_report,
            rules=rules,
            settled=True,
        )


def _program_changes(states: Iterable[StateReport]) -> list[tuple[datetime, str]]:
    changes: list[tuple[datetime, str]] = []
    for report in sorted(states, key=lambda r: r.time):
        if report.program is not None and (not changes or changes[-1][1] != report.program):
            changes.append((report.time, report.program))
    return changes


def machine_facts(events: Iterable[Any]) -> MachineFacts:
    """The raw facts of a machine's whole history (what the view must agree with)."""
    facts = MachineFacts()
    order_events: list[tuple[datetime, str, bool]] = []
    reported: list[datetime] = []
    for event in events:
        match event:
            case Machine.AvailabilityReported():
                reported.append(event.event_time)
                facts.states.append(StateReport(event.event_time, availability=event.availability))
            case Machine.ExecutionReported():
                reported.append(event.event_time)
                facts.states.append(
                    StateReport(event.event_time, execution=event.execution, program=event.program)
                )
            case Machine.PartCountReported():
                reported.append(event.event_time)
                facts.readings.append(CounterReading(event.event_time, event.kind, event.count))
            case Machine.ScrapReported():
                facts.scrap.append(ScrapReport(event.event_time, event.quantity, event.order_id))
            case Machine.DowntimeReasonGiven():
                facts.reasons.append(
                    ReasonReport(event.start, event.end, event.reason, event.event_time)
                )
            case Machine.OrderStarted():
                order_events.append((event.event_time, event.order_id, True))
            case Machine.OrderEnded():
                order_events.append((event.event_time, event.order_id, False))
    facts.orders = order_reports(order_events)
    facts.first_report = min(reported, default=None)
    return facts


def order_reports(order_events: Iterable[tuple[datetime, str, bool]]) -> list[OrderReport]:
    """Which order runs when, from (time, order id, started), whatever order they were stored
    in: folded in event-time order; an end only ends the order it names. At one moment, the end
    of the order running before it comes first, then the starts, then the end of an order
    started at that very moment (a run of no length)."""
    by_time: dict[datetime, list[tuple[str, bool]]] = {}
    for time, order_id, started in order_events:
        by_time.setdefault(time, []).append((order_id, started))
    reports = []
    running: str | None = None
    for time in sorted(by_time):
        moves = by_time[time]
        ends = {order_id for order_id, started in moves if not started}
        if running in ends:
            ends.discard(running)  # this end is the running order's; a later one is not
            running = None
        starts = sorted(order_id for order_id, started in moves if started)
        if starts:
            running = starts[-1]  # two starts at one moment: one order, chosen by its id
        if running in ends:
            running = None
        reports.append(OrderReport(time, running))
    return reports
