"""The ERPNext dialect against the ERPNext stand-in on loopback, whose DocTypes are the real
definitions in ../shared/fixtures/erp/erpnext."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
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
CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="
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
    totals: tuple[int, int] | None = None,
    earlier: tuple[str, ...] = (),
    checkpoint: str | None = None,
) -> Confirmation:
    """A confirmation; ``totals`` (good, scrap) and ``earlier`` (keys) as the core sets them."""
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
        yield_total=None if totals is None else totals[0],
        scrap_total=None if totals is None else totals[1],
        earlier_keys=earlier,
        checkpoint=checkpoint,
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
        first = await sender.send(
            confirmation("MFG-WO-2026-00012", "k-1", 25, 2, checkpoint=CHECKPOINT)
        )
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
    # The hub's audit checkpoint when it was decided ends the remarks (none signed: none).
    assert entry_1["remarks"].endswith(f", audit checkpoint {CHECKPOINT}")
    assert "checkpoint" not in erp.docs["Stock Entry"]["MAT-STE-2026-00002"]["remarks"]
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


@dataclass
class Core:
    """One order's confirmations as the hub's core decides them: each carries the order's
    totals with it (``yield_total``, ``scrap_total``) and the keys the earlier ones went with
    (``earlier_keys``); one that takes parts back corrects the one before."""

    order: str
    prefix: str = "k"  # of its keys: k-1, k-2, ...
    keys: list[str] = field(default_factory=list)
    good: int = 0
    scrap: int = 0

    def confirm(
        self, good: int, scrap: int = 0, *, key: str | None = None, final: bool = False
    ) -> Confirmation:
        sequence = len(self.keys) + 1
        key = key or f"{self.prefix}-{sequence}"
        self.good, self.scrap = self.good + good, self.scrap + scrap
        made = confirmation(
            self.order,
            key,
            good,
            scrap,
            sequence=sequence,
            final=final,
            correction_of=sequence - 1 if good < 0 or scrap < 0 else None,
            totals=(self.good, self.scrap),
            earlier=tuple(self.keys),
        )
        self.keys.append(key)
        return made


def submitted(erp: ErpnextStandIn) -> dict[str, tuple[Any, ...]]:
    """The submitted Stock Entries: name -> (key, fg_completed_qty, process_loss_qty, the
    finished row's qty)."""
    found = {}
    for name, doc in erp.docs["Stock Entry"].items():
        if doc["docstatus"] == 1:
            (row,) = [r for r in doc["items"] if r.get("is_finished_item")]
            found[name] = (
                doc.get("mes_hub_key"),
                doc["fg_completed_qty"],
                doc.get("process_loss_qty"),
                row["qty"],
            )
    return found


def sender_for(stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch) -> erpnext.ErpnextConfirmations:
    sender = erpnext.confirmation_sender(entry(stand_in.url, monkeypatch))
    assert sender is not None
    return sender


async def test_late_scrap_on_a_finished_order_cancels_the_hub_entries_and_posts_its_totals(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(25, 2))
        await sender.send(core.confirm(15, final=True))
        assert (order["produced_qty"], order["status"]) == (40.0, "Completed")
        # 3 of the good parts confirmed are found bad afterwards: good -3, scrap +3.
        late_scrap = core.confirm(-3, 3, final=True)
        assert (late_scrap.yield_total, late_scrap.scrap_total) == (37, 5)
        assert late_scrap.earlier_keys == ("k-1", "k-2")
        corrected = await sender.send(late_scrap)
        again = await sender.send(late_scrap)
        first_again = await sender.send(confirmation("MFG-WO-2026-00012", "k-1", 25, 2))
    finally:
        await sender.close()
    assert (corrected.status, corrected.duplicate) == (200, False)
    assert corrected.excerpt == (
        "Stock Entry MAT-STE-2026-00003 submitted for MFG-WO-2026-00012 with the corrected "
        "totals, good 37, process loss 5; cancelled for MFG-WO-2026-00012: MAT-STE-2026-00001, "
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
        "mes-hub confirmation k-3: sequence 3, good -3, scrap 3, final, correction of 2, "
        "in place of the cancelled entries: good 37, scrap 5"
    )
    assert (order["produced_qty"], order["process_loss_qty"]) == (37.0, 5.0)
    assert order["status"] == "Completed"  # 37 made and 5 lost reach its 40
    assert again.duplicate and again.excerpt == "Stock Entry MAT-STE-2026-00003 has k-3"
    assert first_again.duplicate and "MAT-STE-2026-00001 has k-1" in first_again.excerpt
    assert erp.received == {"k-1": 1, "k-2": 1, "k-3": 1}


async def test_erpnext_refuses_a_draft_beside_entries_that_cover_the_order(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What made the draft-first correction fail: ERPNext's validate_work_order runs on every
    save, a draft's too. Beside the order's entries that cover its qty, a draft is refused
    (check_duplicate_entry_for_work_order); on an order with operations, the draft's qty plus
    the order's produced_qty exceed what the operations completed
    (check_if_operations_completed). Cancelled first, the same correction passes both."""
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    milling = {"name": "op-row-1", "idx": 1, "operation": "Milling", "completed_qty": 40.0}
    erp.work_order("MFG-WO-2026-00013", "BRK-8", 40.0, operations=[milling])
    erp.job_card(
        "PO-JOB00001",
        "MFG-WO-2026-00013",
        "op-row-1",
        operation="Milling",
        workstation="CNC-1",
        for_quantity=40.0,
        total_completed_qty=40.0,
    )
    erp.work_order("MFG-WO-2026-00014", "BRK-9", 10.0)
    plain, operated = Core("MFG-WO-2026-00012", "a"), Core("MFG-WO-2026-00013", "b")
    config = entry(stand_in.url, monkeypatch)
    sender = sender_for(stand_in, monkeypatch)
    faults = []
    try:
        await sender.send(plain.confirm(40, final=True))
        await sender.send(operated.confirm(40, final=True))
        async with erpnext.outbound_client(config.allowlist(), 2) as client:
            api = erpnext.Frappe(config, client)

            async def built(order: str, qty: int, **fields: Any) -> dict[str, Any]:
                made = await api.method(
                    erpnext.MAKE_STOCK_ENTRY, work_order_id=order, purpose="Manufacture", qty=qty
                )
                assert isinstance(made, dict)
                return {**made, **fields}

            # The draft the earlier correction saved first, with the totals 37 good + 3 lost.
            for order in ("MFG-WO-2026-00012", "MFG-WO-2026-00013"):
                draft = await built(order, 40, process_loss_qty=3.0, mes_hub_key=f"{order}-2")
                with pytest.raises(erpnext.FrappeFault) as fault:
                    await api.insert("Stock Entry", draft)
                faults.append(fault.value)
            # A draft saved while the order was open, saved again once it is covered.
            early = await api.insert("Stock Entry", await built("MFG-WO-2026-00014", 2))
            await api.insert("Stock Entry", await built("MFG-WO-2026-00014", 10, docstatus=1))
            with pytest.raises(erpnext.FrappeFault) as fault:
                await api.save("Stock Entry", early["name"], {"remarks": "saved again"})
            faults.append(fault.value)
        results = [
            await sender.send(plain.confirm(-3, 3, final=True)),
            await sender.send(operated.confirm(-3, 3, final=True)),
        ]
    finally:
        await sender.close()
    assert [(f.status, f.exc_type) for f in faults] == [
        (417, "DuplicateEntryForWorkOrderError"),
        (417, "OperationsNotCompleteError"),
        (417, "DuplicateEntryForWorkOrderError"),
    ]
    assert faults[0].message == (
        "Stock Entries already created for Work Order MFG-WO-2026-00012: MAT-STE-2026-00001"
    )
    assert faults[1].message == (
        "Row #1: Operation Milling is not completed for 80.0 qty of finished goods in Work "
        "Order MFG-WO-2026-00013. Please update operation status via Job Card PO-JOB00001."
    )
    assert faults[2].message.startswith("Stock Entries already created for Work Order MFG-WO-2")
    assert [r.excerpt.split(";")[0] for r in results] == [
        "Stock Entry MAT-STE-2026-00005 submitted for MFG-WO-2026-00012 with the corrected "
        "totals, good 37, process loss 3",
        "Stock Entry MAT-STE-2026-00006 submitted for MFG-WO-2026-00013 with the corrected "
        "totals, good 37, process loss 3",
    ]
    hub_entries = {k: v for k, v in submitted(erp).items() if v[0] is not None}
    assert hub_entries == {
        "MAT-STE-2026-00005": ("a-2", 40.0, 3.0, 37.0),
        "MAT-STE-2026-00006": ("b-2", 40.0, 3.0, 37.0),
    }


@pytest.mark.parametrize("stop", ["after one cancel", "after the cancels", "re-post failed"])
async def test_a_correction_stopped_between_its_steps_is_finished_by_its_retry(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(25, 2))
        await sender.send(core.confirm(10))
        late_scrap = core.confirm(-3, 3)
        if stop == "re-post failed":  # the cancels are done, the submit is not (a 503)
            erp.fail_submit = True
            with pytest.raises(DeliveryFailed) as stopped:
                await sender.send(late_scrap)
            assert (stopped.value.status, stopped.value.permanent) == (503, False)
            assert stopped.value.reason.startswith(
                "ERPNext correction, already cancelled: MAT-STE-2026-00001, MAT-STE-2026-00002 "
                "(retried); posting MFG-WO-2026-00012's corrected totals (good 32, process "
                "loss 5): HTTP 503"
            )
        else:  # the hub died after cancelling one entry, or both
            erp.cancel_document("Stock Entry", "MAT-STE-2026-00001")
            if stop == "after the cancels":
                erp.cancel_document("Stock Entry", "MAT-STE-2026-00002")
    finally:
        await sender.close()
    restarted = sender_for(stand_in, monkeypatch)
    try:
        finished = await restarted.send(late_scrap)
        again = await restarted.send(late_scrap)
    finally:
        await restarted.close()
    assert (finished.status, finished.duplicate) == (200, False)
    assert finished.excerpt.startswith(
        "Stock Entry MAT-STE-2026-00003 submitted for MFG-WO-2026-00012 with the corrected "
        "totals, good 32, process loss 5; "
    )
    assert finished.excerpt.endswith(
        {
            "after one cancel": "cancelled for MFG-WO-2026-00012: MAT-STE-2026-00002; already "
            "cancelled: MAT-STE-2026-00001",
            "after the cancels": "nothing to cancel for MFG-WO-2026-00012; already cancelled: "
            "MAT-STE-2026-00001, MAT-STE-2026-00002",
            "re-post failed": "nothing to cancel for MFG-WO-2026-00012; already cancelled: "
            "MAT-STE-2026-00001, MAT-STE-2026-00002",
        }[stop]
    )
    assert submitted(erp) == {"MAT-STE-2026-00003": ("k-3", 37.0, 5.0, 32.0)}
    assert [e["docstatus"] for e in erp.docs["Stock Entry"].values()] == [2, 2, 1]
    assert (order["produced_qty"], order["process_loss_qty"]) == (32.0, 5.0)
    assert again.duplicate and again.excerpt == "Stock Entry MAT-STE-2026-00003 has k-3"
    assert erp.received == {"k-1": 1, "k-2": 1, "k-3": 1}


async def test_a_refused_re_post_after_the_cancels_is_retried_and_passes_later(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ERPNext refuses the totals after the hub's entries are cancelled: the ERP lacks their
    parts, so the refusal is retried (not dead), and its reason says what is cancelled. Here
    the job card has not caught up with one more part scrapped; once it has, the retry posts."""
    erp = stand_in.erp
    milling = {
        "name": "op-row-1",
        "idx": 1,
        "operation": "Milling",
        "completed_qty": 40.0,
        "process_loss_qty": 2.0,
    }
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0, operations=[milling])
    erp.job_card(
        "PO-JOB00001", "MFG-WO-2026-00012", "op-row-1", operation="Milling", workstation="CNC-1"
    )
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(25, 2))
        await sender.send(core.confirm(15, final=True))
        # 3 good parts are found bad and one more part was scrapped: 37 good, 6 lost in all.
        correction = core.confirm(-3, 4, final=True)
        with pytest.raises(DeliveryFailed) as refused:
            await sender.send(correction)
        assert [e["docstatus"] for e in erp.docs["Stock Entry"].values()] == [2, 2]
        erp.change("MFG-WO-2026-00012", operations=[{**milling, "process_loss_qty": 3.0}])
        posted = await sender.send(correction)
    finally:
        await sender.close()
    failed = refused.value
    assert (failed.status, failed.permanent) == (417, False)
    assert failed.reason.startswith(
        "ERPNext correction, already cancelled: MAT-STE-2026-00001, MAT-STE-2026-00002 "
        "(retried); posting MFG-WO-2026-00012's corrected totals (good 37, process loss 6): "
        "OperationsNotCompleteError: Row #1: Operation Milling is not completed for 43.0 qty"
    )
    assert posted.excerpt.startswith("Stock Entry MAT-STE-2026-00003 submitted")
    assert submitted(erp) == {"MAT-STE-2026-00003": ("k-3", 43.0, 6.0, 37.0)}
    order = erp.docs["Work Order"]["MFG-WO-2026-00012"]
    assert (order["produced_qty"], order["process_loss_qty"]) == (37.0, 6.0)


