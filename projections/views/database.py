"""Where the views live: a SQLite file beside the event store, or tables in PostgreSQL.

Views are disposable read models, so they get their own SQLite file: rebuilding one never
locks the event store that ingest is writing. On PostgreSQL they are ``mes_view_*`` tables in
the store's schema. Every view records how far it has read in ``mes_view_tracking``, in the
same transaction as its rows.

SQL is written once, with ``?`` placeholders and syntax both databases accept (``INSERT … ON
CONFLICT``); the PostgreSQL cursor translates the placeholders.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.sql import SQL, Identifier

from hub.store import (
    POOL_WAIT_S,
    OutageAwarePool,
    check_postgres,
    postgres_params,
    raise_if_unavailable,
)

TRACKING_TABLE = "mes_view_tracking"
_CREATE_TRACKING = (
    f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} (view TEXT PRIMARY KEY, position BIGINT NOT NULL)"
)


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    def fetchall(self) -> list[tuple[Any, ...]]: ...
    def fetchone(self) -> tuple[Any, ...] | None: ...


class ViewDatabase(Protocol):
    dialect: str  # "sqlite" or "postgres": the few DDL words that differ

    def transaction(self, write: bool = True) -> Any:
        """A context manager giving a ``Cursor``; commits on success, rolls back on error."""
        ...

    def close(self) -> None: ...


def ensure_tracking(db: ViewDatabase) -> None:
    with db.transaction() as cursor:
        cursor.execute(_CREATE_TRACKING)


def lock_tracking(cursor: Cursor, dialect: str) -> None:
    """Serialise writers of views: a rebuild and the live worker must not both read a position
    and then write on top of each other. (SQLite's BEGIN IMMEDIATE already does; PostgreSQL's
    READ COMMITTED does not.)"""
    if dialect == "postgres":
        cursor.execute(f"LOCK TABLE {TRACKING_TABLE} IN SHARE ROW EXCLUSIVE MODE")


def position_of(cursor: Cursor, view: str) -> int:
    cursor.execute(f"SELECT position FROM {TRACKING_TABLE} WHERE view = ?", (view,))
    rows = cursor.fetchall()
    return int(rows[0][0]) if rows else 0


def record_position(cursor: Cursor, view: str, position: int) -> None:
    cursor.execute(
        f"INSERT INTO {TRACKING_TABLE} (view, position) VALUES (?, ?) "
        "ON CONFLICT (view) DO UPDATE SET position = excluded.position",
        (view, position),
    )


class SQLiteViews:
    """Views in one SQLite file; one connection per thread (sqlite3 connections are not shared
    across threads), WAL so readers never wait for the projection writer."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun here, explicitly.
            connection = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            # Checkpoint the log every ~80 MB, not every 4 MB: a rebuild writes a lot at once.
            connection.execute("PRAGMA wal_autocheckpoint=20000")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Cursor]:
        connection = self._connection()
        cursor = connection.cursor()
        # A writer takes the lock up front: a deferred transaction that reads, then writes,
        # fails at once instead of waiting when another writer got in between.
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cursor
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


class _PostgresCursor:
    """A psycopg cursor taking the ``?`` placeholders the views' SQL is written with."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(sql.replace("?", "%s"), rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> tuple[Any, ...] | None:
        found = self._cursor.fetchone()
        return None if found is None else tuple(found)


class PostgresViews:
    """Views as tables in the store's PostgreSQL schema, through a small connection pool, with
    the connection parameters of the event store (``hub.store.postgres_params``). Raises
    ``hub.store.StoreUnavailable`` (within seconds) if the server does not answer at start, and
    from a transaction that failed because it went away."""

    dialect = "postgres"

    def __init__(self, conninfo: str, schema: str, pool_size: int = 4) -> None:
        def use_schema(connection: Any) -> None:
            # Quoted: a valid name may still be a reserved word ("order", "user").
            connection.execute(SQL("SET search_path TO {}").format(Identifier(schema)))
            connection.commit()

        self._params = postgres_params(conninfo)
        # Once, at once: an open pool would keep trying in the background, its caller waiting.
        check_postgres(self._params)
        self._pool: OutageAwarePool[psycopg.Connection[Any]] = OutageAwarePool(
            kwargs=dict(self._params),
            min_size=1,
            max_size=pool_size,
            configure=use_schema,
            open=True,
            timeout=POOL_WAIT_S,
            name="mes-hub views",
        )

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[_PostgresCursor]:
        try:
            with (
                self._pool.connection() as connection,
                connection.transaction(),
                connection.cursor() as cursor,
            ):
                if not write:
                    # A query reads several statements: one snapshot for all of them, as on
                    # SQLite.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield _PostgresCursor(cursor)
        except psycopg.OperationalError as failure:  # (PoolTimeout is one too)
            raise_if_unavailable(self._params, failure)
            raise

    def close(self) -> None:
        self._pool.close()
