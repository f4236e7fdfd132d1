"""Each order's progress and delivery forecast, and the watch that tells the world when a
forecast changes, and how far an order got.

The forecast depends on the clock as much as on events (an order that does not run slides
towards its due date), so the watch re-forecasts open orders on a timer. When an order's status
changes, or its ETA moves by more than the plant's tolerance, it publishes a
``mes.hub.delivery_forecast.changed.v1`` event, which ingest stores on the order like any other
fact (and later feeds ERP confirmations and webhooks).

In the same round it tells each open order's progress: a ``mes.hub.order.progressed.v1`` when
the order's good parts or scrap differ from the last one published and at least
``progress_interval_s`` passed since it (by the watch's clock; the first one, once the order
made something, at once). A count that changes within the interval is told by the first round
after it, with the counts of then. Partners get it as ``mes.order.progress.v1``
(``projections.rules.partner_events``).

Its event ids are the order's change count (forecasts and progress counted apart): a watch that
publishes, dies and publishes again before ingest stored the first one repeats the same id, and
the repeat is dropped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts import CloudEvent
from hub.domain import Order
from hub.ports import EventPublisher
from projections.rules.forecast import Forecast, forecast
from projections.rules.hub_events import hub_event
from projections.rules.plant import PlantConfig
from projections.rules.progress import OrderProgress, Run, order_progress
from projections.views.facts_view import FactsReader, facts_of_runs

log = logging.getLogger(__name__)
FORECAST_TYPE = "mes.hub.delivery_forecast.changed.v1"
PROGRESS_TYPE = "mes.hub.order.progressed.v1"
OPEN = ("unreleased", "released", "running")
FINAL = ("done", "late")


def order_runs(order: Order) -> list[Run]:
    return [
        Run(
            run["machine_id"],
            datetime.fromisoformat(run["start"]),
            datetime.fromisoformat(run["end"]) if run["end"] else None,
        )
        for run in order.runs
    ]


def progress_and_forecast(
    order: Order, reader: FactsReader, plant: PlantConfig, now: datetime
) -> tuple[OrderProgress, Forecast]:
    runs = order_runs(order)
    ideal = plant.order_ideal_cycle_time(order.ideal_cycle_time_s, order.part_number)
    progress = order_progress(
        order.order_id,
        order.quantity,
        ideal,
        runs,
        facts_of_runs(reader, order.site, order.order_id, runs, plant, now),
        plant,
        now,
    )
    if order.status == "cancelled":
        return progress, Forecast(None, None, None, "none")
    expected = forecast(
        plant.calendar(),
        now,
        order.due,
        progress.remaining,
        progress.busy_time_s,
        progress.good,
        ideal,
    )
    return progress, expected


def forecast_change(
    order: Order, expected: Forecast, remaining: int | None, tolerance: timedelta
) -> dict[str, Any] | None:
    """The ``data`` of a forecast-changed event, or None when nothing worth telling changed.

    Worth telling: the first forecast with a status, a new status, or (for an open order) an
    ETA that moved by more than ``tolerance`` or appeared or vanished."""
    if expected.status is None and order.delivery_forecast is None:
        return None
    last = order.delivery_forecast or {}
    last_status = last.get("status")
    last_eta = datetime.fromisoformat(last["eta"]) if last.get("eta") else None
    changed = expected.status != last_status
    if not changed and order.status in OPEN and expected.status != "done":
        # (A done forecast's ETA is "now" and moves with the clock: that is no news.)
        if (expected.eta is None) != (last_eta is None):
            changed = True
        elif expected.eta is not None and last_eta is not None:
            changed = abs(expected.eta - last_eta) > tolerance
    if not changed:
        return None
    return {
        "order_id": order.order_id,
        "status": expected.status,
        "eta": expected.eta.isoformat() if expected.eta else None,
        "due": order.due.isoformat() if order.due else None,
        "remaining": remaining,
        "effective_cycle_time_s": expected.effective_cycle_time_s,
        "basis": expected.basis,
        "previous_status": last_status,
        "previous_eta": last_eta.isoformat() if last_eta else None,
    }


def progress_change(
    order: Order, progress: OrderProgress, now: datetime, interval: timedelta
) -> dict[str, Any] | None:
    """The ``data`` of a progressed event, or None when there is nothing to tell yet.

    Worth telling: good parts or scrap other than the last told (``order.progress``), once
    ``interval`` passed since it was (by event time). An order that made nothing yet and told
    nothing has nothing to say. Worked example, a 300 s interval: 3 good at 06:00 is told at
    once; 5 good at 06:02 waits; 6 good at 06:05 is told; 6 good at 06:20 is no news."""
    good, scrap = progress.good, progress.scrapped
    last = order.progress
    if last is None:
        if good == 0 and scrap == 0:
            return None
    else:
        if (last.get("good"), last.get("scrap")) == (good, scrap):
            return None
        as_of = last.get("as_of")
        if as_of is not None and now - datetime.fromisoformat(as_of) < interval:
            return None
    return {
        "order_id": order.order_id,
        "good": good,
        "scrap": scrap,
        "remaining": progress.remaining,
        "quantity": order.quantity,
    }


class ForecastWatch:
    """Re-forecasts the orders still in play and publishes the changes, and their progress
    (at most once per ``progress_interval_s`` per order)."""

    def __init__(
        self,
        site: str,
        orders: Callable[[], Iterable[Order]],
        reader: FactsReader,
        plant: PlantConfig,
        publisher: EventPublisher,
        ready: Callable[[], bool] = lambda: True,
        progress_interval_s: float = 300.0,
    ) -> None:
        self._site = site
        self._progress_interval = timedelta(seconds=progress_interval_s)
        self._orders = orders
        self._reader = reader
        self._plant = plant
        self._publisher = publisher
        # Whether the views have read everything stored: a view behind the store would make
        # every order look as if it had made nothing, and the watch would say so to the world.
        self._ready = ready
        self.published = 0  # forecast changes published (not counting duplicates)
        self.progressed = 0  # progress events published (not counting duplicates)

    def changes(self, now: datetime) -> list[CloudEvent]:
        if not self._ready():
            log.info("delivery forecasts: the views are catching up; this round is skipped")
            return []
        tolerance = timedelta(seconds=self._plant.forecast_eta_tolerance_s)
        events = []
        for order in self._orders():
            told = (order.delivery_forecast or {}).get("status")
            # An ended order that was announced done or late has nothing more to say.
            if order.status == "cancelled" or (order.status == "ended" and told in FINAL):
                continue
            progress, expected = progress_and_forecast(order, self._reader, self._plant, now)
            told_progress = progress_change(order, progress, now, self._progress_interval)
            if told_progress is not None:
                events.append(
                    self._numbered("progress", "order-progress", PROGRESS_TYPE,
                                   order.progress_changes, order, now, told_progress)
                )  # fmt: skip
            data = forecast_change(order, expected, progress.remaining, tolerance)
            if data is not None:
                events.append(
                    self._numbered("forecast", "delivery-forecast", FORECAST_TYPE,
                                   order.delivery_forecast_changes, order, now, data)
                )  # fmt: skip
        return events

    def _numbered(
        self, kind: str, producer: str, type_: str, told: int, order: Order, now: datetime,
        data: dict[str, Any],
    ) -> CloudEvent:  # fmt: skip
        """The order's next event of ``kind`` (``told`` of them stored): its id is that count,
        so a watch that publishes, dies and publishes again repeats the same id."""
        event_id = f"{kind}-{self._site}-{order.order_id}-{told + 1}"
        return hub_event(self._site, producer, type_, event_id, order.order_id, now, data)

    async def check(self, now: datetime | None = None) -> int:
        """One round: forecast, publish what changed (forecasts and progress); returns how
        many events were new."""
        events = await asyncio.to_thread(self.changes, now or datetime.now(UTC))
        if not events:
            return 0
        receipts = await self._publisher.publish_many(events)
        new = [e.type for e, r in zip(events, receipts, strict=True) if not r.duplicate]
        self.published += new.count(FORECAST_TYPE)
        self.progressed += new.count(PROGRESS_TYPE)
        return len(new)

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                published = await self.check()
                if published:
                    log.info("delivery forecasts and progress: %d events published", published)
            except Exception:
                log.exception("delivery forecast round failed; next round in %.0f s", interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
