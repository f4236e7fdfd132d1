"""Small ports the core offers to adapters and entry points, each with a fake beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from contracts import (
    ACTOR_ID,
    ACTOR_KIND,
    ACTOR_ROLE,
    CloudEvent,
    ValidatedEvent,
    dedupe_key,
    nats_subject_for,
    validate_envelope,
)


@dataclass(frozen=True)
class Asker:
    """Who asked the hub for something it then records as its own event (a webhook registry
    change, a message requeued): ``by``, the words kept in the record, and ``actor``, whom the
    event names as its actor (an API key's id and role) instead of the hub's component."""

    by: str
    actor: dict[str, str] | None = None

    def attributes(self) -> dict[str, str]:
        """The CloudEvent extension attributes naming the actor (none without one)."""
        if self.actor is None:
            return {}
        found = {ACTOR_KIND: self.actor["kind"], ACTOR_ID: self.actor["id"]}
        if "role" in self.actor:
            found[ACTOR_ROLE] = self.actor["role"]
        return found


@dataclass(frozen=True)
class PublishReceipt:
    event_id: str
    subject: str
    stream_seq: int | None
    duplicate: bool = False


class EventPublisher(Protocol):
    """Puts one contract event on the way into the hub (NATS in production)."""

    async def publish(self, event: CloudEvent) -> PublishReceipt: ...

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]: ...


@dataclass
class InMemoryPublisher:
    """The fake ``EventPublisher``: validates like the real one and keeps what it was given."""

    site: str = "default"
    published: list[tuple[str, ValidatedEvent]] = field(default_factory=list)

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        validated = validate_envelope(event)
        subject = nats_subject_for(self.site, validated)
        # The same event is the same source and id (CloudEvents), as for the NATS publisher.
        key = dedupe_key(event)
        duplicate = any(dedupe_key(e.envelope) == key for _, e in self.published)
        if not duplicate:
            self.published.append((subject, validated))
        return PublishReceipt(event.id, subject, len(self.published), duplicate)

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        return [await self.publish(e) for e in events]
