"""The MTConnect client against an agent stand-in on loopback that serves the fixture
Devices.xml and streams generated from the real Okuma SHDR capture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from adapters.machines.mtconnect import MtconnectAdapter, MtconnectConfig
from hub.bootstrap import Hub
from hub.ports import EventPublisher, InMemoryPublisher
from tests.conftest import eventually, fixtures_dir
from tests.integration.test_shdr_adapter import (
    changes_in_capture,
    first_values,
    in_effect,
    published,
    recordings,
)
from tests.mtconnect_agent import AgentStandIn, okuma_lines

FIXTURES = fixtures_dir() or Path("/nonexistent")
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "mtconnect" / "demo_agent_Devices.xml").is_file(),
    reason="../shared/fixtures/mtconnect (Devices.xml and the Okuma capture) is not here",
)
OKUMA_ONLY = {"OKUMA": "OKUMA-1"}


@contextlib.asynccontextmanager
async def agent(buffer_size: int = 131_072) -> AsyncIterator[AgentStandIn]:
    stand_in = AgentStandIn(FIXTURES / "mtconnect" / "demo_agent_Devices.xml", buffer_size)
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@contextlib.asynccontextmanager
async def client(
    stand_in: AgentStandIn, publisher: EventPublisher, **config: object
) -> AsyncIterator[MtconnectAdapter]:
    assert stand_in.server is not None
    settings = {"url": stand_in.server.url, "devices": OKUMA_ONLY, "interval_ms": 50, **config}
    adapter = MtconnectAdapter(MtconnectConfig.model_validate(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))
    try:
        yield adapter
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def executions(publisher: InMemoryPublisher) -> list[tuple[datetime, object]]:
    return [(t, d["execution"]) for t, d in published(publisher, "mes.machine.execution.v1")]


def counts(publisher: InMemoryPublisher) -> list[tuple[datetime, str]]:
    return [(t, str(d["count"])) for t, d in published(publisher, "mes.machine.partcount.v1")]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "polling"])
async def test_every_change_of_the_okuma_capture_arrives_through_the_agent(
    streaming: bool,
) -> None:
    lines = okuma_lines(FIXTURES)
    publisher = InMemoryPublisher()
    async with agent() as stand_in, client(stand_in, publisher, streaming=streaming, count=200):
        await eventually(lambda: any(r.startswith("/sample") for r in stand_in.requests))
        for start in range(0, len(lines), 1500):  # the machine runs while the client follows
            stand_in.feed_shdr(lines[start : start + 1500])
            await asyncio.sleep(0.05)
        expected = changes_in_capture("ppartcount")
        await eventually(lambda: counts(publisher) == expected, timeout=30)
    expected_executions = changes_in_capture("pexecution")
    assert [e for e in expected_executions if e not in executions(publisher)] == []
    polled = any("interval" in r for r in stand_in.requests if r.startswith("/sample"))
    assert polled is streaming  # the mode asked for is the mode used


async def test_a_recording_that_goes_back_in_time_arrives_through_the_agent() -> None:
    # The agent keeps each recording's snapshot (AVAILABLE, READY, the program, count 0) as
    # observations of their own, timed before what the client published already.
    lines = okuma_lines(FIXTURES)
    publisher = InMemoryPublisher()
    async with agent() as stand_in, client(stand_in, publisher) as adapter:
        await eventually(lambda: any(r.startswith("/sample") for r in stand_in.requests))
        stand_in.feed_shdr(lines)  # after the client's first look at current: it samples all
        await eventually(lambda: adapter.next_sequence == stand_in.next_sequence, timeout=30)
    assert counts(publisher) == changes_in_capture("ppartcount")
    availability = published(publisher, "mes.machine.availability.v1")
    execution = published(publisher, "mes.machine.execution.v1")
    parts = recordings(lines)
    for recording in parts:
        start, first = first_values(recording, "avail", "pexecution", "pprogram")
        assert (start, {"execution": first["pexecution"], "mode": "AUTOMATIC",
                        "program": first["pprogram"]}) in execution  # fmt: skip
        assert in_effect(availability, start) == {"availability": "AVAILABLE"}
    # The second recording starts 14 minutes before the first: its AVAILABLE is published.
    second, _ = first_values(parts[1], "avail")
    assert (second, {"availability": "AVAILABLE"}) in availability


async def test_two_readers_of_the_same_observations_publish_the_same_ids() -> None:
    publisher = InMemoryPublisher()
    async with (
        agent() as stand_in,
        client(stand_in, publisher) as one,
        client(stand_in, publisher) as other,
    ):
        await eventually(lambda: stand_in.requests.count("/current?") == 2)
        stand_in.feed_shdr(okuma_lines(FIXTURES)[:3000])
        for reader in (one, other):
            await eventually(lambda r=reader: r.next_sequence == stand_in.next_sequence)
        await asyncio.sleep(0.2)
    # Ids come from the agent's instanceId and sequence: InMemoryPublisher, like JetStream,
    # keeps one event per id, so the second reader added nothing to what the first published.
    assert len(publisher.published) == len({e.id for _, e in publisher.published}) > 5


async def test_an_agent_restart_is_detected_and_the_client_resyncs_from_current() -> None:
    lines = okuma_lines(FIXTURES)
    publisher = InMemoryPublisher()
    async with agent() as stand_in, client(stand_in, publisher) as adapter:
        stand_in.feed_shdr(lines[:1400])
        await eventually(lambda: adapter.next_sequence == stand_in.next_sequence)
        before = stand_in.instance_id
        stand_in.restart()
        stand_in.feed_shdr(lines[1400:6000])
        await eventually(lambda: adapter.instance_id == stand_in.instance_id != before)
        await eventually(lambda: adapter.next_sequence == stand_in.next_sequence)
    conditions = [d for _, d in published(publisher, "mes.machine.condition.v1")]
    assert {"level": "warning", "native_code": "MTCONNECT_RESYNC",
            "message": "the agent restarted (new instanceId)"} in conditions  # fmt: skip
    # After the restart the counts go on (the agent's new history reaches the client).
    assert counts(publisher)[-1] in changes_in_capture("ppartcount")


async def test_data_lost_out_of_the_agents_buffer_is_said_and_resynced() -> None:
    lines = okuma_lines(FIXTURES)
    publisher = InMemoryPublisher()
    async with agent(buffer_size=100) as stand_in:
        stand_in.feed_shdr(lines[:200])
        async with client(stand_in, publisher, streaming=False, count=5, interval_ms=200) as a:
            await eventually(lambda: a.next_sequence > 0)
            stand_in.feed_shdr(lines[200:3000])  # far more than the buffer holds
            await eventually(lambda: a.resyncs >= 1)
            await eventually(lambda: a.next_sequence == stand_in.next_sequence, timeout=30)
    messages = [d.get("message", "") for _, d in published(publisher, "mes.machine.condition.v1")]
    assert any("data lost" in str(m) for m in messages)
    assert any(r.startswith("/current") for r in stand_in.requests[2:])  # resynced from current


async def test_an_agent_that_answers_nonsense_gives_a_condition_and_the_client_goes_on() -> None:
    publisher = InMemoryPublisher()
    # Polling: each request meets whatever the agent answers at that moment.
    async with agent() as stand_in, client(stand_in, publisher, streaming=False):
        await eventually(lambda: any(r.startswith("/sample") for r in stand_in.requests))
        bad = ["2026-03-02T06:00:00Z|avail|AVAILABLE|pexecution|DANCING",
                   "2026-03-02T06:00:01Z|pexecution|ACTIVE|ppartcount|-3"]  # fmt: skip
        stand_in.feed_shdr(bad)
        await eventually(lambda: len(published(publisher, "mes.machine.condition.v1")) >= 2)
        stand_in.fail_with = (200, b"<html>proxy error</html")
        await eventually(lambda: any(
                d.get("native_code") == "ADAPTER_CONNECTION"
                for _, d in published(publisher, "mes.machine.condition.v1")
            ))  # fmt: skip
        stand_in.fail_with = None
        stand_in.feed_shdr(["2026-03-02T06:00:02Z|ppartcount|4"])
        await eventually(lambda: "4" in [c for _, c in counts(publisher)])
    conditions = [d for _, d in published(publisher, "mes.machine.condition.v1")]
    bad = [c for c in conditions if c.get("native_code") == "ADAPTER_INPUT"]
    assert any("DANCING" in c["message"] for c in bad) and any("-3" in c["message"] for c in bad)
    availability = [
        d["availability"] for _, d in published(publisher, "mes.machine.availability.v1")
    ]
    assert availability == ["AVAILABLE", "UNAVAILABLE", "AVAILABLE"]


async def test_the_okuma_through_the_agent_into_a_real_hub(hub: Hub) -> None:
    async with agent() as stand_in:
        stand_in.feed_shdr(okuma_lines(FIXTURES)[:6000])
        async with client(stand_in, hub.publisher) as adapter:
            await eventually(lambda: adapter.next_sequence == stand_in.next_sequence)
            await asyncio.sleep(0.3)
        await hub.wait_caught_up()
    machine = hub.store.machine(hub.settings.site, "OKUMA-1")
    assert machine is not None
    assert machine.availability == "AVAILABLE" and machine.program is not None
    last_count = [v for _, v in changes_in_capture("ppartcount")]
    assert machine.counter_values["all"] in {int(v) for v in last_count}


async def test_check_returns_the_current_state_without_publishing() -> None:
    async with agent() as stand_in:
        stand_in.feed_shdr(okuma_lines(FIXTURES)[:1500])
        assert stand_in.server is not None
        adapter = MtconnectAdapter(MtconnectConfig(url=stand_in.server.url, devices=OKUMA_ONLY))
        events = await adapter.check()
    kinds = {e.type for e in events}
    assert {"mes.machine.availability.v1", "mes.machine.execution.v1",
            "mes.machine.partcount.v1"} <= kinds  # fmt: skip
    assert all(e.subject == "OKUMA-1" for e in events)


async def test_an_agent_that_cannot_stream_is_polled() -> None:
    publisher = InMemoryPublisher()
    async with agent() as stand_in:
        stand_in.multipart = False
        async with client(stand_in, publisher, streaming=True, interval_ms=50):
            await eventually(lambda: any(r.startswith("/sample") for r in stand_in.requests))
            stand_in.feed_shdr(okuma_lines(FIXTURES)[:3000])
            await eventually(lambda: len(counts(publisher)) >= 2)
            await asyncio.sleep(0.3)  # idle: a polling client waits between requests
    samples = [r for r in stand_in.requests if r.startswith("/sample")]
    assert "interval" in samples[0] and "interval" not in samples[-1]
    assert len(samples) < 50  # not a hot loop of requests


async def test_an_agent_down_at_start_makes_its_machines_unavailable() -> None:
    publisher = InMemoryPublisher()
    config = MtconnectConfig(url="http://127.0.0.1:9", devices=OKUMA_ONLY, reconnect_max_s=0.2)
    adapter, stop = MtconnectAdapter(config), asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))
    await eventually(lambda: len(published(publisher, "mes.machine.availability.v1")) == 1)
    await asyncio.sleep(0.5)  # further failed attempts say nothing new
    stop.set()
    await asyncio.wait_for(task, 10)
    (unavailable,) = published(publisher, "mes.machine.availability.v1")
    assert unavailable[1] == {"availability": "UNAVAILABLE"}


async def test_a_password_in_the_agent_url_is_never_shown_or_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = InMemoryPublisher()
    url = "http://mes:S3cret@127.0.0.1:9"
    adapter = MtconnectAdapter(MtconnectConfig(url=url, devices=OKUMA_ONLY, reconnect_max_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))
    await eventually(lambda: len(publisher.published) >= 1)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert "S3cret" not in caplog.text
    assert all("S3cret" not in e.envelope.source for _, e in publisher.published)
