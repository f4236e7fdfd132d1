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

At rest (docs/at-rest.md): with ``store_encryption_key`` the state of every stored event and
snapshot is encrypted with the library's AES-GCM cipher, and with ``store_compression``
compressed with zlib before. Ids, versions, topics, positions and the tables above stay
plaintext. The meta table keeps a key check (``store_key_check``): a known token encrypted with
the store's key, or ``plaintext``; every open compares the key given with it and refuses a
wrong key, a key for a plaintext store and no key for an encrypted one (``ConfigError``).
"""

from __future__ import annotations

import base64
import functools
import json
import re
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import quote
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import Cipher, Compressor, IntegrityError, Notification, Tracking
from eventsourcing.persistence import InterfaceError as LibraryInterfaceError
from eventsourcing.persistence import OperationalError as LibraryOperationalError
from eventsourcing.postgres import ConnectionPool as LibraryConnectionPool
from eventsourcing.postgres import PostgresFactory, PostgresProcessRecorder
from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteFactory,
    SQLiteProcessRecorder,
)
from eventsourcing.utils import Environment
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.sql import SQL, Identifier
from psycopg_pool import PoolTimeout

from contracts import CloudEvent, dedupe_key
from hub.domain import (
    Machine,
    Order,
    Plant,
    machine_aggregate_id,
    order_aggregate_id,
    plant_aggregate_id,
)
from hub.errors import ConcurrentWrite, MesHubError
from hub.settings import ConfigError, Settings

RECEIVED_TABLE = "mes_received_events"
ENTITIES_TABLE = "mes_entities"
META_TABLE = "mes_hub_meta"
# Meta rows: which key the received table holds, and until when it held bare ids.
RECEIVED_KEY = "received_key"
RECEIVED_KEY_FORMAT = "sha256(source LF id) hex"
LEGACY_RECEIVED_UNTIL = "legacy_received_until"
# Meta row: how the store's events are written, checked at every open (``EventStore._check_key``).
KEY_CHECK = "store_key_check"
KEY_CHECK_PLAINTEXT = "plaintext"
KEY_CHECK_PREFIX = "aes-gcm:"
KEY_CHECK_TOKEN = b"mes-hub store key check v1"
ENCRYPTION_KEY_SETTING = "hub.store_encryption_key"


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

    def meta_value(self, name: str) -> str | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT value FROM {META_TABLE} WHERE name=?", (name,))
            row = c.fetchone()
            return str(row[0]) if row is not None else None

    def add_meta(self, name: str, value: str) -> str:
        """Record ``value`` under ``name`` unless a value is there already (another process
        opening the store at the same moment); returns the value recorded."""
        with self.datastore.transaction(commit=True) as c:
            c.execute(f"INSERT OR IGNORE INTO {META_TABLE} VALUES (?, ?)", (name, value))
            c.execute(f"SELECT value FROM {META_TABLE} WHERE name=?", (name,))
            return str(c.fetchone()[0])

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

    def records_at(self, positions: Sequence[int]) -> list[Notification]:
        """The stored records at ``positions`` (those that exist), in log order."""
        found: list[Notification] = []
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(positions), 500):
                chunk = list(positions[start : start + 500])
                c.execute(
                    "SELECT rowid, originator_id, originator_version, topic, state FROM "
                    f"{self.events_table_name} WHERE rowid IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                found += [
                    Notification(
                        id=row[0],
                        originator_id=UUID(row[1]),
                        originator_version=row[2],
                        topic=row[3],
                        state=row[4],
                    )
                    for row in c.fetchall()
                ]
        return sorted(found, key=lambda n: n.id)

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
    (sslmode, sslrootcert, options, application_name, connect_timeout, …) instead of dropping
    them."""

    EXTRA_CONNINFO = "EXTRA_CONNINFO"

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        extra = json.loads(self.env.get(self.EXTRA_CONNINFO) or "{}")
        datastore = self.datastore
        library_pool = datastore.pool  # not open yet
        connect_kwargs = library_pool.kwargs
        assert isinstance(connect_kwargs, dict)
        connect_kwargs.update(extra)
        # The same pool, but one that stops making callers wait while the server is away.
        datastore.pool = OutageAwarePool(
            get_password_func=library_pool.get_password_func,
            connection_class=library_pool.connection_class,
            kwargs=connect_kwargs,
            min_size=library_pool.min_size,
            max_size=library_pool.max_size,
            open=False,
            configure=datastore.after_connect_func(),
            timeout=library_pool.timeout,
            max_waiting=library_pool.max_waiting,
            max_lifetime=library_pool.max_lifetime,
            check=LibraryConnectionPool.check_connection if datastore.pre_ping else None,
            name="mes-hub store",
        )


