"""The B2MML dialect against real B2MML: the Courbon messages and MESA's schemas in
``../shared/fixtures/b2mml`` (read there, never copied), a watched folder on disk, and a
receiver on loopback for confirmations POSTed."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import xmlschema
from fastapi import FastAPI, Request, Response
from lxml import etree

from adapters.erp import b2mml, config
from adapters.erp.b2mml import (
    NotASchedule,
    NotWellFormed,
    Unmappable,
    operations_performance,
    order_token,
    parse_schedule,
)
from adapters.erp.base import Confirmation
from adapters.erp.config import confirmation_sender, erp_section
from contracts import OrderReleasedV1, decode_event, encode_event
from hub.outbox import DeliveryFailed
from tests.conftest import fixtures_dir
from tests.erp_standins import served

SOURCE = "urn:mes-hub:erp:b2mml-test"
RECEIVED = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
COURBON = "PRO-20121210181416-27942.xml"
V0401_NS = "http://www.wbf.org/xml/B2MML-V0401"
V0600_NS = "http://www.mesa.org/xml/B2MML-V0600"
REQUEST = "ProcessProductionSchedule/DataArea/ProductionSchedule/ProductionRequest"


def b2mml_fixtures() -> Path:
    root = fixtures_dir()
    if root is None or not (root / "b2mml").is_dir():
        pytest.skip("../shared/fixtures/b2mml is absent (CI has it): no real B2MML to read")
    return root / "b2mml"


@pytest.fixture(scope="module")
def performance_schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(
        str(b2mml_fixtures() / "schema_v0701" / "B2MML-OperationsPerformance.xsd")
    )


def courbon() -> bytes:
    return (b2mml_fixtures() / "examples_v0401" / COURBON).read_bytes()


def parse(document: bytes, **options: Any) -> list[Any]:
    return parse_schedule(
        document,
        source=SOURCE,
        received_at=RECEIVED,
        options=b2mml.ParseOptions(**options),
    )


# --- schedules in ------------------------------------------------------------------------------


def test_the_courbon_schedule_imports_as_a_released_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    document = courbon()
    schema = xmlschema.XMLSchema(
        str(b2mml_fixtures() / "schema_v0401" / "B2MML-V0401-ProductionSchedule.xsd")
    )
    assert schema.is_valid(document.decode("utf-8-sig"))  # real B2MML, as SOURCE.txt says

    with caplog.at_level(logging.INFO, logger="adapters.erp.b2mml"):
        events = parse(document)

    [event] = events
    assert event.type == "mes.erp.order.released.v1"
    assert event.subject == "258456"
    assert event.source == SOURCE
    # ApplicationArea/CreationDateTime is the event time; with no EndTime anywhere the order
    # is due the default 7 days after the message.
    assert event.time == datetime(2009, 12, 10, 17, 14, 16, tzinfo=UTC)
    assert event.data == {
        "order_id": "258456",
        "part_number": "SO1215",  # the MaterialRequirement whose MaterialUse is Produced
        "quantity": 1,  # <QuantityString>1.000</QuantityString> (KG): a whole number
        "due": "2009-12-17T17:14:16Z",
    }
    # releaseID="" is accepted and said once; the missing EndTime is said too.
    release_lines = [r for r in caplog.records if "releaseID" in r.getMessage()]
    assert len(release_lines) == 1
    assert "line 2" in release_lines[0].getMessage()
    assert any("has no EndTime" in r.getMessage() for r in caplog.records)
    # A contract event, and the same file gives the same event again.
    assert decode_event(encode_event(event)).data == OrderReleasedV1(**event.data)
    assert [e.id for e in parse(document)] == [event.id]


def test_the_other_courbon_messages_are_not_schedules() -> None:
    performance = b2mml_fixtures() / "examples_v0401" / "PES-20121229115825-53107.xml"
    with pytest.raises(NotASchedule) as refused:
        parse(performance.read_bytes())
    assert refused.value.element == "SyncProductionPerformance"
    assert refused.value.line == 2


OPERATIONS_SCHEDULE = """<?xml version="1.0" encoding="UTF-8"?>
<SyncOperationsSchedule xmlns="http://www.mesa.org/xml/B2MML" releaseID="V0701">
  <ApplicationArea>
    <CreationDateTime>2026-03-01T18:00:00+01:00</CreationDateTime>
    <BODID>ERP-4711</BODID>
  </ApplicationArea>
  <DataArea>
    <Sync/>
    <OperationsSchedule>
      <ID>WEEK-10</ID>
      <OperationsRequest>
        <ID>SO 4711/10</ID>
        <EndTime>2026-03-06T16:00:00+01:00</EndTime>
        <OperationsType>Production</OperationsType>
        <RequestState>Released</RequestState>
        <SegmentRequirement>
          <ID>0010</ID>
          <ProcessSegmentID>MILL</ProcessSegmentID>
          <OperationsDefinitionID>BRACKET-A</OperationsDefinitionID>
          <OperationsSegmentID>0010</OperationsSegmentID>
          <EquipmentRequirement>
            <ID>1</ID>
            <EquipmentID>CNC-07</EquipmentID>
          </EquipmentRequirement>
          <MaterialRequirement>
            <ID>1</ID>
            <MaterialDefinitionID>BRACKET-A</MaterialDefinitionID>
            <MaterialUse>Produced</MaterialUse>
            <Quantity>
              <QuantityString>250</QuantityString>
              <DataType>integer</DataType>
              <UnitOfMeasure>EA</UnitOfMeasure>
            </Quantity>
          </MaterialRequirement>
          <MaterialRequirement>
            <ID>2</ID>
            <MaterialDefinitionID>AL-BAR-40</MaterialDefinitionID>
            <MaterialUse>Consumed</MaterialUse>
            <Quantity><QuantityString>12.5</QuantityString></Quantity>
          </MaterialRequirement>
        </SegmentRequirement>
      </OperationsRequest>
      <OperationsRequest>
        <ID>SO-4712</ID>
        <RequestState>Cancelled</RequestState>
        <SegmentRequirement>
          <ID>0010</ID>
          <ProcessSegmentID>MILL</ProcessSegmentID>
          <OperationsDefinitionID>BRACKET-B</OperationsDefinitionID>
          <OperationsSegmentID>0010</OperationsSegmentID>
        </SegmentRequirement>
      </OperationsRequest>
    </OperationsSchedule>
  </DataArea>
