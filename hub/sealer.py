"""The auditors' tamper evidence in the hub: the sealer that extends a Merkle tree over the log,
its signed checkpoints, and the proofs and the verification made from them.

The sealer follows the store's notification log like a view, never on the ingest path: it reads
the records after its position in batches, appends their leaves (``audit.bundle.record_leaf``) to
a compact tree and, in ONE transaction per batch, stores the leaf hashes, every perfect subtree
the batch completed, the compact tree and its position, and a checkpoint when one is due (every
``audit_checkpoint_every`` records, or ``audit_checkpoint_interval_s`` after the last one if the
log grew). A crash loses nothing and seals nothing twice: the next start resumes from the last
committed batch.

Its tables live in the event store's own database (the SQLite file, the PostgreSQL schema):

- ``mes_audit_leaves`` (leaf_index, position, hash): each sealed record's leaf hash;
- ``mes_audit_nodes`` (last_leaf, level, hash): each perfect subtree of 2**level leaves, keyed by
  its last leaf, so proofs read O(log² n) stored hashes at most instead of every leaf;
- ``mes_audit_state`` (name, value): the compact tree with its position (``tree``), and the public
  key the sealer signs with (``public_key``, recorded at its first start: a key other than the
  one the store's checkpoints were signed with is refused, never recorded over it);
- ``mes_audit_checkpoints`` (tree_size, root, position, signed_at, note): every signed checkpoint,
  so what the hub had sealed at any time stays provable.

The sealer creates them (``sealer_of``, where the hub starts); ``AuditLog`` only reads them, for
the API and the CLI: checkpoints (their size and root always from the signed note), inclusion
proofs (as evidence bundles), consistency proofs, and ``verify``, which recomputes the tree from
the stored records.

Errors::

    MesHubError
    └── AuditError            no such checkpoint, a position not sealed yet, nothing sealed yet
        ├── AuditMismatch     the stored log no longer matches what was sealed and signed
        └── SealerConflict    another sealer stored the batch first (read again, go on)
    ConfigError               the checkpoint key: missing, malformed, readable by others,
                              not the key the store's checkpoints were signed with
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from audit.bundle import Record, evidence_bundle, leaf_bytes, record_leaf_hash
from audit.merkle import (
    HASH_SIZE,
    CompactTree,
    ProofError,
    SubtreeSource,
    consistency_proof_from,
    inclusion_proof_from,
    leaf_hash,
    root_from,
    verify_consistency,
    verify_inclusion,
)
from audit.note import (
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    checkpoint_body,
    open_note,
    parse_checkpoint,
    sign_note,
)
from hub.errors import MesHubError
from hub.files import write_whole
from hub.nats_auth import write_private
from hub.settings import ConfigError, Settings
from hub.store import EventStore

log = logging.getLogger(__name__)

LEAVES, NODES, STATE, CHECKPOINTS = (
    "mes_audit_leaves",
    "mes_audit_nodes",
    "mes_audit_state",
    "mes_audit_checkpoints",
)
KEY_FILE, PUBLIC_KEY_FILE = "audit.key", "audit.vkey"  # in the data dir, when audit_key is unset
KEY_SETTING = "hub.audit_key"
SEAL_BATCH = 5_000
# While catching up, the sealer pauses this many times as long as each batch took (``Sealer.run``).
BACKLOG_PAUSE = 1.0
T = TypeVar("T")


class AuditError(MesHubError):
    """What was asked of the audit log does not exist (yet): a checkpoint, a sealed position."""


class AuditMismatch(AuditError):
    """The stored log no longer matches what the sealer sealed and signed."""


class SealerConflict(AuditError):
    """Another sealer stored what this one was about to (``mes-hub audit seal`` beside a hub)."""


# --- the checkpoint key ------------------------------------------------------------------------


def audit_origin(settings: Settings) -> str:
    """The checkpoints' origin line: ``audit_origin``, or ``mes-hub/<site>``."""
    return settings.audit_origin or f"mes-hub/{settings.site}"


def audit_signer(settings: Settings) -> NoteSigner:
    """The key that signs checkpoints: the ``audit_key`` file, or with none set, one made in
    the data dir on first use (mode 0600, its public key string beside it in ``audit.vkey``).
    ``ConfigError`` naming the file if it is missing, malformed or readable by others."""
    path = settings.audit_key
    made = False
    if path is None:
        path = settings.data_dir / KEY_FILE
        fresh = NoteSigner.generate(_key_name(audit_origin(settings)))
        # Exclusive: two starts at once must not each make a key and sign with both.
        made = write_private(path, fresh.key_string() + "\n", exclusive=True)
        if made:
            _synced(path)  # on disk before anything is signed with it
    signer = read_signer(path)
    if settings.audit_key is None:
        public = settings.data_dir / PUBLIC_KEY_FILE
        # Written afresh with a key made now: an older one's would fail every check.
        if made or not public.exists():
            write_whole(public, signer.verifier.key_string() + "\n")
            _synced(public)
    return signer