# --- PostgreSQL: where it is, and why it does not answer -----------------------------------------

# A connection attempt gives up after this long unless the DSN sets ``connect_timeout`` (libpq
# would wait for the system's TCP timeout, psycopg over two minutes).
CONNECT_TIMEOUT_S = 5
# How long a call waits for a pooled connection before it fails (the library's default is 30 s,
# and it tries a failed call ten times: five minutes before a lost server were reported).
POOL_WAIT_S = 10
# The same while the server is known not to answer (``OutageAwarePool``).
OUTAGE_WAIT_S = 1.0
_C = TypeVar("_C", bound=psycopg.Connection[Any])


class OutageAwarePool(LibraryConnectionPool[_C]):
    """The library's connection pool (``psycopg_pool``'s), except that while the server does not
    answer (the pool's last attempt to connect failed) a caller waits at most
    ``OUTAGE_WAIT_S`` for a connection, not the pool's whole timeout: the library tries a
    failed call ten times, and ten full waits were minutes before anyone heard of it."""

    _failing = False

    def _connect(self, timeout: float | None = None) -> _C:
        try:
            connection = super()._connect(timeout)
        except Exception:
            self._failing = True
            raise
        self._failing = False
        return connection

    def getconn(self, timeout: float | None = None) -> _C:
        if self._failing:
            timeout = min(self.timeout if timeout is None else timeout, OUTAGE_WAIT_S)
        return super().getconn(timeout)


def _now_text() -> str:
    return datetime.now(UTC).isoformat()


class StoreUnavailable(MesHubError):
    """The store's PostgreSQL does not answer or refuses the hub: one line naming where (host
    and port, or socket) and why, never the password."""


def postgres_params(dsn: str) -> dict[str, str]:
    """The libpq parameters of every connection to the store (the event store's and the views'):
    the DSN's, with the defaults the store has always used for what it leaves out (localhost,
    port 5432, user and database ``postgres``) and a connect timeout."""
    given = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    defaults = {
        "dbname": "postgres",
        "host": "localhost",
        "port": "5432",
        "user": "postgres",
        "connect_timeout": str(CONNECT_TIMEOUT_S),
    }
    return defaults | given


def check_postgres(params: Mapping[str, str]) -> None:
    """Connect once to each server ``params`` name (a DSN may list several hosts) until one
    answers. If none does, raise ``StoreUnavailable`` naming each place tried and why: within a
    few seconds (``connect_timeout``), instead of a pool that keeps trying in the background
    while its caller waits."""
    failures: list[tuple[str, str]] = []
    timeout = timeout_from_conninfo(dict(params))  # (as psycopg reads it: 2 s at least)
    for host, port in _servers(params):
        try:
            psycopg.connect(make_conninfo("", **{**params, "host": host, "port": port})).close()
            return
        except psycopg.Error as exc:
            failures.append((_where(host, port), _why(exc, timeout)))
    if len({why for _, why in failures}) == 1:
        places = ", ".join(where for where, _ in failures)
        message = f"cannot connect to PostgreSQL at {places}: {failures[0][1]}"
    else:
        message = "cannot connect to PostgreSQL at " + "; at ".join(
            f"{where}: {why}" for where, why in failures
        )
    raise StoreUnavailable(_scrubbed(message, params.get("password", "")))


def raise_if_unavailable(params: Mapping[str, str] | None, failure: BaseException) -> None:
    """After a database call failed (``failure``): if the server no longer answers, raise
    ``StoreUnavailable`` saying why, in place of the driver's error (kept as its cause); if it
    answers, return, and the caller raises ``failure`` itself. ``params``: None for SQLite."""
    if params is None:
        return
    try:
        check_postgres(params)
    except StoreUnavailable as unavailable:
        if _no_connection(failure):  # the probe says why
            raise unavailable from failure
        # The call's own error too (its first line): the probe's cause may be another one.
        first = (str(failure).splitlines() or [""])[0][:200]
        said = f"{unavailable} (the call failed with {type(failure).__name__}: {first})"
        raise StoreUnavailable(_scrubbed(said, params.get("password", ""))) from failure


