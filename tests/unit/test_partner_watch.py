"""The partner watch's decisions (the store and NATS faked): who is owed what, and when it looks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

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


def watch(store: Store, *subscriptions: Subscription) -> tuple[PartnerWatch, InMemoryPublisher]:
    publisher = InMemoryPublisher()
    found = PartnerWatch(
        "default", store.read, store.history, subscriptions, publisher,
        since=T0 - timedelta(days=1), position=0,
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