async def test_entries_of_others_on_the_work_order_are_left_alone(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only entries whose key is one the order's earlier confirmations went with are the
    hub's (a key longer than the field is kept hashed, and found so). A person's entry (no key)
    and another system's (its own key in the same field) are neither cancelled nor counted."""
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    config = entry(stand_in.url, monkeypatch)
    async with erpnext.outbound_client(config.allowlist(), 2) as client:
        api = erpnext.Frappe(config, client)
        for extra in ({}, {"mes_hub_key": "erp-bridge-7"}):
            made = await api.method(
                erpnext.MAKE_STOCK_ENTRY,
                work_order_id="MFG-WO-2026-00012",
                purpose="Manufacture",
                qty=5,
            )
            await api.insert("Stock Entry", {**made, **extra, "docstatus": 1})
    long_key = "mes-hub/plant-1/" + "7" * 150
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(20, 1, key=long_key))
        await sender.send(core.confirm(10))
        correction = core.confirm(-2, 2)
        # Without the earlier keys the hub's entries cannot be told: nothing is touched.
        with pytest.raises(DeliveryFailed, match="cannot be told from others") as blind:
            await sender.send(replace(correction, earlier_keys=()))
        corrected = await sender.send(correction)
    finally:
        await sender.close()
    assert blind.value.permanent
    hashed = erpnext.entry_key(long_key)
    assert hashed.startswith("sha256-")
    assert [(e.get("mes_hub_key"), e["docstatus"]) for e in erp.docs["Stock Entry"].values()] == [
        (None, 1),
        ("erp-bridge-7", 1),
        (hashed, 2),
        ("k-2", 2),
        ("k-3", 1),
    ]
    assert corrected.excerpt.endswith(
        "cancelled for MFG-WO-2026-00012: MAT-STE-2026-00003, MAT-STE-2026-00004"
    )
    assert submitted(erp)["MAT-STE-2026-00005"] == ("k-3", 31.0, 3.0, 28.0)
    assert (order["produced_qty"], order["process_loss_qty"]) == (38.0, 3.0)


