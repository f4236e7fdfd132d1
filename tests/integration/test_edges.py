"""Issue 8 at the edges of ingest, on real stores (SQLite and PostgreSQL) and a real nats-server:
event times from the future are dead-lettered; duplicates are by source + id, in NATS' window,
after it, and in a store written before the dedupe key."""

from __future__ import annotations

import json
import sqlite3
import uuid
from abc import abstractmethod
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from contracts import CloudEvent, encode_event
from hub.bootstrap import Hub
from hub.ingest import IncomingMessage, Ingestor
from hub.nats import DLQ_REASON_HEADER, DLQ_SEQ_HEADER, MSG_ID_HEADER, STREAM
from hub.settings import Settings, load_settings
from hub.store import EventStore
from tests.conftest import T0, eventually, postgres_settings
from tests.integration.test_store import OnEveryStore

# Reference values from coreutils: printf 'urn:plc:A\n42' | sha256sum (and urn:plc:B).
KEY_A_42 = "6600dce9211f917c453c182e5f674f42b2ff47475f07b5c31503e58168164710"
KEY_B_42 = "dec1ad9e2c04534f7feabf51f211919734e962919b2468f01ae67fadb454516c"


def execution(
    state: str, at: datetime, event_id: str = "", source: str = "urn:plc:A"
) -> CloudEvent:
    return CloudEvent(
        specversion="1.0",
        id=event_id or f"e-{uuid.uuid4().hex[:12]}",
        source=source,
        type="mes.machine.execution.v1",
        time=at,
        subject="M1",
        data={"execution": state},
    )


def message(event: CloudEvent, seq: int) -> IncomingMessage:
    return IncomingMessage("mes.default.machine.M1.execution", encode_event(event), seq)


def facts(store: EventStore) -> list[tuple[str, str, str, datetime]]:
    """Every execution fact stored for M1: (id, source, execution, event time)."""
    return [
        (e.event_id, e.source, e.execution, e.event_time)
        for e in store.machine_history("default", "M1")
        if hasattr(e, "execution")
    ]


