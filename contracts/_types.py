"""The v1 event types (docs/contract.md), as pydantic models of the CloudEvent ``data``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# Strict types at the edges: an integer field takes a JSON integer only (not "7", 5.0 or true),
# a string field a JSON string only, a number field a JSON number (not true, not "42.5"). The
# enums stay as they are: they take their values as JSON strings, in both validation modes.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$"
Token = Annotated[StrictStr, Field(pattern=TOKEN_PATTERN, min_length=1, max_length=128)]


def _rfc3339_text(value: Any) -> Any:
    """A time on the wire is an RFC 3339 string with its offset, exactly what the exported JSON
    Schemas say (``DATE_TIME_PATTERN``): a number or a string of digits (seconds since 1970?) is
    refused instead of being read as a Unix time, and so are the ISO 8601 forms RFC 3339 leaves
    out (a space for the ``T``, ``+0100``, no seconds). Python code may pass a ``datetime``."""
    if isinstance(value, bool | int | float):
        raise ValueError("must be an RFC 3339 date-time string with an offset, not a number")
    if isinstance(value, str) and _DATE_TIME.match(value) is None:
        raise ValueError(
            "must be an RFC 3339 date-time with its timezone offset, e.g. 2026-03-02T06:00:00Z or "
            "2026-03-02T07:00:00+01:00"
        )
    return value


# An RFC 3339 date-time with its offset (``Z`` or ``±hh:mm``), as the exported JSON Schemas
# require it. ``"format": "date-time"`` alone does not: validators do not assert formats by
# default, and would pass a naive time the hub refuses. ASCII digits only (``[0-9]``, not ``\d``,
# which some regex engines read as any Unicode digit), and no look-around (RE2, Go's, has none).
DATE_TIME_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)

_DATE_TIME = re.compile(DATE_TIME_PATTERN)

# Event times must carry an offset: a naive time on a shop floor is a bug waiting for DST.
EventTime = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339_text),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": DATE_TIME_PATTERN}),
]

# The hub's latest signed audit checkpoint when a production confirmation or a partner event was
# decided (``hub.sealer.checkpoint_reference``): ``<origin> <size> <base64 root hash>``, the first
# three lines of its C2SP checkpoint note joined by spaces (the origin, one line of at most 200
# characters, may hold spaces: read it from the right).
CHECKPOINT_PATTERN = r"^[^\x00-\x1f\x7f]+ (0|[1-9][0-9]*) [A-Za-z0-9+/]{43}=$"
CheckpointReference = Annotated[
    StrictStr, Field(min_length=48, max_length=300, pattern=CHECKPOINT_PATTERN)
]
CHECKPOINT_DESCRIPTION = (
    "The hub's latest signed audit checkpoint when this was decided, as "
    "'<origin> <tree size> <base64 root hash>' (the checkpoint note's first three lines joined "
    "by spaces). Keep it: a consistency proof from that tree size to any later checkpoint, which "
    "an auditor asks the hub for, shows that the hub's event log was not rewritten since "
    "(docs/audit.md). null: the hub had signed no checkpoint yet."
)


class _Data(BaseModel):
    # Unknown fields are refused: a typo in an integrator's field name must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Availability(StrEnum):
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"


class Execution(StrEnum):
    ACTIVE = "ACTIVE"
    READY = "READY"
    INTERRUPTED = "INTERRUPTED"
    FEED_HOLD = "FEED_HOLD"
    STOPPED = "STOPPED"
    OPTIONAL_STOP = "OPTIONAL_STOP"
    PROGRAM_STOPPED = "PROGRAM_STOPPED"
    PROGRAM_COMPLETED = "PROGRAM_COMPLETED"
    WAIT = "WAIT"
    UNAVAILABLE = "UNAVAILABLE"


class ControllerMode(StrEnum):
    AUTOMATIC = "AUTOMATIC"
    MANUAL = "MANUAL"
    MANUAL_DATA_INPUT = "MANUAL_DATA_INPUT"
    SEMI_AUTOMATIC = "SEMI_AUTOMATIC"
    EDIT = "EDIT"


class PartCountKind(StrEnum):
    ALL = "all"
    BAD = "bad"


class ConditionLevel(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    FAULT = "fault"
    UNAVAILABLE = "unavailable"


class AvailabilityV1(_Data):
    availability: Availability


class ExecutionV1(_Data):
    execution: Execution
    mode: ControllerMode | None = None
    program: StrictStr | None = Field(default=None, max_length=256)


class PartCountV1(_Data):
    count: StrictInt = Field(
        ge=0, le=2**63 - 1, description="The controller's cumulative counter (64-bit)"
    )
    kind: PartCountKind


class ConditionV1(_Data):
    level: ConditionLevel
    native_code: StrictStr | None = Field(default=None, max_length=128)
    message: StrictStr | None = Field(default=None, max_length=2048)


class ProgramSentV1(_Data):
    """An NC program sent to a machine's control (DNC drip feed over RS-232), told once when the
    send ended, so the audit log shows which version of which program went to which machine.
    The subject is the machine; the event time is when the send ended. It changes no machine
    state, no count and no OEE figure: it is a record. ``started_at`` must not be after the
    event's ``time`` (checked with the envelope, ``contracts._envelope``)."""

    program: StrictStr = Field(
        min_length=1,
        max_length=256,
        description="The program as the control knows it, e.g. O1234 or the name after %",
    )
    file: StrictStr = Field(
        min_length=1, max_length=1024, description="The file it was read from, as given"
    )
    sha256: StrictStr = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the program's bytes as stored in the file (lower-case hex)",
    )
    size_bytes: StrictInt = Field(
        ge=0, description="The program's length in bytes: what a complete send delivers"
    )
    sent_bytes: StrictInt = Field(
        ge=0,
        description=(
            "Of size_bytes, how many were written to the port: the program's bytes as sent "
            "(line ends converted if the sender was told to), tape leader NULs not counted; "
            "sha256 is of the file as stored"
        ),
    )
    outcome: Literal["completed", "cancelled", "failed"]
    started_at: EventTime = Field(description="When the first byte went out")
    port: StrictStr | None = Field(
        default=None, max_length=256, description="The serial device, e.g. /dev/ttyUSB0"
    )
    sent_by: StrictStr | None = Field(
        default=None, max_length=128, description="Who started the send (the OS user)"
    )
    message: StrictStr | None = Field(
        default=None,
        max_length=1024,
        description="Cancelled or failed: why, and the state the control was left in",
    )

    # Field validators, not a model validator, so that the error names the field at fault
    # (``data.sent_bytes``, ``data.outcome``); each sees the fields declared before it.
    @field_validator("sent_bytes")
    @classmethod
    def _not_more_than_the_program(cls, sent: int, info: ValidationInfo) -> int:
        size = info.data.get("size_bytes")
        if size is not None and sent > size:
            raise ValueError(f"{sent} bytes sent is more than size_bytes ({size})")
        return sent

    @field_validator("outcome")
    @classmethod
    def _completed_means_all_sent(cls, outcome: str, info: ValidationInfo) -> str:
        size, sent = info.data.get("size_bytes"), info.data.get("sent_bytes")
        if outcome == "completed" and size is not None and sent is not None and sent != size:
            raise ValueError(
                f"'completed' needs sent_bytes == size_bytes, got {sent} of {size} bytes; "
                "a send that stopped early is 'cancelled' or 'failed'"
            )
        return outcome


