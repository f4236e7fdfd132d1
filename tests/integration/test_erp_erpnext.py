"""The ERPNext dialect against the ERPNext stand-in on loopback, whose DocTypes are the real
definitions in ../shared/fixtures/erp/erpnext."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.erp import erpnext
from adapters.erp.base import Confirmation
from adapters.erp.config import ErpConfigError, erp_section
from hub.outbox import DeliveryFailed
from tests.erp_standins import erp_fixtures, served
from tests.erp_standins.erpnext import ErpnextStandIn, erpnext_app

API_KEY, SECRET, WRONG = "5f1c2a9b7d3e4f6", "a8b7c6d5e4f3a2b1c0d9", "wrong-secret-99887766"
KEY_FIELD = {"fieldname": "mes_hub_key", "fieldtype": "Data", "unique": 1, "label": "MES Hub Key"}


@dataclass
class Erpnext:
    url: str
    erp: ErpnextStandIn


@pytest.fixture
async def stand_in() -> AsyncIterator[Erpnext]:
    app = erpnext_app(
        erp_fixtures("erpnext"), API_KEY, SECRET, custom_fields={"Stock Entry": [KEY_FIELD]}
    )
    async with served(app) as url:
        yield Erpnext(url, app.state.erp)


def entry(
    url: str, monkeypatch: pytest.MonkeyPatch, secret: str = SECRET, **keys: Any
) -> erpnext.Entry:
    monkeypatch.setenv("ERPNEXT_TEST_SECRET", secret)
    (found,) = erp_section(
        [
            {
                "name": "erpnext",
                "dialect": "erpnext",
                "url": url,
                "user": API_KEY,
                "secret": {"env": "ERPNEXT_TEST_SECRET"},
                "allow": ["127.0.0.1"],
                "timeout_s": 2,
                "timezone": "Europe/Berlin",
                **keys,
            }
        ],
        "mes-hub.toml",
        env={},
    )
    assert isinstance(found, erpnext.Entry)
    return found


def confirmation(
    order: str,
    key: str,
    good: int,
    scrap: int = 0,
    *,
    sequence: int = 1,
    final: bool = False,
    correction_of: int | None = None,
) -> Confirmation:
    end = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    return Confirmation(
        key=key,
        order_id=order,
        sequence=sequence,
        machine_id="CNC-1",
        operation="Milling",
        yield_quantity=good,
        scrap_quantity=scrap,
        start=end,
        end=end,
        final=final,
        correction_of=correction_of,
        posted_at=end,
    )


# --- orders in ---------------------------------------------------------------------------


async def test_work_orders_are_released_changed_and_cancelled(
    stand_in: Erpnext,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0, expected_delivery_date="2026-03-05")
    erp.work_order("MFG-WO-2026-00013", "COOLANT", 2.5)  # not whole parts: skipped
    erp.work_order("MFG-WO-2026-00014", "DRAFT-1", 5.0, docstatus=0, status="Draft")
    source = erpnext.order_source(entry(stand_in.url, monkeypatch), tmp_path)
    assert source is not None

    events, cursor = await source.changes(None)
    assert [(e.type, e.subject) for e in events] == [
        ("mes.erp.order.released.v1", "MFG-WO-2026-00012")
    ]
    assert events[0].data == {
        "order_id": "MFG-WO-2026-00012",
        "part_number": "BRK-7",
        "quantity": 40,
        "due": "2026-03-05T22:59:59Z",  # the end of that day in Berlin
    }
    assert events[0].time == datetime(2026, 3, 2, 6, 0, 1, tzinfo=UTC)  # modified, Berlin
    assert events[0].source == "urn:mes-hub:erp:erpnext"
    assert "MFG-WO-2026-00013 skipped: qty 2.5 is not a whole number" in caplog.text

    erp.change("MFG-WO-2026-00012", qty=45.0)
    events, cursor = await source.changes(cursor)
    assert [(e.type, e.data) for e in events] == [
        ("mes.erp.order.changed.v1", {"order_id": "MFG-WO-2026-00012", "quantity": 45})
    ]

    erp.cancel("MFG-WO-2026-00012")
    events, cursor = await source.changes(cursor)
    assert [(e.type, e.data["reason"]) for e in events] == [
        ("mes.erp.order.cancelled.v1", "cancelled in ERPNext (Work Order MFG-WO-2026-00012)")
    ]
    assert await source.changes(cursor) == ([], cursor)


async def test_reading_again_gives_the_same_ids_and_the_cursor_resumes(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    config = entry(stand_in.url, monkeypatch)
    first, cursor = await erpnext.order_source(config, tmp_path / "a").changes(None)  # type: ignore[union-attr]
    again, _ = await erpnext.order_source(config, tmp_path / "b").changes(None)  # type: ignore[union-attr]
    assert [e.id for e in again] == [e.id for e in first] and len(first) == 1

    erp.change("MFG-WO-2026-00012", planned_end_date="2026-03-04 18:00:00")
    restarted = erpnext.order_source(config, tmp_path / "a")
    assert restarted is not None
    events, moved = await restarted.changes(cursor)
    assert [(e.type, e.data.get("due")) for e in events] == [
        ("mes.erp.order.changed.v1", "2026-03-04T17:00:00Z")
    ]
    assert await restarted.changes(moved) == ([], moved)


async def test_orders_in_with_a_wrong_secret_say_so_without_it(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = erpnext.order_source(entry(stand_in.url, monkeypatch, secret=WRONG))
    assert source is not None
    with pytest.raises(erpnext.ErpUnavailable, match="refused the API key") as refused:
        await source.changes(None)
    assert WRONG not in str(refused.value)


# --- confirmations out -------------------------------------------------------------------


async def test_a_confirmation_is_a_submitted_manufacture_stock_entry(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    try:
        first = await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 25, 2))
        final = await sender.send(
            confirmation("MFG-WO-2026-00012", "k-2", 15, sequence=2, final=True)
        )
    finally:
        await sender.close()
    assert (first.status, first.duplicate) == (200, False)
    assert "MAT-STE-2026-00001 submitted for MFG-WO-2026-00012" in first.excerpt
    assert "MAT-STE-2026-00002" in final.excerpt
    entry_1 = erp.docs["Stock Entry"]["MAT-STE-2026-00001"]
    assert {
        k: entry_1[k]
        for k in (
            "stock_entry_type",
            "purpose",
            "work_order",
            "docstatus",
            "fg_completed_qty",
            "process_loss_qty",
            "mes_hub_key",
            "posting_date",
            "posting_time",
            "set_posting_time",
        )
    } == {
        "stock_entry_type": "Manufacture",
        "purpose": "Manufacture",
        "work_order": "MFG-WO-2026-00012",
        "docstatus": 1,
        "fg_completed_qty": 27.0,
        "process_loss_qty": 2.0,
        "mes_hub_key": "k-1",
        "posting_date": "2026-03-02",
        "posting_time": "10:30:00",
        "set_posting_time": 1,
    }
    (finished,) = [row for row in entry_1["items"] if row.get("is_finished_item")]
    assert (finished["item_code"], finished["qty"], finished["transfer_qty"]) == ("BRK-7", 25, 25)
    assert entry_1["remarks"].startswith("mes-hub confirmation k-1: sequence 1, good 25, scrap 2")
    assert (order["produced_qty"], order["status"]) == (40.0, "Completed")


async def test_a_repeated_key_is_counted_once(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    try:
        # The insert is done but its answer is lost; the retry finds the key.
        erp.lose_answer = True
        with pytest.raises(DeliveryFailed) as lost:
            await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 5))
        assert (lost.value.status, lost.value.permanent) == (504, False)
        found = await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 5))
        assert found.duplicate and "MAT-STE-2026-00001 has k-1" in found.excerpt
        # The key is not seen before the insert (a race): the unique field refuses it.
        erp.stale_lists = True
        raced = await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 5))
        assert raced.duplicate and raced.status == 417
        assert raced.excerpt.startswith("UniqueValidationError: MES Hub Key must be unique")
    finally:
        await sender.close()
    assert erp.received == {"k-1": 1}
    assert erp.docs["Work Order"]["MFG-WO-2026-00012"]["produced_qty"] == 5.0


async def test_erpnext_refuses_what_its_doctype_does_not_have(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in checks every field against the real DocType JSON: a field Stock Entry does
    not have, a wrong type, a value outside a Select's options, a missing mandatory field are
    refused with Frappe's 417 answer, which the sender makes a permanent failure."""
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    config = entry(stand_in.url, monkeypatch)
    async with erpnext.outbound_client(config.allowlist(), 2) as client:
        api = erpnext.Frappe(config, client)
        draft = await api.method(
            erpnext.MAKE_STOCK_ENTRY,
            work_order_id="MFG-WO-2026-00012",
            purpose="Manufacture",
            qty=3,
        )
        refused = []
        for change in (
            {"scrap_qty": 1.0},  # no such field: process_loss_qty is
            {"fg_completed_qty": "three"},  # a Float
            {"purpose": "Production"},  # not one of the Select's options
            {"company": None},  # reqd
        ):
            with pytest.raises(erpnext.FrappeFault) as fault:
                await api.insert("Stock Entry", {**draft, **change})
            refused.append(fault.value)
        made = await api.insert("Stock Entry", {**draft, "process_loss_qty": 1.0})
    assert made["name"] == "MAT-STE-2026-00001"
    assert [(f.status, f.exc_type) for f in refused] == [
        (417, "ValidationError"),
        (417, "ValidationError"),
        (417, "ValidationError"),
        (417, "MandatoryError"),
    ]
    assert refused[0].message == "Stock Entry: there is no field 'scrap_qty' in DocType Stock Entry"
    assert refused[2].message.startswith('Purpose cannot be "Production". It should be one of')
    assert refused[3].message == "Error: Value missing for Stock Entry: Company"
    failed = erpnext.delivery_failure(config, "confirming MFG-WO-2026-00012", refused[0])
    assert failed.permanent and failed.status == 417 and "scrap_qty" in failed.excerpt