def _no_connection(failure: BaseException | None) -> bool:
    """Whether ``failure`` is, or was raised for, the pool having no connection to give (the
    library wraps psycopg_pool's ``PoolTimeout`` in its own error)."""
    for _ in range(10):  # (a chain is short; a cycle must not hang us)
        if failure is None:
            return False
        if isinstance(failure, PoolTimeout):
            return True
        failure = failure.__cause__ or failure.__context__
    return False


def _servers(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """(host, port) of each server a DSN names, in libpq's order: one port for every host, or
    one each (``hub.settings`` refused other lists)."""
    if "hostaddr" in params:  # addresses given beside the names: libpq pairs them up itself
        return [(params.get("host", ""), params.get("port", ""))]
    hosts = params.get("host", "").split(",")
    ports = params.get("port", "").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    return list(zip(hosts, ports, strict=False))


def _where(host: str, port: str) -> str:
    port = port or "5432"
    if not host:
        return f"the default socket (port {port})"
    if host.startswith("/"):  # a directory: libpq connects to its socket
        return f"{host.rstrip('/')}/.s.PGSQL.{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DNS_FAILURE = re.compile(r"failed to resolve host .*?: (?:\[Errno -?\d+\] )?(?P<why>.*)")


def _why(exc: psycopg.Error, timeout: int) -> str:
    """The cause of a failed connection, in a few words (libpq's own, where they are clear)."""
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        return f"no answer within {timeout} s (timeout)"
    # The first line: the last attempt's failure (more lines would list every address tried,
    # and libpq's hint, "Is the server running on that host…?").
    text = str(exc).strip().split("\n")[0].strip()
    dns = _DNS_FAILURE.match(text)
    if dns:
        return f"host name not resolved ({dns['why'].strip()})"
    # 'connection failed: connection to server at "h", port p failed: FATAL:  <why>'
    detail = text.rsplit(" failed: ", 1)[-1].strip()
    detail = re.sub(r"^(FATAL|ERROR):\s+", "", detail).rstrip(".")
    lowered = detail.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "no such file or directory" in lowered:
        return "no server listening on that socket"
    if "no password supplied" in lowered:
        return "the server asks for a password and postgres_dsn gives none"
    if "server does not support ssl" in lowered:
        return "the server does not offer TLS, but postgres_dsn's sslmode requires it"
    if (
        "no pg_hba.conf entry" in lowered
        and lowered.endswith("no encryption")
        and "ssl encryption" not in str(exc).lower()  # (then not over TLS either)
    ):
        return (
            f"refused without TLS ({detail}): if the server requires TLS, set sslmode=require "
            "or verify-full in postgres_dsn"
        )
    return detail or type(exc).__name__


def _scrubbed(text: str, password: str) -> str:
    """``text`` without the password, as written or percent-encoded (libpq's messages do not
    quote it; a message that did would still not show it)."""
    for form in {password, quote(password, safe="")}:
        if form:
            text = text.replace(form, "***")
    return text


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

    def _meta(self) -> Any:
        return SQL("{schema}.{table}").format(
            schema=Identifier(self.datastore.schema), table=Identifier(META_TABLE)
        )

    def meta_value(self, name: str) -> str | None:
        statement = SQL("SELECT value FROM {meta} WHERE name = %s").format(meta=self._meta())
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (name,))
            row = curs.fetchone()
            return str(row["value"]) if row is not None else None

    def add_meta(self, name: str, value: str) -> str:
        """See ``SQLiteHubRecorder.add_meta``."""
        meta = self._meta()
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL("INSERT INTO {meta} VALUES (%s, %s) ON CONFLICT DO NOTHING").format(meta=meta),
                (name, value),
            )
            curs.execute(SQL("SELECT value FROM {meta} WHERE name = %s").format(meta=meta), (name,))
            row = curs.fetchone()
            assert row is not None  # (inserted just now, or by another process before)
            return str(row["value"])

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

    def records_at(self, positions: Sequence[int]) -> list[Notification]:
        """The stored records at ``positions`` (those that exist), in log order."""
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {schema}.{table} WHERE notification_id = ANY(%s) ORDER BY notification_id"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (list(positions),))
            return [
                Notification(
                    id=row["notification_id"],
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]

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


# --- at rest: compression and encryption of the stored state ------------------------------------

# The library's transcoder writes an event's state as a JSON object: its first byte is "{". A
# zlib stream's first byte says "deflate" in its low four bits (8), which "{" (0x7B) does not: the
# two never get mistaken for each other, so one store may hold both.
_JSON_OBJECT = b"{"


class ZlibCompressing(Compressor):
    """``store_compression`` on: the library's zlib compression of what it stores; what was
    stored before compression was turned on is read as it is."""

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data)

    def decompress(self, data: bytes) -> bytes:
        return data if data[:1] == _JSON_OBJECT else zlib.decompress(data)


