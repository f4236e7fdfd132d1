"""Encryption and compression at rest, on every backend: what is stored, and the key check at
every open (a wrong key, a missing key, a key for a plaintext store: refused, naming the setting
and never the key)."""

from __future__ import annotations

import json
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import Tracking
from pydantic import SecretStr

from hub.domain import Machine, Order, Origin
from hub.settings import ConfigError, Settings, load_settings
from hub.store import KEY_CHECK, Entity, EventStore, Received
from tests.conftest import T0, postgres_settings

SECRET_PROGRAM = "O4711-secret-programme"
SECRET_CUSTOMER = "Customer Confidential GmbH"


def with_at_rest(settings: Settings, key: str | None, compression: bool = False) -> Settings:
    return settings.model_copy(
        update={
            "store_encryption_key": SecretStr(key) if key else None,
            "store_compression": compression,
        }
    )


def _is_json(state: bytes) -> bool:
    try:
        json.loads(state)
    except ValueError:
        return False
    return True


def origin(event_id: str, seconds: float = 0) -> Origin:
    return Origin(event_id, "urn:test", T0 + timedelta(seconds=seconds))


def write_some(store: EventStore, first_id: int = 0, count: int = 20) -> Machine:
    machine = store.machine("default", "M1") or Machine(site="default", machine_id="M1")
    new = machine.version == 1 and first_id == 0
    for n in range(first_id, first_id + count):
        machine.report_execution(origin(f"e{n}", n), "ACTIVE", "AUTOMATIC", SECRET_PROGRAM)
    order = Order(site="default", order_id=f"SO-{first_id}")
    order.release(origin(f"r{first_id}"), {"customer": SECRET_CUSTOMER, "quantity": 5})
    entities = [Entity("order", "default", order.order_id, order.id)]
    if new:
        entities.append(Entity("machine", "default", "M1", machine.id))
    store.commit(
        [machine, order],
        Tracking("ingest", first_id + 1),
        [Received(f"k{first_id}", first_id + 1)],
        entities,
        snapshot=[machine],
    )
    return machine


