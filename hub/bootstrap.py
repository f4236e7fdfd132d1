"""The composition root: the one place that builds and wires the hub's parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from adapters.erp.base import ErpEntryBase
from adapters.erp.config import confirmation_sender, order_source
from adapters.erp.outbox import ErpDestination
from adapters.erp.poller import OrderPoller
from adapters.webhooks.config import WebhookEntry
from adapters.webhooks.destination import WebhookDestination
from adapters.webhooks.secrets import EndpointSecrets
from adapters.webhooks.signing import SigningKey
from hub.api.deps import ApiContext, key_id
from hub.api.reads import ReadPool, ReadSources
from hub.api.webhook_desk import WebhookDesk
from hub.children import ChildProcess
from hub.domain import Order
from hub.files import write_whole
from hub.ingest import Ingestor, IngestPartition, IngestStats, tracking_name
from hub.nats import (
    STREAM,
    EmbeddedNatsServer,
    NatsPublisher,
    connect,
    ensure_streams,
    usual_port_if_free,
)
from hub.nats_auth import (
    NATS_URL_FILE,
    nats_identities,
    server_config,
    signing_key,
    signing_since,
)
from hub.outbound import Allowlist
from hub.outbox import (
    Destination,
    OutboxMessage,
    Requeue,
    RetryPolicy,
    Sender,
    standard_webhooks_retry,
)
from hub.ports import EventPublisher
from hub.sealer import AuditLog, audit_verifier, checkpoint_reference, sealer_of
from hub.settings import ApiKey, Settings, redacted_url, settings_json
from hub.store import EventStore
from hub.tasks import cancel_task
from hub.ui.live import LiveFeed
from hub.ui.sessions import SESSIONS_FILE, Sessions
from hub.webhook_registry import Registry
from hub.webhook_registry import empty as registry_empty
from projections.processes.confirmations import ConfirmationWatch, confirmation_message_key
from projections.processes.forecast_watch import ForecastWatch
from projections.processes.partner_watch import PartnerWatch
from projections.processes.webhook_endpoints import (
    EndpointHealth,
    EndpointSenders,
    EndpointSpec,
    RegistryCache,
    WebhookChanges,
    describe,
)
from projections.rules.partner_events import Subscription, Visibility
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import configuration_event
from projections.views.audit_view import AuditLogReader, AuditLogView
from projections.views.database import PostgresViews, SQLiteViews, ViewDatabase
from projections.views.facts_view import FactsReader, MachineFactsView
from projections.views.orders_view import (
    OrdersReader,
    OrderStatesView,
    OrdersView,
    orders_in_play,
)
from projections.views.outbox_view import CONFIRMATION, OutboxReader, OutboxView, idempotency_key
from projections.views.runner import ProjectionWorker, View, group_by_position, positions

log = logging.getLogger(__name__)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Service:
    """A long-running part of the hub: an ingest partition, a view worker, the forecast watch
    (next: the outbox senders, the audit sealer). ``run`` returns when ``stop`` is set."""

    name: str
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class Hub:
    """A running hub: NATS (embedded or not), the store, the views and its services, all run
    under one task group (``start``) and stopped together (``close``)."""

    settings: Settings
    nats_url: str
    nats: NatsClient
    api_nats: NatsClient  # the API's own connection, as the ``api`` identity
    jetstream: JetStreamContext
    store: EventStore
    publisher: EventPublisher  # the hub's own (signs the hub's events)
    api_publisher: EventPublisher
    partitions: list[IngestPartition]
    views: ViewDatabase
    forecast_watch: ForecastWatch
    clock: Clock = utc_now
    embedded_nats: EmbeddedNatsServer | None = None
    services: list[Service] = field(default_factory=list)
    views_process: ChildProcess | None = None  # None: the views are not kept by this hub
    owns_store: bool = True  # False when the caller passed the store in: theirs to close
    senders: list[Sender] = field(default_factory=list)  # the ERPs' outbox senders
    webhooks: WebhookParts | None = None  # partners' endpoints (their senders come and go)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _group: asyncio.Task[None] | None = None
    _running: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self) -> None:
        """Run every service under one task group: one that fails stops the others (each
        retries what it can retry itself), and ``close`` stops them all."""

        async def supervise() -> None:
            async with asyncio.TaskGroup() as group:
                for service in self.services:
                    task = group.create_task(service.run(self._stop), name=service.name)
                    self._running[service.name] = task

        self._group = asyncio.create_task(supervise(), name="hub services")
        self._group.add_done_callback(self._report_failure)

    def _report_failure(self, group: asyncio.Task[None]) -> None:
        # A service that raised has stopped them all (each retries what it can retry itself):
        # say so at once, not only when the hub is closed.
        if not group.cancelled() and group.exception() is not None:
            log.error("the hub's services stopped: %r", group.exception(),
                      exc_info=group.exception())  # fmt: skip

    def running(self) -> dict[str, asyncio.Task[None]]:
        """The services started so far, by name."""
        return dict(self._running)

    async def stop_service(self, name: str) -> None:
        """Stop one service now (the demo stops the forecast watch before its last count; a
        round under way is cancelled, and it published all or nothing)."""
        task = self._running.get(name)
        if task is not None:
            await cancel_task(task)

    async def record_plant(self, plant: PlantConfig) -> bool:
        """Record ``plant`` as the site's configuration if it differs from the last one recorded
        (ingest stores it, as any other event); returns whether it was new."""
        recorded = await asyncio.to_thread(self.store.plant, self.settings.site)
        event = configuration_event(self.settings.site, recorded, plant, self.clock())
        if event is None:
            return False
        (receipt,) = await self.publisher.publish_many([event])
        log.info("plant configuration recorded (%s)", event.id)
        return not receipt.duplicate

    async def stop_forecast_watch(self) -> None:
        await self.stop_service(FORECAST_WATCH)

    async def view_positions(self) -> dict[str, int]:
        """How far each view has read the store (they are kept by the views process)."""
        return await asyncio.to_thread(view_positions, self.views)

    async def wait_projected(self, timeout: float = 30.0) -> None:
        """Wait until every view has read everything stored so far (for tests, demo)."""
        end = await asyncio.to_thread(self.store.last_position)
        deadline = asyncio.get_running_loop().time() + timeout
        # The positions move in another process: a short poll of its tracking table.
        while behind := {n: p for n, p in (await self.view_positions()).items() if p < end}:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"views still behind store position {end}: {behind}")
            await asyncio.sleep(0.05)

    def ingest_stats(self) -> IngestStats:
        total = IngestStats()
        for partition in self.partitions:
            stats = partition.ingestor.stats
            total.applied += stats.applied
            total.duplicates += stats.duplicates
            total.rejected += stats.rejected
            total.batches += stats.batches
            total.position = max(total.position, stats.position)
        return total

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until every partition has stored its position at (or past) the end of the
        stream as it is now, and the views have read the store that far (for tests, demo).
        Counted, not guessed from a quiet moment: a loaded machine can be quiet for a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        end = (await self.jetstream.stream_info(STREAM)).state.last_seq
        while behind := [p for p in self.partitions if p.ingestor.stats.position < end]:
            if loop.time() > deadline:
                positions = {p.ingestor.tracking_name: p.ingestor.stats.position for p in behind}
                raise TimeoutError(f"ingest still behind stream position {end}: {positions}")
            await asyncio.sleep(0.02)
        if any(s.name == VIEWS for s in self.services):
            await self.wait_projected(max(deadline - loop.time(), 1.0))

    async def close(self) -> None:
        self._stop.set()
        if self._group is not None:
            with contextlib.suppress(Exception):  # already logged by _report_failure
                await self._group
        # Ingest has stopped and acked what it committed; close() flushes those acks. (drain()
        # would wait out its timeout on the pull subscriptions.)
        for client in (self.nats, self.api_nats):
            with contextlib.suppress(Exception):
                await client.close()
        for sender in self.senders:
            with contextlib.suppress(Exception):
                await sender.close()
        await asyncio.to_thread(self.views.close)
        if self.owns_store:
            await asyncio.to_thread(self.store.close)
        if self.embedded_nats is not None:
            await asyncio.to_thread(self.embedded_nats.stop)


INGEST, VIEWS, FORECAST_WATCH = "ingest", "views", "forecast-watch"
CONFIRMATIONS, OUTBOX, ERP_ORDERS = "confirmations", "outbox", "erp-orders"
PARTNERS, WEBHOOK_SENDERS = "partner-webhooks", "webhook-senders"
SEALER = "audit-sealer"
PARTNERS_SINCE = "webhooks.since"  # when this hub began to tell partners (data dir)
PARTNERS_AT = "webhooks.position"  # how far the store was read for them
CONFIRMATIONS_SINCE = "erp-confirmations.since"  # when this hub began to confirm (data dir)
CONFIRMATIONS_POSITION = "erp-confirmations.position"  # how far the views were looked at


def erp_pollers(
    settings: Settings, entries: Sequence[ErpEntryBase], publisher: EventPublisher
) -> list[OrderPoller]:
    """A poller for each ERP that sends orders (its cursor and state in the data dir)."""
    state_dir = settings.data_dir / "erp"
    pollers = []
    for entry in entries:
        source = order_source(entry, state_dir)
        if source is not None:
            cursor = state_dir / f"{entry.name}.cursor"
            pollers.append(
                OrderPoller(entry.name, source, publisher, cursor, entry.poll_interval_s)
            )
    return pollers


def erp_destinations(
    settings: Settings, entries: Sequence[ErpEntryBase], views: ViewDatabase
) -> list[Destination]:
    """The ERPs that take confirmations, as outbox destinations."""
    earlier = earlier_confirmations(settings, views)
    found: list[Destination] = []
    for entry in entries:
        confirmer = confirmation_sender(entry)
        if confirmer is not None:
            found.append(ErpDestination(entry.name, confirmer, earlier))
    return found


@dataclass
class WebhookParts:
    """The partners' webhooks at work: the registry (API-made partners and endpoints), how a
    change of it is stored, the endpoints' secrets, and their senders."""

    registry: RegistryCache
    changes: WebhookChanges
    secrets: EndpointSecrets
    senders: EndpointSenders
    config: tuple[WebhookEntry, ...]


