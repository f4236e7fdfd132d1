"""Machine and site OEE (``GET /ui/oee?machine=&from=&to=&group_by=&drill=``): a table per
bucket with the raw figures, the loss waterfall and the downtime Pareto of the whole window,
and a machine's timeline with its shifts.

Every figure is the API's answer for the same window, made by the API's own read functions
(``hub.api.routes.oee``: ``read_oee``, ``read_timeline``, ``window_of``) in its read pool, and
links to the API call that gives it (``GET /api/v1/oee?…``, ``…/machines/{id}/timeline?…``;
the screens' session cookie opens those too). The charts' arithmetic is ``hub.ui.charts``.

- no ``from``/``to``: today's shifts (plant time zone); a time without an offset is taken in
  the plant's time zone (what the form's ``datetime-local`` fields send);
- no ``machine``: the site (every machine, added up); ``group_by``: shift (default), day,
  order or hour; ``drill``: the branch of reasons the Pareto shows (``mechanical``);
- ``partial=1``: the figures only, which ``static/oee.js`` fetches again when the live stream
  says a machine they show changed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, cast
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from hub.api.deps import Context
from hub.api.problems import Problem
from hub.api.reads import ReadSources
from hub.api.routes.oee import read_oee, read_timeline, window_of
from hub.reports import UnknownMachine
from hub.ui import charts
from hub.ui.access import ScreenUser, render
from hub.ui.floor import state_word
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.rules.report import GroupBy

router = APIRouter(prefix="/ui", include_in_schema=False)

GROUPINGS: tuple[GroupBy, ...] = ("shift", "day", "order", "hour")
GROUPING_WORDS = {"shift": "shift", "day": "day", "order": "order", "hour": "hour"}
# A longer window's timeline is not drawn (thousands of intervals say little on one line).
MAX_TIMELINE = timedelta(days=31)

# The charts' frames, in SVG user units (the SVGs scale to the page's width).
VIEW_WIDTH = 1000
WF_LABEL, WF_LEFT, WF_WIDTH, WF_ROW, WF_GAP = 300, 310, 500, 26, 8
PARETO_LEFT, PARETO_TOP, PARETO_WIDTH, PARETO_HEIGHT = 80, 16, 840, 170
PARETO_SLOT = 140  # the widest a bar's slot gets (a few reasons do not make slabs)
TL_LEFT, TL_WIDTH = 110, 870
TL_SHIFTS_Y, TL_STATE_Y, TL_ORDER_Y, TL_AXIS_Y = 8, 40, 92, 124


# --- reads (in the API's read pool) ---------------------------------------------------------


def machine_ids(sources: ReadSources, site: str, plant: PlantConfig) -> list[str]:
    """The site's machines: stored or configured (what the form offers)."""
    return sorted({*sources.store.machine_ids(site), *plant.machines})


def read_oee_page(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    machine: str | None,
    window: Interval,
    group_by: GroupBy,
    with_timeline: bool,
) -> dict[str, Any]:
    """The API's answers the page shows: OEE by ``group_by``, OEE of the whole window (the
    waterfall and the Pareto), the machine's timeline; and the machines for the form. Raises
    ``UnknownMachine``."""
    grouped = json.loads(read_oee(sources, site, plant, machine, window, group_by))
    whole = json.loads(read_oee(sources, site, plant, machine, window, None))
    timeline = None
    if machine is not None and with_timeline:
        timeline = json.loads(read_timeline(sources, site, plant, machine, window))
    return {
        "machines": machine_ids(sources, site, plant),
        "grouped": grouped,
        "whole": whole,
        "timeline": timeline,
    }


# --- windows and links --------------------------------------------------------------------------


def todays_shifts(plant: PlantConfig, now: datetime) -> Interval:
    """From the start of the first shift that starts today (plant time zone) to the end of the
    last one; the whole local day when no shift starts today."""
    zone = ZoneInfo(plant.time_zone)
    today = now.astimezone(zone).date()
    midnight = _local_midnight(today, zone)
    around = Interval(midnight - timedelta(days=1), _local_midnight(today + timedelta(2), zone))
    shifts = [s for s in plant.calendar().shifts(around) if s.day == today]
    if not shifts:
        return Interval(midnight, _local_midnight(today + timedelta(days=1), zone))
    return Interval(min(s.interval.start for s in shifts), max(s.interval.end for s in shifts))


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def parse_time(text: str, zone: ZoneInfo) -> datetime:
    """RFC 3339 with an offset, or a local time of the plant (the form's fields); raises
    ``ValueError``."""
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=zone)


