"""Randomised differential test of the facts view against whole histories: messy facts
(equal timestamps for readings, order taps, scrap and reasons; jumps to 2^63-1, drops to 0,
re-based counters; late and same-moment order taps; scrap with and without an order; open and
unknown reasons, some starting at the very moment of a report) stored in random arrival orders.
For every window and grouping, the view (the window's facts plus their context) must give what
the whole history gives, also as known at a position of the log, and so must the machine's state
reports alone (``FactsReader.states``: when it ran, as the API's check of a reason reads it); two
arrival orders of the same facts must give the same figures, and the machine's counter totals
must be the history's after every batch.

Two availability (or two execution) reports at the very same instant are taken in the order
they were stored: the histories have such ties, which the view must take as the history does;
the second arrival order keeps each tie's order (it is what decides).

A reason with no end ends where the machine next runs, which may be long before the window: the
view must leave out those a run ended before it and bring what decides the end of the others."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.domain import Machine, Origin, order_runs
from projections.processes.confirmations import totals_of_many
from projections.rules.calendar import Interval
from projections.rules.counters import counter_totals
from projections.rules.history import machine_facts
from projections.rules.plant import MachinePlantConfig, PlantConfig
from projections.rules.progress import Run, order_parts, order_progress
from projections.rules.report import GroupBy, facts_window, machine_timeline, report_from_facts
from projections.rules.timeline import running_stretches
from projections.views import facts_view
from projections.views.database import SQLiteViews
from projections.views.facts_view import FactsReader, MachineFactsView, facts_of_runs

T0 = datetime(2026, 3, 2, tzinfo=UTC)
BIG = 2**63 - 1
GROUPINGS: tuple[GroupBy | None, ...] = (None, "hour", "day", "order", "shift")


def messy_facts(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    # Many facts share a minute, so ties at one timestamp are common.
    times = sorted(
        T0 + timedelta(seconds=rng.choice([rng.randint(0, 20_000), rng.randint(0, 200) * 60]))
        for _ in range(n)
    )
    counts = {"all": 0, "bad": 0}
    facts: list[tuple[Any, ...]] = []
    reported: list[datetime] = []  # availability and execution times so far
    begun: list[datetime] = []  # reasons' starts so far
    for i, t in enumerate(times):
        r = rng.random()
        if 0.35 <= r < 0.62:
            # Two availability or execution reports at the very same microsecond are taken in
            # the order they were stored (docs/oee.md): keep those apart; all else may tie.
            t += timedelta(microseconds=i)
        if r < 0.35:
            kind = "all" if rng.random() < 0.8 else "bad"
            x = rng.random()
            if x < 0.05:
                count = BIG
            elif x < 0.1:
                count = 0
            elif x < 0.13:
                count = 50_000 + counts[kind]
            else:
                counts[kind] += rng.randint(0, 3)
                count = counts[kind]
            facts.append(("count", t, kind, count))
        elif r < 0.55:
            reported.append(t)
            facts.append(
                ("exec", t, rng.choice(["ACTIVE", "READY", "STOPPED", "UNAVAILABLE"]),
                 rng.choice([None, "P1", "P2"]))
            )  # fmt: skip
        elif r < 0.62:
            reported.append(t)
            facts.append(("avail", t, rng.choice(["AVAILABLE", "UNAVAILABLE"])))
        elif r < 0.72:
            facts.append(("start", t, rng.choice("ABC")))
        elif r < 0.80:
            facts.append(("end", t, rng.choice("ABC")))
        elif r < 0.88:
            facts.append(("scrap", t, rng.choice([None, "A", "B"]), rng.randint(1, 3)))
        else:
            start = t - timedelta(seconds=rng.randint(0, 3000))
            if reported and rng.random() < 0.25:
                start = rng.choice(reported)  # at the very moment of a report
            elif begun and rng.random() < 0.25:
                start = rng.choice(begun)  # another tap for the same stop
            begun.append(start)
            # Open-ended: ends where the machine next runs (an operator's tablet gives these).
            end = None if rng.random() < 0.4 else start + timedelta(seconds=rng.randint(1, 5000))
            reason = rng.choice(["mechanical/spindle", "planned/maintenance", "no/such/code"])
            facts.append(("reason", t, reason, start, end))
    return facts


def _tie(fact: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What a report ties with: another of its kind at its very instant."""
    return (fact[0], fact[1]) if fact[0] in ("exec", "avail") else None


