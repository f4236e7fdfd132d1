"""What the floor's screens show of a machine: its tile (state, reason, time in state, order,
the shift's figures) and, for its operator station, the shift's stops and the orders it may
start. Read functions for the API's read pool (``hub.api.reads``): blocking, module-level,
``work(sources, *args)``; they return plain data the pages render and the live feed sends.

Every figure comes from the entry point the API's figures come from (``hub.reports``), so the
board shows what ``GET /api/v1/oee`` and ``…/timeline`` answer for the same window."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hub.api.reads import ReadSources
from hub.domain import Order
from hub.reports import Reports, UnknownMachine
from projections.processes.forecast_watch import progress_and_forecast
from projections.rules.calendar import Interval, Shift
from projections.rules.oee import OeeFigures
from projections.rules.plant import PlantConfig
from projections.rules.timeline import RUNNING, UNASSIGNED, TimelineInterval

# How far back a tile looks for when its machine's state began (further: "more than"): the
# last half hour first, then this far.
RECENT = timedelta(minutes=30)
LOOKBACK = timedelta(hours=12)
# A day either side of now always holds the shift running now, if one is.
_AROUND = timedelta(days=1)
STOPPED_STATES = ("stopped", "offline", "planned_stop")
# The timeline's states as the screens write them.
STATE_WORDS = {
    "running": "Running",
    "stopped": "Stopped",
    "offline": "Offline",
    "planned_stop": "Planned stop",
    "no_shift": "No shift",
    "not_commissioned": "Not commissioned",
}


def duration_text(seconds: float) -> str:
    """A time in state as the screens write it: "45 s", "12 min", "2 h 05 min" (as ``since``
    of ``static/mes.js``, which counts on from it)."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def state_word(state: str) -> str:
    return STATE_WORDS.get(state, state.replace("_", " ").capitalize())


@dataclass(frozen=True)
class ShiftFigures:
    """The running shift's OEE so far (provisional while the shift is open)."""

    name: str
    start: datetime
    end: datetime
    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None
    produced: int
    good: int
    # Parts the machine would have made in the shift's planned busy time so far at its ideal
    # cycle time (None: no ideal cycle time known yet).
    target: int | None
    provisional: bool


@dataclass(frozen=True)
class Tile:
    machine_id: str
    state: str  # the timeline's: running, stopped, offline, planned_stop, no_shift, …
    reason: str | None
    since: datetime | None  # when this state (and reason) began; None: before the lookback
    order_id: str | None
    order_quantity: int | None
    order_good: int | None
    shift: ShiftFigures | None = None  # None: no shift now, or not asked for

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = _jsonable(asdict(self))
        return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def current_shift(plant: PlantConfig, now: datetime) -> Shift | None:
    """The shift occurrence running at ``now`` (whole, not clipped), or None."""
    around = Interval(now - _AROUND, now + _AROUND)
    for shift in plant.calendar().shifts(around):
        if shift.interval.start <= now < shift.interval.end:
            return shift
    return None


def _reports(sources: ReadSources, site: str, plant: PlantConfig) -> Reports:
    return Reports(sources.store, sources.facts, sources.orders, site, plant)


def _state_now(
    timeline: list[TimelineInterval], window: Interval
) -> tuple[str, str | None, datetime | None]:
    """The last interval's state and reason, and when that state and reason began (the
    intervals before it with the same state and reason, split by an order or a shift, run
    on)."""
    if not timeline:
        return "offline", None, None
    last = timeline[-1]
    since = last.start
    for interval in reversed(timeline[:-1]):
        if (interval.state, interval.reason) != (last.state, last.reason):
            break
        since = interval.start
    return last.state, last.reason, (None if since <= window.start else since)


