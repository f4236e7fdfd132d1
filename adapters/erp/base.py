"""What every ERP dialect shares: its ``[[erp]]`` entry's common keys, secrets by reference, and
the two ports a dialect implements — orders in (``OrderSource``) and confirmations out
(``ConfirmationSender``).

```toml
[[erp]]
name = "odoo-main"                      # a token: names the ERP in logs, events and the API
dialect = "odoo"                        # rest | odoo | erpnext | sap | soap | b2mml
url = "https://erp.plant1.example"
user = "mes-hub"
secret = { env = "ODOO_API_KEY" }       # or { file = "/run/secrets/odoo" }: never inline
allow = ["10.0.0.0/8"]                  # internal addresses this entry may call (hub.outbound)
timeout_s = 10
poll_interval_s = 60                    # orders in; 0: this ERP sends no orders
confirm = true                          # production confirmations out
```

Each dialect module defines its entry model on ``ErpEntryBase`` (``dialect`` a literal), and
``adapters.erp.config`` gathers them; a bad entry stops the hub at start naming the file, the
key and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Protocol
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from contracts import CloudEvent
from hub.outbound import Allowlist
from hub.outbox import Delivered, DeliveryFailed

ERP_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _zone_name(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
    return value


# A plant's time zone, as the entries of several dialects name it (ERP times are often local).
ZoneName = Annotated[str, AfterValidator(_zone_name)]


class SecretRef(BaseModel):
    """A secret named, not written: the environment variable or the file that holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None

    @model_validator(mode="after")
    def _one_place(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError('give the secret as { env = "VARIABLE" } or { file = "path" }')
        return self

    def read(self) -> SecretStr:
        """The secret's value; a ``ValueError`` naming where it was looked for, never it."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ValueError(f"environment variable {self.env} is not set")
            return SecretStr(value)
        assert self.file is not None
        try:
            return SecretStr(self.file.read_text().strip())
        except OSError as exc:
            raise ValueError(f"cannot read {self.file}: {exc.strerror}") from None


def url_without_credentials(value: str, refusal: str) -> str:
    """A configured URL: it names a host and carries no credentials (they would show wherever
    the URL does: logs, attempt records, ``erp check``); ``refusal``: what to say if it does."""
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise ValueError(refusal)
    if not parts.hostname:
        raise ValueError("must name a host")
    return value


def by_reference(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(
            'a secret is never written in the config: give { env = "VARIABLE" } or '
            '{ file = "path" }'
        )
    return value


class ErpEntryBase(BaseModel):
    """The keys every ``[[erp]]`` entry has; a dialect adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ERP_NAME_PATTERN)
    url: str = Field(pattern=r"^https?://[^\s]+$", description="The ERP's base URL")
    user: str | None = Field(default=None, max_length=256)
    secret: Annotated[SecretRef | None, Field(default=None)] = None
    allow: list[str] = Field(
        default_factory=list,
        description="Internal hosts or networks this entry may call (else refused)",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    poll_interval_s: float = Field(default=60.0, ge=0, le=86_400)
    confirm: bool = True

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        return url_without_credentials(value, "credentials go in user and secret, never in the URL")

    @field_validator("secret", mode="before")
    @classmethod
    def _secret_by_reference(cls, value: object) -> object:
        return by_reference(value)

    def allowlist(self) -> Allowlist:
        return Allowlist.of(self.allow)


# --- orders in ---------------------------------------------------------------------------------


class OrderSource(Protocol):
    """An ERP's orders, read incrementally: the changes after ``cursor`` (None: from the start)
    as ``mes.erp.order.released|changed|cancelled.v1`` CloudEvents, and the cursor to ask with
    next time. Event ids derive from the ERP's record id and modification stamp, so reading the
    same state again publishes nothing new."""

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]: ...


# --- confirmations out -------------------------------------------------------------------------


CHECKPOINT_HEADER = "Mes-Hub-Checkpoint"


@dataclass(frozen=True)
class Confirmation:
    """A production confirmation the hub decided on (``mes.hub.order.confirmation_due.v1``):
    what one run of an order made, or a correction of what was confirmed before."""

    key: str  # the idempotency key: the stored event's and the ERP's, stable across retries
    order_id: str
    sequence: int  # the order's confirmations, 1, 2, …
    machine_id: str | None
    operation: str | None
    yield_quantity: int  # good parts (a correction: the difference, may be negative)
    scrap_quantity: int
    start: datetime | None
    end: datetime | None
    final: bool
    correction_of: int | None  # the sequence corrected, if this is a correction
    posted_at: datetime  # when the hub decided it (the posting date)
    # The order's good parts and scrap confirmed in all, this one included (None: decided by
    # a hub from before they were told): what a reversal and re-post posts again.
    yield_total: int | None = None
    scrap_total: int | None = None
    # The keys this ERP was sent the order's earlier confirmations with: how a dialect that
    # reverses them tells the hub's postings from anyone else's.
    earlier_keys: tuple[str, ...] = ()
    # The hub's latest signed audit checkpoint when it was decided, "<origin> <size> <base64
    # root>" (``hub.sealer.checkpoint_reference``; None: none signed yet): each dialect leaves
    # it where its ERP keeps it, so the ERP holds copies of the hub's checkpoints.
    checkpoint: str | None = None

    def checkpoint_header(self) -> dict[str, str]:
        """``Mes-Hub-Checkpoint: <checkpoint>`` for an HTTP call that carries the confirmation
        (none without one, or for an origin that is not printable ASCII, which no header
        carries unencoded: the body still has it)."""
        value = self.checkpoint
        if value is None or not (value.isascii() and value.isprintable()):
            return {}
        return {CHECKPOINT_HEADER: value}


class ConfirmationSender(Protocol):
    """Tells one ERP about one confirmation, idempotently by ``confirmation.key``: returns
    ``hub.outbox.Delivered`` (a repeated key the ERP had already counts as delivered) or raises
    ``hub.outbox.DeliveryFailed``."""

    async def send(self, confirmation: Confirmation) -> Delivered: ...

    async def close(self) -> None: ...


__all__ = [
    "CHECKPOINT_HEADER",
    "Confirmation",
    "ConfirmationSender",
    "Delivered",
    "DeliveryFailed",
    "ErpEntryBase",
    "OrderSource",
    "SecretRef",
    "ZoneName",
]
