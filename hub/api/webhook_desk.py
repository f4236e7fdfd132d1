"""What the API does with partners and their webhook endpoints (``hub.api.routes.partners``,
``hub.api.routes.webhooks``): each change is stored as a ``mes.hub.webhooks.changed.v1`` and
takes effect at once — the senders look at the registry again — and the deliveries an endpoint
was owed are read from the outbox view.

Keys and secrets are made here, shown once by the route that asked, and never stored in the
clear: a partner key by its SHA-256 (in the store), a ``whsec_`` secret in the data dir
(``adapters.webhooks.secrets``) with its id and fingerprint in the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets as random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.webhooks.secrets import EndpointSecrets
from hub.domain import order_aggregate_id
from hub.files import write_whole
from hub.outbox import OutboxMessage
from hub.webhook_registry import Registry
from projections.processes.webhook_endpoints import EndpointSenders, RegistryCache, WebhookChanges
from projections.views.outbox_view import OutboxReader

PARTNER_KEY = "mhp_"  # a partner's API key: told apart from the hub's own keys at a glance
REQUEUE_CHUNK = 200


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_partner_key() -> str:
    return PARTNER_KEY + random.token_urlsafe(32)


@dataclass
class WebhookDesk:
    """See the module."""

    site: str
    registry: RegistryCache
    changes: WebhookChanges
    secrets: EndpointSecrets
    outbox: OutboxReader
    requeue: Callable[[OutboxMessage, str, str], Awaitable[None]]
    senders: EndpointSenders
    store_position: Callable[[], int]
    since_file: Callable[[str], Path]  # where an endpoint's first store position is kept
    history: Callable[[UUID], list[Any]]  # an aggregate's stored events
    config_endpoints: tuple[str, ...] = ()  # the [[webhook]] entries' names

    async def fresh(self) -> Registry:
        self.registry.invalidate()
        return await asyncio.to_thread(self.registry)

    async def change(self, change: dict[str, Any]) -> None:
        await self.changes(change)
        self.senders.refresh()

    async def issue_key(self, partner_id: str, role: str, by: str) -> tuple[str, str]:
        key, key_id = new_partner_key(), "k_" + random.token_hex(6)
        await self.change(
            {"action": "key_issued", "partner_id": partner_id, "key_id": key_id,
             "fields": {"role": role, "hash": key_hash(key)}, "by": by}
        )  # fmt: skip
        return key_id, key

    async def register_endpoint(
        self, partner_id: str, endpoint_id: str, fields: dict[str, Any], by: str
    ) -> str:
        """A new endpoint and its first secret (returned: shown once)."""
        secret_id, secret, fingerprint = await asyncio.to_thread(self.secrets.add, endpoint_id)
        # Owed what is decided from now on: its sender reads the outbox from this position.
        position = await asyncio.to_thread(self.store_position)
        await asyncio.to_thread(write_whole, self.since_file(endpoint_id), str(position))
        fields = {**fields, "secret": {"id": secret_id, "fingerprint": fingerprint}}
        await self.change(
            {"action": "endpoint_saved", "partner_id": partner_id, "endpoint_id": endpoint_id,
             "fields": fields, "by": by}
        )  # fmt: skip
        return secret

    async def rotate(self, endpoint: dict[str, Any], overlap_s: float, by: str) -> str:
        """A new secret; the old ones keep signing for ``overlap_s`` (returned: shown once)."""
        endpoint_id = endpoint["endpoint_id"]
        secret_id, secret, fingerprint = await asyncio.to_thread(self.secrets.add, endpoint_id)
        until = (datetime.now(UTC) + timedelta(seconds=overlap_s)).isoformat()
        await self.change(
            {"action": "secret_rotated", "partner_id": endpoint["partner_id"],
             "endpoint_id": endpoint_id, "by": by,
             "fields": {"secret": {"id": secret_id, "fingerprint": fingerprint},
                        "old_expire_at": until}}
        )  # fmt: skip
        return secret

    async def delete_endpoint(self, endpoint: dict[str, Any], by: str) -> None:
        endpoint_id = endpoint["endpoint_id"]
        await self.change(
            {"action": "endpoint_deleted", "partner_id": endpoint["partner_id"],
             "endpoint_id": endpoint_id, "by": by}
        )  # fmt: skip
        await asyncio.to_thread(self.secrets.forget, endpoint_id)

    async def set_status(self, endpoint_id: str, action: str, by: str, reason: str = "") -> None:
        endpoint = (await self.fresh()).endpoint(endpoint_id) or {}
        await self.change(
            {"action": action, "partner_id": endpoint.get("partner_id"),
             "endpoint_id": endpoint_id, "by": by, "reason": reason}
        )  # fmt: skip

    async def resume(self, endpoint_id: str, by: str) -> int:
        """Active again; what failed or died meanwhile goes now, in order (with what was never
        tried). Returns how many were asked for again."""
        await self.set_status(endpoint_id, "endpoint_resumed", by)
        return await self._requeue_where(endpoint_id, by, outcomes=("failed", "dead"))

    async def replay(self, endpoint_id: str, since: datetime, by: str) -> int:
        """Everything decided for the endpoint since ``since`` goes again (the same
        ``webhook-id`` each: the partner drops what it has), in order per order; a disabled
        endpoint is active again. Returns how many were asked for again."""
        if (await self.fresh()).status(endpoint_id) == "disabled":
            await self.set_status(endpoint_id, "endpoint_resumed", by, "replay")
        return await self._requeue_where(endpoint_id, by, since=since)

    async def redeliver(self, endpoint_id: str, message: OutboxMessage, by: str) -> None:
        await self.requeue(message, endpoint_id, by)
        self.senders.rewind(endpoint_id, message.position - 1)

    async def _requeue_where(
        self,
        endpoint_id: str,
        by: str,
        *,
        outcomes: tuple[str, ...] = (),
        since: datetime | None = None,
    ) -> int:
        count, first, before = 0, None, None
        tried = outcomes or ("delivered", "duplicate", "failed", "dead", "requeued")
        while True:
            page = await asyncio.to_thread(
                self.outbox.addressed, endpoint_id, before=before, since=since,
                outcomes=tried, limit=REQUEUE_CHUNK,
            )  # fmt: skip
            if not page:
                break
            for message in page:
                await self.requeue(message, endpoint_id, by)
            count += len(page)
            first = page[-1].position
            before = first
        if first is not None:
            self.senders.rewind(endpoint_id, first - 1)
        return count

    async def attempts(self, message: OutboxMessage, endpoint_id: str) -> list[dict[str, Any]]:
        """Every stored attempt to deliver ``message`` to the endpoint, oldest first."""
        stored = await asyncio.to_thread(
            self.history, order_aggregate_id(message.site, message.ordering_key)
        )
        found = []
        for event in stored:
            attempt = getattr(event, "attempt", None)
            if (
                isinstance(attempt, dict)
                and attempt.get("message_id") == message.key
                and attempt.get("destination") == endpoint_id
            ):
                found.append({**attempt, "recorded_at": event.event_time.isoformat()})
        return found