# What a managed endpoint's sender is made from: a change of any makes a new one.
_SENDER_FIELDS = ("url", "allow", "timeout_s", "rate_per_s", "sign_ed25519")


def webhook_parts(
    settings: Settings,
    store: EventStore,
    views: ViewDatabase,
    entries: Sequence[WebhookEntry],
    publisher: EventPublisher,
    retry: RetryPolicy,
    clock: Clock = utc_now,
) -> WebhookParts:
    """The endpoints of the config file and of the registry, each with a sender while active."""
    registry = RegistryCache(settings.site, store.load)
    changes = WebhookChanges(settings.site, publisher, store.received_already, registry, clock)
    secrets = EndpointSecrets(settings.data_dir / "webhooks" / "secrets")
    config = {e.name: e for e in entries}
    outbox = OutboxReader(views)

    def specs() -> list[EndpointSpec]:
        now = registry()
        found = [EndpointSpec(name, now.status(name), "config") for name in config]
        return found + [
            EndpointSpec(e["endpoint_id"], str(e["status"]), describe(e, _SENDER_FIELDS))
            for e in now.partner_endpoints()
            if e["endpoint_id"] not in config
        ]

    def make(endpoint_id: str, wrap: Callable[[Destination], Destination]) -> Sender | None:
        destination = _endpoint_destination(settings, config, registry, secrets, endpoint_id)
        if destination is None:
            return None
        since = (_since_file if endpoint_id in config else endpoint_since_file)(
            settings, endpoint_id
        )
        return Sender(
            wrap(destination), outbox, publisher, settings.site, idempotency_key, retry,
            after=_first_seen(since, store.last_position()),
            kill_after_delivery=settings.fault_kill_after_delivery, clock=clock,
            poll_s=1.0,  # (nudged when something is decided: the retries' timer)
        )  # fmt: skip

    async def disable(endpoint_id: str, reason: str) -> None:
        now = await asyncio.to_thread(registry.fresh)
        endpoint = now.endpoint(endpoint_id)
        if now.status(endpoint_id) != "active" or (endpoint is None and endpoint_id not in config):
            return  # (paused, disabled or deleted meanwhile: nothing to say)
        await changes(
            {"action": "endpoint_disabled", "endpoint_id": endpoint_id,
             "partner_id": (endpoint or {}).get("partner_id"), "by": "hub", "reason": reason}
        )  # fmt: skip

    health = EndpointHealth(
        settings.data_dir / "webhooks" / "health", settings.webhook_disable_after_s
    )
    senders = EndpointSenders(specs, make, disable, health, last_position=outbox.last_position)
    return WebhookParts(registry, changes, secrets, senders, tuple(entries))


