"""The forecast watch tells each order's progress, at most once per interval per order
(``mes.hub.order.progressed.v1``, told to partners as ``mes.order.progress.v1``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from contracts import CloudEvent, OrderProgressedV1
from hub.domain import Order, Origin, machine_aggregate_id
from hub.ports import InMemoryPublisher
from projections.processes.forecast_watch import PROGRESS_TYPE, ForecastWatch
from projections.rules.calendar import Interval
from projections.rules.history import MachineFacts
from projections.rules.oee import PartsReport, ScrapReport
from projections.rules.plant import PlantConfig
from projections.rules.timeline import OrderReport, StateReport
from projections.views.facts_view import FactsReader

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)  # a Monday, 06:00
MACHINE = machine_aggregate_id("default", "M1").hex


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


class Floor:
    """The facts view as the watch reads it: M1 runs SO-1 from 06:00, making what it is told."""

    def __init__(self) -> None:
        self.parts: list[PartsReport] = []
        self.scrap: list[ScrapReport] = []

    def made(self, minute: float, good: int) -> None:
        self.parts.append(PartsReport(at(minute), "all", good, "SO-1"))

    def scrapped(self, minute: float, quantity: int) -> None:
        self.scrap.append(ScrapReport(at(minute), quantity, "SO-1"))

    def window(self, machine: Any, window: Interval, parts_only: bool = False) -> MachineFacts:
        return MachineFacts(
            states=[StateReport(T0, availability="AVAILABLE"), StateReport(T0, execution="ACTIVE")],
            orders=[OrderReport(T0, "SO-1")],
            parts=[p for p in self.parts if p.time <= window.end],
            settled=True,
        )

    def order_scrap(self, order_id: str) -> dict[str, list[ScrapReport]]:
        return {MACHINE: [s for s in self.scrap if s.order_id == order_id]}


class Hub:
    """SO-1 of 10, released and started on M1 at 06:00; ``store`` does what ingest does with a
    progressed event (a repeated id is dropped)."""

    def __init__(self, interval_s: float = 300.0) -> None:
        self.order = Order(site="default", order_id="SO-1")
        self.order.release(Origin("r1", "erp", T0 - timedelta(hours=1)),
                           {"quantity": 10, "due": T0 + timedelta(days=2)})  # fmt: skip
        self.order.start_on(Origin("s1", "op", T0), "M1")
        self.floor = Floor()
        self.watch = ForecastWatch(
            "default", lambda: [self.order], cast(FactsReader, self.floor), PlantConfig(),
            InMemoryPublisher(), progress_interval_s=interval_s,
        )  # fmt: skip
        self.stored: set[str] = set()

    def round(self, minute: float) -> list[CloudEvent]:
        """The progress events of one round of the watch at 06:00 + ``minute``."""
        return [e for e in self.watch.changes(at(minute)) if e.type == PROGRESS_TYPE]

    def store(self, events: list[CloudEvent]) -> None:
        for event in events:
            if event.id in self.stored:
                continue
            self.stored.add(event.id)
            data = OrderProgressedV1.model_validate(event.data)
            self.order.record_progress(
                Origin(event.id, event.source, event.time),
                data.model_dump(mode="json", exclude={"order_id"}),
            )


def told(events: list[CloudEvent]) -> list[tuple[str, int, int, int | None]]:
    return [(e.id, e.data["good"], e.data["scrap"], e.data["remaining"]) for e in events]


def test_progress_is_told_at_most_once_per_interval_with_the_counts_of_then() -> None:
    hub = Hub(interval_s=300)
    # 06:00: the order made nothing yet: nothing to say.
    assert hub.round(0) == []
    # 3 good by 06:01: told at once (the first); a watch that dies before ingest stored it
    # says the same again under the same id, and the repeat is dropped.
    hub.floor.made(1, 3)
    first = hub.round(2)
    assert told(first) == [("progress-default-SO-1-1", 3, 0, 7)]
    assert first[0].time == at(2) and first[0].subject == "SO-1"
    assert told(hub.round(2.5)) == told(first)
    hub.store(first + hub.round(2.5))
    assert hub.order.progress_changes == 1
    # 2 more at 06:03: not told within 5 minutes of 06:02, then told with the counts of then.
    hub.floor.made(3, 2)
    assert hub.round(4) == []
    assert hub.round(6.9) == []
    hub.floor.made(6.95, 1)
    second = hub.round(7)
    assert told(second) == [("progress-default-SO-1-2", 6, 0, 4)]
    hub.store(second)
    # Counts unchanged: nothing, however long after.
    assert hub.round(30) == []
    assert hub.round(300) == []
    # Scrap is progress too (a part scrapped is not good any more).
    hub.floor.scrapped(301, 1)
    third = hub.round(302)
    assert told(third) == [("progress-default-SO-1-3", 5, 1, 5)]
    hub.store(third)
    assert hub.order.progress == {
        "good": 5, "scrap": 1, "remaining": 5, "quantity": 10, "as_of": at(302).isoformat(),
    }  # fmt: skip


def test_the_interval_is_counted_from_the_last_progress_told() -> None:
    hub = Hub(interval_s=60)
    hub.floor.made(1, 1)
    hub.store(hub.round(1))
    hub.floor.made(1.5, 1)
    assert hub.round(1.9) == []
    assert told(hub.round(2)) == [("progress-default-SO-1-2", 2, 0, 8)]


def test_a_cancelled_order_s_progress_is_not_told() -> None:
    hub = Hub()
    hub.floor.made(1, 3)
    hub.store(hub.round(2))
    hub.order.cancel(Origin("c1", "erp", at(10)), "customer withdrew")
    hub.floor.made(11, 4)
    assert hub.round(60) == []


async def test_a_round_counts_the_progress_it_published_apart_from_forecasts() -> None:
    hub = Hub()
    hub.floor.made(1, 3)
    assert await hub.watch.check(now=at(2)) >= 1
    assert hub.watch.progressed == 1
