"""Trustworthy numbers on messy machine data (issue 8), as worked examples with hand-computed
answers: counters and orders by event time, windows as counter differences, implied
availability, a machine that exists from its first report, PRI fallbacks, unknown reasons,
implausible jumps and the future."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hub.domain import Machine, Origin
from projections.rules.calendar import Interval
from projections.rules.counters import (
    BASELINE,
    COUNTED,
    IMPLAUSIBLE,
    RESET,
    CounterReading,
    counter_steps,
    counter_totals,
)
from projections.rules.history import MachineFacts, machine_facts
from projections.rules.plant import PlantConfig
from projections.rules.report import machine_report, machine_timeline
from projections.rules.timeline import NOT_COMMISSIONED, OFFLINE, RUNNING, STOPPED

T0 = datetime(2026, 3, 2, 6, tzinfo=UTC)  # a Monday, 06:00 UTC
NOW = datetime(2026, 3, 4, tzinfo=UTC)
_ids = itertools.count(1)
BIG = 2**63 - 1


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def steps(*counts: int, limit: int = 10_000) -> list[tuple[int, str]]:
    readings = [CounterReading(at(i), "all", c) for i, c in enumerate(counts)]
    return [(s.increment, s.status) for s in counter_steps(readings, limit)]


# --- rule 1: counters by event time ------------------------------------------------------------


def test_the_first_reading_is_the_baseline_an_increase_adds_a_decrease_is_a_reset() -> None:
    # 500 (baseline), 502 (+2), 3 (reset: 3 made since), 5 (+2): 7 parts, one reset.
    assert steps(500, 502, 3, 5) == [(0, BASELINE), (2, COUNTED), (3, RESET), (2, COUNTED)]


def test_a_late_reading_between_two_known_ones_takes_its_share() -> None:
    # 10 at 06:00 and 20 at 06:02 give 10 parts at 06:02. A reading of 12 at 06:01 arriving
    # last splits them: 2 at 06:01 and 8 at 06:02, still 10 in all.
    known = [CounterReading(at(0), "all", 10), CounterReading(at(2), "all", 20)]
    late = CounterReading(at(1), "all", 12)
    before = [(s.reading.time, s.increment) for s in counter_steps(known, 10_000)]
    after = [(s.reading.time, s.increment) for s in counter_steps([*known, late], 10_000)]
    assert before == [(at(0), 0), (at(2), 10)]
    assert after == [(at(0), 0), (at(1), 2), (at(2), 8)]


def test_a_late_reading_older_than_all_others_counts_the_parts_up_to_them() -> None:
    # 14 at 06:01 arrives first, then 10 at 06:00, then 15: in time order 10, 14, 15 -> 5.
    readings = [
        CounterReading(at(1), "all", 14),
        CounterReading(at(0), "all", 10),
        CounterReading(at(2), "all", 15),
    ]
    assert counter_totals(readings, 10_000).produced == 5


def test_a_decrease_in_event_time_order_is_a_reset_even_when_it_arrives_first() -> None:
    # A new recording (time going back) read before the old one: 3 at 06:00, 1 at 05:00 is
    # not a reset; in time order 1 (05:00), 3 (06:00) adds 2.
    readings = [CounterReading(at(0), "all", 3), CounterReading(at(-60), "all", 1)]
    totals = counter_totals(readings, 10_000)
    assert (totals.produced, totals.resets) == (2, 0)


def _machine_events(arrival: list[int]) -> list[Any]:
    """A machine's stored events for one set of facts, stored in the arrival order given."""
    facts: list[Callable[[Machine], None]] = [
        lambda m: m.report_availability(_origin(0), "AVAILABLE"),
        lambda m: m.report_execution(_origin(0), "ACTIVE", None, "O100"),
        lambda m: m.report_part_count(_origin(0), "all", 100),
        lambda m: m.start_order(_origin(10), "SO-1"),
        lambda m: m.report_part_count(_origin(30), "all", 110),
        lambda m: m.report_execution(_origin(40), "STOPPED", None, None),
        lambda m: m.report_part_count(_origin(45), "all", 112),
        lambda m: m.report_part_count(_origin(50), "all", 2),  # reset
        lambda m: m.end_order(_origin(55), "SO-1"),
        lambda m: m.report_execution(_origin(60), "ACTIVE", None, None),
        lambda m: m.report_part_count(_origin(90), "all", 9),
        lambda m: m.report_part_count(_origin(90), "bad", 1),
        lambda m: m.report_part_count(_origin(0), "bad", 0),
    ]
    machine = Machine(site="default", machine_id="M1")
    for index in arrival:
        facts[index](machine)
    return machine.collect_events()


