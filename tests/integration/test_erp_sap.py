"""The SAP S/4HANA dialect (adapters.erp.sap) against a stand-in on loopback that checks every
confirmation against the real service metadata (tests.erp_standins.sap, read from
../shared/fixtures/erp/sap; skipped with a reason when that is absent)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from adapters.erp import sap
from adapters.erp.base import Confirmation
from adapters.erp.config import ErpConfigError, confirmation_sender, erp_section
from contracts import validate_envelope
from hub.outbox import DeliveryFailed
from tests.conftest import T0
from tests.erp_standins import erp_fixtures, served
from tests.erp_standins.sap import (
    CONFIRMATION_SERVICE,
    SESSION_COOKIE,
    add_production_order,
    load_function_imports,
    load_metadata,
    sap_erp,
)

USER, PASSWORD = "MES_HUB", "s4-password-0123"
CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="


@pytest.fixture
def fixtures() -> Path:
    return erp_fixtures("sap")


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "s4-password"
    path.write_text(PASSWORD)
    return path


@pytest.fixture
async def s4(fixtures: Path) -> AsyncIterator[tuple[FastAPI, str]]:
    app = sap_erp(fixtures, user=USER, password=PASSWORD)
    async with served(app) as url:
        yield app, url


def raw_entry(url: str, secret_file: Path, **keys: Any) -> dict[str, Any]:
    return {
        "name": "s4",
        "dialect": "sap",
        "url": url,
        "user": USER,
        "secret": {"file": str(secret_file)},
        "allow": ["127.0.0.1"],
        "timeout_s": 2,
        "client": "100",
        "timezone": "Europe/Berlin",
        **keys,
    }


def entry(url: str, secret_file: Path, **keys: Any) -> sap.Entry:
    [found] = erp_section([raw_entry(url, secret_file, **keys)], "mes-hub.toml", env={})
    assert isinstance(found, sap.Entry)
    return found


def sender(e: sap.Entry) -> sap.SapConfirmationSender:
    found = confirmation_sender(e)
    assert isinstance(found, sap.SapConfirmationSender)
    return found


def confirmation(key: str = "evt-0001", order_id: str = "1000123", **changes: Any) -> Confirmation:
    made = Confirmation(
        key=key,
        order_id=order_id,
        sequence=1,
        machine_id="M-1",
        operation=None,
        yield_quantity=40,
        scrap_quantity=2,
        start=T0,
        end=T0 + timedelta(hours=3, minutes=30, seconds=15),
        final=False,
        correction_of=None,
        posted_at=datetime(2026, 3, 2, 23, 30, tzinfo=UTC),  # 3 March in Berlin
        yield_total=40,  # the order's first: its totals are its quantities
        scrap_total=2,
    )
    return replace(made, **changes)


def guid(key: str) -> str:
    return str(uuid.uuid5(uuid.UUID("c0f618c2-53de-5486-acfa-c3771975b726"), key))


def ms(day: str) -> str:
    return f"/Date({int(datetime.fromisoformat(day + 'T00:00:00+00:00').timestamp()) * 1000})/"


# --- confirmations -----------------------------------------------------------------------------


async def test_a_confirmation_is_posted_with_the_metadatas_names_types_and_formats(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    app.state.orders = {"1000123"}
    out = sender(entry(url, secret_file))
    try:
        delivered = await out.send(confirmation())
    finally:
        await out.close()
    assert delivered.status == 201 and not delivered.duplicate
    assert delivered.excerpt == "ConfirmationGroup 0000000001 ConfirmationCount 00000001"
    [booked] = app.state.confirmations
    sent = {k: v for k, v in booked.items() if v is not None and k[:1] != "_"}
    assert sent == {
        "OrderID": "1000123",
        "OrderOperation": "0010",  # the entry's default: the confirmation names none
        "ConfirmationText": "mes-hub M-1 #1",
        "ConfirmationYieldQuantity": "40",
        "ConfirmationScrapQuantity": "2",
        "IsFinalConfirmation": False,
        "PostingDate": ms("2026-03-03"),  # the plant's day (Europe/Berlin)
        "ExternalSystemConfirmation": guid("evt-0001"),
        "ConfirmedExecutionStartDate": ms("2026-03-02"),
        "ConfirmedExecutionStartTime": "PT07H00M00S",
        "ConfirmedExecutionEndDate": ms("2026-03-02"),
        "ConfirmedExecutionEndTime": "PT10H30M15S",
        # what the stand-in books itself
        "ConfirmationGroup": "0000000001",
        "ConfirmationCount": "00000001",
        "ConfirmationEntryDate": booked["ConfirmationEntryDate"],
        "EnteredByUser": "MES_HUB",
        "IsReversed": False,
        "IsReversal": False,
    }
    assert app.state.lookups == [f"ExternalSystemConfirmation eq guid'{guid('evt-0001')}'"]
    assert app.state.token_fetches == 1 and len(app.state.posts) == 1


async def test_the_hubs_audit_checkpoint_fills_what_confirmation_text_has_left(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    # ConfirmationText is the entity's only text, 40 characters (MaxLength, which the stand-in
    # enforces from the metadata): the whole reference never fits, its size and a root prefix do.
    app, url = s4
    app.state.orders = {"1000123"}
    out = sender(entry(url, secret_file))
    try:
        delivered = await out.send(confirmation(checkpoint=CHECKPOINT))
    finally:
        await out.close()
    assert not delivered.duplicate
    [booked] = app.state.confirmations
    root = CHECKPOINT.rsplit(" ", 1)[1]
    assert booked["ConfirmationText"] == "mes-hub M-1 #1 @4097:" + root[:19]
    assert len(booked["ConfirmationText"]) == 40
    # A correction's text leaves less than 8 characters of the root: left out, not cut short.
    correction = confirmation(sequence=2, correction_of=1, checkpoint=CHECKPOINT)
    assert sap.confirmation_text(correction) == "mes-hub M-1 #2 corrects #1"
    assert sap.confirmation_text(confirmation()) == "mes-hub M-1 #1"


async def test_the_csrf_token_is_reused_and_fetched_again_once_when_it_expired(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    out = sender(entry(url, secret_file))
    try:
        await out.send(confirmation("evt-1"))
        await out.send(confirmation("evt-2", operation="0020"))
        first_token = app.state.posts[0]
        assert app.state.token_fetches == 1 and app.state.posts == [first_token] * 2

        app.state.expire_sessions()
        assert (await out.send(confirmation("evt-3"))).status == 201
    finally:
        await out.close()
    assert app.state.token_fetches == 2
    assert app.state.posts[2] == first_token and app.state.posts[3] not in (None, first_token)
    assert [c["OrderOperation"] for c in app.state.confirmations] == ["0010", "0020", "0010"]


async def post_raw(url: str, entity: dict[str, Any]) -> httpx.Response:
    """A POST to the stand-in as any OData client makes it (token fetched first)."""
    auth = httpx.BasicAuth(USER, PASSWORD)
    async with httpx.AsyncClient(base_url=url + CONFIRMATION_SERVICE, auth=auth) as client:
        fetched = await client.get("/", headers={"x-csrf-token": "Fetch"})
        assert SESSION_COOKIE in client.cookies
        token = fetched.headers["x-csrf-token"]
        return await client.post("/ProdnOrdConf2", json=entity, headers={"x-csrf-token": token})


VALID = {
    "OrderID": "1000123",
    "OrderOperation": "0010",
    "ConfirmationYieldQuantity": "40",
    "ConfirmationScrapQuantity": "0",
    "IsFinalConfirmation": True,
    "PostingDate": "/Date(1772409600000)/",
    "ExternalSystemConfirmation": "01234567-89ab-cdef-0123-456789abcdef",
}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"ConfirmationYieldQuantity": 40}, "Edm.Decimal must be a JSON string"),
        ({"ConfirmationYieldQuantity": "1.2345"}, "more than Scale 3 decimal places"),
        ({"ConfirmationYieldQuantity": "12345678901"}, "more digits than Precision 13"),
        ({"PostingDate": "2026-03-02"}, 'Edm.DateTime must be "/Date('),
        ({"PostingDate": "/Date(1772442000000)/"}, "the time must be 00:00:00 UTC"),
        ({"OrderID": "1234567890123"}, "longer than MaxLength 12"),
        ({"OrderOperation": "00010"}, "longer than MaxLength 4"),
        ({"ExternalSystemConfirmation": "mes-hub-evt-0001"}, "Edm.Guid must be a string"),
        ({"IsFinalConfirmation": "X"}, "Edm.Boolean must be true or false"),
        ({"ConfirmedExecutionStartTime": "07:00:00"}, "Edm.Time must be an ISO 8601 duration"),
        ({"Quantity": "1"}, "Property 'Quantity' is invalid"),
    ],
)
async def test_the_stand_in_refuses_what_the_metadata_refuses(
    s4: tuple[FastAPI, str], change: dict[str, Any], said: str
) -> None:
    app, url = s4
    assert (await post_raw(url, VALID)).status_code == 201  # the valid one is taken
    refused = await post_raw(url, {**VALID, **change})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"]["lang"] == "en" and said in error["message"]["value"]
    assert isinstance(error["code"], str) and error["code"]
    assert len(app.state.confirmations) == 1


def test_the_stand_in_takes_its_rules_from_the_metadata_file(fixtures: Path) -> None:
    types = load_metadata(fixtures / "API_PROD_ORDER_CONFIRMATION_2_SRV.metadata.xml")
    conf = types["ProdnOrdConf2Type"]
    assert conf.keys == ("ConfirmationGroup", "ConfirmationCount")
    assert len(conf.properties) == 88  # as SOURCE.txt counts them
    used = {
        "OrderID": ("Edm.String", 12),
        "OrderOperation": ("Edm.String", 4),
        "ConfirmationText": ("Edm.String", 40),
        "ConfirmationYieldQuantity": ("Edm.Decimal", None),
        "ConfirmationScrapQuantity": ("Edm.Decimal", None),
        "IsFinalConfirmation": ("Edm.Boolean", None),
        "PostingDate": ("Edm.DateTime", None),
        "ExternalSystemConfirmation": ("Edm.Guid", None),  # no MaxLength: a GUID
        "ConfirmedExecutionStartDate": ("Edm.DateTime", None),
        "ConfirmedExecutionStartTime": ("Edm.Time", None),
        "ConfirmedExecutionEndDate": ("Edm.DateTime", None),
        "ConfirmedExecutionEndTime": ("Edm.Time", None),
    }
    for name, (kind, max_length) in used.items():
        assert (conf.properties[name].type, conf.properties[name].max_length) == (kind, max_length)
    assert set(sap.MAX_LENGTH.items()) <= {(n, m) for n, (_, m) in used.items()}
    assert {"IsReversed", "IsReversal"} | set(sap.RECORD_PROPERTIES) <= set(conf.properties)
    cancel = load_function_imports(fixtures / "API_PROD_ORDER_CONFIRMATION_2_SRV.metadata.xml")[
        sap.CANCEL
    ]
    assert cancel.http_method == "POST"
    assert {n: (p.type, p.nullable) for n, p in cancel.parameters.items()} == {
        "ConfirmationGroup": ("Edm.String", False),
        "ConfirmationCount": ("Edm.String", False),
        "PostingDate": ("Edm.DateTime", True),
        "ConfirmationText": ("Edm.String", True),
        "ExternalSystemConfirmation": ("Edm.Guid", True),
    }


async def test_sap_refusing_a_confirmation_is_permanent_with_its_message(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    app.state.orders = {"1000123"}
    out = sender(entry(url, secret_file))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation(order_id="1000999"))
    finally:
        await out.close()
    exc = failed.value
    assert exc.permanent and exc.status == 400
    assert exc.reason == (
        "s4: confirmation: HTTP 400 Bad Request: Order 1000999 does not exist [CO/004]"
    )
    assert '"value":"Order 1000999 does not exist"' in exc.excerpt


def test_sap_echoing_the_password_has_it_blanked_in_the_reason_too(secret_file: Path) -> None:
    said = {"lang": "en", "value": f"User {USER} with password {PASSWORD} is locked"}
    body = {"error": {"code": f"ZZ/{PASSWORD}", "message": said}}
    response = httpx.Response(
        400, json=body, request=httpx.Request("POST", "https://s4.example/ProdnOrdConf2")
    )
    failed = sap.sap_failure(
        entry("https://s4.example", secret_file), response, SecretStr(PASSWORD), "confirmation"
    )
    assert failed.permanent and failed.reason == (
        "s4: confirmation: HTTP 400 Bad Request: User MES_HUB with password *** is locked [ZZ/***]"
    )
    assert PASSWORD not in failed.excerpt and "***" in failed.excerpt


async def test_a_lost_answer_is_not_posted_twice_because_of_the_lookup(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    app.state.lose_answers = 1  # booked, then answered 500
    key = guid("evt-0001")
    out = sender(entry(url, secret_file))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation())
        assert not failed.value.permanent and failed.value.status == 500
        assert app.state.by_external_key[key] == 1

        again = await out.send(confirmation())  # the outbox retries
    finally:
        await out.close()
    restarted = sender(entry(url, secret_file))  # a hub restarted since: it looks too
    try:
        after_restart = await restarted.send(confirmation())
    finally:
        await restarted.close()
    for delivered in again, after_restart:
        assert delivered.duplicate
        assert delivered.excerpt == (
            "already posted as ConfirmationGroup 0000000001 ConfirmationCount 00000001"
        )
    assert app.state.by_external_key[key] == 1 and len(app.state.posts) == 1

    # SAP itself does not refuse the same external key: without the lookup, a second booking.
    assert (await post_raw(url, sap.confirmation_entity(confirmation(), out.entry))).is_success
    assert app.state.by_external_key[key] == 2


@pytest.mark.parametrize(
    ("flag", "value", "status", "said"),
    [
        ("reject_login", True, 401, "HTTP 401 Unauthorized"),
        ("down", True, 503, "HTTP 503 Service Unavailable, Retry-After: 60"),
        ("error", True, 500, "Runtime Error: internal error"),
        ("slow", 1.5, None, "no answer within 0.5 s"),
    ],
)
async def test_a_refused_login_a_down_or_failing_sap_is_not_permanent(
    s4: tuple[FastAPI, str],
    secret_file: Path,
    flag: str,
    value: object,
    status: int | None,
    said: str,
) -> None:
    app, url = s4
    setattr(app.state, flag, value)
    out = sender(entry(url, secret_file, timeout_s=0.5))
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(confirmation())
    finally:
        await out.close()
    exc = failed.value
    assert not exc.permanent and exc.status == status and said in exc.reason
    for text in exc.reason, exc.excerpt, repr(exc):
        assert PASSWORD not in text and "\n" not in exc.reason
    assert app.state.confirmations == []


async def test_what_sap_cannot_take_is_refused_before_calling_it(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    out = sender(entry(url, secret_file))
    try:
        with pytest.raises(DeliveryFailed) as too_long:
            await out.send(confirmation(order_id="WO-2026-000123"))
        long = Order("WO-2026-000123")
        long.run("evt-0001", 40, 2)
        with pytest.raises(DeliveryFailed) as correction_too_long:  # checked before any cancel
            await out.send(long.correct("evt-0002", -3, 3))
    finally:
        await out.close()
    for failed in too_long, correction_too_long:
        assert failed.value.permanent and "longer than SAP takes (12" in failed.value.reason
    assert app.state.posts == [] and app.state.lookups == []


# --- corrections: reversal and re-post ---------------------------------------------------------


class Order:
    """An order's confirmations as the core decides them: numbered 1, 2, …, each with the
    order's totals so far and the keys its earlier ones were sent with (the outbox gives those
    to the ERP)."""

    def __init__(self, order_id: str = "1000123") -> None:
        self.order_id = order_id
        self.sent: list[Confirmation] = []
        self.good = self.scrap = 0

    def run(self, key: str, good: int, scrap: int, **changes: Any) -> Confirmation:
        """What a run made: ``good`` and ``scrap`` new."""
        return self._next(key, good, scrap, correction_of=None, **changes)

    def correct(self, key: str, good: int, scrap: int, **changes: Any) -> Confirmation:
        """A correction (late scrap): ``good`` and ``scrap`` the differences; final when the
        confirmation corrected was (the core keeps it so)."""
        last = self.sent[-1]
        changes = {"final": last.final, "start": None, "end": None, **changes}
        return self._next(key, good, scrap, correction_of=last.sequence, **changes)

    def _next(self, key: str, good: int, scrap: int, **changes: Any) -> Confirmation:
        self.good, self.scrap = self.good + good, self.scrap + scrap
        made = confirmation(
            key,
            self.order_id,
            sequence=len(self.sent) + 1,
            yield_quantity=good,
            scrap_quantity=scrap,
            yield_total=self.good,
            scrap_total=self.scrap,
            earlier_keys=tuple(c.key for c in self.sent),
            **changes,
        )
        self.sent.append(made)
        return made


def active(app: FastAPI, order_id: str = "1000123") -> list[dict[str, Any]]:
    """The order's confirmations SAP counts: not reversed, not a reversal."""
    return [
        c
        for c in app.state.confirmations
        if c["OrderID"] == order_id and not (c["IsReversed"] or c["IsReversal"])
    ]


