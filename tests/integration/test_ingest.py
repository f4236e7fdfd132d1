"""Ingest against a real nats-server: exactly once, dead letters, counters, event time."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts import CloudEvent, encode_event
from hub.bootstrap import Hub, build_hub
from hub.ingest import IncomingMessage, Rejected
from hub.nats import DLQ_REASON_HEADER, DLQ_SEQ_HEADER, DLQ_STREAM, MSG_ID_HEADER
from hub.settings import Settings
from tests.conftest import cloud_event, eventually
from tests.counting import stored_counters, stored_parts


def partcount(machine: str, count: int, seconds: float, **kw: Any) -> CloudEvent:
    return cloud_event(
        "mes.machine.partcount.v1",
        machine,
        {"count": count, "kind": "all"},
        at=timedelta(seconds=seconds),
        **kw,
    )


async def stored(hub: Hub, applied: int) -> None:
    await eventually(lambda: hub.ingest_stats().applied >= applied)
    await hub.wait_caught_up()


async def test_a_published_event_reaches_the_machine(hub: Hub) -> None:
    await hub.publisher.publish(
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE", "program": "O7"})
    )
    await stored(hub, 1)
    machine = hub.store.machine("default", "M1")
    assert machine is not None
    assert (machine.execution, machine.program) == ("ACTIVE", "O7")


async def test_a_duplicate_publish_is_counted_once(hub: Hub) -> None:
    await hub.publisher.publish(partcount("M1", 100, 0))
    event = partcount("M1", 103, 60)
    first = await hub.publisher.publish(event)
    again = await hub.publisher.publish(event)  # inside the duplicate window
    assert again.duplicate and again.stream_seq == first.stream_seq
    # Outside the window (no Nats-Msg-Id): the stream takes it, the store must drop it.
    await hub.jetstream.publish(first.subject, encode_event(event))
    await hub.publisher.publish(partcount("M1", 104, 120))
    await stored(hub, 3)
    assert stored_parts(hub.store, "default", "M1") == 4
    assert hub.ingest_stats().duplicates == 1


async def test_counter_baseline_then_increases_then_reset(hub: Hub) -> None:
    for seconds, count in ((0, 5000), (30, 5001), (60, 5003), (90, 2), (120, 4)):
        await hub.publisher.publish(partcount("M9", count, seconds))
    await stored(hub, 5)
    counters = stored_counters(hub.store, "default", "M9")
    # baseline 5000 counts nothing; +1, +2; reset: 2 made since; +2
    assert (counters.produced, counters.resets) == (7, 1)


async def test_out_of_order_events_are_kept_with_their_own_time(hub: Hub) -> None:
    late = cloud_event(
        "mes.machine.execution.v1", "M2", {"execution": "STOPPED"}, at=timedelta(minutes=5)
    )
    newer = cloud_event(
        "mes.machine.execution.v1", "M2", {"execution": "ACTIVE"}, at=timedelta(minutes=10)
    )
    await hub.publisher.publish(newer)
    await hub.publisher.publish(late)
    await stored(hub, 2)
    machine = hub.store.machine("default", "M2")
    assert machine is not None and machine.execution == "ACTIVE"
    history = list(hub.store.application.events.get(machine.id))
    recorded = [(e.execution, e.event_time) for e in history if hasattr(e, "execution")]
    assert recorded == [("ACTIVE", newer.time), ("STOPPED", late.time)]


async def test_erp_release_and_operator_start_meet_on_the_order(hub: Hub) -> None:
    await hub.publisher.publish(
        cloud_event(
            "mes.erp.order.released.v1",
            "SO-42",
            {
                "order_id": "SO-42",
                "part_number": "P-7",
                "quantity": 50,
                "due": "2026-03-09T12:00:00+01:00",
                "ideal_cycle_time_s": 30,
                "customer": "ACME",
            },
        )
    )
    await hub.publisher.publish(
        cloud_event("mes.operator.order_started.v1", "M3", {"order_id": "SO-42"}, at=timedelta(1))
    )
    await stored(hub, 2)
    order = hub.store.order("default", "SO-42")
    machine = hub.store.machine("default", "M3")
    assert order is not None and machine is not None
    assert (order.status, order.running_on, order.quantity) == ("running", ["M3"], 50)
    assert machine.order_id == "SO-42"


# A valid event, to be put on the wrong subject or spoilt on purpose.
GOOD = encode_event(cloud_event("mes.machine.partcount.v1", "M1", {"count": 1, "kind": "all"}))

BAD_MESSAGES = [
    ("not JSON", "mes.default.machine.M1.partcount", b"{not json", "not JSON"),
    ("not a CloudEvent", "mes.default.machine.M1.partcount", b'{"hello": 1}', "not a CloudEvent"),
    (
        "unknown type",
        "mes.default.machine.M1.spindle",
        GOOD.replace(b"mes.machine.partcount.v1", b"mes.machine.spindle.v1"),
        "unknown event type",
    ),
    (
        "bad data",
        "mes.default.machine.M1.partcount",
        GOOD.replace(b'"count":1', b'"count":-4'),
        "data.count",
    ),
    (
        "site not a token",
        "mes.pläntA.machine.M1.partcount",
        GOOD,
        "subject mismatch",
    ),
    (
        "subject mismatch",
        "mes.default.machine.M2.partcount",
        GOOD,
        "subject mismatch",
    ),
]


@pytest.mark.parametrize(
    ("kind", "subject", "body", "reason"), BAD_MESSAGES, ids=[m[0] for m in BAD_MESSAGES]
)
async def test_bad_messages_go_to_the_dead_letter_subject_and_the_hub_goes_on(
    hub: Hub, kind: str, subject: str, body: bytes, reason: str
) -> None:
    dead = await hub.nats.subscribe("mes.dlq.>")
    ack = await hub.jetstream.publish(subject, body)
    await hub.publisher.publish(
        cloud_event("mes.machine.availability.v1", "M5", {"availability": "AVAILABLE"})
    )
    letter = await dead.next_msg(timeout=20)
    assert letter.subject == "mes.dlq." + subject
    assert letter.data == body  # the original bytes, untouched
    assert reason in letter.headers[DLQ_REASON_HEADER]
    assert letter.headers[DLQ_SEQ_HEADER] == str(ack.seq)
    await stored(hub, 1)
    machine = hub.store.machine("default", "M5")
    assert machine is not None and machine.availability == "AVAILABLE"
    assert hub.ingest_stats().rejected == 1


async def test_dead_letters_are_kept_in_their_stream_once_even_if_repeated(hub: Hub) -> None:
    ack = await hub.jetstream.publish("mes.default.machine.M1.partcount", b"garbage")
    await eventually(lambda: hub.ingest_stats().rejected == 1)
    # After a crash between dead-lettering and commit, the same message is dead-lettered again
    # by the same code: the stream must keep it once.
    partition = hub.partitions[0]
    message = IncomingMessage("mes.default.machine.M1.partcount", b"garbage", ack.seq)
    await partition._dead_letter(Rejected(message, "not JSON"))

    async def dead_letters() -> int:
        return int((await hub.jetstream.stream_info(DLQ_STREAM)).state.messages)

    async def some_kept() -> bool:
        return await dead_letters() > 0

    await eventually(some_kept)
    await asyncio.sleep(0.5)  # the stream sources dead letters asynchronously
    assert await dead_letters() == 1


async def test_an_idle_hub_logs_no_errors(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    await hub.publisher.publish(partcount("M1", 1, 0))
    await stored(hub, 1)
    caplog.clear()
    await asyncio.sleep(3)  # many empty fetches
    await hub.publisher.publish(partcount("M1", 2, 1))
    await stored(hub, 2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_restarted_hub_resumes_without_reapplying(settings: Settings) -> None:
    hub = await build_hub(settings)
    for n in range(30):
        await hub.publisher.publish(partcount("M1", n, n * 10))
    await stored(hub, 30)
    await hub.close()
    again = await build_hub(settings)
    try:
        for n in range(30, 40):
            await again.publisher.publish(partcount("M1", n, n * 10))
        await stored(again, 10)
        assert again.ingest_stats().applied == 10
        assert stored_parts(again.store, "default", "M1") == 39
    finally:
        await again.close()


async def test_two_partitions_apply_every_event_once(settings: Settings) -> None:
    hub = await build_hub(settings.model_copy(update={"partitions": 2}))
    try:
        events = []
        for machine in ("M1", "M2", "M3", "M4", "M5", "M6"):
            events.append(partcount(machine, 0, 0))
            events += [partcount(machine, n, n) for n in range(1, 21)]
            events.append(
                cloud_event("mes.operator.order_started.v1", machine, {"order_id": "SO-shared"})
            )
        await hub.publisher.publish_many(events)
        await stored(hub, len(events))
        machines = hub.store.machines("default")
        assert [stored_parts(hub.store, "default", m.machine_id) for m in machines] == [20] * 6
        order = hub.store.order("default", "SO-shared")
        assert order is not None and sorted(order.running_on) == [f"M{i}" for i in range(1, 7)]
        counts = [p.ingestor.stats.applied for p in hub.partitions]
        assert all(counts) and sum(counts) == len(events)
    finally:
        await hub.close()


async def test_conflicts_between_partitions_redo_the_batches_built_on_them_exactly_once(
    settings: Settings,
) -> None:
    # Two partitions, small batches: each commits a batch while it prepares the next on top of
    # it. Machines of both partitions start and end the same order all the time, so a commit is
    # often refused (the other partition wrote the order first), and with it the batch already
    # prepared on it; both are applied again. Every tap must land once on the order.
    hub = await build_hub(settings.model_copy(update={"partitions": 2, "ingest_batch": 20}))
    try:
        machines = [f"M{i}" for i in range(1, 9)]
        events = []
        for round_ in range(25):
            for machine in machines:
                kind = "started" if round_ % 2 == 0 else "ended"
                events.append(
                    cloud_event(f"mes.operator.order_{kind}.v1", machine,
                                {"order_id": "SO-shared"}, at=timedelta(minutes=round_))
                )  # fmt: skip
                events.append(partcount(machine, round_, round_ * 60))
        await hub.publisher.publish_many(events)
        await stored(hub, len(events))
        order = hub.store.order("default", "SO-shared")
        assert order is not None and order.moves is not None
        assert len(order.moves) == 25 * len(machines)  # each start and end once
        assert sorted(stored_parts(hub.store, "default", m) for m in machines) == [24] * 8
        assert sum(p.ingestor.stats.applied for p in hub.partitions) == len(events)
        assert sum(p.ingestor.stats.conflicts for p in hub.partitions) > 0
    finally:
        await hub.close()


async def test_cloud_event_bytes_from_outside_code_are_accepted(hub: Hub) -> None:
    # An integrator's own code: plain JSON, their own client, our subject and Nats-Msg-Id rules.
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "erp-7f3a",
            "source": "sap://plant1",
            "type": "mes.machine.availability.v1",
            "time": "2026-03-02T07:00:00.123+01:00",
            "subject": "LATHE-3",
            "datacontenttype": "application/json",
            "data": {"availability": "UNAVAILABLE"},
        }
    ).encode()
    await hub.jetstream.publish(
        "mes.default.machine.LATHE-3.availability", body, headers={MSG_ID_HEADER: "erp-7f3a"}
    )
    await stored(hub, 1)
    machine = hub.store.machine("default", "LATHE-3")
    assert machine is not None and machine.availability == "UNAVAILABLE"
    assert machine.last_event_time is not None
    assert machine.last_event_time.utcoffset() == timedelta(hours=1)


async def test_ingest_cancelled_mid_commit_returns_only_once_the_commit_has_ended(
    settings: Settings,
) -> None:
    # A commit runs in a thread, which cannot be stopped. When ingest is cancelled (a sibling
    # service failed, or the hub stops it), it must return only once the write has ended: the
    # hub closes the store next, and nothing may write it after that.
    import threading
    import time

    from hub.store import EventStore

    class SlowStore(EventStore):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            self.writing = threading.Event()
            self.in_progress = 0

        def write(self, *args: Any, **kwargs: Any) -> None:
            self.in_progress += 1
            self.writing.set()
            try:
                time.sleep(0.5)
                super().write(*args, **kwargs)
            finally:
                self.in_progress -= 1

    store = SlowStore(settings)
    hub = await build_hub(settings, store=store, projections=False)
    try:
        await hub.publisher.publish_many([partcount("M1", n, n) for n in range(50)])
        await asyncio.to_thread(store.writing.wait, 20)
        await hub.stop_service("ingest:p0")  # cancels the task mid-write
        assert store.in_progress == 0
    finally:
        await hub.close()
    # What was written is whole: as many readings stored as the position says were taken.
    position = store.tracking_position("nats:MES:ingest:p0of1")
    machine = store.machine("default", "M1")
    assert position > 0 and machine is not None
    assert machine.version == 1 + position  # registered, then one event per reading
    store.close()


async def test_a_fresh_store_reading_the_stream_again_dead_letters_nothing_twice(
    tmp_path: Path, settings: Settings
) -> None:
    # The stream's duplicate window (1 s here) is long past when the second hub, on a fresh
    # store, reads the stream from the start: the dead-letter stream itself says what it has.
    short_window = settings.model_copy(update={"duplicate_window_s": 1.0})
    first = await build_hub(short_window, projections=False)
    try:
        for n in range(3):
            await first.jetstream.publish("mes.default.machine.M1.partcount", b"garbage %d" % n)
        await first.publisher.publish(partcount("M1", 1, 0))
        await eventually(lambda: first.ingest_stats().rejected == 3)
    finally:
        await first.close()
    await asyncio.sleep(1.5)
    again = await build_hub(
        short_window.model_copy(update={"data_dir": tmp_path / "fresh"}), projections=False
    )
    try:
        await eventually(lambda: again.ingest_stats().rejected == 3)
        assert again.ingest_stats().applied == 1
        await asyncio.sleep(0.5)  # the dead-letter stream sources asynchronously
        info = await again.jetstream.stream_info(DLQ_STREAM)
        assert info.state.messages == 3
    finally:
        await again.close()
