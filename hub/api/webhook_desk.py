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
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.webhooks.secrets import EndpointSecrets
from hub.api.problems import Problem
from hub.domain import order_aggregate_id
from hub.files import write_whole
from hub.outbox import OutboxMessage
from hub.ports import Asker
from hub.webhook_registry import Registry
from projections.processes.webhook_endpoints import EndpointSenders, RegistryCache, WebhookChanges
from projections.views.outbox_view import OutboxReader

PARTNER_KEY = "mhp_"  # a partner's API key: told apart from the hub's own keys at a glance
REQUEUE_CHUNK = 200
_TRIED = ("delivered", "duplicate", "failed", "dead", "requeued")  # (not: never tried yet)


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
    requeue: Callable[[OutboxMessage, str, Asker], Awaitable[None]]
    senders: EndpointSenders
    store_position: Callable[[], int]
    since_file: Callable[[str], Path]  # where an endpoint's first store position is kept
    history: Callable[[UUID], list[Any]]  # an aggregate's stored events
    config_endpoints: tuple[str, ...] = ()  # the [[webhook]] entries' names
    reserved: tuple[str, ...] = ()  # names an endpoint may not take (the ERPs', the config's)

    async def fresh(self) -> Registry:
        return await asyncio.to_thread(self.registry.fresh)

    async def change(self, change: dict[str, Any], asker: Asker | None = None) -> None:
        """Record ``change`` (``asker``: who asked, kept in its ``by`` and named its actor)."""
        if asker is not None:
            change = {**change, "by": asker.by}
        try:
            await self.changes(change, asker)
        except TimeoutError:
            # Sent, not stored yet (ingest is behind): it takes effect when it is.
            raise Problem(
                503, "the change was sent but is not stored yet; look again shortly",
                headers={"Retry-After": "5"},
            ) from None  # fmt: skip
        finally:
            self.senders.refresh()

    async def issue_key(self, partner_id: str, role: str, asker: Asker) -> tuple[str, str]:
        key, key_id = new_partner_key(), "k_" + random.token_hex(6)
        await self.change(
            {"action": "key_issued", "partner_id": partner_id, "key_id": key_id,
             "fields": {"role": role, "hash": key_hash(key)}}, asker
        )  # fmt: skip
        return key_id, key

    async def register_endpoint(
        self, partner_id: str, endpoint_id: str, fields: dict[str, Any], asker: Asker
    ) -> str:
        """A new endpoint and its first secret (returned: shown once)."""
        secret_id, secret, fingerprint = await asyncio.to_thread(self.secrets.add, endpoint_id)
        # Owed what is decided from now on: its sender reads the outbox from this position.
        position = await asyncio.to_thread(self.store_position)
        await asyncio.to_thread(write_whole, self.since_file(endpoint_id), str(position))
        fields = {**fields, "secret": {"id": secret_id, "fingerprint": fingerprint}}
        await self.change(
            {"action": "endpoint_saved", "partner_id": partner_id, "endpoint_id": endpoint_id,
             "fields": fields}, asker
        )  # fmt: skip
        return secret

    async def rotate(self, endpoint: dict[str, Any], overlap_s: float, asker: Asker) -> str:
        """A new secret; the old ones keep signing for ``overlap_s`` (returned: shown once)."""
        endpoint_id = endpoint["endpoint_id"]
        secret_id, secret, fingerprint = await asyncio.to_thread(self.secrets.add, endpoint_id)
        now = datetime.now(UTC)
        until = (now + timedelta(seconds=overlap_s)).isoformat()
        # What expired before is dropped from the data dir (the store keeps its fingerprint).
        live = [
            x["id"]
            for x in endpoint["secrets"]
            if x["expires_at"] is None or datetime.fromisoformat(x["expires_at"]) > now
        ]
        await asyncio.to_thread(self.secrets.forget, endpoint_id, [*live, secret_id])
        await self.change(
            {"action": "secret_rotated", "partner_id": endpoint["partner_id"],
             "endpoint_id": endpoint_id,
             "fields": {"secret": {"id": secret_id, "fingerprint": fingerprint},
                        "old_expire_at": until}}, asker
        )  # fmt: skip
        return secret

    async def delete_endpoint(self, endpoint: dict[str, Any], asker: Asker) -> None:
        endpoint_id = endpoint["endpoint_id"]
        await self.change(
            {"action": "endpoint_deleted", "partner_id": endpoint["partner_id"],
             "endpoint_id": endpoint_id}, asker
        )  # fmt: skip
        await self.forget(endpoint_id)

    async def forget(self, endpoint_id: str) -> None:
        """A deleted endpoint's secrets and failures."""
        await asyncio.to_thread(self.secrets.forget, endpoint_id)
        self.senders.forget_failures(endpoint_id)

    async def set_status(
        self, endpoint_id: str, action: str, asker: Asker, reason: str = ""
    ) -> None:
        endpoint = (await self.fresh()).endpoint(endpoint_id) or {}
        await self.change(
            {"action": action, "partner_id": endpoint.get("partner_id"),
             "endpoint_id": endpoint_id, "reason": reason}, asker
        )  # fmt: skip

    async def resume(self, endpoint_id: str, asker: Asker) -> int:
        """Active again; what failed or died meanwhile goes now, in order (with what was never
        tried). Returns how many were asked for again."""
        self.senders.forget_failures(endpoint_id)  # (its days of failure count afresh)
        await self.set_status(endpoint_id, "endpoint_resumed", asker)
        return await self._requeue_where(endpoint_id, asker, outcomes=("failed", "dead"))

    async def replay(self, endpoint_id: str, since: datetime, asker: Asker) -> int:
        """Everything decided for the endpoint since ``since`` goes again (the same
        ``webhook-id`` each: the partner drops what it has), in order per order; a disabled
        endpoint is active again. Returns how many were asked for again."""
        if (await self.fresh()).status(endpoint_id) == "disabled":
            self.senders.forget_failures(endpoint_id)
            await self.set_status(endpoint_id, "endpoint_resumed", asker, "replay")
        return await self._requeue_where(endpoint_id, asker, since=since)

    async def replay_size(self, endpoint_id: str, since: datetime, cap: int) -> int:
        """How many a replay since ``since`` would send again, counted up to ``cap`` + 1."""
        found = await asyncio.to_thread(
            self.outbox.addressed, endpoint_id, since=since, outcomes=_TRIED, limit=cap + 1
        )
        return len(found)

    async def redeliver(self, endpoint_id: str, message: OutboxMessage, asker: Asker) -> None:
        self.senders.rewind(endpoint_id, message.position - 1)
        await self._requeue(message, endpoint_id, asker)

    async def _requeue(self, message: OutboxMessage, endpoint_id: str, asker: Asker) -> None:
        # Counted from the attempts made, which the view may not show yet: a requeue that
        # counted fewer would be taken for one asked before them (its id) and dropped.
        made = self.senders.attempts_made(endpoint_id, message.key)
        requeued = replace(message, attempts=max(message.attempts, made))
        await self.requeue(requeued, endpoint_id, asker)

    async def _requeue_where(
        self,
        endpoint_id: str,
        asker: Asker,
        *,
        outcomes: tuple[str, ...] = (),
        since: datetime | None = None,
    ) -> int:
        # Oldest first, each order's in sequence (the sender may take a requeued one before
        # the next is asked for: never a later one of its order before an earlier); the
        # sender looks back before the first is asked for.
        count, after = 0, None
        while True:
            page = await asyncio.to_thread(
                self.outbox.addressed, endpoint_id, after=after, since=since,
                outcomes=outcomes or _TRIED, limit=REQUEUE_CHUNK, newest_first=False,
            )  # fmt: skip
            if not page:
                break
            if after is None:
                self.senders.rewind(endpoint_id, page[0].position - 1)
            for message in page:
                await self._requeue(message, endpoint_id, asker)
            count += len(page)
            after = page[-1].position
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
