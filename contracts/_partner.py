"""What the hub tells partners (suppliers and customers) about their orders: the data of the
CloudEvents its webhooks carry (docs/webhooks.md).

These are not events the hub takes in: they are derived from what it stored (an order's start,
its delivery forecast, its production confirmations and the ERP's acknowledgements), so they have
no NATS subject. Each says which order it is about and what the partner may know of it: the
order's id, customer, part number, quantity and due date as the ERP released them; and the hub's
latest signed audit checkpoint when it was decided (``checkpoint``), for the partner to keep.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr

from contracts._types import (
    CHECKPOINT_DESCRIPTION,
    CheckpointReference,
    DeliveryStatus,
    EventTime,
    Token,
    _Data,
)


class _PartnerOrder(_Data):
    order_id: Token
    customer: StrictStr | None = Field(default=None, max_length=256)
    part_number: StrictStr | None = Field(default=None, max_length=128)
    quantity: StrictInt | None = Field(default=None, gt=0)
    due: EventTime | None = None
    checkpoint: CheckpointReference | None = Field(default=None, description=CHECKPOINT_DESCRIPTION)


class OrderStartedWebhookV1(_PartnerOrder):
    """The order began: its first run started on a machine."""

    machine_id: Token
    started_at: EventTime


class OrderProgressWebhookV1(_PartnerOrder):
    """Where the order stands: good parts and scrap so far (sent at most once per interval)."""

    good: StrictInt = Field(ge=0)
    scrap: StrictInt = Field(ge=0)
    remaining: StrictInt | None = Field(default=None, ge=0)
    percent_complete: StrictFloat | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


class OrderAtRiskWebhookV1(_PartnerOrder):
    """The delivery forecast says the order will miss its due date (``at_risk``), or it has
    (``late``)."""

    status: Literal[DeliveryStatus.AT_RISK, DeliveryStatus.LATE]
    eta: EventTime | None = None


class OrderEtaChangedWebhookV1(_PartnerOrder):
    """The forecast end of the order moved by more than the plant's tolerance."""

    eta: EventTime
    previous_eta: EventTime
    status: DeliveryStatus | None = None


class OrderCompletedWebhookV1(_PartnerOrder):
    """The order's good parts reached its quantity."""

    good: StrictInt = Field(ge=0)
    scrap: StrictInt = Field(ge=0)
    completed_at: EventTime


class OrderConfirmedWebhookV1(_PartnerOrder):
    """The plant's ERP acknowledged a production confirmation of the order: the quantities are
    booked. A correction's may be negative."""

    sequence: StrictInt = Field(ge=1)
    yield_quantity: StrictInt
    scrap_quantity: StrictInt
    yield_total: StrictInt | None = Field(default=None, ge=0)
    scrap_total: StrictInt | None = Field(default=None, ge=0)
    final: StrictBool
    confirmed_at: EventTime


PARTNER_EVENT_TYPES: dict[str, type[_PartnerOrder]] = {
    "mes.order.started.v1": OrderStartedWebhookV1,
    "mes.order.progress.v1": OrderProgressWebhookV1,
    "mes.order.at_risk.v1": OrderAtRiskWebhookV1,
    "mes.order.eta_changed.v1": OrderEtaChangedWebhookV1,
    "mes.order.completed.v1": OrderCompletedWebhookV1,
    "mes.order.confirmed.v1": OrderConfirmedWebhookV1,
}