</SyncOperationsSchedule>
"""


def test_a_v0701_operations_schedule_releases_and_cancels() -> None:
    schema = xmlschema.XMLSchema(
        str(b2mml_fixtures() / "schema_v0701" / "B2MML-OperationsSchedule.xsd")
    )
    schema.validate(OPERATIONS_SCHEDULE)  # the test's document is real V0701

    released, cancelled = parse(OPERATIONS_SCHEDULE.encode())

    order_id = order_token("SO 4711/10")
    assert order_id.startswith("SO_4711_10-") and len(order_id) == len("SO_4711_10-") + 8
    assert released.type == "mes.erp.order.released.v1"
    assert released.subject == order_id
    assert released.model_extra == {"erpid": "SO 4711/10"}  # the ERP's own id, kept
    assert released.time == datetime(2026, 3, 1, 17, 0, tzinfo=UTC)
    assert released.data == {
        "order_id": order_id,
        "part_number": "BRACKET-A",
        "quantity": 250,
        "due": "2026-03-06T16:00:00+01:00",
        "machine_id": "CNC-07",
    }
    assert cancelled.type == "mes.erp.order.cancelled.v1"
    assert cancelled.data == {"order_id": "SO-4712", "reason": "B2MML request state Cancelled"}


def test_a_sync_that_deletes_cancels_and_a_forecast_is_not_released() -> None:
    deleting = OPERATIONS_SCHEDULE.replace(
        "<Sync/>",
        '<Sync><ActionCriteria><ActionExpression actionCode="Delete"/></ActionCriteria></Sync>',
    )
    assert [e.type for e in parse(deleting.encode())] == ["mes.erp.order.cancelled.v1"] * 2

    forecast = OPERATIONS_SCHEDULE.replace(
        "<RequestState>Released</RequestState>", "<RequestState>Forecast</RequestState>"
    ).replace(
        "<RequestState>Cancelled</RequestState>",
        '<RequestState OtherValue="Cancelled">Other</RequestState>',
    )
    [cancelled] = parse(forecast.encode())
    assert cancelled.data == {"order_id": "SO-4712", "reason": "B2MML request state Cancelled"}


def v0600_schedule(end_time: str = "2026-03-06T16:00:00Z", verb: str = "Process") -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<{verb}ProductionSchedule xmlns="{V0600_NS}" releaseID="V0600">
  <ApplicationArea><CreationDateTime>2026-03-01T17:00:00Z</CreationDateTime></ApplicationArea>
  <DataArea>
    <{verb}/>
    <ProductionSchedule>
      <ProductionRequest>
        <ID>PR-600</ID>
        <EndTime>{end_time}</EndTime>
        <SegmentRequirement>
          <ID>10</ID>
          <EquipmentRequirement><EquipmentID>LATHE-2</EquipmentID></EquipmentRequirement>
          <MaterialRequirement>
            <MaterialDefinitionID>SHAFT-9</MaterialDefinitionID>
            <MaterialUse>Produced</MaterialUse>
            <Quantity>
              <QuantityString>40</QuantityString>
              <DataType>integer</DataType>
              <UnitOfMeasure>EA</UnitOfMeasure>
            </Quantity>
          </MaterialRequirement>
        </SegmentRequirement>
      </ProductionRequest>
    </ProductionSchedule>
  </DataArea>
</{verb}ProductionSchedule>
"""