def quantities(record: dict[str, Any]) -> tuple[str, str]:
    return record["ConfirmationYieldQuantity"], record["ConfirmationScrapQuantity"]


def named(group: int, count: int) -> str:
    return f"ConfirmationGroup {group:010d} ConfirmationCount {count:08d}"


def cancelled_keys(app: FastAPI) -> list[tuple[str, str]]:
    """The confirmations SAP reversed, in the order it did."""
    return [
        (c["ConfirmationGroup"], c["ConfirmationCount"])
        for c in app.state.confirmations
        if c["IsReversed"]
    ]


OTHER_SYSTEM = "0badc0de-0000-4000-8000-000000000001"  # another PDC system's external key


async def test_a_late_scrap_reverses_the_hubs_confirmation_and_posts_the_corrected_totals(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-0001", 40, 2))
        await out.send(Order("1000456").run("evt-0002", 40, 0))  # another order: untouched
        # An operator's own confirmation at SAP (no external key), and one another PDC system
        # posted with its own external key, on the same operation: not the hub's.
        typed_in = {k: v for k, v in VALID.items() if k != "ExternalSystemConfirmation"}
        assert (await post_raw(url, {**typed_in, "IsFinalConfirmation": False})).is_success
        foreign = {
            **VALID,
            "IsFinalConfirmation": False,
            "ExternalSystemConfirmation": OTHER_SYSTEM,
        }
        assert (await post_raw(url, {**foreign, "ConfirmationYieldQuantity": "7"})).is_success
        delivered = await out.send(order.correct("evt-0003", -3, 3))
    finally:
        await out.close()

    assert delivered.status == 201 and not delivered.duplicate
    assert delivered.excerpt == f"cancelled {named(1, 1)}; posted {named(1, 5)} (yield 37, scrap 5)"
    original, other_order, operators, others, reversal, repost = app.state.confirmations
    assert original["IsReversed"] and not original["IsReversal"]
    assert reversal["IsReversal"] and quantities(reversal) == ("40", "2")
    assert (reversal["ConfirmationGroup"], reversal["ConfirmationCount"]) == (
        "0000000001",
        "00000004",
    )
    assert reversal["ExternalSystemConfirmation"] == guid("evt-0003")
    assert app.state.cancels == [
        {
            "ConfirmationGroup": "0000000001",
            "ConfirmationCount": "00000001",
            "PostingDate": ms("2026-03-03"),
            "ConfirmationText": "mes-hub M-1 #2 corrects #1",
            "ExternalSystemConfirmation": guid("evt-0003"),
        }
    ]
    assert active(app) == [operators, others, repost] and active(app, "1000456") == [other_order]
    assert quantities(repost) == ("37", "5")  # the hub's totals: the others' 40 and 7 not in it
    assert repost["ExternalSystemConfirmation"] == guid("evt-0003")
    # Not final: the confirmation corrected was not (the message's own IsFinalConfirmation).
    assert repost["IsFinalConfirmation"] is False and repost["PostingDate"] == ms("2026-03-03")
    # The execution the cancelled one reported stays in SAP (the operation's actual dates).
    assert (repost["ConfirmedExecutionStartTime"], repost["ConfirmedExecutionEndTime"]) == (
        "PT07H00M00S",
        "PT10H30M15S",
    )
    assert app.state.lookups[-2:] == [
        f"ExternalSystemConfirmation eq guid'{guid('evt-0003')}'",
        "OrderID eq '1000123' and OrderOperation eq '0010' and IsReversal eq false",
    ]

    # A later correction corrects the corrected one: SAP still ends with one of the hub's.
    again = sender(entry(url, secret_file))
    try:
        await again.send(order.correct("evt-0004", -1, 0))
    finally:
        await again.close()
    hub = [c for c in active(app) if c["ExternalSystemConfirmation"] not in (None, OTHER_SYSTEM)]
    assert [quantities(c) for c in hub] == [("36", "5")]
    assert hub[0]["ExternalSystemConfirmation"] == guid("evt-0004")
    assert active(app)[:2] == [operators, others]  # never cancelled
    assert cancelled_keys(app) == [("0000000001", "00000001"), ("0000000001", "00000005")]


async def test_a_correction_of_a_final_confirmation_reposts_final(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 30, 0))
        await out.send(order.run("evt-2", 10, 2, final=True))  # the order's 40 reached
        correction = order.correct("evt-3", -3, 3)
        assert correction.final  # as the core decides it
        delivered = await out.send(correction)
    finally:
        await out.close()
    assert delivered.excerpt.endswith(f"posted {named(1, 5)} (yield 37, scrap 5)")
    [repost] = active(app)
    assert repost["IsFinalConfirmation"] is True and quantities(repost) == ("37", "5")
    assert [c["IsFinalConfirmation"] for c in app.state.confirmations[:2]] == [False, True]


