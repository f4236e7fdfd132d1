"""Each order's progress and delivery forecast, and the watch that tells the world when a
forecast changes.

The forecast depends on the clock as much as on events (an order that does not run slides
towards its due date), so the watch re-forecasts open orders on a timer. When an order's status
changes, or its ETA moves by more than the plant's tolerance, it publishes a
``mes.hub.delivery_forecast.changed.v1`` event, which ingest stores on the order like any other
fact (and later feeds ERP confirmations and webhooks).

Its event ids are the order's change count: a watch that publishes, dies and publishes again
before ingest stored the first one repeats the same id, and the repeat is dropped as a duplicate.
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


class ForecastWatch:
    """Re-forecasts the orders still in play and publishes the changes."""

    def __init__(
        self,
        site: str,
        orders: Callable[[], Iterable[Order]],
        reader: FactsReader,
        plant: PlantConfig,
        publisher: EventPublisher,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._site = site
        self._orders = orders
        self._reader = reader
        self._plant = plant
        self._publisher = publisher
        # Whether the views have read everything stored: a view behind the store would make
        # every order look as if it had made nothing, and the watch would say so to the world.
        self._ready = ready
        self.published = 0  # forecast changes published (not counting duplicates)

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
            data = forecast_change(order, expected, progress.remaining, tolerance)
            if data is None:
                continue
            number = order.delivery_forecast_changes + 1
            event_id = f"forecast-{self._site}-{order.order_id}-{number}"
            events.append(
                hub_event(
                    self._site, "delivery-forecast", FORECAST_TYPE, event_id, order.order_id,
                    now, data,
                )
            )  # fmt: skip
        return events

    async def check(self, now: datetime | None = None) -> int:
        """One round: forecast, publish what changed; returns how many events were new."""
        events = await asyncio.to_thread(self.changes, now or datetime.now(UTC))
        if not events:
            return 0
        receipts = await self._publisher.publish_many(events)
        new = sum(1 for receipt in receipts if not receipt.duplicate)
        self.published += new
        return new

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                published = await self.check()
                if published:
                    log.info("delivery forecasts: %d changed", published)
            except Exception:
                log.exception("delivery forecast round failed; next round in %.0f s", interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
