"""Contract v1: what integrators can rely on, and the errors they get."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from contracts import (
    EVENT_TYPES,
    ContractViolation,
    check_subject,
    decode_event,
    encode_event,
    export_json_schemas,
    nats_subject_for,
    partition_key,
)
from tests.conftest import cloud_event

EXAMPLES = {
    "mes.machine.availability.v1": ("M1", {"availability": "AVAILABLE"}),
    "mes.machine.execution.v1": (
        "M1",
        {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O1"},
    ),
    "mes.machine.partcount.v1": ("M1", {"count": 12, "kind": "all"}),
    "mes.machine.condition.v1": ("M1", {"level": "fault", "native_code": "1010", "message": "x"}),
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
    assert len(written) == len(EVENT_TYPES)
    for type_name, (subject, data) in EXAMPLES.items():
        schema = json.loads((tmp_path / f"{type_name}.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        good = json.loads(encode_event(cloud_event(type_name, subject, data)))
        jsonschema.validate(good, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "type": "mes.other.v1"}, schema)