def utc_text(at: datetime) -> str:
    """``2026-03-02T06:00:00Z`` (microseconds when there are any): what the links carry."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def api_oee_url(machine: str | None, window: Interval, group_by: GroupBy | None) -> str:
    query: dict[str, str] = {}
    if machine is not None:
        query["machine"] = machine
    query |= {"from": utc_text(window.start), "to": utc_text(window.end)}
    if group_by is not None:
        query["group_by"] = group_by
    return "/api/v1/oee?" + urlencode(query, safe=":")


def api_timeline_url(machine: str, window: Interval) -> str:
    query = urlencode({"from": utc_text(window.start), "to": utc_text(window.end)}, safe=":")
    return f"/api/v1/machines/{quote(machine, safe='')}/timeline?{query}"


def page_url(
    machine: str | None, window: Interval, group_by: GroupBy, drill: str | None = None
) -> str:
    query: dict[str, str] = {}
    if machine is not None:
        query["machine"] = machine
    query |= {"from": utc_text(window.start), "to": utc_text(window.end), "group_by": group_by}
    if drill:
        query["drill"] = drill
    return "/ui/oee?" + urlencode(query, safe=":/")


# --- what the templates draw -------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """Times of the plant, for people."""

    zone: ZoneInfo

    def local(self, at: datetime | str) -> datetime:
        moment = datetime.fromisoformat(at) if isinstance(at, str) else at
        return moment.astimezone(self.zone)

    def when(self, at: datetime | str) -> str:
        shown = self.local(at)
        text = shown.strftime("%Y-%m-%d %H:%M")
        return text + (shown.strftime(":%S") if shown.second or shown.microsecond else "")

    def span(self, start: datetime | str, end: datetime | str) -> str:
        a, b = self.local(start), self.local(end)
        if a.date() == b.date() or (b - a <= timedelta(days=1) and b.time() == time(0)):
            return f"{self.when(a)}\u2013{b.strftime('%H:%M')}"
        return f"{self.when(a)} \u2013 {self.when(b)}"

    def seconds(self, start: datetime | str, end: datetime | str) -> float:
        return (self.local(end) - self.local(start)).total_seconds()

    def field(self, at: datetime) -> str:
        """The value of a ``datetime-local`` field (seconds always: the fields have step 1)."""
        return self.local(at).strftime("%Y-%m-%dT%H:%M:%S")


def bucket_label(bucket: dict[str, Any], group_by: GroupBy, clock: Clock) -> str:
    span = clock.span(bucket["start"], bucket["end"])
    if group_by == "day":
        return clock.local(bucket["start"]).strftime("%Y-%m-%d (%a)")
    if bucket.get("label"):
        return f"{bucket['label']} · {span}"
    return span


def waterfall_view(whole: dict[str, Any]) -> dict[str, Any]:
    chart = charts.waterfall(
        whole["planned_busy_time_s"],
        whole["actual_production_time_s"],
        whole["ideal_time_s"],
        whole["produced"],
        whole["good"],
        whole["downtime_s_by_reason"],
        whole["parts_without_ideal_time"],
    )
    placed = charts.waterfall_geometry(chart, WF_LEFT, WF_WIDTH, WF_ROW, WF_GAP)
    pbt = chart.planned_busy_micros
    bars = [
        {
            "bar": bar,
            "rect": rect,
            "share": bar.micros / pbt if pbt else None,
            "text_y": rect.y + WF_ROW * 0.68,
        }
        for bar, rect in zip(chart.bars, placed, strict=True)
    ]
    height = len(bars) * (WF_ROW + WF_GAP) + 4
    return {"chart": chart, "bars": bars, "height": height}


def pareto_view(whole: dict[str, Any], drill: str | None) -> dict[str, Any]:
    chart = charts.pareto(whole["downtime_s_by_reason"], drill)
    width = min(PARETO_WIDTH, PARETO_SLOT * len(chart.bars)) if chart.bars else PARETO_WIDTH
    geometry = charts.pareto_geometry(chart, PARETO_LEFT, PARETO_TOP, width, PARETO_HEIGHT)
    longest = max((b.micros for b in chart.bars), default=0)
    return {
        "chart": chart,
        "bars": list(zip(chart.bars, geometry.bars, strict=True)),
        "line": " ".join(f"{x},{y}" for x, y in geometry.cumulative),
        "points": geometry.cumulative,
        "longest": longest / charts.US,
        "bottom": PARETO_TOP + PARETO_HEIGHT,
        "right": PARETO_LEFT + width,
    }


def timeline_view(
    answer: dict[str, Any], window: Interval, plant: PlantConfig, clock: Clock
) -> dict[str, Any]:
    start, end = window.start, window.end
    spans = [
        charts.Span(
            datetime.fromisoformat(i["start"]), datetime.fromisoformat(i["end"]), i["state"],
            i["reason"], i["order_id"], bool(i.get("micro_stop")),
        )
        for i in answer["intervals"]
    ]  # fmt: skip
    shifts = plant.calendar().shifts(window)
    shift_spans = [charts.Span(s.interval.start, s.interval.end, label=s.name) for s in shifts]
    breaks = [
        charts.Span(p.interval.start, p.interval.end, reason=p.reason, label=s.name)
        for s in shifts
        for p in s.planned_stops
    ]
    boundaries = sorted({b for s in shifts for b in (s.interval.start, s.interval.end)})
    known_until = spans[-1].end if spans else start
    totals: dict[str, float] = {}
    for span in spans:
        key = "running_micro" if span.micro_stop else span.state
        totals[key] = totals.get(key, 0.0) + (span.end - span.start).total_seconds()
    order = list(LEGEND)

    def place(found: list[charts.Span]) -> list[tuple[charts.Span, float, float]]:
        return charts.placed_spans(found, start, end, TL_LEFT, TL_WIDTH)

    return {
        "states": place(spans),
        "orders": place(charts.order_runs(spans)),
        "shifts": place(shift_spans),
        "breaks": place(breaks),
        "boundaries": [charts.x_of(b, start, end, TL_LEFT, TL_WIDTH) for b in boundaries],
        "ticks": [
            (charts.x_of(at, start, end, TL_LEFT, TL_WIDTH), label)
            for at, label in charts.time_ticks(start, end, clock.zone)
        ],
        "now_x": charts.x_of(known_until, start, end, TL_LEFT, TL_WIDTH)
        if known_until < end
        else None,
        "intervals": answer["intervals"],
        "totals": sorted(totals.items(), key=lambda t: _legend_rank(t[0], order)),
        "used_states": sorted(totals, key=lambda s: _legend_rank(s, order)),
    }


def _legend_rank(state: str, order: list[str]) -> int:
    return order.index(state) if state in order else len(order)


# The timeline's states, in the legend's order, with their words.
LEGEND = {
    "running": "Running",
    "running_micro": "Running (micro stop, counts as running)",
    "stopped": "Stopped (unplanned)",
    "offline": "Offline (unplanned)",
    "planned_stop": "Planned stop",
    "no_shift": "No shift",
    "not_commissioned": "Not commissioned",
}


class Formats:
    """The number formats the templates use."""

    percent = staticmethod(charts.percent)
    duration = staticmethod(charts.duration)
    grouped = staticmethod(charts.grouped)
    state_word = staticmethod(state_word)

    @staticmethod
    def value(number: float | int | None) -> str:
        """A figure exactly as the API's JSON has it (``data-value``)."""
        return "" if number is None else json.dumps(number)


