"""A machine's stored events, as the facts the timeline and OEE need, placed by event time."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hub.domain import Machine
from projections.oee import PartsReport, ScrapReport
from projections.timeline import OrderReport, ReasonReport, StateReport


@dataclass
class MachineFacts:
    states: list[StateReport] = field(default_factory=list)
    orders: list[OrderReport] = field(default_factory=list)
    reasons: list[ReasonReport] = field(default_factory=list)
    parts: list[PartsReport] = field(default_factory=list)
    scrap: list[ScrapReport] = field(default_factory=list)

    def order_ids(self) -> set[str]:
        return {o.order_id for o in self.orders if o.order_id} | {
            p.order_id for p in self.parts if p.order_id
        }


def machine_facts(events: Iterable[Any]) -> MachineFacts:
    facts = MachineFacts()
    order_events: list[tuple[datetime, str, bool]] = []
    for event in events:
        match event:
            case Machine.AvailabilityReported():
                facts.states.append(StateReport(event.event_time, availability=event.availability))
            case Machine.ExecutionReported():
                facts.states.append(
                    StateReport(event.event_time, execution=event.execution, program=event.program)
                )
            case Machine.PartCountReported() if event.increment:
                facts.parts.append(
                    PartsReport(event.event_time, event.kind, event.increment, event.order_id)
                )
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
    return facts


def order_reports(order_events: Iterable[tuple[datetime, str, bool]]) -> list[OrderReport]:
    """Which order runs when, from (time, order id, started) in the order they were stored:
    folded in event-time order, and an end only ends the order it names."""
    reports = []
    running: str | None = None
    for time, order_id, started in sorted(order_events, key=lambda e: e[0]):
        if started:
            running = order_id
        elif running == order_id:
            running = None
        reports.append(OrderReport(time, running))
    return reports