@pytest.mark.parametrize("keeps_key", [True, False], ids=["reversal-keeps-key", "key-dropped"])
@pytest.mark.parametrize(
    ("failure", "retry_is_duplicate", "said"),
    [
        # both cancelled, then the re-post failed (or the hub died before it)
        ("fail_posts", False, f"totals (after cancelling {named(1, 1)}, {named(1, 2)}): HTTP 500"),
        # the first cancel done but its answer lost: the second never tried
        ("lose_cancel_answers", False, f"cancelling {named(1, 1)}: HTTP 500"),
        # everything done, the re-post's answer lost
        ("lose_answers", True, "confirmation with the corrected totals (after cancelling "),
    ],
)
async def test_a_correction_stopped_half_way_is_finished_by_its_retry(
    s4: tuple[FastAPI, str],
    secret_file: Path,
    keeps_key: bool,
    failure: str,
    retry_is_duplicate: bool,
    said: str,
) -> None:
    app, url = s4
    app.state.reversals_keep_external_key = keeps_key
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 30, 1))
        await out.send(order.run("evt-2", 10, 1))
        setattr(app.state, failure, 1)
        correction = order.correct("evt-3", -5, 5)
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(correction)
    finally:
        await out.close()
    assert not failed.value.permanent and said in failed.value.reason

    restarted = sender(entry(url, secret_file))  # the outbox retries, from a restarted hub
    try:
        delivered = await restarted.send(correction)
    finally:
        await restarted.close()

    assert delivered.duplicate is retry_is_duplicate
    [corrected] = active(app)
    assert quantities(corrected) == ("35", "7")  # the hub's totals: 40 - 5 good, 2 + 5 scrap
    assert corrected["ExternalSystemConfirmation"] == guid("evt-3")
    assert app.state.by_external_key[guid("evt-3")] == 1
    # Each original cancelled once, never twice; the span of both kept.
    assert cancelled_keys(app) == [("0000000001", "00000001"), ("0000000001", "00000002")]
    assert len(app.state.cancels) == 2
    assert (corrected["ConfirmedExecutionStartTime"], corrected["ConfirmedExecutionEndTime"]) == (
        "PT07H00M00S",
        "PT10H30M15S",
    )


