"""Projections on a real hub: the view agrees with the stored history, a rebuild equals the
incrementally built view, and a projection process killed mid-stream resumes without losing or
duplicating a fact."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from adapters.machines.simulator import SimulatorConfig, machine_name, run_simulator
from hub.bootstrap import Hub, build_hub
from hub.domain import machine_aggregate_id
from hub.settings import Settings
from hub.store import EventStore
from projections.rules.calendar import Interval
from projections.rules.history import machine_facts
from projections.rules.plant import PlantConfig, ShiftConfig
from projections.rules.progress import Run, order_progress
from projections.rules.report import GroupBy, facts_window, machine_timeline, report_from_facts
from projections.views.database import SQLiteViews
from projections.views.facts_view import TABLE, FactsReader, MachineFactsView, facts_of_runs
from projections.views.orders_view import OrdersReader
from projections.views.runner import ProjectionWorker
from tests.conftest import fresh_schema

START = datetime(2026, 3, 2, 5, 0, tzinfo=UTC)
MACHINES = 6
# Two shifts with a break, and the simulator's reasons, one of them planned: the calendar and
# the catalog shape the timeline, so they must shape it the same way on both paths.
PLANT = PlantConfig(
    shifts=[
        ShiftConfig(name="early", start=time(6), end=time(14), breaks=[(time(10), time(10, 30))]),
        ShiftConfig(name="late", start=time(14), end=time(22)),
    ],
    reasons={
        "mechanical": {"spindle": "unplanned"},
        "material": {"waiting": "unplanned"},
        "tooling": {"change": "planned"},
        "quality": {"inspection": "unplanned"},
    },
    micro_stop_threshold_s=120,
)


async def simulate(hub: Hub, events: int) -> None:
    config = SimulatorConfig(machines=MACHINES, seed=7, start=START, site=hub.settings.site)
    await run_simulator(config, hub.publisher, speed=0, max_events=events)
    await hub.wait_caught_up(timeout=120)


def rows(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as connection:
        return connection.execute(f"SELECT * FROM {TABLE} ORDER BY position").fetchall()


def windows(rng: random.Random, end: datetime) -> list[Interval]:
    """Whole days and shifts, plus windows cut at odd moments (mid-stop, mid-order)."""
    chosen = [Interval(START, end), Interval(START + timedelta(hours=1), START + timedelta(days=1))]
    for _ in range(6):
        start = START + timedelta(seconds=rng.uniform(0, (end - START).total_seconds()))
        chosen.append(Interval(start, start + timedelta(seconds=rng.uniform(600, 40_000))))
    return chosen


async def test_the_view_gives_the_same_timeline_oee_and_progress_as_the_whole_history(
    hub: Hub,
) -> None:
    await simulate(hub, 12_000)
    store, reader = hub.store, FactsReader(hub.views)
    site, now = hub.settings.site, datetime.now(UTC)
    last = max(m.last_event_time for m in store.machines(site) if m.last_event_time)
    rng = random.Random(3)
    compared = 0
    for index in range(MACHINES):
        machine_id = machine_name(index)
        rules = PLANT.machine_rules(machine_id)
        history = machine_facts(store.machine_history(site, machine_id)).settle(rules)
        ideal = partial(store.order_cycle_facts, site)
        ideal_from_view = partial(OrdersReader(hub.views).order_cycle_facts, site)
        for window in windows(rng, last):
            view = reader.window(
                machine_aggregate_id(site, machine_id), facts_window(window, PLANT)
            ).settle(rules)
            assert machine_timeline(view, window, PLANT) == machine_timeline(history, window, PLANT)
            group_by: GroupBy | None
            for group_by in (None, "hour", "shift", "day", "order"):
                expected = report_from_facts(history, ideal, window, group_by, PLANT, now)
                report = report_from_facts(view, ideal_from_view, window, group_by, PLANT, now)
                assert report == expected
                compared += len(expected)
    assert compared > 500  # the run covered enough buckets for the comparison to mean something

    orders = [o for o in store.orders(site) if o.runs]
    assert len(orders) >= MACHINES
    for order in orders:
        runs = [
            Run(
                r["machine_id"],
                datetime.fromisoformat(r["start"]),
                datetime.fromisoformat(r["end"]) if r["end"] else None,
            )
            for r in order.runs
        ]
        from_history = {
            run.machine_id: machine_facts(store.machine_history(site, run.machine_id)).settle(
                PLANT.machine_rules(run.machine_id)
            )
            for run in runs
        }
        from_view = facts_of_runs(reader, site, order.order_id, runs, PLANT, now)
        arguments = (order.order_id, order.quantity, order.ideal_cycle_time_s, runs)
        assert order_progress(*arguments, from_view, PLANT, now) == order_progress(
            *arguments, from_history, PLANT, now
        )


async def test_a_rebuild_equals_the_view_built_incrementally_during_a_long_run(
    settings: Settings,
) -> None:
    # Small batches, so the live view is built in many steps while events keep arriving.
    hub = await build_hub(settings.model_copy(update={"projection_batch": 97}))
    try:
        await simulate(hub, 20_000)
        live = rows(settings.views_sqlite_path)
        rebuilt_path = settings.data_dir / "rebuilt.sqlite"
        rebuilt = SQLiteViews(rebuilt_path)
        worker = ProjectionWorker([MachineFactsView()], hub.store, rebuilt, batch_size=4_000)
        read = worker.rebuild()
        rebuilt.close()
        end = hub.store.last_position()
    finally:
        await hub.close()
    assert read == end > 20_000
    assert len(live) > 15_000
    assert rows(rebuilt_path) == live


def catch_up(data_dir: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hub", "projections", "catch-up", "--data-dir", str(data_dir)],
        env={**os.environ, "MES_HUB_PROJECTION_BATCH": "250", **env},
        capture_output=True,
        timeout=120,
    )


def tracked_position(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "views.sqlite") as connection:
        (position,) = connection.execute("SELECT position FROM mes_view_tracking").fetchone()
        return int(position)


async def test_a_projection_killed_mid_stream_resumes_and_loses_and_duplicates_nothing(
    settings: Settings,
) -> None:
    hub = await build_hub(settings, projections=False)
    try:
        await simulate(hub, 8_000)
    finally:
        await hub.close()
    stored = EventStore(settings)
    end = stored.last_position()

    killed = catch_up(settings.data_dir, MES_HUB_FAULT_KILL_AFTER_VIEW_BATCH="7")
    assert killed.returncode == -9, killed.stderr.decode()
    assert tracked_position(settings.data_dir) == 7 * 250  # seven batches committed, no more
    assert catch_up(settings.data_dir).returncode == 0
    assert tracked_position(settings.data_dir) == end

    reference_path = settings.data_dir / "reference.sqlite"
    reference = SQLiteViews(reference_path)
    ProjectionWorker([MachineFactsView()], stored, reference).rebuild()
    reference.close()
    stored.close()
    resumed = rows(settings.views_sqlite_path)
    assert resumed == rows(reference_path)
    # One row per fact: positions are unique and every one the reference has is there.
    assert len({row[0] for row in resumed}) == len(resumed) > 4_000


@pytest.mark.postgres
async def test_on_postgresql_the_live_view_equals_a_rebuild_and_the_history(
    settings: Settings, postgres_dsn: str
) -> None:
    schema = fresh_schema(postgres_dsn)
    on_postgres = settings.model_copy(
        update={
            "store": "postgres",
            "postgres_dsn": SecretStr(postgres_dsn),
            "postgres_schema": schema,
            "projection_batch": 300,
        }
    )
    hub = await build_hub(on_postgres)
    try:
        await simulate(hub, 5_000)
        select = f"SELECT * FROM {schema}.{TABLE} ORDER BY position"
        with psycopg.connect(postgres_dsn) as connection:
            live = connection.execute(select).fetchall()
        worker = ProjectionWorker([MachineFactsView()], hub.store, hub.views, batch_size=1_000)
        assert await asyncio.to_thread(worker.rebuild) == hub.store.last_position()
        with psycopg.connect(postgres_dsn) as connection:
            assert connection.execute(select).fetchall() == live
        site, machine_id = hub.settings.site, machine_name(0)
        window = Interval(START, START + timedelta(days=1))
        rules = PLANT.machine_rules(machine_id)
        view = (
            FactsReader(hub.views)
            .window(machine_aggregate_id(site, machine_id), facts_window(window, PLANT))
            .settle(rules)
        )
        history = machine_facts(hub.store.machine_history(site, machine_id)).settle(rules)
        assert len(live) > 3_000
        assert machine_timeline(view, window, PLANT) == machine_timeline(history, window, PLANT)
    finally:
        await hub.close()


async def test_rebuilding_one_view_while_the_hub_runs_leaves_every_view_following(
    settings: Settings,
) -> None:
    hub = await build_hub(settings.model_copy(update={"projection_batch": 300}))
    try:
        await simulate(hub, 3_000)
        # One view rebuilt alone, by another "process", while the hub's worker follows both.
        rebuild = ProjectionWorker([MachineFactsView()], hub.store, hub.views, batch_size=500)
        config = SimulatorConfig(machines=MACHINES, seed=8, start=START, site=hub.settings.site)
        more = asyncio.create_task(run_simulator(config, hub.publisher, speed=0, max_events=2_000))
        await asyncio.to_thread(rebuild.rebuild)
        await more
        await hub.wait_caught_up(timeout=60)  # every view reaches the end: no livelock
        positions = await hub.view_positions()
        reference_path = settings.data_dir / "reference.sqlite"
        reference = SQLiteViews(reference_path)
        ProjectionWorker([MachineFactsView()], hub.store, reference).rebuild()
        reference.close()
        end = hub.store.last_position()
    finally:
        await hub.close()
    assert set(positions.values()) == {end}
    assert rows(settings.views_sqlite_path) == rows(reference_path)


async def test_a_views_process_killed_again_and_again_is_restarted_and_loses_nothing(
    settings: Settings,
) -> None:
    # The views process kills itself (SIGKILL) after every fourth batch it commits; the hub
    # starts it again each time, and it resumes from the position it committed with its rows.
    crashing = settings.model_copy(
        update={"projection_batch": 400, "fault_kill_after_view_batch": 4}
    )
    hub = await build_hub(crashing)
    assert hub.views_process is not None
    try:
        await simulate(hub, 6_000)
        await hub.wait_projected(timeout=120)
        starts, child = hub.views_process.starts, hub.views_process.pid
        end = hub.store.last_position()
        reference_path = settings.data_dir / "reference.sqlite"
        reference = SQLiteViews(reference_path)
        ProjectionWorker([MachineFactsView()], hub.store, reference).rebuild()
        reference.close()
    finally:
        await hub.close()
    assert end > 6_000 and starts >= end // (4 * 400)  # killed every 1,600 events or so
    assert child is not None and child != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # closing the hub stopped its views process
    live = rows(settings.views_sqlite_path)
    assert live == rows(reference_path)
    assert len({row[0] for row in live}) == len(live) > 3_000
