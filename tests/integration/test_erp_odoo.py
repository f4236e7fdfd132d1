"""The Odoo dialect against the Odoo stand-in on loopback (JSON-2 and JSON-RPC), whose models are
read from the real mrp source in ../shared/fixtures/erp/odoo."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.erp import odoo
from adapters.erp.base import Confirmation
from adapters.erp.config import ErpConfigError, erp_section
from hub.outbox import DeliveryFailed
from tests.erp_standins import erp_fixtures, served
from tests.erp_standins.odoo import OdooStandIn, odoo_app

KEY = "odoo-key-1f2e3d4c5b6a79880a1b"
WRONG = "odoo-key-wrong-0000000000000"
APIS = ["json2", "jsonrpc"]
CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="


@dataclass
class Odoo:
    url: str
    erp: OdooStandIn


@pytest.fixture
async def stand_in() -> AsyncIterator[Odoo]:
    app = odoo_app(erp_fixtures("odoo"), KEY)
    async with served(app) as url:
        yield Odoo(url, app.state.erp)


def entry(
    url: str,
    api: str = "json2",
    monkeypatch: pytest.MonkeyPatch | None = None,
    secret: str = KEY,
    **keys: Any,
) -> odoo.Entry:
    assert monkeypatch is not None
    monkeypatch.setenv("ODOO_TEST_KEY", secret)
    (found,) = erp_section(
        [
            {
                "name": "odoo-main",
                "dialect": "odoo",
                "url": url,
                "api": api,
                "database": "plant",
                "user": "mes-hub",
                "secret": {"env": "ODOO_TEST_KEY"},
                "allow": ["127.0.0.1"],
                "timeout_s": 2,
                **keys,
            }
        ],
        "mes-hub.toml",
        env={},
    )
    assert isinstance(found, odoo.Entry)
    return found


def confirmation(
    order: str,
    key: str,
    good: int,
    scrap: int = 0,
    *,
    sequence: int = 1,
    final: bool = False,
    checkpoint: str | None = None,
) -> Confirmation:
    at = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    return Confirmation(
        key=key,
        order_id=order,
        sequence=sequence,
        machine_id="CNC-1",
        operation="Milling",
        yield_quantity=good,
        scrap_quantity=scrap,
        start=at,
        end=at,
        final=final,
        correction_of=None,
        posted_at=at,
        checkpoint=checkpoint,
    )


def bracket_order(erp: OdooStandIn) -> int:
    bracket = erp.product("BRK-7", "Bracket")
    mo = erp.production(
        "WH/MO/00012", bracket, 40.0, origin="S00042", date_deadline="2026-03-05 16:00:00"
    )
    erp.workorder(mo, "Milling", "CNC Mill 1", 10)
    erp.workorder(mo, "Deburring", "Bench 3", 20)
    return mo


# --- orders in ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_orders_are_released_changed_and_cancelled(
    stand_in: Odoo,
    api: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    erp = stand_in.erp
    mo = bracket_order(erp)
    erp.production("WH/MO/00013", erp.product(None, "Coolant"), 2.5)  # not whole parts: skipped
    erp.production("WH/MO/00014", erp.product("X-1", "Draft"), 5.0, state="draft")
    source = odoo.order_source(
        entry(stand_in.url, api, monkeypatch, machines={"CNC Mill 1": "CNC-1"}), tmp_path
    )
    assert source is not None

    events, cursor = await source.changes(None)
    assert [e.type for e in events] == ["mes.erp.order.released.v1"]
    (released,) = events
    assert released.subject == "WH-MO-00012"
    assert released.source == "urn:mes-hub:erp:odoo-main"
    assert released.data == {
        "order_id": "WH-MO-00012",
        "part_number": "BRK-7",
        "quantity": 40,
        "due": "2026-03-05T16:00:00Z",
        "customer": "S00042",
        "machine_id": "CNC-1",
    }
    assert released.time == datetime.fromisoformat(
        erp.records["mrp.production"][mo]["write_date"]
    ).replace(tzinfo=UTC)
    assert "WH/MO/00013 skipped: product_qty 2.5 is not a whole number" in caplog.text

    erp.change("mrp.production", mo, product_qty=45.0, date_deadline="2026-03-06 12:00:00")
    events, cursor = await source.changes(cursor)
    assert [(e.type, e.data) for e in events] == [
        (
            "mes.erp.order.changed.v1",
            {"order_id": "WH-MO-00012", "quantity": 45, "due": "2026-03-06T12:00:00Z"},
        ),
    ]

    erp.change("mrp.production", mo, state="cancel")
    events, cursor = await source.changes(cursor)
    assert [(e.type, e.data["reason"]) for e in events] == [
        ("mes.erp.order.cancelled.v1", "cancelled in Odoo (mrp.production WH/MO/00012)")
    ]
    assert await source.changes(cursor) == ([], cursor)


async def test_reading_again_gives_the_same_ids_and_the_cursor_resumes(
    stand_in: Odoo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    erp = stand_in.erp
    mo = bracket_order(erp)
    config = entry(stand_in.url, "json2", monkeypatch)
    first, cursor = await odoo.order_source(config, tmp_path / "a").changes(None)  # type: ignore[union-attr]
    again, _ = await odoo.order_source(config, tmp_path / "b").changes(None)  # type: ignore[union-attr]
    assert [e.id for e in again] == [e.id for e in first] and len(first) == 1

    erp.change("mrp.production", mo, product_qty=50.0)
    # A new process (a restart) with the same state dir, from the cursor the caller kept.
    restarted = odoo.order_source(config, tmp_path / "a")
    assert restarted is not None
    events, moved = await restarted.changes(cursor)
    assert [(e.type, e.data.get("quantity")) for e in events] == [("mes.erp.order.changed.v1", 50)]
    # The caller did not publish (it asks again with its old cursor): the same change again.
    repeat, _ = await odoo.order_source(config, tmp_path / "a").changes(cursor)  # type: ignore[union-attr]
    assert [e.id for e in repeat] == [e.id for e in events]
    assert await restarted.changes(moved) == ([], moved)


async def test_orders_in_from_an_odoo_that_is_down_say_so(
    stand_in: Odoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in.erp.down = True
    source = odoo.order_source(entry(stand_in.url, "json2", monkeypatch))
    assert source is not None
    with pytest.raises(odoo.ErpUnavailable, match="HTTP 503"):
        await source.changes(None)


# --- confirmations out -------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_confirmations_set_qty_producing_and_the_final_one_marks_done(
    stand_in: Odoo, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    mo = bracket_order(erp)
    sender = odoo.confirmation_sender(entry(stand_in.url, api, monkeypatch))
    assert sender is not None
    try:
        first = await sender.send(confirmation("WH-MO-00012", "k-1", 25, 2, checkpoint=CHECKPOINT))
        assert (first.status, first.duplicate) == (200, False)
        production = erp.records["mrp.production"][mo]
        assert (production["qty_producing"], production["state"]) == (25.0, "progress")
        final = await sender.send(confirmation("WH-MO-00012", "k-2", 15, sequence=2, final=True))
        assert "qty_producing 40, marked done" in final.excerpt
    finally:
        await sender.close()
    assert (production["qty_producing"], production["state"]) == (40.0, "done")
    assert all(w["state"] == "done" for w in erp.records["mrp.workorder"].values())
    notes = erp.notes(mo)
    assert len(notes) == 2
    assert "mes-hub confirmation k-1: sequence 1, good +25, scrap 2, qty_producing 25.0" in notes[0]
    assert "machine CNC-1, operation Milling" in notes[0]
    # The hub's audit checkpoint when it was decided ends the note (none signed: none).
    assert notes[0].endswith(f"; audit checkpoint {CHECKPOINT}</p>")
    assert "audit checkpoint" not in notes[1]
    assert ("mrp.production", "set_qty_producing") in erp.calls


@pytest.mark.parametrize("api", APIS)
async def test_a_repeated_key_is_counted_once_even_after_a_lost_answer(
    stand_in: Odoo, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    mo = bracket_order(erp)
    sender = odoo.confirmation_sender(entry(stand_in.url, api, monkeypatch))
    assert sender is not None
    try:
        await sender.send(confirmation("WH-MO-00012", "k-1", 10))
        again = await sender.send(confirmation("WH-MO-00012", "k-1", 10))
        assert again.duplicate
        # The note is written, then the write's answer is lost: the retry sets the same total.
        erp.lose_answer = {"write"}
        with pytest.raises(DeliveryFailed) as lost:
            await sender.send(confirmation("WH-MO-00012", "k-2", 5, sequence=2))
        assert not lost.value.permanent and lost.value.status == 504
        retried = await sender.send(confirmation("WH-MO-00012", "k-2", 5, sequence=2))
        assert retried.duplicate
        # An older key seen again after a newer one changes nothing.
        assert (await sender.send(confirmation("WH-MO-00012", "k-1", 10))).duplicate
    finally:
        await sender.close()
    assert erp.records["mrp.production"][mo]["qty_producing"] == 15.0
    assert len(erp.notes(mo)) == 2


async def test_odoo_refuses_what_its_model_does_not_have(
    stand_in: Odoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in takes its fields and methods from the real source: a field or method that
    mrp_production.py does not declare is refused as Odoo does, and the sender makes it a
    permanent failure with Odoo's message."""
    erp = stand_in.erp
    mo = bracket_order(erp)
    config = entry(stand_in.url, "json2", monkeypatch)
    async with odoo.outbound_client(config.allowlist(), 2) as client:
        rpc = odoo.Rpc(config, client)
        assert await rpc.call("mrp.production", "write", [mo], vals={"qty_producing": 3.0})
        refused = []
        for call in (
            {"vals": {"qty_produced_total": 3.0}},  # no such field
            {"vals": {"qty_producing": "three"}},  # a Float
            {"vals": {"state": "finished"}},  # not one of the Selection's values
        ):
            with pytest.raises(odoo.OdooFault) as fault:
                await rpc.call("mrp.production", "write", [mo], **call)
            refused.append(fault.value)
        with pytest.raises(odoo.OdooFault) as missing:
            await rpc.call("mrp.workorder", "record_production", [1])  # Odoo 12's, gone
    assert [(f.status, f.name) for f in refused] == [(500, "builtins.ValueError")] * 3
    assert refused[0].message == "Invalid field 'qty_produced_total' on model 'mrp.production'"
    assert refused[2].message == "Wrong value for mrp.production.state: 'finished'"
    assert missing.value.status == 404
    failed = odoo.delivery_failure(config, "confirming WH/MO/00012", refused[0])
    assert failed.permanent and failed.status == 500
    assert "Invalid field 'qty_produced_total'" in failed.excerpt


