"""Business rules of the Machine and Order aggregates, no I/O."""

from __future__ import annotations

from datetime import timedelta

from hub.domain import Machine, Order, Origin
from tests.conftest import T0

_n = iter(range(1, 10_000))


def at(seconds: float) -> Origin:
    return Origin(f"e{next(_n)}", "urn:test", T0 + timedelta(seconds=seconds))


def test_a_counter_reading_is_recorded_as_read_and_the_latest_by_event_time_is_current() -> None:
    # What readings add is decided by the projections (tests/unit/test_counters.py).
    machine = Machine(site="default", machine_id="M1")
    machine.report_part_count(at(120), "all", 14)
    machine.report_part_count(at(60), "all", 12)  # late: recorded, not current
    assert (machine.counter_values["all"], machine.counter_times["all"]) == (
        14,
        T0 + timedelta(seconds=120),
    )
    late = machine.collect_events()[-1]
    assert (late.count, late.event_time) == (12, T0 + timedelta(seconds=60))  # type: ignore[attr-defined]


def test_a_machine_has_reported_only_after_a_report_of_its_own() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.give_downtime_reason(at(0), "material/waiting", T0, None, "op-7", None)
    machine.start_order(at(1), "SO-1")
    assert not machine.has_reported()
    machine.report_execution(at(2), "ACTIVE", None, None)
    assert machine.has_reported()


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


def test_stream_and_consumer_sequence_and_pending_are_read_from_both_ack_subject_forms() -> None:
    from hub.pull import ack_fields

    assert ack_fields("$JS.ACK.MES.ingest-p0of1.1.4711.4700.1772430000000000000.12") == (
        4711,
        4700,
        12,
    )
    assert ack_fields(
        "$JS.ACK.hub.ACCHASH.MES.ingest-p0of1.1.4711.4700.1772430000000000000.12.x"
    ) == (4711, 4700, 12)