def test_a_v0600_production_schedule_imports() -> None:
    # The fixtures hold no V0600 schema: this document uses only what V0600 kept from V0401,
    # so in the V0401 namespace it validates against the V0401 schema.
    schema = xmlschema.XMLSchema(
        str(b2mml_fixtures() / "schema_v0401" / "B2MML-V0401-ProductionSchedule.xsd")
    )
    schema.validate(v0600_schedule().replace(V0600_NS, V0401_NS))

    [event] = parse(v0600_schedule().encode())

    assert event.data == {
        "order_id": "PR-600",
        "part_number": "SHAFT-9",
        "quantity": 40,
        "due": "2026-03-06T16:00:00Z",
        "machine_id": "LATHE-2",
    }
    [cancelled] = parse(v0600_schedule(verb="Cancel").encode())
    assert cancelled.type == "mes.erp.order.cancelled.v1"


def test_an_end_time_without_offset_needs_the_entry_timezone() -> None:
    naive = v0600_schedule(end_time="2026-03-06T16:00:00").encode()
    with pytest.raises(Unmappable) as refused:
        parse(naive)
    assert refused.value.element == f"{REQUEST}/EndTime"
    assert refused.value.line == 9
    assert "no UTC offset" in refused.value.reason and "timezone" in refused.value.reason

    [event] = parse(naive, timezone="Europe/Paris")
    assert event.data["due"] == "2026-03-06T16:00:00+01:00"  # Paris in winter: UTC+1


def test_a_document_that_is_not_well_formed_names_the_line() -> None:
    broken = v0600_schedule().replace("</ID>", "</Id>", 1).encode()
    with pytest.raises(NotWellFormed) as refused:
        parse(broken)
    assert refused.value.line == 8
    assert refused.value.element == f"{REQUEST}/ID"  # the element open where it broke
    assert str(refused.value).startswith(f"line 8, {REQUEST}/ID: not well-formed XML")


def test_what_cannot_be_mapped_is_refused_naming_element_and_line() -> None:
    no_id = v0600_schedule().replace("<ID>PR-600</ID>", "").encode()
    with pytest.raises(Unmappable) as refused:
        parse(no_id)
    assert refused.value.element == REQUEST
    assert refused.value.line == 7
    assert "no ID" in refused.value.reason

    fraction = v0600_schedule().replace(">40<", ">12.5<").encode()
    with pytest.raises(Unmappable) as refused:
        parse(fraction)
    assert refused.value.element == (
        f"{REQUEST}/SegmentRequirement/MaterialRequirement/Quantity/QuantityString"
    )
    assert refused.value.line == 17
    assert "whole number" in refused.value.reason

    nothing_produced = v0600_schedule().replace(">Produced<", ">Consumed<").encode()
    with pytest.raises(Unmappable, match="no part number and no quantity"):
        parse(nothing_produced)


def test_a_doctype_is_refused() -> None:
    evil = (
        b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n<x>&e;</x>'
    )
    with pytest.raises(NotWellFormed, match="DOCTYPE"):
        parse(evil)


# --- the watched folder ------------------------------------------------------------------------


def order_source(state_dir: Path, found: b2mml.Entry) -> Any:
    return config.order_source(found, state_dir)