# --- the page -----------------------------------------------------------------------------------


@router.get("/oee")
async def oee_page(
    request: Request,
    context: Context,
    caller: ScreenUser,
    machine: Annotated[str | None, Query(max_length=128)] = None,
    start: Annotated[str | None, Query(alias="from", max_length=64)] = None,
    end: Annotated[str | None, Query(alias="to", max_length=64)] = None,
    group_by: Annotated[str | None, Query(max_length=16)] = None,
    drill: Annotated[str | None, Query(max_length=256)] = None,
    partial: bool = False,
) -> Response:
    plant, site = context.plant, context.site
    zone = ZoneInfo(plant.time_zone)
    clock = Clock(zone)
    now = datetime.now(UTC)
    chosen = (machine or "").strip() or None
    drill = (drill or "").strip("/ ") or None
    grouping = cast(GroupBy, group_by or "shift")
    default = todays_shifts(plant, now)
    values: dict[str, Any] = {
        "machine": chosen,
        "group_by": grouping,
        "groupings": GROUPINGS,
        "drill": drill,
        "zone": plant.time_zone,
        "clock": clock,
        "fmt": Formats,
        "legend": LEGEND,
        "frame": _frame(),
        "error": None,
        "figures": None,
        "machines": [chosen] if chosen else [],
    }
    window: Interval | None = None
    try:
        if grouping not in GROUPINGS:
            raise Problem(422, f"group_by must be one of: {', '.join(GROUPINGS)}")
        try:
            first = parse_time(start, zone) if start else default.start
            last = parse_time(end, zone) if end else default.end
        except ValueError:
            raise Problem(422, "from and to must be times, e.g. 2026-03-02T06:00:00Z") from None
        window = window_of(first, last)
    except Problem as problem:
        values["error"] = str(problem)
        values["form_from"] = start or clock.field(default.start)
        values["form_to"] = end or clock.field(default.end)
    if window is None:
        values["machines"] = await context.reads.run(request, machine_ids, site, plant)
        return _page(request, caller, partial, 422, values)
    values |= {
        "window": window,
        "form_from": clock.field(window.start),
        "form_to": clock.field(window.end),
        "api": {
            "grouped": api_oee_url(chosen, window, grouping),
            "whole": api_oee_url(chosen, window, None),
            "timeline": api_timeline_url(chosen, window) if chosen else None,
        },
        "page": lambda **change: page_url(
            change.get("machine", chosen),
            window,
            change.get("group_by", grouping),
            change.get("drill", drill),
        ),
    }
    with_timeline = window.end - window.start <= MAX_TIMELINE
    try:
        answers = await context.reads.run(
            request, read_oee_page, site, plant, chosen, window, grouping, with_timeline
        )
    except UnknownMachine as exc:
        values["error"] = str(exc)
        values["machines"] = await context.reads.run(request, machine_ids, site, plant)
        return _page(request, caller, partial, 404, values)
    values["machines"] = answers["machines"]
    values["figures"] = _figures(answers, window, grouping, drill, plant, clock, with_timeline)
    return _page(request, caller, partial, 200, values)