def endpoint_since_file(settings: Settings, endpoint_id: str) -> Path:
    """Where the store position a partner's endpoint was registered at is kept (apart from the
    ERPs' and the config file's, whose names it may not take)."""
    return settings.data_dir / "webhooks" / "senders" / f"{endpoint_id}.since"


def _endpoint_destination(
    settings: Settings,
    config: dict[str, WebhookEntry],
    registry: RegistryCache,
    secrets: EndpointSecrets,
    endpoint_id: str,
) -> WebhookDestination | None:
    """One endpoint as an outbox destination: signed, SSRF-checked, rate-limited POSTs."""
    entry = config.get(endpoint_id)
    if entry is not None:
        key = entry.signing_key
        return WebhookDestination(
            entry.name, entry.url, entry.secrets,
            signing_key=SigningKey.from_secret(key.read().get_secret_value()) if key else None,
            allow=entry.allowlist(), site=settings.site, timeout_s=entry.timeout_s,
            rate_per_s=entry.rate_per_s,
        )  # fmt: skip
    endpoint = registry().endpoint(endpoint_id)
    if endpoint is None or not endpoint.get("partner_id"):
        return None

    def current() -> list[str]:
        # The secrets that sign now (two during a rotation's overlap), newest first.
        now = datetime.now(UTC).isoformat()
        found = (registry().endpoint(endpoint_id) or {}).get("secrets", [])
        live = [s["id"] for s in found if s["expires_at"] is None or s["expires_at"] > now]
        return secrets.values(endpoint_id, reversed(live))

    return WebhookDestination(
        endpoint_id, endpoint["url"], current,
        signing_key=secrets.signing_key() if endpoint.get("sign_ed25519") else None,
        allow=Allowlist.of(endpoint.get("allow") or []), site=settings.site,
        timeout_s=float(endpoint.get("timeout_s") or 15.0), rate_per_s=endpoint.get("rate_per_s"),
    )  # fmt: skip