async def test_what_erpnext_cannot_take_is_refused_for_good(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    try:
        with pytest.raises(DeliveryFailed, match="no Work Order named like MFG-WO-9") as unknown:
            await sender.send(confirmation("MFG-WO-9", "k-2", 1))
        with pytest.raises(DeliveryFailed, match="no Work Order named like MFG-WO-9") as taken:
            await sender.send(confirmation("MFG-WO-9", "k-4", -1, 1, correction_of=1))
        scrap_only = await sender.send(confirmation("MFG-WO-2026-00012", "k-3", 0, 3))
    finally:
        await sender.close()
    assert unknown.value.permanent and taken.value.permanent
    assert scrap_only.status is None and scrap_only.excerpt.startswith("nothing posted")
    assert erp.docs["Stock Entry"] == {}


# --- corrections that take parts back ------------------------------------------------------


def submitted(erp: ErpnextStandIn) -> dict[str, tuple[Any, ...]]:
    """The submitted Stock Entries: name -> (key, fg_completed_qty, process_loss_qty, the
    finished row's qty)."""
    found = {}
    for name, doc in erp.docs["Stock Entry"].items():
        if doc["docstatus"] == 1:
            (row,) = [r for r in doc["items"] if r.get("is_finished_item")]
            found[name] = (
                doc["mes_hub_key"],
                doc["fg_completed_qty"],
                doc["process_loss_qty"],
                row["qty"],
            )
    return found


async def test_late_scrap_cancels_the_entries_and_posts_the_corrected_totals(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    # 3 of the good parts confirmed are found bad afterwards: good -3, scrap +3.
    late_scrap = confirmation("MFG-WO-2026-00012", "k-3", -3, 3, sequence=3, correction_of=2)
    try:
        await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 25, 2))
        await sender.send(confirmation("MFG-WO-2026-00012", "k-2", 15, sequence=2, final=True))
        assert (order["produced_qty"], order["status"]) == (40.0, "Completed")
        corrected = await sender.send(late_scrap)
        again = await sender.send(late_scrap)
        first_again = await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 25, 2))
    finally:
        await sender.close()
    assert (corrected.status, corrected.duplicate) == (200, False)
    assert corrected.excerpt == (
        "Stock Entry MAT-STE-2026-00003 submitted for MFG-WO-2026-00012 with the corrected "
        "totals, good 37, process loss 5; cancelled for it: MAT-STE-2026-00001, "
        "MAT-STE-2026-00002"
    )
    entries = erp.docs["Stock Entry"]
    # The cancelled entries keep their keys: the first confirmation sent again is not posted.
    assert [(e["docstatus"], e["mes_hub_key"]) for e in entries.values()] == [
        (2, "k-1"),
        (2, "k-2"),
        (1, "k-3"),
    ]
    assert submitted(erp) == {"MAT-STE-2026-00003": ("k-3", 42.0, 5.0, 37.0)}
    assert entries["MAT-STE-2026-00003"]["remarks"].startswith(
        "mes-hub confirmation k-3: sequence 3, good -3, scrap 3, correction of 2, "
        "in place of the cancelled entries: good 37, scrap 5"
    )
    assert (order["produced_qty"], order["process_loss_qty"]) == (37.0, 5.0)
    assert again.duplicate and again.excerpt == "Stock Entry MAT-STE-2026-00003 has k-3"
    assert first_again.duplicate and "MAT-STE-2026-00001 has k-1" in first_again.excerpt
    assert erp.received == {"k-1": 1, "k-2": 1, "k-3": 1}


