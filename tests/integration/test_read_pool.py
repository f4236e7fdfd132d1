"""The API's read pool (``hub.api.reads``): reads are bounded, refused with 429 rather than
queued without bound, dropped when their client has gone, and answered the same from worker
processes as from threads; a dead worker is replaced, and workers end with their hub.

Counts, not timings: a read that blocks on an event stands for a slow one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import SecretStr

from hub.api.app import create_app
from hub.api.reads import ReadPool, ReadSources
from hub.bootstrap import Hub, api_context, api_reads, build_hub
from hub.nats import EmbeddedNatsServer
from hub.server import ApiServer
from tests.conftest import api_client, api_key, cloud_event, eventually, postgres_settings

PROBLEM = "application/problem+json"
ADMIN = {"Authorization": f"Bearer {api_key('admin')}"}


class Gate:
    """A read that waits until the test opens the gate (a slow query, held still)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started = 0
        self.finished = 0

    def read(self, sources: ReadSources) -> bytes:
        self.started += 1
        self.open.wait(30)
        self.finished += 1
        return b"[]"


async def test_a_full_pool_refuses_with_429_and_retry_after_instead_of_queueing(hub: Hub) -> None:
    pool = ReadPool.in_threads(ReadSources(hub.store, *_readers(hub)), workers=1, queue=1)
    gate = Gate()
    held = [asyncio.ensure_future(pool.run(None, gate.read)) for _ in range(2)]
    await eventually(lambda: gate.started == 1 and pool.in_flight == 2)
    async with api_client(hub, reads=pool) as http:
        answer = await http.get("/api/v1/machines", headers=ADMIN)
    assert answer.status_code == 429
    assert answer.headers["content-type"] == PROBLEM
    assert int(answer.headers["retry-after"]) >= 1
    assert "ask again" in answer.json()["detail"]
    assert (pool.refused, gate.started) == (1, 1)  # refused at once: nothing more ran
    gate.open.set()
    assert await asyncio.gather(*held) == [b"[]", b"[]"]
    assert pool.in_flight == 0
    async with api_client(hub, reads=pool) as http:  # room again
        assert (await http.get("/api/v1/machines", headers=ADMIN)).status_code == 200
    pool.close()


async def test_a_read_whose_client_went_before_it_started_is_dropped(hub: Hub) -> None:
    pool = ReadPool.in_threads(ReadSources(hub.store, *_readers(hub)), workers=1, queue=4)
    gate = Gate()
    busy = asyncio.ensure_future(pool.run(None, gate.read))
    await eventually(lambda: gate.started == 1)
    server = ApiServer(create_app(api_context(hub, reads=pool)), "127.0.0.1", 0)
    server.start()
    try:
        # A real socket: the client gives up while its read waits for the busy worker.
        async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get("/api/v1/machines", headers=ADMIN)
        await eventually(lambda: pool.dropped == 1)
        assert pool.in_flight == 1  # only the read that was running
        gate.open.set()
        await busy
        assert gate.started == 1  # the dropped read never ran
    finally:
        gate.open.set()
        await server.stop()
        pool.close()