class DowntimeReasonV1(_Data):
    reason: StrictStr = Field(
        min_length=1, max_length=256, description="Code from the reason catalog"
    )
    start: EventTime
    end: EventTime | None = None
    operator: StrictStr = Field(min_length=1, max_length=128)
    note: StrictStr | None = Field(default=None, max_length=2048)

    @model_validator(mode="after")
    def _end_after_start(self) -> DowntimeReasonV1:
        if self.end is not None and self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class OrderStartedV1(_Data):
    order_id: Token


class OrderEndedV1(_Data):
    order_id: Token


class ScrapV1(_Data):
    order_id: Token | None = None
    quantity: StrictInt = Field(gt=0)
    reason: StrictStr = Field(min_length=1, max_length=256)


class OrderReleasedV1(_Data):
    order_id: Token
    part_number: StrictStr = Field(min_length=1, max_length=128)
    quantity: StrictInt = Field(gt=0)
    due: EventTime
    customer: StrictStr | None = Field(default=None, max_length=256)
    machine_id: Token | None = None
    # Optional: an ERP without cycle times leaves it out, and the plant's fallbacks by part
    # number, program and machine apply ([plant] ideal_cycle_times, docs/oee.md).
    ideal_cycle_time_s: StrictFloat | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="ISO 22400 planned run time per item (PRI)",
    )


class OrderChangedV1(_Data):
    order_id: Token
    part_number: StrictStr | None = Field(default=None, min_length=1, max_length=128)
    quantity: StrictInt | None = Field(default=None, gt=0)
    due: EventTime | None = None
    customer: StrictStr | None = Field(default=None, max_length=256)
    machine_id: Token | None = None
    ideal_cycle_time_s: StrictFloat | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _changes_something(self) -> OrderChangedV1:
        if not self.changes():
            raise ValueError("an order change must change at least one field")
        return self

    def changes(self) -> dict[str, object]:
        return self.model_dump(exclude={"order_id"}, exclude_unset=True)


