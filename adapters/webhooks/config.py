"""The ``[[webhook]]`` entries of ``mes-hub.toml``: one per partner endpoint the hub sends signed
webhooks to (docs/webhooks.md). Validated at start; an error names the file, the key
(``webhook[0].customers``) and the reason.

```toml
[[webhook]]
name = "customer-c7"                          # the endpoint's id: letters, digits, - and _
url = "https://hooks.c7.example/mes"
secret = { env = "C7_WEBHOOK_SECRET" }        # its whsec_ secret(s), never written here
customers = ["C-7"]                           # the orders it may see (or all_customers = true)
events = ["mes.order.started.v1", "mes.order.confirmed.v1"]   # default: every type
```
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.erp.base import SecretRef, by_reference, url_without_credentials
from contracts import PARTNER_EVENT_TYPES
from hub.outbound import Allowlist
from hub.settings import ConfigError, section_values, validation_problems

SECTION = "webhook"


class WebhookConfigError(ConfigError):
    """A ``[[webhook]]`` entry that cannot be used: names the file, the key and the reason."""


class WebhookEntry(BaseModel):
    """One partner endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # (not in a repr: a receiver's path or query may carry a token)
    url: str = Field(pattern=r"^https?://[^\s]+$", repr=False)
    # The endpoint's secrets, space-separated in the variable or file: two while it rotates.
    secret: Annotated[SecretRef, Field()]
    # Optional: also sign with Ed25519 (v1a), with this whsk_ key (its whpk_ is published).
    signing_key: SecretRef | None = None
    events: list[str] = Field(default_factory=lambda: sorted(PARTNER_EVENT_TYPES), min_length=1)
    customers: list[str] = Field(default_factory=list)
    all_customers: bool = False
    part_numbers: list[str] = Field(default_factory=list)
    orders: list[str] = Field(default_factory=list)
    allow: list[str] = Field(
        default_factory=list,
        description="Internal networks this endpoint may be on (factory receivers); else refused",
    )
    timeout_s: float = Field(default=15.0, gt=0, le=60)
    rate_per_s: float | None = Field(
        default=None, gt=0, le=10_000, description="Webhooks started per second at most"
    )

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        refusal = "credentials never go in the URL (the secret signs instead)"
        return url_without_credentials(value, refusal)

    @field_validator("secret", "signing_key", mode="before")
    @classmethod
    def _by_reference(cls, value: object) -> object:
        return by_reference(value)

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(PARTNER_EVENT_TYPES))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a partner event type")
        return value

    @model_validator(mode="after")
    def _sees_whose_orders(self) -> WebhookEntry:
        # A partner never sees another's orders: whose it may see is said, never assumed.
        if not self.customers and not self.all_customers:
            raise ValueError("say whose orders it may see: customers = [...] or all_customers")
        if self.customers and self.all_customers:
            raise ValueError("customers and all_customers exclude each other")
        host = (urlsplit(self.url).hostname or "").lower()
        if self.url.startswith("http://") and host not in {a.lower() for a in self.allow}:
            allowed = self.allowlist()
            try:  # an address in an allowed network may be called over http
                plain = any(ipaddress.ip_address(host) in net for net in allowed.networks)
            except ValueError:
                plain = False
            if not plain:
                raise ValueError("url must be https unless allow names its host or network")
        return self

    def allowlist(self) -> Allowlist:
        return Allowlist.of(self.allow)

    def secrets(self) -> list[str]:
        """The endpoint's current secrets (read when needed: a rotation needs no restart)."""
        return self.secret.read().get_secret_value().split()


def webhook_section(
    entries: Any, source: str, env: Mapping[str, str] | None = None
) -> list[WebhookEntry]:
    """Every ``[[webhook]]`` entry, with ``MES_HUB_WEBHOOK__<N>__<KEY>`` overrides."""
    if not isinstance(entries, list):
        raise WebhookConfigError(source, SECTION, "must be an array of tables: [[webhook]]")
    numbered = {str(n): entry for n, entry in enumerate(entries)}
    values, origins = section_values(SECTION, numbered, source, os.environ if env is None else env)
    found: list[WebhookEntry] = []
    names: set[str] = set()
    for n in sorted(int(k) for k in values if k.isdigit()):
        raw, key = values[str(n)], f"{SECTION}[{n}]"
        if not isinstance(raw, dict):
            raise WebhookConfigError(source, key, "must be a table")
        try:
            entry = WebhookEntry.model_validate(raw)
        except ValidationError as exc:
            problems = validation_problems(exc, key, {}, origins.get(str(n), source))
            raise WebhookConfigError.of(problems) from None
        if entry.name in names:
            raise WebhookConfigError(source, f"{key}.name", f"{entry.name!r} is used twice")
        names.add(entry.name)
        found.append(entry)
    return found