def subscriptions(
    settings: Settings, registry: Registry, entries: Sequence[WebhookEntry], clock: Clock
) -> list[Subscription]:
    """What each endpoint wants and may see: the config file's, and the partners'."""
    found = [
        Subscription(
            endpoint=e.name, event_types=frozenset(e.events),
            customers=None if e.all_customers else frozenset(e.customers),
            part_numbers=frozenset(e.part_numbers), orders=frozenset(e.orders),
            since=_endpoint_since(settings, e.name, clock),
        )
        for e in entries
    ]  # fmt: skip
    names = {e.name for e in entries}
    for endpoint in registry.partner_endpoints():
        partner = registry.partner(endpoint["partner_id"])
        if partner is None or endpoint["endpoint_id"] in names:
            continue
        found.append(
            Subscription(
                endpoint=endpoint["endpoint_id"],
                event_types=frozenset(endpoint["events"]) if endpoint["events"] else None,
                customers=frozenset(endpoint["customers"]) if endpoint["customers"] else None,
                part_numbers=frozenset(endpoint["part_numbers"]),
                orders=frozenset(endpoint["orders"]),
                since=datetime.fromisoformat(endpoint["created_at"]),
                visible=Visibility(
                    all_orders=bool(partner["all_orders"]),
                    customers=frozenset(partner["customers"]),
                    part_numbers=frozenset(partner["part_numbers"]),
                    orders=frozenset(partner["orders"]),
                ),
            )
        )
    return found


def partner_watch(
    settings: Settings,
    store: EventStore,
    entries: Sequence[WebhookEntry],
    publisher: EventPublisher,
    clock: Clock = utc_now,
    registry: Callable[[], Registry] | None = None,
) -> PartnerWatch:
    """The watch deciding what the endpoints are owed: from where the store was when this hub
    first told partners (kept in the data dir, as when), so no endpoint is sent history."""
    since_file, position_file = settings.data_dir / PARTNERS_SINCE, settings.data_dir / PARTNERS_AT
    if not since_file.exists():
        write_whole(position_file, str(store.last_position()))
        write_whole(since_file, clock().isoformat())
    try:
        position = int(position_file.read_text().strip())
    except (FileNotFoundError, ValueError):  # lost: from now on, not from the start
        position = store.last_position()
    read_registry = registry or (lambda: Registry(registry_empty()))
    return PartnerWatch(
        settings.site, store.read, store.history,
        lambda: subscriptions(settings, read_registry(), entries, clock), publisher,
        since=datetime.fromisoformat(since_file.read_text().strip()),
        position=position, position_file=position_file,
        checkpoint=partial(checkpoint_reference, AuditLog(store)),
    )  # fmt: skip


def _endpoint_since(settings: Settings, name: str, clock: Clock) -> datetime:
    """When an endpoint was first configured here (kept in the data dir): it is told what
    happened from then on, not before."""
    path = settings.data_dir / "webhooks" / f"{name}.since"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, clock().isoformat())
    return datetime.fromisoformat(path.read_text().strip())


