"""The CloudEvents 1.0 envelope in JSON structured mode, and decoding of raw bytes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from contracts._errors import ContractViolation, describe_validation_error
from contracts._types import (
    EVENT_TYPES,
    TOKEN_PATTERN,
    EventTime,
    EventType,
    ProgramSentV1,
    _Data,
)

# CloudEvents extension attribute names: lower-case letters and digits (spec section 3.1.1).
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# W3C trace context, as carried by the CloudEvents distributed-tracing extension.
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

# Extension attributes (the envelope's other members) are scalars of the CloudEvents 1.0 type
# system, bounded: Boolean, Integer (32-bit signed) and the string-typed ones (String, URI,
# URI-reference, Timestamp, Binary as base64).
MAX_EXTENSIONS = 20
# Who sent an event, as the hub's API vouches for it: extension attributes set by the hub (the
# API key's id and role), never by a client; ingest takes them only from a message the hub
# signed. The replay export writes the actor of every event in the same attributes.
ACTOR_KIND, ACTOR_ID, ACTOR_ROLE = "mesactorkind", "mesactorid", "mesactorrole"
ACTOR_EXTENSIONS = (ACTOR_KIND, ACTOR_ID, ACTOR_ROLE)
MAX_EXTENSION_STRING = 1024
_INTEGER_MIN, _INTEGER_MAX = -(2**31), 2**31 - 1


def _extension_value(value: Any) -> str | int | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INTEGER_MIN <= value <= _INTEGER_MAX:
            raise PydanticCustomError(
                "extension_attribute",
                "a CloudEvents Integer is a 32-bit signed integer "
                "(-2147483648 to 2147483647), got {value}",
                {"value": value},
            )
        return value
    if isinstance(value, str):
        if len(value) > MAX_EXTENSION_STRING:
            raise PydanticCustomError(
                "extension_attribute",
                "an extension attribute string has at most {limit} characters, got {length}",
                {"limit": MAX_EXTENSION_STRING, "length": len(value)},
            )
        return value
    kind = {
        dict: "an object",
        list: "an array",
        type(None): "null",
        float: "a floating-point number",
    }
    raise PydanticCustomError(
        "extension_attribute",
        "an extension attribute must be a string, an integer or a boolean "
        "(CloudEvents 1.0 type system), not {kind}",
        {"kind": kind.get(type(value), type(value).__name__)},
    )


ExtensionValue = Annotated[
    str | int | bool,
    PlainValidator(
        _extension_value,
        json_schema_input_type=Annotated[str, Field(max_length=MAX_EXTENSION_STRING)]
        | Annotated[int, Field(ge=_INTEGER_MIN, le=_INTEGER_MAX)]
        | bool,
    ),
]


class CloudEvent(BaseModel):
    """A CloudEvent as mes-hub accepts it. ``time`` is the event time at the machine or ERP."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, ExtensionValue] = Field(init=False)

    specversion: Literal["1.0"]
    # Printable ASCII without spaces: safe in logs and headers, and without the line feed that
    # separates source and id in the dedupe key.
    id: StrictStr = Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")
    source: StrictStr = Field(min_length=1, max_length=1024)
    type: StrictStr = Field(min_length=1, max_length=256)
    time: EventTime
    subject: StrictStr = Field(pattern=TOKEN_PATTERN, min_length=1, max_length=128)
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: StrictStr | None = None
    traceparent: StrictStr | None = Field(default=None, pattern=_TRACEPARENT)
    tracestate: StrictStr | None = Field(default=None, max_length=512)
    data: dict[str, Any]

    @model_validator(mode="after")
    def _extension_names(self) -> CloudEvent:
        extensions = self.model_extra or {}
        if len(extensions) > MAX_EXTENSIONS:
            raise ValueError(
                f"at most {MAX_EXTENSIONS} extension attributes are allowed, "
                f"got {len(extensions)}: {', '.join(sorted(extensions))}"
            )
        for name in extensions:
            if not _EXTENSION_NAME.match(name):
                raise ValueError(
                    f"extension attribute {name!r} must be 1-20 lower-case letters or digits"
                )
        return self


def dedupe_key(envelope: CloudEvent) -> str:
    """What makes an event unique (CloudEvents 1.0: ``source`` + ``id``), as one fixed-length
    token: the SHA-256 of ``source``, a line feed and ``id`` (UTF-8), in lower-case hex (64
    characters). The id cannot contain a line feed, so two different pairs never give the same
    text. It is the ``Nats-Msg-Id`` of every event the hub publishes, and the key the store
    keeps of every event applied."""
    text = f"{envelope.source}\n{envelope.id}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_event_time(envelope: CloudEvent, now: datetime, max_skew_s: float) -> None:
    """Refuse an event dated more than ``max_skew_s`` after ``now`` (the receiver's clock): the
    future is unknown, and one event from year 9999 would be the newest state for good."""
    ahead = (envelope.time - now).total_seconds()
    if ahead > max_skew_s:
        when = envelope.time.isoformat().replace("+00:00", "Z")
        raise ContractViolation(
            f"time: {when} is {_span(ahead)} ahead of the hub's clock; at most "
            f"{_seconds(max_skew_s)} s allowed ([hub] max_clock_skew_s)",
            field="time",
        )