@pytest.mark.parametrize("stop", ["draft answer lost", "submit failed"])
async def test_a_correction_stopped_between_its_steps_is_finished_by_its_retry(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    late_scrap = confirmation("MFG-WO-2026-00012", "k-2", -3, 3, sequence=2, correction_of=1)
    try:
        await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 25, 2))
        if stop == "draft answer lost":  # the draft is saved, then its answer lost
            erp.lose_answer = True
        else:  # the entry is cancelled, then the submit of the corrected totals fails
            erp.fail_submit = True
        with pytest.raises(DeliveryFailed) as stopped:
            await sender.send(late_scrap)
        draft = erp.docs["Stock Entry"]["MAT-STE-2026-00002"]
        assert (draft["docstatus"], draft["mes_hub_key"]) == (0, "k-2")
        if stop == "submit failed":
            assert erp.docs["Stock Entry"]["MAT-STE-2026-00001"]["docstatus"] == 2
            assert (order["produced_qty"], order["status"]) == (0.0, "Not Started")
        finished = await sender.send(late_scrap)
        again = await sender.send(late_scrap)
    finally:
        await sender.close()
    assert not stopped.value.permanent and stopped.value.status in (503, 504)
    assert (finished.status, finished.duplicate) == (200, False)
    assert "MAT-STE-2026-00002 submitted" in finished.excerpt
    assert submitted(erp) == {"MAT-STE-2026-00002": ("k-2", 27.0, 5.0, 22.0)}
    assert erp.docs["Stock Entry"]["MAT-STE-2026-00001"]["docstatus"] == 2
    assert (order["produced_qty"], order["process_loss_qty"]) == (22.0, 5.0)
    assert again.duplicate
    assert erp.received == {"k-1": 1, "k-2": 1}