def earlier_confirmations(
    settings: Settings, views: ViewDatabase
) -> Callable[[OutboxMessage, str], tuple[tuple[str, ...], bool]]:
    """For a confirmation and a destination: the keys the destination was sent the order's
    earlier confirmations with — those decided after it was added (it took them before this
    one: an order's go in sequence) — and whether that is all of them (else the order's
    totals are more than it holds)."""
    outbox, site = OutboxReader(views), settings.site

    def earlier(message: OutboxMessage, destination: str) -> tuple[tuple[str, ...], bool]:
        since = _first_seen(_since_file(settings, destination), outbox.last_position())
        found = outbox.messages(site, message.ordering_key, limit=1000, kind=CONFIRMATION)
        owed = sorted(
            m.sequence for m, _ in found
            if m.kind == CONFIRMATION and m.sequence < message.sequence and m.position > since
        )  # fmt: skip
        keys = tuple(
            idempotency_key(confirmation_message_key(site, message.ordering_key, k), destination)
            for k in owed
        )
        return keys, owed == list(range(1, message.sequence))

    return earlier


def _since_file(settings: Settings, destination: str) -> Path:
    """Where the store position a destination was first configured at is kept."""
    return settings.data_dir / "outbox" / f"{destination}.since"


def outbox_senders(
    settings: Settings,
    destinations: Sequence[Destination],
    views: ViewDatabase,
    publisher: EventPublisher,
    retry: RetryPolicy,
    store_position: int,
    clock: Clock = utc_now,
) -> list[Sender]:
    """A sender per destination; each is owed only what was decided after it was first
    configured (a new ERP is not sent the plant's history): what the store held then, kept
    in the data dir (``store_position`` the first time)."""
    outbox = OutboxReader(views)
    return [
        Sender(
            destination,
            outbox,
            publisher,
            settings.site,
            idempotency_key,
            retry,
            after=_first_seen(_since_file(settings, destination.name), store_position),
            kill_after_delivery=settings.fault_kill_after_delivery,
            clock=clock,
        )
        for destination in destinations
    ]


def _first_seen(path: Path, position: int) -> int:
    """The store's position when a destination was first configured, kept in ``path``."""
    if path.exists():
        return int(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, str(position))
    return position


def confirmation_watch(
    settings: Settings,
    store: EventStore,
    views: ViewDatabase,
    plant: PlantConfig | None,
    publisher: EventPublisher,
    clock: Clock = utc_now,
) -> ConfirmationWatch:
    """The watch deciding production confirmations; runs that ended before this hub first
    confirmed (kept in the data dir) are not confirmed."""
    path = settings.data_dir / CONFIRMATIONS_SINCE
    if not path.exists():
        write_whole(path, clock().isoformat())
    since = datetime.fromisoformat(path.read_text().strip())

    def load(keys: Iterable[UUID]) -> list[Order]:
        found = (store.load(key) for key in keys)
        return [o for o in found if isinstance(o, Order) and o.site == settings.site]

    return ConfirmationWatch(
        settings.site, load, views, FactsReader(views), plant or PlantConfig(), publisher, since,
        position_file=settings.data_dir / CONFIRMATIONS_POSITION,
        each_shift=settings.confirm_each_shift, clock=clock,
        checkpoint=partial(checkpoint_reference, AuditLog(store)),
    )  # fmt: skip


def api_context(
    hub: Hub, plant: PlantConfig | None = None, reads: ReadPool | None = None
) -> ApiContext:
    """What the API needs of a running hub: built here, for ``serve``, the demo and the tests.
    ``reads``: where the read routes run; by default threads over the hub's own store and
    views (``serve`` and the demo give it ``api_reads``, worker processes)."""
    facts, orders = FactsReader(hub.views), OrdersReader(hub.views)
    settings = hub.settings
    reads = reads or ReadPool.in_threads(
        ReadSources(hub.store, facts, orders, OutboxReader(hub.views), AuditLogReader(hub.views)),
        settings.api_read_workers,
        settings.api_read_queue,
    )
    api_keys = settings.parsed_api_keys()
    key_secret = signing_key(settings.data_dir)
    return ApiContext(
        store=hub.store,
        facts=facts,
        orders=orders,
        reads=reads,
        publisher=hub.api_publisher,
        api_keys=api_keys,
        site=settings.site,
        plant=plant or PlantConfig(),
        max_clock_skew_s=settings.max_clock_skew_s,
        requeue=Requeue(hub.publisher, settings.site, getattr(hub, "clock", utc_now)),
        destinations={
            sender.name: sender.owed_after
            for sender in getattr(hub, "senders", ())
            if CONFIRMATION in sender.destination.kinds  # (the ERPs, not partners' endpoints)
        },
        webhooks=webhook_desk(hub),
        # (The hub's signing key, made once in the data dir: the same ids across restarts.)
        key_id_secret=key_secret,
        # The checkpoints' key from the settings (not the store's record, which whoever holds
        # the database could replace): what the audit routes check signatures with.
        audit_public_key=_audit_public_key(settings),
        sessions=screen_sessions(settings, api_keys, key_secret),
        live=LiveFeed(
            reads,
            settings.site,
            plant or PlantConfig(),
            partial(_views_read_up_to, hub.views),
            partial(hub.store.changed_machines, settings.site),
            poll_s=settings.projection_poll_s,
        ),
    )


