"""Wire contracts of mes-hub: what integrators code against.

Public surface:
- ``CloudEvent``: the CloudEvents 1.0 envelope (JSON structured mode).
- the v1 data models and ``EVENT_TYPES`` (type name -> ``EventType``).
- ``decode_event`` / ``encode_event``: bytes <-> validated envelope and data.
- ``ACTOR_EXTENSIONS``: the extension attributes in which the hub says who sent an event.
- ``dedupe_key``: what makes an event unique (``source`` + ``id``), as one token.
- ``check_event_time``: the rule against event times from the future.
- ``nats_subject_for`` / ``check_subject``: the NATS subject rules.
- ``PARTNER_EVENT_TYPES``: what the hub tells partners in its webhooks (type -> data model).
- ``export_json_schemas``: one JSON Schema file per type, both kinds.

Errors::

    ContractViolation   every rejection: ``reason``, and ``field`` where one is at fault

This package imports nothing else of mes-hub.
"""

from contracts._envelope import (
    ACTOR_EXTENSIONS,
    ACTOR_ID,
    ACTOR_KIND,
    ACTOR_ROLE,
    MAX_EXTENSIONS,
    CloudEvent,
    ValidatedEvent,
    check_event_time,
    decode_event,
    dedupe_key,
    encode_event,
    typed_events,
    validate_envelope,
)
from contracts._errors import ContractViolation
from contracts._partner import (
    PARTNER_EVENT_TYPES,
    OrderAtRiskWebhookV1,
    OrderCompletedWebhookV1,
    OrderConfirmedWebhookV1,
    OrderEtaChangedWebhookV1,
    OrderProgressWebhookV1,
    OrderStartedWebhookV1,
)
from contracts._schema import export_json_schemas
from contracts._subjects import (
    DLQ_PREFIX,
    check_subject,
    dlq_subject,
    is_token,
    nats_subject_for,
    partition_key,
    partition_of,
)
from contracts._types import (
    EVENT_TYPES,
    Availability,
    AvailabilityV1,
    ConditionLevel,
    ConditionV1,
    ConfirmationDueV1,
    ControllerMode,
    DeliveryAttemptedV1,
    DeliveryForecastChangedV1,
    DeliveryStatus,
    DowntimeReasonV1,
    EventType,
    Execution,
    ExecutionV1,
    OrderCancelledV1,
    OrderChangedV1,
    OrderEndedV1,
    OrderProgressedV1,
    OrderReleasedV1,
    OrderStartedV1,
    PartCountKind,
    PartCountV1,
    PlantConfiguredV1,
    ProgramSentV1,
    ScrapV1,
    Stream,
    Token,
    WebhookDueV1,
    WebhooksChangedV1,
)

__all__ = [
    "ACTOR_EXTENSIONS",
    "ACTOR_ID",
    "ACTOR_KIND",
    "ACTOR_ROLE",
    "DLQ_PREFIX",
    "EVENT_TYPES",
    "MAX_EXTENSIONS",
    "PARTNER_EVENT_TYPES",
    "Availability",
    "AvailabilityV1",
    "CloudEvent",
    "ConditionLevel",
    "ConditionV1",
    "ConfirmationDueV1",
    "ContractViolation",
    "ControllerMode",
    "DeliveryAttemptedV1",
    "DeliveryForecastChangedV1",
    "DeliveryStatus",
    "DowntimeReasonV1",
    "EventType",
    "Execution",
    "ExecutionV1",
    "OrderAtRiskWebhookV1",
    "OrderCancelledV1",
    "OrderChangedV1",
    "OrderCompletedWebhookV1",
    "OrderConfirmedWebhookV1",
    "OrderEndedV1",
    "OrderEtaChangedWebhookV1",
    "OrderProgressWebhookV1",
    "OrderProgressedV1",
    "OrderReleasedV1",
    "OrderStartedV1",
    "OrderStartedWebhookV1",
    "PartCountKind",
    "PartCountV1",
    "PlantConfiguredV1",
    "ProgramSentV1",
    "ScrapV1",
    "Stream",
    "Token",
    "ValidatedEvent",
    "WebhookDueV1",
    "WebhooksChangedV1",
    "check_event_time",
    "check_subject",
    "decode_event",
    "dedupe_key",
    "dlq_subject",
    "encode_event",
    "export_json_schemas",
    "is_token",
    "nats_subject_for",
    "partition_key",
    "partition_of",
    "typed_events",
    "validate_envelope",
]