class ZlibReading(ZlibCompressing):
    """``store_compression`` off: stored as it is, but what was stored compressed while it was
    on is still read (so turning it off is safe)."""

    def compress(self, data: bytes) -> bytes:
        return data


def at_rest_environment(settings: Settings) -> dict[str, str]:
    """The library's cipher and compressor settings: compress (zlib) before encrypting (AES-GCM,
    a random nonce per event), as its ``Mapper`` does. The cipher is the library's AES-GCM over
    the ``cryptography`` package (a dependency already), not its twin over ``pycryptodome``
    (``eventsourcing.cipher``, not installed): both write the same bytes (nonce, tag, text)."""
    env = {
        "COMPRESSOR_TOPIC": "hub.store:"
        + (ZlibCompressing if settings.store_compression else ZlibReading).__name__
    }
    key = settings.store_encryption_key
    if key is not None and key.get_secret_value():
        env |= {
            "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
            "CIPHER_KEY": key.get_secret_value(),
        }
    return env


def key_check_value(cipher: Cipher | None) -> str:
    """What the meta table keeps to check a key with: a known token encrypted with the key, or
    ``plaintext`` for a store written without a key."""
    if cipher is None:
        return KEY_CHECK_PLAINTEXT
    return KEY_CHECK_PREFIX + base64.b64encode(cipher.encrypt(KEY_CHECK_TOKEN)).decode()


def key_refusal(recorded: str, cipher: Cipher | None) -> str | None:
    """Why the key given (``cipher``; None: no key) cannot open a store whose key check is
    ``recorded``; None if it can. Never names the key."""
    if recorded == KEY_CHECK_PLAINTEXT:
        if cipher is None:
            return None
        return (
            "is set, but this store was written in plaintext: a key cannot encrypt a store "
            "afterwards (export and import it into a new store to encrypt it, docs/at-rest.md); "
            "remove the key to open it"
        )
    if not recorded.startswith(KEY_CHECK_PREFIX):
        return f"this store's key check ({KEY_CHECK} in {META_TABLE}) is not one the hub wrote"
    if cipher is None:
        return "is not set, but this store is encrypted: set it to the key it was written with"
    try:
        token = cipher.decrypt(base64.b64decode(recorded[len(KEY_CHECK_PREFIX) :]))
    except ValueError:  # (AES-GCM: the tag does not verify with another key)
        token = None
    if token != KEY_CHECK_TOKEN:
        return "is not the key this store was encrypted with (its key check does not decrypt)"
    return None


