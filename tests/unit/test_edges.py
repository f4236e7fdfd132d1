"""Issue 8, the edges of the contract (no I/O): strict types, bounded extension attributes, the
dedupe key (source + id) and the refusal of event times from the future."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import (
    CloudEvent,
    ContractViolation,
    check_event_time,
    decode_event,
    dedupe_key,
    validate_envelope,
)
from hub.settings import ConfigError, load_settings

NOW = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def body(**override: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "42",
        "source": "urn:plc:A",
        "type": "mes.machine.partcount.v1",
        "time": "2026-03-02T06:00:00Z",
        "subject": "M1",
        "data": {"count": 7, "kind": "all"},
    }
    event.update(override)
    return event


def refusal_both_ways(event: dict[str, Any]) -> tuple[ContractViolation, list[str]]:
    """The NATS path (bytes, pydantic's JSON mode) and the API path (a parsed object, pydantic's
    Python mode) must refuse alike: the first's violation, the second's error fields."""
    with pytest.raises(ContractViolation) as from_bytes:
        decode_event(json.dumps(event).encode())
    fields: list[str] = []
    try:
        validate_envelope(CloudEvent.model_validate(event))
    except ContractViolation as violation:  # the data, checked against its type
        fields = [violation.field or ""]
    except ValidationError as exc:  # the envelope
        fields = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
    else:
        pytest.fail("the object path accepted what the bytes path refused")
    return from_bytes.value, fields


# --- rule 12: strict types --------------------------------------------------------------------

STRICT = [
    ("count as a string", body(data={"count": "7", "kind": "all"}), "data.count"),
    ("count as a float", body(data={"count": 5.0, "kind": "all"}), "data.count"),
    ("count as a boolean", body(data={"count": True, "kind": "all"}), "data.count"),
    (
        "quantity as a boolean",
        body(type="mes.operator.scrap.v1", data={"quantity": True, "reason": "burr"}),
        "data.quantity",
    ),
    (
        "quantity as a string",
        body(type="mes.operator.scrap.v1", data={"quantity": "2", "reason": "burr"}),
        "data.quantity",
    ),
    (
        "reason as a number",
        body(type="mes.operator.scrap.v1", data={"quantity": 2, "reason": 17}),
        "data.reason",
    ),
    (
        "program as a number",
        body(type="mes.machine.execution.v1", data={"execution": "ACTIVE", "program": 7}),
        "data.program",
    ),
    (
        "ideal cycle time as a string",
        body(
            type="mes.erp.order.released.v1",
            subject="SO-1",
            data={
                "order_id": "SO-1",
                "part_number": "P-1",
                "quantity": 10,
                "due": "2026-03-09T00:00:00Z",
                "ideal_cycle_time_s": "42.5",
            },
        ),
        "data.ideal_cycle_time_s",
    ),
    (
        "ideal cycle time as a boolean",
        body(
            type="mes.erp.order.changed.v1",
            subject="SO-1",
            data={"order_id": "SO-1", "ideal_cycle_time_s": True},
        ),
        "data.ideal_cycle_time_s",
    ),
    ("source as a number", body(source=17), "source"),
    ("id as a number", body(id=42), "id"),
    ("time as a Unix timestamp", body(time=1772431200), "time"),
    (
        "a start time as a number",
        body(
            type="mes.operator.downtime_reason.v1",
            data={"reason": "planned/break", "start": 1772431200, "operator": "op1"},
        ),
        "data.start",
    ),
]


@pytest.mark.parametrize(("event", "field"), [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_a_value_of_the_wrong_json_type_is_refused_not_coerced(
    event: dict[str, Any], field: str
) -> None:
    violation, fields = refusal_both_ways(event)
    assert violation.field == field
    assert fields == [field]


def test_the_right_json_types_still_parse_in_both_paths() -> None:
    # Enums and times arrive as JSON strings; a whole number is a valid cycle time.
    events = [
        body(time="2026-03-02T07:00:00.250+01:00"),
        body(type="mes.machine.execution.v1", data={"execution": "ACTIVE", "mode": "MANUAL"}),
        body(
            type="mes.erp.order.released.v1",
            subject="SO-1",
            data={
                "order_id": "SO-1",
                "part_number": "P-1",
                "quantity": 10,
                "due": "2026-03-09T00:00:00+01:00",
                "ideal_cycle_time_s": 30,
            },
        ),
        body(
            type="mes.operator.downtime_reason.v1",
            data={"reason": "planned/break", "start": "2026-03-02T05:30:00Z", "operator": "op1"},
        ),
    ]
    for event in events:
        from_bytes = decode_event(json.dumps(event).encode())
        from_object = validate_envelope(CloudEvent.model_validate(event))
        assert from_bytes.data == from_object.data
        assert from_bytes.envelope.time == from_object.envelope.time
    released = decode_event(json.dumps(events[2]).encode()).data
    assert released.ideal_cycle_time_s == 30.0  # type: ignore[attr-defined]
    assert decode_event(json.dumps(events[0]).encode()).envelope.time == datetime(
        2026, 3, 2, 6, 0, 0, 250_000, tzinfo=UTC
    )


# --- rule 12: extension attributes ------------------------------------------------------------

EXTENSIONS = [
    ("an object", {"site": {"hall": 2}}, "site", "not an object"),
    ("an array", {"tags": ["a", "b"]}, "tags", "not an array"),
    ("null", {"partitionkey": None}, "partitionkey", "not null"),
    ("a fraction", {"weight": 1.5}, "weight", "not a floating-point number"),
    ("a long string", {"note": "x" * 1025}, "note", "at most 1024 characters, got 1025"),
    ("an integer over 32 bits", {"seq": 2**31}, "seq", "got 2147483648"),
    ("an integer under 32 bits", {"seq": -(2**31) - 1}, "seq", "got -2147483649"),
]


@pytest.mark.parametrize(
    ("extra", "name", "words"), [c[1:] for c in EXTENSIONS], ids=[c[0] for c in EXTENSIONS]
)
def test_an_extension_attribute_must_be_a_bounded_scalar(
    extra: dict[str, Any], name: str, words: str
) -> None:
    violation, fields = refusal_both_ways(body(**extra))
    assert violation.field == name
    assert violation.reason.startswith(f"not a CloudEvent: {name}: ")
    assert words in violation.reason
    assert fields == [name]


def test_scalar_extensions_at_their_limits_are_kept() -> None:
    extra = {
        "note": "x" * 1024,
        "seq": 2**31 - 1,
        "low": -(2**31),
        "replayed": True,
        "sourcetime": "2026-03-02T05:59:59Z",
    }
    event = decode_event(json.dumps(body(**extra)).encode())
    assert event.envelope.model_extra == extra


def test_at_most_twenty_extension_attributes() -> None:
    twenty = {f"x{n}": n for n in range(20)}
    assert decode_event(json.dumps(body(**twenty)).encode()).envelope.model_extra == twenty
    violation, _ = refusal_both_ways(body(**twenty, x20=20))
    assert "at most 20 extension attributes are allowed, got 21" in violation.reason


# --- rule 13: the dedupe key ------------------------------------------------------------------


def test_the_dedupe_key_is_the_sha256_of_source_line_feed_id() -> None:
    # Reference values from coreutils, not from Python:
    #   printf 'urn:plc:A\n42' | sha256sum
    a = CloudEvent.model_validate(body(source="urn:plc:A"))
    b = CloudEvent.model_validate(body(source="urn:plc:B"))
    assert dedupe_key(a) == "6600dce9211f917c453c182e5f674f42b2ff47475f07b5c31503e58168164710"
    assert dedupe_key(b) == "dec1ad9e2c04534f7feabf51f211919734e962919b2468f01ae67fadb454516c"
    # Same source and id, anything else different: the same event.
    later = CloudEvent.model_validate(body(time="2026-03-02T07:00:00Z", subject="M2"))
    assert dedupe_key(later) == dedupe_key(a)


def test_the_dedupe_key_does_not_confuse_where_source_ends_and_id_begins() -> None:
    one = CloudEvent.model_validate(body(source="urn:a", id="b:c"))
    other = CloudEvent.model_validate(body(source="urn:a:b", id="c"))
    assert dedupe_key(one) != dedupe_key(other)
    # An id cannot hold the line feed that separates them.
    with pytest.raises(ValueError, match="id"):
        CloudEvent.model_validate(body(source="urn:a", id="x\n42"))


# --- rule 10: time from the future ------------------------------------------------------------


def at(time: str) -> CloudEvent:
    return CloudEvent.model_validate(body(time=time))


def test_up_to_the_allowed_skew_ahead_is_accepted() -> None:
    check_event_time(at("2026-03-02T06:05:00Z"), NOW, 300)  # exactly 300 s ahead
    check_event_time(at("2026-03-02T07:05:00+01:00"), NOW, 300)  # the same instant
    check_event_time(at("1999-01-01T00:00:00Z"), NOW, 300)  # the past is not this rule's


@pytest.mark.parametrize(
    ("time", "skew", "reason"),
    [
        (
            "2026-03-02T06:05:01Z",
            300,
            "time: 2026-03-02T06:05:01Z is 301 s ahead of the hub's clock; "
            "at most 300 s allowed ([hub] max_clock_skew_s)",
        ),
        (
            "2026-03-02T07:01:00.5+01:00",
            60,
            "time: 2026-03-02T07:01:00.500000+01:00 is 60.5 s ahead of the hub's clock; "
            "at most 60 s allowed ([hub] max_clock_skew_s)",
        ),
        (
            "2026-03-05T11:00:00Z",  # 3 days 5 hours ahead: whole days
            300,
            "time: 2026-03-05T11:00:00Z is 3 days ahead of the hub's clock; "
            "at most 300 s allowed ([hub] max_clock_skew_s)",
        ),
        (
            # From 2 March 2026 to 31 December 9999: 305 days to the end of 2026, then
            # 7,973 years 2027-9999 with 1,993 - 79 + 19 = 1,933 leap days: 2,912,383 days to
            # 1 January 10000, so 2,912,382 to 31 December 9999; from 06:00 to midnight that
            # is 2,912,381 days and 18 hours.
            "9999-12-31T00:00:00Z",
            300,
            "time: 9999-12-31T00:00:00Z is 2912381 days ahead of the hub's clock; "
            "at most 300 s allowed ([hub] max_clock_skew_s)",
        ),
    ],
)
def test_further_ahead_is_refused_with_the_reason(time: str, skew: float, reason: str) -> None:
    with pytest.raises(ContractViolation) as caught:
        check_event_time(at(time), NOW, skew)
    assert caught.value.reason == reason
    assert caught.value.field == "time"


def test_max_clock_skew_is_a_positive_hub_setting(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).max_clock_skew_s == 300.0
    config = tmp_path / "mes-hub.toml"
    config.write_text("[hub]\nmax_clock_skew_s = 30\n")
    assert load_settings(config).max_clock_skew_s == 30.0
    for bad in ("0", "-5", "inf"):
        config.write_text(f"[hub]\nmax_clock_skew_s = {bad}\n")
        with pytest.raises(ConfigError, match=r"key 'hub\.max_clock_skew_s'"):
            load_settings(config)
