"""Export -> import -> the same hub: a real hub's history exported (``hub.exporting``), imported
into a fresh hub of its own (``mes-hub import``'s ``import_events``: embedded NATS, ingest,
the views), SQLite to SQLite and SQLite to PostgreSQL; the machines, orders, timelines, OEE and
order progress read by the hub's own readers are the original's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts import CloudEvent
from hub.bootstrap import build_hub, open_views
from hub.cli.replay import import_events, refuse_a_used_target
from hub.domain import Machine, Order
from hub.exporting import (
    POSITION,
    RECORDED_TIME,
    ExportStats,
    Selection,
    events_to_import,
    export_line,
    exported_events,
)
from hub.reports import Reports
from hub.settings import Settings, load_settings
from hub.store import EventStore
from projections.processes.forecast_watch import progress_and_forecast
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader
from tests.conftest import T0, cloud_event, postgres_settings

PLANT = PlantConfig(micro_stop_threshold_s=120)
NOW = T0 + timedelta(days=1)
WINDOW = Interval(T0 - timedelta(hours=1), T0 + timedelta(hours=12))


def at(minutes: float) -> timedelta:
    return timedelta(minutes=minutes)


def history() -> list[CloudEvent]:
    """A morning on two machines: an order released, changed, run and ended, a stop with a
    late reason, counters with a bad part, scrap, a fault; another order cancelled."""
    machine = "mes.machine."
    events = [
        cloud_event("mes.erp.order.released.v1", "SO-1",
                    {"order_id": "SO-1", "part_number": "P-1", "quantity": 100,
                     "due": "2026-03-03T00:00:00Z", "customer": "C7", "machine_id": "M1",
                     "ideal_cycle_time_s": 30.0}, at=at(-30)),
        cloud_event("mes.erp.order.released.v1", "SO-2",
                    {"order_id": "SO-2", "part_number": "P-2", "quantity": 5,
                     "due": "2026-03-04T00:00:00+01:00"}, at=at(-20)),
        cloud_event(machine + "availability.v1", "M1", {"availability": "AVAILABLE"}),
        cloud_event(machine + "execution.v1", "M1",
                    {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O1"}),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}, at=at(1)),
        cloud_event(machine + "execution.v1", "M2", {"execution": "ACTIVE"}, at=at(5)),
        cloud_event("mes.erp.order.changed.v1", "SO-1", {"order_id": "SO-1", "quantity": 120},
                    at=at(10)),
        cloud_event("mes.erp.order.cancelled.v1", "SO-2", {"order_id": "SO-2", "reason": "dup"},
                    at=at(12)),
        cloud_event(machine + "execution.v1", "M1", {"execution": "READY"}, at=at(60)),
        cloud_event(machine + "condition.v1", "M1",
                    {"level": "fault", "native_code": "1010", "message": "spindle"}, at=at(61)),
        cloud_event(machine + "condition.v1", "M1", {"level": "normal"}, at=at(69)),
        cloud_event(machine + "execution.v1", "M1", {"execution": "ACTIVE"}, at=at(70)),
        cloud_event(machine + "execution.v1", "M2", {"execution": "STOPPED"}, at=at(90)),
        cloud_event("mes.operator.scrap.v1", "M1", {"quantity": 2, "reason": "burr"}, at=at(95)),
        cloud_event("mes.operator.order_ended.v1", "M1", {"order_id": "SO-1"}, at=at(120)),
        cloud_event(machine + "execution.v1", "M1", {"execution": "READY"}, at=at(121)),
        # Late: the reason for M1's stop, after the stop ended; an out-of-order counter reading.
        cloud_event("mes.operator.downtime_reason.v1", "M1",
                    {"reason": "mechanical/spindle", "start": "2026-03-02T07:00:00Z",
                     "end": "2026-03-02T07:10:00Z", "operator": "op1"}, at=at(125)),
    ]  # fmt: skip
    counts = [
        cloud_event(machine + "partcount.v1", "M1", {"count": n, "kind": "all"}, at=at(n))
        for n in range(0, 120, 2)
    ]
    bad = cloud_event(machine + "partcount.v1", "M1", {"count": 1, "kind": "bad"}, at=at(50))
    # One came in through the API: its key named by the hub (signed by the hub's publisher).
    by_key = cloud_event(machine + "execution.v1", "M2", {"execution": "READY"}, at=at(100))
    by_key = by_key.model_copy(
        update={"mesactorkind": "key", "mesactorid": "k-42", "mesactorrole": "operator"}
    )
    return [*events[:6], *counts[::-1], bad, *events[6:], by_key]


async def make_original(settings: Settings) -> None:
    """A hub that takes ``history`` (its own plant configuration and forecasts besides) and is
    closed with everything stored and projected."""
    hub = await build_hub(settings, plant=PLANT)
    try:
        await hub.stop_forecast_watch()
        # The hub's own events between: a forecast round (a forecast and progress) while SO-1
        # runs, as of 100 minutes in.
        middle = T0 + at(100)
        await hub.publisher.publish_many([e for e in history() if e.time < middle])
        await hub.wait_caught_up(60)
        assert await hub.forecast_watch.check(middle) == 2
        await hub.publisher.publish_many([e for e in history() if e.time >= middle])
        await hub.wait_caught_up(60)
    finally:
        await hub.close()


def export(settings: Settings, path: Path, selection: Selection = Selection()) -> ExportStats:
    store = EventStore(settings, read_only=True)
    stats = ExportStats()
    try:
        with path.open("wb") as file:
            for event in exported_events(store, selection, stats, batch=50):
                file.write(export_line(event))
    finally:
        store.close()
    return stats


@dataclass
class Seen:
    """What the hub's readers say of a hub (timestamps of the store left out)."""

    machines: dict[str, dict[str, Any]]
    orders: dict[str, dict[str, Any]]
    timelines: dict[str, Any]
    oee: dict[tuple[str, str | None], Any]
    site_oee: Any
    progress: dict[str, Any]
    order_pages: Any