def _origin(minutes: float) -> Origin:
    return Origin(f"e{next(_ids)}", "urn:test", at(minutes))


def _settled(events: list[Any], plant: PlantConfig | None = None) -> MachineFacts:
    return machine_facts(events).settle((plant or PlantConfig()).machine_rules("M1"))


def test_the_same_readings_in_three_arrival_orders_give_the_same_parts_timeline_and_oee() -> None:
    # Hand-computed: 100 -> 110 (+10 at 06:30, SO-1) -> 112 (+2 at 06:45, SO-1) -> 2 (reset,
    # +2 at 06:50, SO-1) -> 9 (+7 at 07:30, no order): 21 parts, 14 of them for SO-1; 1 bad.
    # Running 06:00-06:40 and 07:00-08:00: APT 100 min of PBT 120 min.
    window = Interval(at(0), at(120))
    results = []
    for arrival in (
        list(range(13)),
        list(reversed(range(13))),
        [4, 7, 0, 12, 10, 2, 8, 11, 1, 5, 3, 9, 6],
    ):
        facts = _settled(_machine_events(arrival))
        (bucket,) = machine_report(facts, window, None, PlantConfig(), {}, NOW)
        timeline = machine_timeline(facts, window, PlantConfig(), NOW)
        by_order = {o: sum(p.increment for p in facts.parts if p.order_id == o and p.kind == "all")
                    for o in ("SO-1", None)}  # fmt: skip
        results.append((bucket.figures, timeline, by_order))
        figures = bucket.figures
        assert (figures.produced, figures.bad) == (21, 1)
        assert by_order == {"SO-1": 14, None: 7}
        assert (figures.planned_busy_time_s, figures.actual_production_time_s) == (7200, 6000)
    assert results[0] == results[1] == results[2]


# --- rule 2: orders by event time ---------------------------------------------------------------


def test_a_late_order_start_re_attributes_the_parts_it_covers() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(_origin(0), "all", 0)
    machine.report_part_count(_origin(20), "all", 5)
    machine.report_part_count(_origin(40), "all", 9)
    before = _settled(list(machine.collect_events()))
    assert [(p.increment, p.order_id) for p in before.parts] == [(5, None), (4, None)]
    # The operator's tap at 06:10 reaches the hub after the readings: the 4 parts made
    # between 06:20 and 06:40 were made while SO-1 ran; the 5 up to 06:20 partly before it,
    # and a reading tells only the total since the one before: they count for the order
    # running at the reading's time, SO-1.
    machine = Machine(site="default", machine_id="M1")
    for minutes, count in ((0, 0), (20, 5), (40, 9)):
        machine.report_part_count(_origin(minutes), "all", count)
    machine.start_order(_origin(10), "SO-1")
    machine.end_order(_origin(30), "SO-1")
    after = _settled(list(machine.collect_events()))
    assert [(p.increment, p.order_id) for p in after.parts] == [(5, "SO-1"), (4, None)]


def test_parts_reported_at_the_moment_an_order_starts_belong_to_the_order_before() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.start_order(_origin(0), "SO-1")
    machine.report_part_count(_origin(0), "all", 0)
    machine.report_part_count(_origin(30), "all", 6)  # made up to 06:30: SO-1's
    machine.end_order(_origin(30), "SO-1")
    machine.start_order(_origin(30), "SO-2")
    machine.report_part_count(_origin(60), "all", 10)
    facts = _settled(list(machine.collect_events()))
    assert [(p.increment, p.order_id) for p in facts.parts] == [(6, "SO-1"), (4, "SO-2")]