class EdgesOnEveryStore(OnEveryStore):
    """Subclasses provide the settings and raw SQL on their backend."""

    @abstractmethod
    def run_sql(self, settings: Settings, statements: list[str]) -> None:
        """Run statements naming ``{received}`` and ``{meta}`` (the hub's tables)."""

    def test_an_event_from_the_future_is_rejected_and_changes_nothing(
        self, store: EventStore
    ) -> None:
        now = [T0 + timedelta(hours=1)]  # the hub's clock: 07:00Z
        ingestor = Ingestor(store, "p0", clock=lambda: now[0], max_clock_skew_s=300)
        at_limit = execution("ACTIVE", T0 + timedelta(hours=1, seconds=300))
        past_limit = execution("STOPPED", T0 + timedelta(hours=1, seconds=301))
        year_9999 = execution("STOPPED", datetime(9999, 12, 31, tzinfo=UTC))
        batch = ingestor.prepare(
            [message(at_limit, 1), message(past_limit, 2), message(year_9999, 3)]
        )
        ingestor.commit(batch)
        assert [(r.message.stream_seq, r.reason) for r in batch.rejected] == [
            (
                2,
                "time: 2026-03-02T07:05:01Z is 301 s ahead of the hub's clock; "
                "at most 300 s allowed ([hub] max_clock_skew_s)",
            ),
            (
                # 2,912,382 days from 2 March 2026 to 31 December 9999, less 7 hours
                3,
                "time: 9999-12-31T00:00:00Z is 2912381 days ahead of the hub's clock; "
                "at most 300 s allowed ([hub] max_clock_skew_s)",
            ),
        ]
        # An hour later the machine stops: that is its state now. Had the year-9999 report been
        # kept, it would be the newest for good and every later report would be history only.
        now[0] = T0 + timedelta(hours=2)
        stop = execution("STOPPED", T0 + timedelta(hours=1, minutes=30))
        ingestor.commit(ingestor.prepare([message(stop, 4)]))
        machine = store.machine("default", "M1")
        assert machine is not None
        assert (machine.execution, machine.last_event_time) == ("STOPPED", stop.time)
        assert [(f[2], f[3]) for f in facts(store)] == [
            ("ACTIVE", at_limit.time),
            ("STOPPED", stop.time),
        ]
        assert (ingestor.stats.applied, ingestor.stats.rejected) == (2, 2)
        assert store.tracking_position("p0") == 4

    def test_one_id_from_two_sources_is_two_events_and_a_repeat_is_one(
        self, store: EventStore
    ) -> None:
        a = execution("ACTIVE", T0, "42", "urn:plc:A")
        b = execution("STOPPED", T0 + timedelta(seconds=1), "42", "urn:plc:B")
        first = Ingestor(store, "p0", clock=lambda: T0 + timedelta(days=1))
        first.commit(first.prepare([message(a, 1), message(b, 2)]))
        assert (first.stats.applied, first.stats.duplicates) == (2, 0)
        # After NATS' window (a new ingestor: nothing cached): both again, and a third source.
        c = execution("READY", T0 + timedelta(seconds=2), "42", "urn:plc:C")
        again = Ingestor(store, "p0", clock=lambda: T0 + timedelta(days=1))
        again.commit(again.prepare([message(a, 3), message(b, 4), message(c, 5)]))
        assert (again.stats.applied, again.stats.duplicates) == (1, 2)
        assert [(f[0], f[1], f[2]) for f in facts(store)] == [
            ("42", "urn:plc:A", "ACTIVE"),
            ("42", "urn:plc:B", "STOPPED"),
            ("42", "urn:plc:C", "READY"),
        ]
        # The store keeps the keys, not the bare id.
        assert store.received_already([KEY_A_42, KEY_B_42, "42"]) == {KEY_A_42, KEY_B_42}

    def test_a_store_from_before_the_dedupe_key_keeps_its_old_ids_for_old_events(
        self, store: EventStore, store_settings: Settings
    ) -> None:
        assert store.legacy_received_until is None  # a new store never held bare ids
        store.close()
        # What the previous version left: bare CloudEvent ids, and no record of the key format.
        self.run_sql(
            store_settings,
            [
                "DELETE FROM {meta}",
                "INSERT INTO {received} VALUES ('42', 7)",
                "INSERT INTO {received} VALUES ('43', 8)",
            ],
        )
        before = datetime.now(UTC)
        upgraded = EventStore(store_settings)
        after = datetime.now(UTC)
        until = upgraded.legacy_received_until
        upgraded.close()
        assert until is not None and before <= until <= after
        reopened = EventStore(store_settings)
        assert reopened.legacy_received_until == until  # recorded once, at the upgrade
        reopened.close()
        # Say the upgrade was at 07:00Z; ingest allows 300 s of clock skew.
        self.run_sql(
            store_settings,
            [
                "UPDATE {meta} SET value = '2026-03-02T07:00:00+00:00' "
                "WHERE name = 'legacy_received_until'"
            ],
        )
        store = EventStore(store_settings)
        try:
            assert store.legacy_received_until == T0 + timedelta(hours=1)
            ingestor = Ingestor(
                store, "p0", clock=lambda: T0 + timedelta(days=1), max_clock_skew_s=300
            )
            events = [
                # Applied before the upgrade (id 42), republished: dropped.
                execution("ACTIVE", T0, "42", "urn:plc:A"),
                # Dated 07:05:00, up to the upgrade plus the skew: an old id still counts.
                execution("STOPPED", T0 + timedelta(hours=1, minutes=5), "42", "urn:plc:B"),
                # Dated 07:05:01, after it: only its own key counts, and it is new.
                execution("READY", T0 + timedelta(hours=1, seconds=301), "42", "urn:plc:C"),
                # Dated before the upgrade, but its id was never received: applied.
                execution("WAIT", T0, "44", "urn:plc:A"),
            ]
            ingestor.commit(ingestor.prepare([message(e, 9 + n) for n, e in enumerate(events)]))
            assert (ingestor.stats.applied, ingestor.stats.duplicates) == (2, 2)
            assert [(f[0], f[1]) for f in facts(store)] == [
                ("42", "urn:plc:C"),
                ("44", "urn:plc:A"),
            ]
        finally:
            store.close()