@pytest.mark.parametrize("keeps_key", [True, False], ids=["reversal-keeps-key", "key-dropped"])
async def test_a_refused_repost_after_a_cancel_is_retried_until_sap_takes_it(
    s4: tuple[FastAPI, str], secret_file: Path, keeps_key: bool
) -> None:
    app, url = s4
    app.state.reversals_keep_external_key = keeps_key
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 30, 1))
        await out.send(order.run("evt-2", 10, 1))
        correction = order.correct("evt-3", -5, 5)
        app.state.refuse_posts = 2  # a closed posting period, twice
        with pytest.raises(DeliveryFailed) as first:
            await out.send(correction)
        with pytest.raises(DeliveryFailed) as second:  # the retry: nothing left to cancel
            await out.send(correction)
        delivered = await out.send(correction)  # the period opened
    finally:
        await out.close()

    refused = ": HTTP 400 Bad Request: Posting period 003 2026 is not open [F5/201]"
    assert not first.value.permanent and first.value.status == 400
    assert first.value.reason == (
        f"s4: confirmation with the corrected totals (after cancelling {named(1, 1)}, "
        f"{named(1, 2)})" + refused
    )
    assert not second.value.permanent and second.value.status == 400
    earlier = (
        f"an earlier attempt's reversal {named(1, 3)}, {named(1, 4)}"
        if keeps_key
        else "an earlier attempt's cancels: the hub's active confirmations hold yield 0, "
        "scrap 0 of the 40, 2 confirmed before"
    )
    assert second.value.reason == (
        f"s4: confirmation with the corrected totals (after {earlier})" + refused
    )
    assert delivered.status == 201 and not delivered.duplicate
    [corrected] = active(app)
    assert quantities(corrected) == ("35", "7") and len(app.state.cancels) == 2