def _synced(path: Path) -> None:
    """Flush a file just made, and its directory entry, to disk: a key lost to a power cut
    after checkpoints were signed with it would leave them unverifiable."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        descriptor = os.open(target, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def audit_verifier(settings: Settings) -> NoteVerifier | None:
    """The public half of the checkpoint key of ``settings`` (None: the hub made none yet)."""
    path = settings.audit_key or settings.data_dir / KEY_FILE
    if settings.audit_key is None and not path.exists():
        return None
    return read_signer(path).verifier


def read_signer(path: Path) -> NoteSigner:
    """A note signer key file (Go's ``PRIVATE+KEY+…`` string), refused if it is readable by
    anyone but its owner."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(str(path), KEY_SETTING, "file not found") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(str(path), KEY_SETTING, "not a regular file")
    if mode & 0o077:
        raise ConfigError(
            str(path),
            KEY_SETTING,
            f"readable by group or others (mode {stat.S_IMODE(mode):04o}): "
            f"a signing key must be the owner's alone (chmod 600 {path})",
        )
    try:
        return NoteSigner.from_key_string(path.read_text(encoding="utf-8").strip())
    except (NoteError, UnicodeDecodeError) as failure:
        reason = str(failure) if isinstance(failure, NoteError) else "not UTF-8 text"
        raise ConfigError(
            str(path),
            KEY_SETTING,
            f"not an Ed25519 note signer key (PRIVATE+KEY+<name>+<id>+<key>): {reason}",
        ) from None


def _key_name(origin: str) -> str:
    # A note key's name may not hold spaces or "+"; an origin may.
    return re.sub(r"[\s+]", "-", origin)


# --- the tables --------------------------------------------------------------------------------


class _Database:
    """The event store's database, for the audit tables, through the store's own recorder (its
    connections, its reader-writer lock on SQLite). Statements are written with ``?`` and the
    table names in braces."""

    def __init__(self, store: EventStore, *, create: bool = False) -> None:
        recorder: Any = store.application.recorder
        self._create = create  # the sealer's: creates the tables; a reader's only reads
        self.recorder = recorder
        self._datastore = recorder.datastore
        self.schema: str | None = getattr(self._datastore, "schema", None)
        self.postgres = self.schema is not None
        self.events_table: str = recorder.events_table_name
        self._statements: dict[str, Any] = {}
        self._read_log: Any = None
        self._ready = False

    def sql(self, template: str) -> Any:
        found = self._statements.get(template)
        if found is None:
            names = {"leaves": LEAVES, "nodes": NODES, "state": STATE, "checkpoints": CHECKPOINTS}
            if self.schema is None:
                found = template.format(**names)
            else:
                from psycopg.sql import SQL, Identifier

                qualified = {k: Identifier(self.schema, v) for k, v in names.items()}
                found = SQL(template.replace("?", "%s")).format(**qualified)
            self._statements[template] = found
        return found

    def read_log(self, after: int, limit: int) -> list[LogRow]:
        """Up to ``limit`` records of the log after position ``after``, as their leaves need
        them. Read here rather than through the library's ``select_notifications``, which
        parses each id into a ``UUID`` and builds an object per record: a third of the
        sealer's time."""
        if self._read_log is None:
            columns = "originator_id, originator_version, topic, state"
            if self.schema is None:
                self._read_log = (
                    f"SELECT rowid, {columns} FROM {self.events_table} WHERE rowid > ? "
                    "ORDER BY rowid LIMIT ?"
                )
            else:
                from psycopg.sql import SQL, Identifier

                self._read_log = SQL(
                    f"SELECT notification_id, {columns} FROM {{table}} "
                    "WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
                ).format(table=Identifier(self.schema, self.events_table))
        with self._datastore.transaction(commit=False) as cursor:
            cursor.execute(self._read_log, (after, limit))
            rows = cursor.fetchall()
        if self.postgres:
            rows = [tuple(row.values()) for row in rows]
        return [
            (int(position), _id_bytes(originator), int(version), str(topic), _state_bytes(state))
            for position, originator, version, topic, state in rows
        ]

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_Cursor]:
        if self._create:
            self.ensure_tables()
        elif not self.has_tables():
            raise AuditError("nothing is sealed yet: the audit tables are not there")
        with self._datastore.transaction(commit=write) as cursor:
            yield _Cursor(self, cursor)

    def has_tables(self) -> bool:
        """Whether the audit tables are there (read only; once seen, not looked for again)."""
        if not self._ready:
            with self._datastore.transaction(commit=False) as cursor:
                self._ready = self._present(cursor) == 4
        return self._ready

    def _present(self, cursor: Any) -> int:
        if self.postgres:
            cursor.execute(
                "SELECT count(*) AS n FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = ANY(%s)",
                (self.schema, [LEAVES, NODES, STATE, CHECKPOINTS]),
            )
            return int(cursor.fetchone()["n"])
        cursor.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?, ?)",
            (LEAVES, NODES, STATE, CHECKPOINTS),
        )
        return int(cursor.fetchone()[0])

    def ensure_tables(self) -> None:
        """Create the tables if they are missing (the sealer's, at the hub's start: looked for
        first, as on PostgreSQL concurrent CREATE TABLE IF NOT EXISTS can collide)."""
        if self._ready:
            return
        with self._datastore.transaction(commit=True) as cursor:
            if self._present(cursor) < 4:
                blob = "BYTEA" if self.postgres else "BLOB"
                rowless = "" if self.postgres else " WITHOUT ROWID"
                key = "BIGINT" if self.postgres else "INTEGER"  # (SQLite's: the rowid itself)
                for template in (
                    "CREATE TABLE IF NOT EXISTS {leaves} "
                    f"(leaf_index {key} PRIMARY KEY, "
                    f"position BIGINT NOT NULL UNIQUE, hash {blob} NOT NULL)",
                    "CREATE TABLE IF NOT EXISTS {nodes} (last_leaf BIGINT NOT NULL, "
                    f"level INTEGER NOT NULL, hash {blob} NOT NULL, "
                    f"PRIMARY KEY (last_leaf, level)){rowless}",
                    "CREATE TABLE IF NOT EXISTS {state} (name TEXT PRIMARY KEY, "
                    f"value TEXT NOT NULL){rowless}",
                    "CREATE TABLE IF NOT EXISTS {checkpoints} (tree_size BIGINT PRIMARY KEY, "
                    f"root {blob} NOT NULL, position BIGINT NOT NULL, signed_at TEXT NOT NULL, "
                    "note TEXT NOT NULL)",
                ):
                    cursor.execute(self.sql(template))
        self._ready = True


