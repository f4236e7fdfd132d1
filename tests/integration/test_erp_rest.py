"""The generic REST ERP dialect (adapters.erp.rest) against a real HTTP peer on loopback
(tests.erp_standins.rest): orders in with a cursor and a state file, confirmations out with an
Idempotency-Key, and the ``[[erp]]`` entry's validation."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from adapters.erp import rest
from adapters.erp.base import Confirmation
from adapters.erp.config import ErpConfigError, confirmation_sender, erp_section
from adapters.erp.poller import OrderPoller
from contracts import CloudEvent, validate_envelope
from hub.outbox import DeliveryFailed
from hub.ports import InMemoryPublisher, PublishReceipt
from tests.conftest import T0
from tests.erp_standins import served
from tests.erp_standins.rest import (
    CONFIRM_PATH,
    ORDER_MAPPING,
    ORDERS_PATH,
    order_record,
    rest_erp,
)

TOKEN = "rest-token-0123456789"
# A checkpoint reference as hub.sealer.checkpoint_reference gives it: origin, size, base64 root.
CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "erp-token"
    path.write_text(TOKEN + "\n")
    return path


def raw_entry(url: str, secret_file: Path, **keys: Any) -> dict[str, Any]:
    return {
        "name": "plant-erp",
        "dialect": "rest",
        "url": url,
        "secret": {"file": str(secret_file)},
        "allow": ["127.0.0.1"],
        "timeout_s": 2,
        "orders_path": ORDERS_PATH,
        "items": "data",
        "confirm_path": CONFIRM_PATH,
        "mapping": dict(ORDER_MAPPING),
        **keys,
    }


def entry(url: str, secret_file: Path, **keys: Any) -> rest.Entry:
    [found] = erp_section([raw_entry(url, secret_file, **keys)], "mes-hub.toml", env={})
    assert isinstance(found, rest.Entry)
    return found


def source(e: rest.Entry, state_dir: Path) -> rest.RestOrderSource:
    found = rest.order_source(e, state_dir)
    assert found is not None
    return found


def confirmation(key: str = "evt-0001", order_id: str = "WO-1", **changes: Any) -> Confirmation:
    made = Confirmation(
        key=key,
        order_id=order_id,
        sequence=1,
        machine_id="M-1",
        operation="0010",
        yield_quantity=40,
        scrap_quantity=2,
        start=T0,
        end=T0 + timedelta(hours=3),
        final=False,
        correction_of=None,
        posted_at=T0 + timedelta(hours=3, minutes=1),
        yield_total=40,
        scrap_total=2,
    )
    return replace(made, **changes)


@pytest.fixture
async def erp() -> AsyncIterator[tuple[FastAPI, str]]:
    app = rest_erp(token=TOKEN)
    async with served(app) as url:
        yield app, url


def kinds(events: list[CloudEvent]) -> list[tuple[str, str]]:
    return [(e.type.split(".")[-2], e.subject) for e in events]


# --- orders in ---------------------------------------------------------------------------------


async def test_orders_are_released_changed_and_cancelled_publishing_only_what_changed(
    erp: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = erp
    app.state.orders = [
        order_record(1, "2026-03-02T06:00:00Z", cycle_s=42.5),
        order_record(2, "2026-03-02T06:00:00Z", status="draft"),
    ]
    orders = source(entry(url, secret_file), tmp_path / "erp")

    events, cursor = await orders.changes(None)
    assert kinds(events) == [("released", "WO-1")]  # a draft is not for the floor yet
    [released] = events
    assert released.data == {
        "order_id": "WO-1",
        "part_number": "P-1",
        "quantity": 100,
        "due": "2026-03-10T14:00:00Z",
        "customer": "ACME",
        "ideal_cycle_time_s": 42.5,
    }
    assert released.time == T0 and released.source == "urn:mes-hub:erp:plant-erp"
    assert app.state.order_queries[-1] == {}

    app.state.orders[0].update(qty="120.000", modified="2026-03-02T07:05:00+01:00")
    events, cursor = await orders.changes(cursor)
    assert app.state.order_queries[-1] == {"modified_since": "2026-03-02T06:00:00Z"}
    assert kinds(events) == [("changed", "WO-1")]
    assert events[0].data == {"order_id": "WO-1", "quantity": 120}

    app.state.orders[1].update(state="released", modified="2026-03-02T06:10:00Z")
    app.state.orders[0].update(state="cancelled", modified="2026-03-02T06:11:00Z")
    events, cursor = await orders.changes(cursor)
    assert app.state.order_queries[-1] == {"modified_since": "2026-03-02T07:05:00+01:00"}
    assert kinds(events) == [("released", "WO-2"), ("cancelled", "WO-1")]
    assert events[1].data == {"order_id": "WO-1", "reason": "status 'cancelled' in plant-erp"}

    events, _ = await orders.changes(cursor)  # the last records again (inclusive): nothing new
    assert events == []
    for event in released, *events:
        validate_envelope(event)
    assert (tmp_path / "erp" / "plant-erp.orders.json").is_file()


async def test_the_same_state_read_again_gives_the_same_ids(
    erp: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = erp
    app.state.orders = [order_record(n, "2026-03-02T06:00:00Z") for n in (1, 2)]
    orders = source(entry(url, secret_file), tmp_path / "erp")

    first, cursor = await orders.changes(None)
    again, same_cursor = await orders.changes(None)  # the cursor was never stored
    assert [e.id for e in again] == [e.id for e in first] and len(first) == 2
    assert same_cursor != cursor  # a new generation of the same state

    app.state.orders[0].update(due_at="2026-03-11T14:00:00Z", modified="2026-03-02T07:00:00Z")
    changed, _ = await orders.changes(same_cursor)
    # The caller died before storing the new cursor: it asks again with the old one.
    replayed, _ = await orders.changes(same_cursor)
    after_restart, _ = await source(entry(url, secret_file), tmp_path / "erp").changes(same_cursor)
    assert kinds(changed) == [("changed", "WO-1")]
    assert changed[0].data == {"order_id": "WO-1", "due": "2026-03-11T14:00:00Z"}
    assert [e.id for e in replayed] == [e.id for e in after_restart] == [changed[0].id]


async def test_the_cursor_and_the_orders_state_survive_a_restart(
    erp: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = erp
    app.state.orders = [order_record(1, "2026-03-02T06:00:00Z")]
    _, cursor = await source(entry(url, secret_file), tmp_path / "erp").changes(None)
    _, cursor = await source(entry(url, secret_file), tmp_path / "erp").changes(cursor)

    app.state.orders[0].update(customer={"name": "Globex"}, modified="2026-03-02T08:00:00Z")
    app.state.orders.append(order_record(3, "2026-03-02T08:00:00Z"))
    restarted = source(entry(url, secret_file), tmp_path / "erp")
    events, cursor = await restarted.changes(cursor)
    assert app.state.order_queries[-1] == {"modified_since": "2026-03-02T06:00:00Z"}
    assert kinds(events) == [("changed", "WO-1"), ("released", "WO-3")]
    assert events[0].data == {"order_id": "WO-1", "customer": "Globex"}
    assert cursor is not None and cursor.startswith("2026-03-02T08:00:00Z#")


async def test_an_id_cursor_asks_after_the_last_id_and_reads_a_bare_list(
    secret_file: Path, tmp_path: Path
) -> None:
    app = rest_erp(token=TOKEN, wrap=None)
    app.state.orders = [order_record(n, "2026-03-02T06:00:00Z") for n in (9, 10)]
    mapping = {**ORDER_MAPPING, "id": "id", "modified": ""}
    async with served(app) as url:
        e = entry(url, secret_file, cursor="id", items=None, mapping=mapping)
        orders = source(e, tmp_path / "erp")
        events, cursor = await orders.changes(None)
        assert kinds(events) == [("released", "WO-9"), ("released", "WO-10")]
        # A change arrives as a new record (id 11) of order WO-9.
        app.state.orders.append(order_record(11, "2026-03-02T07:00:00Z", order_id="WO-9", qty=7))
        more, cursor = await orders.changes(cursor)
        assert app.state.order_queries[-1] == {"after_id": "10"}
        assert kinds(more) == [("changed", "WO-9")] and more[0].data["quantity"] == 7
        _, _ = await orders.changes(cursor)
        assert app.state.order_queries[-1] == {"after_id": "11"}


async def test_a_record_that_does_not_map_is_skipped_with_one_log_line_naming_it(
    erp: tuple[FastAPI, str],
    secret_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, url = erp
    stamp = "2026-03-02T06:00:00Z"
    no_due = order_record(2, stamp)
    del no_due["due_at"]
    app.state.orders = [
        order_record(1, stamp),
        no_due,
        order_record(3, stamp, quantity=12.5),
        order_record(4, stamp, due="2026-03-10T14:00:00"),  # no offset
        order_record(5, stamp, order_id="WO/5"),  # not a token
        order_record(6, "2026-03-02T06:30:00Z"),
    ]
    orders = source(entry(url, secret_file), tmp_path / "erp")
    caplog.set_level(logging.WARNING, logger="adapters.erp.rest")
    events, cursor = await orders.changes(None)

    assert kinds(events) == [("released", "WO-1"), ("released", "WO-6")]
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.erp.rest"]
    assert lines == [
        "plant-erp: record 'WO-2' skipped: field due ('due_at'): missing",
        "plant-erp: record 'WO-3' skipped: field quantity ('qty'): must be a whole number > 0, "
        "got 12.5",
        "plant-erp: record 'WO-4' skipped: field due ('due_at'): must be an RFC 3339 date-time "
        "with its offset, got '2026-03-10T14:00:00'",
        "plant-erp: record 'WO/5' skipped: field order_id ('number'): must be 1-128 of "
        "A-Z a-z 0-9 _ -, got 'WO/5'",
    ]
    assert cursor is not None and cursor.startswith("2026-03-02T06:30:00Z#")  # the poll went on


async def test_orders_unavailable_says_why_in_one_line_without_the_secret(
    erp: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = erp
    orders = source(entry(url, secret_file), tmp_path / "erp")
    app.state.down = True
    with pytest.raises(rest.OrdersUnavailable) as down:
        await orders.changes(None)
    assert "HTTP 503" in down.value.reason and "Retry-After: 120" in down.value.reason
    app.state.down, app.state.reject_login = False, True
    with pytest.raises(rest.OrdersUnavailable) as refused:
        await orders.changes(None)
    assert "HTTP 401" in refused.value.reason
    for reason in down.value.reason, refused.value.reason:
        assert TOKEN not in reason and "\n" not in reason


class FlakyPublisher(InMemoryPublisher):
    """Refuses the first batch (NATS away), then keeps what it is given."""

    failures: int = 1

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("nats: no servers available")
        return await super().publish_many(events)


async def test_with_the_hubs_poller_nothing_is_lost_when_publishing_fails(
    erp: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = erp
    app.state.orders = [order_record(1, "2026-03-02T06:00:00Z")]
    publisher, cursor_file = FlakyPublisher(), tmp_path / "erp" / "plant-erp.cursor"

    def poller() -> OrderPoller:  # a hub started afresh: new source, same files
        orders = source(entry(url, secret_file), tmp_path / "erp")
        return OrderPoller("plant-erp", orders, publisher, cursor_file, 60)

    with pytest.raises(ConnectionError):
        await poller().poll()
    assert not cursor_file.exists()
    assert await poller().poll() == 1
    app.state.orders[0].update(qty=90, modified="2026-03-02T07:00:00Z")
    publisher.failures = 1
    with pytest.raises(ConnectionError):
        await poller().poll()
    assert await poller().poll() == 1
    assert await poller().poll() == 0  # the last record again: nothing new
    published = [event.envelope for _, event in publisher.published]
    assert kinds(published) == [("released", "WO-1"), ("changed", "WO-1")]
    assert published[1].data == {"order_id": "WO-1", "quantity": 90}
    assert cursor_file.read_text().startswith("2026-03-02T07:00:00Z#")


# --- confirmations out -------------------------------------------------------------------------


def sender(e: rest.Entry) -> rest.RestConfirmationSender:
    found = confirmation_sender(e)
    assert isinstance(found, rest.RestConfirmationSender)
    return found


async def test_a_confirmation_is_delivered_with_its_idempotency_key_and_token(
    erp: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = erp
    out = sender(entry(url, secret_file))
    try:
        delivered = await out.send(confirmation())
    finally:
        await out.close()
    assert delivered.status == 201 and not delivered.duplicate
    assert '"accepted"' in delivered.excerpt
    assert app.state.confirmations == {
        "evt-0001": {
            "key": "evt-0001",
            "order_id": "WO-1",
            "sequence": 1,
            "machine_id": "M-1",
            "operation": "0010",
            "yield_quantity": 40,
            "scrap_quantity": 2,
            "start": "2026-03-02T06:00:00Z",
            "end": "2026-03-02T09:00:00Z",
            "final": False,
            "correction_of": None,
            "posted_at": "2026-03-02T09:01:00Z",
            "yield_total": 40,
            "scrap_total": 2,
            "checkpoint": None,  # (no audit checkpoint signed when it was decided)
        }
    }
    assert app.state.authorizations == [f"Bearer {TOKEN}"]
    assert app.state.checkpoint_headers == {"evt-0001": None}


async def test_the_hubs_audit_checkpoint_goes_in_the_body_and_a_header(
    erp: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = erp
    out = sender(entry(url, secret_file))
    try:
        await out.send(confirmation(checkpoint=CHECKPOINT))
    finally:
        await out.close()
    assert app.state.confirmations["evt-0001"]["checkpoint"] == CHECKPOINT
    assert app.state.checkpoint_headers == {"evt-0001": CHECKPOINT}


async def test_a_repeated_key_is_delivered_as_a_duplicate_and_taken_once(
    erp: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = erp
    out = sender(entry(url, secret_file))
    try:
        first = await out.send(confirmation())
        second = await out.send(confirmation())
    finally:
        await out.close()
    assert not first.duplicate
    assert second.duplicate and second.status == 409
    assert app.state.attempts["evt-0001"] == 2 and len(app.state.confirmations) == 1


async def test_basic_auth_sends_the_user_and_the_secret(secret_file: Path) -> None:
    app = rest_erp(user="mes-hub", password=TOKEN)
    async with served(app) as url:
        out = sender(entry(url, secret_file, auth="basic", user="mes-hub"))
        try:
            assert (await out.send(confirmation())).status == 201
        finally:
            await out.close()


async def test_a_wrong_token_is_not_permanent_and_its_reason_shows_no_secret(
    erp: tuple[FastAPI, str], tmp_path: Path
) -> None:
    _, url = erp
    wrong = "wrong-token-SECRET-4711"
    (tmp_path / "wrong").write_text(wrong)
    out = sender(entry(url, tmp_path / "wrong"))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation())
    finally:
        await out.close()
    exc = failed.value
    assert not exc.permanent and exc.status == 401
    assert exc.reason == 'plant-erp: HTTP 401 Unauthorized: {"error":"invalid credentials"}'
    for text in exc.reason, exc.excerpt, str(exc), repr(exc), repr(out):
        assert wrong not in text


async def test_a_refused_confirmation_is_permanent_with_the_answer_excerpt(
    erp: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = erp
    app.state.known_orders = {"WO-1"}
    out = sender(entry(url, secret_file))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation(order_id="WO-9"))
    finally:
        await out.close()
    assert failed.value.permanent and failed.value.status == 400
    assert "order WO-9 does not exist" in failed.value.excerpt
    assert "order WO-9 does not exist" in failed.value.reason


@pytest.mark.parametrize(
    ("flag", "value", "status", "said"),
    [
        ("down", True, 503, "HTTP 503 Service Unavailable, Retry-After: 120"),
        ("error", True, 500, "HTTP 500 Internal Server Error"),
        ("reject_login", True, 401, "HTTP 401 Unauthorized"),
        ("slow", 1.5, None, "no answer within 0.5 s"),
    ],
)
async def test_a_down_slow_or_failing_erp_is_not_permanent(
    erp: tuple[FastAPI, str],
    secret_file: Path,
    flag: str,
    value: object,
    status: int | None,
    said: str,
) -> None:
    app, url = erp
    setattr(app.state, flag, value)
    out = sender(entry(url, secret_file, timeout_s=0.5))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation())
    finally:
        await out.close()
    assert not failed.value.permanent and failed.value.status == status
    assert said in failed.value.reason and "\n" not in failed.value.reason


async def test_no_connection_and_an_address_not_allowed_are_not_permanent(
    secret_file: Path,
) -> None:
    out = sender(entry("http://127.0.0.1:9", secret_file))  # discard: nothing listens
    internal = sender(entry("http://127.0.0.1:9", secret_file, allow=[]))
    try:
        with pytest.raises(DeliveryFailed) as refused:
            await out.send(confirmation())
        with pytest.raises(DeliveryFailed) as not_allowed:
            await internal.send(confirmation())
    finally:
        await out.close()
        await internal.close()
    assert not refused.value.permanent and "cannot reach the ERP: ConnectError" in (
        refused.value.reason
    )
    assert not not_allowed.value.permanent and "internal address" in not_allowed.value.reason


# --- the [[erp]] entry -------------------------------------------------------------------------


def config_error(**keys: Any) -> str:
    raw = raw_entry("https://erp.example", Path("/run/secrets/erp"))
    for key, value in keys.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    with pytest.raises(ErpConfigError) as failed:
        erp_section([raw], "mes-hub.toml", env={})
    return str(failed.value)


def test_an_inline_secret_is_refused_without_echoing_it() -> None:
    said = config_error(secret="hunter2-inline")
    assert "mes-hub.toml: key 'erp[0].secret'" in said and "never written in the config" in said
    assert "hunter2-inline" not in said


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"quantity": "qty..value"}, "erp[0].mapping.quantity"),
        ({"quantiti": "qty"}, "erp[0].mapping.quantiti"),
        ({"due": ""}, "erp[0].mapping.due"),
        ({"cancelled_when": 3}, "erp[0].mapping.cancelled_when"),
    ],
)
def test_a_bad_mapping_is_refused_naming_the_key(mapping: dict[str, Any], key: str) -> None:
    assert f"key '{key}'" in config_error(mapping={**ORDER_MAPPING, **mapping})


def test_an_entry_says_which_key_it_misses() -> None:
    assert "key 'erp[0].confirm_path'" in config_error(confirm_path=None)
    assert "key 'erp[0].orders_path'" in config_error(orders_path=None)
    assert "key 'erp[0].auth'" in config_error(auth="basic")  # no user
    assert "key 'erp[0].secret'" in config_error(secret=None)
    assert 'cursor = "modified" needs mapping.modified' in config_error(
        mapping={**ORDER_MAPPING, "modified": ""}
    )


def test_no_orders_without_polling_and_no_sender_without_confirm(secret_file: Path) -> None:
    quiet = entry("https://erp.example", secret_file, poll_interval_s=0, confirm=False)
    assert rest.order_source(quiet, Path("/nowhere")) is None
    assert confirmation_sender(quiet) is None
    assert "hunter" not in repr(quiet)
