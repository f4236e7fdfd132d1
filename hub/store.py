"""The event store: the ``eventsourcing`` application and its recorders, SQLite or PostgreSQL.

This module is the one place that makes the library's synchronous database calls; async code
calls ``EventStore`` methods through ``asyncio.to_thread``.

Beside the library's own tables (stored events, snapshots, tracking) each backend keeps two
tables that are written in the same transaction as the events:

- ``mes_received_events``: the dedupe key (``contracts.dedupe_key``: source + id) of every
  CloudEvent applied, so a republished event changes nothing even after NATS' duplicate window
  has passed;
- ``mes_entities``: the machines, orders and plants (one per site) the store knows, to list
  them without a scan;

and ``mes_hub_meta``, a few facts about the store itself. Stores written before the dedupe key
held the bare CloudEvent id in ``mes_received_events``; the first open by this version records
that moment (``legacy_received_until``), and those old rows still count for events dated up to
then (see ``EventStore.received_events``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.postgres import PostgresFactory, PostgresProcessRecorder
from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteFactory,
    SQLiteProcessRecorder,
)
from eventsourcing.utils import Environment
from psycopg.conninfo import conninfo_to_dict
from psycopg.sql import SQL, Identifier

from contracts import CloudEvent, dedupe_key
from hub.domain import (
    Machine,
    Order,
    Plant,
    machine_aggregate_id,
    order_aggregate_id,
    plant_aggregate_id,
)
from hub.errors import ConcurrentWrite
from hub.settings import Settings

RECEIVED_TABLE = "mes_received_events"
ENTITIES_TABLE = "mes_entities"
META_TABLE = "mes_hub_meta"
# Meta rows: which key the received table holds, and until when it held bare ids.
RECEIVED_KEY = "received_key"
RECEIVED_KEY_FORMAT = "sha256(source LF id) hex"
LEGACY_RECEIVED_UNTIL = "legacy_received_until"


@dataclass(frozen=True)
class Received:
    """A CloudEvent's dedupe key (``contracts.dedupe_key``) and the stream position it was
    applied from."""

    key: str
    stream_seq: int


@dataclass(frozen=True)
class Entity:
    kind: str  # "machine", "order" or "plant" (whose entity_id is its site)
    site: str
    entity_id: str
    aggregate_id: UUID


def _received_rows(kwargs: dict[str, Any]) -> list[tuple[str, int]]:
    return [(r.key, r.stream_seq) for r in kwargs.get("mes_received", ())]


def _snapshot_rows(kwargs: dict[str, Any]) -> list[tuple[Any, int, str, bytes]]:
    return [
        (s.originator_id, s.originator_version, s.topic, s.state)
        for s in kwargs.get("mes_snapshots", ())
    ]


def _entity_rows(kwargs: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (e.kind, e.site, e.entity_id, e.aggregate_id.hex) for e in kwargs.get("mes_entities", ())
    ]


class SQLiteHubRecorder(SQLiteProcessRecorder):
    snapshots_table = "stored_snapshots"  # set by EventStore from the library's snapshot store

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {RECEIVED_TABLE} ("
            "event_id TEXT PRIMARY KEY, stream_seq INTEGER NOT NULL) WITHOUT ROWID",
            f"CREATE TABLE IF NOT EXISTS {ENTITIES_TABLE} ("
            "kind TEXT, site TEXT, entity_id TEXT, aggregate_id TEXT NOT NULL, "
            "PRIMARY KEY (kind, site, entity_id)) WITHOUT ROWID",
            f"CREATE INDEX IF NOT EXISTS {ENTITIES_TABLE}_aggregate ON {ENTITIES_TABLE} "
            "(aggregate_id)",
            f"CREATE TABLE IF NOT EXISTS {META_TABLE} ("
            "name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        ]

    def upgrade_received_keys(self, now: str) -> str | None:
        """On the first open by a version that keys received events by ``dedupe_key``: if the
        table already has rows (bare ids), record ``now`` as the end of that era. Returns that
        moment, or None for a store that never held bare ids."""
        with self.datastore.transaction(commit=True) as c:
            c.execute(f"SELECT value FROM {META_TABLE} WHERE name=?", (RECEIVED_KEY,))
            if c.fetchone() is None:
                c.execute(f"SELECT 1 FROM {RECEIVED_TABLE} LIMIT 1")
                if c.fetchone() is not None:
                    c.execute(
                        f"INSERT OR IGNORE INTO {META_TABLE} VALUES (?, ?)",
                        (LEGACY_RECEIVED_UNTIL, now),
                    )
                c.execute(
                    f"INSERT OR IGNORE INTO {META_TABLE} VALUES (?, ?)",
                    (RECEIVED_KEY, RECEIVED_KEY_FORMAT),
                )
            c.execute(f"SELECT value FROM {META_TABLE} WHERE name=?", (LEGACY_RECEIVED_UNTIL,))
            row = c.fetchone()
            return str(row[0]) if row is not None else None

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[Any], **kwargs: Any
    ) -> Sequence[int] | None:
        # One executemany instead of the library's row-by-row inserts (it executes each row to
        # return notification ids, which ingest does not use): same table, same statement.
        c.executemany(
            self.insert_events_statement,
            [
                (
                    s.originator_id.hex if isinstance(s.originator_id, UUID) else s.originator_id,
                    s.originator_version,
                    s.topic,
                    s.state,
                )
                for s in stored_events
            ],
        )
        tracking: Tracking | None = kwargs.get("tracking")
        if tracking is not None:
            self._insert_tracking(c, tracking)
        received = _received_rows(kwargs)
        if received:
            c.executemany(f"INSERT INTO {RECEIVED_TABLE} VALUES (?, ?)", received)
        entities = _entity_rows(kwargs)
        if entities:
            c.executemany(f"INSERT OR IGNORE INTO {ENTITIES_TABLE} VALUES (?, ?, ?, ?)", entities)
        snapshots = [(str(row[0].hex), *row[1:]) for row in _snapshot_rows(kwargs)]
        if snapshots:
            c.executemany(
                f"INSERT OR IGNORE INTO {self.snapshots_table} VALUES (?, ?, ?, ?)", snapshots
            )
        return None

    def _select_in(self, column: str, table: str, values: Sequence[str]) -> set[str]:
        """``column`` values of ``table`` found among ``values`` (in chunks: SQLite caps the
        number of bound parameters)."""
        found: set[str] = set()
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(values), 500):
                chunk = values[start : start + 500]
                c.execute(
                    f"SELECT {column} FROM {table} WHERE {column} IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
                found.update(row[0] for row in c.fetchall())
        return found

    def received_already(self, keys: Sequence[str]) -> set[str]:
        return self._select_in("event_id", RECEIVED_TABLE, keys)

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        hexes = [a.hex for a in aggregate_ids]
        return {UUID(h) for h in self._select_in("aggregate_id", ENTITIES_TABLE, hexes)}

    def entities(self, kind: str, site: str | None) -> list[Entity]:
        with self.datastore.transaction(commit=False) as c:
            if site is None:
                c.execute(
                    f"SELECT * FROM {ENTITIES_TABLE} WHERE kind=? ORDER BY site, entity_id",
                    (kind,),
                )
            else:
                c.execute(
                    f"SELECT * FROM {ENTITIES_TABLE} WHERE kind=? AND site=? ORDER BY entity_id",
                    (kind, site),
                )
            return [Entity(r[0], r[1], r[2], UUID(r[3])) for r in c.fetchall()]


# Checkpoint the write-ahead log every ~80 MB instead of SQLite's default ~4 MB. Each ingest
# batch touches ~1,000 scattered index pages (aggregate ids and CloudEvent ids are random keys);
# a longer interval copies a page that many batches rewrote back to the database once, not once
# per batch. Measured here: commit cost at 200k stored events 45 -> 33 us per event.
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 20_000


class _TunedSQLitePool(SQLiteConnectionPool):
    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        # The library offers no on-connect hook; its connection wraps sqlite3's.
        connection._sqlite_conn.execute(
            f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}"
        )
        return connection


class HubSQLiteFactory(SQLiteFactory):
    """The library's SQLite factory, with our connection settings."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        library_pool = self.datastore.pool
        self.datastore.pool = _TunedSQLitePool(
            db_name=library_pool.db_name, lock_timeout=library_pool.lock_timeout
        )
        library_pool.close()