def store_environment(settings: Settings) -> dict[str, str]:
    """The library's configuration, derived from our settings."""
    env = {
        "IS_SNAPSHOTTING_ENABLED": "y",
        "AGGREGATE_CACHE_MAXSIZE": "10000",
        "CREATE_TABLE": "y",
        **at_rest_environment(settings),
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
    conninfo = store_postgres_params(settings)
    named = ("dbname", "host", "port", "user", "password")
    extra = {k: v for k, v in conninfo.items() if k not in named}
    env |= {
        "PERSISTENCE_MODULE": "hub.store:HubPostgresFactory",
        HubPostgresFactory.EXTRA_CONNINFO: json.dumps(extra),
        "POSTGRES_DBNAME": conninfo["dbname"],
        "POSTGRES_HOST": conninfo["host"],
        "POSTGRES_PORT": conninfo["port"],
        "POSTGRES_USER": conninfo["user"],
        "POSTGRES_PASSWORD": conninfo.get("password", ""),
        "POSTGRES_SCHEMA": settings.postgres_schema,
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_CONNECT_TIMEOUT": str(POOL_WAIT_S),  # (the pool's wait, not libpq's)
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",  # the function path skips our extra inserts
        "PROCESS_RECORDER_TOPIC": "hub.store:PostgresHubRecorder",
    }
    return env


def store_postgres_params(settings: Settings) -> dict[str, str]:
    """``postgres_params`` of the settings' DSN (``store = "postgres"``)."""
    if settings.postgres_dsn is None:  # (refused by the settings already)
        raise ValueError("store is 'postgres' but postgres_dsn is not set")
    return postgres_params(settings.postgres_dsn.get_secret_value())


def store_location(settings: Settings) -> str:
    """Where the store is, fit to print (no password)."""
    if settings.store == "sqlite":
        return str(settings.sqlite_path)
    params = store_postgres_params(settings)
    places = ", ".join(_where(h, p) for h, p in _servers(params))
    return f"PostgreSQL {places}, database {params['dbname']}, schema {settings.postgres_schema}"


def check_store(settings: Settings) -> None:
    """Raise ``StoreUnavailable`` if the settings' PostgreSQL does not answer (for a command
    that would otherwise wait on it). SQLite: nothing to check."""
    if settings.store == "postgres":
        check_postgres(store_postgres_params(settings))


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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _says_why_unavailable(
    method: Callable[Concatenate[EventStore, _P], _R],
) -> Callable[Concatenate[EventStore, _P], _R]:
    """A store call that failed (after the library's own retries) because PostgreSQL went away
    raises ``StoreUnavailable``, one line saying where and why, instead of the driver's error."""

    def call(store: EventStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(store, *args, **kwargs)
        except (LibraryOperationalError, LibraryInterfaceError) as failure:
            raise_if_unavailable(store._postgres, failure)
            raise

    functools.update_wrapper(call, method)
    return call


class EventStore:
    """What the hub does with its store, in the plant's terms. On PostgreSQL, a call that fails
    because the server went away raises ``StoreUnavailable``."""

    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        """Raises ``StoreUnavailable`` (within seconds) if the PostgreSQL of ``settings`` does
        not answer. ``read_only``: a store the hub has made already, opened to read it only (the
        API's read workers): no table is created or upgraded, and ``received_events`` is not
        for it."""
        environment = store_environment(settings)
        if read_only:
            environment["CREATE_TABLE"] = "n"
            # One read at a time: one connection (an API read worker would hold five idle).
            environment |= {"POSTGRES_POOL_SIZE": "1", "POSTGRES_MAX_OVERFLOW": "0"}
        self._postgres = store_postgres_params(settings) if settings.store == "postgres" else None
        if self._postgres is not None:
            check_postgres(self._postgres)
        self._app = HubApplication(env=environment)
        self._recorder = cast(HubRecorder, self._app.recorder)
        snapshots = self._app.snapshots
        assert snapshots is not None
        # Ingest writes snapshots in its own transaction, into the library's snapshot table.
        self._recorder.snapshots_table = getattr(snapshots.recorder, "events_table_name")  # noqa: B009
        self._read_only = read_only
        try:
            self._check_key(settings)
        except BaseException:
            self._app.close()
            raise
        until = None if read_only else self._recorder.upgrade_received_keys(_now_text())
        # Until when the received table held bare CloudEvent ids (None: never).
        self.legacy_received_until = datetime.fromisoformat(until) if until else None

    def _check_key(self, settings: Settings) -> None:
        """Refuse (``ConfigError``) a key this store cannot be read with, or a missing one. The
        first open of an empty store records how it is written; a store with events and no
        record was written before encryption existed: in plaintext."""
        cipher = self._app.mapper.cipher
        recorded = self._recorder.meta_value(KEY_CHECK)
        if recorded is None:
            written = bool(self._recorder.max_notification_id())
            value = KEY_CHECK_PLAINTEXT if written else key_check_value(cipher)
            if self._read_only:
                recorded = value if written else None  # (an empty store: nothing to check yet)
            else:
                recorded = self._recorder.add_meta(KEY_CHECK, value)
        refusal = None if recorded is None else key_refusal(recorded, cipher)
        if refusal is not None:
            where = f"event store {store_location(settings)}"
            raise ConfigError(where, ENCRYPTION_KEY_SETTING, refusal)

    @property
    def application(self) -> HubApplication:
        return self._app

    def close(self) -> None:
        self._app.close()

    # --- writing (the ingest worker is the only writer) --------------------------------------

    @_says_why_unavailable
    def tracking_position(self, tracking_name: str) -> int:
        return self._recorder.max_tracking_id(tracking_name) or 0

    @_says_why_unavailable
    def received_already(self, keys: Sequence[str]) -> set[str]:
        """Which of these dedupe keys the store has applied."""
        return self._recorder.received_already(keys) if keys else set()

    def received_events(
        self, events: Sequence[CloudEvent], legacy_margin_s: float = 0.0
    ) -> set[str]:
        """The dedupe keys of those ``events`` already applied. In a store upgraded from bare-id
        keys, an event dated up to the upgrade (plus ``legacy_margin_s``, the clock skew allowed)
        is also applied already if its bare id is among the old rows."""
        # (A read-only store did not read when the old rows end.)
        assert not self._read_only, "received_events needs a store opened to write"
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

    @_says_why_unavailable
    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these machines and orders the store has (one query, for a whole batch)."""
        return self._recorder.existing(aggregate_ids) if aggregate_ids else set()

    @_says_why_unavailable
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

    @_says_why_unavailable
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

    @_says_why_unavailable
    def machine_history(self, site: str, machine_id: str) -> list[Any]:
        """Every stored event of one machine, in the order it was recorded."""
        return self.history(machine_aggregate_id(site, machine_id))

    @_says_why_unavailable
    def history(self, aggregate_id: UUID) -> list[Any]:
        """Every stored event of one aggregate (a machine, an order), in the order recorded."""
        return list(self._app.events.get(aggregate_id))

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

    @_says_why_unavailable
    def machine_ids(self, site: str) -> list[str]:
        return [e.entity_id for e in self._recorder.entities("machine", site)]

    @_says_why_unavailable
    def machines(self, site: str | None = None) -> list[Machine]:
        found = (self.load(e.aggregate_id) for e in self._recorder.entities("machine", site))
        return [m for m in found if isinstance(m, Machine)]

    @_says_why_unavailable
    def orders(self, site: str | None = None) -> list[Order]:
        found = (self.load(e.aggregate_id) for e in self._recorder.entities("order", site))
        return [o for o in found if isinstance(o, Order)]

    # --- the notification log, as projections read it ---------------------------------------

    @_says_why_unavailable
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

    @_says_why_unavailable
    def events_at(self, positions: Sequence[int]) -> dict[int, Any]:
        """The stored events at ``positions``, decoded, by position (one query for a page of
        the audit log, however far apart its positions)."""
        decode = self._app.mapper.to_domain_event
        return {n.id: decode(n) for n in self._recorder.records_at(positions)} if positions else {}

    @_says_why_unavailable
    def aggregate_at(self, aggregate_id: UUID, version: int) -> Aggregate | None:
        """A machine, order or plant as it stood at ``version`` (from the snapshot before it and
        the events up to it), or None if it had not reached it."""
        try:
            found: object = self._app.repository.get(aggregate_id, version=version)
        except AggregateNotFoundError:
            return None
        return found if isinstance(found, Aggregate) and found.version == version else None

    @_says_why_unavailable
    def read_log(self, after: int, limit: int) -> list[tuple[int, Any]]:
        """Up to ``limit`` stored events after position ``after``, every one decoded, with its
        position (the replay export reads the whole log so)."""
        notifications = self._recorder.select_notifications(after, limit, inclusive_of_start=False)
        decode = self._app.mapper.to_domain_event
        return [(n.id, decode(n)) for n in notifications]

    @_says_why_unavailable
    def changed_machines(self, site: str, after: int, upto: int) -> set[str]:
        """The ids of ``site``'s machines with an event stored after position ``after`` and up
        to ``upto`` (what the floor's screens redraw; the events are not decoded)."""
        by_key: dict[object, str] = {
            machine_aggregate_id(site, m): m for m in self.machine_ids(site)
        }
        changed: set[str] = set()
        while after < upto:
            notifications = self._recorder.select_notifications(
                after, 10_000, stop=upto, inclusive_of_start=False
            )
            if not notifications:
                break
            for notification in notifications:
                machine_id = by_key.get(notification.originator_id)
                if machine_id is not None:
                    changed.add(machine_id)
            after = notifications[-1].id
        return changed

    @_says_why_unavailable
    def entities(self) -> list[Entity]:
        """Every machine, order, plant and webhook registry the store knows, on every site."""
        kinds = ("machine", "order", "plant", "webhooks")
        return [e for kind in kinds for e in self._recorder.entities(kind, None)]

    @_says_why_unavailable
    def last_position(self) -> int:
        """The position of the last stored event in the notification log (0 for an empty
        store). Not a count: PostgreSQL's positions may have gaps."""
        return self._recorder.max_notification_id() or 0
