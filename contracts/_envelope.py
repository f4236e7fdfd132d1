"""The CloudEvents 1.0 envelope in JSON structured mode, and decoding of raw bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from contracts._errors import ContractViolation, describe_validation_error
from contracts._types import EVENT_TYPES, TOKEN_PATTERN, EventType, _Data

# CloudEvents extension attribute names: lower-case letters and digits (spec section 3.1.1).
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# W3C trace context, as carried by the CloudEvents distributed-tracing extension.
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class CloudEvent(BaseModel):
    """A CloudEvent as mes-hub accepts it. ``time`` is the event time at the machine or ERP."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    # The id is also the Nats-Msg-Id header, so it must be printable ASCII without spaces.
    id: str = Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")
    source: str = Field(min_length=1, max_length=1024)
    type: str = Field(min_length=1, max_length=256)
    time: AwareDatetime
    subject: str = Field(pattern=TOKEN_PATTERN, min_length=1, max_length=128)
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str | None = None
    traceparent: str | None = Field(default=None, pattern=_TRACEPARENT)
    tracestate: str | None = Field(default=None, max_length=512)
    data: dict[str, Any]

    @model_validator(mode="after")
    def _extension_names(self) -> CloudEvent:
        for name in self.model_extra or {}:
            if not _EXTENSION_NAME.match(name):
                raise ValueError(
                    f"extension attribute {name!r} must be 1-20 lower-case letters or digits"
                )
        return self


@dataclass(frozen=True)
class ValidatedEvent:
    """An envelope whose ``data`` has been checked against its v1 type."""

    envelope: CloudEvent
    event_type: EventType
    data: _Data

    @property
    def id(self) -> str:
        return self.envelope.id


def validate_envelope(envelope: CloudEvent) -> ValidatedEvent:
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
def _typed_decoder() -> TypeAdapter[Any]:
    """One validator for every v1 type, chosen by ``type``: envelope and data in one pass."""
    typed: list[Any] = []
    for name, event_type in EVENT_TYPES.items():
        type_name: Any = Literal[name]
        typed.append(
            create_model(
                "CloudEvent_" + name.replace(".", "_"),
                __base__=CloudEvent,
                type=(type_name, ...),
                data=(event_type.data_model, ...),
            )
        )
    union: Any = Annotated[Union[tuple(typed)], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(union)


def decode_event(raw: bytes) -> ValidatedEvent:
    """Parse and validate one structured-mode CloudEvent. Raises ``ContractViolation``."""
    try:
        envelope = _typed_decoder().validate_json(raw)
    except ValidationError as exc:
        _explain_rejection(raw)  # bad input is rare: validate again, step by step, to explain
        raise describe_validation_error(exc) from None
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
