"""Ingest without NATS or a database: the Ingestor against the in-memory store."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

import pytest

from contracts import (
    CloudEvent,
    decode_event,
    encode_event,
    nats_subject_for,
    partition_key,
    partition_of,
    validate_envelope,
)
from hub.domain import (
    Machine,
    Order,
    Plant,
    actor_of,
    machine_aggregate_id,
    order_aggregate_id,
)
from hub.errors import ConcurrentWrite, MesHubError
from hub.ingest import IncomingMessage, Ingestor, Target, aggregate_id, targets
from hub.nats_auth import signature
from hub.store import Entity
from tests.conftest import T0, cloud_event
from tests.fakes import InMemoryStore
from tests.unit.test_contracts import EXAMPLES, PROGRAM_SENT


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


def message(event: CloudEvent, seq: int, site: str = "default", **override: Any) -> IncomingMessage:
    subject = nats_subject_for(site, validate_envelope(event))
    return IncomingMessage(override.get("subject", subject), encode_event(event), seq)


def ingest(ingestor: Ingestor, *messages: IncomingMessage) -> Any:
    batch = ingestor.prepare(list(messages))
    ingestor.commit(batch)
    return batch


def execution(machine: str, value: str, seconds: float = 0, **kw: Any) -> CloudEvent:
    return cloud_event(
        "mes.machine.execution.v1",
        machine,
        {"execution": value},
        at=timedelta(seconds=seconds),
        **kw,
    )


def test_a_batch_is_applied_and_committed_with_its_position(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0)
    ingest(
        ingestor,
        message(execution("M1", "ACTIVE"), 4),
        message(execution("M1", "FEED_HOLD", 60), 5),
        message(execution("M2", "READY"), 6),
    )
    assert store.tracking_position("p0") == 6 and ingestor.position() == 6
    m1 = store.load(machine_aggregate_id("default", "M1"))
    assert isinstance(m1, Machine) and m1.execution == "FEED_HOLD"
    assert [(e.kind, e.entity_id) for e in store.entities] == [("machine", "M1"), ("machine", "M2")]
    assert (ingestor.stats.applied, ingestor.stats.batches) == (3, 1)


def test_a_republished_event_is_applied_once(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0)
    event = execution("M1", "ACTIVE")
    batch = ingest(ingestor, message(event, 1), message(event, 2))
    assert (len(batch.received), batch.duplicates) == (1, 1)
    # Long after: a fresh Ingestor (a restart) still knows it from the store.
    again = ingest(Ingestor(store, "p0", clock=lambda: T0), message(event, 3))
    assert (len(again.received), again.duplicates) == (0, 1)
    machine = store.load(machine_aggregate_id("default", "M1"))
    assert machine is not None and machine.version == 2  # registered, one execution


def test_bad_messages_are_rejected_and_the_position_still_moves(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0, max_clock_skew_s=300)
    future = execution("M1", "ACTIVE", seconds=301)
    batch = ingest(
        ingestor,
        IncomingMessage("mes.default.machine.M1.execution", b"{nope", 1),
        message(execution("M1", "ACTIVE"), 2, subject="mes.default.machine.M9.execution"),
        message(future, 3),
    )
    reasons = [r.reason for r in batch.rejected]
    assert [r.message.stream_seq for r in batch.rejected] == [1, 2, 3]
    assert "not JSON" in reasons[0]
    assert "subject mismatch" in reasons[1] and "ahead of the hub's clock" in reasons[2]
    assert store.events == {} and store.tracking_position("p0") == 3
    assert ingestor.stats.rejected == 3


def test_starting_an_order_touches_the_machine_and_the_order(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0)
    started = cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"})
    ingest(ingestor, message(started, 1, site="north"))
    machine = store.load(machine_aggregate_id("north", "M1"))
    order = store.load(order_aggregate_id("north", "SO-1"))
    assert isinstance(machine, Machine) and machine.order_id == "SO-1"
    assert isinstance(order, Order) and order.running_on == ["M1"]
    assert store.entities == [
        Entity("machine", "north", "M1", machine.id),
        Entity("order", "north", "SO-1", order.id),
    ]


def test_the_plant_is_an_entity_named_by_its_site(store: InMemoryStore) -> None:
    subject, data = EXAMPLES["mes.hub.plant.configured.v1"]
    event = cloud_event("mes.hub.plant.configured.v1", subject, data)
    ingest(Ingestor(store, "p0", clock=lambda: T0), message(event, 1))
    (entity,) = store.entities
    assert (entity.kind, entity.site, entity.entity_id) == ("plant", "default", "default")
    plant = store.load(entity.aggregate_id)
    assert isinstance(plant, Plant) and len(plant.configurations) == 1


def test_a_partition_applies_only_its_own_subjects(store: InMemoryStore) -> None:
    events = [execution(f"M{n}", "ACTIVE") for n in range(12)]
    messages = [message(e, seq) for seq, e in enumerate(events, start=1)]
    mine = [m for m in messages if partition_of(m.subject, 3) == 1]
    assert 0 < len(mine) < len(messages)
    ingest(Ingestor(store, "p1of3", partition=1, partitions=3, clock=lambda: T0), *messages)
    assert sorted(e.entity_id for e in store.entities) == sorted(
        m.subject.split(".")[3] for m in mine
    )
    assert store.tracking_position("p1of3") == len(messages)  # the others are passed over


def test_a_snapshot_is_taken_when_an_aggregate_crosses_the_interval(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", snapshot_interval=3, clock=lambda: T0)
    seq = itertools.count(1)
    ingest(ingestor, message(execution("M1", "ACTIVE", 0), next(seq)))  # v2
    assert store.snapshots == []
    ingest(ingestor, message(execution("M1", "READY", 1), next(seq)))  # v3
    ingest(ingestor, message(execution("M1", "ACTIVE", 2), next(seq)))  # v4
    assert store.snapshots == [(machine_aggregate_id("default", "M1"), 3)]


def test_a_concurrent_write_is_refused_whole_and_applies_after_a_reset(
    store: InMemoryStore,
) -> None:
    def started(machine: str, seq: int) -> IncomingMessage:
        event = cloud_event("mes.operator.order_started.v1", machine, {"order_id": "SO-1"})
        return message(event, seq)

    first, second = Ingestor(store, "p0", clock=lambda: T0), Ingestor(store, "p1", clock=lambda: T0)
    ahead = first.prepare([started("M1", 1)])
    behind = second.prepare([started("M2", 2)])  # loaded the order before M1's commit
    first.commit(ahead)
    with pytest.raises(ConcurrentWrite) as refused:
        second.commit(behind)
    assert isinstance(refused.value, MesHubError)
    assert store.load(machine_aggregate_id("default", "M2")) is None
    assert store.tracking_position("p1") == 0
    # What IngestPartition does on a conflict: the aggregates are reloaded, the batch retried.
    second.reset()
    second.commit(second.prepare([started("M2", 2)]))
    order = store.load(order_aggregate_id("default", "SO-1"))
    assert isinstance(order, Order) and order.running_on == ["M1", "M2"]


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_an_events_first_target_is_the_entity_its_partition_is_keyed_by(type_name: str) -> None:
    subject, data = EXAMPLES[type_name]
    event = decode_event(encode_event(cloud_event(type_name, subject, data)))
    touched = targets("default", event)
    assert partition_key(nats_subject_for("default", event)) == touched[0].entity_id
    expected_kind = {"machine": "machine", "operator": "machine", "erp": "order"}.get(
        event.event_type.stream, event.event_type.entity
    )
    assert touched[0] == Target(expected_kind, "default", subject)  # type: ignore[arg-type]
    if type_name in ("mes.operator.order_started.v1", "mes.operator.order_ended.v1"):
        assert touched[1:] == (Target("order", "default", "SO-1"),)
    else:
        assert len(touched) == 1


def test_aggregate_ids_are_the_domains() -> None:
    assert aggregate_id(Target("machine", "s", "M1")) == machine_aggregate_id("s", "M1")
    assert aggregate_id(Target("order", "s", "SO-1")) == order_aggregate_id("s", "SO-1")


# --- who sent it: the actor kept with every fact ---------------------------------------------

HUB_KEY = bytes(range(32))


def signed(event: CloudEvent, seq: int) -> IncomingMessage:
    unsigned = message(event, seq)
    return IncomingMessage(unsigned.subject, unsigned.data, seq, signature(HUB_KEY, unsigned.data))


def actors(store: InMemoryStore, machine: str) -> list[Any]:
    stored = store.events.get(machine_aggregate_id("default", machine), [])
    return [actor_of(e) for e in stored if hasattr(e, "event_id")]


def test_an_adapters_event_names_its_source(
    store: InMemoryStore,
) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0, hub_key=HUB_KEY)
    from_adapter = execution("M1", "ACTIVE").model_copy(update={"source": "urn:shdr:okuma-7"})
    ingest(ingestor, message(from_adapter, 1))
    assert actors(store, "M1") == [{"kind": "adapter", "id": "urn:shdr:okuma-7", "role": "machine"}]


def test_the_api_key_named_by_the_hubs_api_is_the_actor(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0, hub_key=HUB_KEY)
    event = execution("M1", "ACTIVE").model_copy(
        update={
            "mesactorkind": "key",
            "mesactorid": "key-0123456789abcdef",
            "mesactorrole": "admin",
        }
    )
    batch = ingest(ingestor, signed(event, 1))
    assert batch.rejected == []
    assert actors(store, "M1") == [{"kind": "key", "id": "key-0123456789abcdef", "role": "admin"}]


def test_an_actor_the_hub_did_not_sign_is_dead_lettered(store: InMemoryStore) -> None:
    # Anyone with NATS credentials could otherwise pass an event off as an admin's.
    ingestor = Ingestor(store, "p0", clock=lambda: T0, hub_key=HUB_KEY)
    forged = execution("M1", "ACTIVE").model_copy(
        update={"mesactorid": "key-0123456789abcdef", "mesactorrole": "admin"}
    )
    batch = ingest(ingestor, message(forged, 1))
    assert len(batch.rejected) == 1 and "mesactorid" in batch.rejected[0].reason
    assert "Mes-Hub-Signature" in batch.rejected[0].reason
    assert store.load(machine_aggregate_id("default", "M1")) is None


# --- mes.machine.program_sent.v1: a record for the auditors, no change to the machine -----------


def program_sent(machine: str = "lathe-7", **data: Any) -> CloudEvent:
    """The worked example of docs/contract.md: O1234 sent whole, ending 4 min after T0."""
    return cloud_event(
        "mes.machine.program_sent.v1", machine, {**PROGRAM_SENT, **data}, at=timedelta(minutes=4)
    )


def state(machine: Any) -> dict[str, Any]:
    """The machine's state (the library's bookkeeping, version and times, left out)."""
    return {k: v for k, v in vars(machine).items() if not k.startswith("_")}


def test_a_program_sent_is_stored_once_as_sent_and_changes_nothing_of_the_machine(
    store: InMemoryStore,
) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0 + timedelta(minutes=5))
    running = execution("lathe-7", "ACTIVE", 60)
    ingest(ingestor, message(running, 1))
    lathe = store.load(machine_aggregate_id("default", "lathe-7"))
    assert isinstance(lathe, Machine)
    before = state(lathe)
    sent = program_sent()
    batch = ingest(ingestor, message(sent, 2), message(sent, 3))  # published twice
    assert (len(batch.received), batch.duplicates) == (1, 1)
    again = ingest(Ingestor(store, "p0", clock=lambda: T0), message(sent, 4))  # after a restart
    assert (len(again.received), again.duplicates) == (0, 1)
    stored = store.events[lathe.id]
    (fact,) = [e for e in stored if isinstance(e, Machine.ProgramSent)]
    assert (fact.event_id, fact.source, fact.event_time) == (sent.id, sent.source, sent.time)
    assert {name: getattr(fact, name) for name in sent.data} == {
        **sent.data,
        "started_at": datetime.fromisoformat(sent.data["started_at"]),
    }
    assert (fact.port, fact.sent_by, fact.message) == ("/dev/ttyUSB0", "jdoe", None)
    assert actor_of(fact) == {"kind": "adapter", "id": sent.source, "role": "machine"}
    # The machine's state is what its own reports made it: the send is no report of the machine.
    lathe_now = store.load(lathe.id)
    assert lathe_now is not None and lathe_now.version == lathe.version + 1
    assert state(lathe_now) == before


def test_a_program_sent_to_an_unknown_machine_does_not_make_it_a_reporting_machine(
    store: InMemoryStore,
) -> None:
    ingest(Ingestor(store, "p0", clock=lambda: T0), message(program_sent("mill-2"), 1))
    mill = store.load(machine_aggregate_id("default", "mill-2"))
    assert isinstance(mill, Machine) and not mill.has_reported()
    assert (mill.execution, mill.availability, mill.last_event_time) == (None, None, None)


def test_a_malformed_program_sent_is_rejected_with_its_reason(store: InMemoryStore) -> None:
    ingestor = Ingestor(store, "p0", clock=lambda: T0 + timedelta(minutes=5))
    good = message(program_sent(), 1)
    # Claims completed with 40 bytes of the program's sent: a DNC sender's bug, not a fact.
    size = PROGRAM_SENT["size_bytes"]
    short = IncomingMessage(
        good.subject, good.data.replace(f'"sent_bytes":{size}'.encode(), b'"sent_bytes":40'), 2
    )
    # Started a minute after it ended (the event's time, T0 + 4 min).
    late_start = IncomingMessage(
        good.subject, good.data.replace(b"2026-03-02T05:56:02Z", b"2026-03-02T06:05:00Z"), 3
    )
    batch = ingest(ingestor, short, late_start)
    assert [(r.message.stream_seq, r.message.data) for r in batch.rejected] == [
        (2, short.data),
        (3, late_start.data),
    ]
    assert "data.outcome" in batch.rejected[0].reason
    assert "'completed' needs sent_bytes == size_bytes" in batch.rejected[0].reason
    assert "data.started_at" in batch.rejected[1].reason
    assert store.events == {} and store.tracking_position("p0") == 3
