"""The partner watch's decisions (the store and NATS faked): who is owed what, and when it looks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from contracts import PARTNER_EVENT_TYPES
from hub.domain import Order, Origin
from hub.ports import InMemoryPublisher
from projections.processes.partner_watch import PartnerWatch
from projections.rules.partner_events import Subscription

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


class Store:
    """Orders' stored events, numbered as the log would, and how often a history was read."""

    def __init__(self) -> None:
        self.log: list[tuple[int, Any]] = []
        self.by_order: dict[UUID, list[Any]] = {}
        self.histories_read = 0
        self.broken: set[UUID] = set()

    def add(self, order: Order) -> None:
        for event in order.collect_events():
            self.log.append((len(self.log) + 1, event))
            self.by_order.setdefault(order.id, []).append(event)

    def read(self, after: int, limit: int, topics: Any) -> tuple[int, list[tuple[int, Any]]]:
        found = [(p, e) for p, e in self.log if p > after][:limit]
        return (found[-1][0] if found else after), found

    def history(self, key: UUID) -> list[Any]:
        self.histories_read += 1
        if key in self.broken:
            raise RuntimeError("a broken order")
        return list(self.by_order[key])


def order(order_id: str, customer: str) -> Order:
    made = Order(site="default", order_id=order_id)
    made.release(Origin(f"{order_id}-r", "urn:test", T0 - timedelta(hours=1)), {
        "order_id": order_id, "part_number": "P-1", "quantity": 5, "customer": customer,
        "due": (T0 + timedelta(days=1)).isoformat(),
    })  # fmt: skip
    made.start_on(Origin(f"{order_id}-s", "urn:test", T0), "M1")
    return made


def watch(
    store: Store, *subscriptions: Subscription, **options: Any
) -> tuple[PartnerWatch, InMemoryPublisher]:
    publisher = InMemoryPublisher()
    found = PartnerWatch(
        "default", store.read, store.history, subscriptions, publisher,
        since=T0 - timedelta(days=1), position=0, **options,
    )  # fmt: skip
    return found, publisher


def owed(publisher: InMemoryPublisher) -> list[tuple[str, list[str]]]:
    return [
        (e.envelope.subject or "", e.envelope.data["endpoints"]) for _, e in publisher.published
    ]


C7 = Subscription("c7", customers=frozenset({"C-7"}))
C8 = Subscription("c8", customers=frozenset({"C-8"}))


async def test_each_endpoint_is_owed_only_its_customers_orders() -> None:
    store = Store()
    store.add(order("SO-1", "C-7"))
    store.add(order("SO-2", "C-8"))
    found, publisher = watch(store, C7, C8, Subscription("all", customers=None))
    assert await found.check() == 2
    assert sorted(owed(publisher)) == [("SO-1", ["all", "c7"]), ("SO-2", ["all", "c8"])]


async def test_a_customer_corrected_before_the_watch_looked_tells_neither_what_was_before() -> None:
    # SO-3 was released for C-7, started, then corrected to C-8, all before the watch's round:
    # C-7 is no longer its customer, and C-8 was not when it started.
    made = order("SO-3", "C-7")
    made.change(Origin("SO-3-c", "urn:test", T0 + timedelta(minutes=5)), {"customer": "C-8"})
    store = Store()
    store.add(made)
    found, publisher = watch(store, C7, C8)
    assert await found.check() == 0 and owed(publisher) == []


async def test_an_endpoint_added_later_is_not_told_what_happened_before() -> None:
    store = Store()
    store.add(order("SO-4", "C-7"))
    later = Subscription("c7-new", customers=frozenset({"C-7"}), since=T0 + timedelta(hours=1))
    found, publisher = watch(store, later)
    assert await found.check() == 0 and owed(publisher) == []


async def test_an_attempt_to_deliver_a_webhook_does_not_make_the_watch_look_again() -> None:
    made = order("SO-5", "C-7")
    store = Store()
    store.add(made)
    found, publisher = watch(store, C7)
    assert await found.check() == 1 and store.histories_read == 1
    made.record_delivery_attempt(Origin("a1", "urn:test", T0 + timedelta(minutes=1)), {
        "order_id": "SO-5", "message_id": "m1", "destination": "c7", "attempt": 1,
        "outcome": "failed",
    })  # fmt: skip
    store.add(made)
    assert await found.check() == 0 and store.histories_read == 1
    # A new fact of the order is looked at, and only what is new is decided.
    made.end_on(Origin("SO-5-e", "urn:test", T0 + timedelta(minutes=30)), "M1")
    store.add(made)
    assert await found.check() == 0 and store.histories_read == 2
    assert len(publisher.published) == 1


async def test_one_broken_order_does_not_stop_the_others() -> None:
    store = Store()
    bad, good = order("SO-6", "C-7"), order("SO-7", "C-7")
    store.add(bad)
    store.add(good)
    store.broken.add(bad.id)
    found, publisher = watch(store, C7)
    assert await found.check() == 1 and owed(publisher) == [("SO-7", ["c7"])]


REFERENCE = "mes-hub/default 12 " + "A" * 43 + "="  # a checkpoint reference's form


async def test_each_decision_carries_the_latest_checkpoint_read_once_a_round() -> None:
    store = Store()
    store.add(order("SO-8", "C-7"))
    store.add(order("SO-9", "C-7"))
    reads: list[int] = []

    def checkpoint() -> str | None:
        reads.append(1)
        return REFERENCE

    found, publisher = watch(store, C7, checkpoint=checkpoint)
    assert await found.check() == 2 and len(reads) == 1
    told = [e.envelope.data for _, e in publisher.published]
    assert [d["data"]["checkpoint"] for d in told] == [REFERENCE, REFERENCE]
    # As partners validate it: the contract's model takes it.
    started = PARTNER_EVENT_TYPES[told[0]["event_type"]].model_validate(told[0]["data"])
    assert started.checkpoint == REFERENCE
    assert await found.check() == 0 and len(reads) == 1  # (nothing new: not read)


async def test_before_the_first_checkpoint_the_payload_says_null() -> None:
    store = Store()
    store.add(order("SO-10", "C-7"))
    found, publisher = watch(store, C7)  # (the default: no checkpoint signed yet)
    assert await found.check() == 1
    [(_, event)] = publisher.published
    assert "checkpoint" in event.envelope.data["data"]
    assert event.envelope.data["data"]["checkpoint"] is None


async def test_a_checkpoint_that_cannot_be_read_fails_the_round_and_skips_nothing() -> None:
    store = Store()
    store.add(order("SO-11", "C-7"))
    failing = [True]

    def checkpoint() -> str | None:
        if failing[0]:
            raise RuntimeError("database locked")
        return REFERENCE

    found, publisher = watch(store, C7, checkpoint=checkpoint)
    with pytest.raises(RuntimeError):
        await found.check()
    failing[0] = False
    assert await found.check() == 1  # the same position read again: SO-11 is owed its start
    [(_, event)] = publisher.published
    assert event.envelope.data["data"]["checkpoint"] == REFERENCE