def with_ties(rng: random.Random, facts: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``facts`` (in arrival order) with another report of the same kind at the very instant of
    some availability and execution reports, arriving at some later point."""
    tied = list(facts)
    for fact in facts:
        if _tie(fact) is not None and rng.random() < 0.3:
            if fact[0] == "exec":
                other = ("exec", fact[1], rng.choice(["ACTIVE", "READY", "STOPPED"]), fact[3])
            else:
                other = ("avail", fact[1], rng.choice(["AVAILABLE", "UNAVAILABLE"]))
            after = tied.index(fact) + 1
            tied.insert(rng.randint(after, len(tied)), other)
    return tied


def keeping_ties(order: list[tuple[Any, ...]], stored_first: list[tuple[Any, ...]]) -> list[Any]:
    """``order``, another arrival order of ``stored_first``'s facts, with the reports tied at
    one instant in the order they were first stored."""
    ties: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for fact in stored_first:
        if (key := _tie(fact)) is not None:
            ties.setdefault(key, []).append(fact)
    return [fact if (key := _tie(fact)) is None else ties[key].pop(0) for fact in order]


def stored(facts: list[tuple[Any, ...]]) -> tuple[Machine, list[Any]]:
    machine = Machine(site="s", machine_id="M1")
    for i, fact in enumerate(facts):
        origin = Origin(f"id{i}", "urn:test", fact[1])
        match fact[0]:
            case "count":
                machine.report_part_count(origin, fact[2], fact[3])
            case "exec":
                machine.report_execution(origin, fact[2], None, fact[3])
            case "avail":
                machine.report_availability(origin, fact[2])
            case "start":
                machine.start_order(origin, fact[2])
            case "end":
                machine.end_order(origin, fact[2])
            case "scrap":
                machine.report_scrap(origin, fact[2], fact[3], "burr")
            case "reason":
                machine.give_downtime_reason(origin, fact[2], fact[3], fact[4], "op-1", None)
    return machine, list(machine.collect_events())[1:]  # without "Registered"


def ideal(order_ids: Any) -> dict[str, tuple[float | None, str | None]]:
    return {o: ({"A": 10.0, "B": 20.0}[o], None) for o in order_ids if o in ("A", "B")}


@pytest.mark.parametrize("seed", range(100))
def test_the_view_agrees_with_the_whole_history_on_messy_facts(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    if seed % 2:
        # The view reads the reports after an open reason's start a page at a time, and the
        # open reasons before a window too: pages of one and two, so that moments split
        # across pages are met.
        monkeypatch.setattr(facts_view, "_FIRST_PAGE", 1)
        monkeypatch.setattr(facts_view, "_LAST_PAGE", 2)
        monkeypatch.setattr(facts_view, "_REASON_PAGE", 1)
    # A third of the histories have a commissioning date, often after the machine's first
    # reports: not_commissioned before it, yet a reason with no end ends at the first run the
    # machine reports, as the view (which knows no commissioning date) finds it.
    commissioned = T0 + timedelta(seconds=rng.randint(0, 8000))
    plant = PlantConfig(
        max_parts_per_reading=1000,
        micro_stop_threshold_s=rng.choice([0, 120, 600]),
        reasons={"mechanical": {"spindle": "unplanned"}, "planned": {"maintenance": "planned"}},
        machines={"M1": MachinePlantConfig(commissioned=commissioned)} if seed % 3 == 0 else {},
    )
    rules = plant.machine_rules("M1")
    facts = messy_facts(rng, rng.randint(5, 80))
    rng.shuffle(facts)
    facts = with_ties(rng, facts)
    machine, events = stored(facts)
    other = list(facts)
    rng.shuffle(other)
    _, other_arrival = stored(keeping_ties(other, facts))
    views = SQLiteViews(tmp_path / "views.sqlite")
    view = MachineFactsView()
    with views.transaction() as cursor:
        view.create(cursor, "sqlite")
        view.create_indexes(cursor)
    reader = FactsReader(views)
    # The machine's totals from the view as the events arrive in three batches (the reader
    # folds on what came after, or again from the start when a reading came late), and from
    # the history of what was stored so far.
    positioned = list(enumerate(events, 1))
    thirds = len(positioned) // 3
    for batch in (positioned[:thirds], positioned[thirds : 2 * thirds], positioned[2 * thirds :]):
        with views.transaction() as cursor:
            view.apply(cursor, batch)
        so_far = [event for position, event in positioned if position <= batch[-1][0]]
        whole = counter_totals(machine_facts(so_far).readings, rules.max_parts_per_reading)
        from_view = reader.counter_totals(machine.id, rules.max_parts_per_reading)
        assert (from_view.produced, from_view.bad, from_view.resets, from_view.implausible) == (
            whole.produced, whole.bad, whole.resets, whole.implausible,
        )  # fmt: skip
        if whole.last_implausible is not None:
            assert from_view.last_implausible == whole.last_implausible
    history = machine_facts(events).settle(rules)
    again = machine_facts(other_arrival).settle(rules)
    assert reader.current_order(machine.id) == (
        history.orders[-1].order_id if history.orders else None
    )
    now = T0 + timedelta(seconds=rng.randint(0, 30_000))
    moments = sorted({fact[1] for fact in facts})
    # Windows whose facts begin at the very start of a reason, too.
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    begins = [fact[3] + margin for fact in facts if fact[0] == "reason"]
    for _ in range(8):
        start = rng.choice([*moments, *begins, T0 + timedelta(seconds=rng.randint(0, 20_000))])
        later = [t for t in moments if t > start]
        end = rng.choice([*later, start + timedelta(seconds=rng.randint(1, 20_000))])
        window = Interval(start, end)
        windowed = reader.window(machine.id, facts_window(window, plant)).settle(rules)
        expected = machine_timeline(history, window, plant, now)
        # When it ran, by its state reports alone (the micro-stop threshold's margin read too).
        states = reader.states(machine.id, facts_window(window, plant))
        assert running_stretches(states, window, margin) == running_stretches(
            history.states, window, margin
        )
        assert machine_timeline(windowed, window, plant, now) == expected
        assert machine_timeline(again, window, plant, now) == expected
        for group_by in GROUPINGS:
            report = report_from_facts(history, ideal, window, group_by, plant, now)
            assert report_from_facts(windowed, ideal, window, group_by, plant, now) == report
            assert report_from_facts(again, ideal, window, group_by, plant, now) == report
        # As known at a position of the log: only what was stored up to it counts.
        cut = rng.randint(1, len(events))
        known = reader.as_known_at(cut).window(machine.id, facts_window(window, plant))
        then = machine_facts(events[:cut]).settle(rules)
        assert machine_timeline(known.settle(rules), window, plant, now) == machine_timeline(
            then, window, plant, now
        )
        states = reader.as_known_at(cut).states(machine.id, facts_window(window, plant))
        assert running_stretches(states, window, margin) == running_stretches(
            then.states, window, margin
        )
    views.close()


@pytest.mark.parametrize("seed", range(60))
def test_confirmed_totals_read_per_machine_equal_each_order_s_own(
    seed: int, tmp_path: Path
) -> None:
    """The confirmation watch counts a round's orders from one window per machine
    (``totals_of_many``); each order's figures must be those of its own window
    (``facts_of_runs``) and of its progress (``order_progress``), on messy facts."""
    rng = random.Random(1000 + seed)
    plant = PlantConfig(max_parts_per_reading=1000, micro_stop_threshold_s=rng.choice([0, 120]))
    # Every history runs order A at least once (a start and a later end), so each seed
    # compares something.
    facts = [
        *messy_facts(rng, rng.randint(5, 80)),
        ("start", T0 + timedelta(hours=1), "A"),
        ("end", T0 + timedelta(hours=3), "A"),
    ]
    _, events = stored(facts)
    views = SQLiteViews(tmp_path / "views.sqlite")
    view = MachineFactsView()
    with views.transaction() as cursor:
        view.create(cursor, "sqlite")
        view.create_indexes(cursor)
        view.apply(cursor, list(enumerate(events, 1)))
    reader = FactsReader(views)
    now = T0 + timedelta(seconds=30_000)
    wanted = []
    for order_id in "ABC":
        moves = [
            {"machine_id": "M1", "time": fact[1].isoformat(), "started": fact[0] == "start"}
            for fact in facts
            if fact[0] in ("start", "end") and fact[2] == order_id
        ]
        runs = [
            Run("M1", datetime.fromisoformat(r["start"]),
                datetime.fromisoformat(r["end"]) if r["end"] else None)
            for r in order_runs(moves)
        ]  # fmt: skip
        # What one confirmation covers: the first runs to end, whole, and of the others
        # (or none) what they made up to a shift end (as the watch asks).
        ended = sorted((r for r in runs if r.end is not None), key=lambda r: r.end or r.start)
        whole = ended[: rng.randint(1, len(ended))] if ended else []
        cut = T0 + timedelta(seconds=rng.randint(0, 20_000))
        clipped = [
            Run("M1", r.start, r.end if r.end is not None and r.end <= cut else cut)
            for r in runs
            if r not in whole and r.start < cut and rng.random() < 0.7
        ]
        if whole or clipped:
            wanted.append((order_id, whole + clipped))
    assert wanted  # (order A ran)
    together = totals_of_many("s", wanted, reader, plant, now)
    for (order_id, runs), (good, scrap) in zip(wanted, together, strict=True):
        own = facts_of_runs(reader, "s", order_id, runs, plant, now, parts_only=True)
        parts = order_parts(order_id, runs, own, now)
        assert (good, scrap) == (parts.good, parts.scrapped), order_id
        whole = facts_of_runs(reader, "s", order_id, runs, plant, now)
        progress = order_progress(order_id, None, None, runs, whole, plant, now)
        assert (good, scrap) == (progress.good, progress.scrapped), order_id
    views.close()
