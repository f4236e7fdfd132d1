"""Store-and-forward across a real NATS outage: stop nats-server mid-stream, start it again,
and every event arrives in the hub's store once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.forward import StoreAndForward
from contracts import CloudEvent
from hub.bootstrap import Hub
from hub.domain import machine_aggregate_id
from hub.nats import ConnectingPublisher, EmbeddedNatsServer
from hub.ports import InMemoryPublisher, PublishReceipt
from tests.conftest import cloud_event, eventually
from tests.counting import stored_parts


def readings(start: int, stop: int) -> list[CloudEvent]:
    """Counter readings of machine M1, one a second; the first is the baseline."""
    return [
        cloud_event("mes.machine.partcount.v1", "M1", {"count": n, "kind": "all"},
                    at=timedelta(seconds=n), event_id=f"M1-count-{n}")
        for n in range(start, stop)
    ]  # fmt: skip


async def test_events_published_while_nats_is_down_arrive_once_and_in_order(
    hub: Hub, nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    link = ConnectingPublisher(nats_server.url, hub.settings.site, "test-adapter", timeout=1.0)
    forward = StoreAndForward(link, tmp_path / "buffer", hub.settings.site, retry_max_s=0.5)
    for event in readings(0, 100):
        await forward.publish(event)
    assert forward.waiting() == 0  # NATS is up: straight through

    await asyncio.to_thread(nats_server.stop)
    for chunk in range(100, 200, 10):
        await forward.publish_many(readings(chunk, chunk + 10))
    assert forward.waiting() > 0  # queued on disk while NATS is down

    await asyncio.to_thread(nats_server.start)  # same port, same JetStream data
    for chunk in range(200, 300, 10):
        await forward.publish_many(readings(chunk, chunk + 10))
    assert await forward.drain(timeout=60)
    await forward.close()
    await link.close()

    site = hub.settings.site
    await eventually(
        lambda: stored_parts(hub.store, site, "M1") == 299,
        timeout=60,
    )
    history = hub.store.machine_history(site, "M1")
    counts = [e.count for e in history if hasattr(e, "count")]
    assert counts == list(range(300))  # every reading once, in order: none lost, none twice
    assert not any(getattr(e, "late", False) for e in history)
    assert hub.store.existing([machine_aggregate_id(site, "M1")])


class Unreachable:
    """A NATS that cannot be reached (for the bound; the outage itself is tested for real)."""

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        raise ConnectionRefusedError("nats: no servers available")

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        raise ConnectionRefusedError("nats: no servers available")


async def test_a_full_buffer_says_so_and_keeps_the_newest_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forward = StoreAndForward(Unreachable(), tmp_path, "default", max_events=100)
    with caplog.at_level(logging.ERROR):
        for chunk in range(0, 250, 50):
            await forward.publish_many(readings(chunk, chunk + 50))
    assert (forward.waiting(), forward.dropped) == (100, 150)
    assert "buffer FULL" in caplog.text and "150 dropped since start" in caplog.text

    # NATS is back: the newest 100, in order.
    reachable = InMemoryPublisher()
    forward._inner = reachable
    assert await forward.drain(timeout=10)
    await forward.close()
    assert [e.id for _, e in reachable.published] == [f"M1-count-{n}" for n in range(150, 250)]


async def test_no_sqlite_call_of_the_queue_runs_on_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection the queue makes records the thread of its opening, of each statement
    (SQLite's trace callback runs where the statement runs) and of its closing."""
    calls: list[tuple[str, int]] = []

    class Recording(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append(("connect", threading.get_ident()))
            super().__init__(*args, **kwargs)
            self.set_trace_callback(lambda sql: calls.append((sql, threading.get_ident())))

        def close(self) -> None:
            calls.append(("close", threading.get_ident()))
            super().close()

    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=Recording, **kw)
    )
    loop_thread = threading.get_ident()

    # Open, enqueue past the bound (drop-oldest), count, restart, peek and delete, close.
    first = StoreAndForward(Unreachable(), tmp_path, "default", max_events=100)
    for chunk in range(0, 250, 50):
        await first.publish_many(readings(chunk, chunk + 50))
    assert (first.waiting(), first.dropped) == (100, 150)
    await first.close()
    reachable = InMemoryPublisher()
    second = StoreAndForward(reachable, tmp_path, "default")
    assert second.waiting() == 100
    assert await second.drain(timeout=10)
    await second.publish_many(readings(250, 260))  # straight through again
    await second.close()
    assert [e.id for _, e in reachable.published] == [f"M1-count-{n}" for n in range(150, 260)]

    statements = [sql for sql, _ in calls]
    for expected in ("connect", "CREATE TABLE", "INSERT INTO waiting", "WHERE seq IN (SELECT",
                     "SELECT seq, event", "DELETE FROM waiting WHERE seq <=", "count(*)",
                     "close"):  # fmt: skip
        assert any(expected in sql for sql in statements), expected
    assert statements.count("connect") == statements.count("close") == 2
    on_the_loop = [sql for sql, thread in calls if thread == loop_thread]
    assert on_the_loop == []