def test_scrap_without_an_order_belongs_to_the_order_running_at_its_time() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_scrap(_origin(20), None, 2, "burr")  # arrives before the start
    machine.start_order(_origin(10), "SO-1")
    machine.report_scrap(_origin(40), "SO-9", 1, "dent")  # names its order: kept
    facts = _settled(list(machine.collect_events()))
    assert sorted((s.quantity, s.order_id) for s in facts.scrap) == [(1, "SO-9"), (2, "SO-1")]


# --- rule 3: a window's parts are the counter at its end minus the counter at its start -------


def test_hourly_buckets_add_up_to_the_shift_when_the_last_reading_is_at_the_shift_end() -> None:
    # Shift 06:00-14:00; the counter reads 0 at 06:00, +10 every hour on the hour, and the last
    # reading (80) exactly at 14:00: it reports what was made up to 14:00, so the 13:00-14:00
    # bucket has its 10, the shift has 80, and the eight hours add up to the shift.
    plant = PlantConfig.model_validate(
        {"shifts": [{"name": "early", "start": "06:00", "end": "14:00"}]}
    )
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    for hour in range(9):
        machine.report_part_count(_origin(60 * hour), "all", 10 * hour)
    facts = machine_facts(machine.collect_events()).settle(plant.machine_rules("M1"))
    shift_window = Interval(at(0), at(480))
    hours = machine_report(facts, shift_window, "hour", plant, {}, NOW)
    (shift,) = machine_report(facts, shift_window, "shift", plant, {}, NOW)
    assert [b.figures.produced for b in hours] == [10] * 8
    assert shift.figures.produced == 80 == sum(b.figures.produced for b in hours)
    # The reading at 06:00 (the shift's start) belongs to the bucket before: it adds nothing.
    (before,) = machine_report(facts, Interval(at(-60), at(0)), None, plant, {}, NOW)
    assert before.figures.produced == 0


# --- rule 4: availability implied by execution -------------------------------------------------


def test_a_machine_reporting_execution_but_never_availability_is_available() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    machine.report_execution(_origin(60), "READY", None, None)
    machine.report_execution(_origin(90), "UNAVAILABLE", None, None)
    facts = _settled(list(machine.collect_events()))
    timeline = machine_timeline(facts, Interval(at(0), at(120)), PlantConfig(), NOW)
    assert [(i.state, i.seconds) for i in timeline] == [
        (RUNNING, 3600),
        (STOPPED, 1800),
        (OFFLINE, 1800),
    ]
    (bucket,) = machine_report(facts, Interval(at(0), at(120)), None, PlantConfig(), {}, NOW)
    assert bucket.figures.availability == pytest.approx(0.5)


# --- rule 5: a machine exists from its first report --------------------------------------------


def test_before_its_first_report_a_machine_has_no_busy_time_and_no_downtime() -> None:
    # First report Monday 06:00. Sunday: nothing, not a day of downtime. Monday: PBT from
    # 06:00 to midnight only (18 h), all of it running.
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    facts = _settled(list(machine.collect_events()))
    sunday = Interval(at(-30 * 60), at(-6 * 60))
    (before,) = machine_report(facts, sunday, None, PlantConfig(), {}, NOW)
    assert (before.figures.planned_busy_time_s, before.figures.downtime_s_by_reason) == (0, {})
    assert before.figures.availability is None
    monday = Interval(at(-6 * 60), at(18 * 60))
    (day,) = machine_report(facts, monday, None, PlantConfig(), {}, NOW)
    assert day.figures.planned_busy_time_s == 18 * 3600
    assert day.figures.availability == 1.0
    states = {i.state for i in machine_timeline(facts, sunday, PlantConfig(), NOW)}
    assert states == {NOT_COMMISSIONED}


def test_a_commissioning_date_makes_the_silence_before_the_first_report_downtime() -> None:
    # Commissioned 04:00, first report (ACTIVE) 06:00: 04:00-06:00 is offline downtime.
    plant = PlantConfig.model_validate({"machines": {"M1": {"commissioned": "2026-03-02T04:00Z"}}})
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    facts = machine_facts(machine.collect_events()).settle(plant.machine_rules("M1"))
    (bucket,) = machine_report(facts, Interval(at(-180), at(60)), None, plant, {}, NOW)
    assert bucket.figures.planned_busy_time_s == 3 * 3600  # from 04:00
    assert bucket.figures.downtime_s_by_reason == {"unassigned": 2 * 3600}


