"""What an order's partners are told about it (``contracts.PARTNER_EVENT_TYPES``), derived
from the order's stored events in the order they were stored: a rebuild gives the same events
with the same ids (docs/webhooks.md).

- ``mes.order.started.v1``: its first run started (once per order);
- ``mes.order.progress.v1``: its good parts or scrap changed — the forecast watch records that
  (``mes.hub.order.progressed.v1``, from the order's part counts) at most once per
  ``[hub] webhook_progress_interval_s`` per order, so partners are told at that pace at most;
- ``mes.order.at_risk.v1``: its delivery forecast turned ``at_risk`` or ``late``, or changed
  between the two;
- ``mes.order.eta_changed.v1``: the forecast end moved with the status unchanged (the forecast
  watch publishes that only when it moved by more than the plant's tolerance);
- ``mes.order.completed.v1``: a production confirmation said the order is done (once);
- ``mes.order.confirmed.v1``: an ERP acknowledged a production confirmation (once per
  confirmation, at the first ERP that took it).

Each event's id is derived from what caused it — the order and the type where it happens once,
else the stored event or the confirmation — so the id a partner dedupes on is the same on
every retry, redelivery, replay and rebuild.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts import PARTNER_EVENT_TYPES
from projections.rules.keys import message_key

STARTED, AT_RISK = "mes.order.started.v1", "mes.order.at_risk.v1"
PROGRESS = "mes.order.progress.v1"
ETA_CHANGED, COMPLETED = "mes.order.eta_changed.v1", "mes.order.completed.v1"
CONFIRMED = "mes.order.confirmed.v1"
_ORDER_FIELDS = ("customer", "part_number", "quantity", "due")
_TAKEN = ("delivered", "duplicate")


@dataclass(frozen=True)
class PartnerEvent:
    """One thing to tell the order's partners: the CloudEvent's id, type, time and data."""

    id: str
    type: str
    time: datetime
    order_id: str
    data: dict[str, Any]


def partner_event_id(*parts: str) -> str:
    """A stable id from what caused the event (32 hex characters)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def partner_events(site: str, order_id: str, events: Iterable[Any]) -> list[PartnerEvent]:
    """What the partners of ``order_id`` are told, from the order aggregate's stored events
    (in stored order).

    Worked example: SO-1 of 10 for customer C-7 is released, starts on M1 at 06:00 (started),
    the watch records 4 good and 1 scrap (progress: 6 remaining, 40 % complete), its forecast
    turns at_risk with an ETA of Tuesday 18:00 (at_risk), then the ETA moves to
    Wednesday 10:00 (eta_changed); confirmation 1 of 10 good, final, is decided (completed) and
    the ERP takes it (confirmed).

    Nothing is told of an order before the ERP released it (whose it is, what and how many,
    is not known yet): what happened before is told at the release — a start, as the earliest
    start stored by then. Nothing is told after it was cancelled."""
    order: dict[str, Any] = {"order_id": order_id}
    released = False
    told: set[str] = set()  # the ids already derived (what happens once)
    confirmations: dict[str, dict[str, Any]] = {}  # outbox message id -> confirmation
    status: str | None = None  # the forecast's, as last told
    first_start: Any = None  # the earliest start stored before the release
    found: list[PartnerEvent] = []

    def tell(event_id: str, type_: str, time: datetime, **data: Any) -> None:
        if event_id in told:
            return
        told.add(event_id)
        payload = {**order, **data}
        # Validated as partners will validate it: a derivation bug fails here, not at them.
        checked = PARTNER_EVENT_TYPES[type_].model_validate(payload)
        # (Its ``checkpoint`` is not derived from the order: the watch adds it when deciding.)
        data = checked.model_dump(mode="json", exclude={"checkpoint"})
        found.append(PartnerEvent(event_id, type_, time, order_id, data))

    def started(start: Any) -> None:
        tell(
            partner_event_id(site, order_id, STARTED), STARTED, start.event_time,
            machine_id=start.machine_id, started_at=start.event_time,
        )  # fmt: skip

    for event in events:
        kind = type(event).__name__
        if kind == "Cancelled":
            break  # (what is stored after a cancel is not told)
        if kind in ("Released", "Changed"):
            order.update((f, event.fields[f]) for f in _ORDER_FIELDS if f in event.fields)
            if kind == "Released" and not released:
                released = True
                if first_start is not None:
                    started(first_start)
        elif kind == "Started":
            if released:
                started(event)
            elif first_start is None or event.event_time < first_start.event_time:
                first_start = event
        elif not released:
            continue  # (a forecast, progress or confirmation of an order not released: not told)
        elif kind == "Progressed":
            progress = event.progress
            good, quantity = progress["good"], progress.get("quantity") or order.get("quantity")
            tell(
                partner_event_id(event.source, event.event_id, PROGRESS), PROGRESS,
                event.event_time, good=good, scrap=progress["scrap"],
                remaining=progress.get("remaining"),
                percent_complete=min(1.0, good / quantity) if quantity else None,
            )  # fmt: skip
        elif kind == "DeliveryForecastChanged":
            forecast = event.forecast
            cause = (event.source, event.event_id)
            now = forecast.get("status")
            if now in ("at_risk", "late") and now != status:
                tell(
                    partner_event_id(*cause, AT_RISK), AT_RISK, event.event_time,
                    status=now, eta=forecast.get("eta"),
                )  # fmt: skip
            # The ETA moved with the status unchanged: the forecast watch publishes that only
            # past the plant's tolerance (a change of status comes with any ETA).
            previous, eta = forecast.get("previous_eta"), forecast.get("eta")
            same = forecast.get("previous_status") == now and now != "done"
            if same and previous and eta and previous != eta:
                tell(
                    partner_event_id(*cause, ETA_CHANGED), ETA_CHANGED, event.event_time,
                    eta=eta, previous_eta=previous, status=now,
                )  # fmt: skip
            status = now
        elif kind == "ConfirmationDue":
            due = event.confirmation
            confirmations[message_key(event.source, event.event_id)] = due
            if due.get("final") and due.get("yield_total") is not None:
                tell(
                    partner_event_id(site, order_id, COMPLETED), COMPLETED, event.event_time,
                    good=due["yield_total"], scrap=due.get("scrap_total") or 0,
                    completed_at=due.get("end") or event.event_time,
                )  # fmt: skip
        elif kind == "DeliveryAttempted":
            attempt = event.attempt
            due = confirmations.get(attempt["message_id"])
            if due is not None and attempt["outcome"] in _TAKEN:
                tell(
                    partner_event_id(attempt["message_id"], CONFIRMED), CONFIRMED,
                    event.event_time, sequence=due["sequence"],
                    yield_quantity=due["yield_quantity"], scrap_quantity=due["scrap_quantity"],
                    yield_total=due.get("yield_total"), scrap_total=due.get("scrap_total"),
                    final=due["final"], confirmed_at=event.event_time,
                )  # fmt: skip
    return found