def entry(tmp_path: Path, **keys: Any) -> b2mml.Entry:
    raw = {"name": "b2mml-test", "dialect": "b2mml", "settle_s": 0, **keys}
    [found] = erp_section([raw], "mes-hub.toml", env={})
    assert isinstance(found, b2mml.Entry)
    return found


async def test_the_watched_folder_imports_good_files_and_sets_bad_ones_aside(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / COURBON).write_bytes(courbon())
    (inbox / "broken.xml").write_bytes(b"<?xml version='1.0'?>\n<SyncProductionSchedule>\n<a>\n")
    no_quantity = v0600_schedule().replace("<QuantityString>40</QuantityString>", "")
    (inbox / "no-quantity.xml").write_text(no_quantity)
    (inbox / "notes.txt").write_text("not ours")
    source = order_source(tmp_path, entry(tmp_path, folder=str(inbox), confirm=False))
    assert isinstance(source, b2mml.FolderOrders)

    events, cursor = await source.changes(None)

    assert [(e.type, e.subject) for e in events] == [("mes.erp.order.released.v1", "258456")]
    assert sorted(p.name for p in (inbox / "error").iterdir()) == [
        "broken.xml",
        "broken.xml.error",
        "no-quantity.xml",
        "no-quantity.xml.error",
    ]
    broken_note = (inbox / "error" / "broken.xml.error").read_text()
    assert broken_note.startswith("line 4, SyncProductionSchedule/a: not well-formed XML")
    quantity_note = (inbox / "error" / "no-quantity.xml.error").read_text()
    assert quantity_note.startswith(f"line 13, {REQUEST}/SegmentRequirement/MaterialRequirement: ")
    assert "no Quantity/QuantityString" in quantity_note
    # The imported file stays until the next call says its events were published …
    assert (inbox / COURBON).exists() and (inbox / "notes.txt").exists()

    again, cursor = await source.changes(cursor)

    # … and is then in done/, read once: nothing new, nothing retried.
    assert again == [] and cursor is None
    assert not (inbox / COURBON).exists()
    assert (inbox / "done" / COURBON).read_bytes() == courbon()
    assert (await source.changes(cursor)) == ([], None)


async def test_a_file_read_again_before_its_cursor_gives_the_same_events(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "a.xml").write_text(v0600_schedule())
    source = order_source(tmp_path, entry(tmp_path, folder=str(inbox), confirm=False))
    assert source is not None

    first, _ = await source.changes(None)  # published, then the hub stopped before the cursor
    second, cursor = await source.changes(None)

    assert [e.id for e in second] == [e.id for e in first]
    # A file replaced under the same name is not taken for the one that was read.
    (inbox / "a.xml").write_text(v0600_schedule().replace(">40<", ">41<"))
    changed, cursor = await source.changes(cursor)
    assert [e.data["quantity"] for e in changed] == [41]
    assert (inbox / "a.xml").exists()


async def test_a_file_still_being_written_is_left_for_later(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "half.xml").write_text("<?xml version='1.0'?>\n<SyncProductionSchedule")
    source = order_source(tmp_path, entry(tmp_path, folder=str(inbox), confirm=False, settle_s=60))
    assert source is not None
    assert await source.changes(None) == ([], None)
    assert (inbox / "half.xml").exists()


# --- confirmations out -------------------------------------------------------------------------


CHECKPOINT = "mes-hub/default 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="


def confirmation(key: str = "0f3c9a2e-confirmation-1", **fields: Any) -> Confirmation:
    values: dict[str, Any] = {
        "key": key,
        "order_id": "SO-4711",
        "sequence": 2,
        "machine_id": "CNC-07",
        "operation": "0010",
        "yield_quantity": 240,
        "scrap_quantity": 10,
        "start": datetime(2026, 3, 2, 6, 0, tzinfo=UTC),
        "end": datetime(2026, 3, 2, 13, 30, tzinfo=UTC),
        "final": True,
        "correction_of": None,
        "posted_at": datetime(2026, 3, 2, 13, 31, tzinfo=UTC),
        **fields,
    }
    return Confirmation(**values)