def _figures(shift: Shift, figures: OeeFigures, configured_cycle_s: float | None) -> ShiftFigures:
    """The shift's figures for a tile. The target: parts at the ideal cycle time of the parts
    made so far (those with one), else the machine's configured one; None when neither is
    known."""
    target = None
    timed = figures.produced - figures.parts_without_ideal_time
    ideal_cycle = figures.ideal_time_s / timed if timed > 0 and figures.ideal_time_s > 0 else None
    ideal_cycle = ideal_cycle or configured_cycle_s
    if ideal_cycle:
        target = int(figures.planned_busy_time_s // ideal_cycle)
    return ShiftFigures(
        name=shift.name,
        start=shift.interval.start,
        end=shift.interval.end,
        availability=figures.availability,
        performance=figures.performance,
        quality=figures.quality,
        oee=figures.oee,
        produced=figures.produced,
        good=figures.good,
        target=target,
        provisional=figures.provisional,
    )


def _state_of(
    reports: Reports, machine_id: str, now: datetime
) -> tuple[str, str | None, datetime | None, str | None]:
    """The machine's state, reason and since when, and its order, from its timeline: over
    the last half hour first, further back (``LOOKBACK``) only when the state began before
    (a timeline's cost grows with the stretch read, and most states are younger). Raises
    ``UnknownMachine``."""
    for lookback in (RECENT, LOOKBACK):
        window = Interval(now - lookback, now)
        timeline = reports.machine_timeline(machine_id, window, now)
        state, reason, since = _state_now(timeline, window)
        if since is not None or lookback == LOOKBACK:
            return state, reason, since, timeline[-1].order_id if timeline else None
    raise AssertionError("unreachable")


def read_tiles(
    sources: ReadSources,
    site: str,
    plant: PlantConfig,
    machine_ids: Collection[str] | None,
    now: datetime,
    with_figures: bool = True,
) -> list[dict[str, Any]]:
    """The tiles of ``machine_ids`` (None: every machine of the site), as JSON-ready dicts.
    ``with_figures``: with the running shift's OEE and the order's good parts (the heavier
    part); without, those are None (the live feed keeps the last ones it had)."""
    reports = _reports(sources, site, plant)
    known = sorted({*sources.store.machine_ids(site), *plant.machines})
    wanted = known if machine_ids is None else [m for m in known if m in set(machine_ids)]
    shift = current_shift(plant, now) if with_figures else None
    shift_figures: dict[str, OeeFigures] = {}
    if shift is not None and wanted:
        window = Interval(shift.interval.start, shift.interval.end)
        for machine_id, buckets in reports.machines_oee(wanted, window, None, now).items():
            if buckets:
                shift_figures[machine_id] = buckets[0].figures
    tiles = []
    for machine_id in wanted:
        try:
            state, reason, since, order_id = _state_of(reports, machine_id, now)
        except UnknownMachine:
            continue
        quantity = good = None
        if order_id is not None and with_figures:
            order = sources.store.order(site, order_id)
            if isinstance(order, Order):
                progress, _ = progress_and_forecast(order, sources.facts, plant, now)
                quantity, good = order.quantity, progress.good
        figures = shift_figures.get(machine_id)
        tile = Tile(
            machine_id,
            state,
            reason,
            since,
            order_id,
            quantity,
            good,
            None
            if shift is None or figures is None
            else _figures(shift, figures, plant.machine_rules(machine_id).ideal_cycle_time_s),
        )
        tiles.append(tile.as_json())
    return tiles


@dataclass(frozen=True)
class Stop:
    """A stretch of the shift the machine did not run, with the reasons it is labelled with
    now (the timeline's: a reason given later wins where two overlap)."""

    start: datetime
    end: datetime | None  # None: it is going on
    pieces: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unassigned(self) -> bool:
        return any(p["reason"] == UNASSIGNED for p in self.pieces)


def shift_stops(timeline: list[TimelineInterval], now: datetime) -> list[Stop]:
    """The stops of ``timeline`` (the machine not running: stopped, offline, planned), each
    the run of such intervals between two running stretches, latest first."""
    stops: list[Stop] = []
    current: list[TimelineInterval] = []

    def close(ongoing: bool) -> None:
        if current:
            pieces = [
                {"start": p.start.isoformat(), "end": p.end.isoformat(), "state": p.state,
                 "reason": p.reason}
                for p in current
            ]  # fmt: skip
            end = None if ongoing else current[-1].end
            stops.append(Stop(current[0].start, end, pieces))
            current.clear()

    for interval in timeline:
        if interval.state in STOPPED_STATES:
            current.append(interval)
        elif interval.state == RUNNING or current:
            close(False)
    close(bool(timeline) and timeline[-1].end >= now and timeline[-1].state in STOPPED_STATES)
    return list(reversed(stops))


def read_station(
    sources: ReadSources, site: str, plant: PlantConfig, machine_id: str, now: datetime
) -> dict[str, Any] | None:
    """What machine ``machine_id``'s operator station shows (None: a machine never heard of):
    its tile, the running shift's stops (unassigned ones marked), the orders it may start (the
    ERP released for it, or running there), and the reasons it offers."""
    tiles = read_tiles(sources, site, plant, [machine_id], now)
    if not tiles:
        return None
    shift = current_shift(plant, now)
    since = shift.interval.start if shift else now - LOOKBACK
    # Read from further back, so that a stop that began before the shift is shown whole (and
    # labelled whole), then keep the stops that reach into the shift.
    window = Interval(since - LOOKBACK, now)
    stops: list[dict[str, Any]] = []
    if window.end > window.start:
        timeline = _reports(sources, site, plant).machine_timeline(machine_id, window, now)
        for stop in shift_stops(timeline, now):
            if stop.end is not None and stop.end <= since:
                continue
            stops.append(
                _jsonable(
                    {
                        "start": stop.start,
                        "end": stop.end,
                        "pieces": stop.pieces,
                        "unassigned": stop.unassigned,
                    }
                )
            )
    orders = []
    for status in ("running", "released"):
        for order_id, key in sources.orders.page(site, status=status, machine=machine_id):
            order = sources.store.load(key)
            # (An order running on another machine is not this station's to end.)
            if isinstance(order, Order) and (
                status == "released" or machine_id in order.running_on
            ):
                orders.append(
                    {
                        "order_id": order_id,
                        "status": status,
                        "part_number": order.part_number,
                        "quantity": order.quantity,
                        "due": order.due.isoformat() if order.due else None,
                    }
                )
    return {
        "tile": tiles[0],
        "shift": None
        if shift is None
        else {
            "name": shift.name,
            "start": shift.interval.start.isoformat(),
            "end": shift.interval.end.isoformat(),
        },
        "stops": stops,
        "orders": orders,
        "reasons": plant.station_reasons(machine_id),
        "prompt_after_s": plant.reason_prompt_after_s,
        "now": now.isoformat(),
    }