# --- rule 7: ideal cycle time without an ERP ---------------------------------------------------


def test_the_ideal_cycle_time_falls_back_to_part_number_program_then_machine() -> None:
    # Four hours, one reading an hour adding 10 parts each, under four orders/programs:
    # 06-07 SO-A (own PRI 30 s) -> 300 s; 07-08 SO-B, part P-7 (plant: 20 s) -> 200 s;
    # 08-09 program O42 (plant: 12 s), no order -> 120 s; 09-10 program O9: machine's 6 s
    # -> 60 s. Ideal time 680 s for 40 parts; none unflagged.
    plant = PlantConfig.model_validate(
        {
            "ideal_cycle_times": {"part_numbers": {"P-7": 20.0}, "programs": {"O42": 12.0}},
            "machines": {"M1": {"ideal_cycle_time_s": 6.0}},
        }
    )
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, "O1")
    machine.report_part_count(_origin(0), "all", 0)
    machine.start_order(_origin(0), "SO-A")
    machine.report_part_count(_origin(60), "all", 10)
    machine.end_order(_origin(60), "SO-A")
    machine.start_order(_origin(60), "SO-B")
    machine.report_part_count(_origin(120), "all", 20)
    machine.end_order(_origin(120), "SO-B")
    machine.report_execution(_origin(120), "ACTIVE", None, "O42")
    machine.report_part_count(_origin(180), "all", 30)
    machine.report_execution(_origin(180), "ACTIVE", None, "O9")
    machine.report_part_count(_origin(240), "all", 40)
    events = list(machine.collect_events())
    facts = machine_facts(events).settle(plant.machine_rules("M1"))

    def orders_pri(order_ids: Any) -> dict[str, tuple[float | None, str | None]]:
        # What the orders view answers: SO-A has its own PRI, SO-B only its part number.
        known = {"SO-A": (30.0, "P-7"), "SO-B": (None, "P-7")}  # SO-A: its own 30 s wins
        return {o: known[o] for o in order_ids if o in known}

    from projections.rules.report import report_from_facts

    (bucket,) = report_from_facts(facts, orders_pri, Interval(at(0), at(240)), None, plant, NOW)
    assert bucket.figures.ideal_time_s == 300 + 200 + 120 + 60
    assert bucket.figures.parts_without_ideal_time == 0
    # Without the machine's fallback the last 10 parts are counted and flagged.
    bare = PlantConfig.model_validate(
        {"ideal_cycle_times": {"part_numbers": {"P-7": 20.0}, "programs": {"O42": 12.0}}}
    )
    facts = machine_facts(events).settle(bare.machine_rules("M1"))
    (bucket,) = report_from_facts(facts, orders_pri, Interval(at(0), at(240)), None, bare, NOW)
    assert (bucket.figures.produced, bucket.figures.parts_without_ideal_time) == (40, 10)


# --- rule 8: unknown reason codes are kept and counted -----------------------------------------


def test_a_stop_labelled_with_an_unknown_code_is_unplanned_and_counted_as_a_warning() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    machine.report_execution(_origin(30), "STOPPED", None, None)
    machine.report_execution(_origin(40), "ACTIVE", None, None)
    machine.give_downtime_reason(_origin(45), "no/such/code", at(30), at(40), "op-1", None)
    facts = _settled(list(machine.collect_events()))
    (bucket,) = machine_report(facts, Interval(at(0), at(60)), None, PlantConfig(), {}, NOW)
    assert bucket.figures.downtime_s_by_reason == {"no/such/code": 600}
    assert bucket.figures.stops_with_unknown_reason == 1


# --- rule 9: the future is unknown --------------------------------------------------------------