class TestSQLiteEdges(EdgesOnEveryStore):
    def make_settings(self, tmp_path: Path) -> Settings:
        return load_settings(data_dir=tmp_path / "hub", store="sqlite")

    def run_sql(self, settings: Settings, statements: list[str]) -> None:
        with sqlite3.connect(settings.sqlite_path) as conn:
            for statement in statements:
                conn.execute(statement.format(received="mes_received_events", meta="mes_hub_meta"))
        conn.close()


@pytest.mark.postgres
class TestPostgresEdges(EdgesOnEveryStore):
    @pytest.fixture(autouse=True)
    def _dsn(self, postgres_dsn: str) -> None:
        self.dsn = postgres_dsn

    def make_settings(self, tmp_path: Path) -> Settings:
        return postgres_settings(self.dsn, tmp_path / "hub")

    def run_sql(self, settings: Settings, statements: list[str]) -> None:
        schema = settings.postgres_schema
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(
                    statement.format(  # type: ignore[arg-type]
                        received=f"{schema}.mes_received_events", meta=f"{schema}.mes_hub_meta"
                    )
                )


# --- over a real nats-server ------------------------------------------------------------------


async def test_an_event_from_year_9999_is_dead_lettered_and_the_machine_goes_on(
    hub: Hub,
) -> None:
    dead = await hub.nats.subscribe("mes.dlq.>")
    subject = "mes.default.machine.M1.execution"
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "plc-9999",
            "source": "urn:plc:A",
            "type": "mes.machine.execution.v1",
            "time": "9999-12-31T00:00:00Z",
            "subject": "M1",
            "data": {"execution": "STOPPED"},
        }
    ).encode()
    ack = await hub.jetstream.publish(subject, body, headers={MSG_ID_HEADER: "plc-9999"})
    normal = execution("ACTIVE", T0)
    await hub.publisher.publish(normal)
    letter = await dead.next_msg(timeout=20)
    assert letter.subject == "mes.dlq." + subject
    assert letter.data == body  # the original bytes, untouched
    assert letter.headers is not None and letter.headers[DLQ_SEQ_HEADER] == str(ack.seq)
    reason = letter.headers[DLQ_REASON_HEADER]
    assert reason.startswith("time: 9999-12-31T00:00:00Z is ")
    assert reason.endswith(
        " days ahead of the hub's clock; at most 300 s allowed ([hub] max_clock_skew_s)"
    )
    await eventually(lambda: hub.ingest_stats().applied == 1)
    await hub.wait_caught_up()
    assert hub.ingest_stats().rejected == 1
    machine = hub.store.machine("default", "M1")
    assert machine is not None
    assert (machine.execution, machine.last_event_time) == ("ACTIVE", T0)
    assert [(f[0], f[2]) for f in facts(hub.store)] == [(normal.id, "ACTIVE")]


async def test_one_id_from_two_sources_over_nats_and_repeats_in_and_after_the_window(
    hub: Hub,
) -> None:
    a = execution("ACTIVE", T0, "42", "urn:plc:A")
    b = execution("STOPPED", T0 + timedelta(seconds=1), "42", "urn:plc:B")
    first, second = await hub.publisher.publish_many([a, b])
    assert (first.duplicate, second.duplicate) == (False, False)
    assert second.stream_seq != first.stream_seq
    # The message id on the stream is the dedupe key of each.
    for receipt, key in ((first, KEY_A_42), (second, KEY_B_42)):
        assert receipt.stream_seq is not None
        stored: Any = await hub.jetstream.get_msg(STREAM, receipt.stream_seq)
        assert stored.headers[MSG_ID_HEADER] == key
    # A's repeat inside the window: the stream drops it.
    again = await hub.publisher.publish(a)
    assert again.duplicate and again.stream_seq == first.stream_seq
    # After the window (no message id): the stream takes it, the store's keys drop it.
    await hub.jetstream.publish(first.subject, encode_event(a))
    await hub.publisher.publish(execution("READY", T0 + timedelta(seconds=2), "43"))
    await eventually(lambda: hub.ingest_stats().applied == 3)
    await hub.wait_caught_up()
    assert hub.ingest_stats().duplicates == 1
    assert [(f[0], f[1], f[2]) for f in facts(hub.store)] == [
        ("42", "urn:plc:A", "ACTIVE"),
        ("42", "urn:plc:B", "STOPPED"),
        ("43", "urn:plc:A", "READY"),
    ]
