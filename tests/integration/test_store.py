"""The same store tests on every backend: SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from eventsourcing.persistence import Tracking

from hub.domain import Machine, Order, Origin
from hub.errors import ConcurrentWrite
from hub.ingest import IncomingMessage, Ingestor
from hub.settings import Settings, load_settings
from hub.store import Entity, EventStore, Received
from tests.conftest import T0, cloud_event, postgres_settings
from tests.counting import stored_parts


def origin(event_id: str, seconds: float = 0) -> Origin:
    return Origin(event_id, "urn:test", T0 + timedelta(seconds=seconds))


class OnEveryStore(ABC):
    """A store per test on the backend a subclass gives by ``make_settings``."""

    @abstractmethod
    def make_settings(self, tmp_path: Path) -> Settings: ...

    @pytest.fixture
    def store_settings(self, tmp_path: Path) -> Settings:
        return self.make_settings(tmp_path)

    @pytest.fixture
    def store(self, store_settings: Settings) -> Iterator[EventStore]:
        store = EventStore(store_settings)
        yield store
        store.close()


class StoreContract(OnEveryStore):
    """Subclasses provide ``make_settings``; every test runs on each backend."""

    def test_events_tracking_and_received_ids_commit_together(self, store: EventStore) -> None:
        machine = Machine(site="default", machine_id="M1")
        machine.report_execution(origin("e1"), "ACTIVE", "AUTOMATIC", "O1")
        store.commit(
            [machine],
            Tracking("ingest", 7),
            [Received("e1", 7)],
            [Entity("machine", "default", "M1", machine.id)],
        )
        assert store.tracking_position("ingest") == 7
        assert store.received_already(["e1", "e2"]) == {"e1"}
        loaded = store.machine("default", "M1")
        assert loaded is not None and loaded.execution == "ACTIVE"
        assert [m.machine_id for m in store.machines("default")] == ["M1"]

    def test_a_failed_commit_leaves_no_trace(self, store: EventStore) -> None:
        machine = Machine(site="default", machine_id="M1")
        store.commit([machine], Tracking("ingest", 1), [Received("e1", 1)], [])
        # A second writer with a stale copy of the same aggregate collides on its version.
        stale = store.machine("default", "M1")
        assert stale is not None
        fresh = store.machine("default", "M1")
        assert fresh is not None
        fresh.report_availability(origin("e2"), "AVAILABLE")
        store.commit([fresh], Tracking("ingest", 2), [Received("e2", 2)], [])
        stale.report_availability(origin("e3"), "UNAVAILABLE")
        with pytest.raises(ConcurrentWrite):
            store.commit([stale], Tracking("ingest", 3), [Received("e3", 3)], [])
        assert store.tracking_position("ingest") == 2
        assert store.received_already(["e3"]) == set()
        loaded = store.machine("default", "M1")
        assert loaded is not None and loaded.availability == "AVAILABLE"

    def test_a_received_id_cannot_be_recorded_twice(self, store: EventStore) -> None:
        first = Machine(site="default", machine_id="M1")
        store.commit([first], Tracking("ingest", 1), [Received("e1", 1)], [])
        second = Machine(site="default", machine_id="M2")
        with pytest.raises(ConcurrentWrite):
            store.commit([second], Tracking("ingest", 2), [Received("e1", 2)], [])
        assert store.machine("default", "M2") is None

    def test_snapshots_and_reload_give_the_same_state(
        self, store: EventStore, store_settings: Settings
    ) -> None:
        machine = Machine(site="default", machine_id="M1")
        for n in range(250):
            machine.report_part_count(origin(f"p{n}", n), "all", n)
        store.commit([machine], Tracking("ingest", 1), [], [], snapshot=[machine])
        machine.report_part_count(origin("p-last", 1000), "all", 260)
        store.commit([machine], Tracking("ingest", 2), [], [])
        reopened = EventStore(store_settings)
        try:
            assert reopened.application.snapshots is not None
            snapshots = list(reopened.application.snapshots.get(machine.id))
            assert [s.originator_version for s in snapshots] == [251]
            loaded = reopened.machine("default", "M1")
            assert loaded is not None
            # the latest reading survives the snapshot; baseline 0, +249 up to 249, +11 up to 260
            assert (loaded.counter_values["all"], loaded.version) == (260, machine.version)
            assert stored_parts(reopened, "default", "M1") == 260
        finally:
            reopened.close()

    def test_an_order_snapshot_from_before_taps_were_kept_is_replayed_by_event_time(
        self, store: EventStore, store_settings: Settings
    ) -> None:
        # The end (08:00) arrived before the start (06:10). The old fold lost the end: its
        # snapshot says "running since 06:10". Loading replays the events instead.
        order = Order(site="default", order_id="SO-1")
        order.end_on(origin("end", 2 * 3600), "M1")
        order.start_on(origin("start", 600), "M1")
        store.commit([order], Tracking("ingest", 1), [], [])
        assert order.status == "ended"
        order.moves = None  # the state an older version snapshotted
        order.runs = [{"machine_id": "M1", "start": (T0 + timedelta(seconds=600)).isoformat(),
                       "end": None}]  # fmt: skip
        order.status, order.running_on = "running", ["M1"]
        store.commit([], Tracking("ingest", 2), [], [], snapshot=[order])
        reopened = EventStore(store_settings)
        try:
            loaded = reopened.order("default", "SO-1")
            assert loaded is not None
            assert (loaded.status, loaded.running_on) == ("ended", [])
            assert [(r["start"], r["end"]) for r in loaded.runs] == [
                ((T0 + timedelta(seconds=600)).isoformat(), (T0 + timedelta(hours=2)).isoformat())
            ]
        finally:
            reopened.close()

    def test_orders_are_listed_by_site(self, store: EventStore) -> None:
        a, b = Order(site="north", order_id="SO-1"), Order(site="south", order_id="SO-2")
        store.commit(
            [a, b],
            Tracking("ingest", 1),
            [],
            [Entity("order", "north", "SO-1", a.id), Entity("order", "south", "SO-2", b.id)],
        )
        assert [o.order_id for o in store.orders("north")] == ["SO-1"]
        assert [o.order_id for o in store.orders()] == ["SO-1", "SO-2"]

    def test_ingestor_applies_once_and_resumes_from_its_position(self, store: EventStore) -> None:
        def message(seq: int, count: int, event_id: str) -> IncomingMessage:
            event = cloud_event(
                "mes.machine.partcount.v1",
                "M1",
                {"count": count, "kind": "all"},
                at=timedelta(seconds=seq),
                event_id=event_id,
            )
            return IncomingMessage(
                "mes.default.machine.M1.partcount", event.model_dump_json().encode(), seq
            )

        ingestor = Ingestor(store, "ingest:p0")
        ingestor.commit(ingestor.prepare([message(1, 10, "a"), message(2, 12, "b")]))
        # The same events again (a republish after the duplicate window) and one new one.
        ingestor.commit(
            ingestor.prepare([message(3, 12, "b"), message(4, 15, "c"), message(5, 15, "c")])
        )
        assert ingestor.stats.duplicates == 2
        after_restart = Ingestor(store, "ingest:p0")
        assert after_restart.position() == 5
        assert stored_parts(store, "default", "M1") == 5

    def test_two_partitions_writing_one_order_retry_and_both_runs_are_kept(
        self, store: EventStore
    ) -> None:
        def started(machine: str, seq: int) -> IncomingMessage:
            event = cloud_event("mes.operator.order_started.v1", machine, {"order_id": "SO-1"})
            return IncomingMessage(
                f"mes.default.operator.{machine}.order_started",
                event.model_dump_json().encode(),
                seq,
            )

        first = Ingestor(store, "p0")
        second = Ingestor(store, "p1")
        ahead = first.prepare([started("M1", 1)])
        behind = second.prepare([started("M2", 2)])  # loaded the order before M1's commit
        first.commit(ahead)
        with pytest.raises(ConcurrentWrite):
            second.commit(behind)
        # What IngestPartition does on a conflict: the partition's aggregates are reloaded.
        second.commit(second.prepare([started("M2", 2)]))
        order = store.order("default", "SO-1")
        assert order is not None and order.running_on == ["M1", "M2"]
        assert store.tracking_position("p1") == 2


class TestSQLiteStore(StoreContract):
    def make_settings(self, tmp_path: Path) -> Settings:
        return load_settings(data_dir=tmp_path / "hub", store="sqlite")


@pytest.mark.postgres
class TestPostgresStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, postgres_dsn: str) -> None:
        self.dsn = postgres_dsn

    def make_settings(self, tmp_path: Path) -> Settings:
        return postgres_settings(self.dsn, tmp_path / "hub")