def test_the_confirmation_is_a_valid_v0701_sync_operations_performance(
    performance_schema: xmlschema.XMLSchema,
) -> None:
    document = operations_performance(confirmation(), receiver="b2mml-test")
    performance_schema.validate(document.decode())

    root = etree.fromstring(document)
    ns = {"b": b2mml.V0701}
    assert root.tag == f"{{{b2mml.V0701}}}SyncOperationsPerformance"
    assert root.findtext("b:ApplicationArea/b:BODID", namespaces=ns) == "0f3c9a2e-confirmation-1"
    response = root.find("b:DataArea/b:OperationsPerformance/b:OperationsResponse", ns)
    assert response is not None
    assert response.findtext("b:OperationsRequestID", namespaces=ns) == "SO-4711"
    segment = response.find("b:SegmentResponse", ns)
    assert segment is not None
    assert segment.findtext("b:ActualStartTime", namespaces=ns) == "2026-03-02T06:00:00Z"
    assert segment.findtext("b:ActualEndTime", namespaces=ns) == "2026-03-02T13:30:00Z"
    assert segment.findtext("b:EquipmentActual/b:EquipmentID", namespaces=ns) == "CNC-07"
    quantities = {
        m.findtext("b:ID", namespaces=ns): m.findtext("b:Quantity/b:QuantityString", namespaces=ns)
        for m in segment.findall("b:MaterialActual", ns)
    }
    assert quantities == {"good": "240", "scrap": "10"}

    # The hub's audit checkpoint is one more SegmentData (a string): valid too.
    with_checkpoint = operations_performance(confirmation(checkpoint=CHECKPOINT))
    performance_schema.validate(with_checkpoint.decode())
    data = {
        item.findtext("b:ID", namespaces=ns): item.findtext("b:Value/b:ValueString", namespaces=ns)
        for item in etree.fromstring(with_checkpoint).iterfind(".//b:SegmentData", ns)
    }
    assert data == {"Sequence": "2", "Final": "true", "AuditCheckpoint": CHECKPOINT}
    assert "AuditCheckpoint" not in document.decode()  # (none signed: none)

    # A correction (negative yield, no machine, no times, in the plant's zone) is valid too.
    correction = confirmation(
        yield_quantity=-3, correction_of=1, machine_id=None, start=None, end=None, final=False
    )
    performance_schema.validate(
        operations_performance(correction, timezone="Europe/Paris").decode()
    )


def test_the_schema_check_bites(performance_schema: xmlschema.XMLSchema) -> None:
    root = etree.fromstring(operations_performance(confirmation()))
    ns = {"b": b2mml.V0701}
    segment_id = root.find(".//b:SegmentResponse/b:ID", ns)
    assert segment_id is not None
    segment_id.getparent().remove(segment_id)  # SegmentResponse/ID is required
    broken = etree.tostring(root).decode()

    assert not performance_schema.is_valid(broken)
    with pytest.raises(xmlschema.XMLSchemaValidationError, match="SegmentResponse"):
        performance_schema.validate(broken)


async def test_the_outbox_folder_is_idempotent_by_key(
    tmp_path: Path, performance_schema: xmlschema.XMLSchema
) -> None:
    outbox = tmp_path / "out"
    sender = confirmation_sender(entry(tmp_path, outbox_folder=str(outbox)))
    assert isinstance(sender, b2mml.B2mmlSender)

    first = await sender.send(confirmation())
    written = (outbox / "0f3c9a2e-confirmation-1.xml").read_bytes()
    again = await sender.send(confirmation())  # a retry: the same file, the same content
    other = await sender.send(confirmation(key="urn:mes-hub/2", sequence=3))

    assert first.excerpt == again.excerpt == "written to 0f3c9a2e-confirmation-1.xml"
    assert (outbox / "0f3c9a2e-confirmation-1.xml").read_bytes() == written
    names = sorted(os.listdir(outbox))
    assert names == sorted(["0f3c9a2e-confirmation-1.xml", f"{order_token('urn:mes-hub/2')}.xml"])
    assert other.excerpt == f"written to {order_token('urn:mes-hub/2')}.xml"
    performance_schema.validate(written.decode())
    await sender.close()