@dataclass(frozen=True)
class Subscription:
    """What one partner endpoint is sent: the event types it asked for (None: all), and the
    orders it may see — of its customers (None: every customer), its part numbers, or its
    order ids (empty: no narrowing). A partner never sees an order outside what it may see."""

    endpoint: str
    event_types: frozenset[str] | None = None
    customers: frozenset[str] | None = frozenset()
    part_numbers: frozenset[str] = frozenset()
    orders: frozenset[str] = frozenset()
    since: datetime | None = None  # when the endpoint was added: what happened before is not its
    # What its partner may see (a partner registered through the API): the filters above only
    # narrow it. None: the filters alone say (a [[webhook]] entry of the config file).
    visible: Visibility | None = None

    def wants(self, event: PartnerEvent, customer_now: str | None = None) -> bool:
        """``customer_now``: the order's customer as the store has it now (a customer
        corrected after the event: neither the old nor the new one is told what was before
        unless both may see it)."""
        data = event.data
        if self.event_types is not None and event.type not in self.event_types:
            return False
        if self.since is not None and event.time < self.since:
            return False
        if self.customers is not None and (
            data.get("customer") not in self.customers or customer_now not in self.customers
        ):
            return False
        if self.part_numbers and data.get("part_number") not in self.part_numbers:
            return False
        if self.orders and event.order_id not in self.orders:
            return False
        return self.visible is None or self.visible.admits(event, customer_now)


@dataclass(frozen=True)
class Visibility:
    """The orders a partner may see: all of them, or those of its customers, of its part
    numbers (a supplier of that part) or named. Worked example: a supplier granted part
    ``P-100`` sees SO-1 (part P-100, customer C-7) but not SO-2 (part P-200, customer C-7);
    a customer partner granted C-7 sees both."""

    all_orders: bool = False
    customers: frozenset[str] = frozenset()
    part_numbers: frozenset[str] = frozenset()
    orders: frozenset[str] = frozenset()

    def admits(self, event: PartnerEvent, customer_now: str | None = None) -> bool:
        data = event.data
        if self.all_orders or event.order_id in self.orders:
            return True
        # (a customer corrected since: both the old and the new one must be this partner's)
        if data.get("customer") in self.customers and customer_now in self.customers:
            return True
        return data.get("part_number") is not None and data["part_number"] in self.part_numbers
