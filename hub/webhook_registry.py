"""Partners and their webhook endpoints as the hub keeps them: a fold of the site's
``mes.hub.webhooks.changed.v1`` events (``contracts.WebhooksChangedV1``), so who registered which
endpoint, who paused it and why the hub disabled it stay in the store for the auditors.

A **partner** is a supplier or a customer: the orders it may see (its customers' orders, orders
of its part numbers, named orders, or all of them — never assumed), its API keys (kept as
SHA-256 hashes: a key is shown once, when issued) and its endpoints. An **endpoint** is a URL
with the event types it wants, filters narrowing what its partner may see (customers, part
numbers, orders), the networks it may be on (``allow``), a rate limit, its secrets (kept by id
and fingerprint here; their values live in the data dir, ``adapters.webhooks.secrets``) and its
status: ``active``, ``paused`` (by someone) or ``disabled`` (by the hub: ``410 Gone``, or failing
for days). While paused or disabled an endpoint is still owed what it would have received; it
goes out when it is resumed. The ``[[webhook]]`` endpoints of the config file are not defined
here, but their status is (they can be paused and disabled too).

The fold is lenient (a change naming what no longer exists changes nothing): the API checks a
change before it asks for it, and a change stored once must apply the same way on every replay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_PARTNER_FIELDS = ("name", "kind", "customers", "part_numbers", "orders", "all_orders")
_ENDPOINT_FIELDS = (
    "url", "events", "customers", "part_numbers", "orders", "allow", "rate_per_s",
    "timeout_s", "sign_ed25519",
)  # fmt: skip


def empty() -> dict[str, Any]:
    return {"partners": {}, "endpoints": {}, "changes": 0}


def apply_change(state: Mapping[str, Any], change: Mapping[str, Any], at: str) -> dict[str, Any]:
    """``state`` after ``change`` (a ``WebhooksChangedV1``'s data) made at ``at`` (ISO time)."""
    new = copy.deepcopy(dict(state)) if state else empty()
    partners: dict[str, Any] = new.setdefault("partners", {})
    endpoints: dict[str, Any] = new.setdefault("endpoints", {})
    new["changes"] = int(new.get("changes", 0)) + 1
    action = change["action"]
    fields = dict(change.get("fields") or {})
    partner_id: str | None = change.get("partner_id")
    endpoint_id: str | None = change.get("endpoint_id")
    partner = partners.get(partner_id) if partner_id else None
    endpoint = endpoints.get(endpoint_id) if endpoint_id else None
    if action == "partner_saved" and partner_id:
        if partner is None:
            partner = partners[partner_id] = {
                "partner_id": partner_id, "name": partner_id, "kind": "customer",
                "customers": [], "part_numbers": [], "orders": [], "all_orders": False,
                "keys": {}, "created_at": at,
            }  # fmt: skip
        partner.update((f, fields[f]) for f in _PARTNER_FIELDS if f in fields)
        partner["updated_at"] = at
    elif action == "partner_deleted" and partner_id and partner is not None:
        del partners[partner_id]
        for gone in [e for e, v in endpoints.items() if v.get("partner_id") == partner_id]:
            _retire(new, gone)
    elif action == "key_issued" and partner is not None and change.get("key_id"):
        partner["keys"][change["key_id"]] = {
            "role": fields.get("role", partner["kind"]), "hash": fields["hash"],
            "issued_at": at, "revoked_at": None,
        }  # fmt: skip
    elif action == "key_revoked" and partner is not None:
        key = partner["keys"].get(change.get("key_id"))
        if key is not None and key["revoked_at"] is None:
            key["revoked_at"] = at
    elif action == "endpoint_saved" and endpoint_id:
        if endpoint is None:
            if partner_id is None or partner is None:
                return new  # (an endpoint belongs to a partner that exists)
            endpoint = endpoints[endpoint_id] = {
                "endpoint_id": endpoint_id, "partner_id": partner_id, "url": "",
                "events": [], "customers": [], "part_numbers": [], "orders": [], "allow": [],
                "rate_per_s": None, "timeout_s": 15.0, "sign_ed25519": False, "secrets": [],
                "status": "active", "status_reason": "", "status_at": at, "created_at": at,
            }  # fmt: skip
        endpoint.update((f, fields[f]) for f in _ENDPOINT_FIELDS if f in fields)
        if "secret" in fields:  # its first secret
            endpoint["secrets"] = [{**fields["secret"], "created_at": at, "expires_at": None}]
        endpoint["updated_at"] = at
    elif action == "endpoint_deleted" and endpoint_id and endpoint is not None:
        _retire(new, endpoint_id)
    elif action == "secret_rotated" and endpoint is not None:
        # The old ones sign alongside the new until ``expires_at`` (the overlap).
        for secret in endpoint["secrets"]:
            if secret["expires_at"] is None or secret["expires_at"] > fields["old_expire_at"]:
                secret["expires_at"] = fields["old_expire_at"]
        endpoint["secrets"].append({**fields["secret"], "created_at": at, "expires_at": None})
    elif action in ("endpoint_paused", "endpoint_resumed", "endpoint_disabled") and endpoint_id:
        if endpoint is None:
            if partner_id is not None:
                return new
            # A [[webhook]] endpoint of the config file: only its status is kept here.
            endpoint = endpoints[endpoint_id] = {
                "endpoint_id": endpoint_id, "partner_id": None, "created_at": at,
            }  # fmt: skip
        status = {"endpoint_paused": "paused", "endpoint_resumed": "active"}.get(action, "disabled")
        endpoint.update(status=status, status_reason=str(change.get("reason") or ""), status_at=at)
    return new


def _retire(state: dict[str, Any], endpoint_id: str) -> None:
    """Gone, its id never to be used again: what was sent under it stays its partner's."""
    del state["endpoints"][endpoint_id]
    state["retired"] = sorted({*state.get("retired", ()), endpoint_id})


@dataclass(frozen=True)
class Registry:
    """The registry's state, read."""

    state: Mapping[str, Any]

    @property
    def partners(self) -> dict[str, dict[str, Any]]:
        return dict(self.state.get("partners", {}))

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        """Every endpoint the registry knows of: the partners' and the config file's (those
        with a status only)."""
        return dict(self.state.get("endpoints", {}))

    def partner(self, partner_id: str) -> dict[str, Any] | None:
        return self.partners.get(partner_id)

    def endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        return self.endpoints.get(endpoint_id)

    def status(self, endpoint_id: str) -> str:
        return str((self.endpoint(endpoint_id) or {}).get("status") or "active")

    def partner_endpoints(self) -> list[dict[str, Any]]:
        """The endpoints registered for partners (not the config file's)."""
        return [e for e in self.endpoints.values() if e.get("partner_id")]

    def used(self, endpoint_id: str) -> bool:
        """Whether the id names an endpoint, or did (a deleted one's id is not used again)."""
        return endpoint_id in self.endpoints or endpoint_id in self.state.get("retired", ())

    def key_owner(self, key_hash: str) -> tuple[str, str] | None:
        """(partner id, role) of the partner key with this hash, unless revoked."""
        for partner_id, partner in self.partners.items():
            for key in partner.get("keys", {}).values():
                if key["hash"] == key_hash and key["revoked_at"] is None:
                    return partner_id, str(key["role"])
        return None