class OrderCancelledV1(_Data):
    order_id: Token
    reason: StrictStr = Field(min_length=1, max_length=1024)


class DeliveryStatus(StrEnum):
    ON_TRACK = "on_track"
    AT_RISK = "at_risk"
    LATE = "late"
    DONE = "done"


class DeliveryForecastChangedV1(_Data):
    """The hub's own event: an order's delivery forecast changed status, or its ETA moved by
    more than the plant's tolerance. Published by the hub, never accepted from outside."""

    order_id: Token
    status: DeliveryStatus | None
    eta: EventTime | None
    due: EventTime | None
    remaining: StrictInt | None = Field(ge=0)
    effective_cycle_time_s: StrictFloat | None = Field(gt=0, allow_inf_nan=False)
    basis: Literal["observed", "ideal", "none"]
    previous_status: DeliveryStatus | None = None
    previous_eta: EventTime | None = None


class OrderProgressedV1(_Data):
    """The hub's own event: an order's good parts or scrap changed since the last one, told at
    most once per ``[hub] webhook_progress_interval_s`` per order (the forecast watch's
    throttle). Published by the hub, never accepted from outside. The subject is the order."""

    order_id: Token
    good: StrictInt = Field(ge=0)
    scrap: StrictInt = Field(ge=0)
    remaining: StrictInt | None = Field(ge=0)
    quantity: StrictInt | None = Field(gt=0)


class PlantConfiguredV1(_Data):
    """The hub's own event: the plant's calendar and reason catalog (the ``[plant]`` table of
    ``mes-hub.toml``) changed. It applies from ``effective_from``, or from when it was recorded;
    the first one applies to everything before it too. The subject is the site."""

    plant: dict[str, Any]
    effective_from: EventTime | None = None


class ConfirmationDueV1(_Data):
    """The hub's own event: a production confirmation the ERPs are owed, decided when a run of
    the order ended (``run_ended``), at a shift end while it ran (``shift_end``, a partial: the
    hub's ``confirm_each_shift``), or when what was confirmed no longer matches the store
    (``correction``: late scrap or parts). Quantities are what is new since the confirmations
    before it — negative when parts were taken back (a correction's; or a run's end after a
    shift end's partial, when scrap came in between) — and the totals the order has confirmed
    with it, computed from the store when it was decided, so a rebuild reproduces them; and
    the latest signed audit checkpoint then (``checkpoint``), which every ERP is sent with it.
    The subject is the order."""

    order_id: Token
    sequence: StrictInt = Field(ge=1, description="The order's confirmations: 1, 2, …")
    reason: Literal["run_ended", "shift_end", "correction"]
    machine_id: Token | None = None
    operation: StrictStr | None = Field(default=None, max_length=64)
    yield_quantity: StrictInt = Field(description="Good parts new since the last confirmation")
    scrap_quantity: StrictInt = Field(description="Scrap new since the last confirmation")
    start: EventTime | None = None
    end: EventTime | None = None
    final: StrictBool = Field(description="The order is done: its good parts reached its quantity")
    correction_of: StrictInt | None = Field(default=None, ge=1)
    yield_total: StrictInt | None = Field(
        default=None, ge=0, description="Good parts confirmed for the order in all, with this one"
    )
    scrap_total: StrictInt | None = Field(
        default=None, ge=0, description="Scrap confirmed for the order in all, with this one"
    )
    checkpoint: CheckpointReference | None = Field(default=None, description=CHECKPOINT_DESCRIPTION)


class DeliveryAttemptedV1(_Data):
    """The hub's own event: one attempt to deliver an outbox message to a destination (an ERP),
    and its outcome, kept so that an auditor can see what the ERP was told and what it said.
    The subject is the order the message is about."""

    order_id: Token
    message_id: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    destination: Token
    attempt: StrictInt = Field(ge=1)
    # requeued: not an attempt — someone asked for a dead message to be tried again (API).
    outcome: Literal["delivered", "duplicate", "failed", "dead", "requeued"]
    status_code: StrictInt | None = Field(default=None, ge=100, le=599)
    reason: StrictStr = Field(default="", max_length=512)
    excerpt: StrictStr = Field(default="", max_length=512)
    next_attempt_at: EventTime | None = None
    # How long the destination took to answer (or fail), in milliseconds; None: not measured
    # (a requeue, or an attempt recorded before it was).
    duration_ms: StrictInt | None = Field(default=None, ge=0)


