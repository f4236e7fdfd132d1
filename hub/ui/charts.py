"""What the OEE pages draw, computed without I/O: the loss waterfall, the downtime Pareto, the
timeline's geometry, and the few number formats the pages share. The pages render these with
their templates (SVG drawn on the server); ``tests/unit/test_ui_charts.py`` works examples.

Times are counted here in whole microseconds (``to_micros``): the hub's event times are exact
to the microsecond, so every figure of the API's answer is a whole number of them, and bars
counted in them add up exactly — the float sums of the answer may be off in the last bit.
``seconds_text`` writes such a count back as an exact decimal (``"27000"``, ``"12.5"``).

The waterfall (docs/oee.md: PBT counts running, stopped and offline time; APT the running time,
micro stops included; downtime the stopped and offline time by reason)::

    planned busy time (PBT)
      - unplanned downtime, one bar per reason          (PBT - APT)
      - speed loss            APT - ideal time
      - quality loss          ideal time * (PQ - GQ) / PQ
      = fully productive time ideal time * GQ / PQ

PBT - APT is the sum of ``downtime_s_by_reason`` by construction; should an answer ever differ,
the difference is its own bar, said in words. A performance above 1 (ideal time above APT) would
make the speed loss negative: no bar is drawn for it, quality loss and fully productive time
are split within APT instead, and a note says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

US = 1_000_000  # microseconds in a second


def to_micros(seconds: float) -> int:
    """``seconds`` in whole microseconds (the precision of the hub's event times)."""
    return round(seconds * US)


def seconds_text(micros: int) -> str:
    """A count of microseconds as exact decimal seconds: ``27000``, ``12.5``, ``-0.000001``."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), US)
    tail = f".{fraction:06d}".rstrip("0") if fraction else ""
    return f"{sign}{whole}{tail}"


# --- number formats -----------------------------------------------------------------------------


def percent(ratio: float | None) -> str:
    """``0.9777…`` as ``97.8 %``; None (a zero denominator) as an em dash."""
    return "—" if ratio is None else f"{ratio * 100:.1f} %"


def duration(seconds: float | None) -> str:
    """A length of time for people: ``45 s``, ``12 min``, ``7 h 30 min``, ``3 d 4 h``."""
    if seconds is None:
        return "—"
    sign, left = ("\u2212" if seconds < 0 else ""), abs(seconds)
    if left < 60:
        text = f"{left:.0f} s" if left >= 1 or left == 0 else f"{left:.3g} s"
    elif left < 3600:
        minutes, secs = divmod(round(left), 60)
        text = f"{minutes} min" + (f" {secs:02d} s" if secs else "")
    elif left < 86_400:
        minutes = round(left / 60)
        text = f"{minutes // 60} h {minutes % 60:02d} min"
    else:
        hours = round(left / 3600)
        text = f"{hours // 24} d {hours % 24} h"
    return sign + text


def grouped(number: float | int) -> str:
    """``27000`` as ``27,000``; ``12.5`` as ``12.5`` (seconds and counts in the tables)."""
    if float(number).is_integer():
        return f"{int(number):,}"
    return f"{number:,.3f}".rstrip("0").rstrip(".")


# --- the loss waterfall -------------------------------------------------------------------------

BarKind = Literal["start", "loss", "end"]


@dataclass(frozen=True)
class WaterfallBar:
    """One bar: ``micros`` long (what it adds to or takes from the way down from PBT; only a
    difference may be negative), drawn over ``[low, high]`` on the axis from 0 to PBT."""

    key: str  # planned_busy_time, downtime, difference, speed_loss, quality_loss, fully_productive
    label: str
    micros: int
    low: int
    high: int
    kind: BarKind
    reason: str | None = None

    @property
    def seconds(self) -> float:
        return self.micros / US

    @property
    def text(self) -> str:
        """Exact decimal seconds (what the page puts in ``data-seconds``)."""
        return seconds_text(self.micros)


@dataclass(frozen=True)
class Waterfall:
    bars: list[WaterfallBar]
    notes: list[str]
    planned_busy_micros: int
    # PBT - APT - the downtime by reason (0 by docs/oee.md; a bar of its own when not).
    difference_micros: int = 0
    performance_above_one: bool = False

    @property
    def start(self) -> WaterfallBar:
        return self.bars[0]

    @property
    def parts(self) -> list[WaterfallBar]:
        """The bars after PBT: the losses and the fully productive time, adding up to PBT."""
        return self.bars[1:]

    def adds_up(self) -> bool:
        return sum(b.micros for b in self.parts) == self.planned_busy_micros


def _share(whole: int, part: int, of: int) -> int:
    """``whole * part / of`` rounded to the nearest microsecond, in integers."""
    return (2 * whole * part + of) // (2 * of) if of else 0


def waterfall(
    planned_busy_time_s: float,
    actual_production_time_s: float,
    ideal_time_s: float,
    produced: int,
    good: int,
    downtime_s_by_reason: Mapping[str, float],
    parts_without_ideal_time: int = 0,
) -> Waterfall:
    """The loss waterfall of one window's figures (an OEE bucket of the API's answer); see the
    module. Downtime reasons longest first (then by code)."""
    pbt, apt, ideal = (to_micros(s) for s in (planned_busy_time_s, actual_production_time_s,
                                             ideal_time_s))  # fmt: skip
    notes: list[str] = []
    bars = [WaterfallBar("planned_busy_time", "Planned busy time", pbt, 0, pbt, "start")]
    remaining = pbt

    def lose(key: str, label: str, amount: int, reason: str | None = None) -> None:
        nonlocal remaining
        after = remaining - amount
        bars.append(
            WaterfallBar(key, label, amount, min(after, remaining), max(after, remaining),
                         "loss", reason)
        )  # fmt: skip
        remaining = after

    reasons = sorted(((to_micros(s), r) for r, s in downtime_s_by_reason.items()),
                     key=lambda found: (-found[0], found[1]))  # fmt: skip
    for amount, reason in reasons:
        lose("downtime", f"Downtime: {reason}", amount, reason)
    difference = pbt - apt - sum(amount for amount, _ in reasons)
    if difference:
        lose("difference", "Not explained by a downtime reason", difference)
        notes.append(
            f"Planned busy time less actual production time differs from the downtime by "
            f"reason by {seconds_text(difference)} s. docs/oee.md counts both from the same "
            "stopped and offline time, so this should be 0; it is shown as its own bar rather "
            "than hidden."
        )
    # From here the rest is the actual production time: remaining == apt.
    above_one = ideal > apt
    if above_one:
        notes.append(
            f"Performance is above 1: the parts' ideal time ({seconds_text(ideal)} s) is more "
            f"than the actual production time ({seconds_text(apt)} s), so the speed loss would "
            "be negative. No negative bar is drawn: the ideal cycle time is probably set too "
            "long. Quality loss and fully productive time are split within the actual "
            "production time instead, so the bars still add up to the planned busy time."
        )
        within = apt
    else:
        within = ideal
    lose("speed_loss", "Speed loss (APT \u2212 ideal time)", apt - within)
    quality = _share(within, max(0, produced - good), produced)
    lose("quality_loss", "Quality loss (bad and scrap)", quality)
    bars.append(WaterfallBar("fully_productive", "Fully productive time", remaining, 0,
                             remaining, "end"))  # fmt: skip
    if parts_without_ideal_time:
        notes.append(
            f"{parts_without_ideal_time} parts had no ideal cycle time: they add nothing to the "
            "ideal time, so their running time shows as speed loss."
        )
    if pbt == 0:
        notes.append("No planned busy time in this window: nothing to break down.")
    return Waterfall(bars, notes, pbt, difference, above_one)


# --- the downtime Pareto ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParetoBar:
    code: str  # the reason, or the branch of reasons, this bar adds up (mechanical, …)
    micros: int
    share: float  # of the Pareto's total
    cumulative: float  # this bar's and those before it, of the total
    deeper: bool  # reasons below this code: a drill link

    @property
    def seconds(self) -> float:
        return self.micros / US

    @property
    def text(self) -> str:
        return seconds_text(self.micros)


@dataclass(frozen=True)
class Pareto:
    drill: str | None  # the branch drilled into (None: the first level)
    bars: list[ParetoBar]
    total_micros: int
    up: str | None = None  # the branch one level up (None: the first level)

    @property
    def total_text(self) -> str:
        return seconds_text(self.total_micros)


def reason_group(code: str, drill: str | None) -> str | None:
    """The bar reason ``code`` counts in: its first level (``mechanical``) without a drill;
    the next level under ``drill`` (``mechanical/spindle``) with one; None if outside it."""
    parts = code.split("/")
    if drill is None:
        return parts[0]
    depth = len(drill.split("/"))
    if code == drill:
        return code
    if not code.startswith(drill + "/"):
        return None
    return "/".join(parts[: depth + 1])


def pareto(downtime_s_by_reason: Mapping[str, float], drill: str | None = None) -> Pareto:
    """Downtime by reason as a Pareto: one bar per first-level reason (or per reason of the next
    level under ``drill``), longest first (then by code), with its share and the cumulative
    share."""
    if drill is not None:
        drill = drill.strip("/") or None
    totals: dict[str, int] = {}
    deeper: set[str] = set()
    for code, seconds in downtime_s_by_reason.items():
        group = reason_group(code, drill)
        if group is None:
            continue
        totals[group] = totals.get(group, 0) + to_micros(seconds)
        if code != group:
            deeper.add(group)
    total = sum(totals.values())
    bars: list[ParetoBar] = []
    running = 0
    for code, micros in sorted(totals.items(), key=lambda item: (-item[1], item[0])):
        running += micros
        bars.append(
            ParetoBar(code, micros, micros / total if total else 0.0,
                      running / total if total else 0.0, code in deeper)
        )  # fmt: skip
    up = None
    if drill is not None and "/" in drill:
        up = drill.rsplit("/", 1)[0]
    return Pareto(drill, bars, total, up)


# --- SVG geometry -------------------------------------------------------------------------------


def scaled(micros: int, total: int, length: float) -> float:
    """``micros`` of ``total`` as a length on an axis ``length`` long (2 decimals)."""
    return round(micros * length / total, 2) if total > 0 else 0.0


@dataclass(frozen=True)
class PlacedBar:
    """A bar's rectangle in the chart's own units."""

    x: float
    y: float
    width: float
    height: float


def waterfall_geometry(
    chart: Waterfall, left: float, width: float, row: float, gap: float
) -> list[PlacedBar]:
    """A horizontal waterfall: a row per bar, the axis from 0 (at ``left``) to PBT (at
    ``left + width``); a bar of no length is still 1 unit wide, to be seen."""
    total = chart.planned_busy_micros
    placed = []
    for i, bar in enumerate(chart.bars):
        x = left + scaled(bar.low, total, width)
        w = scaled(bar.high - bar.low, total, width)
        placed.append(PlacedBar(x, i * (row + gap), max(w, 1.0 if bar.micros else 0.0), row))
    return placed


@dataclass(frozen=True)
class ParetoGeometry:
    bars: list[PlacedBar]
    cumulative: list[tuple[float, float]]  # the cumulative line's points


def pareto_geometry(
    chart: Pareto, left: float, top: float, width: float, height: float
) -> ParetoGeometry:
    """Vertical bars side by side, the tallest ``height`` high (the scale of bars is the
    longest bar, the cumulative line's the total), and the cumulative line through the right
    top corner of each bar."""
    count = len(chart.bars)
    if count == 0:
        return ParetoGeometry([], [])
    slot = width / count
    longest = max(b.micros for b in chart.bars)
    bars, line = [], []
    for i, bar in enumerate(chart.bars):
        h = scaled(bar.micros, longest, height)
        x = round(left + i * slot + slot * 0.15, 2)
        bars.append(PlacedBar(x, round(top + height - h, 2), round(slot * 0.7, 2), h))
        line.append((round(left + (i + 1) * slot - slot * 0.15, 2),
                     round(top + height - bar.cumulative * height, 2)))  # fmt: skip
    return ParetoGeometry(bars, line)


@dataclass(frozen=True)
class Span:
    """A stretch of the timeline (the API's interval, or an order's run, or a shift)."""

    start: datetime
    end: datetime
    state: str = ""
    reason: str | None = None
    order_id: str | None = None
    micro_stop: bool = False
    label: str = ""


def x_of(at: datetime, start: datetime, end: datetime, left: float, width: float) -> float:
    """Where ``at`` is on an axis from ``start`` (at ``left``) to ``end`` (``left + width``),
    clamped to the axis."""
    total = (end - start).total_seconds()
    if total <= 0:
        return left
    part = min(max((at - start).total_seconds(), 0.0), total)
    return round(left + part * width / total, 2)


def placed_spans(
    spans: Iterable[Span], start: datetime, end: datetime, left: float, width: float
) -> list[tuple[Span, float, float]]:
    """Each span with its x and width on the axis (those outside it left out)."""
    placed = []
    for span in spans:
        if span.end <= start or span.start >= end:
            continue
        x0, x1 = x_of(span.start, start, end, left, width), x_of(span.end, start, end, left, width)
        placed.append((span, x0, round(x1 - x0, 2)))
    return placed


def order_runs(intervals: Sequence[Span]) -> list[Span]:
    """The stretches each order ran (consecutive intervals of one order, merged)."""
    runs: list[Span] = []
    for interval in intervals:
        if interval.order_id is None:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.order_id == interval.order_id and last.end == interval.start:
            runs[-1] = Span(last.start, interval.end, order_id=last.order_id, label=last.label)
        else:
            runs.append(Span(interval.start, interval.end, order_id=interval.order_id,
                             label=interval.order_id))  # fmt: skip
    return runs


_TICK_STEPS = [timedelta(minutes=m) for m in (5, 10, 15, 30, 60, 120, 180, 360, 720)] + [
    timedelta(days=d) for d in (1, 2, 7, 14, 28)
]


def time_ticks(
    start: datetime, end: datetime, zone: ZoneInfo, most: int = 12
) -> list[tuple[datetime, str]]:
    """Round local times between ``start`` and ``end`` for the axis, at most ``most`` of them,
    labelled ``HH:MM`` (or ``MM-DD`` for steps of a day and more; ``MM-DD HH:MM`` at midnight
    when the window spans days)."""
    span = end - start
    step = next((s for s in _TICK_STEPS if span / s <= most), _TICK_STEPS[-1])
    local = start.astimezone(zone)
    if step >= timedelta(days=1):
        first = datetime.combine(local.date(), datetime.min.time(), zone)
    else:
        minutes = int(step.total_seconds() // 60)
        midnight = datetime.combine(local.date(), datetime.min.time(), zone)
        into = int((local - midnight).total_seconds() // 60)
        first = midnight + timedelta(minutes=into - into % minutes)
    ticks = []
    many_days = span > timedelta(days=1)
    at = first
    while at.astimezone(UTC) <= end:
        if at.astimezone(UTC) >= start:
            shown = at.astimezone(zone)
            if step >= timedelta(days=1):
                label = shown.strftime("%m-%d")
            elif many_days and shown.hour == 0 and shown.minute == 0:
                label = shown.strftime("%m-%d %H:%M")
            else:
                label = shown.strftime("%H:%M")
            ticks.append((at.astimezone(UTC), label))
        # Step in UTC (a DST day keeps its ticks evenly spaced in real time).
        at = (at.astimezone(UTC) + step).astimezone(zone)
    return ticks
