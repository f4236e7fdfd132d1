"""Ingest: CloudEvents from JetStream applied to the event store, exactly once.

Per partition, strictly in sequence: fetch a batch -> validate -> dead-letter the bad ones ->
apply the good ones to aggregates -> commit events + tracking position + received keys in ONE
transaction -> ack. The store's tracking position, not the consumer's ack floor, says where to
resume: on every (re)start the partition's consumer is recreated at ``position + 1``, because
JetStream redelivers unacked messages out of order after a crash.

A republished event (same CloudEvent ``source`` and ``id``: the same ``dedupe_key``) is dropped
by the stream's duplicate window, and after that window by the ``received`` table checked here.
An event dated more than ``max_clock_skew_s`` after the hub's clock is dead-lettered.

``Ingestor`` is the synchronous part, with no NATS: it needs of the store only ``IngestStore``
(``hub.store.EventStore`` in production, an in-memory fake in the unit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Tracking
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts import (
    ACTOR_EXTENSIONS,
    ACTOR_ID,
    ACTOR_KIND,
    ACTOR_ROLE,
    DLQ_PREFIX,
    AvailabilityV1,
    CloudEvent,
    ConditionV1,
    ConfirmationDueV1,
    ContractViolation,
    DeliveryAttemptedV1,
    DeliveryForecastChangedV1,
    DowntimeReasonV1,
    ExecutionV1,
    OrderCancelledV1,
    OrderChangedV1,
    OrderEndedV1,
    OrderProgressedV1,
    OrderReleasedV1,
    OrderStartedV1,
    PartCountV1,
    PlantConfiguredV1,
    ProgramSentV1,
    ScrapV1,
    ValidatedEvent,
    WebhookDueV1,
    WebhooksChangedV1,
    check_event_time,
    check_subject,
    decode_event,
    dedupe_key,
    dlq_subject,
    partition_of,
)
from hub.domain import (
    Actor,
    Machine,
    Order,
    Origin,
    Plant,
    Webhooks,
    machine_aggregate_id,
    order_aggregate_id,
    plant_aggregate_id,
    webhooks_aggregate_id,
)
from hub.errors import ConcurrentWrite
from hub.nats import (
    DLQ_REASON_HEADER,
    DLQ_SEQ_HEADER,
    MSG_ID_HEADER,
    STREAM,
    dead_lettered_positions,
)
from hub.nats_auth import SIGNATURE_HEADER, signed_by
from hub.pull import Delivery, PullConsumer
from hub.store import Commit, Entity, Received, Sealed

log = logging.getLogger(__name__)
_A = TypeVar("_A", bound=Aggregate)
_T = TypeVar("_T")


class IngestStore(Protocol):
    """What ingest needs of the event store (``hub.store.EventStore`` implements it)."""

    def tracking_position(self, tracking_name: str) -> int: ...

    def received_events(
        self, events: Sequence[CloudEvent], legacy_margin_s: float = 0.0
    ) -> set[str]: ...

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]: ...

    def load(self, aggregate_id: UUID) -> Aggregate | None: ...

    def seal(self, aggregates: Iterable[Aggregate], snapshot: Iterable[Aggregate] = ()) -> Sealed:
        """The aggregates' new events, and snapshots of ``snapshot``, as they will be stored."""
        ...

    def write(self, commit: Commit) -> None:
        """All of it in one transaction, or ``ConcurrentWrite`` and nothing."""
        ...


class Target(NamedTuple):
    """An aggregate an event touches: its kind, its site and its id there (the plant's is the
    site)."""

    kind: Literal["machine", "order", "plant", "webhooks"]
    site: str
    entity_id: str