class _Cursor:
    """A cursor of either backend giving plain tuples."""

    def __init__(self, db: _Database, cursor: Any) -> None:
        self._db, self._cursor = db, cursor

    def execute(self, template: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(self._db.sql(template), params)

    def executemany(self, template: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self._db.sql(template), rows)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [self._row(row) for row in self._cursor.fetchall()]

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else self._row(row)

    def _row(self, row: Any) -> tuple[Any, ...]:
        values = tuple(row.values()) if self._db.postgres else tuple(row)
        return tuple(bytes(v) if isinstance(v, memoryview) else v for v in values)


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as the hub keeps it: the tree size and root, the log position of its
    last leaf, when it was signed, and the signed note."""

    size: int
    root: bytes
    position: int
    signed_at: datetime
    note: str

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> StoredCheckpoint:
        """A stored row; ``AuditMismatch`` for one whose values are not a checkpoint's (SQLite
        keeps whatever was written into a column)."""
        size, root, position, signed_at, note = row
        if not isinstance(root, bytes | memoryview) or not (_is_int(size) and _is_int(position)):
            raise AuditMismatch(f"a stored checkpoint row is not one (size {size!r})")
        return cls(int(size), bytes(root), int(position), _signed_at(signed_at), str(note))


def _signed_at(value: Any) -> datetime:
    # Not signed (the note is): an unreadable one is shown as the epoch, not a traceback.
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


_CHECKPOINT_COLUMNS = "tree_size, root, position, signed_at, note"


@dataclass
class _Sealed:
    """The sealer's tree as committed: the compact tree and the log position of its last leaf."""

    tree: CompactTree
    position: int
    checkpoint_size: int
    signed_at: datetime | None = None  # when the last checkpoint was signed (None: never)

    def state_json(self) -> str:
        return json.dumps({**self.tree.to_dict(), "position": self.position})


def _read_state(cursor: _Cursor) -> _Sealed:
    cursor.execute("SELECT value FROM {state} WHERE name = ?", ("tree",))
    row = cursor.fetchone()
    if row is None:
        tree, position = CompactTree(), 0
    else:
        try:
            stored = json.loads(row[0])
            tree, position = CompactTree.from_dict(stored), int(stored["position"])
        except (ValueError, KeyError, TypeError, AttributeError) as failure:
            raise AuditMismatch(f"the sealer's stored state is unreadable: {failure}") from None
    cursor.execute("SELECT tree_size, signed_at FROM {checkpoints} ORDER BY tree_size DESC LIMIT 1")
    last = cursor.fetchone()
    if last is None:
        return _Sealed(tree, position, 0)
    return _Sealed(tree, position, int(last[0]), _signed_at(last[1]))


def record_of(notification: Any) -> Record:
    """A notification of the store's log as an ``audit.bundle.Record``."""
    originator = notification.originator_id
    return Record(
        position=int(notification.id),
        originator_id=originator if isinstance(originator, UUID) else UUID(str(originator)),
        originator_version=int(notification.originator_version),
        topic=str(notification.topic),
        state=_state_bytes(notification.state),
    )


# A record of the log as the sealer reads it: position, originator id (16 bytes), version,
# topic, stored bytes.
LogRow = tuple[int, bytes, int, str, bytes]


def _id_bytes(originator: Any) -> bytes:
    if isinstance(originator, UUID):
        return originator.bytes
    text = str(originator)
    try:
        # The hub's recorder stores the hex form; any other form the library accepts, parsed.
        return bytes.fromhex(text) if len(text) == 32 else UUID(text).bytes
    except ValueError:
        # Not an id the store could have written (edited behind its back): 16 bytes that stand
        # for it, so verify names its position instead of stopping there.
        return hashlib.sha256(text.encode("utf-8", "replace")).digest()[:16]


def _state_bytes(state: Any) -> bytes:
    if isinstance(state, str):  # (SQLite hands back text where someone wrote text)
        return state.encode("utf-8")
    return bytes(state)


def row_leaf_hash(row: LogRow) -> bytes:
    """The leaf hash of a record read by ``_Database.read_log`` (``record_leaf_hash``)."""
    return leaf_hash(leaf_bytes(*row))


# --- the sealer ---------------------------------------------------------------------------------