def _figures(
    answers: dict[str, Any],
    window: Interval,
    group_by: GroupBy,
    drill: str | None,
    plant: PlantConfig,
    clock: Clock,
    with_timeline: bool,
) -> dict[str, Any]:
    grouped, whole_answer = answers["grouped"], answers["whole"]
    buckets = grouped["buckets"]
    whole = whole_answer["buckets"][0] if whole_answer["buckets"] else None
    figures: dict[str, Any] = {
        "rows": [(b, bucket_label(b, group_by, clock)) for b in buckets],
        "whole": whole,
        "waterfall": waterfall_view(whole) if whole else None,
        "pareto": pareto_view(whole, drill) if whole else None,
        "timeline": None,
        "timeline_too_long": not with_timeline,
        "machines_shown": [answers["timeline"]["machine"]] if answers["timeline"] else [],
    }
    if answers["timeline"] is not None:
        figures["timeline"] = timeline_view(answers["timeline"], window, plant, clock)
    return figures


def _frame() -> dict[str, Any]:
    return {
        "width": VIEW_WIDTH,
        "wf_label": WF_LABEL,
        "wf_left": WF_LEFT,
        "wf_width": WF_WIDTH,
        "wf_row": WF_ROW,
        "pareto_left": PARETO_LEFT,
        "pareto_top": PARETO_TOP,
        "pareto_width": PARETO_WIDTH,
        "pareto_height": PARETO_HEIGHT,
        "tl_left": TL_LEFT,
        "tl_width": TL_WIDTH,
        "tl_shifts_y": TL_SHIFTS_Y,
        "tl_state_y": TL_STATE_Y,
        "tl_order_y": TL_ORDER_Y,
        "tl_axis_y": TL_AXIS_Y,
    }


def _page(
    request: Request, caller: Any, partial: bool, status: int, values: dict[str, Any]
) -> Response:
    name = "oee_figures.html" if partial else "oee.html"
    answer = render(request, name, caller, status_code=status, **values)
    answer.headers["Cache-Control"] = "no-store"
    return answer
