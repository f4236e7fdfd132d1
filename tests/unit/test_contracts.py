"""Contract v1: what integrators can rely on, and the errors they get."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
from pydantic import AwareDatetime, FutureDatetime, NaiveDatetime, PastDatetime

from adapters.machines.shdr import ShdrConfig, ShdrParser
from contracts import (
    EVENT_TYPES,
    PARTNER_EVENT_TYPES,
    CloudEvent,
    ContractViolation,
    check_subject,
    decode_event,
    encode_event,
    export_json_schemas,
    nats_subject_for,
    partition_key,
)
from tests.conftest import T0, cloud_event
from tests.integration.test_shdr_adapter import MTCONNECT, okuma

# An NC program as a DNC sender reads it from its file, and the worked example of
# docs/contract.md: it went out whole, from 06:00:12 to the event's time (06:04:10).
PROGRAM = b"%\nO1234 (FLANGE REV C)\nG21 G90 G40\nT0101\nG97 S1200 M03\nM30\n%\n"
PROGRAM_SENT: dict[str, Any] = {
    "program": "O1234",
    "file": "programs/O1234-rev-C.nc",
    "sha256": hashlib.sha256(PROGRAM).hexdigest(),
    "size_bytes": len(PROGRAM),
    "sent_bytes": len(PROGRAM),
    "outcome": "completed",
    "started_at": "2026-03-02T05:56:02Z",
    "port": "/dev/ttyUSB0",
    "sent_by": "jdoe",
}

EXAMPLES = {
    "mes.machine.availability.v1": ("M1", {"availability": "AVAILABLE"}),
    "mes.machine.execution.v1": (
        "M1",
        {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O1"},
    ),
    "mes.machine.partcount.v1": ("M1", {"count": 12, "kind": "all"}),
    "mes.machine.condition.v1": ("M1", {"level": "fault", "native_code": "1010", "message": "x"}),
    "mes.machine.program_sent.v1": ("lathe-7", PROGRAM_SENT),
    "mes.operator.downtime_reason.v1": (
        "M1",
        {"reason": "mechanical/spindle", "start": "2026-03-02T06:00:00Z", "operator": "op1"},
    ),
    "mes.operator.order_started.v1": ("M1", {"order_id": "SO-1"}),
    "mes.operator.order_ended.v1": ("M1", {"order_id": "SO-1"}),
    "mes.operator.scrap.v1": ("M1", {"quantity": 2, "reason": "burr"}),
    "mes.erp.order.released.v1": (
        "SO-1",
        {
            "order_id": "SO-1",
            "part_number": "P-1",
            "quantity": 10,
            "due": "2026-03-09T00:00:00+01:00",
            "ideal_cycle_time_s": 42.5,
        },
    ),
    "mes.erp.order.changed.v1": ("SO-1", {"order_id": "SO-1", "quantity": 12}),
    "mes.erp.order.cancelled.v1": ("SO-1", {"order_id": "SO-1", "reason": "duplicate"}),
    "mes.hub.plant.configured.v1": (
        "default",
        {"plant": {"time_zone": "Europe/Berlin"}, "effective_from": "2026-03-01T00:00:00+01:00"},
    ),
    "mes.hub.delivery_forecast.changed.v1": (
        "SO-1",
        {
            "order_id": "SO-1",
            "status": "at_risk",
            "eta": "2026-03-04T09:30:00Z",
            "due": "2026-03-04T00:00:00Z",
            "remaining": 120,
            "effective_cycle_time_s": 63.5,
            "basis": "observed",
            "previous_status": "on_track",
            "previous_eta": "2026-03-03T21:00:00Z",
        },
    ),
    "mes.hub.order.progressed.v1": (
        "SO-1",
        {"order_id": "SO-1", "good": 392, "scrap": 3, "remaining": 108, "quantity": 500},
    ),
    "mes.hub.webhook.due.v1": (
        "SO-1",
        {
            "order_id": "SO-1",
            "sequence": 1,
            "event_id": "4d09f838a0edf9365e88c2554f54cad3",
            "event_type": "mes.order.started.v1",
            "event_time": "2026-03-02T06:00:00Z",
            "data": {"order_id": "SO-1", "machine_id": "M1", "started_at": "2026-03-02T06:00:00Z"},
            "endpoints": ["customer-c7"],
        },
    ),
    "mes.hub.webhooks.changed.v1": (
        "default",
        {
            "action": "endpoint_disabled",
            "partner_id": "C7",
            "endpoint_id": "c7-main",
            "by": "hub",
            "reason": "the endpoint answered 410 Gone",
        },
    ),
    "mes.hub.order.confirmation_due.v1": (
        "SO-1",
        {
            "order_id": "SO-1",
            "sequence": 2,
            "reason": "correction",
            "machine_id": "M1",
            "yield_quantity": -2,
            "scrap_quantity": 2,
            "start": "2026-03-02T06:00:00Z",
            "end": "2026-03-02T07:00:00Z",
            "final": False,
            "correction_of": 1,
            "yield_total": 8,
            "scrap_total": 2,
        },
    ),
    "mes.hub.delivery.attempted.v1": (
        "SO-1",
        {
            "order_id": "SO-1",
            "message_id": "4f1c0e6a9b2d4c3e8a7f6b5c4d3e2f1a",
            "destination": "erp-1",
            "attempt": 3,
            "outcome": "failed",
            "status_code": 503,
            "reason": "service unavailable",
            "excerpt": "<html>maintenance</html>",
            "next_attempt_at": "2026-03-02T07:00:04Z",
        },
    ),
}


def test_every_v1_type_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(EVENT_TYPES)


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_each_type_round_trips_and_travels_on_its_subject(type_name: str) -> None:
    subject, data = EXAMPLES[type_name]
    event = decode_event(encode_event(cloud_event(type_name, subject, data)))
    nats_subject = nats_subject_for("plant1", event)
    assert check_subject(nats_subject, event) == "plant1"
    assert partition_key(nats_subject) == subject
    assert nats_subject.endswith("." + EVENT_TYPES[type_name].kind)


def raw(**override: object) -> bytes:
    body: dict[str, object] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "urn:test",
        "type": "mes.machine.partcount.v1",
        "time": "2026-03-02T06:00:00Z",
        "subject": "M1",
        "data": {"count": 1, "kind": "all"},
    }
    body.update(override)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("message", "field", "words"),
    [
        (b"\xff\x00 not json", None, "not JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (raw(specversion="0.3"), "specversion", "not a CloudEvent"),
        (raw(time=None), "time", "Field required"),
        (raw(time="2026-03-02T06:00:00"), "time", "timezone"),
        # Seconds since 1970 as text, and ISO 8601 forms outside RFC 3339: what the exported
        # JSON Schemas refuse, the hub refuses too.
        (raw(time="1772431200"), "time", "RFC 3339"),
        (raw(time="2026-03-02 06:00:00+00:00"), "time", "RFC 3339"),
        (raw(time="2026-03-02T06:00+01:00"), "time", "RFC 3339"),
        (raw(time="2026-03-02T06:00:00+0100"), "time", "RFC 3339"),
        (raw(subject="M 1"), "subject", "pattern"),
        (raw(type="mes.machine.bogus.v1"), "type", "unknown event type"),
        (raw(data={"count": -1, "kind": "all"}), "data.count", "greater than or equal to 0"),
        (raw(data={"count": 1, "kind": "good"}), "data.kind", "'all' or 'bad'"),
        (raw(data={"count": 1, "kind": "all", "extra": 1}), "data.extra", "not permitted"),
        # Strict types (issue 8): never coerced, see tests/unit/test_edges.py for the rest.
        (raw(data={"count": "7", "kind": "all"}), "data.count", "valid integer"),
        (raw(hall={"number": 2}), "hall", "not an object"),
    ],
)
def test_rejections_name_the_field_and_the_rule(
    message: bytes, field: str | None, words: str
) -> None:
    with pytest.raises(ContractViolation) as caught:
        decode_event(message)
    assert caught.value.field == field
    assert words in caught.value.reason


def test_erp_order_id_must_equal_the_subject() -> None:
    body = raw(
        type="mes.erp.order.cancelled.v1",
        subject="SO-1",
        data={"order_id": "SO-2", "reason": "x"},
    )
    with pytest.raises(ContractViolation, match="differs from the CloudEvent subject"):
        decode_event(body)


def test_an_infinite_ideal_cycle_time_is_refused() -> None:
    body = raw(
        type="mes.erp.order.changed.v1", subject="SO-1", data={"order_id": "SO-1", "quantity": 1}
    ).replace(b'"quantity": 1', b'"ideal_cycle_time_s": Infinity')
    with pytest.raises(ContractViolation) as caught:
        decode_event(body)
    assert caught.value.field == "data.ideal_cycle_time_s"


def test_an_order_change_must_change_something() -> None:
    body = raw(type="mes.erp.order.changed.v1", subject="SO-1", data={"order_id": "SO-1"})
    with pytest.raises(ContractViolation, match="at least one field"):
        decode_event(body)


def test_subject_mismatch_is_refused() -> None:
    event = decode_event(raw())
    with pytest.raises(ContractViolation, match="subject mismatch"):
        check_subject("mes.default.machine.M2.partcount", event)
    with pytest.raises(ContractViolation, match="subject mismatch"):
        check_subject("mes.default.machine.M1.execution", event)
    with pytest.raises(ContractViolation, match="subject mismatch"):
        check_subject("mes.dlq.machine.M1.partcount", event)


def test_exported_schemas_validate_real_events_and_refuse_bad_ones(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path)
    assert len(written) == len(EVENT_TYPES) + len(PARTNER_EVENT_TYPES)
    for type_name, (subject, data) in EXAMPLES.items():
        schema = json.loads((tmp_path / f"{type_name}.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        good = json.loads(encode_event(cloud_event(type_name, subject, data)))
        jsonschema.validate(good, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "type": "mes.other.v1"}, schema)


# --- the exported schemas and event times (issue 10) ---------------------------------------------

NAIVE = "2026-01-01T10:00:00"
AWARE = ("2026-01-01T10:00:00Z", "2026-01-01T10:00:00.123456+01:00", "2026-01-01T10:00:00-05:30")


def exported(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name.removesuffix(".schema.json"): json.loads(path.read_text())
        for path in export_json_schemas(tmp_path)
    }


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


DATETIMES = (datetime, AwareDatetime, NaiveDatetime, PastDatetime, FutureDatetime)


def is_datetime(annotation: object) -> bool:
    return annotation in DATETIMES or any(is_datetime(a) for a in get_args(annotation))


def time_fields() -> Iterator[tuple[str, str]]:
    """(type, JSON path) of every datetime field of the envelope and the v1 data models."""
    for type_name, event_type in EVENT_TYPES.items():
        for name, field in CloudEvent.model_fields.items():
            if is_datetime(field.annotation):
                yield type_name, name
        for name, field in event_type.data_model.model_fields.items():
            if is_datetime(field.annotation):
                yield type_name, f"data.{name}"


def test_every_time_in_the_exported_schemas_requires_an_offset(tmp_path: Path) -> None:
    """``"format": "date-time"`` alone passes a naive time (validators do not assert formats by
    default): each datetime field of the models has a pattern that requires the offset."""
    schemas = exported(tmp_path)
    found = list(time_fields())
    assert ("mes.machine.partcount.v1", "time") in found
    assert ("mes.operator.downtime_reason.v1", "data.end") in found
    assert ("mes.hub.delivery_forecast.changed.v1", "data.previous_eta") in found
    for type_name, path in found:
        node = schemas[type_name]
        for key in path.split("."):
            node = node["properties"][key]
        (string,) = [s for s in node.get("anyOf", [node]) if s.get("type") == "string"]
        assert string["format"] == "date-time", (type_name, path)
        assert not re.search(string["pattern"], NAIVE), (type_name, path)
        assert all(re.search(string["pattern"], aware) for aware in AWARE), (type_name, path)


@pytest.mark.parametrize(
    ("type_name", "subject", "data", "path"),
    [
        ("mes.machine.partcount.v1", "M1", {"count": 1, "kind": "all"}, "time"),
        (
            "mes.operator.downtime_reason.v1",
            "M1",
            {"reason": "mechanical/spindle", "start": "?", "operator": "op1"},
            "data.start",
        ),
        (
            "mes.erp.order.released.v1",
            "SO-1",
            {"order_id": "SO-1", "part_number": "P-1", "quantity": 10, "due": "?"},
            "data.due",
        ),
    ],
)
def test_the_schemas_refuse_a_naive_time_as_the_hub_does(
    type_name: str, subject: str, data: dict[str, Any], path: str, tmp_path: Path
) -> None:
    check = validator(exported(tmp_path)[type_name])

    def event(at: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "specversion": "1.0", "id": "e-1", "source": "urn:test", "type": type_name,
            "time": "2026-01-01T10:00:00Z", "subject": subject, "data": dict(data),
        }  # fmt: skip
        if path == "time":
            body["time"] = at
        else:
            body["data"][path.removeprefix("data.")] = at
        return body

    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        check.validate(event(NAIVE))
    with pytest.raises(ContractViolation, match="timezone"):
        decode_event(json.dumps(event(NAIVE)).encode())
    for aware in AWARE:
        check.validate(event(aware))
        decode_event(json.dumps(event(aware)).encode())


def produced_events() -> Iterator[CloudEvent]:
    """Events as the hub's producers make them: the simulator's factory (machines, operators,
    ERP), the hub's own (plant configuration, delivery forecasts), and the SHDR adapter reading
    the real Okuma capture (when ../shared/fixtures is here)."""
    from adapters.machines.simulator import SimulatorConfig, factory_events
    from hub.domain import Order, Origin
    from projections.processes.forecast_watch import FORECAST_TYPE, forecast_change
    from projections.rules.forecast import Forecast
    from projections.rules.hub_events import hub_event
    from projections.rules.plant import PlantConfig
    from projections.rules.plant_history import configuration_event

    yield from itertools.islice(factory_events(SimulatorConfig(machines=3, start=T0)), 5000)
    plant = PlantConfig(effective_from=T0)
    configured = configuration_event("default", None, plant, T0)
    assert configured is not None
    yield configured
    order = Order(site="default", order_id="SO-1")
    order.release(Origin("e1", "erp", T0), {"quantity": 10, "due": T0 + timedelta(days=1)})
    forecasts = [
        Forecast(T0 + timedelta(hours=30), "at_risk", 63.5, "observed"),
        Forecast(T0 + timedelta(hours=2), "done", None, "ideal"),
    ]
    for n, expected in enumerate(forecasts, start=1):
        data = forecast_change(order, expected, 4, timedelta(0))
        assert data is not None
        yield hub_event("default", "delivery-forecast", FORECAST_TYPE, f"f{n}", "SO-1", T0, data)
        order.record_delivery_forecast(Origin(f"f{n}", "hub", T0), data)
    capture = MTCONNECT / "demo_agent_okuma_shdr.txt"
    if capture.is_file():
        parser = ShdrParser(ShdrConfig(host="okuma", **okuma()))  # type: ignore[arg-type]
        for line in capture.read_text().splitlines():
            yield from parser.feed(line)


def test_the_exported_schemas_accept_the_events_the_hub_produces(tmp_path: Path) -> None:
    checks = {name: validator(schema) for name, schema in exported(tmp_path).items()}
    seen: set[str] = set()
    for event in produced_events():
        checks[event.type].validate(json.loads(encode_event(event)))
        seen.add(event.type)
    assert seen >= {
        "mes.machine.availability.v1", "mes.machine.execution.v1", "mes.machine.partcount.v1",
        "mes.machine.condition.v1", "mes.operator.downtime_reason.v1",
        "mes.erp.order.released.v1", "mes.hub.plant.configured.v1",
        "mes.hub.delivery_forecast.changed.v1",
    }  # fmt: skip


# --- mes.machine.program_sent.v1 (issue 15: DNC drip feed) ----------------------------------------


def program_sent(at: str = "2026-03-02T06:00:00Z", **data: object) -> bytes:
    """The worked example (sent at T0), with ``data`` changed; a value None leaves it out."""
    changed = {k: v for k, v in {**PROGRAM_SENT, **data}.items() if v is not None}
    return raw(type="mes.machine.program_sent.v1", subject="lathe-7", time=at, data=changed)


def test_a_program_sent_whole_or_stopped_part_way_is_taken() -> None:
    whole = decode_event(program_sent())
    assert whole.data == EVENT_TYPES["mes.machine.program_sent.v1"].data_model(**PROGRAM_SENT)
    # A cancel after 40 bytes: the control holds a partial program, which the message says.
    stopped = decode_event(
        program_sent(
            sent_bytes=40,
            outcome="cancelled",
            message="cancelled by the operator (Ctrl-C); the control holds a partial O1234",
        )
    )
    assert (stopped.data.sent_bytes, stopped.data.outcome) == (40, "cancelled")  # type: ignore[attr-defined]
    # Nothing went out (the port would not open), and only the required fields: still a fact.
    failed = decode_event(
        program_sent(sent_bytes=0, outcome="failed", port=None, sent_by=None, message=None)
    )
    assert failed.data.sent_bytes == 0  # type: ignore[attr-defined]
    # A send that took no time (an empty program) ends when it started.
    empty = decode_event(
        program_sent(
            at="2026-03-02T05:56:02Z",
            sha256=hashlib.sha256(b"").hexdigest(),
            size_bytes=0,
            sent_bytes=0,
        )
    )
    assert empty.data.size_bytes == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "field", "words"),
    [
        (program_sent(sent_bytes=len(PROGRAM) + 1, outcome="failed"), "data.sent_bytes",
         f"more than size_bytes ({len(PROGRAM)})"),
        (program_sent(sent_bytes=40), "data.outcome", "'completed' needs sent_bytes == size_bytes"),
        (program_sent(sha256="D3291DDD" * 8), "data.sha256", "should match pattern"),
        (program_sent(sha256="d3291ddd"), "data.sha256", "should match pattern"),
        (program_sent(at="2026-03-02T05:56:01Z"), "data.started_at", "after the CloudEvent time"),
        (program_sent(started_at="2026-03-02T05:56:02"), "data.started_at", "timezone"),
        (program_sent(program=""), "data.program", "at least 1 character"),
        (program_sent(program="O" * 257), "data.program", "at most 256 characters"),
        (program_sent(file=None), "data.file", "Field required"),
        (program_sent(file="f" * 1025), "data.file", "at most 1024 characters"),
        (program_sent(size_bytes=-1, sent_bytes=0, outcome="failed"), "data.size_bytes",
         "greater than or equal to 0"),
        (program_sent(sent_bytes=-1, outcome="failed"), "data.sent_bytes",
         "greater than or equal to 0"),
        (program_sent(size_bytes=str(len(PROGRAM))), "data.size_bytes", "valid integer"),
        (program_sent(outcome="done"), "data.outcome", "'completed', 'cancelled' or 'failed'"),
        (program_sent(port="p" * 257), "data.port", "at most 256 characters"),
        (program_sent(sent_by="u" * 129), "data.sent_by", "at most 128 characters"),
        (program_sent(message="m" * 1025), "data.message", "at most 1024 characters"),
        (program_sent(checksum="x"), "data.checksum", "not permitted"),
    ],
)  # fmt: skip
def test_a_broken_program_sent_is_refused_naming_the_field(
    message: bytes, field: str, words: str
) -> None:
    with pytest.raises(ContractViolation) as caught:
        decode_event(message)
    assert caught.value.field == field
    assert words in caught.value.reason


def test_the_program_sent_schema_checks_what_a_json_schema_can(tmp_path: Path) -> None:
    """The exported schema takes the worked example and refuses each field's own rule; the
    rules across fields (bytes sent against the size and the outcome, the start against the
    event's time) are beyond a JSON Schema: the hub checks them (docs/contract.md)."""
    check = validator(exported(tmp_path)["mes.machine.program_sent.v1"])
    check.validate(json.loads(program_sent()))
    for broken in (
        program_sent(sha256="d3291ddd"),
        program_sent(outcome="done"),
        program_sent(size_bytes=-1),
        program_sent(started_at="2026-03-02T05:56:02"),
        program_sent(program=""),
        program_sent(file=None),
        program_sent(checksum="x"),
    ):
        with pytest.raises(jsonschema.ValidationError):
            check.validate(json.loads(broken))
    beyond = json.loads(program_sent(sent_bytes=40))
    check.validate(beyond)
    with pytest.raises(ContractViolation):
        decode_event(json.dumps(beyond).encode())