def targets(site: str, event: ValidatedEvent) -> tuple[Target, ...]:
    """The aggregates ``event`` touches, the one its subject names first: the machine of a
    machine or operator event, the order of an ERP event, the entity a hub event names (an
    order, or the site's plant); an operator's start or end of an order touches that order too.

    ``contracts.partition_key`` makes the same first choice from the NATS subject alone, before
    decoding: an event is ingested by its first target's partition. (An order an operator starts
    is written from the machine's partition too; a concurrent write there is retried.)"""
    event_type = event.event_type
    kind = event_type.entity or ("order" if event_type.stream == "erp" else "machine")
    site_wide = kind in ("plant", "webhooks")  # (their id is the site)
    first = Target(kind, site, site if site_wide else event.envelope.subject)
    if isinstance(event.data, OrderStartedV1 | OrderEndedV1):
        return first, Target("order", site, event.data.order_id)
    return (first,)


def aggregate_id(target: Target) -> UUID:
    if target.kind == "plant":
        return plant_aggregate_id(target.site)
    if target.kind == "webhooks":
        return webhooks_aggregate_id(target.site)
    make = machine_aggregate_id if target.kind == "machine" else order_aggregate_id
    return make(target.site, target.entity_id)


def _new_aggregate(target: Target) -> Aggregate:
    match target.kind:
        case "machine":
            return Machine(site=target.site, machine_id=target.entity_id)
        case "order":
            return Order(site=target.site, order_id=target.entity_id)
        case "plant":
            return Plant(site=target.site)
        case "webhooks":
            return Webhooks(site=target.site)


def _one(kind: type[_A], aggregates: Sequence[Aggregate]) -> _A:
    """The aggregate of ``kind`` among those an event touches."""
    for aggregate in aggregates:
        if isinstance(aggregate, kind):
            return aggregate
    raise TypeError(f"the event touches no {kind.__name__}")


@dataclass(frozen=True)
class IncomingMessage:
    """What ingest needs of a NATS message: its subject, bytes and stream position, and the
    hub's signature if it has one (``hub.nats_auth``)."""

    subject: str
    data: bytes
    stream_seq: int
    signature: str | None = None


@dataclass(frozen=True)
class Rejected:
    message: IncomingMessage
    reason: str


@dataclass
class IngestStats:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    position: int = 0
    conflicts: int = 0  # batches re-applied after a concurrent write


@dataclass
class _Batch:
    incoming: list[IncomingMessage]
    last_seq: int
    touched: dict[UUID, Aggregate] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    new_entities: list[Entity] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates: int = 0
    versions_before: dict[UUID, int] = field(default_factory=dict)
    sealed: Sealed = field(default_factory=lambda: Sealed((), ()))  # what the commit writes


def utc_now() -> datetime:
    return datetime.now(UTC)


