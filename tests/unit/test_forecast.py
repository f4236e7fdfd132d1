"""Delivery forecast: remaining work placed into future shift time only."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from projections.rules.calendar import Calendar, ShiftPattern
from projections.rules.forecast import forecast, production_end

WEEKDAYS_EARLY = ShiftPattern(
    "early", time(6), time(14), frozenset(range(5)), ((time(10), time(10, 30)),)
)
CALENDAR = Calendar(patterns=(WEEKDAYS_EARLY,))


def on(day: int, hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 3, day, hh, mm, tzinfo=UTC)  # 2026-03-02 is a Monday


def test_work_carries_over_to_the_next_shift() -> None:
    # Monday 12:00-14:00 gives 2 h; the third hour is Tuesday 06:00-07:00.
    assert production_end(CALENDAR, on(2, 12), 3 * 3600) == on(3, 7)


def test_the_break_is_not_production_time() -> None:
    # 09:00-10:00, break, 10:30-11:30.
    assert production_end(CALENDAR, on(2, 9), 2 * 3600) == on(2, 11, 30)


def test_the_weekend_is_skipped() -> None:
    # Friday 13:00-14:00, then Monday 06:00-07:00.
    assert production_end(CALENDAR, on(6, 13), 2 * 3600) == on(9, 7)


def test_the_observed_effective_cycle_time_drives_the_eta() -> None:
    # 60 good parts in 1 h of planned busy time: 60 s each; 120 left = 2 h from Monday 09:00.
    result = forecast(CALENDAR, on(2, 9), on(2, 12), 120, 3600, 60, 45.0)
    assert (result.basis, result.effective_cycle_time_s) == ("observed", 60.0)
    assert result.eta == on(2, 11, 30)
    assert result.status == "on_track"


def test_an_eta_after_the_due_date_is_at_risk_and_a_passed_due_date_is_late() -> None:
    assert forecast(CALENDAR, on(2, 9), on(2, 11), 120, 3600, 60, None).status == "at_risk"
    assert forecast(CALENDAR, on(2, 13), on(2, 12), 10, 3600, 60, None).status == "late"
    assert forecast(CALENDAR, on(2, 13), on(2, 12), 0, 3600, 60, None).status == "done"


def test_before_the_first_good_part_the_ideal_cycle_time_stands_in() -> None:
    result = forecast(CALENDAR, on(2, 6), None, 60, 0, 0, 30.0)
    assert (result.basis, result.eta, result.status) == ("ideal", on(2, 6, 30), None)
    assert forecast(CALENDAR, on(2, 6), None, 60, 0, 0, None).eta is None


def test_no_shifts_within_a_year_gives_no_eta() -> None:
    never = Calendar(patterns=(ShiftPattern("x", time(6), time(14), frozenset()),))
    result = forecast(never, on(2, 6), on(3, 6), 5, 0, 0, 60.0)
    assert result.eta is None and result.status == "at_risk"
    assert result.effective_cycle_time_s == pytest.approx(60.0)


def test_a_done_forecast_is_not_announced_again_as_the_clock_moves() -> None:
    from datetime import UTC, datetime, timedelta

    from hub.domain import Order, Origin
    from projections.processes.forecast_watch import forecast_change
    from projections.rules.forecast import Forecast

    order = Order(site="s", order_id="SO-1")
    order.release(Origin("e1", "erp", datetime(2026, 3, 2, tzinfo=UTC)),
                  {"quantity": 10, "due": datetime(2026, 3, 3, tzinfo=UTC)})  # fmt: skip
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    first = forecast_change(order, Forecast(now, "done", None, "observed"), 0, timedelta(0))
    assert first is not None and first["status"] == "done"
    order.record_delivery_forecast(Origin("f1", "hub", now), first)
    later = now + timedelta(hours=5)
    assert (
        forecast_change(order, Forecast(later, "done", None, "observed"), 0, timedelta(0)) is None
    )


def test_a_start_tapped_twice_does_not_count_the_overlap_twice() -> None:
    from datetime import UTC, datetime, timedelta

    from projections.rules.history import MachineFacts
    from projections.rules.plant import PlantConfig
    from projections.rules.progress import Run, order_progress
    from projections.rules.timeline import OrderReport, StateReport

    t0 = datetime(2026, 3, 2, 6, tzinfo=UTC)
    facts = MachineFacts(states=[StateReport(t0, availability="AVAILABLE"),
                                 StateReport(t0, execution="ACTIVE")],
                         orders=[OrderReport(t0, "SO-1")])  # fmt: skip
    once = [Run("M1", t0, t0 + timedelta(hours=2))]
    twice = [Run("M1", t0, None), Run("M1", t0 + timedelta(minutes=30), t0 + timedelta(hours=2))]
    now = t0 + timedelta(hours=2)
    args = ("SO-1", 10, 60.0)
    single = order_progress(*args, once, {"M1": facts}, PlantConfig(), now)
    double = order_progress(*args, twice, {"M1": facts}, PlantConfig(), now)
    assert single.running_time_s == double.running_time_s == 7200