Clock = Callable[[], float]
WallClock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Sealer:
    """Extends the Merkle tree over the store's log and signs checkpoints (see the module's
    docstring). ``seal_batch`` and ``checkpoint_if_due`` are synchronous database work; ``run``
    calls them off the event loop until stopped."""

    def __init__(
        self,
        store: EventStore,
        signer: NoteSigner,
        origin: str,
        *,
        every: int = 10_000,
        interval_s: float = 60.0,
        batch: int = SEAL_BATCH,
        clock: Clock = time.monotonic,
        now: WallClock = _utc_now,
        kill_in_batch: int | None = None,
        key_file: Path | None = None,
    ) -> None:
        checkpoint_body(origin, 0, bytes(HASH_SIZE))  # refuses an origin no note could carry
        self._db = _Database(store, create=True)
        self._key_file = key_file  # (named when the key is refused)
        self._behind = False  # the last batch read as many records as it asked for
        self._signer, self._origin = signer, origin
        self._every, self._interval_s, self._batch = every, interval_s, batch
        self._clock, self._now = clock, now
        self._sealed: _Sealed | None = None  # None: read it again from the store
        self._last_signed: float | None = None  # on ``clock``; None: read with the state
        self._batches = 0
        # For the crash tests: the process kills itself inside this batch's transaction.
        self._kill_in_batch = kill_in_batch

    @property
    def size(self) -> int:
        return self._state().tree.size

    @property
    def position(self) -> int:
        return self._state().position

    def prepare(self) -> None:
        """Create the tables and record the public key the checkpoints are signed with; refuse
        (``ConfigError``) a key other than the one the store's checkpoints were signed with: a
        checkpoint signed by another would fail every verify (key rotation is not supported)."""
        verifier = self._signer.verifier
        ours = verifier.key_string()
        with self._db.transaction(write=True) as cursor:
            # (A write first, as in ``_commit``: the write lock before anything is read.)
            cursor.execute("UPDATE {state} SET value = value WHERE name = ?", ("public_key",))
            cursor.execute("SELECT value FROM {state} WHERE name = ?", ("public_key",))
            row = cursor.fetchone()
            recorded = None if row is None else str(row[0])
            cursor.execute("SELECT count(*) FROM {checkpoints}")
            count = int(cursor.fetchone()[0])  # type: ignore[index]
            cursor.execute("SELECT note FROM {checkpoints} ORDER BY tree_size DESC LIMIT 1")
            latest = cursor.fetchone()
            if latest is not None and recorded != ours:
                signed_by_ours = False
                if recorded is None:  # (not recorded: whose the checkpoints are, they tell)
                    with contextlib.suppress(NoteError):
                        signed_by_ours = bool(open_note(str(latest[0]), [verifier]))
                if not signed_by_ours:
                    raise ConfigError(
                        str(self._key_file or "the checkpoint key"),
                        KEY_SETTING,
                        f"the store holds {count} checkpoints signed with another key "
                        f"({recorded or 'not recorded'}), not this one ({ours}): use the key "
                        "file they were signed with (restore it from a backup); key rotation "
                        "is not supported",
                    )
            if recorded != ours:
                cursor.execute("DELETE FROM {state} WHERE name = ?", ("public_key",))
                cursor.execute(
                    "INSERT INTO {state} (name, value) VALUES (?, ?)", ("public_key", ours)
                )
        self._sealed = None

    def _state(self) -> _Sealed:
        sealed = self._sealed
        if sealed is None:
            with self._db.transaction(write=False) as cursor:
                sealed = self._sealed = _read_state(cursor)
            if self._last_signed is None:
                # The interval runs from the last checkpoint, even one signed before a restart;
                # with none yet, the first batch is signed at once.
                signed = sealed.signed_at
                ago = (self._now() - signed).total_seconds() if signed else float("inf")
                self._last_signed = self._clock() - max(ago, 0.0)
        return sealed

    def seal_batch(self) -> int:
        """Seal the next records of the log (up to a batch, and no further than the next
        checkpoint due by count), in one transaction; returns how many. Another sealer that
        sealed them first (``mes-hub audit seal`` beside a running hub) is no error: this one
        reads where that one stopped and goes on from there."""
        for attempt in range(1, 6):
            try:
                return self._seal_batch()
            except SealerConflict:
                if attempt == 5:
                    raise
        raise AssertionError("unreachable")

    def _seal_batch(self) -> int:
        sealed = self._state()
        limit = max(min(self._batch, self._every - (sealed.tree.size - sealed.checkpoint_size)), 1)
        rows = self._db.read_log(sealed.position, limit)
        # Behind whenever the read was full, even if a checkpoint due cut it below a batch.
        self._behind = len(rows) >= limit
        if not rows:
            return 0
        tree = CompactTree.from_dict(sealed.tree.to_dict())  # committed only with the batch
        leaves: list[tuple[int, int, bytes]] = []
        nodes: list[tuple[int, int, bytes]] = []
        for row in rows:
            index = tree.size
            value = row_leaf_hash(row)
            leaves.append((index, row[0], value))
            nodes.extend((index, node.level, node.hash) for node in tree.append(value))
        after = _Sealed(tree, rows[-1][0], sealed.checkpoint_size)
        due = tree.size - sealed.checkpoint_size >= self._every or self._interval_passed()
        self._commit(sealed, after, leaves, nodes, checkpoint=due)
        return len(rows)

    def checkpoint_if_due(self) -> bool:
        """Sign a checkpoint of the tree as it is if it grew since the last one and the
        interval has passed (the count is seen to by ``seal_batch``)."""
        sealed = self._state()
        if sealed.tree.size == sealed.checkpoint_size or not self._interval_passed():
            return False
        try:
            self._commit(sealed, sealed, [], [], checkpoint=True)
        except SealerConflict:
            return False  # another sealer moved on: the next round looks again
        return True

    def catch_up(self) -> int:
        """Seal everything stored so far, and sign it; returns how many records were sealed."""
        total = 0
        while added := self.seal_batch():
            total += added
        for attempt in range(1, 6):
            sealed = self._state()
            if sealed.tree.size == sealed.checkpoint_size:
                break
            try:
                self._commit(sealed, sealed, [], [], checkpoint=True)
            except SealerConflict:
                if attempt == 5:
                    raise
            else:
                break
        return total

    def _interval_passed(self) -> bool:
        last = self._last_signed
        return last is None or self._clock() - last >= self._interval_s

    def _commit(
        self,
        before: _Sealed,
        after: _Sealed,
        leaves: Sequence[tuple[int, int, bytes]],
        nodes: Sequence[tuple[int, int, bytes]],
        *,
        checkpoint: bool,
    ) -> None:
        note = None
        if checkpoint:
            root = after.tree.root()
            note = sign_note(checkpoint_body(self._origin, after.tree.size, root), self._signer)
        try:
            with self._db.transaction(write=True) as cursor:
                # A write first: it takes the database's write lock (SQLite) or the state row's
                # (PostgreSQL) before the state is read, so another sealer's commit waits for
                # this one, or this one sees it, rather than failing halfway.
                cursor.execute("UPDATE {state} SET value = value WHERE name = ?", ("tree",))
                stored = _read_state(cursor)
                if (stored.tree.size, stored.position, stored.checkpoint_size) != (
                    before.tree.size,
                    before.position,
                    before.checkpoint_size,
                ):
                    # Another sealer moved on meanwhile: this batch is not ours to store.
                    raise SealerConflict(
                        f"the sealed tree is at {stored.tree.size} leaves, not "
                        f"{before.tree.size}: another sealer is running"
                    )
                cursor.executemany(
                    "INSERT INTO {leaves} (leaf_index, position, hash) VALUES (?, ?, ?)", leaves
                )
                cursor.executemany(
                    "INSERT INTO {nodes} (last_leaf, level, hash) VALUES (?, ?, ?)", nodes
                )
                cursor.execute("DELETE FROM {state} WHERE name = ?", ("tree",))
                cursor.execute(
                    "INSERT INTO {state} (name, value) VALUES (?, ?)", ("tree", after.state_json())
                )
                if note is not None:
                    cursor.execute(
                        f"INSERT INTO {{checkpoints}} ({_CHECKPOINT_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            after.tree.size,
                            after.tree.root(),
                            after.position,
                            self._now().isoformat(),
                            note,
                        ),
                    )
                self._batches += 1
                if self._kill_in_batch is not None and self._batches >= self._kill_in_batch:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-transaction: nothing of it stays
        except BaseException as failure:
            self._sealed = None  # read again from the store: it holds what was committed
            if _is_duplicate(failure):
                # Another sealer committed the same leaves (or checkpoint) first.
                raise SealerConflict(
                    f"another sealer sealed the same records first: {failure}"
                ) from failure
            raise
        if note is not None:
            after = _Sealed(after.tree, after.position, after.tree.size)
            self._last_signed = self._clock()
        self._sealed = after

    async def run(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Seal the log as it grows until ``stop`` is set; a failed round (the database went
        away) is logged and tried again, waiting longer each time up to 30 s.

        Behind (its last read came back full, even one cut short by a checkpoint due: a
        first start on a full store, a restart after a long stop), it pauses after each batch
        for ``BACKLOG_PAUSE`` times as long as the batch took: ingest shares this process'
        interpreter and, on SQLite, the database's one writer with it, and must not wait on the
        sealer catching up (measured in bench/audit.py)."""
        loop = asyncio.get_running_loop()
        backoff = 1.0
        prepared = False
        while not stop.is_set():
            started = loop.time()
            try:
                if not prepared:
                    await asyncio.to_thread(self.prepare)
                    prepared = True
                added = await asyncio.to_thread(self.seal_batch)
                if not added:
                    await asyncio.to_thread(self.checkpoint_if_due)
                backoff = 1.0
            except SealerConflict:
                # Another sealer keeps storing first (``mes-hub audit seal`` beside the hub):
                # no failure; look again soon, from where it got to.
                log.info("another sealer is sealing this store too")
                added, wait = 0, poll_s
            except Exception:
                log.exception("the audit sealer failed; trying again in %.0f s", backoff)
                added, wait = 0, backoff
                backoff = min(backoff * 2, 30.0)
            else:
                wait = poll_s
            if added and self._behind:  # (a partial read: caught up, look again in poll_s)
                wait = (loop.time() - started) * BACKLOG_PAUSE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


def sealer_of(settings: Settings, store: EventStore, **options: Any) -> Sealer:
    """The sealer of ``settings``, prepared (``Sealer.prepare``: its tables made, here where the
    hub starts, before anything reads them): its key (``audit_signer``, which refuses a bad
    one; refused too if the store's checkpoints were signed with another), origin and
    checkpoint cadence."""
    path = settings.audit_key or settings.data_dir / KEY_FILE
    if settings.audit_key is None and not path.exists():
        # A new key would be made: not for a store whose checkpoints another key signed.
        try:
            signed = AuditLog(store).checkpoints(limit=1, checked=False)
        except AuditError:
            signed = []  # (no tables yet: nothing sealed)
        if signed:
            raise ConfigError(
                str(path),
                KEY_SETTING,
                "file not found, and the store holds checkpoints signed with it: restore the "
                "key file they were signed with (a new key would not verify them; key rotation "
                "is not supported)",
            )
    sealer = Sealer(
        store,
        audit_signer(settings),
        audit_origin(settings),
        every=settings.audit_checkpoint_every,
        interval_s=settings.audit_checkpoint_interval_s,
        key_file=path,
        **options,
    )
    sealer.prepare()
    return sealer


def _is_duplicate(failure: BaseException) -> bool:
    """Whether ``failure`` is a unique key refused (either backend, through the library)."""
    seen: BaseException | None = failure
    for _ in range(10):  # (a chain of causes, not a cycle of them)
        if seen is None:
            break
        if type(seen).__name__ in ("IntegrityError", "UniqueViolation"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --- reading: checkpoints, proofs, verify ------------------------------------------------------


@dataclass(frozen=True)
class ConsistencyProof:
    """That the tree of ``first`` is a prefix of the tree of ``second``; checked already."""

    first_size: int
    first_root: bytes
    second: StoredCheckpoint
    proof: list[bytes]


@dataclass(frozen=True)
class Finding:
    """What no longer matches: a log position, or a checkpoint (its tree size), and why."""

    # "position", "checkpoint", "tree" (a stored subtree node), "state" (the sealer's), or "key"
    # (the store records another public key than the one checked with)
    what: str
    at: int
    reason: str


@dataclass
class VerifyReport:
    """What ``AuditLog.verify`` found: ``ok`` when every record, leaf and checkpoint matched."""

    records: int = 0  # records read and compared with their sealed leaves
    sealed: int = 0  # the sealed tree's size
    unsealed: int = 0  # records stored after the last sealed one (not yet sealed)
    checkpoints: int = 0
    bad_position: Finding | None = None
    bad_checkpoint: Finding | None = None
    problems: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def found(self, finding: Finding) -> None:
        self.problems.append(finding)
        if finding.what == "position" and self.bad_position is None:
            self.bad_position = finding
        if finding.what == "checkpoint" and self.bad_checkpoint is None:
            self.bad_checkpoint = finding

    def to_json(self) -> dict[str, Any]:
        def described(finding: Finding | None) -> dict[str, Any] | None:
            return None if finding is None else {"at": finding.at, "reason": finding.reason}

        return {
            "ok": self.ok,
            "records": self.records,
            "sealed": self.sealed,
            "unsealed": self.unsealed,
            "checkpoints": self.checkpoints,
            "first_bad_position": described(self.bad_position),
            "first_bad_checkpoint": described(self.bad_checkpoint),
            "problems": [{"what": p.what, "at": p.at, "reason": p.reason} for p in self.problems],
        }


Progress = Callable[[int, int], None]  # (position read, last position of the log)


class _Wanted:
    """A ``SubtreeSource`` that only notes which subtrees a proof needs (the proofs' shape does
    not depend on the hashes), so they are read in two queries, not one each."""

    def __init__(self) -> None:
        self.keys: set[tuple[int, int]] = set()

    def perfect(self, level: int, index: int) -> bytes:
        self.keys.add((level, index))
        return bytes(HASH_SIZE)


class _Known:
    def __init__(self, hashes: dict[tuple[int, int], bytes]) -> None:
        self._hashes = hashes

    def perfect(self, level: int, index: int) -> bytes:
        found = self._hashes.get((level, index))
        if found is None:
            raise AuditMismatch(f"the stored tree has no subtree at level {level}, index {index}")
        return found


class AuditLog:
    """The sealed tree and its checkpoints, read for the API and the CLI: read only (the sealer
    makes the tables where the hub starts; without them, ``AuditError``: nothing sealed yet).
    Synchronous: async callers run it in a thread.

    ``verifier``: the key the caller trusts (the hub's configured key, an auditor's copy). A
    checkpoint's size and root are always those of its signed note, opened with it, never the
    ``tree_size`` and ``root`` columns: a row whose columns disagree with its note, or whose
    note does not verify, is refused (``AuditMismatch``). Without one the note is read
    unchecked (the hub's own references to its latest checkpoint)."""

    def __init__(
        self, store: EventStore, batch: int = SEAL_BATCH, *, verifier: NoteVerifier | None = None
    ) -> None:
        self._db = _Database(store)
        self._batch = batch
        self._verifier = verifier

    # --- checkpoints ---

    def public_key(self) -> str | None:
        """The key string the sealer records it signs with (at its first start)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute("SELECT value FROM {state} WHERE name = ?", ("public_key",))
            row = cursor.fetchone()
        return None if row is None else str(row[0])

    def sealed_size(self) -> int:
        with self._db.transaction(write=False) as cursor:
            return _read_state(cursor).tree.size

    def checkpoints(
        self, before: int | None = None, limit: int = 100, *, checked: bool = True
    ) -> list[StoredCheckpoint]:
        """The checkpoints, newest first, of sizes below ``before`` (all by default); each
        checked against its note (``checked=False``: the rows as stored)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} WHERE tree_size < ? "
                "ORDER BY tree_size DESC LIMIT ?",
                (before if before is not None else 2**62, limit),
            )
            found = [StoredCheckpoint.of(row) for row in cursor.fetchall()]
        return [self._signed(c) for c in found] if checked else found

    def all_checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint, oldest first, each checked against its note."""
        return [self._signed(c) for c in self._checkpoint_rows()]

    def checkpoint(self, size: int | None = None) -> StoredCheckpoint:
        """The checkpoint of ``size`` leaves, or the latest, checked against its note;
        ``AuditError`` if there is none."""
        found = self._stored_checkpoint(size)
        if found is None:
            raise AuditError(
                "no checkpoint signed yet" if size is None else f"no checkpoint of size {size}"
            )
        return self._signed(found)

    def _stored_checkpoint(self, size: int | None) -> StoredCheckpoint | None:
        with self._db.transaction(write=False) as cursor:
            if size is None:
                cursor.execute(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} "
                    "ORDER BY tree_size DESC LIMIT 1"
                )
            else:
                cursor.execute(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} WHERE tree_size = ?",
                    (size,),
                )
            row = cursor.fetchone()
        return None if row is None else StoredCheckpoint.of(row)

    def _signed(self, stored: StoredCheckpoint) -> StoredCheckpoint:
        """``stored`` with the size and root of its note (opened with the trusted key);
        ``AuditMismatch`` if the note does not verify or its columns say otherwise."""
        try:
            signed = _note_checkpoint(stored.note, self._verifier)
        except NoteError as failure:
            raise AuditMismatch(
                f"the checkpoint stored as size {stored.size}: its signed note: {failure}"
            ) from None
        if (signed.size, signed.root_hash) != (stored.size, stored.root):
            raise AuditMismatch(
                f"the checkpoint stored as size {stored.size}: its size or root column is not "
                f"its signed note's (size {signed.size})"
            )
        return StoredCheckpoint(
            signed.size, signed.root_hash, stored.position, stored.signed_at, stored.note
        )

    def _checkpoint_rows(
        self, page: int = 500, until: int | None = None, findings: VerifyReport | None = None
    ) -> Iterator[StoredCheckpoint]:
        """The checkpoints as stored, oldest first, read ``page`` at a time (up to size
        ``until``). A row that is not even a checkpoint's shape (a value of another type) is a
        finding of ``findings``, or ``AuditMismatch`` without it."""
        after = -1
        limit = until if until is not None else 2**62
        while True:
            with self._db.transaction(write=False) as cursor:
                cursor.execute(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} WHERE tree_size > ? "
                    "AND tree_size <= ? ORDER BY tree_size LIMIT ?",
                    (after, limit, page),
                )
                raw = cursor.fetchall()
            for row in raw:
                try:
                    yield StoredCheckpoint.of(row)
                except AuditMismatch as failure:
                    if findings is None:
                        raise
                    findings.found(Finding("checkpoint", 0, str(failure)))
            if len(raw) < page:
                return
            try:
                after = int(raw[-1][0])
            except (TypeError, ValueError):
                return

    # --- proofs ---

    def record(self, position: int) -> Record:
        """The stored record at ``position``; ``AuditError`` if there is none."""
        found = self._db.recorder.select_notifications(position, 1, inclusive_of_start=True)
        if not found or int(found[0].id) != position:
            raise AuditError(f"no stored event at position {position}")
        return record_of(found[0])

    def evidence(
        self, position: int, public_key: str, tree_size: int | None = None
    ) -> dict[str, Any]:
        """The evidence bundle (``audit.bundle``) of the record at ``position`` against the
        checkpoint of ``tree_size`` (the latest by default), checked before it is given: the
        stored record's leaf, through the stored tree, to the signed root."""
        checkpoint = self.checkpoint(tree_size)
        record = self.record(position)
        with self._db.transaction(write=False) as cursor:
            cursor.execute("SELECT leaf_index, hash FROM {leaves} WHERE position = ?", (position,))
            row = cursor.fetchone()
        if row is None:
            raise AuditError(f"position {position} is not sealed yet")
        index = int(row[0])
        if index >= checkpoint.size:
            raise AuditError(
                f"position {position} (leaf {index}) is not in the checkpoint of size "
                f"{checkpoint.size}: a later checkpoint holds it"
            )
        proof = self._proof(lambda source: inclusion_proof_from(source, index, checkpoint.size))
        try:
            verify_inclusion(
                record_leaf_hash(record), index, checkpoint.size, proof, checkpoint.root
            )
        except ProofError as failure:
            raise AuditMismatch(
                f"position {position} no longer matches the checkpoint of size "
                f"{checkpoint.size}: {failure}"
            ) from None
        return evidence_bundle(record, index, checkpoint.size, proof, checkpoint.note, public_key)

    def consistency(self, first: int, second: int | None = None) -> ConsistencyProof:
        """The proof that the tree of ``first`` leaves is a prefix of the checkpoint of
        ``second`` (the latest by default), checked against both roots: the signed one of a
        checkpoint of ``first`` leaves, else the stored tree's (an auditor compares it with the
        root they hold, as RFC 6962's get-sth-consistency takes any first size)."""
        stored = self._stored_checkpoint(first)
        if stored is not None:
            root = self._signed(stored).root
        else:
            later = self.checkpoint(second)
            if not 1 <= first <= later.size:
                raise AuditError(f"no tree of {first} leaves before the checkpoint of {later.size}")
            root = self._proof(lambda source: root_from(source, first))
        return self.consistency_with(first, root, second)

    def consistency_with(
        self, size: int, root: bytes, second: int | None = None
    ) -> ConsistencyProof:
        """The proof that a tree of ``size`` leaves with ``root`` (an auditor's checkpoint) is a
        prefix of the checkpoint of ``second`` (the latest by default); ``AuditMismatch`` if it
        is not."""
        later = self.checkpoint(second)
        if size > later.size:
            raise AuditMismatch(
                f"the tree of {size} leaves is larger than the checkpoint of {later.size}: the "
                "log was cut back"
            )
        if size < 1:
            raise AuditError("a consistency proof starts from a tree of one leaf or more")
        proof = self._proof(lambda source: consistency_proof_from(source, size, later.size))
        try:
            verify_consistency(size, later.size, proof, root, later.root)
        except ProofError as failure:
            raise AuditMismatch(
                f"the tree of {size} leaves is not a prefix of the checkpoint of {later.size}: "
                f"{failure}"
            ) from None
        return ConsistencyProof(size, root, later, proof)

    def _proof(self, make: Callable[[SubtreeSource], T]) -> T:
        wanted = _Wanted()
        make(wanted)
        leaves = sorted(index for level, index in wanted.keys if level == 0)
        # A node is stored under its last leaf: ((index + 1) << level) - 1.
        nodes = {(((index + 1) << level) - 1, level) for level, index in wanted.keys if level}
        found: dict[tuple[int, int], bytes] = {}
        with self._db.transaction(write=False) as cursor:
            for chunk in _chunks(leaves, 500):
                cursor.execute(
                    "SELECT leaf_index, hash FROM {leaves} WHERE leaf_index IN "
                    f"({', '.join('?' * len(chunk))})",
                    chunk,
                )
                found.update(((0, int(i)), bytes(h)) for i, h in cursor.fetchall())
            for chunk in _chunks(sorted({last for last, _ in nodes}), 500):
                cursor.execute(
                    "SELECT last_leaf, level, hash FROM {nodes} WHERE last_leaf IN "
                    f"({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for last, level, value in cursor.fetchall():
                    if (int(last), int(level)) in nodes:
                        found[(int(level), ((int(last) + 1) >> int(level)) - 1)] = bytes(value)
        return make(_Known(found))

    # --- verify ---

    def verify(self, verifier: NoteVerifier, progress: Progress | None = None) -> VerifyReport:
        """Recompute the tree from the stored records and compare: each record's leaf with the
        sealed one (naming the first position that no longer matches: an edited byte, a deleted
        event, two events swapped), each stored subtree node with the one the leaves make, each
        checkpoint's signature by ``verifier`` and the root of its signed note with the
        recomputed one at its size. Nothing stored is trusted for what to check: the sealed size
        is the largest of the sealer's state, the stored leaves and the checkpoints, and a
        checkpoint larger than the records recomputed covers records that are not there."""
        report = VerifyReport()
        recorded = self.public_key()
        if recorded is not None and recorded != verifier.key_string():
            report.found(
                Finding(
                    "key",
                    0,
                    f"the store records another public key ({recorded}) than the one checked "
                    f"with ({verifier.key_string()}): checkpoints signed again, or a key replaced",
                )
            )
        # One consistent reading of the state and the extent, while a hub may go on sealing:
        # read again until the extent did not move around the state.
        for _ in range(20):
            extent = self._extent()
            state = self._stored_state(report)
            if self._extent() == extent:
                break
            report.problems = [p for p in report.problems if p.what != "state"]
        leaves, leaves_end, largest = extent
        sealed = max(leaves_end, largest, state.tree.size if state is not None else 0)
        report.sealed = sealed
        if state is not None and (state.tree.size != leaves_end or leaves != leaves_end):
            report.found(
                Finding(
                    "state",
                    state.tree.size,
                    f"the sealer's state says {state.tree.size} sealed leaves; the store holds "
                    f"{leaves} (up to leaf #{leaves_end - 1})",
                )
            )
        due = _Due(self._signed_rows(verifier, report, largest))
        complete = self._verify_records(due, sealed, state, report, progress)
        for stored in due.rest():
            if complete:  # (after a bad position the tree recomputed is not the sealed one)
                report.found(
                    Finding(
                        "checkpoint",
                        stored.size,
                        f"it covers records that are not there: the log holds "
                        f"{report.records + report.unsealed} records",
                    )
                )
        return report

    def _stored_state(self, report: VerifyReport) -> _Sealed | None:
        try:
            with self._db.transaction(write=False) as cursor:
                return _read_state(cursor)
        except AuditMismatch as failure:
            report.found(Finding("state", 0, str(failure)))
            return None

    def _extent(self) -> tuple[int, int, int]:
        """How many leaves are stored, one past the last leaf's index, the largest checkpoint's
        size."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute("SELECT count(*), max(leaf_index) FROM {leaves}")
            count, last = cursor.fetchone() or (0, None)
            cursor.execute("SELECT max(tree_size) FROM {checkpoints}")
            (largest,) = cursor.fetchone() or (None,)
        return int(count), (int(last) + 1 if last is not None else 0), int(largest or 0)

    def _signed_rows(
        self, verifier: NoteVerifier, report: VerifyReport, until: int
    ) -> Iterator[StoredCheckpoint]:
        """The checkpoints up to size ``until`` (those signed before verify began), in size
        order, whose note ``verifier`` checks and whose columns are the note's; a finding for
        each other."""
        for stored in self._checkpoint_rows(until=until, findings=report):
            report.checkpoints += 1
            try:
                signed = _note_checkpoint(stored.note, verifier)
            except NoteError as failure:
                report.found(Finding("checkpoint", stored.size, f"its signature: {failure}"))
                continue
            if (signed.size, signed.root_hash) != (stored.size, stored.root):
                reason = "its stored size or root is not the signed one"
                report.found(Finding("checkpoint", stored.size, reason))
                continue
            yield stored

    def _verify_records(
        self,
        due: _Due,
        sealed: int,
        state: _Sealed | None,
        report: VerifyReport,
        progress: Progress | None,
    ) -> bool:
        """Every record against its sealed leaf, and each checkpoint due at its size; whether
        it read to the end (False: it stopped at a position that no longer matches)."""
        last = int(self._db.recorder.max_notification_id() or 0)
        tree = CompactTree()
        after = 0
        previous_checkpoint = 0
        while True:
            rows = self._db.read_log(after, self._batch)
            if not rows:
                break
            start = tree.size
            stored = self._stored_leaves(start, start + len(rows))
            stored_nodes = self._stored_nodes(start, start + len(rows))
            for row in rows:
                index = tree.size
                if index >= sealed:
                    report.unsealed += 1
                    continue
                leaf = stored.get(index)
                position = row[0]
                if leaf is None:
                    report.found(
                        Finding("position", position, f"its sealed leaf #{index} is missing")
                    )
                    return False
                if position != leaf[0]:
                    if position > leaf[0]:
                        reason = "the sealed event at this position is missing (deleted)"
                        report.found(Finding("position", leaf[0], reason))
                    else:
                        reason = f"not the event sealed as leaf #{index} (position {leaf[0]})"
                        report.found(Finding("position", position, reason))
                    return False
                try:
                    recomputed = row_leaf_hash(row)
                except (TypeError, ValueError):  # (a value no record can have: tampered)
                    recomputed = b""
                if recomputed != leaf[1]:
                    reason = (
                        "its stored record no longer matches its sealed leaf (edited or swapped)"
                    )
                    report.found(Finding("position", position, reason))
                    return False
                for node in tree.append(leaf[1]):
                    if stored_nodes.get((index, node.level)) != node.hash:
                        # A proof through it would not check, though every record does.
                        first = index + 1 - (1 << node.level)
                        reason = (
                            f"the stored tree node over leaves {first} to {index} (level "
                            f"{node.level}, ending at this position) is not the one they make"
                        )
                        report.found(Finding("tree", position, reason))
                report.records += 1
                if state is not None and state.tree.size == tree.size:
                    same = state.tree.root() == tree.root()
                    if not same:
                        reason = "the sealer's state holds another tree than the records make"
                        report.found(Finding("state", tree.size, reason))
                while (checkpoint := due.peek()) is not None and checkpoint.size <= tree.size:
                    due.take()
                    if tree.root() != checkpoint.root or checkpoint.size != tree.size:
                        reason = (
                            "the stored records give another root at this size (changed between "
                            f"positions after {previous_checkpoint} and {position})"
                        )
                        report.found(Finding("checkpoint", checkpoint.size, reason))
                    previous_checkpoint = checkpoint.position
            after = rows[-1][0]
            if progress is not None:
                progress(after, max(last, after))
        if tree.size < sealed and report.bad_position is None:
            leaf = self._stored_leaves(tree.size, tree.size + 1).get(tree.size)
            at = leaf[0] if leaf is not None else after + 1
            report.found(
                Finding("position", at, "the sealed event at this position is missing (deleted)")
            )
        return True

    def _stored_nodes(self, start: int, end: int) -> dict[tuple[int, int], bytes]:
        """The stored subtree nodes whose last leaf is in ``start``..``end - 1``."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                "SELECT last_leaf, level, hash FROM {nodes} WHERE last_leaf >= ? AND last_leaf < ?",
                (start, end),
            )
            return {
                (int(last), int(level)): _blob(h)
                for last, level, h in cursor.fetchall()
                if _is_int(last) and _is_int(level)
            }

    def _stored_leaves(self, start: int, end: int) -> dict[int, tuple[int, bytes]]:
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                "SELECT leaf_index, position, hash FROM {leaves} "
                "WHERE leaf_index >= ? AND leaf_index < ?",
                (start, end),
            )
            # (A value of another type, as SQLite keeps whatever was written: a mismatch.)
            return {
                int(i): (int(p) if _is_int(p) else -1, _blob(h))
                for i, p, h in cursor.fetchall()
                if _is_int(i)
            }