async def test_an_unknown_or_cancelled_order_is_refused_for_good(
    stand_in: Odoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    mo = bracket_order(stand_in.erp)
    sender = odoo.confirmation_sender(entry(stand_in.url, "json2", monkeypatch))
    assert sender is not None
    try:
        with pytest.raises(DeliveryFailed, match="no manufacturing order named like WH-MO-9") as e:
            await sender.send(confirmation("WH-MO-9", "k-1", 1))
        assert e.value.permanent
        stand_in.erp.change("mrp.production", mo, state="cancel")
        with pytest.raises(DeliveryFailed, match="is cancelled") as e:
            await sender.send(confirmation("WH-MO-00012", "k-2", 1))
        assert e.value.permanent
    finally:
        await sender.close()


@pytest.mark.parametrize("api", APIS)
async def test_a_wrong_api_key_is_retried_and_never_shown(
    stand_in: Odoo, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bracket_order(stand_in.erp)
    sender = odoo.confirmation_sender(entry(stand_in.url, api, monkeypatch, secret=WRONG))
    assert sender is not None
    try:
        with pytest.raises(DeliveryFailed) as refused:
            await sender.send(confirmation("WH-MO-00012", "k-1", 1))
    finally:
        await sender.close()
    failed = refused.value
    assert not failed.permanent and failed.status == 401
    assert failed.reason.startswith("Odoo refused the API key of erp 'odoo-main'")
    assert "\n" not in failed.reason
    for text in (failed.reason, failed.excerpt, repr(failed), str(sender.entry)):
        assert WRONG not in text and KEY not in text
    monkeypatch.delenv("ODOO_TEST_KEY")
    with pytest.raises(DeliveryFailed, match="environment variable ODOO_TEST_KEY is not set") as e:
        await sender.send(confirmation("WH-MO-00012", "k-1", 1))
    await sender.close()
    assert not e.value.permanent


async def test_down_failing_or_slow_odoo_is_retried(
    stand_in: Odoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    bracket_order(stand_in.erp)
    sender = odoo.confirmation_sender(entry(stand_in.url, "json2", monkeypatch, timeout_s=0.5))
    assert sender is not None
    outcomes = []
    try:
        for switch, value in (("down", True), ("error", True), ("slow_s", 2.0)):
            setattr(stand_in.erp, switch, value)
            with pytest.raises(DeliveryFailed) as failed:
                await sender.send(confirmation("WH-MO-00012", "k-1", 1))
            outcomes.append((failed.value.status, failed.value.permanent, failed.value.reason))
            setattr(stand_in.erp, switch, type(value)())
    finally:
        await sender.close()
    assert [(s, p) for s, p, _ in outcomes] == [(503, False), (500, False), (None, False)]
    assert "did not answer in time" in outcomes[2][2]


# --- configuration -----------------------------------------------------------------------


def test_the_entry_refuses_an_inline_secret_and_a_bad_url() -> None:
    base = {"name": "odoo-main", "dialect": "odoo", "url": "https://odoo.example"}
    with pytest.raises(ErpConfigError) as inline:
        erp_section([{**base, "secret": "hunter2-api-key"}], "mes-hub.toml", env={})
    assert "erp[0].secret" in str(inline.value) and "secret is never written" in str(inline.value)
    assert "hunter2" not in str(inline.value)
    with pytest.raises(ErpConfigError, match=r"key 'erp\[0\]\.url'"):
        erp_section([{**base, "url": "odoo.example", "secret": {"env": "K"}}], "x.toml", env={})
    with pytest.raises(ErpConfigError, match="needs database and user"):
        erp_section([{**base, "api": "jsonrpc", "secret": {"env": "K"}}], "x.toml", env={})
    with pytest.raises(ErpConfigError, match=r"key 'erp\[0\]\.secret'"):
        erp_section([base], "x.toml", env={})
    (quiet,) = erp_section(
        [{**base, "secret": {"env": "K"}, "poll_interval_s": 0, "confirm": False}],
        "x.toml",
        env={},
    )
    assert odoo.order_source(quiet) is None and odoo.confirmation_sender(quiet) is None
