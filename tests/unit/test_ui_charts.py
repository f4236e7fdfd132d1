"""The OEE pages' charts as worked examples (``hub.ui.charts``): the loss waterfall adds up to
the planned busy time exactly, the Pareto groups reasons by level and drills, the geometry
places what it is given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from hub.ui import charts
from hub.ui.charts import Span, pareto, seconds_text, to_micros, waterfall


def bars_of(chart: charts.Waterfall) -> list[tuple[str, str | None, str]]:
    return [(b.key, b.reason, b.text) for b in chart.bars]


def test_an_early_shift_s_waterfall_adds_up_to_its_planned_busy_time() -> None:
    # 06:00-14:00 less a 30-minute break: PBT 27,000 s. Stops: waiting for material 600 s,
    # the spindle 900 s, one nobody labelled 300 s: APT 25,200 s. 400 parts at 60 s ideal:
    # 24,000 s of ideal time, so 1,200 s were lost to speed. 8 bad and 2 scrapped: 390 good,
    # so 10/400 of the ideal time, 600 s, was spent on parts not good.
    chart = waterfall(
        27_000,
        25_200,
        24_000,
        produced=400,
        good=390,
        downtime_s_by_reason={
            "material/waiting": 600,
            "mechanical/spindle": 900,
            "unassigned": 300,
        },
    )
    assert bars_of(chart) == [
        ("planned_busy_time", None, "27000"),
        ("downtime", "mechanical/spindle", "900"),  # longest first
        ("downtime", "material/waiting", "600"),
        ("downtime", "unassigned", "300"),
        ("speed_loss", None, "1200"),
        ("quality_loss", None, "600"),
        ("fully_productive", None, "23400"),
    ]
    assert chart.adds_up() and chart.notes == [] and chart.difference_micros == 0
    assert sum(Decimal(b.text) for b in chart.parts) == Decimal(chart.start.text)
    # Fully productive time over PBT is the OEE: A x P x Q = 25200/27000 x 24000/25200 x 0.975.
    assert chart.bars[-1].seconds / chart.start.seconds == pytest.approx(
        25_200 / 27_000 * 24_000 / 25_200 * 390 / 400
    )
    # Each loss hangs from where the one before it left off, down to the productive time.
    lows = [(b.low, b.high) for b in chart.bars]
    assert lows[1] == (to_micros(26_100), to_micros(27_000))
    assert lows[-1] == (0, to_micros(23_400))


def test_the_float_noise_of_an_answer_does_not_break_the_sum() -> None:
    # 0.1 + 0.2 seconds of downtime and the like: counted in microseconds, exact.
    chart = waterfall(3600.3, 3600.0, 1800.0, 30, 30, {"a": 0.1, "b": 0.2})
    assert chart.adds_up() and chart.difference_micros == 0
    assert [b.text for b in chart.bars] == ["3600.3", "0.2", "0.1", "1800", "0", "1800"]


def test_performance_above_one_draws_no_negative_bar_and_says_why() -> None:
    # 55 parts at a 60 s ideal cycle (3,300 s) made in 3,000 s of running: P = 1.1.
    chart = waterfall(3600, 3000, 3300, produced=55, good=50, downtime_s_by_reason={
        "unassigned": 600})  # fmt: skip
    assert chart.performance_above_one
    assert all(b.micros >= 0 for b in chart.bars)
    speed, quality, productive = chart.bars[-3:]
    assert speed.key == "speed_loss" and speed.micros == 0
    # Quality loss and productive time split the 3,000 s of APT: 5/55 of it was not good.
    assert quality.micros == round(3_000 * US * 5 / 55)
    assert quality.micros + productive.micros == 3000 * US
    assert chart.adds_up()
    assert "Performance is above 1" in chart.notes[0] and "No negative bar" in chart.notes[0]


US = charts.US


def test_a_difference_between_pbt_minus_apt_and_the_reasons_is_its_own_bar() -> None:
    # docs/oee.md makes them equal; an answer where they are not is shown, not hidden.
    chart = waterfall(1000, 700, 700, 10, 10, {"mechanical/spindle": 200})
    assert [b.key for b in chart.bars] == [
        "planned_busy_time", "downtime", "difference", "speed_loss", "quality_loss",
        "fully_productive",
    ]  # fmt: skip
    assert chart.difference_micros == 100 * US and chart.bars[2].text == "100"
    assert chart.adds_up() and "should be 0" in chart.notes[0]


def test_no_planned_busy_time_and_parts_without_ideal_time_are_said() -> None:
    empty = waterfall(0, 0, 0, 0, 0, {})
    assert empty.adds_up() and [b.micros for b in empty.bars] == [0, 0, 0, 0]
    assert empty.notes == ["No planned busy time in this window: nothing to break down."]
    flagged = waterfall(3600, 3600, 1200, 30, 30, {}, parts_without_ideal_time=10)
    assert flagged.bars[1].key == "speed_loss" and flagged.bars[1].text == "2400"
    assert "10 parts had no ideal cycle time" in flagged.notes[0]


DOWNTIME = {
    "mechanical/spindle": 900.0,
    "material/waiting": 600.0,
    "mechanical/coolant": 300.0,
    "unassigned": 600.0,
}


def test_the_pareto_adds_reasons_up_by_their_first_level() -> None:
    chart = pareto(DOWNTIME)
    assert [(b.code, b.text, b.deeper) for b in chart.bars] == [
        ("mechanical", "1200", True),
        ("material", "600", True),  # a tie: by code
        ("unassigned", "600", False),
    ]
    assert [b.share for b in chart.bars] == [0.5, 0.25, 0.25]
    assert [b.cumulative for b in chart.bars] == [0.5, 0.75, 1.0]
    assert chart.total_text == "2400" and chart.drill is None and chart.up is None


def test_a_pareto_drill_shows_the_next_level_of_one_branch() -> None:
    chart = pareto(DOWNTIME, "mechanical")
    assert [(b.code, b.text, b.share, b.cumulative) for b in chart.bars] == [
        ("mechanical/spindle", "900", 0.75, 0.75),
        ("mechanical/coolant", "300", 0.25, 1.0),
    ]
    assert chart.total_text == "1200" and chart.up is None
    # Deeper codes, a code that is the branch itself, and a branch with a common prefix.
    deep = pareto(
        {"mechanical/spindle/bearing": 60, "mechanical/spindle/belt": 40, "mechanical": 5,
         "mechanicals/x": 1000},
        "mechanical/spindle",
    )  # fmt: skip
    assert [b.code for b in deep.bars] == ["mechanical/spindle/bearing", "mechanical/spindle/belt"]
    assert deep.up == "mechanical"
    top = pareto({"mechanical/spindle/bearing": 60, "mechanical": 5}, "mechanical")
    assert [(b.code, b.deeper) for b in top.bars] == [
        ("mechanical/spindle", True),
        ("mechanical", False),
    ]


def test_pareto_ties_are_ordered_by_code_and_nothing_is_an_empty_chart() -> None:
    tied = pareto({"b": 10, "a": 10, "c/x": 10})
    assert [b.code for b in tied.bars] == ["a", "b", "c"]
    assert pareto({}).bars == [] and pareto({"a": 1}, "zzz").bars == []


def test_seconds_text_writes_exact_decimals() -> None:
    assert [seconds_text(m) for m in (0, 27_000 * US, 12_500_000, 1, -1, -1_500_000)] == [
        "0", "27000", "12.5", "0.000001", "-0.000001", "-1.5",
    ]  # fmt: skip
    assert to_micros(0.1 + 0.2) == 300_000


def test_formats_for_people() -> None:
    assert charts.percent(0.97777) == "97.8 %" and charts.percent(None) == "—"
    assert [charts.duration(s) for s in (0, 45, 600, 610, 27_000, 90_000)] == [
        "0 s", "45 s", "10 min", "10 min 10 s", "7 h 30 min", "1 d 1 h",
    ]  # fmt: skip
    assert [charts.grouped(n) for n in (27000, 27000.0, 12.5, 0.000001)] == [
        "27,000", "27,000", "12.5", "0",
    ]  # fmt: skip


def test_waterfall_geometry_spans_the_axis_from_zero_to_pbt() -> None:
    chart = waterfall(27_000, 25_200, 24_000, 400, 390, {"a": 1_800})
    placed = charts.waterfall_geometry(chart, left=100, width=540, row=20, gap=5)
    assert (placed[0].x, placed[0].width) == (100, 540)  # PBT: the whole axis
    assert (placed[1].x, placed[1].width) == (100 + 504, 36)  # 1,800 s of 27,000 at the end
    assert (placed[-1].x, placed[-1].width) == (100, 468)  # 23,400 s from 0
    assert [p.y for p in placed] == [0, 25, 50, 75, 100]


def test_pareto_geometry_scales_bars_to_the_longest_and_the_line_to_the_total() -> None:
    geometry = charts.pareto_geometry(pareto(DOWNTIME), left=0, top=0, width=300, height=100)
    heights = [b.height for b in geometry.bars]
    assert heights == [100, 50, 50]
    assert [y for _, y in geometry.cumulative] == [50, 25, 0]
    assert charts.pareto_geometry(pareto({}), 0, 0, 300, 100).bars == []


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 3, 2, hh, mm, tzinfo=UTC)


def test_timeline_places_spans_and_merges_order_runs() -> None:
    start, end = at(6), at(14)
    assert charts.x_of(at(10), start, end, 100, 800) == 500
    assert charts.x_of(at(5), start, end, 100, 800) == 100  # clamped
    spans = [
        Span(at(6), at(8), "running", None, "SO-1"),
        Span(at(8), at(8, 10), "stopped", "unassigned", "SO-1"),
        Span(at(8, 10), at(9), "running", None, "SO-1"),
        Span(at(9), at(10), "running", None, None),
        Span(at(10), at(11), "running", None, "SO-2"),
    ]
    runs = charts.order_runs(spans)
    assert [(r.order_id, r.start, r.end) for r in runs] == [
        ("SO-1", at(6), at(9)),
        ("SO-2", at(10), at(11)),
    ]
    placed = charts.placed_spans([*spans, Span(at(15), at(16))], start, end, 0, 800)
    assert [(x, w) for _, x, w in placed][:2] == [(0, 200), (200, 16.67)]
    assert len(placed) == 5  # the span after the window is left out


def test_time_ticks_are_round_local_times() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    ticks = charts.time_ticks(at(5), at(13), berlin)  # 06:00-14:00 in Berlin (UTC+1)
    assert [label for _, label in ticks] == [f"{h:02d}:00" for h in range(6, 15)]
    assert ticks[0][0] == at(5)
    days = charts.time_ticks(at(0), at(0) + timedelta(days=7), ZoneInfo("UTC"))
    assert [label for _, label in days][:3] == ["03-02", "03-03", "03-04"]