class Ingestor:
    """The synchronous part of ingest for one partition: no NATS, no asyncio.

    It keeps the partition's aggregates in memory between batches (it is their only writer);
    after any failure ``reset()`` drops them so they are reloaded from the store. ``clock`` is
    the hub's clock: an event dated more than ``max_clock_skew_s`` after it is rejected.
    """

    def __init__(
        self,
        store: IngestStore,
        tracking_name: str,
        partition: int = 0,
        partitions: int = 1,
        snapshot_interval: int = 200,
        *,
        clock: Callable[[], datetime] = utc_now,
        max_clock_skew_s: float = 300.0,
        hub_key: bytes | None = None,
        signed_after: int = 0,
    ) -> None:
        self.store = store
        # With it, a hub event (its forecasts, the plant's configuration) after stream position
        # ``signed_after`` is taken only if the hub signed it: NATS permissions keep others from
        # publishing one, and this would still refuse it if they did not. (Those before were
        # published before signing began: a store reading the stream again takes them.)
        self.hub_key = hub_key
        self.signed_after = signed_after
        self.tracking_name = tracking_name
        self.partition = partition
        self.partitions = partitions
        self.snapshot_interval = snapshot_interval
        self.clock = clock
        self.max_clock_skew_s = max_clock_skew_s
        self.stats = IngestStats()
        self._aggregates: dict[UUID, Aggregate] = {}
        self._absent: set[UUID] = set()  # aggregates the store does not have (this batch)
        self._ids: dict[Target, UUID] = {}

    def reset(self) -> None:
        self._aggregates.clear()

    def position(self) -> int:
        self.stats.position = self.store.tracking_position(self.tracking_name)
        return self.stats.position

    def prepare(self, messages: list[IncomingMessage], after: _Batch | None = None) -> _Batch:
        """Validate and apply a batch to the in-memory aggregates and seal what is to be
        stored; nothing is stored yet. ``after``: a batch prepared before this one and not
        committed yet (its events count as received)."""
        messages = sorted(messages, key=lambda m: m.stream_seq)
        batch = _Batch(messages, last_seq=messages[-1].stream_seq)
        now = self.clock()
        valid: list[tuple[IncomingMessage, ValidatedEvent, tuple[Target, ...], Actor]] = []
        for message in messages:
            if message.subject.startswith(DLQ_PREFIX):
                continue  # the dead letters share the stream; they are not ours to apply
            if (
                self.partitions > 1
                and partition_of(message.subject, self.partitions) != self.partition
            ):
                continue
            try:
                event = decode_event(message.data)
                site = check_subject(message.subject, event)
                check_event_time(event.envelope, now, self.max_clock_skew_s)
                self._check_hub_signature(message, event)
                actor = self._actor(message, event)
            except ContractViolation as violation:
                batch.rejected.append(Rejected(message, violation.reason))
                continue
            valid.append((message, event, targets(site, event), actor))
        already = self.store.received_events(
            [e.envelope for _, e, _, _ in valid], legacy_margin_s=self.max_clock_skew_s
        )
        if after is not None:
            already.update(r.key for r in after.received)
        self._find_new_aggregates(t for _, _, touched, _ in valid for t in touched)
        for message, event, touched, actor in valid:
            key = dedupe_key(event.envelope)
            if key in already:
                batch.duplicates += 1
                continue
            already.add(key)
            self._apply(event, [self._aggregate(batch, target) for target in touched], actor)
            batch.received.append(Received(key, message.stream_seq))
        # A snapshot when an aggregate crosses a multiple of the interval, so loading it
        # replays fewer than ``snapshot_interval`` events.
        due = [
            a
            for a in batch.touched.values()
            if a.version // self.snapshot_interval
            > batch.versions_before[a.id] // self.snapshot_interval
        ]
        batch.sealed = self.store.seal(batch.touched.values(), due)
        return batch

    def commit(self, batch: _Batch) -> None:
        """Store a prepared batch. It touches no aggregate, so it may run while the next batch
        is prepared. After a failure the caller ``reset``s (and prepares again)."""
        tracking = Tracking(self.tracking_name, batch.last_seq)
        self.store.write(Commit(batch.sealed, tracking, batch.received, batch.new_entities))
        self.stats.applied += len(batch.received)
        self.stats.duplicates += batch.duplicates
        self.stats.rejected += len(batch.rejected)
        self.stats.batches += 1
        self.stats.position = batch.last_seq

    def _check_hub_signature(self, message: IncomingMessage, event: ValidatedEvent) -> None:
        if self.hub_key is None or event.event_type.stream != "hub":
            return
        if message.stream_seq <= self.signed_after:
            return
        if not signed_by(self.hub_key, message.data, message.signature):
            raise ContractViolation(
                f"a hub event the hub did not publish (no valid {SIGNATURE_HEADER})",
                field="type",
            )

    def _actor(self, message: IncomingMessage, event: ValidatedEvent) -> Actor:
        """Who sent ``event``: the API key named in its actor attributes, which only the hub's
        own publishers may set (so the message must bear the hub's signature); else the hub's
        component or the adapter, by its source."""
        envelope = event.envelope
        extensions = envelope.model_extra or {}
        claimed = {name: extensions[name] for name in ACTOR_EXTENSIONS if name in extensions}
        if claimed:
            vouched = self.hub_key is not None and signed_by(
                self.hub_key, message.data, message.signature
            )
            # (Always: no message from before the hub signed its own ever named an actor.)
            if not vouched:
                raise ContractViolation(
                    f"{', '.join(claimed)}: who sent an event is said by the hub's API only, "
                    f"and this message has no valid {SIGNATURE_HEADER}",
                    field=next(iter(claimed)),
                )
            actor = {"kind": str(claimed.get(ACTOR_KIND, "key")), "id": str(claimed.get(ACTOR_ID))}
            if ACTOR_ROLE in claimed:
                actor["role"] = str(claimed[ACTOR_ROLE])
            return actor
        if event.event_type.stream == "hub":
            return {"kind": "hub", "id": envelope.source}
        return {"kind": "adapter", "id": envelope.source, "role": event.event_type.stream}

    # --- applying one event ----------------------------------------------------------------

    def _aggregate_id(self, target: Target) -> UUID:
        found = self._ids.get(target)
        if found is None:
            found = self._ids[target] = aggregate_id(target)
        return found

    def _find_new_aggregates(self, touched: Iterable[Target]) -> None:
        """Ask the store once per batch which uncached aggregates exist, so that creating a new
        machine or order does not cost a failed load each."""
        wanted = {self._aggregate_id(target) for target in touched}
        wanted.difference_update(self._aggregates)
        self._absent = wanted - self.store.existing(list(wanted))

    def _aggregate(self, batch: _Batch, target: Target) -> Aggregate:
        key = self._aggregate_id(target)
        aggregate = self._aggregates.get(key)
        if aggregate is None:
            if key not in self._absent:
                aggregate = self.store.load(key)
            if aggregate is None:
                aggregate = _new_aggregate(target)
                batch.versions_before[key] = 0
                batch.new_entities.append(Entity(target.kind, target.site, target.entity_id, key))
            self._aggregates[key] = aggregate
        batch.versions_before.setdefault(key, aggregate.version)
        batch.touched[key] = aggregate
        return aggregate

    def _apply(self, event: ValidatedEvent, touched: Sequence[Aggregate], actor: Actor) -> None:
        """Apply ``event``, sent by ``actor``, to the aggregates it touches (``targets``,
        loaded or new)."""
        envelope, data = event.envelope, event.data
        origin = Origin(envelope.id, envelope.source, envelope.time, actor)
        subject = envelope.subject
        match data:
            case AvailabilityV1():
                _one(Machine, touched).report_availability(origin, data.availability.value)
            case ExecutionV1():
                _one(Machine, touched).report_execution(
                    origin,
                    data.execution.value,
                    data.mode.value if data.mode else None,
                    data.program,
                )
            case PartCountV1():
                _one(Machine, touched).report_part_count(origin, data.kind.value, data.count)
            case ConditionV1():
                _one(Machine, touched).report_condition(
                    origin, data.level.value, data.native_code, data.message
                )
            case ProgramSentV1():
                _one(Machine, touched).record_program_sent(
                    origin,
                    data.program,
                    data.file,
                    data.sha256,
                    data.size_bytes,
                    data.sent_bytes,
                    data.outcome,
                    data.started_at,
                    data.port,
                    data.sent_by,
                    data.message,
                )
            case DowntimeReasonV1():
                _one(Machine, touched).give_downtime_reason(
                    origin, data.reason, data.start, data.end, data.operator, data.note
                )
            case ScrapV1():
                _one(Machine, touched).report_scrap(
                    origin, data.order_id, data.quantity, data.reason
                )
            case OrderStartedV1():
                _one(Machine, touched).start_order(origin, data.order_id)
                _one(Order, touched).start_on(origin, subject)
            case OrderEndedV1():
                _one(Machine, touched).end_order(origin, data.order_id)
                _one(Order, touched).end_on(origin, subject)
            case OrderReleasedV1():
                fields = data.model_dump(exclude={"order_id"})
                _one(Order, touched).release(origin, fields)
            case OrderChangedV1():
                _one(Order, touched).change(origin, data.changes())
            case OrderCancelledV1():
                _one(Order, touched).cancel(origin, data.reason)
            case PlantConfiguredV1():
                _one(Plant, touched).configure(origin, data.plant, data.effective_from)
            case DeliveryForecastChangedV1():
                forecast = data.model_dump(mode="json", exclude={"order_id"})
                _one(Order, touched).record_delivery_forecast(origin, forecast)
            case OrderProgressedV1():
                progress = data.model_dump(mode="json", exclude={"order_id"})
                _one(Order, touched).record_progress(origin, progress)
            case ConfirmationDueV1():
                order = _one(Order, touched)
                # Whole, with the site: the outbox view reads its messages from these alone.
                confirmation = {
                    **data.model_dump(mode="json"),
                    "site": order.site,
                    "decided_at": envelope.time.isoformat(),
                }
                order.record_confirmation_due(origin, confirmation)
            case WebhookDueV1():
                order = _one(Order, touched)
                # Whole, with the site: the outbox view reads its messages from these alone.
                order.record_webhook_due(
                    origin, {**data.model_dump(mode="json"), "site": order.site}
                )
            case WebhooksChangedV1():
                change = data.model_dump(mode="json")
                _one(Webhooks, touched).change(origin, change)
            case DeliveryAttemptedV1():
                attempt = data.model_dump(mode="json", exclude={"order_id"})
                _one(Order, touched).record_delivery_attempt(origin, attempt)
            case _:  # a type in EVENT_TYPES without a handler is a programming error
                raise TypeError(f"no handler for {event.event_type.name}")