async def test_a_correction_decided_without_totals_adds_its_difference_to_the_hub_entries(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A correction a hub of an earlier version decided carries no totals: what the hub's
    submitted entries posted, plus its difference."""
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(25, 2))
        await sender.send(core.confirm(15))
        old = replace(core.confirm(-3, 3), yield_total=None, scrap_total=None)
        corrected = await sender.send(old)
    finally:
        await sender.close()
    assert "with the corrected totals, good 37, process loss 5" in corrected.excerpt
    assert submitted(erp) == {"MAT-STE-2026-00003": ("k-3", 42.0, 5.0, 37.0)}


async def test_a_draft_left_by_an_earlier_version_is_finished(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub of an earlier version saved a correction's totals in a draft with its key, then
    stopped: the correction is finished in that draft (the draft is not a delivery)."""
    erp = stand_in.erp
    erp.work_order("MFG-WO-2026-00012", "BRK-7", 50.0)
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(25, 2))
        late_scrap = core.confirm(-3, 3)
        built = erp.make_stock_entry("MFG-WO-2026-00012", "Manufacture", 27.0)
        built["items"][1].update(qty=22.0, transfer_qty=22.0)
        erp.insert_stock_entry({**built, "process_loss_qty": 5.0, "mes_hub_key": "k-2"})
        finished = await sender.send(late_scrap)
        again = await sender.send(late_scrap)
    finally:
        await sender.close()
    assert finished.excerpt.startswith(
        "Stock Entry MAT-STE-2026-00002 submitted for MFG-WO-2026-00012 with the corrected "
        "totals, good 22, process loss 5; cancelled for MFG-WO-2026-00012: MAT-STE-2026-00001"
    )
    assert submitted(erp) == {"MAT-STE-2026-00002": ("k-2", 27.0, 5.0, 22.0)}
    assert again.duplicate


async def test_a_correction_to_no_good_parts_only_cancels(
    stand_in: Erpnext, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = stand_in.erp
    order = erp.work_order("MFG-WO-2026-00012", "BRK-7", 40.0)
    core = Core("MFG-WO-2026-00012")
    sender = sender_for(stand_in, monkeypatch)
    try:
        await sender.send(core.confirm(3))
        all_bad = core.confirm(-3, 3)
        cancelled = await sender.send(all_bad)
        again = await sender.send(all_bad)
    finally:
        await sender.close()
    assert cancelled.status is None and cancelled.excerpt == (
        "cancelled for MFG-WO-2026-00012: MAT-STE-2026-00001; nothing posted: the corrected "
        "good total is 0, and ERPNext has no Manufacture Stock Entry of 0 parts (3 scrap, "
        "kept in the hub)"
    )
    assert again.excerpt.startswith(
        "nothing to cancel for MFG-WO-2026-00012; already cancelled: MAT-STE-2026-00001; "
        "nothing posted"
    )
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