async def test_a_correction_to_no_good_parts_only_cancels(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    all_bad = confirmation("MFG-WO-2026-00012", "k-2", -3, 3, sequence=2, correction_of=1)
    try:
        await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 3))
        cancelled = await sender.send(all_bad)
        again = await sender.send(all_bad)
    finally:
        await sender.close()
    assert cancelled.status is None and cancelled.excerpt == (
        "cancelled for MFG-WO-2026-00012: MAT-STE-2026-00001; nothing posted: the corrected "
        "good quantity is 0, and ERPNext has no Manufacture Stock Entry of 0 parts (3 scrap, "
        "kept in the hub)"
    )
    assert again.excerpt.startswith("cancelled for MFG-WO-2026-00012: nothing left;")
    assert [e["docstatus"] for e in erp.docs["Stock Entry"].values()] == [2]
    assert (order["produced_qty"], order["status"]) == (0.0, "Not Started")


async def test_erpnext_cancels_only_a_submitted_entry(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """frappe.client.cancel as Frappe's check_docstatus_transition allows it: a draft cannot be
    cancelled, a cancelled entry not again; cancelling a Manufacture entry lowers the Work
    Order's produced_qty; a submit that would make more than the order's qty is refused."""
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    config = entry(stand_in.url, monkeypatch)
    async with erpnext.outbound_client(config.allowlist(), 2) as client:
        api = erpnext.Frappe(config, client)

        async def built(qty: int) -> dict[str, Any]:
            made = await api.method(
                erpnext.MAKE_STOCK_ENTRY,
                work_order_id="MFG-WO-2026-00012",
                purpose="Manufacture",
                qty=qty,
            )
            assert isinstance(made, dict)
            return made

        draft = await api.insert("Stock Entry", {**await built(30), "mes_hub_key": "k-1"})
        faults = []
        with pytest.raises(erpnext.FrappeFault) as fault:
            await api.method("frappe.client.cancel", doctype="Stock Entry", name=draft["name"])
        faults.append(fault.value)
        await api.save("Stock Entry", draft["name"], {"docstatus": 1})
        assert (order["produced_qty"], order["status"]) == (30.0, "In Process")
        with pytest.raises(erpnext.FrappeFault) as fault:
            await api.insert("Stock Entry", {**await built(11), "docstatus": 1})
        faults.append(fault.value)
        cancelled = await api.method(
            "frappe.client.cancel", doctype="Stock Entry", name=draft["name"]
        )
        assert cancelled["docstatus"] == 2
        assert (order["produced_qty"], order["status"]) == (0.0, "Not Started")
        for attempt in (
            api.method("frappe.client.cancel", doctype="Stock Entry", name=draft["name"]),
            api.save("Stock Entry", draft["name"], {"docstatus": 1}),
            # the unique index holds the cancelled entry's key too
            api.insert("Stock Entry", {**await built(1), "mes_hub_key": "k-1"}),
        ):
            with pytest.raises(erpnext.FrappeFault) as fault:
                await attempt
            faults.append(fault.value)
    assert [(f.status, f.exc_type) for f in faults] == [
        (417, "DocstatusTransitionError"),
        (417, "StockOverProductionError"),
        (417, "ValidationError"),
        (417, "ValidationError"),
        (417, "UniqueValidationError"),
    ]
    # Raised, not thrown: Frappe shows no message, the answer's exception says it.
    assert faults[0].message == (
        "frappe.exceptions.DocstatusTransitionError: Cannot change docstatus from 0 (Draft) "
        "to 2 (Cancelled)"
    )
    assert faults[1].message == (
        "Manufactured Qty (41.0) cannot be greater than planned quantity (40.0) in Work Order "
        "MFG-WO-2026-00012"
    )
    assert faults[2].message.endswith("Cannot edit cancelled document")


async def test_a_wrong_secret_is_retried_and_never_shown(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in.erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch, secret=WRONG))
    assert sender is not None
    try:
        with pytest.raises(DeliveryFailed) as refused:
            await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 1))
    finally:
        await sender.close()
    failed = refused.value
    assert not failed.permanent and failed.status == 401
    assert failed.reason.startswith("ERPNext refused the API key of erp 'erpnext'")
    assert "\n" not in failed.reason
    for text in (failed.reason, failed.excerpt, repr(failed), str(sender.entry)):
        assert WRONG not in text and SECRET not in text