async def test_the_queue_survives_a_restart_of_the_adapter(tmp_path: Path) -> None:
    first = StoreAndForward(Unreachable(), tmp_path, "default")
    await first.publish_many(readings(0, 30))
    await first.close()
    reachable = InMemoryPublisher()
    second = StoreAndForward(reachable, tmp_path, "default")
    assert second.waiting() == 30
    assert await second.drain(timeout=10)
    await second.close()
    assert [e.id for _, e in reachable.published] == [f"M1-count-{n}" for n in range(30)]


async def test_nats_down_when_the_adapter_starts_buffers_and_flushes_when_it_comes(
    tmp_path: Path,
) -> None:
    import socket

    from hub.nats import connect, ensure_streams
    from hub.settings import load_settings

    with socket.socket() as probe:  # a port nothing listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    link = ConnectingPublisher(f"nats://127.0.0.1:{port}", "default", "test", timeout=1.0)
    forward = StoreAndForward(link, tmp_path / "buffer", "default", retry_max_s=0.3)
    await asyncio.wait_for(forward.publish_many(readings(0, 20)), 30)  # returns: buffered
    assert forward.waiting() == 20

    server = EmbeddedNatsServer(tmp_path / "nats", port=port)
    await asyncio.to_thread(server.start)
    try:
        client = await connect(server.url)
        await ensure_streams(client.jetstream(), load_settings())
        assert await forward.drain(timeout=30)
        info = await client.jetstream().stream_info("MES")
        assert info.state.messages == 20
        await client.close()
    finally:
        await forward.close()
        await link.close()
        await asyncio.to_thread(server.stop)


async def test_a_second_adapter_on_the_same_buffer_is_refused_until_the_first_is_gone(
    tmp_path: Path,
) -> None:
    import os

    from adapters.forward import BufferInUse
    from hub.ports import InMemoryPublisher

    first = StoreAndForward(InMemoryPublisher(), tmp_path / "buffer", "default")
    with pytest.raises(BufferInUse, match=rf"another running adapter \(pid {os.getpid()}\)"):
        StoreAndForward(InMemoryPublisher(), tmp_path / "buffer", "default")
    await first.close()
    again = StoreAndForward(InMemoryPublisher(), tmp_path / "buffer", "default")
    await again.close()