def _state(aggregate: Machine | Order) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k not in ("_created_on", "_modified_on")}


def seen(settings: Settings) -> Seen:
    store = EventStore(settings, read_only=True)
    views = open_views(settings)
    try:
        facts, orders = FactsReader(views), OrdersReader(views)
        reports = Reports(store, facts, orders, "default", PLANT)
        machines = {m.machine_id: m for m in store.machines("default")}
        all_orders = {o.order_id: o for o in store.orders("default")}
        return Seen(
            machines={k: _state(m) for k, m in machines.items()},
            orders={k: _state(o) for k, o in all_orders.items()},
            timelines={m: reports.machine_timeline(m, WINDOW, NOW) for m in machines},
            oee={
                (m, by): reports.machine_oee(m, WINDOW, by, NOW)
                for m in machines
                for by in ("hour", "order", None)
            },
            site_oee=reports.site_oee(WINDOW, "shift", NOW),
            progress={
                k: progress_and_forecast(o, facts, PLANT, NOW) for k, o in all_orders.items()
            },
            order_pages=[orders.page("default", status=s) for s in ("ended", "cancelled")],
        )
    finally:
        views.close()
        store.close()


@pytest.fixture
def original(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "original")


@pytest.fixture
async def exported(original: Settings, tmp_path: Path) -> Path:
    await make_original(original)
    path = tmp_path / "history.jsonl"
    stats = export(original, path)
    assert stats.exported == len(history()) + 1 + 2  # the plant; SO-1's forecast and progress
    return path


def lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield from file


def no_progress(stage: str, done: int, total: int | None) -> None:
    pass


async def check_import(original: Settings, exported: Path, target: Settings) -> None:
    report = await import_events(target, events_to_import(lines(exported)), no_progress)
    count = sum(1 for _ in lines(exported))
    assert (report.published, report.applied, report.rejected) == (count, count, 0)
    assert report.views and min(report.views.values()) == report.stored_position
    before, after = seen(original), seen(target)
    assert after.machines == before.machines
    assert after.orders == before.orders
    assert after.timelines == before.timelines
    assert after.oee == before.oee
    assert after.site_oee == before.site_oee
    assert after.progress == before.progress
    assert after.order_pages == before.order_pages
    # What the figures are made of is there: a stop with its reason, parts, an order that ran.
    (day,) = before.site_oee
    figures = day.figures
    assert figures.actual_production_time_s > 0 and figures.produced > 0
    assert figures.scrapped == 2  # (one bad-counter reading is its baseline: no bad part)
    assert figures.downtime_s_by_reason.get("mechanical/spindle") == 600
    assert before.orders["SO-1"]["status"] == "ended"
    assert before.orders["SO-1"]["delivery_forecast_changes"] == 1
    # Exported again: the same CloudEvents, actors included; the positions and recorded times
    # are the new hub's.
    again_path = exported.with_name(f"again-{target.store}.jsonl")
    again = export(target, again_path)
    first = {e.event.id: e for e in events_to_import(lines(exported))}
    second = {e.event.id: e for e in events_to_import(lines(again_path))}
    assert {k: e.event for k, e in second.items()} == {k: e.event for k, e in first.items()}
    assert again.exported == count
    assert max(e.position or 0 for e in second.values()) <= report.stored_position
    recorded = [json.loads(line)[RECORDED_TIME] for line in lines(again_path)]
    original_recorded = [json.loads(line)[RECORDED_TIME] for line in lines(exported)]
    assert min(recorded) > max(original_recorded)


async def test_sqlite_to_sqlite(original: Settings, exported: Path, tmp_path: Path) -> None:
    await check_import(original, exported, load_settings(data_dir=tmp_path / "imported"))


@pytest.mark.postgres
async def test_sqlite_to_postgres(
    original: Settings, exported: Path, tmp_path: Path, postgres_dsn: str
) -> None:
    await check_import(original, exported, postgres_settings(postgres_dsn, tmp_path / "imported"))


async def test_an_import_into_a_hub_that_ran_is_refused(
    original: Settings, exported: Path, tmp_path: Path
) -> None:
    why = refuse_a_used_target(original)
    assert why is not None and "NATS stream" in why
    store_only = original.model_copy(update={"data_dir": tmp_path / "store-only"})
    store = EventStore(store_only)
    store.close()
    (tmp_path / "store-only" / "mes-hub.sqlite").unlink(missing_ok=True)
    assert refuse_a_used_target(store_only) is None  # an empty store is fine
    export_path = tmp_path / "one.jsonl"
    export(original, export_path, Selection(first=1, last=3))
    report = await import_events(store_only, events_to_import(lines(export_path)), no_progress)
    assert report.applied >= 1
    why = refuse_a_used_target(store_only.model_copy(update={"data_dir": tmp_path / "x"}))
    assert why is None
    # Its store holds events now (its NATS data moved aside: the store alone refuses).
    nats_dir = store_only.nats_data_dir
    nats_dir.rename(tmp_path / "nats-aside")
    why = refuse_a_used_target(store_only)
    assert why is not None and "holds events already" in why


def test_recorded_times_and_positions_are_in_each_line(original: Settings, exported: Path) -> None:
    for item in events_to_import(lines(exported)):
        assert item.position is not None and item.site == "default"
    first = json.loads(next(lines(exported)))
    assert POSITION in first and RECORDED_TIME in first
