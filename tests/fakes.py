"""Fakes of the hub's ports for unit tests: no database, no NATS."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import project_aggregate
from eventsourcing.domain import Aggregate

from contracts import CloudEvent, dedupe_key
from hub.errors import ConcurrentWrite
from hub.store import Commit, Entity, Sealed


class InMemoryStore:
    """The fake ``hub.ingest.IngestStore``: each aggregate kept as its events (a load replays
    them, as the real store does without a snapshot), and a commit refused whole, with
    ``ConcurrentWrite``, when the real store's constraints would refuse it."""

    def __init__(self) -> None:
        self.events: dict[UUID, list[Any]] = {}
        self.tracking: dict[str, set[int]] = {}
        self.received: dict[str, int] = {}  # dedupe key -> stream position
        self.entities: list[Entity] = []
        self.snapshots: list[tuple[UUID, int]] = []  # (aggregate, version) of each taken
        self.commits = 0

    def tracking_position(self, tracking_name: str) -> int:
        return max(self.tracking.get(tracking_name, ()), default=0)

    def received_events(
        self, events: Sequence[CloudEvent], legacy_margin_s: float = 0.0
    ) -> set[str]:
        return {key for key in map(dedupe_key, events) if key in self.received}

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        return {a for a in aggregate_ids if a in self.events}

    def load(self, aggregate_id: UUID) -> Aggregate | None:
        found = project_aggregate(None, self.events.get(aggregate_id, ()))
        assert found is None or isinstance(found, Aggregate)
        return found

    def seal(self, aggregates: Iterable[Aggregate], snapshot: Iterable[Aggregate] = ()) -> Sealed:
        return Sealed(
            [e for aggregate in aggregates for e in aggregate.collect_events()],
            [(a.id, a.version) for a in snapshot],
        )

    def write(self, commit: Commit) -> None:
        sealed, tracking, received = commit.sealed, commit.tracking, commit.received
        pending = sealed.events
        versions = {a: len(events) for a, events in self.events.items()}
        for event in pending:
            expected = versions.get(event.originator_id, 0) + 1
            if event.originator_version != expected:
                raise ConcurrentWrite(f"{event.originator_id} v{event.originator_version} taken")
            versions[event.originator_id] = expected
        keys = [r.key for r in received]
        if len(set(keys)) != len(keys) or any(key in self.received for key in keys):
            raise ConcurrentWrite("a received key is taken")
        if tracking.notification_id in self.tracking.get(tracking.application_name, ()):
            raise ConcurrentWrite(f"tracking {tracking} taken")
        for event in pending:
            self.events.setdefault(event.originator_id, []).append(event)
        self.tracking.setdefault(tracking.application_name, set()).add(tracking.notification_id)
        self.received.update((r.key, r.stream_seq) for r in received)
        self.entities.extend(commit.new_entities)
        self.snapshots.extend(sealed.snapshots)
        self.commits += 1