class _Due:
    """The checkpoints still to be compared, in size order, one looked at ahead."""

    def __init__(self, checkpoints: Iterator[StoredCheckpoint]) -> None:
        self._checkpoints = checkpoints
        self._next: StoredCheckpoint | None = None
        self._looked = False

    def peek(self) -> StoredCheckpoint | None:
        if not self._looked:
            self._next = next(self._checkpoints, None)
            self._looked = True
        return self._next

    def take(self) -> None:
        self._looked = False

    def rest(self) -> Iterator[StoredCheckpoint]:
        if (pending := self.peek()) is not None:
            yield pending
        yield from self._checkpoints


def _note_checkpoint(note: str, verifier: NoteVerifier | None) -> Checkpoint:
    """The checkpoint of a stored note: opened with ``verifier``, or with none, read unchecked."""
    if verifier is not None:
        return parse_checkpoint(open_note(note, [verifier]))
    return parse_checkpoint(note[: note.rfind("\n\n") + 1])


def _blob(value: object) -> bytes:
    """A stored hash; empty (matching nothing) for a value of another type."""
    return bytes(value) if isinstance(value, bytes | memoryview) else b""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chunks(values: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def checked_checkpoint(note: str, verifier: NoteVerifier) -> Checkpoint:
    """The checkpoint in ``note`` once ``verifier`` checked its signature (``NoteError``)."""
    return parse_checkpoint(open_note(note, [verifier]))


def checkpoint_reference(source: AuditLog | EventStore) -> str | None:
    """The latest signed checkpoint as the hub hands it to ERPs and partners (in each production
    confirmation and webhook payload): ``<origin> <size> <base64 root>``, the first three lines of
    the checkpoint note joined by spaces (the origin may hold spaces: split from the right), or
    None while no checkpoint is signed. Whoever keeps it can later ask an auditor for the
    consistency proof from ``size`` to a newer checkpoint (``GET /api/v1/audit/proofs/consistency
    ?from=<size>``) and check that the tree of ``size`` leaves still has this root."""
    audit = source if isinstance(source, AuditLog) else AuditLog(source)
    try:
        latest = audit.checkpoint()
    except AuditError:
        return None
    return " ".join(latest.note.split("\n", 3)[:3])