def test_timeline_and_oee_end_at_now_and_the_open_part_is_provisional() -> None:
    # Running since 06:00; now is 07:00; asked 06:00-10:00: one hour known, A = 1, not 0.25.
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(_origin(0), "ACTIVE", None, None)
    facts = _settled(list(machine.collect_events()))
    now = at(60)
    window = Interval(at(0), at(240))
    timeline = machine_timeline(facts, window, PlantConfig(), now)
    assert [(i.state, i.start, i.end) for i in timeline] == [(RUNNING, at(0), now)]
    (bucket,) = machine_report(facts, window, None, PlantConfig(), {}, now)
    assert bucket.figures.planned_busy_time_s == 3600
    assert bucket.figures.availability == 1.0
    assert bucket.figures.provisional
    assert machine_timeline(facts, Interval(at(120), at(180)), PlantConfig(), now) == []


# --- rule 11: implausible counter jumps ---------------------------------------------------------


def test_a_jump_to_2_63_counts_nothing_is_kept_and_flagged() -> None:
    # 0 -> 2^63-1 -> 5 -> 2^63-1 used to give 18,446,744,073,709,551,614 parts. Now: the jumps
    # count nothing; 5 follows on from 0, so it adds 5.
    assert steps(0, BIG, 5, BIG) == [
        (0, BASELINE),
        (0, IMPLAUSIBLE),
        (5, COUNTED),
        (0, IMPLAUSIBLE),
    ]
    totals = counter_totals(
        [CounterReading(at(i), "all", c) for i, c in enumerate((0, BIG, 5, BIG))], 10_000
    )
    assert (totals.produced, totals.implausible) == (5, 2)
    assert totals.last_implausible is not None
    assert totals.last_implausible.reading.time == at(3)


def test_a_glitch_changes_nothing_and_a_re_based_counter_counts_on() -> None:
    # A glitch: 0, 10, 2^63-1, 15 -> 10 + 0 + 5 = 15, as without it.
    assert sum(i for i, _ in steps(0, 10, BIG, 15)) == sum(i for i, _ in steps(0, 10, 15)) == 15
    # A re-based counter (preset to 1,000,000 by the machine builder): 100, 1,000,000,
    # 1,000,001, 1,000,003 -> 0 + 1 + 2 = 3.
    assert steps(100, 1_000_000, 1_000_001, 1_000_003) == [
        (0, BASELINE),
        (0, IMPLAUSIBLE),
        (1, COUNTED),
        (2, COUNTED),
    ]


def test_the_limit_is_per_plant_and_per_machine() -> None:
    plant = PlantConfig.model_validate(
        {"max_parts_per_reading": 100, "machines": {"PRESS-2": {"max_parts_per_reading": 1000}}}
    )
    assert plant.machine_rules("LATHE-1").max_parts_per_reading == 100
    assert plant.machine_rules("PRESS-2").max_parts_per_reading == 1000
    assert steps(0, 150, limit=100) == [(0, BASELINE), (0, IMPLAUSIBLE)]
    assert steps(0, 150, limit=1000) == [(0, BASELINE), (150, COUNTED)]


def test_an_order_started_and_ended_at_one_moment_is_a_run_of_no_length() -> None:
    from projections.rules.history import order_reports

    t = at(10)
    # A runs from 06:00; at 06:10 A ends and B starts (a changeover), and C is started and
    # ended at once (a mistaken tap): after 06:10 B runs, in any arrival order.
    moves = [(at(0), "A", True), (t, "A", False), (t, "B", True)]
    for arrival in itertools.permutations(moves):
        assert [r.order_id for r in order_reports(arrival)] == ["A", "B"]
    zero = [(at(0), "A", True), (t, "C", True), (t, "C", False)]
    for arrival in itertools.permutations(zero):
        assert [r.order_id for r in order_reports(arrival)] == ["A", None]


def test_an_orders_runs_follow_event_time_whatever_order_the_taps_arrived_in() -> None:
    from hub.domain import Order

    taps = [("start", 10, "M1"), ("end", 30, "M1"), ("start", 40, "M1"), ("end", 50, "M1")]
    for arrival in itertools.permutations(taps):
        order = Order(site="default", order_id="SO-1")
        for kind, minutes, machine in arrival:
            tap = order.start_on if kind == "start" else order.end_on
            tap(_origin(minutes), machine)
        assert [(r["start"], r["end"]) for r in order.runs] == [
            (at(10).isoformat(), at(30).isoformat()),
            (at(40).isoformat(), at(50).isoformat()),
        ]
        assert (order.status, order.running_on) == ("ended", [])
