"""The partner watch: decides what partners' webhook endpoints are owed.

It reads the store's order events after its position, derives each touched order's partner
events (``projections.rules.partner_events``) and, for each one not told yet whose time is not
before ``since`` (when the hub began to tell partners: none is sent history), publishes a
``mes.hub.webhook.due.v1`` for the endpoints whose subscriptions want it. Its id derives from
the partner event, so a watch that publishes, dies and derives again repeats the same id and the
repeat is dropped; the outbox (``projections.views.outbox_view``, ``hub.outbox``) delivers it to
each endpoint, in order per order.

The partner event's data gets the hub's latest signed audit checkpoint when it was decided
(``checkpoint``: ``hub.sealer.checkpoint_reference``; null before the first), stored with the
decision and so sent as stored: partners hold copies of the checkpoints that whoever holds the
hub's database cannot rewrite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.utils import get_topic

from contracts import CloudEvent
from hub.domain import Order
from hub.files import write_whole
from hub.ports import EventPublisher
from projections.processes.rounds import publish_decided, run_rounds
from projections.rules.hub_events import hub_event
from projections.rules.partner_events import Subscription, partner_events

log = logging.getLogger(__name__)
WEBHOOK_DUE = "mes.hub.webhook.due.v1"
PRODUCER = "webhooks"
BATCH = 2000
# The order events partner events are derived from (what makes an order worth a look).
_KINDS = ("Released", "Changed", "Cancelled", "Started", "Progressed",
          "DeliveryForecastChanged", "ConfirmationDue", "DeliveryAttempted")  # fmt: skip


def order_topics() -> frozenset[str]:
    return frozenset(get_topic(getattr(Order, kind)) for kind in _KINDS)


class PartnerWatch:
    """See the module. ``read(after, limit, topics)``: the store's log (``EventStore.read``);
    ``history(aggregate_id)``: one order's stored events."""

    def __init__(
        self,
        site: str,
        read: Callable[[int, int, Collection[str]], tuple[int, list[tuple[int, Any]]]],
        history: Callable[[UUID], list[Any]],
        subscriptions: Sequence[Subscription] | Callable[[], Sequence[Subscription]],
        publisher: EventPublisher,
        since: datetime,
        position: int,
        position_file: Path | None = None,
        checkpoint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._site, self._read, self._history = site, read, history
        # The latest signed audit checkpoint's reference, read once per round that looks at
        # an order (off the event loop, like the rest of ``decisions``).
        self._checkpoint = checkpoint
        self._reference: str | None = None  # this round's
        # A list, or where to read them each round (partners register endpoints any time).
        self._subscriptions_now = (
            subscriptions if callable(subscriptions) else lambda: list(subscriptions)
        )
        self._subscriptions: list[Subscription] = []
        self._publisher = publisher
        self._since, self._position, self._position_file = since, position, position_file
        self._topics = order_topics()
        self._endpoints: set[str] = set()
        # Per order, how many of its partner events were decided: the next round decides only
        # those after (forgotten on a restart: the repeats are dropped by their ids).
        self._decided: dict[UUID, int] = {}
        self.published = 0
        self.behind = False  # the last round read a whole batch

    def decisions(self) -> tuple[list[CloudEvent], int, dict[UUID, int]]:
        """What is owed for the order events stored after the position, the position read to,
        and per order how many of its partner events that decides (kept once published)."""
        upto, found = self._read(self._position, BATCH, self._topics)
        # The subscriptions as they are now, read after the events: an endpoint registered
        # before an event was stored is among them (one registered after may be too: then it
        # is told what is not before its ``since``).
        self._subscriptions = list(self._subscriptions_now())
        self._endpoints = {s.endpoint for s in self._subscriptions}
        if not self._subscriptions:  # no endpoint: nothing is owed (nor told later: ``since``)
            return [], upto, {}
        # (An attempt to deliver a webhook changes nothing partners are told: not a reason to
        # look at its order again, or every attempt would.)
        touched = sorted(
            {event.originator_id for _, event in found if not self._webhook_attempt(event)},
            key=str,
        )
        events: list[CloudEvent] = []
        decided: dict[UUID, int] = {}
        # Read before the orders are (a failure fails the round, read again from the same
        # position; not one order's, which would skip its partner events).
        self._reference = self._checkpoint() if touched else None
        for key in touched:
            try:
                found_here, decided[key] = self._order_decisions(key)
                events += found_here
            except Exception:  # one order's trouble must not stop every partner's webhooks
                log.exception("partner webhooks: order %s skipped", key)
        return events, upto, decided

    def _webhook_attempt(self, event: Any) -> bool:
        attempt = getattr(event, "attempt", None)
        return isinstance(attempt, dict) and attempt.get("destination") in self._endpoints

    def _order_decisions(self, key: UUID) -> tuple[list[CloudEvent], int]:
        stored = self._history(key)
        registered = stored[0] if stored else None
        if registered is None or getattr(registered, "site", None) != self._site:
            return [], 0
        order_id = str(registered.order_id)
        customer_now = _customer(stored)
        told_all = partner_events(self._site, order_id, stored)
        events: list[CloudEvent] = []
        for sequence, told in enumerate(told_all, 1):
            if sequence <= self._decided.get(key, 0) or told.time < self._since:
                continue
            endpoints = sorted(
                s.endpoint for s in self._subscriptions if s.wants(told, customer_now)
            )
            if not endpoints:
                continue
            due = {
                "order_id": order_id, "sequence": sequence, "event_id": told.id,
                "event_type": told.type, "event_time": told.time.isoformat(),
                "data": {**told.data, "checkpoint": self._reference}, "endpoints": endpoints,
            }  # fmt: skip
            events.append(
                hub_event(self._site, PRODUCER, WEBHOOK_DUE, f"webhook-{told.id}", order_id,
                          told.time, due)
            )  # fmt: skip
        return events, len(told_all)

    async def check(self) -> int:
        """One round; returns how many were new (not repeats)."""
        before = self._position
        events, upto, decided = await asyncio.to_thread(self.decisions)
        self.behind = upto - before >= BATCH  # (read a whole batch: there is likely more)
        new = await publish_decided(self._publisher, events)
        self.published += new
        self._decided.update(decided)
        if upto != self._position:
            self._position = upto
            if self._position_file is not None:
                await asyncio.to_thread(write_whole, self._position_file, str(upto))
        return new

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        await run_rounds(self.check, stop, interval_s, "partner webhooks", lambda: self.behind)


def _customer(stored: Sequence[Any]) -> str | None:
    """The order's customer as the store has it now (its last release or change naming one)."""
    customer = None
    for event in stored:
        fields = getattr(event, "fields", None)
        if isinstance(fields, dict) and "customer" in fields:
            customer = fields["customer"]
    return customer