def screen_sessions(settings: Settings, api_keys: list[ApiKey], key_secret: bytes) -> Sessions:
    """The floor's screens' signed-in devices (``hub.ui.sessions``), in the data dir; those of
    keys no longer configured are removed now."""
    known = {key_id(k.key.get_secret_value(), key_secret): k.role for k in api_keys}
    sessions = Sessions(settings.data_dir / SESSIONS_FILE, known)
    sessions.forget_revoked()
    return sessions


def _views_read_up_to(views: ViewDatabase) -> int:
    """The store position the views the screens are made of (the machines' facts, the orders)
    have all read up to; the outbox's and the audit log's do not hold them back."""
    shown = (MachineFactsView.name, OrdersView.name, OrderStatesView.name)
    positions = view_positions(views)
    return min((positions.get(name, 0) for name in shown), default=0)


def _audit_public_key(settings: Settings) -> str | None:
    verifier = audit_verifier(settings)
    return None if verifier is None else verifier.key_string()


def webhook_desk(hub: Hub) -> WebhookDesk | None:
    """What the API's partner and webhook routes work with (None: the hub keeps no views)."""
    parts = getattr(hub, "webhooks", None)
    if parts is None:
        return None
    settings = hub.settings
    return WebhookDesk(
        site=settings.site, registry=parts.registry, changes=parts.changes,
        secrets=parts.secrets, outbox=OutboxReader(hub.views),
        requeue=Requeue(hub.publisher, settings.site, hub.clock), senders=parts.senders,
        store_position=hub.store.last_position,
        since_file=partial(endpoint_since_file, settings), history=hub.store.history,
        config_endpoints=tuple(e.name for e in parts.config),
        reserved=tuple(s.name for s in hub.senders) + tuple(e.name for e in parts.config),
    )  # fmt: skip


def _last_port(url_file: Path) -> int | None:
    """The port the embedded NATS had the last time, from the URL it left (None: never ran)."""
    try:
        return urlsplit(url_file.read_text().strip()).port
    except (OSError, ValueError):
        return None


def api_reads(settings: Settings) -> ReadPool:
    """The API's read pool of ``serve`` and the demo: worker processes, each with its own store
    and views (``hub.api.reads``)."""
    return ReadPool.in_processes(
        settings, read_sources, settings.api_read_workers, settings.api_read_queue
    )


def read_sources(settings: Settings) -> ReadSources:
    """A read worker's store and views (run in the worker; sent to it by name)."""
    store = EventStore(settings, read_only=True)  # the hub made and upgraded its tables
    views = open_views(settings, pool_size=1)  # a worker answers one read at a time
    return ReadSources(
        store, FactsReader(views), OrdersReader(views), OutboxReader(views), AuditLogReader(views)
    )


def all_views() -> list[View]:
    return [MachineFactsView(), OrdersView(), OrderStatesView(), OutboxView(), AuditLogView()]


def view_positions(views: ViewDatabase) -> dict[str, int]:
    """How far each of the hub's views has read the store (0: not begun)."""
    recorded = positions(views, prepared=True)  # (the hub prepared the views when it started)
    return {view.name: recorded.get(view.name, 0) for view in all_views()}


def open_orders(store: EventStore, views: ViewDatabase, site: str) -> list[Order]:
    """The orders still in play for delivery forecasts (not every order ever released)."""
    found = (store.load(aggregate_id) for aggregate_id in orders_in_play(views))
    return [o for o in found if isinstance(o, Order) and o.site == site]


def open_views(settings: Settings, pool_size: int = 4) -> ViewDatabase:
    """The views' database; ``pool_size``: PostgreSQL connections at most."""
    if settings.store == "sqlite":
        return SQLiteViews(settings.views_sqlite_path)
    assert settings.postgres_dsn is not None  # checked by the store before this
    return PostgresViews(
        settings.postgres_dsn.get_secret_value(), settings.postgres_schema, pool_size
    )


