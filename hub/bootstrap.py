"""The composition root: the one place that builds and wires the hub's parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from hub.domain import Order
from hub.ingest import Ingestor, IngestPartition, IngestStats, tracking_name
from hub.nats import EmbeddedNatsServer, NatsPublisher, connect, ensure_streams
from hub.settings import Settings
from hub.store import EventStore
from projections.processes.forecast_watch import ForecastWatch
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import configuration_event
from projections.views.database import PostgresViews, SQLiteViews, ViewDatabase
from projections.views.facts_view import FactsReader, MachineFactsView
from projections.views.orders_view import OrderStatesView, OrdersView, orders_in_play
from projections.views.runner import ProjectionWorker, View, group_by_position

log = logging.getLogger(__name__)


@dataclass
class Hub:
    """A running hub: NATS (embedded or not), the store, and the ingest partitions."""

    settings: Settings
    nats_url: str
    nats: NatsClient
    jetstream: JetStreamContext
    store: EventStore
    publisher: NatsPublisher
    partitions: list[IngestPartition]
    views: ViewDatabase
    projections: list[ProjectionWorker]
    forecast_watch: ForecastWatch
    embedded_nats: EmbeddedNatsServer | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _projecting: bool = False
    _watch: asyncio.Task[None] | None = None

    def start_ingest(self) -> None:
        for partition in self.partitions:
            self._tasks.append(asyncio.create_task(partition.run(self._stop)))

    def start_projections(self) -> None:
        poll = self.settings.projection_poll_s
        self._projecting = True
        for worker in self.projections:
            self._tasks.append(asyncio.create_task(worker.run(self._stop, poll)))

    async def record_plant(self, plant: PlantConfig) -> bool:
        """Record ``plant`` as the site's configuration if it differs from the last one recorded
        (ingest stores it, as any other event); returns whether it was new."""
        recorded = await asyncio.to_thread(self.store.plant, self.settings.site)
        event = configuration_event(self.settings.site, recorded, plant, datetime.now(UTC))
        if event is None:
            return False
        (receipt,) = await self.publisher.publish_many([event])
        log.info("plant configuration recorded (%s)", event.id)
        return not receipt.duplicate

    def start_forecast_watch(self) -> None:
        interval = self.settings.forecast_interval_s
        self._watch = asyncio.create_task(self.forecast_watch.run(self._stop, interval))
        self._tasks.append(self._watch)

    async def stop_forecast_watch(self) -> None:
        """Stop re-forecasting (a round under way is cancelled; it published all or nothing)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def wait_projected(self, timeout: float = 30.0) -> None:
        """Wait until every view has read everything stored so far (for tests, demo)."""
        end = await asyncio.to_thread(self.store.last_position)
        deadline = asyncio.get_running_loop().time() + timeout
        # Positions move in the workers' threads; a short poll is simpler than signalling.
        while any(worker.position < end for worker in self.projections):
            if asyncio.get_running_loop().time() > deadline:
                behind = {w.name: w.position for w in self.projections if w.position < end}
                raise TimeoutError(f"views still behind store position {end}: {behind}")
            await asyncio.sleep(0.02)

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
        """Wait until every partition has read to the end of the stream (for tests, demo)."""
        for partition in self.partitions:
            partition.caught_up.clear()
        await asyncio.wait_for(
            asyncio.gather(*(p.caught_up.wait() for p in self.partitions)), timeout
        )
        if self._projecting:
            await self.wait_projected(timeout)

    async def close(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Ingest has stopped and acked what it committed; close() flushes those acks. (drain()
        # would wait out its timeout on the pull subscriptions.)
        with contextlib.suppress(Exception):
            await self.nats.close()
        await asyncio.to_thread(self.views.close)
        await asyncio.to_thread(self.store.close)
        if self.embedded_nats is not None:
            await asyncio.to_thread(self.embedded_nats.stop)


def all_views() -> list[View]:
    return [MachineFactsView(), OrdersView(), OrderStatesView()]


def open_orders(store: EventStore, views: ViewDatabase, site: str) -> list[Order]:
    """The orders still in play for delivery forecasts (not every order ever released)."""
    found = (store.load(aggregate_id) for aggregate_id in orders_in_play(views))
    return [o for o in found if isinstance(o, Order) and o.site == site]


def open_views(settings: Settings) -> ViewDatabase:
    if settings.store == "sqlite":
        return SQLiteViews(settings.views_sqlite_path)
    assert settings.postgres_dsn is not None  # checked by the store before this
    return PostgresViews(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)


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
    ingest: bool = True,
    projections: bool = True,
    plant: PlantConfig | None = None,
) -> Hub:
    """The hub, with ingest, the views and (with ``projections``) the delivery forecast watch
    running; ``plant`` is the calendar and rules the forecasts use."""
    embedded: EmbeddedNatsServer | None = None
    url = settings.nats_url
    if url is None:
        embedded = EmbeddedNatsServer(settings.nats_data_dir)
        url = await asyncio.to_thread(embedded.start)
    try:
        client = await connect(url)
        jetstream = client.jetstream()
        await ensure_streams(jetstream, settings)
        store = await asyncio.to_thread(EventStore, settings)
        views = await asyncio.to_thread(open_views, settings)
        workers = projection_workers(settings, store, views)
        # One after the other: concurrent CREATE TABLE IF NOT EXISTS can collide on PostgreSQL.
        for worker in workers:
            await asyncio.to_thread(worker.prepare)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    partitions = [
        IngestPartition(
            jetstream,
            Ingestor(
                store,
                tracking_name(k, settings.partitions),
                partition=k,
                partitions=settings.partitions,
                snapshot_interval=settings.snapshot_interval,
                max_clock_skew_s=settings.max_clock_skew_s,
            ),
            batch_size=settings.ingest_batch,
            kill_after_commit=settings.fault_kill_after_commit,
        )
        for k in range(settings.partitions)
    ]
    publisher = NatsPublisher(jetstream, settings.site)

    def views_caught_up() -> bool:
        stored = store.last_position()
        return all(worker.position >= stored for worker in workers)

    forecast_watch = ForecastWatch(
        settings.site,
        partial(open_orders, store, views, settings.site),
        FactsReader(views),
        plant or PlantConfig(),
        publisher,
        ready=views_caught_up,
    )
    hub = Hub(
        settings=settings,
        nats_url=url,
        nats=client,
        jetstream=jetstream,
        store=store,
        publisher=publisher,
        partitions=partitions,
        views=views,
        projections=workers,
        forecast_watch=forecast_watch,
        embedded_nats=embedded,
    )
    if ingest:
        hub.start_ingest()
    if projections:
        hub.start_projections()
        hub.start_forecast_watch()
    if plant is not None:
        await hub.record_plant(plant)
    return hub
