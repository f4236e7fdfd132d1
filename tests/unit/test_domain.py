"""Business rules of the Machine and Order aggregates, no I/O."""

from __future__ import annotations

from datetime import timedelta

from hub.domain import Machine, Order, Origin
from tests.conftest import T0

_n = iter(range(1, 10_000))


def at(seconds: float) -> Origin:
    return Origin(f"e{next(_n)}", "urn:test", T0 + timedelta(seconds=seconds))


def test_first_counter_reading_is_the_baseline_and_counts_nothing() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 41_250)
    assert machine.parts_produced == 0


def test_each_increase_adds_the_difference() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 100)
    machine.report_part_count(at(60), "all", 101)
    machine.report_part_count(at(120), "all", 104)
    assert machine.parts_produced == 4


def test_a_decrease_is_a_reset_and_the_new_value_counts_as_made_since() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 500)
    machine.report_part_count(at(60), "all", 502)  # +2
    machine.report_part_count(at(120), "all", 3)  # reset: 3 made since
    machine.report_part_count(at(180), "all", 5)  # +2
    assert machine.parts_produced == 7
    assert machine.counter_resets == 1


def test_bad_counter_is_counted_apart_from_all() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 10)
    machine.report_part_count(at(0), "bad", 2)
    machine.report_part_count(at(60), "all", 15)
    machine.report_part_count(at(60), "bad", 3)
    assert (machine.parts_produced, machine.parts_bad) == (5, 1)


def test_a_late_counter_reading_is_kept_but_counts_nothing() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 10)
    machine.report_part_count(at(120), "all", 14)
    machine.report_part_count(at(60), "all", 12)  # arrives late: already inside 14
    events = machine.collect_events()
    late = events[-1]
    assert machine.parts_produced == 4
    assert late.late is True and late.count == 12  # type: ignore[attr-defined]
    assert late.event_time == T0 + timedelta(seconds=60)  # type: ignore[attr-defined]


def test_a_late_reading_older_than_the_baseline_counts_the_parts_up_to_it() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(60), "all", 14)  # arrives first: the baseline so far
    machine.report_part_count(at(0), "all", 10)  # made earlier, arrives late
    machine.report_part_count(at(120), "all", 15)
    # In time order: 10, 14, 15 -> 5 parts, whatever order they arrived in.
    assert machine.parts_produced == 5


def test_an_older_execution_report_is_recorded_with_its_own_time_but_does_not_win() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(at(300), "ACTIVE", "AUTOMATIC", "O1000")
    machine.report_execution(at(100), "STOPPED", None, None)
    assert machine.execution == "ACTIVE"
    assert machine.state_since == T0 + timedelta(seconds=300)
    times = [e.event_time for e in machine.collect_events()[1:]]  # type: ignore[attr-defined]
    assert times == [T0 + timedelta(seconds=300), T0 + timedelta(seconds=100)]


def test_state_since_moves_only_when_execution_changes() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_execution(at(0), "ACTIVE", None, "O1")
    machine.report_execution(at(50), "ACTIVE", None, "O2")
    assert machine.state_since == T0
    assert machine.program == "O2"


def test_normal_condition_without_code_clears_all_alarms() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_condition(at(0), "fault", "1010", "SPINDLE OVERLOAD")
    machine.report_condition(at(1), "warning", "2043", "COOLANT LOW")
    machine.report_condition(at(2), "normal", "1010", None)
    assert list(machine.conditions) == ["2043"]
    machine.report_condition(at(3), "normal", None, None)
    assert machine.conditions == {}


def test_parts_are_attributed_to_the_running_order() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(0), "all", 0)
    machine.start_order(at(1), "SO-1")
    machine.report_part_count(at(2), "all", 1)
    machine.end_order(at(3), "SO-1")
    machine.report_part_count(at(4), "all", 2)
    orders = [e.order_id for e in machine.collect_events() if hasattr(e, "increment")]  # type: ignore[attr-defined]
    assert orders == [None, "SO-1", None]


def test_order_lifecycle_release_start_end_cancel() -> None:
    order = Order(site="default", order_id="SO-1")
    assert order.status == "unreleased"
    order.release(at(0), {"part_number": "P-1", "quantity": 100, "ideal_cycle_time_s": 30.0})
    assert order.status == "released"
    order.start_on(at(10), "M1")
    assert (order.status, order.running_on) == ("running", ["M1"])
    order.end_on(at(20), "M1")
    assert order.status == "ended"
    assert order.runs[0]["end"] == (T0 + timedelta(seconds=20)).isoformat()
    order.change(at(30), {"quantity": 120})
    order.cancel(at(40), "customer withdrew")
    assert (order.status, order.quantity, order.cancelled_reason) == (
        "cancelled",
        120,
        "customer withdrew",
    )


def test_stream_sequence_is_read_from_both_ack_subject_forms() -> None:
    from hub.ingest import stream_sequence

    assert stream_sequence("$JS.ACK.MES.ingest-p0of1.1.4711.4700.1772430000000000000.12") == 4711
    assert (
        stream_sequence("$JS.ACK.hub.ACCHASH.MES.ingest-p0of1.1.4711.4700.1772430000000000000.12.x")
        == 4711
    )