@dataclass(frozen=True)
class _Committing:
    """A batch whose commit runs in a thread while the next batch is prepared."""

    deliveries: list[Delivery]
    batch: _Batch
    commit: asyncio.Future[None]

    @property
    def rejected(self) -> set[int]:
        return {r.message.stream_seq for r in self.batch.rejected}


async def _wait_out(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Wait until ``futures`` are done, whatever they end with; a cancel meanwhile is held back
    until then, and raised after."""
    pending = {f for f in futures if not f.done()}
    cancelled = False
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
        pending = {f for f in pending if not f.done()}
    if cancelled:
        raise asyncio.CancelledError


def _succeeded(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
MAX_CONFLICT_RETRIES = 50


def tracking_name(partition: int, partitions: int) -> str:
    return f"nats:{STREAM}:ingest:p{partition}of{partitions}"


class IngestPartition:
    """Runs one partition's ingest loop against JetStream until ``stop`` is set."""

    def __init__(
        self,
        client: NatsClient,
        ingestor: Ingestor,
        batch_size: int = 1000,
        kill_after_commit: int | None = None,
    ) -> None:
        self._client = client
        self._js = client.jetstream()
        self.ingestor = ingestor
        self._batch_size = batch_size
        self._kill_after_commit = kill_after_commit
        self._durable = f"ingest-p{ingestor.partition}of{ingestor.partitions}"
        self.caught_up = asyncio.Event()
        self._backoff = INITIAL_BACKOFF_S
        self._commits = 0
        self._dead_lettered: set[int] = set()  # stream positions in the dead-letter stream
        self._threads: set[asyncio.Future[Any]] = set()  # prepares and commits under way
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self._consume(stop)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "ingest partition %s failed; resuming from the store's position",
                        self.ingestor.partition,
                    )
                    self.ingestor.reset()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        finally:
            if self._executor is not None:  # (its threads were waited out by _consume_from)
                self._executor.shutdown(wait=False)
                self._executor = None

    async def _subscribe(self) -> PullConsumer:
        position = await self._in_thread(self.ingestor.position)
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(STREAM, self._durable)
        config = ConsumerConfig(
            durable_name=self._durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if position else DeliverPolicy.ALL,
            opt_start_seq=position + 1 if position else None,
            ack_policy=AckPolicy.ALL,
            ack_wait=120,
            max_ack_pending=self._batch_size * 4,
            max_deliver=-1,
            filter_subject="mes.>",
        )
        await self._js.add_consumer(STREAM, config)
        log.info("ingest partition %s resumes after stream seq %d", self._durable, position)
        self._dead_lettered = await dead_lettered_positions(self._js)
        consumer = PullConsumer(self._client, STREAM, self._durable, self._batch_size)
        await consumer.start()
        return consumer

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = await self._subscribe()
        try:
            await self._consume_from(consumer, stop)
        finally:
            await consumer.stop()

    async def _consume_from(self, consumer: PullConsumer, stop: asyncio.Event) -> None:
        """Fetch, prepare, commit, ack; a batch is prepared while the one before it is being
        committed (the database work of a commit leaves the interpreter free), and acked once
        its commit is done."""
        committing: _Committing | None = None
        try:
            while not stop.is_set():
                # While a commit runs, take what has come and prepare it meanwhile; with
                # nothing there, finish the commit first: its ack should not wait.
                deliveries = await consumer.fetch(timeout=0 if committing else 0.25)
                if not deliveries:
                    if committing is None:
                        self.caught_up.set()
                    else:
                        finishing, committing = committing, None
                        await self._finish(finishing, stop)
                    continue
                self._backoff = INITIAL_BACKOFF_S
                done = committing.batch.last_seq if committing else self.ingestor.stats.position
                fresh = [
                    IncomingMessage(
                        d.message.subject,
                        d.message.data,
                        d.stream_seq,
                        (d.message.headers or {}).get(SIGNATURE_HEADER),
                    )
                    for d in deliveries
                    if d.stream_seq > done
                ]
                if not fresh:  # redelivered, every one applied already
                    if committing is not None:
                        finishing, committing = committing, None
                        await self._finish(finishing, stop)
                    await self._ack(deliveries, set())
                    continue
                after = committing.batch if committing else None
                batch = await self._in_thread(self.ingestor.prepare, fresh, after)
                for reject in batch.rejected:
                    await self._dead_letter(reject)
                if committing is not None:
                    finishing, committing = committing, None
                    if await self._finish(finishing, stop, then=(deliveries, batch)):
                        continue  # committed with the one before it
                commit = self._thread(self.ingestor.commit, batch)
                committing = _Committing(deliveries, batch, commit)
        finally:
            # A thread cannot be stopped: what runs in one (a prepare, a commit) is waited out,
            # even when this task is cancelled, so that nothing changes the aggregates or writes
            # the store once this returns (the store may be closed next).
            await _wait_out(self._threads)
            if committing is not None and _succeeded(committing.commit):
                try:
                    await self._ack(committing.deliveries, committing.rejected)
                except Exception:
                    log.warning("the last batch of %s is stored but not acked", self._durable)

    def _thread(self, work: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """``work`` in one of the partition's own threads, kept in ``_threads`` until it is
        done. Its own: in the loop's shared pool, a burst of other blocking calls (API writes
        checking their dedupe keys, say) would queue ahead of a commit."""
        if self._executor is None:
            # Two: a batch is prepared while the one before it commits.
            self._executor = ThreadPoolExecutor(2, thread_name_prefix=self._durable)
        call = functools.partial(contextvars.copy_context().run, work, *args)
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return future

    async def _in_thread(self, work: Callable[..., _T], *args: object) -> _T:
        # Shielded: a cancel stops the waiting, not the thread (``_consume_from`` waits it out).
        return await asyncio.shield(self._thread(work, *args))

    async def _finish(
        self,
        committing: _Committing,
        stop: asyncio.Event,
        then: tuple[list[Delivery], _Batch] | None = None,
    ) -> bool:
        """Wait for a commit, then ack its deliveries. A concurrent write refuses it whole,
        and with it the batch prepared on top of it (``then``): both are applied again, one
        at a time. Returns whether ``then`` was committed so (if not, the caller commits it).
        """
        deliveries = committing.deliveries
        try:
            await asyncio.shield(committing.commit)
        except ConcurrentWrite:
            self.ingestor.reset()
            self.ingestor.stats.conflicts += 1
            incoming = committing.batch.incoming
            if then is not None:
                deliveries, incoming = deliveries + then[0], incoming + then[1].incoming
            position = await self._in_thread(self.ingestor.position)
            incoming = [m for m in incoming if m.stream_seq > position]
            rejected = await self._process(incoming, stop) if incoming else set()
            self._committed()
            await self._ack(deliveries, rejected)
            return True
        self._committed()
        await self._ack(deliveries, committing.rejected)
        return False

    def _committed(self) -> None:
        self._commits += 1
        if self._kill_after_commit is not None and self._commits >= self._kill_after_commit:
            # Failpoint for crash tests: committed, not yet acked.
            os.kill(os.getpid(), signal.SIGKILL)

    async def _ack(self, deliveries: list[Delivery], rejected: set[int]) -> None:
        """The consumer acks "all up to": terminate the rejected ones, then one ack for the
        rest, on the furthest delivery not rejected."""
        furthest: Delivery | None = None
        for delivery in deliveries:
            if delivery.stream_seq in rejected:
                await delivery.message.term()
            elif furthest is None or delivery.stream_seq > furthest.stream_seq:
                furthest = delivery
        if furthest is not None:
            await furthest.message.ack()
        if deliveries[-1].pending == 0:
            self.caught_up.set()

    async def _process(self, incoming: list[IncomingMessage], stop: asyncio.Event) -> set[int]:
        """Dead-letter, then commit; returns the stream positions that were rejected."""
        rejected: set[int] = set()
        for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
            batch = await self._in_thread(self.ingestor.prepare, incoming)
            rejected |= {r.message.stream_seq for r in batch.rejected}
            try:
                for reject in batch.rejected:
                    await self._dead_letter(reject)
                await self._in_thread(self.ingestor.commit, batch)
                return rejected
            except ConcurrentWrite:
                # Another partition wrote the same aggregate (an order touched from two
                # machines), or this batch was committed after all (a connection lost during
                # COMMIT): reload, drop what the store already has, apply the rest again.
                self.ingestor.reset()
                self.ingestor.stats.conflicts += 1
                position = await self._in_thread(self.ingestor.position)
                incoming = [m for m in incoming if m.stream_seq > position]
                log.info(
                    "concurrent write on %s (attempt %d); store at %d",
                    self._durable,
                    attempt,
                    position,
                )
                if not incoming:
                    return rejected
                if stop.is_set():
                    raise
                await asyncio.sleep(min(0.01 * attempt, 0.5))
            except Exception:
                self.ingestor.reset()
                raise
        raise RuntimeError(
            f"{self._durable}: batch still conflicting after {MAX_CONFLICT_RETRIES} tries"
        )

    async def _dead_letter(self, rejected: Rejected) -> None:
        message = rejected.message
        if message.stream_seq in self._dead_lettered:
            log.info("stream seq %d was dead-lettered before", message.stream_seq)
            return
        log.warning(
            "dead-lettered stream seq %d from %s: %s",
            message.stream_seq,
            message.subject,
            rejected.reason,
        )
        # The body is the original bytes, untouched; the reason and position go in headers.
        # Dead-lettering comes before the commit, so a crash in between may repeat it: the
        # message id makes the repeat a duplicate the stream drops.
        headers = {
            DLQ_REASON_HEADER: rejected.reason.replace("\r", " ").replace("\n", " ")[:1024],
            DLQ_SEQ_HEADER: str(message.stream_seq),
            MSG_ID_HEADER: f"dlq-{STREAM}-{message.stream_seq}",
            "Mes-Dlq-Subject": message.subject,
        }
        await self._js.publish(
            dlq_subject(message.subject), message.data, headers=headers, timeout=10
        )
        self._dead_lettered.add(message.stream_seq)
