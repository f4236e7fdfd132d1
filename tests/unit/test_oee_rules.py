"""ISO 22400 OEE business rules as worked examples with hand-computed answers."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from projections.rules.calendar import Calendar, Interval, PlannedStop, ShiftPattern, local_days
from projections.rules.oee import OeeFigures, PartsReport, ScrapReport, by_order, compute_oee
from projections.rules.timeline import (
    OrderReport,
    ReasonReport,
    RunningStretch,
    StateReport,
    TimelineInterval,
    build_timeline,
    running_stretches,
)

DAY = date(2026, 3, 2)  # a Monday
EARLY = ShiftPattern("early", time(6), time(14), breaks=((time(10), time(10, 30)),))
SHIFT = Interval(datetime(2026, 3, 2, 6, tzinfo=UTC), datetime(2026, 3, 2, 14, tzinfo=UTC))
LATER = datetime(2026, 3, 3, tzinfo=UTC)  # "now": the shift is over


def at(hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(2026, 3, 2, hh, mm, ss, tzinfo=UTC)


def active(t: datetime) -> StateReport:
    return StateReport(t, execution="ACTIVE")


def stopped(t: datetime, execution: str = "STOPPED") -> StateReport:
    return StateReport(t, execution=execution)


def oee_of(
    reports: list[StateReport], calendar: Calendar | None = None, **kw: object
) -> OeeFigures:
    calendar = calendar or Calendar(patterns=(EARLY,))
    timeline = build_timeline(
        SHIFT,
        calendar,
        [StateReport(at(5), availability="AVAILABLE"), *reports],
        orders=kw.pop("orders", ()),  # type: ignore[arg-type]
        reasons=kw.pop("reasons", ()),  # type: ignore[arg-type]
        planned_reasons={"planned/changeover": True, "material/waiting": False},
    )
    return compute_oee(
        SHIFT,
        timeline,
        kw.pop("parts", ()),  # type: ignore[arg-type]
        kw.pop("scrap", ()),  # type: ignore[arg-type]
        by_order(kw.pop("pri", {})),  # type: ignore[arg-type]
        now=LATER,
    )


def test_a_10_minute_stop_in_an_8_hour_shift_with_a_30_minute_break_gives_440_of_450() -> None:
    figures = oee_of([active(at(6)), stopped(at(8)), active(at(8, 10))])
    assert figures.planned_busy_time_s == 450 * 60
    assert figures.actual_production_time_s == 440 * 60
    assert figures.availability == pytest.approx(440 / 450)
    assert figures.downtime_s_by_reason == {"unassigned": 600}
    assert figures.planned_stop_s_by_reason == {"planned/break": 1800}


def test_micro_stops_count_as_running_and_longer_stops_do_not() -> None:
    micro = oee_of([active(at(6)), stopped(at(7), "INTERRUPTED"), active(at(7, 1, 30))])
    assert micro.actual_production_time_s == 450 * 60  # the 90 s stop is a speed loss
    longer = oee_of([active(at(6)), stopped(at(7), "INTERRUPTED"), active(at(7, 3))])
    assert longer.actual_production_time_s == 447 * 60


def test_planned_maintenance_is_taken_out_of_planned_busy_time() -> None:
    maintenance = PlannedStop(Interval(at(12), at(13)), "planned/maintenance")
    calendar = Calendar(patterns=(EARLY,), planned_stops=(maintenance,))
    figures = oee_of([active(at(6)), stopped(at(12)), active(at(13))], calendar)
    assert figures.planned_busy_time_s == (480 - 30 - 60) * 60
    assert figures.availability == 1.0
    assert figures.downtime_s_by_reason == {}


def test_an_order_switch_mid_shift_weights_each_part_by_its_own_ideal_cycle_time() -> None:
    parts = [PartsReport(at(6, 0, 30) + timedelta(minutes=i), "all", 1, "A") for i in range(200)]
    parts += [
        PartsReport(at(10, 31) + timedelta(seconds=30 * i), "all", 1, "B") for i in range(400)
    ]
    figures = oee_of(
        [active(at(6))],
        orders=[OrderReport(at(6), "A"), OrderReport(at(10, 30), "B")],
        parts=parts,
        pri={"A": 60.0, "B": 30.0},
    )
    assert figures.ideal_time_s == 200 * 60 + 400 * 30  # 24,000 s
    assert figures.actual_production_time_s == 450 * 60  # 27,000 s
    assert figures.performance == pytest.approx(24_000 / 27_000)


def test_bad_parts_and_operator_scrap_reduce_good_quantity() -> None:
    figures = oee_of(
        [active(at(6))],
        parts=[PartsReport(at(7), "all", 100, "A"), PartsReport(at(7), "bad", 4, "A")],
        scrap=[ScrapReport(at(9), 6, "A")],
        pri={"A": 60.0},
    )
    assert (figures.produced, figures.bad, figures.scrapped, figures.good) == (100, 4, 6, 90)
    assert figures.quality == pytest.approx(0.9)


def test_a_late_reason_relabels_the_stop_it_covers() -> None:
    reports = [active(at(6)), stopped(at(8)), active(at(8, 40))]
    before = oee_of(reports)
    assert before.downtime_s_by_reason == {"unassigned": 2400}
    waiting = ReasonReport(at(8), at(8, 40), "material/waiting", given_at=at(11))
    after = oee_of(reports, reasons=[waiting])
    assert after.downtime_s_by_reason == {"material/waiting": 2400}
    assert after.availability == before.availability  # still unplanned
    # A planned reason makes it a planned stop: out of PBT, availability back to 1.
    changeover = ReasonReport(at(8), at(8, 40), "planned/changeover", given_at=at(12))
    relabelled = oee_of(reports, reasons=[waiting, changeover])
    assert relabelled.planned_busy_time_s == (450 - 40) * 60
    assert relabelled.availability == 1.0


def test_an_out_of_order_event_lands_where_it_belongs() -> None:
    in_order = [active(at(6)), stopped(at(8)), active(at(8, 10))]
    scrambled = [active(at(8, 10)), active(at(6)), stopped(at(8))]
    assert oee_of(scrambled).actual_production_time_s == oee_of(in_order).actual_production_time_s


def test_offline_time_is_unassigned_unplanned_downtime() -> None:
    reports = [
        active(at(6)),
        StateReport(at(8), availability="UNAVAILABLE"),
        StateReport(at(8, 30), availability="AVAILABLE"),
    ]
    figures = oee_of(reports)
    assert figures.planned_busy_time_s == 450 * 60
    assert figures.actual_production_time_s == 420 * 60
    assert figures.downtime_s_by_reason == {"unassigned": 1800}


def test_before_any_report_nothing_is_known_and_that_is_not_production() -> None:
    figures = oee_of([active(at(7))])
    assert figures.actual_production_time_s == 390 * 60
    assert figures.downtime_s_by_reason == {"unassigned": 3600}


def test_a_night_shift_crossing_midnight_is_eight_hours_and_splits_at_midnight() -> None:
    night = ShiftPattern("night", time(22), time(6))
    calendar = Calendar(patterns=(night,))
    window = Interval(at(20), datetime(2026, 3, 3, 8, tzinfo=UTC))
    shifts = calendar.shifts(window)
    assert [(s.name, s.interval.seconds / 3600) for s in shifts] == [("night", 8.0)]
    days = local_days(window, ZoneInfo("UTC"))
    assert [d.seconds / 3600 for d in days] == [4.0, 8.0]
    timeline = build_timeline(window, calendar, [StateReport(at(20), "AVAILABLE", "ACTIVE")])
    busy = [
        compute_oee(d, timeline, [], [], by_order({}), LATER).planned_busy_time_s / 3600
        for d in days
    ]
    assert busy == [2.0, 6.0]


def test_on_the_spring_dst_day_in_berlin_the_night_shift_is_7_hours_and_the_day_23() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    calendar = Calendar(time_zone=berlin, patterns=(ShiftPattern("night", time(22), time(6)),))
    window = Interval(
        datetime(2026, 3, 28, 12, tzinfo=berlin), datetime(2026, 3, 29, 12, tzinfo=berlin)
    )
    (shift,) = calendar.shifts(window)
    assert shift.interval.seconds == 7 * 3600  # 22:00 CET to 06:00 CEST
    days = local_days(
        Interval(datetime(2026, 3, 29, tzinfo=berlin), datetime(2026, 3, 30, tzinfo=berlin)),
        berlin,
    )
    assert [d.seconds / 3600 for d in days] == [23.0]


def test_a_site_figure_adds_times_and_counts_never_averages_ratios() -> None:
    full = oee_of([active(at(6))])  # A = 450/450
    maintenance = PlannedStop(Interval(at(6), at(12, 30)), "planned/maintenance")
    mostly_planned = oee_of(
        [stopped(at(6)), active(at(13))],
        Calendar(patterns=(EARLY,), planned_stops=(maintenance,)),
    )  # PBT 12:30-14:00 = 90 min, APT 60 min: A = 2/3
    site = OeeFigures(SHIFT.start, SHIFT.end)
    site.add(full)
    site.add(mostly_planned)
    assert site.availability == pytest.approx((450 + 60) / (450 + 90))
    assert site.availability != pytest.approx((1 + 2 / 3) / 2)


def test_zero_denominators_give_none_not_an_error() -> None:
    sunday_off = Calendar(patterns=(ShiftPattern("early", time(6), time(14), frozenset({6})),))
    figures = oee_of([active(at(6))], sunday_off)  # 2026-03-02 is a Monday: no shift
    assert figures.planned_busy_time_s == 0
    assert (figures.availability, figures.performance, figures.quality, figures.oee) == (
        None,
        None,
        None,
        None,
    )


def test_an_open_bucket_is_provisional() -> None:
    timeline = build_timeline(SHIFT, Calendar(patterns=(EARLY,)), [active(at(6))])
    assert compute_oee(SHIFT, timeline, [], [], {}, now=at(9)).provisional
    assert not compute_oee(SHIFT, timeline, [], [], {}, now=LATER).provisional


def test_default_calendar_is_one_24_hour_shift_a_day_in_utc() -> None:
    day = Interval(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC))
    (shift,) = Calendar().shifts(day)
    assert shift.interval == day and shift.planned_stops == ()


# --- open-ended reasons (docs/oee.md, Reasons) --------------------------------------------------

PLANNED = {"planned/changeover": True, "material/waiting": False}
# Stopped 08:00-08:40, running 08:40-09:00, stopped 09:00-09:30, running again.
TWO_STOPS = [active(at(6)), stopped(at(8)), active(at(8, 40)), stopped(at(9)), active(at(9, 30))]


def timeline_of(
    reports: list[StateReport], reasons: list[ReasonReport], window: Interval = SHIFT
) -> list[TimelineInterval]:
    return build_timeline(
        window,
        Calendar(patterns=(EARLY,)),
        [StateReport(at(5), availability="AVAILABLE"), *reports],
        reasons=reasons,
        planned_reasons=PLANNED,
    )


def stops(timeline: list[TimelineInterval]) -> list[tuple[datetime, datetime, str | None]]:
    return [(i.start, i.end, i.reason) for i in timeline if i.state in ("stopped", "offline")]


def test_an_open_ended_reason_labels_only_the_stop_it_was_given_for() -> None:
    # Tapped at 08:05 for the stop going on (from 08:00), with no end: it ends where the
    # machine runs again, 08:40. The stop at 09:00 is another one, still to be labelled.
    tapped = ReasonReport(at(8), None, "material/waiting", given_at=at(8, 5))
    assert stops(timeline_of(TWO_STOPS, [tapped])) == [
        (at(8), at(8, 40), "material/waiting"),
        (at(9), at(9, 30), "unassigned"),
    ]
    figures = oee_of(TWO_STOPS, reasons=[tapped])
    assert figures.downtime_s_by_reason == {"material/waiting": 2400, "unassigned": 1800}
    # A window that opens after the run (08:50): the reason, given before it, labels nothing.
    later = Interval(at(8, 50), at(14))
    assert stops(timeline_of(TWO_STOPS, [tapped], later)) == [(at(9), at(9, 30), "unassigned")]
    # One that opens mid-stop (08:10): the reason still labels the rest of its stop.
    mid = Interval(at(8, 10), at(14))
    assert stops(timeline_of(TWO_STOPS, [tapped], mid)) == [
        (at(8, 10), at(8, 40), "material/waiting"),
        (at(9), at(9, 30), "unassigned"),
    ]


def test_an_open_ended_reason_given_while_the_machine_runs_covers_nothing() -> None:
    for start in (at(8, 50), at(8, 40)):  # running; and the very moment it runs again
        given = ReasonReport(start, None, "material/waiting", given_at=at(8, 55))
        assert stops(timeline_of(TWO_STOPS, [given])) == [
            (at(8), at(8, 40), "unassigned"),
            (at(9), at(9, 30), "unassigned"),
        ]
    # From the very moment the machine stops, it labels that stop.
    at_the_stop = ReasonReport(at(9), None, "material/waiting", given_at=at(9, 5))
    assert stops(timeline_of(TWO_STOPS, [at_the_stop]))[1] == (at(9), at(9, 30), "material/waiting")


def test_an_open_ended_reason_in_a_micro_stop_covers_nothing_and_ends_at_no_later_stop() -> None:
    # A 60 s stop at 07:00 is a micro-stop: running. A reason tapped in it labels no later stop.
    reports = [active(at(6)), stopped(at(7)), active(at(7, 1)), *TWO_STOPS[1:]]
    given = ReasonReport(at(7, 0, 30), None, "material/waiting", given_at=at(7, 0, 40))
    assert stops(timeline_of(reports, [given])) == [
        (at(8), at(8, 40), "unassigned"),
        (at(9), at(9, 30), "unassigned"),
    ]


def test_an_open_ended_reason_over_offline_time_ends_when_the_machine_runs_again() -> None:
    # Executing ACTIVE all along, but UNAVAILABLE 08:00-08:30: offline, not running, until the
    # machine is back at 08:30. Then it stops at 09:00: unassigned.
    reports = [
        active(at(6)),
        StateReport(at(8), availability="UNAVAILABLE"),
        StateReport(at(8, 30), availability="AVAILABLE"),
        stopped(at(9)),
        active(at(9, 30)),
    ]
    given = ReasonReport(at(8), None, "material/waiting", given_at=at(8, 10))
    assert stops(timeline_of(reports, [given])) == [
        (at(8), at(8, 30), "material/waiting"),
        (at(9), at(9, 30), "unassigned"),
    ]


def test_overlapping_reasons_never_make_a_figure_negative_whatever_their_order() -> None:
    """Point85 issue #9: overlapping manual entries gave negative availability. Here seven
    reasons, planned and unplanned, open and closed, some over running time (as NATS keeps
    them), overlap one stop 08:00-09:00; the latest given wins on each stretch of it."""
    reports = [active(at(6)), stopped(at(8)), active(at(9))]
    reasons = [
        ReasonReport(at(7, 30), at(8, 20), "planned/changeover", given_at=at(8, 10)),
        ReasonReport(at(8, 10), None, "material/waiting", given_at=at(8, 15)),  # to 09:00
        ReasonReport(at(7), None, "planned/changeover", given_at=at(8, 20)),  # ran: nothing
        ReasonReport(at(8, 30), at(10), "material/waiting", given_at=at(8, 25)),
        ReasonReport(at(8, 40), at(8, 50), "planned/changeover", given_at=at(8, 30)),
        ReasonReport(at(8, 45), None, "unknown/code", given_at=at(8, 35)),  # to 09:00
        # Given at the same moment as the one before: the order is fixed by span, then code.
        ReasonReport(at(8, 45), None, "material/waiting", given_at=at(8, 35)),
    ]
    expected = [
        (at(8), at(8, 10), "planned_stop", "planned/changeover"),
        (at(8, 10), at(8, 40), "stopped", "material/waiting"),
        (at(8, 40), at(8, 45), "planned_stop", "planned/changeover"),
        (at(8, 45), at(9), "stopped", "unknown/code"),
    ]
    rng = random.Random(85)
    orders = [reasons, reasons[::-1], *(rng.sample(reasons, len(reasons)) for _ in range(200))]
    for given in orders:
        timeline = timeline_of(reports, given)
        labelled = [
            (i.start, i.end, i.state, i.reason)
            for i in timeline
            if at(8) <= i.start < at(9) and i.state != "running"
        ]
        assert labelled == expected
        figures = compute_oee(SHIFT, timeline, [], [], by_order({}), now=LATER)
        assert figures.planned_stop_s_by_reason == {
            "planned/break": 1800,
            "planned/changeover": 900,
        }
        assert figures.downtime_s_by_reason == {"material/waiting": 1800, "unknown/code": 900}
        assert figures.planned_busy_time_s == (480 - 30 - 15) * 60
        assert figures.actual_production_time_s == (480 - 30 - 60) * 60
        assert figures.availability == pytest.approx(390 / 435)
        values = [
            figures.planned_busy_time_s,
            figures.actual_production_time_s,
            *figures.downtime_s_by_reason.values(),
            *figures.planned_stop_s_by_reason.values(),
        ]
        assert all(value >= 0 for value in values)
        assert figures.availability is not None and 0 <= figures.availability <= 1
        # The shift is planned busy time plus planned stops; planned busy time is production
        # time plus unplanned downtime.
        planned = sum(figures.planned_stop_s_by_reason.values())
        downtime = sum(figures.downtime_s_by_reason.values())
        assert figures.planned_busy_time_s + planned == SHIFT.seconds
        assert figures.actual_production_time_s + downtime == figures.planned_busy_time_s


# --- when the machine ran, by its own reports (the API's check of a reason, docs/oee.md rule 15) -

MINUTES_2 = timedelta(seconds=120)


def test_running_stretches_are_the_machine_s_own_whatever_the_calendar_says() -> None:
    # Running 07:00-09:40, in the break 10:00-10:30 and at 15:00-15:10, after the shift: the
    # timeline shows the break as planned_stop and 15:00 as no_shift; the machine ran in both.
    reports = [
        StateReport(at(5), availability="AVAILABLE"),
        active(at(7)),
        stopped(at(9, 40)),
        active(at(10)),
        stopped(at(10, 30)),
        active(at(15)),
        stopped(at(15, 10)),
    ]
    stretches = running_stretches(reports, Interval(at(9), at(16)), MINUTES_2)
    assert stretches == [
        RunningStretch(at(9), at(9, 40)),
        RunningStretch(at(10), at(10, 30)),
        RunningStretch(at(15), at(15, 10)),
    ]
    timeline = build_timeline(Interval(at(9), at(16)), Calendar(patterns=(EARLY,)), reports)
    assert [next(i.state for i in timeline if i.start <= t < i.end) for t in (at(10), at(15))] == [
        "planned_stop",
        "no_shift",
    ]


def test_running_stretches_count_a_micro_stop_as_running_and_say_where_it_was() -> None:
    reports = [active(at(6)), stopped(at(7), "INTERRUPTED"), active(at(7, 1)), stopped(at(8))]
    (stretch,) = running_stretches(reports, Interval(at(6, 30), at(9)), MINUTES_2)
    assert stretch == RunningStretch(at(6, 30), at(8), (Interval(at(7), at(7, 1)),))
    # Cut by the window's edge, the stop is judged by its whole length (the reports within the
    # threshold of the window say it): 60 s, a micro-stop; 3 minutes is a stop.
    (inside,) = running_stretches(reports, Interval(at(7, 0, 30), at(7, 0, 50)), MINUTES_2)
    assert inside == RunningStretch(
        at(7, 0, 30), at(7, 0, 50), (Interval(at(7, 0, 30), at(7, 0, 50)),)
    )
    longer = [active(at(6)), stopped(at(7)), active(at(7, 3))]
    assert running_stretches(longer, Interval(at(7, 0, 30), at(7, 0, 50)), MINUTES_2) == []
    # A stop at the end of what is known is not a micro-stop: it may go on.
    assert running_stretches(reports, Interval(at(7, 59), at(8, 0, 30)), MINUTES_2) == [
        RunningStretch(at(7, 59), at(8))
    ]


def test_running_stretches_know_offline_and_reports_of_one_moment() -> None:
    # ACTIVE yet UNAVAILABLE is offline; of two reports of one moment the one stored last holds.
    reports = [
        active(at(6)),
        StateReport(at(7), availability="UNAVAILABLE"),
        StateReport(at(7, 30), availability="AVAILABLE"),
        stopped(at(8), "READY"),
        active(at(8)),
        active(at(9)),
        stopped(at(9), "READY"),
    ]
    assert running_stretches(reports, Interval(at(6), at(10)), timedelta(0)) == [
        RunningStretch(at(6), at(7)),
        RunningStretch(at(7, 30), at(9)),
    ]


def a_report(rng: random.Random) -> StateReport:
    """An availability or execution report of 06:00-08:00, often on a whole minute (ties)."""
    t = at(6) + timedelta(seconds=rng.choice([rng.randint(0, 7200), 60 * rng.randint(0, 120)]))
    if rng.random() < 0.2:
        return StateReport(t, availability=rng.choice(["AVAILABLE", "UNAVAILABLE"]))
    return StateReport(t, execution=rng.choice(["ACTIVE", "ACTIVE", "READY", "STOPPED"]))


def test_running_stretches_are_the_timeline_s_running_on_random_reports() -> None:
    """With a calendar of one shift all day and the machine there from the first report, the
    stretches are the timeline's running time (micro-stops too), over any window."""
    rng = random.Random(15)
    for _ in range(300):
        reports = sorted((a_report(rng) for _ in range(rng.randint(0, 30))), key=lambda r: r.time)
        micro = timedelta(seconds=rng.choice([0, 60, 120, 600]))
        start = at(6) + timedelta(seconds=rng.randint(-600, 7200))
        window = Interval(start, start + timedelta(seconds=rng.randint(1, 7200)))
        wide = Interval(window.start - micro, window.end + micro)
        timeline = build_timeline(wide, Calendar(), reports, micro_stop=micro, exists_from=at(0))
        expected: list[RunningStretch] = []
        for interval in timeline:
            part = Interval(interval.start, interval.end).clip(window)
            if interval.state != "running" or part is None:
                continue
            stops = (part,) if interval.micro_stop else ()
            if expected and expected[-1].end == part.start:
                last = expected.pop()
                expected.append(RunningStretch(last.start, part.end, last.micro_stops + stops))
            else:
                expected.append(RunningStretch(part.start, part.end, stops))
        assert running_stretches(reports, window, micro) == expected