@pytest.mark.parametrize("keeps_key", [True, False], ids=["reversal-keeps-key", "key-dropped"])
async def test_a_refused_cancel_is_permanent_only_while_nothing_is_cancelled(
    s4: tuple[FastAPI, str], secret_file: Path, keeps_key: bool
) -> None:
    app, url = s4
    app.state.reversals_keep_external_key = keeps_key
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 30, 1))
        await out.send(order.run("evt-2", 10, 1))
        correction = order.correct("evt-3", -5, 5)
        app.state.refuse_cancel_of = {("0000000001", "00000001")}
        with pytest.raises(DeliveryFailed) as before_any:
            await out.send(correction)
        booked = [dict(c) for c in app.state.confirmations]  # as they are now
        app.state.refuse_cancel_of = {("0000000001", "00000002")}
        with pytest.raises(DeliveryFailed) as after_one:
            await out.send(correction)
        with pytest.raises(DeliveryFailed) as retried:  # still refused, from a retry
            await out.send(correction)
        app.state.refuse_cancel_of = set()
        delivered = await out.send(correction)
    finally:
        await out.close()

    refused = ": HTTP 400 Bad Request: Posting period 003 2026 is not open [F5/201]"
    assert before_any.value.permanent and before_any.value.reason == (
        f"s4: cancelling {named(1, 1)}" + refused
    )
    assert len(booked) == 2 and not any(c["IsReversed"] for c in booked)  # nothing changed
    assert not after_one.value.permanent and after_one.value.reason == (
        f"s4: cancelling {named(1, 2)} (after cancelling {named(1, 1)})" + refused
    )
    assert not retried.value.permanent and "(after an earlier attempt's " in retried.value.reason
    assert delivered.status == 201
    [corrected] = active(app)
    assert quantities(corrected) == ("35", "7")
    assert cancelled_keys(app) == [("0000000001", "00000001"), ("0000000001", "00000002")]