async def test_an_event_the_contract_refuses_is_raised_to_the_caller_never_queued(
    tmp_path: Path,
) -> None:
    from contracts import ContractViolation

    refused = cloud_event("mes.machine.partcount.v1", "M1", {"count": -1, "kind": "all"})
    # NATS down: refused, not buffered (it could never go out and would block the queue).
    forward = StoreAndForward(Unreachable(), tmp_path, "default")
    with pytest.raises(ContractViolation):
        await forward.publish_many([*readings(0, 2), refused])
    with pytest.raises(ContractViolation):
        await forward.store([refused])
    assert forward.waiting() == 0
    await forward.publish_many(readings(0, 3))  # later events are queued as ever
    assert forward.waiting() == 3
    await forward.close()
    # NATS up: refused too, and what was queued goes out.
    reachable = InMemoryPublisher()
    forward = StoreAndForward(reachable, tmp_path, "default")
    with pytest.raises(ContractViolation):
        await forward.publish_many([refused])
    assert await forward.drain(timeout=10)
    await forward.close()
    assert [e.id for _, e in reachable.published] == [f"M1-count-{n}" for n in range(3)]


async def test_store_queues_on_disk_before_nats_is_tried(tmp_path: Path) -> None:
    reachable = InMemoryPublisher()
    forward = StoreAndForward(reachable, tmp_path, "default")
    await forward.store(readings(0, 2))
    # On disk already: a process stopped now keeps them for its next run.
    assert forward.waiting() == 2 and reachable.published == []
    assert await forward.drain(timeout=10)
    await forward.close()
    assert [e.id for _, e in reachable.published] == ["M1-count-0", "M1-count-1"]


async def test_a_queued_event_the_contract_now_refuses_is_set_aside_not_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Queued by an older version (before it checked): it must not hold back what follows.
    first = StoreAndForward(Unreachable(), tmp_path, "default")
    await first.publish_many(readings(0, 1))
    await first.close()
    refused = cloud_event("mes.machine.partcount.v1", "M1", {"count": -1, "kind": "all"})
    with sqlite3.connect(tmp_path / "buffer.sqlite") as db:
        db.execute("INSERT INTO waiting (event) VALUES (?)", (refused.model_dump_json(),))
    db.close()
    second = StoreAndForward(Unreachable(), tmp_path, "default")
    await second.publish_many(readings(1, 3))
    await second.close()
    reachable = InMemoryPublisher()
    third = StoreAndForward(reachable, tmp_path, "default")
    with caplog.at_level(logging.ERROR):
        assert await third.drain(timeout=10)
    await third.close()
    assert [e.id for _, e in reachable.published] == [f"M1-count-{n}" for n in range(3)]
    assert f"set aside waiting event {refused.id}" in caplog.text
    # Kept on disk with the reason, not deleted.
    with sqlite3.connect(tmp_path / "buffer.sqlite") as db:
        rows = db.execute("SELECT event, reason FROM refused").fetchall()
    db.close()
    assert [json.loads(event)["id"] for event, _ in rows] == [refused.id]
    assert "count" in rows[0][1]


async def test_a_batch_with_a_refused_event_publishes_none_of_it(tmp_path: Path) -> None:
    from contracts import ContractViolation

    refused = cloud_event("mes.machine.partcount.v1", "M1", {"count": -1, "kind": "all"})
    reachable = InMemoryPublisher()
    forward = StoreAndForward(reachable, tmp_path, "default")
    with pytest.raises(ContractViolation):
        await forward.publish_many([*readings(0, 2), refused])
    await forward.close()
    # Not the two before it either: the caller was told none went out.
    assert reachable.published == []


class SwallowsOneCancel:
    """A publisher to a NATS that refuses, which swallows a cancel as ``asyncio.wait_for`` on
    Python 3.11 can when its inner future finishes in the same turn."""

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        raise AssertionError("not used")

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        raise ConnectionRefusedError("refused")


async def test_close_ends_while_nats_refuses_even_if_a_cancel_is_swallowed(
    tmp_path: Path,
) -> None:
    forward = StoreAndForward(SwallowsOneCancel(), tmp_path, "default", retry_max_s=0.05)
    await forward.publish_many(readings(0, 3))
    await asyncio.sleep(0.3)  # the flusher is retrying
    await asyncio.wait_for(forward.close(), 10)
    reopened = StoreAndForward(Unreachable(), tmp_path, "default")
    assert reopened.waiting() == 3  # nothing lost by closing
    await reopened.close()