class HubPostgresFactory(PostgresFactory):
    """The library's PostgreSQL factory, passing on every DSN parameter it does not name itself
    (sslmode, sslrootcert, options, application_name, …) instead of dropping them."""

    EXTRA_CONNINFO = "EXTRA_CONNINFO"

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        extra = json.loads(self.env.get(self.EXTRA_CONNINFO) or "{}")
        connect_kwargs = self.datastore.pool.kwargs  # the pool is not open yet
        assert isinstance(connect_kwargs, dict)
        connect_kwargs.update(extra)


class PostgresHubRecorder(PostgresProcessRecorder):
    snapshots_table = "mes_hub_snapshots"  # set by EventStore from the library's snapshot store

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                "event_id TEXT PRIMARY KEY, stream_seq BIGINT NOT NULL)"
            ).format(schema=schema, table=Identifier(RECEIVED_TABLE))
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                "kind TEXT, site TEXT, entity_id TEXT, aggregate_id TEXT NOT NULL, "
                "PRIMARY KEY (kind, site, entity_id))"
            ).format(schema=schema, table=Identifier(ENTITIES_TABLE))
        )
        self.sql_create_statements.append(
            SQL("CREATE INDEX IF NOT EXISTS {index} ON {schema}.{table} (aggregate_id)").format(
                index=Identifier(ENTITIES_TABLE + "_aggregate"),
                schema=schema,
                table=Identifier(ENTITIES_TABLE),
            )
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                "name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            ).format(schema=schema, table=Identifier(META_TABLE))
        )

    def upgrade_received_keys(self, now: str) -> str | None:
        """See ``SQLiteHubRecorder.upgrade_received_keys``."""
        schema = Identifier(self.datastore.schema)
        meta = SQL("{schema}.{table}").format(schema=schema, table=Identifier(META_TABLE))
        received = SQL("{schema}.{table}").format(schema=schema, table=Identifier(RECEIVED_TABLE))
        insert = SQL("INSERT INTO {meta} VALUES (%s, %s) ON CONFLICT DO NOTHING").format(meta=meta)
        select = SQL("SELECT value FROM {meta} WHERE name = %s").format(meta=meta)
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(select, (RECEIVED_KEY,))
            if curs.fetchone() is None:
                curs.execute(
                    SQL("SELECT 1 AS found FROM {received} LIMIT 1").format(received=received)
                )
                if curs.fetchone() is not None:
                    curs.execute(insert, (LEGACY_RECEIVED_UNTIL, now))
                curs.execute(insert, (RECEIVED_KEY, RECEIVED_KEY_FORMAT))
            curs.execute(select, (LEGACY_RECEIVED_UNTIL,))
            row = curs.fetchone()
            return str(row["value"]) if row is not None else None

    def _insert_events(self, curs: Any, stored_events: Sequence[Any], **kwargs: Any) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        schema = Identifier(self.datastore.schema)
        received = _received_rows(kwargs)
        if received:
            curs.executemany(
                SQL("INSERT INTO {schema}.{table} VALUES (%s, %s)").format(
                    schema=schema, table=Identifier(RECEIVED_TABLE)
                ),
                received,
            )
        entities = _entity_rows(kwargs)
        if entities:
            curs.executemany(
                SQL(
                    "INSERT INTO {schema}.{table} VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(schema=schema, table=Identifier(ENTITIES_TABLE)),
                entities,
            )
        snapshots = _snapshot_rows(kwargs)
        if snapshots:
            curs.executemany(
                SQL(
                    "INSERT INTO {schema}.{table} "
                    "(originator_id, originator_version, topic, state) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(schema=schema, table=Identifier(self.snapshots_table)),
                snapshots,
            )

    def received_already(self, keys: Sequence[str]) -> set[str]:
        statement = SQL("SELECT event_id FROM {schema}.{table} WHERE event_id = ANY(%s)").format(
            schema=Identifier(self.datastore.schema), table=Identifier(RECEIVED_TABLE)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (list(keys),))
            return {row["event_id"] for row in curs.fetchall()}

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        statement = SQL("SELECT aggregate_id FROM {schema}.{table} WHERE aggregate_id = ANY(%s)")
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                statement.format(
                    schema=Identifier(self.datastore.schema), table=Identifier(ENTITIES_TABLE)
                ),
                ([a.hex for a in aggregate_ids],),
            )
            return {UUID(row["aggregate_id"]) for row in curs.fetchall()}

    def entities(self, kind: str, site: str | None) -> list[Entity]:
        table = SQL("{schema}.{table}").format(
            schema=Identifier(self.datastore.schema), table=Identifier(ENTITIES_TABLE)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            if site is None:
                curs.execute(
                    SQL("SELECT * FROM {t} WHERE kind=%s ORDER BY site, entity_id").format(t=table),
                    (kind,),
                )
            else:
                curs.execute(
                    SQL("SELECT * FROM {t} WHERE kind=%s AND site=%s ORDER BY entity_id").format(
                        t=table
                    ),
                    (kind, site),
                )
            return [
                Entity(r["kind"], r["site"], r["entity_id"], UUID(r["aggregate_id"]))
                for r in curs.fetchall()
            ]


HubRecorder = SQLiteHubRecorder | PostgresHubRecorder


class HubApplication(Application[UUID]):
    name = "mes_hub"

    def construct_env(self, name: str, env: Any = None) -> Environment:
        # Settings are read once by hub.settings and passed down: the library must not read
        # os.environ on its own (the base class would merge it in here).
        return Environment(name, dict(env or {}))

    def construct_recorder(self) -> Any:
        # A process recorder: it records tracking positions with the events.
        return self.factory.process_recorder()


def store_environment(settings: Settings) -> dict[str, str]:
    """The library's configuration, derived from our settings."""
    env = {
        "IS_SNAPSHOTTING_ENABLED": "y",
        "AGGREGATE_CACHE_MAXSIZE": "10000",
        "CREATE_TABLE": "y",
    }
    if settings.store == "sqlite":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        env |= {
            "PERSISTENCE_MODULE": "hub.store:HubSQLiteFactory",
            "SQLITE_DBNAME": str(settings.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
            "PROCESS_RECORDER_TOPIC": "hub.store:SQLiteHubRecorder",
        }
        return env
    if settings.postgres_dsn is None:
        raise ValueError("store is 'postgres' but postgres_dsn is not set")
    conninfo = conninfo_to_dict(settings.postgres_dsn.get_secret_value())
    named = ("dbname", "host", "port", "user", "password")
    extra = {k: str(v) for k, v in conninfo.items() if k not in named}
    env |= {
        "PERSISTENCE_MODULE": "hub.store:HubPostgresFactory",
        HubPostgresFactory.EXTRA_CONNINFO: json.dumps(extra),
        "POSTGRES_DBNAME": str(conninfo.get("dbname", "postgres")),
        "POSTGRES_HOST": str(conninfo.get("host", "localhost")),
        "POSTGRES_PORT": str(conninfo.get("port", "5432")),
        "POSTGRES_USER": str(conninfo.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(conninfo.get("password", "")),
        "POSTGRES_SCHEMA": settings.postgres_schema,
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",  # the function path skips our extra inserts
        "PROCESS_RECORDER_TOPIC": "hub.store:PostgresHubRecorder",
    }
    return env


@dataclass(frozen=True)
class Sealed:
    """A batch's new events and snapshots as they are stored (``EventStore.seal``)."""

    events: Sequence[Any]
    snapshots: Sequence[Any]


@dataclass(frozen=True)
class Commit:
    """What one ingest commit writes, all in one transaction: the sealed events and snapshots,
    the partition's position, the dedupe keys received and the new machines and orders."""

    sealed: Sealed
    tracking: Tracking
    received: Sequence[Received]
    new_entities: Sequence[Entity]


class EventStore:
    """What the hub does with its store, in the plant's terms."""

    def __init__(self, settings: Settings) -> None:
        self._app = HubApplication(env=store_environment(settings))
        self._recorder = cast(HubRecorder, self._app.recorder)
        snapshots = self._app.snapshots
        assert snapshots is not None
        # Ingest writes snapshots in its own transaction, into the library's snapshot table.
        self._recorder.snapshots_table = getattr(snapshots.recorder, "events_table_name")  # noqa: B009
        until = self._recorder.upgrade_received_keys(datetime.now(UTC).isoformat())
        # Until when the received table held bare CloudEvent ids (None: never).
        self.legacy_received_until = datetime.fromisoformat(until) if until else None

    @property
    def application(self) -> HubApplication:
        return self._app

    def close(self) -> None:
        self._app.close()

    # --- writing (the ingest worker is the only writer) --------------------------------------

    def tracking_position(self, tracking_name: str) -> int:
        return self._recorder.max_tracking_id(tracking_name) or 0

    def received_already(self, keys: Sequence[str]) -> set[str]:
        """Which of these dedupe keys the store has applied."""
        return self._recorder.received_already(keys) if keys else set()

    def received_events(
        self, events: Sequence[CloudEvent], legacy_margin_s: float = 0.0
    ) -> set[str]:
        """The dedupe keys of those ``events`` already applied. In a store upgraded from bare-id
        keys, an event dated up to the upgrade (plus ``legacy_margin_s``, the clock skew allowed)
        is also applied already if its bare id is among the old rows."""
        keys = [dedupe_key(e) for e in events]
        found = self.received_already(keys)
        if self.legacy_received_until is None:
            return found
        until = self.legacy_received_until + timedelta(seconds=legacy_margin_s)
        old = [(k, e.id) for k, e in zip(keys, events, strict=True) if e.time <= until]
        if old:
            known = self.received_already([event_id for _, event_id in old])
            found.update(k for k, event_id in old if event_id in known)
        return found

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these machines and orders the store has (one query, for a whole batch)."""
        return self._recorder.existing(aggregate_ids) if aggregate_ids else set()

    def load(self, aggregate_id: UUID) -> Aggregate | None:
        try:
            found = cast(
                Aggregate, self._app.repository.get(aggregate_id, deepcopy_from_cache=True)
            )
        except AggregateNotFoundError:
            return None
        if isinstance(found, Order) and found.moves is None and found.runs:
            # A snapshot from before an order kept its taps: its runs were folded in arrival
            # order (an end that came before its start was lost). Replay its events instead.
            events = self._app.repository.event_store.get(originator_id=aggregate_id)
            return cast(Aggregate, project_aggregate(None, events))
        return found

    def seal(self, aggregates: Iterable[Aggregate], snapshot: Iterable[Aggregate] = ()) -> Sealed:
        """The aggregates' new events and snapshots of ``snapshot``, taken now and put in the
        form they are stored in: after this the aggregates may change (ingest prepares the
        next batch) while ``write`` stores these."""
        mapper = self._app.mapper
        events = [e for aggregate in aggregates for e in aggregate.collect_events()]
        return Sealed(
            [mapper.to_stored_event(e) for e in events],
            [mapper.to_stored_event(Snapshot.take(a)) for a in snapshot],
        )

    def write(self, commit: Commit) -> None:
        """Store a ``Commit`` in ONE transaction. Raises ``ConcurrentWrite`` when another writer
        got there first (an aggregate version, received key or tracking position already
        taken): then nothing of it is stored."""
        try:
            self._recorder.insert_events(
                list(commit.sealed.events),
                tracking=commit.tracking,
                mes_received=commit.received,
                mes_entities=commit.new_entities,
                mes_snapshots=commit.sealed.snapshots,
            )
        except IntegrityError as exc:
            raise ConcurrentWrite(str(exc)) from exc

    def commit(
        self,
        aggregates: Iterable[Aggregate],
        tracking: Tracking,
        received: Sequence[Received],
        new_entities: Sequence[Entity],
        snapshot: Iterable[Aggregate] = (),
    ) -> None:
        """``seal`` then ``write``, at once."""
        self.write(Commit(self.seal(aggregates, snapshot), tracking, received, new_entities))

    # --- reading -----------------------------------------------------------------------------

    def machine(self, site: str, machine_id: str) -> Machine | None:
        found = self.load(machine_aggregate_id(site, machine_id))
        return found if isinstance(found, Machine) else None

    def order(self, site: str, order_id: str) -> Order | None:
        found = self.load(order_aggregate_id(site, order_id))
        return found if isinstance(found, Order) else None

    def plant(self, site: str) -> Plant | None:
        found = self.load(plant_aggregate_id(site))
        return found if isinstance(found, Plant) else None

    def machine_history(self, site: str, machine_id: str) -> list[Any]:
        """Every stored event of one machine, in the order it was recorded."""
        return list(self._app.events.get(machine_aggregate_id(site, machine_id)))

    def order_cycle_facts(
        self, site: str, order_ids: Iterable[str]
    ) -> dict[str, tuple[float | None, str | None]]:
        """What each known order says of its PRI, from the order aggregates: (its own ideal
        cycle time, its part number). The plant's fallbacks are the projections' rules."""
        found: dict[str, tuple[float | None, str | None]] = {}
        for order_id in order_ids:
            order = self.load(order_aggregate_id(site, order_id))
            if isinstance(order, Order):
                found[order_id] = (order.ideal_cycle_time_s, order.part_number)
        return found

    def has_machine(self, site: str, machine_id: str) -> bool:
        return bool(self.existing([machine_aggregate_id(site, machine_id)]))

    def machine_ids(self, site: str) -> list[str]:
        return [e.entity_id for e in self._recorder.entities("machine", site)]

    def machines(self, site: str | None = None) -> list[Machine]:
        found = (self.load(e.aggregate_id) for e in self._recorder.entities("machine", site))
        return [m for m in found if isinstance(m, Machine)]

    def orders(self, site: str | None = None) -> list[Order]:
        found = (self.load(e.aggregate_id) for e in self._recorder.entities("order", site))
        return [o for o in found if isinstance(o, Order)]

    # --- the notification log, as projections read it ---------------------------------------

    def read(
        self, after: int, limit: int, topics: Collection[str]
    ) -> tuple[int, list[tuple[int, Any]]]:
        """Up to ``limit`` stored events after position ``after``: the last position read, and
        those whose topic is in ``topics``, decoded (the others are skipped undecoded)."""
        notifications = self._recorder.select_notifications(after, limit, inclusive_of_start=False)
        if not notifications:
            return after, []
        decode = self._app.mapper.to_domain_event
        return notifications[-1].id, [(n.id, decode(n)) for n in notifications if n.topic in topics]

    def last_position(self) -> int:
        """The position of the last stored event in the notification log (0 for an empty
        store). Not a count: PostgreSQL's positions may have gaps."""
        return self._recorder.max_notification_id() or 0