async def test_worker_processes_answer_as_the_threads_do_and_a_dead_worker_is_replaced(
    hub: Hub,
) -> None:
    for n, execution in enumerate(("ACTIVE", "FEED_HOLD")):
        event = cloud_event(
            "mes.machine.execution.v1", f"M{n}", {"execution": execution, "mode": "AUTOMATIC"}
        )
        await hub.publisher.publish_many([event])
    await hub.wait_caught_up()
    await eventually(lambda: len(hub.store.machines("default")) == 2)
    processes = api_reads(hub.settings)
    processes.start()
    try:
        async with api_client(hub) as http:
            in_threads = await http.get("/api/v1/machines", headers=ADMIN)
            oee_threads = await http.get("/api/v1/oee", params=_WINDOW, headers=ADMIN)
        async with api_client(hub, reads=processes) as http:
            in_workers = await http.get("/api/v1/machines", headers=ADMIN)
            oee_workers = await http.get("/api/v1/oee", params=_WINDOW, headers=ADMIN)
            unknown = await http.get("/api/v1/machines/M9/timeline", params=_WINDOW, headers=ADMIN)
            assert [m["machine_id"] for m in in_workers.json()] == ["M0", "M1"]
            assert in_workers.json() == in_threads.json()
            assert oee_workers.json() == oee_threads.json()
            assert unknown.status_code == 404  # raised in a worker, answered here

            workers = _workers()
            assert len(workers) == hub.settings.api_read_workers

            # Below ingest: Linux's idle scheduling class (else a higher nice value), set first
            # thing when a worker starts (one may still be starting: it has had nothing to do).
            def below_ingest(worker: psutil.Process) -> bool:
                if hasattr(os, "SCHED_IDLE"):
                    return os.sched_getscheduler(worker.pid) == os.SCHED_IDLE
                return worker.nice() > psutil.Process().nice()

            await eventually(lambda: all(below_ingest(w) for w in workers))
            os.kill(workers[0].pid, signal.SIGKILL)
            # Killed while idle: the pool refuses every read from then on (Python marks it
            # broken); the next read goes to a new pool.
            await eventually(lambda: bool(getattr(processes._executor, "_broken", False)))
            answers = [
                (await http.get("/api/v1/machines", headers=ADMIN)).status_code for _ in range(3)
            ]
        assert answers == [200, 200, 200]
        # The broken pool's workers end; the new pool's serve.
        await eventually(lambda: len(_workers()) == hub.settings.api_read_workers)
    finally:
        processes.close()
    await eventually(lambda: not _workers())


@pytest.mark.postgres
async def test_worker_processes_read_a_postgresql_store_without_touching_its_tables(
    postgres_dsn: str, nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    settings = postgres_settings(postgres_dsn, tmp_path / "hub").model_copy(
        update={"nats_url": nats_server.url, "api_keys": SecretStr(f"admin:{api_key('admin')}")}
    )
    hub = await build_hub(settings)
    processes = api_reads(settings)
    try:
        event = cloud_event("mes.machine.execution.v1", "P1", {"execution": "ACTIVE"})
        await hub.publisher.publish_many([event])
        await eventually(lambda: hub.store.machine("default", "P1") is not None)
        processes.start()
        async with api_client(hub, reads=processes) as http:
            machines = await http.get("/api/v1/machines", headers=ADMIN)
            orders = await http.get("/api/v1/orders", headers=ADMIN)
        assert machines.status_code == 200, machines.text
        assert [m["machine_id"] for m in machines.json()] == ["P1"]
        assert orders.status_code == 200 and orders.json() == []
    finally:
        processes.close()
        await hub.close()


def test_the_read_workers_end_with_a_hub_killed_by_sigkill(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}
    hub = subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        env={**env, "MES_HUB_API_KEYS": f"admin:{api_key('admin')}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        workers = _wait_for_workers(psutil.Process(hub.pid), expected=2)
        hub.kill()
        hub.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert alive == [], f"read workers left behind: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            hub.kill()
        assert hub.stderr is not None
        hub.stderr.close()


# --- helpers -----------------------------------------------------------------------------------

_WINDOW = {"from": "2026-03-02T00:00:00Z", "to": "2026-03-03T00:00:00Z"}


def _readers(hub: Hub) -> tuple[Any, Any, Any, Any]:
    from projections.views.audit_view import AuditLogReader
    from projections.views.facts_view import FactsReader
    from projections.views.orders_view import OrdersReader
    from projections.views.outbox_view import OutboxReader

    views = hub.views
    return FactsReader(views), OrdersReader(views), OutboxReader(views), AuditLogReader(views)


def _workers(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """The read workers among ``parent``'s children (spawned: ``multiprocessing.spawn``)."""
    parent = parent or psutil.Process()
    found = []
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "multiprocessing" in " ".join(child.cmdline()) and "spawn_main" in " ".join(
                child.cmdline()
            ):
                found.append(child)
    return found


def _wait_for_workers(parent: psutil.Process, expected: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = _workers(parent)
        if len(workers) >= expected:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"{expected} read workers did not start")