class AtRestContract(ABC):
    @abstractmethod
    def make_settings(self, tmp_path: Path) -> Settings: ...

    @abstractmethod
    def raw_states(self, store: EventStore) -> list[bytes]:
        """The stored bytes of every event and snapshot, read past the library."""

    @pytest.fixture
    def plain(self, tmp_path: Path) -> Settings:
        return self.make_settings(tmp_path)

    @pytest.fixture
    def key(self) -> str:
        return AESCipher.create_key(32)

    @pytest.fixture
    def encrypted(self, plain: Settings, key: str) -> Iterator[Settings]:
        yield with_at_rest(plain, key)

    def test_encrypted_events_read_back_equal_and_are_not_stored_in_plaintext(
        self, encrypted: Settings, plain: Settings
    ) -> None:
        store = EventStore(encrypted)
        try:
            written = write_some(store)
            history = store.machine_history("default", "M1")
            assert [e.program for e in history[1:]] == [SECRET_PROGRAM] * 20
            loaded = store.machine("default", "M1")
            assert loaded is not None and loaded.version == written.version
            assert loaded.program == SECRET_PROGRAM
            order = store.order("default", "SO-0")
            assert order is not None and order.customer == SECRET_CUSTOMER
            raw = self.raw_states(store)
            assert len(raw) == 1 + 20 + 2 + 1  # events of both aggregates and one snapshot
            for state in raw:
                assert SECRET_PROGRAM.encode() not in state
                assert SECRET_CUSTOMER.encode() not in state
                # (Not "does not start with {": the nonce comes first, and is random.)
                assert b"ACTIVE" not in state and not _is_json(state)
            # The log reads the same (the views decode through it).
            _, decoded = store.read(0, 100, _all_topics(store))
            assert sum(1 for _, e in decoded if getattr(e, "program", None)) == 20
        finally:
            store.close()
        # Opened again with the same key: the same state.
        again = EventStore(encrypted)
        try:
            reloaded = again.machine("default", "M1")
            assert reloaded is not None and reloaded.program == SECRET_PROGRAM
        finally:
            again.close()

    def test_a_wrong_key_is_refused_at_start_without_showing_either_key(
        self, encrypted: Settings, key: str
    ) -> None:
        EventStore(encrypted).close()
        wrong = AESCipher.create_key(32)
        with pytest.raises(ConfigError) as refused:
            EventStore(with_at_rest(encrypted, wrong))
        message = str(refused.value)
        assert refused.value.key == "hub.store_encryption_key"
        assert "not the key this store was encrypted with" in message
        assert key not in message and wrong not in message
        # Read-only opens (the API's read workers) are refused too.
        with pytest.raises(ConfigError, match="not the key"):
            EventStore(with_at_rest(encrypted, wrong), read_only=True)

    def test_a_missing_key_is_refused_for_an_encrypted_store(
        self, encrypted: Settings, plain: Settings
    ) -> None:
        store = EventStore(encrypted)
        write_some(store)
        store.close()
        with pytest.raises(ConfigError, match="is not set, but this store is encrypted"):
            EventStore(plain)

    def test_a_key_is_refused_for_a_store_written_in_plaintext(
        self, plain: Settings, encrypted: Settings
    ) -> None:
        store = EventStore(plain)
        write_some(store)
        store.close()
        with pytest.raises(ConfigError, match="written in plaintext") as refused:
            EventStore(encrypted)
        assert refused.value.key == "hub.store_encryption_key"

    def test_a_store_with_events_and_no_key_check_was_written_in_plaintext(
        self, plain: Settings, encrypted: Settings
    ) -> None:
        # A store made before the key check existed: its events are plaintext.
        store = EventStore(plain)
        write_some(store)
        self.delete_key_check(store)
        store.close()
        with pytest.raises(ConfigError, match="written in plaintext"):
            EventStore(encrypted)
        reopened = EventStore(plain)
        try:
            assert reopened._recorder.meta_value(KEY_CHECK) == "plaintext"
        finally:
            reopened.close()

    def test_compression_before_encryption_and_switching_compression(
        self, encrypted: Settings, plain: Settings, key: str
    ) -> None:
        compressed = with_at_rest(plain, None, compression=True)
        store = EventStore(compressed)
        try:
            write_some(store)
            states = self.raw_states(store)
            assert not any(s.startswith(b"{") for s in states)
            assert SECRET_PROGRAM.encode() in b"".join(zlib.decompress(s) for s in states)
        finally:
            store.close()
        # Turned off, then on again: every event stays readable, whichever way it was written.
        store = EventStore(plain)
        try:
            write_some(store, first_id=100)
            machine = store.machine("default", "M1")
            assert machine is not None and machine.version == 41
        finally:
            store.close()
        store = EventStore(compressed)
        try:
            history = store.machine_history("default", "M1")
            assert len(history) == 41 and history[-1].program == SECRET_PROGRAM
        finally:
            store.close()
        # Encrypted and compressed (a new store): the cipher's plaintext is zlib.
        both = with_at_rest(self.make_settings(plain.data_dir.parent / "both"), key, True)
        store = EventStore(both)
        try:
            write_some(store)
            cipher = store.application.mapper.cipher
            assert cipher is not None
            opened = [zlib.decompress(cipher.decrypt(s)) for s in self.raw_states(store)]
            assert SECRET_PROGRAM.encode() in b"".join(opened)
        finally:
            store.close()

    @abstractmethod
    def delete_key_check(self, store: EventStore) -> None: ...


def _all_topics(store: EventStore) -> set[str]:
    return {n.topic for n in store._recorder.select_notifications(1, 1000)}


class TestSQLite(AtRestContract):
    def make_settings(self, tmp_path: Path) -> Settings:
        return load_settings(data_dir=tmp_path / "hub", store="sqlite")

    def raw_states(self, store: EventStore) -> list[bytes]:
        import sqlite3

        path = store._recorder.datastore.pool.db_name
        with sqlite3.connect(path) as connection:
            return [
                bytes(row[0])
                for table in ("stored_events", store._recorder.snapshots_table)
                for row in connection.execute(f"SELECT state FROM {table}")
            ]

    def delete_key_check(self, store: EventStore) -> None:
        with store._recorder.datastore.transaction(commit=True) as c:
            c.execute("DELETE FROM mes_hub_meta WHERE name=?", (KEY_CHECK,))


@pytest.mark.postgres
class TestPostgres(AtRestContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, postgres_dsn: str) -> None:
        self.dsn = postgres_dsn

    def make_settings(self, tmp_path: Path) -> Settings:
        return postgres_settings(self.dsn, tmp_path / "hub")

    def raw_states(self, store: EventStore) -> list[bytes]:
        recorder = store._recorder
        schema = recorder.datastore.schema
        tables = (getattr(recorder, "events_table_name"), recorder.snapshots_table)
        found: list[bytes] = []
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            for table in tables:
                name = table if "." in table else f"{schema}.{table}"
                curs.execute(f"SELECT state FROM {name}")
                found += [bytes(row["state"]) for row in curs.fetchall()]
        return found

    def delete_key_check(self, store: EventStore) -> None:
        schema = store._recorder.datastore.schema
        with store._recorder.datastore.transaction(commit=True) as curs:
            curs.execute(f"DELETE FROM {schema}.mes_hub_meta WHERE name = %s", (KEY_CHECK,))