class WebhookDueV1(_Data):
    """The hub's own event: something the partners of an order are owed (a partner event,
    docs/webhooks.md), for the endpoints whose subscriptions matched when it was decided. The
    outbox delivers it to each of them, in ``sequence`` per order. The subject is the order."""

    order_id: Token
    sequence: StrictInt = Field(ge=1, description="The order's partner events: 1, 2, …")
    event_id: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    event_type: StrictStr = Field(pattern=r"^mes\.order\.[a-z_]+\.v[0-9]+$")
    event_time: EventTime
    data: dict[str, Any]
    endpoints: list[Token] = Field(min_length=1, max_length=1000)


class WebhooksChangedV1(_Data):
    """The hub's own event: its partners (suppliers, customers), their API keys or their
    webhook endpoints changed — registered, edited, deleted, a key issued or revoked, a secret
    rotated, an endpoint paused, resumed, or disabled by the hub (docs/webhooks.md). The subject
    is the site. Keys and secrets are never in it: a key by the SHA-256 of it, a secret by its
    id and fingerprint."""

    action: Literal[
        "partner_saved", "partner_deleted", "key_issued", "key_revoked", "endpoint_saved",
        "endpoint_deleted", "secret_rotated", "endpoint_paused", "endpoint_resumed",
        "endpoint_disabled",
    ]  # fmt: skip
    partner_id: Token | None = None
    endpoint_id: Token | None = None
    key_id: Token | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
    by: StrictStr = Field(min_length=1, max_length=128, description="Who asked: a role, or the hub")
    reason: StrictStr = Field(default="", max_length=512)


Stream = Literal["machine", "operator", "erp", "hub"]


@dataclass(frozen=True)
class EventType:
    """One v1 type: its name, the data model, and where it travels on NATS.

    ``stream`` is the subject family; ``kind`` the last subject token. The CloudEvent ``subject``
    is a machine id for machine and operator types, an order id for ERP types, and for the hub's
    own types the ``entity`` named (an order, or the plant: the site).
    """

    name: str
    data_model: type[_Data]
    stream: Stream
    kind: str
    entity: Literal["order", "plant", "webhooks", ""] = ""


EVENT_TYPES: dict[str, EventType] = {
    t.name: t
    for t in (
        EventType("mes.machine.availability.v1", AvailabilityV1, "machine", "availability"),
        EventType("mes.machine.execution.v1", ExecutionV1, "machine", "execution"),
        EventType("mes.machine.partcount.v1", PartCountV1, "machine", "partcount"),
        EventType("mes.machine.condition.v1", ConditionV1, "machine", "condition"),
        EventType("mes.machine.program_sent.v1", ProgramSentV1, "machine", "program_sent"),
        EventType(
            "mes.operator.downtime_reason.v1", DowntimeReasonV1, "operator", "downtime_reason"
        ),
        EventType("mes.operator.order_started.v1", OrderStartedV1, "operator", "order_started"),
        EventType("mes.operator.order_ended.v1", OrderEndedV1, "operator", "order_ended"),
        EventType("mes.operator.scrap.v1", ScrapV1, "operator", "scrap"),
        EventType("mes.erp.order.released.v1", OrderReleasedV1, "erp", "released"),
        EventType("mes.erp.order.changed.v1", OrderChangedV1, "erp", "changed"),
        EventType("mes.erp.order.cancelled.v1", OrderCancelledV1, "erp", "cancelled"),
        EventType(
            "mes.hub.delivery_forecast.changed.v1",
            DeliveryForecastChangedV1,
            "hub",
            "delivery_forecast",
            entity="order",
        ),
        EventType(
            "mes.hub.order.progressed.v1", OrderProgressedV1, "hub", "progressed", entity="order"
        ),
        EventType(
            "mes.hub.plant.configured.v1", PlantConfiguredV1, "hub", "configured", entity="plant"
        ),
        EventType("mes.hub.webhook.due.v1", WebhookDueV1, "hub", "webhook_due", entity="order"),
        EventType(
            "mes.hub.webhooks.changed.v1",
            WebhooksChangedV1,
            "hub",
            "webhooks_changed",
            entity="webhooks",
        ),
        EventType(
            "mes.hub.order.confirmation_due.v1",
            ConfirmationDueV1,
            "hub",
            "confirmation_due",
            entity="order",
        ),
        EventType(
            "mes.hub.delivery.attempted.v1",
            DeliveryAttemptedV1,
            "hub",
            "delivery_attempted",
            entity="order",
        ),
    )
}
