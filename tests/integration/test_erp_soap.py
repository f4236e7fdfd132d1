"""The SOAP dialect: zeep, reading the WSDL mes-hub ships, against a spyne server that
implements it (``tests/erp_standins/soap.py``) on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from adapters.erp import config, soap
from adapters.erp.base import Confirmation
from contracts import OrderReleasedV1, decode_event, encode_event
from hub.outbox import DeliveryFailed
from tests.erp_standins.soap import PASSWORD, USER, SoapErp, served_soap

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="


@pytest.fixture
def erp() -> Iterator[SoapErp]:
    with served_soap() as stand_in:
        yield stand_in


def entry(url: str, monkeypatch: pytest.MonkeyPatch, **keys: Any) -> soap.Entry:
    monkeypatch.setenv("SOAP_ERP_PASSWORD", keys.pop("password", PASSWORD))
    raw = {
        "name": "esb",
        "dialect": "soap",
        "url": url,
        "user": USER,
        "secret": {"env": "SOAP_ERP_PASSWORD"},
        "allow": ["127.0.0.1"],
        "timeout_s": 2,
        **keys,
    }
    [found] = config.erp_section([raw], "mes-hub.toml", env={})
    assert isinstance(found, soap.Entry)
    return found


def confirmation(key: str = "evt-0001", **fields: Any) -> Confirmation:
    values: dict[str, Any] = {
        "key": key,
        "order_id": "SO-1",
        "sequence": 1,
        "machine_id": "CNC-07",
        "operation": "0010",
        "yield_quantity": 48,
        "scrap_quantity": 2,
        "start": T0,
        "end": T0 + timedelta(hours=3),
        "final": True,
        "correction_of": None,
        "posted_at": datetime(2026, 3, 2, 23, 30, tzinfo=UTC),
        **fields,
    }
    return Confirmation(**values)


def test_the_wsdl_ships_in_the_package() -> None:
    shipped = resources.files("adapters.erp") / "mes-hub-erp.wsdl"
    assert shipped.is_file()
    assert Path(str(shipped)) == soap.WSDL


async def test_orders_are_read_from_the_cursor_on(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    erp.add_order("SO-1", T0, customer="ACME", machine="CNC-07", idealCycleTimeSeconds=42.5)
    erp.add_order("SO-2", T0 + timedelta(minutes=5), quantity=7)
    source = config.order_source(entry(erp.url, monkeypatch), tmp_path)
    assert isinstance(source, soap.SoapOrders)

    first, cursor = await source.changes(None)

    assert erp.calls[-1] == ("GetReleasedOrders", None)
    assert [(e.type, e.subject) for e in first] == [
        ("mes.erp.order.released.v1", "SO-1"),
        ("mes.erp.order.released.v1", "SO-2"),
    ]
    assert first[0].id == "SO-1.released.20260302T060000.000000Z"
    assert first[0].source == "urn:mes-hub:erp:esb"
    assert first[0].time == T0
    assert first[0].data == {
        "order_id": "SO-1",
        "part_number": "P-100",
        "quantity": 10,
        "due": "2026-03-09T16:00:00Z",
        "customer": "ACME",
        "machine_id": "CNC-07",
        "ideal_cycle_time_s": 42.5,
    }
    assert decode_event(encode_event(first[0])).data == OrderReleasedV1(**first[0].data)
    assert cursor == "2026-03-02T06:05:00Z"  # the largest modified seen

    # SO-1 changes, SO-3 is new, SO-2 is cancelled; one more order shares SO-2's old stamp.
    erp.add_order("SO-1", T0 + timedelta(minutes=20), quantity=12)
    erp.add_order("SO-3", T0 + timedelta(minutes=10))
    erp.add_order("SO-4", T0 + timedelta(minutes=5))
    second, cursor = await source.changes(cursor)

    assert erp.calls[-1] == ("GetReleasedOrders", T0 + timedelta(minutes=5))
    ids = [e.id for e in second]
    # The boundary (modified = since) is asked again: SO-2 comes back under its old id (a
    # repeat the hub drops), and SO-4, stamped in the same instant, is not missed.
    assert ids == [
        "SO-2.released.20260302T060500.000000Z",
        "SO-4.released.20260302T060500.000000Z",
        "SO-3.released.20260302T061000.000000Z",
        "SO-1.released.20260302T062000.000000Z",
    ]
    assert first[1].id == ids[0]
    assert second[-1].data["quantity"] == 12
    assert cursor == "2026-03-02T06:20:00Z"

    erp.add_order(
        "SO-2", T0 + timedelta(minutes=30), status="cancelled", cancelReason="customer withdrew"
    )
    third, cursor = await source.changes(cursor)
    cancelled = third[-1]
    assert cancelled.type == "mes.erp.order.cancelled.v1"
    assert cancelled.data == {"order_id": "SO-2", "reason": "customer withdrew"}
    assert cursor == "2026-03-02T06:30:00Z"

    nothing, same = await source.changes(cursor)  # only the boundary again
    assert [e.id for e in nothing] == [cancelled.id] and same == cursor
    await source.close()


async def test_an_order_the_hub_cannot_take_is_skipped_not_fatal(
    erp: SoapErp,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    erp.add_order("SO 5/1", T0)  # not a token: mapped, the ERP's id kept
    erp.add_order("SO-6", T0 + timedelta(minutes=1), partNumber="")  # no part number
    source = config.order_source(entry(erp.url, monkeypatch), tmp_path)
    assert source is not None

    events, cursor = await source.changes(None)

    [event] = events
    assert event.subject.startswith("SO_5_1-") and event.model_extra == {"erpid": "SO 5/1"}
    assert any("SO-6" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert cursor == "2026-03-02T06:01:00Z"  # past the skipped one: a fix in the ERP re-stamps it


async def test_a_confirmation_is_accepted_once_and_a_repeat_is_a_duplicate(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = config.confirmation_sender(entry(erp.url, monkeypatch, timezone="Pacific/Auckland"))
    assert isinstance(sender, soap.SoapSender)

    delivered = await sender.send(confirmation())
    repeated = await sender.send(confirmation())

    assert (delivered.duplicate, delivered.excerpt) == (False, "accepted")
    assert (repeated.duplicate, repeated.excerpt) == (True, "duplicate")
    assert list(erp.confirmations) == ["evt-0001"]
    assert erp.repeats == {"evt-0001": 1}
    booked = erp.confirmations["evt-0001"]
    assert booked["orderId"] == "SO-1" and booked["machine"] == "CNC-07"
    assert (booked["yieldQuantity"], booked["scrapQuantity"], booked["final"]) == (48, 2, True)
    assert booked["start"] == T0 and booked["end"] == T0 + timedelta(hours=3)
    assert booked["postingDate"] == date(2026, 3, 3)  # 23:30 UTC is the 3rd in Auckland
    assert "correctionOf" not in booked or booked["correctionOf"] is None

    correction = confirmation(
        "evt-0002", sequence=2, yield_quantity=-3, correction_of=1, start=None, end=None
    )
    assert not (await sender.send(correction)).duplicate
    assert erp.confirmations["evt-0002"]["correctionOf"] == 1
    assert erp.confirmations["evt-0002"]["yieldQuantity"] == -3
    await sender.close()


async def test_the_hubs_audit_checkpoint_goes_in_an_http_header(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The WSDL's Confirmation has no element for it (the stand-in validates against it).
    sender = config.confirmation_sender(entry(erp.url, monkeypatch))
    assert isinstance(sender, soap.SoapSender)
    try:
        await sender.send(confirmation(checkpoint=CHECKPOINT))
        await sender.send(confirmation("evt-0002", sequence=2))  # decided before any checkpoint
    finally:
        await sender.close()
    assert list(erp.confirmations) == ["evt-0001", "evt-0002"]
    assert erp.checkpoint_headers == [CHECKPOINT, None]


async def test_faults_fail_the_delivery_with_the_right_permanence(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = config.confirmation_sender(entry(erp.url, monkeypatch))
    assert sender is not None

    erp.fail = "client_fault"  # the ERP refuses the content: sending it again cannot help
    with pytest.raises(DeliveryFailed) as refused:
        await sender.send(confirmation())
    assert refused.value.permanent
    assert "Client.UnknownOrder" in refused.value.reason

    erp.fail = "server_fault"
    with pytest.raises(DeliveryFailed) as failed:
        await sender.send(confirmation())
    assert not failed.value.permanent
    assert "SOAP fault Server" in failed.value.reason

    erp.fail = "down"  # 503 with an HTML page
    with pytest.raises(DeliveryFailed) as failed:
        await sender.send(confirmation())
    assert (failed.value.permanent, failed.value.status) == (False, 503)
    assert "503 Service Unavailable" in failed.value.excerpt

    erp.fail = "slow"
    erp.delay_s = 3.0  # over the entry's 2 s
    with pytest.raises(DeliveryFailed, match="no answer within 2 s") as failed:
        await sender.send(confirmation())
    assert not failed.value.permanent

    erp.fail = None
    assert erp.confirmations == {}
    assert not (await sender.send(confirmation())).duplicate
    await sender.close()


async def test_what_the_wsdl_refuses_is_refused_for_good(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = config.confirmation_sender(entry(erp.url, monkeypatch))
    assert sender is not None
    # zeep does not check the WSDL's patterns; the service does (spyne validates every
    # request against its schema) and answers a Client fault.
    with pytest.raises(DeliveryFailed) as refused:
        await sender.send(confirmation(machine_id="CNC 07"))
    assert refused.value.permanent
    assert "SchemaValidationError" in refused.value.reason
    # What zeep itself cannot send (a required element missing) is not sent at all.
    service = soap.SoapService(entry(erp.url, monkeypatch))
    with pytest.raises(soap.SoapCallFailed) as unsendable:
        await service.call("ConfirmOperation", confirmation={"key": "k", "orderId": "SO-1"})
    assert unsendable.value.permanent
    assert all(name == "GetReleasedOrders" for name, _ in erp.calls)
    await service.close()
    await sender.close()


async def test_a_wrong_password_is_retried_and_never_shown(
    erp: SoapErp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wrong = "Wr0ng-pa55word-xyz"
    sender = config.confirmation_sender(entry(erp.url, monkeypatch, password=wrong))
    assert sender is not None

    with pytest.raises(DeliveryFailed) as failed:
        await sender.send(confirmation())

    assert (failed.value.permanent, failed.value.status) == (False, 401)
    assert "refused the login (user mes-hub)" in failed.value.reason
    for text in (failed.value.reason, failed.value.excerpt, str(failed.value), repr(failed.value)):
        assert wrong not in text and PASSWORD not in text
    assert erp.confirmations == {}
    source = config.order_source(entry(erp.url, monkeypatch, password=wrong), tmp_path)
    assert source is not None
    with pytest.raises(soap.SoapCallFailed) as unread:
        await source.changes(None)
    assert unread.value.status == 401 and wrong not in str(unread.value)
    await sender.close()


async def test_a_service_that_is_gone_or_not_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    with served_soap() as erp:
        url = erp.url
    sender = config.confirmation_sender(entry(url, monkeypatch))
    assert sender is not None
    with pytest.raises(DeliveryFailed) as failed:  # nobody listens there any more
        await sender.send(confirmation())
    assert not failed.value.permanent and "ConnectError" in failed.value.reason
    await sender.close()

    with served_soap() as erp:
        not_allowed = config.confirmation_sender(entry(erp.url, monkeypatch, allow=[]))
        assert not_allowed is not None
        with pytest.raises(DeliveryFailed, match="internal address") as failed:
            await not_allowed.send(confirmation())
        assert not failed.value.permanent
        assert erp.calls == []
        await not_allowed.close()


def test_the_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    quiet = entry("https://esb.example/mes-hub/v1", monkeypatch, poll_interval_s=0, confirm=False)
    assert config.order_source(quiet, tmp_path) is None
    assert config.confirmation_sender(quiet) is None
    with pytest.raises(config.ErpConfigError, match="IANA"):
        entry("https://esb.example/mes-hub/v1", monkeypatch, timezone="Nowhere/Special")
    assert "SOAP_ERP_PASSWORD" in repr(quiet) and PASSWORD not in repr(quiet)