class Receiver:
    """A B2MML receiver on loopback: keeps what it is sent, answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.app = FastAPI()
        self.app.post("/b2mml")(self.receive)

    async def receive(self, request: Request) -> Response:
        self.bodies.append(await request.body())
        self.headers.append(dict(request.headers))
        return Response(f"<Ack status='{self.status}'/>", self.status, media_type="application/xml")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield Receiver()


async def test_confirmations_are_posted_as_application_xml(
    tmp_path: Path,
    receiver: Receiver,
    performance_schema: xmlschema.XMLSchema,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("B2MML_TOKEN", "t0ken-never-shown")
    async with served(receiver.app) as base:
        keys = {"url": f"{base}/b2mml", "allow": ["127.0.0.1"], "secret": {"env": "B2MML_TOKEN"}}
        sender = confirmation_sender(entry(tmp_path, **keys))
        assert sender is not None

        delivered = await sender.send(confirmation(checkpoint=CHECKPOINT))
        assert (delivered.status, delivered.duplicate) == (200, False)
        assert receiver.headers[0]["content-type"].startswith("application/xml")
        assert receiver.headers[0]["authorization"] == "Bearer t0ken-never-shown"
        assert receiver.headers[0]["mes-hub-checkpoint"] == CHECKPOINT
        assert CHECKPOINT in receiver.bodies[0].decode()
        performance_schema.validate(receiver.bodies[0].decode())

        receiver.status = 409  # the receiver had that BODID already
        assert (await sender.send(confirmation())).duplicate

        outcomes = {}
        for status in (400, 401, 429, 503):
            receiver.status = status
            with pytest.raises(DeliveryFailed) as failed:
                await sender.send(confirmation())
            outcomes[status] = failed.value.permanent
            assert "t0ken" not in failed.value.reason
        assert outcomes == {400: True, 401: False, 429: False, 503: False}
        await sender.close()

    # Gone: retried later, not refused for good.
    with pytest.raises(DeliveryFailed) as failed:
        await sender.send(confirmation())
    assert not failed.value.permanent
    await sender.close()


async def test_an_internal_url_not_allowed_is_not_called(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with served(receiver.app) as base:
        sender = confirmation_sender(entry(tmp_path, url=f"{base}/b2mml"))  # no allow
        assert sender is not None
        with pytest.raises(DeliveryFailed, match="internal address") as failed:
            await sender.send(confirmation())
        assert not failed.value.permanent
        assert receiver.bodies == []
        await sender.close()


def test_the_entry_says_where_confirmations_go(tmp_path: Path) -> None:
    from adapters.erp.config import ErpConfigError

    with pytest.raises(ErpConfigError, match=r"url \(HTTP POST\) or outbox_folder"):
        entry(tmp_path)
    with pytest.raises(ErpConfigError, match="not both"):
        entry(tmp_path, url="https://esb.example/b2mml", outbox_folder=str(tmp_path))
    with pytest.raises(ErpConfigError, match="IANA"):
        entry(tmp_path, confirm=False, timezone="Mars/Olympus")
    quiet = entry(tmp_path, confirm=False)
    assert order_source(tmp_path, quiet) is None and confirmation_sender(quiet) is None
    assert json.loads(quiet.model_dump_json())["dialect"] == "b2mml"
    assert timedelta(days=7) == quiet.options().due_if_missing


# --- POST /api/v1/erp/b2mml over a real hub --------------------------------------------------


async def test_a_schedule_posted_to_the_api_releases_its_order(hub: Any) -> None:
    from tests.conftest import api_client, api_key, eventually

    erp = {"Authorization": f"Bearer {api_key('erp')}", "Content-Type": "application/xml"}
    async with api_client(hub) as http:
        taken = await http.post("/api/v1/erp/b2mml", content=courbon(), headers=erp)
        assert taken.status_code == 202, taken.text
        (receipt,) = taken.json()
        assert receipt["subject"] == "mes.default.erp.order.258456.released"
        again = await http.post("/api/v1/erp/b2mml", content=courbon(), headers=erp)
        assert again.json()[0]["id"] == receipt["id"]  # the same document, the same event
        operator = {**erp, "Authorization": f"Bearer {api_key('operator')}"}
        refused = await http.post("/api/v1/erp/b2mml", content=courbon(), headers=operator)
        assert refused.status_code == 403
        broken = await http.post(
            "/api/v1/erp/b2mml",
            content=b'<?xml version="1.0"?>\n<ProductionSchedule>\n  <ID>1</ID>\n<oops>',
            headers=erp,
        )
        assert broken.status_code == 400 and broken.headers["content-type"].startswith(
            "application/problem+json"
        )
        assert broken.json()["line"] == 4
        wrong_type = await http.post(
            "/api/v1/erp/b2mml", content=courbon(), headers={**erp, "Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 415
    await eventually(lambda: hub.store.order("default", "258456") is not None, timeout=30)
    order = hub.store.order("default", "258456")
    assert (order.part_number, order.quantity, order.status) == ("SO1215", 1, "released")