def _rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _seconds(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _span(seconds: float) -> str:
    """Seconds (to the microsecond) under a day; whole days (rounded down) from a day on."""
    if seconds < 86_400:
        return f"{_seconds(seconds)} s"
    days = int(seconds // 86_400)
    return f"{days} day" if days == 1 else f"{days} days"


@dataclass(frozen=True)
class ValidatedEvent:
    """An envelope whose ``data`` has been checked against its v1 type."""

    envelope: CloudEvent
    event_type: EventType
    data: _Data

    @property
    def id(self) -> str:
        return self.envelope.id


def _refuse_nul(value: Any, path: str) -> None:
    """No text of an event may hold NUL (U+0000): PostgreSQL cannot store it, and an event
    taken with one would stop the views of every hub on PostgreSQL."""
    if isinstance(value, str):
        if "\x00" in value:
            where = path or "event"
            raise ContractViolation(f"{where}: must not contain NUL (U+0000)", field=path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, path)
            _refuse_nul(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            _refuse_nul(item, f"{path}[{n}]")


def validate_envelope(envelope: CloudEvent) -> ValidatedEvent:
    _refuse_nul(envelope.model_dump(), "")
    event_type = EVENT_TYPES.get(envelope.type)
    if event_type is None:
        raise ContractViolation(
            f"type: unknown event type {envelope.type!r}; known types: "
            + ", ".join(sorted(EVENT_TYPES)),
            field="type",
        )
    try:
        data = event_type.data_model.model_validate(envelope.data)
    except ValidationError as exc:
        raise describe_validation_error(exc, prefix="data.") from None
    return _checked(ValidatedEvent(envelope=envelope, event_type=event_type, data=data))


def _checked(event: ValidatedEvent) -> ValidatedEvent:
    """Rules across envelope and data."""
    if isinstance(event.data, ProgramSentV1) and event.data.started_at > event.envelope.time:
        # The event's time is when the send ended: it cannot have started after that.
        raise ContractViolation(
            f"data.started_at {_rfc3339(event.data.started_at)} is after the CloudEvent time "
            f"{_rfc3339(event.envelope.time)} (when the send ended); a send cannot end before "
            "it started",
            field="data.started_at",
        )
    if event.event_type.stream != "erp" and event.event_type.entity != "order":
        return event
    order_id = getattr(event.data, "order_id", None)
    if order_id != event.envelope.subject:
        raise ContractViolation(
            f"data.order_id {order_id!r} differs from the CloudEvent subject "
            f"{event.envelope.subject!r}; for order events they must be equal",
            field="data.order_id",
        )
    return event


@cache
def typed_events(names: tuple[str, ...]) -> TypeAdapter[Any]:
    """The CloudEvents of these v1 types, one model per type chosen by ``type``: a validator of
    envelope and data in one pass, and their JSON Schema (the API's request body)."""
    typed: list[Any] = []
    for name in names:
        type_name: Any = Literal[name]
        typed.append(
            create_model(
                "CloudEvent_" + name.replace(".", "_"),
                __base__=CloudEvent,
                type=(type_name, ...),
                data=(EVENT_TYPES[name].data_model, ...),
            )
        )
    union: Any = Annotated[Union[tuple(typed)], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(union)


def _typed_decoder() -> TypeAdapter[Any]:
    """One validator for every v1 type."""
    return typed_events(tuple(EVENT_TYPES))


def decode_event(raw: bytes) -> ValidatedEvent:
    """Parse and validate one structured-mode CloudEvent. Raises ``ContractViolation``."""
    try:
        envelope = _typed_decoder().validate_json(raw)
    except ValidationError as exc:
        _explain_rejection(raw)  # bad input is rare: validate again, step by step, to explain
        raise describe_validation_error(exc) from None
    if b"\\u0000" in raw:  # JSON can only carry a NUL escaped (rare: look closer then)
        _refuse_nul(envelope.model_dump(), "")
    return _checked(ValidatedEvent(envelope, EVENT_TYPES[envelope.type], envelope.data))


def _explain_rejection(raw: bytes) -> None:
    try:
        envelope = CloudEvent.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ContractViolation("not JSON: " + exc.errors()[0]["msg"]) from None
        if any(e["type"] == "model_type" for e in exc.errors()):
            raise ContractViolation("not a CloudEvent: the body is not a JSON object") from None
        violation = describe_validation_error(exc)
        raise ContractViolation(
            "not a CloudEvent: " + violation.reason, field=violation.field
        ) from None
    validate_envelope(envelope)


def encode_event(envelope: CloudEvent) -> bytes:
    return envelope.model_dump_json(exclude_none=True).encode()
