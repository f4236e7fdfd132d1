"""Crashes lose nothing and duplicate nothing: the hub is a real process, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from contracts import CloudEvent, dedupe_key
from hub.nats import STREAM, EmbeddedNatsServer, NatsPublisher, connect, ensure_streams
from hub.settings import load_settings
from hub.store import EventStore
from tests.conftest import cloud_event, eventually
from tests.counting import stored_parts

MACHINES = [f"M{i}" for i in range(1, 6)]


def counter_events(start: int, stop: int) -> list[CloudEvent]:
    """Readings ``start..stop-1`` of each machine's counter (the first one is the baseline)."""
    return [
        cloud_event(
            "mes.machine.partcount.v1",
            machine,
            {"count": n, "kind": "all"},
            at=timedelta(seconds=n),
            event_id=f"{machine}-{n}",
        )
        for n in range(start, stop)
        for machine in MACHINES
    ]


def start_hub(data_dir: Path, nats_url: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub",
            "serve",
            "--nats-url",
            nats_url,
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
        ],
        env={**os.environ, "MES_HUB_INGEST_BATCH": "50", **env},
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / "hub.stderr", "ab"),
    )


async def last_stream_seq(nats_url: str) -> int:
    client = await connect(nats_url)
    try:
        return int((await client.jetstream().stream_info(STREAM)).state.last_seq)
    finally:
        await client.close()


async def publish(nats_url: str, events: list[CloudEvent]) -> None:
    client = await connect(nats_url)
    try:
        await ensure_streams(client.jetstream(), load_settings())
        await NatsPublisher(client.jetstream(), "default").publish_many(events)
    finally:
        await client.close()


def totals(data_dir: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """parts produced and stored event count per machine, and received ids, read from the store."""
    store = EventStore(load_settings(data_dir=data_dir))
    try:
        parts, versions = {}, {}
        for machine in store.machines("default"):
            parts[machine.machine_id] = stored_parts(store, "default", machine.machine_id)
            versions[machine.machine_id] = machine.version
        received = len(store.received_already([dedupe_key(e) for e in counter_events(0, 400)]))
        return parts, versions, received
    finally:
        store.close()


async def wait_stored(data_dir: Path, seq: int) -> None:
    def position() -> int:
        store = EventStore(load_settings(data_dir=data_dir))
        try:
            return store.tracking_position("nats:MES:ingest:p0of1")
        finally:
            store.close()

    await eventually(lambda: position() >= seq, timeout=60)


async def totals_once_stored(
    process: subprocess.Popen[bytes], data_dir: Path, nats_url: str
) -> tuple[dict[str, int], dict[str, int], int]:
    """Let the hub store everything in the stream, stop it cleanly, then read the totals."""
    try:
        await wait_stored(data_dir, await last_stream_seq(nats_url))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return totals(data_dir)


async def test_sigkill_between_commit_and_ack_then_restart_gives_exact_totals(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    await publish(nats_server.url, counter_events(0, 100))  # 500 events
    crashing = start_hub(data_dir, nats_server.url, MES_HUB_FAULT_KILL_AFTER_COMMIT="3")
    assert await asyncio.to_thread(crashing.wait, 60) == -signal.SIGKILL
    # Committed but never acked. The restart resumes after the store's position (it recreates
    # the consumer there), so nothing committed is applied again.
    _, _, received = totals(data_dir)
    assert 0 < received < 500
    restarted = start_hub(data_dir, nats_server.url)
    parts, versions, received = await totals_once_stored(restarted, data_dir, nats_server.url)
    assert parts == {m: 99 for m in MACHINES}
    # Registered + 100 readings each: nothing applied twice.
    assert versions == {m: 101 for m in MACHINES}
    assert received == 500


async def test_random_sigkills_under_load_lose_and_duplicate_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    rng = random.Random(20261122)
    published = 0
    process = start_hub(data_dir, nats_server.url)
    for _round in range(4):
        chunk = counter_events(published, published + 60)
        publisher = asyncio.create_task(publish(nats_server.url, chunk))
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        process.kill()  # SIGKILL, wherever it is
        process.wait(10)
        await publisher
        published += 60
        process = start_hub(data_dir, nats_server.url)
    parts, versions, received = await totals_once_stored(process, data_dir, nats_server.url)
    assert parts == {m: published - 1 for m in MACHINES}
    assert versions == {m: published + 1 for m in MACHINES}
    assert received == published * len(MACHINES)


async def test_a_hub_killed_takes_its_views_process_with_it(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    import psutil

    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    hub = start_hub(data_dir, nats_server.url)
    try:

        def views_process() -> list[psutil.Process]:
            return [
                child for child in psutil.Process(hub.pid).children() if "follow" in child.cmdline()
            ]

        await eventually(lambda: bool(views_process()), timeout=30)
        (child,) = views_process()
        # Its settings came on its input: none of the hub's MES_HUB_* variables, no secret on
        # its command line.
        assert not [k for k in child.environ() if k.startswith("MES_HUB_")]
        assert child.cmdline()[-3:] == ["projections", "follow", "--settings-from-stdin"]
        hub.send_signal(signal.SIGKILL)
        hub.wait(10)
        await eventually(lambda: not child.is_running() or child.status() == "zombie", 20)
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()
