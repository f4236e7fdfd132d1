"""The outbox view's reads, on SQLite and PostgreSQL: what a destination may be sent now is the
first message not taken of each order; a dead one holds its order back without holding back the
others."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from projections.views.database import PostgresViews, SQLiteViews
from projections.views.outbox_view import (
    CONFIRMATION,
    WEBHOOK,
    OutboxReader,
    OutboxView,
    message_key,
)
from tests.conftest import fresh_schema

AT = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


@dataclass
class ConfirmationDue:  # the stored event's shape, as the view reads it
    source: str
    event_id: str
    event_time: datetime
    confirmation: dict[str, Any]


@dataclass
class DeliveryAttempted:
    source: str
    event_id: str
    event_time: datetime
    attempt: dict[str, Any]


def due(order_id: str, sequence: int) -> ConfirmationDue:
    return ConfirmationDue(
        "urn:test", f"confirm-{order_id}-{sequence}", AT,
        {"order_id": order_id, "site": "default", "sequence": sequence, "reason": "run_ended",
         "yield_quantity": 1, "scrap_quantity": 0, "final": False},
    )  # fmt: skip


def tried(order_id: str, sequence: int, outcome: str, attempt: int = 1) -> DeliveryAttempted:
    return DeliveryAttempted(
        "urn:test", f"attempt-{order_id}-{sequence}-{attempt}-{outcome}", AT,
        {"message_id": message_key("urn:test", f"confirm-{order_id}-{sequence}"),
         "destination": "erp", "attempt": attempt, "outcome": outcome},
    )  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Makes fresh, empty views databases: SQLite files, or PostgreSQL schemas."""
    made: list[Any] = []

    def fresh() -> Any:
        if request.param == "sqlite":
            path = tmp_path / f"views-{len(made)}.sqlite"
            db: Any = SQLiteViews(path)
        else:
            dsn = request.getfixturevalue("postgres_dsn")
            db = PostgresViews(dsn, fresh_schema(dsn), pool_size=1)
        made.append(db)
        return db

    yield fresh
    for db in made:
        db.close()


def view_of(stores: Callable[[], Any], events: list[Any]) -> OutboxReader:
    db = stores()
    view = OutboxView()
    with db.transaction() as cursor:
        view.create(cursor, db.dialect)
        view.create_indexes(cursor)
        view.apply(cursor, list(enumerate(events, start=1)))
    return OutboxReader(db)


def heads(reader: OutboxReader) -> list[str]:
    _, found = reader.undelivered("erp", [CONFIRMATION])
    return [f"{m.ordering_key}/{m.sequence}" for m in found]


def test_each_order_s_first_message_not_taken_and_a_dead_one_holds_only_its_order(
    stores: Callable[[], Any],
) -> None:
    reader = view_of(
        stores,
        [due("A", 1), due("A", 2), due("B", 1), due("B", 2), due("C", 1),
         tried("A", 1, "dead"), tried("B", 1, "delivered")],
    )  # fmt: skip
    assert heads(reader) == ["B/2", "C/1"]
    floor, _ = reader.undelivered("erp", [CONFIRMATION])
    assert floor == 0  # A/1 (position 1), dead, is not taken: nothing before it to skip


def test_many_dead_orders_do_not_fill_the_page(stores: Callable[[], Any]) -> None:
    events: list[Any] = []
    for n in range(100):
        events += [due(f"D{n}", 1), tried(f"D{n}", 1, "dead")]
    events.append(due("LIVE", 1))
    reader = view_of(stores, events)
    _, found = reader.undelivered("erp", [CONFIRMATION], limit=64)
    assert [m.ordering_key for m in found] == ["LIVE"]


def test_a_requeued_dead_message_is_sent_again_and_taken_ones_move_the_floor(
    stores: Callable[[], Any],
) -> None:
    reader = view_of(
        stores,
        [due("A", 1), due("B", 1), tried("A", 1, "delivered"), tried("B", 1, "dead", 3),
         tried("B", 1, "requeued", 3)],
    )  # fmt: skip
    floor, found = reader.undelivered("erp", [CONFIRMATION])
    assert floor == 1  # A/1 (position 1) taken
    (again,) = found
    assert (again.ordering_key, again.outcome, again.attempts, again.requeued_at) == (
        "B", "requeued", 3, 3,
    )  # fmt: skip


@dataclass
class WebhookDue:
    source: str
    event_id: str
    event_time: datetime
    webhook: dict[str, Any]


def webhook(order_id: str, sequence: int, *endpoints: str) -> WebhookDue:
    return WebhookDue(
        "urn:test", f"webhook-{order_id}-{sequence}", AT,
        {"order_id": order_id, "site": "default", "sequence": sequence,
         "event_id": f"evt-{order_id}-{sequence}", "event_type": "mes.order.started.v1",
         "event_time": AT.isoformat(), "data": {"order_id": order_id},
         "endpoints": list(endpoints)},
    )  # fmt: skip


def delivered_to(endpoint: str, order_id: str, sequence: int) -> DeliveryAttempted:
    return DeliveryAttempted(
        "urn:test", f"attempt-{endpoint}-{order_id}-{sequence}", AT,
        {"message_id": message_key("urn:test", f"webhook-{order_id}-{sequence}"),
         "destination": endpoint, "attempt": 1, "outcome": "delivered"},
    )  # fmt: skip


def test_a_message_addressed_to_endpoints_goes_to_them_only_in_order_per_order(
    stores: Callable[[], Any],
) -> None:
    # A's partner events: 1 for p1, 2 for p1 and p2; B's 1 for p2; and an ERP confirmation,
    # addressed to no one in particular. p1 gets A/1 (A/2 waits behind it); p2 gets A/2 at
    # once (A/1 is not its) and B/1; the ERP gets its confirmation and no webhook.
    events: list[Any] = [webhook("A", 1, "p1"), webhook("A", 2, "p1", "p2"),
                         webhook("B", 1, "p2"), due("C", 1)]  # fmt: skip
    reader = view_of(stores, events)

    def owed(endpoint: str, reader: OutboxReader = reader) -> list[str]:
        _, found = reader.undelivered(endpoint, [WEBHOOK])
        return [f"{m.ordering_key}/{m.sequence}" for m in found]

    assert owed("p1") == ["A/1"]
    assert owed("p2") == ["A/2", "B/1"]
    assert owed("p3") == []
    assert heads(reader) == ["C/1"]
    (first,) = reader.undelivered("p1", [WEBHOOK])[1]
    assert first.payload == {
        "event_id": "evt-A-1", "event_type": "mes.order.started.v1",
        "event_time": AT.isoformat(), "data": {"order_id": "A"}, "order_id": "A",
    }  # fmt: skip
    # p1 took A/1: A/2 is its next.
    later = view_of(stores, [*events, delivered_to("p1", "A", 1)])
    assert owed("p1", later) == ["A/2"]
