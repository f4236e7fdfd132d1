"""Order progress: what the floor made of an order, from the histories of the machines it ran on.

Produced, bad and scrap come from the parts each machine made while the order was running
there, by event time; the actual cycle time is the order's running time (micro-stops
included) per part made, beside the ERP's ideal cycle time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from projections.rules.calendar import Interval
from projections.rules.history import MachineFacts
from projections.rules.plant import PlantConfig
from projections.rules.report import machine_timeline
from projections.rules.timeline import OFFLINE, RUNNING, STOPPED

BUSY = (RUNNING, STOPPED, OFFLINE)  # the states inside planned busy time


@dataclass(frozen=True)
class Run:
    machine_id: str
    start: datetime
    end: datetime | None


@dataclass(frozen=True)
class OrderProgress:
    produced: int
    good: int
    bad: int
    scrapped: int
    remaining: int | None
    percent_complete: float | None
    actual_start: datetime | None
    actual_end: datetime | None
    machines: list[str]
    running_time_s: float
    busy_time_s: float  # planned busy time while the order was on its machines
    actual_cycle_time_s: float | None
    ideal_cycle_time_s: float | None


def order_progress(
    order_id: str,
    quantity: int | None,
    ideal_cycle_time_s: float | None,
    runs: Sequence[Run],
    facts_by_machine: Mapping[str, MachineFacts],
    plant: PlantConfig,
    now: datetime,
) -> OrderProgress:
    parts = order_parts(order_id, runs, facts_by_machine, now)
    produced, bad, scrapped = parts
    running_s = busy_s = 0.0
    # Running time counts whenever the machine executed the order, shift or not.
    around_the_clock = PlantConfig(micro_stop_threshold_s=plant.micro_stop_threshold_s)
    machines = sorted({run.machine_id for run in runs})
    for machine_id in machines:
        facts = facts_by_machine.get(machine_id)
        if facts is None:
            continue
        for window in _merged_runs([r for r in runs if r.machine_id == machine_id], now):
            running_s += sum(
                i.seconds
                for i in machine_timeline(facts, window, around_the_clock)
                if i.state == RUNNING and i.order_id == order_id
            )
            busy_s += sum(
                i.seconds
                for i in machine_timeline(facts, window, plant)
                if i.state in BUSY and i.order_id == order_id
            )
    good = parts.good
    ended = [r.end for r in runs]
    return OrderProgress(
        produced=produced,
        good=good,
        bad=bad,
        scrapped=scrapped,
        remaining=max(0, quantity - good) if quantity is not None else None,
        percent_complete=min(1.0, good / quantity) if quantity else None,
        actual_start=min((r.start for r in runs), default=None),
        actual_end=max(e for e in ended if e is not None) if runs and None not in ended else None,
        machines=machines,
        running_time_s=running_s,
        busy_time_s=busy_s,
        actual_cycle_time_s=running_s / produced if produced else None,
        ideal_cycle_time_s=ideal_cycle_time_s,
    )


class OrderParts(NamedTuple):
    produced: int  # (not counted bad)
    bad: int
    scrapped: int

    @property
    def good(self) -> int:
        return max(0, self.produced - self.bad - self.scrapped)


def order_parts(
    order_id: str,
    runs: Sequence[Run],
    facts_by_machine: Mapping[str, MachineFacts],
    now: datetime,
) -> OrderParts:
    """Parts made, bad and scrapped for ``order_id`` in ``runs`` (settled facts). A reading
    counts for the order when the order ran just before it, within one of ``runs`` (open runs
    up to ``now``): not the readings before the window that set its scene, nor those after a
    shift end that cut a run short."""
    produced = bad = scrapped = 0
    for machine_id in sorted({run.machine_id for run in runs}):
        facts = facts_by_machine.get(machine_id)
        if facts is None:
            continue
        spans = [(r.start, r.end or now) for r in runs if r.machine_id == machine_id]
        for p in facts.parts:
            if p.order_id == order_id and any(start < p.time <= end for start, end in spans):
                if p.kind == "bad":
                    bad += p.increment
                else:
                    produced += p.increment
        scrapped += sum(s.quantity for s in facts.scrap if s.order_id == order_id)
    return OrderParts(produced, bad, scrapped)


def _merged_runs(runs: Sequence[Run], now: datetime) -> list[Interval]:
    """One machine's runs of an order as disjoint windows: a start tapped twice must not count
    the overlap twice."""
    windows = sorted(
        (Interval(r.start, r.end or now) for r in runs if (r.end or now) > r.start),
        key=lambda w: w.start,
    )
    merged: list[Interval] = []
    for window in windows:
        if merged and window.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Interval(last.start, max(last.end, window.end))
        else:
            merged.append(window)
    return merged