async def test_down_failing_or_unreachable_erpnext_is_retried(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in.erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    outcomes = []
    try:
        for switch in ("down", "error"):
            setattr(stand_in.erp, switch, True)
            with pytest.raises(DeliveryFailed) as failed:
                await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 1))
            outcomes.append((failed.value.status, failed.value.permanent))
            setattr(stand_in.erp, switch, False)
    finally:
        await sender.close()
    closed = erpnext.confirmation_sender(entry("http://127.0.0.1:9", monkeypatch))
    assert closed is not None
    with pytest.raises(DeliveryFailed, match=r"cannot reach ERPNext at 127\.0\.0\.1:9") as gone:
        await closed.send(confirmation("MFG-WO-2026-00012", "k-1", 1))
    await closed.close()
    assert outcomes == [(503, False), (500, False)] and not gone.value.permanent


async def test_the_hub_refuses_an_internal_address_not_allowed(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch, allow=[]))
    assert sender is not None
    with pytest.raises(
        DeliveryFailed, match=r"ERPNext: the hub does not call 127\.0\.0\.1:.*internal address"
    ) as refused:
        await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 1))
    await sender.close()
    assert not refused.value.permanent


# --- configuration -----------------------------------------------------------------------


def test_the_entry_refuses_an_inline_secret_a_bad_url_and_an_unknown_zone() -> None:
    base = {"name": "erpnext", "dialect": "erpnext", "url": "https://erp.example", "user": "k"}
    with pytest.raises(ErpConfigError) as inline:
        erp_section([{**base, "secret": "s3cr3t-api-secret"}], "mes-hub.toml", env={})
    assert "erp[0].secret" in str(inline.value) and "secret is never written" in str(inline.value)
    assert "s3cr3t" not in str(inline.value)
    good = {**base, "secret": {"env": "S"}}
    with pytest.raises(ErpConfigError, match=r"key 'erp\[0\]\.url'"):
        erp_section([{**good, "url": "ftp://erp.example"}], "x.toml", env={})
    with pytest.raises(ErpConfigError, match=r"key 'erp\[0\]\.timezone'.*Mars/Olympus"):
        erp_section([{**good, "timezone": "Mars/Olympus"}], "x.toml", env={})
    with pytest.raises(ErpConfigError, match=r"key 'erp\[0\]\.user'"):
        erp_section([{k: v for k, v in good.items() if k != "user"}], "x.toml", env={})
    (quiet,) = erp_section([{**good, "poll_interval_s": 0, "confirm": False}], "x.toml", env={})
    assert erpnext.order_source(quiet) is None and erpnext.confirmation_sender(quiet) is None