def projection_workers(
    settings: Settings,
    store: EventStore,
    views: ViewDatabase,
    names: list[str] | None = None,
    *,
    rebuild: bool = False,
) -> list[ProjectionWorker]:
    """Workers for the views named (all by default): one for all the views being rebuilt, or
    one per group of views that have read equally far."""
    chosen = [v for v in all_views() if names is None or v.name in names]
    groups = [chosen] if rebuild else group_by_position(views, chosen)
    return [
        ProjectionWorker(
            group,
            store,
            views,
            settings.projection_batch,
            kill_after_batches=settings.fault_kill_after_view_batch,
        )
        for group in groups
    ]


async def build_hub(
    settings: Settings,
    *,
    store: EventStore | None = None,
    publisher: EventPublisher | None = None,
    clock: Clock = utc_now,
    ingest: bool = True,
    projections: bool = True,
    plant: PlantConfig | None = None,
    erp: Sequence[ErpEntryBase] = (),
    webhooks: Sequence[WebhookEntry] = (),
    destinations: Sequence[Destination] = (),
    retry: RetryPolicy | None = None,
    webhook_retry: RetryPolicy | None = None,
) -> Hub:
    """The hub with production parts by default: NATS (embedded unless ``settings.nats_url``),
    the event store of ``settings``, the NATS publisher, the wall clock. Tests pass their own
    ``store``, ``publisher`` (e.g. ``hub.ports.InMemoryPublisher``) or ``clock``. Services
    running: ingest (``ingest``), the views and the delivery forecast watch (``projections``);
    ``plant`` is the calendar and rules the forecasts use, recorded as the site's configuration.
    ``erp``: the ``[[erp]]`` entries; with ``projections``, the confirmations they are owed are
    decided and delivered (``hub.outbox``), as to ``destinations`` (tests pass fakes)."""
    embedded: EmbeddedNatsServer | None = None
    url = settings.nats_url
    credentials = await asyncio.to_thread(nats_identities, settings)
    if url is None:
        assert credentials is not None
        authorization = server_config(credentials, settings.site)
        url_file = settings.data_dir / NATS_URL_FILE
        last = await asyncio.to_thread(_last_port, url_file)
        port = await asyncio.to_thread(usual_port_if_free, "127.0.0.1", last)
        embedded = EmbeddedNatsServer(
            settings.nats_data_dir, port=port, authorization=authorization
        )
        url = await asyncio.to_thread(embedded.start)
        # Where adapters on this machine find it (mes-hub nats credentials).
        await asyncio.to_thread(url_file.write_text, url)
    elif credentials is None:
        log.warning(
            "NATS at %s is used without identities (nats_identities): whoever reaches it may "
            "publish any event; see docs/nats.md",
            redacted_url(url),
        )
    client: NatsClient | None = None
    api_client: NatsClient | None = None
    try:
        client = await connect(url, credentials=credentials["hub"] if credentials else None)
        # The API publishes as its own NATS identity: never the hub's own events.
        api_client = await connect(
            url, "mes-hub-api", credentials=credentials["api"] if credentials else None
        )
        jetstream = client.jetstream()
        await ensure_streams(jetstream, settings)
        owns_store = store is None
        if store is None:
            store = await asyncio.to_thread(EventStore, settings)
        views = await asyncio.to_thread(open_views, settings)
        workers = projection_workers(settings, store, views)
        # One after the other: concurrent CREATE TABLE IF NOT EXISTS can collide on PostgreSQL.
        for worker in workers:
            await asyncio.to_thread(worker.prepare)
        # The log's sealer (hub.sealer): its checkpoint key refused here, before anything runs.
        sealer = await asyncio.to_thread(sealer_of, settings, store)
    except BaseException:
        for opened in (client, api_client):
            if opened is not None:
                await opened.close()
        if embedded is not None:
            embedded.stop()
        raise
    events_store = store
    key = await asyncio.to_thread(signing_key, settings.data_dir)
    stream_end = (await jetstream.stream_info(STREAM)).state.last_seq
    signed_after = await asyncio.to_thread(signing_since, settings.data_dir, stream_end)
    partitions = [
        IngestPartition(
            client,
            Ingestor(
                events_store,
                tracking_name(k, settings.partitions),
                partition=k,
                partitions=settings.partitions,
                snapshot_interval=settings.snapshot_interval,
                clock=clock,
                max_clock_skew_s=settings.max_clock_skew_s,
                hub_key=key,
                signed_after=signed_after,
            ),
            batch_size=settings.ingest_batch,
            kill_after_commit=settings.fault_kill_after_commit,
        )
        for k in range(settings.partitions)
    ]
    # Signed too: what the API publishes names the caller's key (its actor), which ingest takes
    # from the hub's own publishers only.
    api_publisher = publisher or NatsPublisher(
        api_client.jetstream(), settings.site, signing_key=key
    )
    if publisher is None:
        publisher = NatsPublisher(jetstream, settings.site, signing_key=key)

    def views_caught_up() -> bool:
        stored = events_store.last_position()
        return all(position >= stored for position in view_positions(views).values())

    forecast_watch = ForecastWatch(
        settings.site,
        partial(open_orders, events_store, views, settings.site),
        FactsReader(views),
        plant or PlantConfig(),
        publisher,
        ready=views_caught_up,
        progress_interval_s=settings.webhook_progress_interval_s,
    )
    services: list[Service] = []
    views_child = views_process(settings) if projections else None
    if ingest:
        services += [Service(f"{INGEST}:p{p.ingestor.partition}", p.run) for p in partitions]
    if projections:
        assert views_child is not None
        services.append(Service(VIEWS, views_child.run))
        interval = settings.forecast_interval_s
        services.append(Service(FORECAST_WATCH, partial(forecast_watch.run, interval_s=interval)))
    senders: list[Sender] = []
    if projections and (erp or destinations):
        senders = await asyncio.to_thread(
            outbox_senders,
            settings,
            [*destinations, *erp_destinations(settings, erp, views)],
            views,
            publisher,
            retry or RetryPolicy(),
            await asyncio.to_thread(events_store.last_position),
            clock,
        )
        if senders:
            watch = await asyncio.to_thread(
                confirmation_watch, settings, events_store, views, plant, publisher, clock
            )
            confirm = partial(watch.run, interval_s=settings.confirm_interval_s)
            services.append(Service(CONFIRMATIONS, confirm))
        services += [Service(f"{OUTBOX}:{s.name}", s.run) for s in senders]
    endpoints: WebhookParts | None = None
    if projections:
        endpoints = webhook_parts(
            settings, events_store, views, webhooks, publisher,
            webhook_retry or standard_webhooks_retry(), clock,
        )  # fmt: skip
        partners = await asyncio.to_thread(
            partner_watch, settings, events_store, webhooks, publisher, clock,
            endpoints.registry.fresh,
        )  # fmt: skip
        services.append(Service(PARTNERS, partial(partners.run, interval_s=0.2)))
        services.append(Service(WEBHOOK_SENDERS, endpoints.senders.run))
    services.append(Service(SEALER, sealer.run))
    if erp:
        pollers = erp_pollers(settings, erp, api_publisher)
        services += [Service(f"{ERP_ORDERS}:{p.name}", p.run) for p in pollers]
    hub = Hub(
        settings=settings,
        nats_url=url,
        nats=client,
        api_nats=api_client,
        jetstream=jetstream,
        store=events_store,
        publisher=publisher,
        api_publisher=api_publisher,
        partitions=partitions,
        views=views,
        forecast_watch=forecast_watch,
        clock=clock,
        embedded_nats=embedded,
        services=services,
        views_process=views_child,
        owns_store=owns_store,
        senders=senders,
        webhooks=endpoints,
    )
    try:
        hub.start()
        if plant is not None:
            await hub.record_plant(plant)
    except BaseException:
        await hub.close()
        raise
    return hub


