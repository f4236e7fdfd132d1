"""The composition root takes its parts from the caller: a store, a publisher, a clock; and runs
the hub's long-running parts as named services under one task group."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from contracts import encode_event
from hub.bootstrap import FORECAST_WATCH, PARTNERS, SEALER, WEBHOOK_SENDERS, build_hub
from hub.ports import InMemoryPublisher
from hub.settings import Settings
from projections.rules.plant import PlantConfig
from tests.conftest import cloud_event, eventually

NOON = datetime(2026, 3, 2, 12, tzinfo=UTC)


async def test_a_publisher_and_a_clock_passed_in_are_the_ones_the_hub_uses(
    settings: Settings,
) -> None:
    publisher = InMemoryPublisher()
    hub = await build_hub(
        settings, publisher=publisher, clock=lambda: NOON, plant=PlantConfig(time_zone="UTC")
    )
    try:
        # The plant's configuration is recorded through the publisher passed in, at its clock.
        ((_, recorded),) = publisher.published
        assert (recorded.envelope.type, recorded.envelope.time) == (
            "mes.hub.plant.configured.v1",
            NOON,
        )
        assert [s.name for s in hub.services] == [
            "ingest:p0",
            "views",
            FORECAST_WATCH,
            PARTNERS,
            WEBHOOK_SENDERS,
            SEALER,
        ]
        # Ingest judges "the future" by that clock too: 06:00 is accepted, 12:10 (ten minutes
        # after the hub's noon) is dead-lettered.
        early = cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"},
                            at=NOON - timedelta(hours=6))  # fmt: skip
        late = cloud_event("mes.machine.execution.v1", "M1", {"execution": "READY"},
                           at=NOON + timedelta(minutes=10))  # fmt: skip
        for event in (early, late):
            await hub.jetstream.publish("mes.default.machine.M1.execution", encode_event(event))
        await eventually(lambda: hub.ingest_stats().applied + hub.ingest_stats().rejected == 2)
        assert (hub.ingest_stats().applied, hub.ingest_stats().rejected) == (1, 1)
    finally:
        await hub.close()


async def test_one_service_can_be_stopped_and_close_stops_the_rest(settings: Settings) -> None:
    hub = await build_hub(settings)
    try:
        await eventually(lambda: len(hub.running()) == len(hub.services))
        running = hub.running()
        assert set(running) == {s.name for s in hub.services}
        await hub.stop_service(FORECAST_WATCH)
        assert running[FORECAST_WATCH].cancelled()
        assert not any(t.done() for name, t in running.items() if name != FORECAST_WATCH)
    finally:
        await hub.close()
    assert all(task.done() for task in running.values())
