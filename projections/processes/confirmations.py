"""Production confirmations: the watch that decides what the ERPs are owed.

When a run of an order ends (an operator taps "end" on a machine), the ERP is owed what that run
made: the good parts and scrap since the confirmations before, the machine, start and end, and
whether the order is done (final: its good parts reached its quantity). When what was confirmed
no longer matches the store — scrap reported after the confirmation, a late part count — it is
owed a correction: the difference (which may be negative).

Each decision is published as ``mes.hub.order.confirmation_due.v1`` and stored on the order
like any fact, with the quantities computed from the views when it was decided; the outbox
(``projections.views.outbox_view``, ``hub.outbox``) delivers it to every ERP that takes
confirmations. Its event id is the order and the confirmation's sequence number, so a watch that
publishes, dies and decides again before the first was stored repeats the same id, and the
repeat is dropped. Runs that ended before ``since`` (when confirmations began on this hub) are
not confirmed: a hub that starts confirming does not send years of history to the ERP.

Each decision also carries the hub's latest signed audit checkpoint when it was decided
(``checkpoint``: ``hub.sealer.checkpoint_reference``, None before the first), stored with it and
so sent as stored to every ERP: the ERPs hold copies of the checkpoints that whoever holds the
hub's database cannot rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from contracts import CloudEvent
from hub.domain import Order, machine_aggregate_id
from hub.domain import order_runs as runs_of_moves
from hub.files import write_whole
from hub.ports import EventPublisher
from projections.processes.forecast_watch import order_runs
from projections.processes.rounds import publish_decided, run_rounds
from projections.rules.calendar import Interval
from projections.rules.history import MachineFacts
from projections.rules.hub_events import hub_event, hub_source
from projections.rules.plant import PlantConfig
from projections.rules.progress import Run, order_parts
from projections.rules.report import facts_window
from projections.views.database import ViewDatabase
from projections.views.facts_view import FactsReader, facts_of_runs, to_micros
from projections.views.outbox_view import (
    confirmation_candidates,
    confirmed_orders,
    last_ends,
    message_key,
    order_moves,
    running_orders,
)

log = logging.getLogger(__name__)
CONFIRMATION_TYPE = "mes.hub.order.confirmation_due.v1"
PRODUCER = "confirmations"  # the hub component deciding them (their CloudEvents source)
REPUBLISH_AFTER_S = 5.0


def totals(
    order: Order, runs: list[Run], reader: FactsReader, plant: PlantConfig, now: datetime
) -> tuple[int, int]:
    """Good parts and scrap of ``order`` over ``runs``, as the views know them (the same
    figures as the order's progress, without its timeline)."""
    facts = facts_of_runs(reader, order.site, order.order_id, runs, plant, now, parts_only=True)
    parts = order_parts(order.order_id, runs, facts, now)
    return parts.good, parts.scrapped


def totals_of_many(
    site: str,
    wanted: Sequence[tuple[str, list[Run]]],
    reader: FactsReader,
    plant: PlantConfig,
    now: datetime,
) -> list[tuple[int, int]]:
    """``totals`` of each (order id, runs) of ``site``, the same figures, with each machine's
    facts read and settled once for all of them: a round that confirms a thousand orders on
    a hundred machines reads a hundred windows, not a thousand."""
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    # Per machine, the orders' spans that lie close together, each group read as one window
    # (a correction of last week and a run ended now are two windows, not a week of facts).
    spans: dict[str, list[Interval]] = {}
    for _, runs in wanted:
        for machine_id, span in _spans(runs, now).items():
            spans.setdefault(machine_id, []).append(span)
    settled: dict[str, list[tuple[Interval, MachineFacts]]] = {}
    for machine_id, machine_spans in spans.items():
        machine = machine_aggregate_id(site, machine_id)
        for group in _close_together(machine_spans):
            facts = reader.window(machine, facts_window(group, plant), parts_only=True)
            # Scrap naming an order counts for it whenever reported (added per order below).
            facts.scrap = [s for s in facts.scrap if s.order_id is None]
            rules = plant.machine_rules(machine_id)
            settled.setdefault(machine_id, []).append((group, facts.settle(rules)))
    named = reader.orders_scrap([order_id for order_id, _ in wanted])
    found = []
    for order_id, runs in wanted:
        # Each order's share: what its own window (``facts_of_runs``) would have held.
        share: dict[str, MachineFacts] = {}
        for machine_id, span in _spans(runs, now).items():
            whole = next(f for g, f in settled[machine_id] if g.start <= span.start <= g.end)
            low, high = span.start - margin, span.end + margin
            own = named.get(order_id, {}).get(machine_aggregate_id(site, machine_id).hex, [])
            if span.end <= span.start:
                share[machine_id] = replace(whole, parts=[], scrap=own)
                continue
            # (``order_parts`` keeps the parts made in the order's runs.)
            share[machine_id] = replace(
                whole, scrap=[s for s in whole.scrap if low <= s.time <= high] + own
            )
        parts = order_parts(order_id, runs, share, now)
        found.append((parts.good, parts.scrapped))
    return found


def _close_together(spans: list[Interval], gap: timedelta = timedelta(hours=1)) -> list[Interval]:
    """``spans`` merged where they overlap or lie less than ``gap`` apart."""
    merged: list[Interval] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start <= merged[-1].end + gap:
            merged[-1] = Interval(merged[-1].start, max(merged[-1].end, span.end))
        else:
            merged.append(span)
    return merged


def _spans(runs: Sequence[Run], now: datetime) -> dict[str, Interval]:
    """Per machine, from the first start of ``runs`` there to their last end (or ``now``)."""
    spans: dict[str, Interval] = {}
    for run in runs:
        end = now if run.end is None else run.end
        had = spans.get(run.machine_id)
        spans[run.machine_id] = (
            Interval(run.start, end)
            if had is None
            else Interval(min(had.start, run.start), max(had.end, end))
        )
    return spans


@dataclass(frozen=True)
class Owed:
    """A confirmation an order is owed, before its quantities are counted."""

    order: Order
    reason: str  # run_ended, shift_end or correction
    run: Run  # the run it is about
    start: datetime
    end: datetime | None
    covered: list[Run]  # the runs (or their parts up to a shift end) its totals are over
    told: tuple[int, int]  # good parts and scrap confirmed before it


def owed(
    order: Order,
    since: datetime,
    moves: list[dict[str, Any]] | None = None,
    corrections_since: datetime | None = None,
    shift_end: datetime | None = None,
) -> Owed | None:
    """The confirmation ``order`` may be owed now (a correction only if its totals changed),
    or None. See ``confirmation_due``."""
    if order.status == "cancelled":
        return None
    confirmed = order.confirmed
    runs = order_runs(order) if moves is None else _runs(moves)
    ended = sorted(
        (r for r in runs if r.end is not None and r.end >= since),
        key=lambda r: (r.end or r.start, r.machine_id),
    )
    running = sorted((r for r in runs if r.end is None), key=lambda r: (r.start, r.machine_id))
    runs_confirmed = sum(1 for c in confirmed if c["reason"] == "run_ended")
    told = (
        sum(int(c["yield_quantity"]) for c in confirmed),
        sum(int(c["scrap_quantity"]) for c in confirmed),
    )
    # How far the runs not (yet) confirmed whole were told: to the last shift end confirmed.
    told_to = max(
        (datetime.fromisoformat(c["end"]) for c in confirmed if c["reason"] == "shift_end"),
        default=None,
    )
    if len(ended) > runs_confirmed:
        run, whole, cut = ended[runs_confirmed], ended[: runs_confirmed + 1], told_to
        reason, start, end = "run_ended", run.start, run.end
    elif (
        shift_end is not None and running and shift_end >= since
        and (told_to is None or shift_end > told_to) and running[0].start < shift_end
    ):  # fmt: skip
        run, whole, cut = running[0], ended, shift_end
        reason, start, end = "shift_end", max(run.start, told_to or run.start), shift_end
    elif confirmed and not order.running_on and ended and _recent(confirmed, corrections_since):
        run, whole, cut = ended[-1], ended, told_to
        reason, start, end = "correction", run.start, run.end
    else:
        return None
    rest = [r for r in runs if r not in whole and (r.end is None or r.end >= since)]
    return Owed(order, reason, run, start, end, whole + _up_to(rest, cut), told)


def confirmation_data(due: Owed, good: int, scrap: int) -> dict[str, Any] | None:
    """The confirmation's data, given the totals over what it covers (None: a correction
    that changes nothing)."""
    order, (good_told, scrap_told) = due.order, due.told
    if due.reason in ("correction", "shift_end") and (good, scrap) == due.told:
        return None  # nothing new to tell (a shift in which the order made nothing)
    confirmed = order.confirmed
    # Final: the order's good parts reached its quantity; never while it runs (a shift end's
    # partial); a correction of a final confirmation stays final (the run is over: scrap
    # found later makes the order short, it does not reopen it).
    final = due.reason != "shift_end" and (
        (order.quantity is not None and good >= order.quantity)
        or (due.reason == "correction" and bool(confirmed[-1]["final"]))
    )
    return {
        "order_id": order.order_id,
        "sequence": len(confirmed) + 1,
        "reason": due.reason,
        "machine_id": due.run.machine_id,
        "operation": None,
        "yield_quantity": good - good_told,
        "scrap_quantity": scrap - scrap_told,
        "start": due.start.isoformat(),
        "end": due.end.isoformat() if due.end else None,
        "final": final,
        "correction_of": confirmed[-1]["sequence"] if due.reason == "correction" else None,
        "yield_total": good,
        "scrap_total": scrap,
    }


def confirmation_event_id(site: str, order_id: str, sequence: int) -> str:
    """The id of an order's confirmation ``sequence``: the same whenever it is decided."""
    return f"confirm-{site}-{order_id}-{sequence}"


def confirmation_message_key(site: str, order_id: str, sequence: int) -> str:
    """The outbox key of an order's confirmation ``sequence`` (of the event that decided it)."""
    return message_key(hub_source(site, PRODUCER), confirmation_event_id(site, order_id, sequence))


def confirmation_due(
    order: Order,
    reader: FactsReader,
    plant: PlantConfig,
    now: datetime,
    since: datetime,
    moves: list[dict[str, Any]] | None = None,
    corrections_since: datetime | None = None,
    shift_end: datetime | None = None,
) -> dict[str, Any] | None:
    """The data of the confirmation ``order`` is owed now, or None.

    Worked example: an order of 100 runs on M1 from 06:00 to 10:00 and makes 60 good, 2 scrap:
    confirmation 1 (run_ended) says 60 and 2, not final. It runs again on M2 and makes 40 more:
    confirmation 2 says 40 and 0, final (100 good). A late scrap of 3 for the order: confirmation
    3 (a correction of 2) says -3 good and 3 scrap.

    With ``shift_end`` (the plant's last shift end, when confirming at each shift end): an order
    still running then is owed what it made up to it. An order of 100 starts on M1 at 10:00; the
    shift ends at 14:00 with 30 good: confirmation 1 (shift_end) says 30, ending 14:00. The run
    ends at 16:00 with 45 good in all: confirmation 2 (run_ended) says 15.

    ``moves``: the order's starts and ends as the views have them (else the order's own): the
    parts counted must not lag the run's end. ``corrections_since``: an order last confirmed
    before it gets no correction (it was told what it was told)."""
    due = owed(order, since, moves, corrections_since, shift_end)
    if due is None:
        return None
    return confirmation_data(due, *totals(order, due.covered, reader, plant, now))


def _up_to(runs: list[Run], cut: datetime | None) -> list[Run]:
    """The part of ``runs`` before ``cut`` (none without one): what a shift-end confirmation
    told of runs that were still going then."""
    if cut is None:
        return []
    return [
        Run(r.machine_id, r.start, r.end if r.end is not None and r.end <= cut else cut)
        for r in runs
        if r.start < cut
    ]


def last_shift_end(plant: PlantConfig, now: datetime) -> datetime | None:
    """When the plant's last shift before ``now`` ended (shifts of the last 8 days: a plant
    closed longer has no shift end to confirm)."""
    shifts = plant.calendar().shifts(Interval(now - timedelta(days=8), now))
    return max((s.interval.end for s in shifts if s.interval.end < now), default=None)


def _runs(moves: list[dict[str, Any]]) -> list[Run]:
    return [
        Run(
            run["machine_id"],
            datetime.fromisoformat(run["start"]),
            datetime.fromisoformat(run["end"]) if run["end"] else None,
        )
        for run in runs_of_moves(moves)
    ]


def _recent(confirmed: list[dict[str, Any]], since: datetime | None) -> bool:
    decided = confirmed[-1].get("decided_at")
    return since is None or decided is None or datetime.fromisoformat(decided) >= since


class ConfirmationWatch:
    """Decides the confirmations owed for what the views took in since its last round."""

    def __init__(
        self,
        site: str,
        load: Callable[[Iterable[UUID]], list[Order]],
        views: ViewDatabase,
        reader: FactsReader,
        plant: PlantConfig,
        publisher: EventPublisher,
        since: datetime,
        correction_window: timedelta = timedelta(days=7),
        position_file: Path | None = None,
        each_shift: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        checkpoint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._site, self._load, self._views = site, load, views
        # The latest signed audit checkpoint's reference, read once per round that decides
        # something (off the event loop, like the rest of ``decisions``).
        self._checkpoint = checkpoint
        self._reader, self._plant, self._publisher = reader, plant, publisher
        self._since, self._window, self._clock = since, correction_window, clock
        # Confirm what the orders running at each shift end made by then ([hub]
        # confirm_each_shift); the last shift end whose running orders were looked at.
        self._each_shift = each_shift
        self._shift_looked_at: datetime | None = None
        # The views' position the last round read to (0: look at everything), kept in
        # ``position_file`` so that a restart does not look at every order again.
        self._position_file = position_file
        self._after = _read_position(position_file)
        # Orders with a decision published, and when: looked at again REPUBLISH_AFTER_S later
        # (a decision changes nothing the candidates query sees; an order with a second run
        # ended before its first decision was stored would wait for its next change), and
        # then, if the decision is still not stored, published again (the same id).
        self._recheck: dict[UUID, float] = {}
        # The orders confirmed lately, by machine: their last end there (µs), so that a late
        # fact finds the orders it may change without reading every order (built at the first
        # round from the views, then kept up to date from the orders looked at).
        self._ends: dict[str, dict[UUID, int]] | None = None
        self._by_order_id: dict[str, UUID] = {}
        self._rounds = 0
        self.published = 0  # confirmations decided (not counting repeats)

    def decisions(self, now: datetime) -> tuple[list[CloudEvent], int]:
        corrections_since = now - self._window
        if self._ends is None:
            self._ends = {}
            for key, order_id, known in confirmed_orders(
                self._views, self._site, corrections_since
            ):
                self._remember(key, order_id, known)
        found = confirmation_candidates(self._views, self._site, self._after)
        upto = found.upto
        late = {
            key
            for machine, first in found.earliest.items()
            for key, end in self._ends.get(machine, {}).items()
            if first <= end
        }
        late.update(self._by_order_id[o] for o in found.named if o in self._by_order_id)
        events = []
        clock = time.monotonic()
        due_again = {k for k, sent in self._recheck.items() if clock - sent >= REPUBLISH_AFTER_S}
        shift_end = last_shift_end(self._plant, now) if self._each_shift else None
        at_shift_end: list[UUID] = []
        if shift_end is not None and shift_end != self._shift_looked_at:
            at_shift_end = running_orders(self._views, self._site)
        keys = sorted({*found.changed, *late, *due_again, *at_shift_end}, key=str)
        moves = order_moves(self._views, keys)
        # An order that only started (no run ended since confirming began, and no shift end to
        # confirm it at) is owed nothing: not read from the store (most of a round's cost).
        keys = [k for k in keys if k not in moves or self._may_be_owed(moves[k], shift_end)]
        dues = []
        for order in self._load(keys):
            taps = moves.get(order.id)
            due = owed(order, self._since, taps, corrections_since, shift_end)
            if taps is not None and (order.confirmed or due is not None):
                self._remember(order.id, order.order_id, taps)
            if due is None:
                self._recheck.pop(order.id, None)
            elif clock - self._recheck.get(order.id, -REPUBLISH_AFTER_S) >= REPUBLISH_AFTER_S:
                dues.append(due)  # (else published moments ago: on its way to the store)
        counted = totals_of_many(
            self._site, [(d.order.order_id, d.covered) for d in dues], self._reader,
            self._plant, now,
        )  # fmt: skip
        reference: list[str | None] = []  # (read at the first decision of the round)
        for due, (good, scrap) in zip(dues, counted, strict=True):
            order, data = due.order, confirmation_data(due, good, scrap)
            if data is None:
                self._recheck.pop(order.id, None)
                continue
            if not reference:
                reference.append(self._checkpoint())
            data["checkpoint"] = reference[0]
            self._recheck[order.id] = clock
            event_id = confirmation_event_id(self._site, order.order_id, data["sequence"])
            events.append(
                hub_event(
                    self._site, PRODUCER, CONFIRMATION_TYPE, event_id, order.order_id, now, data
                )
            )
        self._shift_looked_at = shift_end
        return events, upto

    def _may_be_owed(self, moves: list[dict[str, Any]], shift_end: datetime | None) -> bool:
        runs = _runs(moves)
        return any(r.end is not None and r.end >= self._since for r in runs) or (
            shift_end is not None and any(r.end is None and r.start < shift_end for r in runs)
        )

    def _remember(self, key: UUID, order_id: str, moves: list[dict[str, Any]]) -> None:
        assert self._ends is not None
        for machine, end in last_ends(self._site, moves).items():
            self._ends.setdefault(machine, {})[key] = end
        self._by_order_id[order_id] = key

    def _forget_older_than(self, since: datetime) -> None:
        """Orders that ended everywhere before the correction window get no correction."""
        if self._ends is None:
            return
        oldest = to_micros(since)
        for machine, ends in list(self._ends.items()):
            kept = {key: end for key, end in ends.items() if end >= oldest}
            if kept:
                self._ends[machine] = kept
            else:
                del self._ends[machine]
        alive = {key for ends in self._ends.values() for key in ends}
        self._by_order_id = {o: k for o, k in self._by_order_id.items() if k in alive}

    async def check(self, now: datetime | None = None) -> int:
        """One round; returns how many confirmations were new (not repeats)."""
        now = now or self._clock()
        events, upto = await asyncio.to_thread(self.decisions, now)
        self._rounds += 1
        if self._rounds % 1000 == 0:  # (every few minutes)
            await asyncio.to_thread(self._forget_older_than, now - self._window - self._window)
        new = await publish_decided(self._publisher, events)
        self.published += new
        if upto != self._after:
            self._after = upto
            if self._position_file is not None:
                await asyncio.to_thread(write_whole, self._position_file, str(upto))
        return new

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        await run_rounds(self.check, stop, interval_s, "production confirmations")


def _read_position(path: Path | None) -> int:
    try:
        return int(path.read_text().strip()) if path is not None else 0
    except (FileNotFoundError, ValueError):
        return 0