def views_process(settings: Settings) -> ChildProcess:
    """The views, kept up to date in a process of their own (``follow_views``), which gets
    ``settings`` as its first line of input. It runs at a lower priority than the hub: on a
    small machine under a burst, ingest (what acks the plant's data) gets the CPU first and the
    views follow (``bench/ingest.py`` measures how far behind)."""
    argv = [sys.executable, "-m", "hub", "projections", "follow", "--settings-from-stdin"]
    return ChildProcess("the views process", argv, settings_json(settings), nice=10)


async def follow_views(settings: Settings, stop: asyncio.Event) -> None:
    """Keep every view up to date with the store until ``stop`` is set: what the views process
    runs. Each group of views that have read equally far has its worker; a batch that fails is
    logged and retried."""
    store = await asyncio.to_thread(EventStore, settings)
    try:
        views = await asyncio.to_thread(open_views, settings)
        try:
            workers = projection_workers(settings, store, views)
            for worker in workers:
                await asyncio.to_thread(worker.prepare)
            poll = settings.projection_poll_s
            async with asyncio.TaskGroup() as group:
                for worker in workers:
                    group.create_task(worker.run(stop, poll_interval=poll), name=worker.name)
        finally:
            await asyncio.to_thread(views.close)
    finally:
        await asyncio.to_thread(store.close)