async def test_without_the_hubs_totals_a_correction_adds_it_to_the_hubs_postings_only(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    """A confirmation decided by a hub from before the totals were told: the fallback."""
    app, url = s4
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 30, 1))
        foreign = {
            **VALID,
            "IsFinalConfirmation": False,
            "ExternalSystemConfirmation": OTHER_SYSTEM,
        }
        assert (await post_raw(url, foreign)).is_success  # 40 good from another system
        await out.send(order.run("evt-2", 10, 1))
        old = replace(order.correct("evt-3", -5, 5), yield_total=None, scrap_total=None)
        delivered = await out.send(old)
    finally:
        await out.close()
    assert delivered.excerpt == (
        f"cancelled {named(1, 1)}, {named(1, 3)}; posted {named(1, 6)} (yield 35, scrap 7)"
    )
    others, corrected = active(app)
    assert others["ExternalSystemConfirmation"] == OTHER_SYSTEM and quantities(others) == (
        "40",
        "0",
    )
    assert quantities(corrected) == ("35", "7")


async def test_a_correction_without_the_earlier_keys_is_refused_before_cancelling_anything(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-1", 40, 2))
        with pytest.raises(DeliveryFailed) as failed:
            await out.send(replace(order.correct("evt-2", -3, 3), earlier_keys=()))
    finally:
        await out.close()
    assert failed.value.permanent and "keys of the order's earlier confirmations" in (
        failed.value.reason
    )
    assert app.state.cancels == [] and [quantities(c) for c in active(app)] == [("40", "2")]


async def test_a_repeated_correction_is_a_duplicate_and_changes_nothing(
    s4: tuple[FastAPI, str], secret_file: Path
) -> None:
    app, url = s4
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-0001", 40, 2))
        correction = order.correct("evt-0002", -3, 3)
        await out.send(correction)
        booked, posts = list(app.state.confirmations), len(app.state.posts)
        repeated = await out.send(correction)
    finally:
        await out.close()
    assert repeated.duplicate and repeated.excerpt == f"already posted as {named(1, 3)}"
    assert app.state.confirmations == booked and len(app.state.posts) == posts
    assert len(app.state.cancels) == 1 and [quantities(c) for c in active(app)] == [("37", "5")]


@pytest.mark.parametrize("keeps_key", [True, False], ids=["reversal-keeps-key", "key-dropped"])
async def test_a_correction_to_nothing_only_cancels_and_its_repeat_changes_nothing(
    s4: tuple[FastAPI, str], secret_file: Path, keeps_key: bool
) -> None:
    app, url = s4
    app.state.reversals_keep_external_key = keeps_key
    order = Order()
    out = sender(entry(url, secret_file))
    try:
        await out.send(order.run("evt-0001", 5, 0))
        everything = order.correct("evt-0002", -5, 0)  # never made
        cancelled = await out.send(everything)
        repeated = await out.send(everything)
    finally:
        await out.close()
    assert (cancelled.status, cancelled.duplicate) == (200, False)
    assert cancelled.excerpt == f"cancelled {named(1, 1)}"
    if keeps_key:
        assert repeated.duplicate
        assert repeated.excerpt == f"cancelled before: reversal {named(1, 2)}"
    else:  # nothing tells the repeat from a first attempt: there is nothing left to do either
        assert not repeated.duplicate and repeated.excerpt == (
            "no active confirmation of the hub's for order 1000123 operation 0010"
        )
    assert active(app) == [] and len(app.state.confirmations) == 2  # the original, its reversal
    assert len(app.state.cancels) == 1 and app.state.by_external_key[guid("evt-0002")] == 0


async def cancel_raw(url: str, **parameters: str) -> httpx.Response:
    """CancelProdnOrdConf called as any OData client calls it (token fetched first)."""
    auth = httpx.BasicAuth(USER, PASSWORD)
    async with httpx.AsyncClient(base_url=url + CONFIRMATION_SERVICE, auth=auth) as client:
        token = (await client.get("/", headers={"x-csrf-token": "Fetch"})).headers["x-csrf-token"]
        return await client.post(
            "/CancelProdnOrdConf", params=parameters, headers={"x-csrf-token": token}
        )


@pytest.mark.parametrize(
    ("parameters", "said"),
    [
        (
            {"ConfirmationGroup": None},
            "Parameter 'ConfirmationGroup' of 'CancelProdnOrdConf' is missing",
        ),
        ({"ConfirmationGroup": "0000000001"}, "not an Edm.String"),
        ({"ConfirmationGroup": "'00000000001'"}, "longer than MaxLength 10"),
        ({"PostingDate": "'2026-03-03'"}, "not an Edm.DateTime"),
        ({"ExternalSystemConfirmation": "guid'mes-hub'"}, "Edm.Guid must be a string"),
        ({"Reason": "'scrap'"}, "Parameter 'Reason' is not defined for 'CancelProdnOrdConf'"),
        ({}, "Confirmation 0000000001/00000001 has already been cancelled"),
        ({"ConfirmationCount": "'00000002'"}, "is a cancellation; it cannot be cancelled"),
        ({"ConfirmationCount": "'00000009'"}, "Confirmation 0000000001/00000009 does not exist"),
    ],
)
async def test_the_stand_in_cancels_as_the_function_import_says(
    s4: tuple[FastAPI, str], parameters: dict[str, str | None], said: str
) -> None:
    app, url = s4
    assert (await post_raw(url, VALID)).status_code == 201
    keys = {"ConfirmationGroup": "'0000000001'", "ConfirmationCount": "'00000001'"}
    first = await cancel_raw(url, **keys)
    assert first.status_code == 200
    reversal = first.json()["d"]
    assert reversal["IsReversal"] and reversal["ConfirmationCount"] == "00000002"
    assert app.state.confirmations[0]["IsReversed"]

    given = {**keys, **parameters}  # None: left out
    refused = await cancel_raw(url, **{k: v for k, v in given.items() if v is not None})
    assert refused.status_code == 400 and said in refused.json()["error"]["message"]["value"]
    assert len(app.state.confirmations) == 2


# --- orders in ---------------------------------------------------------------------------------


def production_order(app: FastAPI, number: str, changed: str, **properties: Any) -> None:
    add_production_order(
        app,
        **{
            "ManufacturingOrder": number,
            "Material": "FG-BRACKET-01",
            "ProductionPlant": "1010",
            "TotalQuantity": "250.000",
            "MfgOrderScheduledEndDate": ms("2026-03-10"),
            "MfgOrderScheduledEndTime": "PT16H00M00S",
            "CustomerName": "ACME Corp",
            "OrderIsReleased": "X",
            "OrderIsDeleted": "",
            "OrderIsMarkedForDeletion": "",
            "LastChangeDateTime": changed,
            **properties,
        },
    )


async def test_sap_orders_are_released_changed_and_cancelled(
    s4: tuple[FastAPI, str], secret_file: Path, tmp_path: Path
) -> None:
    app, url = s4
    production_order(app, "1000123", "20260302060000")
    production_order(app, "1000124", "20260302060000", OrderIsReleased="")  # created only
    orders = sap.order_source(entry(url, secret_file, plant="1010"), tmp_path / "erp")
    assert orders is not None

    events, cursor = await orders.changes(None)
    assert [(e.type, e.subject) for e in events] == [("mes.erp.order.released.v1", "1000123")]
    assert events[0].data == {
        "order_id": "1000123",
        "part_number": "FG-BRACKET-01",
        "quantity": 250,
        "due": "2026-03-10T15:00:00Z",  # 16:00 in Berlin
        "customer": "ACME Corp",
    }
    assert events[0].time == T0
    assert app.state.order_queries[-1]["$filter"] == "ProductionPlant eq '1010'"

    first, second = app.state.production_orders
    first.update(TotalQuantity="300.000", LastChangeDateTime="20260302070000")
    second.update(OrderIsReleased="X", LastChangeDateTime="20260302070500")
    events, cursor = await orders.changes(cursor)
    assert app.state.order_queries[-1]["$filter"] == (
        "LastChangeDateTime ge '20260302060000' and ProductionPlant eq '1010'"
    )
    assert [(e.type.split(".")[-2], e.subject) for e in events] == [
        ("changed", "1000123"),
        ("released", "1000124"),
    ]
    assert events[0].data == {"order_id": "1000123", "quantity": 300}

    first.update(OrderIsMarkedForDeletion="X", LastChangeDateTime="20260302080000")
    events, cursor = await orders.changes(cursor)
    assert [(e.type.split(".")[-2], e.subject) for e in events] == [("cancelled", "1000123")]
    for event in events:
        validate_envelope(event)
    assert cursor is not None and cursor.startswith("20260302080000#")


# --- the [[erp]] entry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        ({"secret": "s4-inline-password"}, "never written in the config"),
        ({"user": None}, "key 'erp[0].user'"),
        ({"timezone": "Mars/Olympus"}, "key 'erp[0].timezone'"),
        ({"operation": "00010"}, "key 'erp[0].operation'"),
        ({"client": "1"}, "key 'erp[0].client'"),
    ],
)
def test_a_bad_sap_entry_is_refused_naming_the_key(keys: dict[str, Any], said: str) -> None:
    raw = raw_entry("https://s4.example", Path("/run/secrets/s4"))
    for key, value in keys.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    with pytest.raises(ErpConfigError) as failed:
        erp_section([raw], "mes-hub.toml", env={})
    assert said in str(failed.value) and "s4-inline-password" not in str(failed.value)


def test_no_sap_sources_when_switched_off(secret_file: Path) -> None:
    quiet = entry("https://s4.example", secret_file, poll_interval_s=0, confirm=False)
    assert sap.order_source(quiet) is None and sap.confirmation_sender(quiet) is None
