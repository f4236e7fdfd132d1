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
  key the sealer signs with (``public_key``), for the API;
- ``mes_audit_checkpoints`` (tree_size, root, position, signed_at, note): every signed checkpoint,
  so what the hub had sealed at any time stays provable.

``AuditLog`` reads them for the API and the CLI: checkpoints, inclusion proofs (as evidence
bundles), consistency proofs, and ``verify``, which recomputes the tree from the stored records.

Errors::

    MesHubError
    └── AuditError            no such checkpoint, a position not sealed yet
        └── AuditMismatch     the stored log no longer matches what was sealed and signed
    ConfigError               the checkpoint key: missing, malformed, readable by others
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


# --- the checkpoint key ------------------------------------------------------------------------


def audit_origin(settings: Settings) -> str:
    """The checkpoints' origin line: ``audit_origin``, or ``mes-hub/<site>``."""
    return settings.audit_origin or f"mes-hub/{settings.site}"


def audit_signer(settings: Settings) -> NoteSigner:
    """The key that signs checkpoints: the ``audit_key`` file, or with none set, one made in
    the data dir on first use (mode 0600, its public key string beside it in ``audit.vkey``).
    ``ConfigError`` naming the file if it is missing, malformed or readable by others."""
    path = settings.audit_key
    if path is None:
        path = settings.data_dir / KEY_FILE
        fresh = NoteSigner.generate(_key_name(audit_origin(settings)))
        # Exclusive: two starts at once must not each make a key and sign with both.
        write_private(path, fresh.key_string() + "\n", exclusive=True)
    signer = read_signer(path)
    if settings.audit_key is None:
        public = settings.data_dir / PUBLIC_KEY_FILE
        if not public.exists():
            write_whole(public, signer.verifier.key_string() + "\n")
    return signer


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

    def __init__(self, store: EventStore) -> None:
        recorder: Any = store.application.recorder
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
        self.ensure_tables()
        with self._datastore.transaction(commit=write) as cursor:
            yield _Cursor(self, cursor)

    def ensure_tables(self) -> None:
        """Create the tables if they are missing (looked for first: on PostgreSQL, concurrent
        CREATE TABLE IF NOT EXISTS can collide)."""
        if self._ready:
            return
        with self._datastore.transaction(commit=True) as cursor:
            if self.postgres:
                cursor.execute(
                    "SELECT count(*) AS n FROM information_schema.tables "
                    "WHERE table_schema = %s AND table_name = ANY(%s)",
                    (self.schema, [LEAVES, NODES, STATE, CHECKPOINTS]),
                )
                present = int(cursor.fetchone()["n"])
            else:
                cursor.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                    "(?, ?, ?, ?)",
                    (LEAVES, NODES, STATE, CHECKPOINTS),
                )
                present = int(cursor.fetchone()[0])
            if present < 4:
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
        size, root, position, signed_at, note = row
        return cls(int(size), bytes(root), int(position), datetime.fromisoformat(signed_at), note)


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
        stored = json.loads(row[0])
        tree, position = CompactTree.from_dict(stored), int(stored["position"])
    cursor.execute("SELECT tree_size, signed_at FROM {checkpoints} ORDER BY tree_size DESC LIMIT 1")
    last = cursor.fetchone()
    if last is None:
        return _Sealed(tree, position, 0)
    return _Sealed(tree, position, int(last[0]), datetime.fromisoformat(last[1]))


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
    ) -> None:
        checkpoint_body(origin, 0, bytes(HASH_SIZE))  # refuses an origin no note could carry
        self._db = _Database(store)
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
        """Create the tables and record the public key the checkpoints are signed with."""
        with self._db.transaction(write=True) as cursor:
            cursor.execute("DELETE FROM {state} WHERE name = ?", ("public_key",))
            cursor.execute(
                "INSERT INTO {state} (name, value) VALUES (?, ?)",
                ("public_key", self._signer.verifier.key_string()),
            )
        self._sealed = None

    def _state(self) -> _Sealed:
        if self._sealed is None:
            with self._db.transaction(write=False) as cursor:
                self._sealed = _read_state(cursor)
            if self._last_signed is None:
                # The interval runs from the last checkpoint, even one signed before a restart;
                # with none yet, the first batch is signed at once.
                signed = self._sealed.signed_at
                ago = (self._now() - signed).total_seconds() if signed else float("inf")
                self._last_signed = self._clock() - max(ago, 0.0)
        return self._sealed

    def seal_batch(self) -> int:
        """Seal the next records of the log (up to a batch, and no further than the next
        checkpoint due by count), in one transaction; returns how many."""
        sealed = self._state()
        limit = min(self._batch, self._every - (sealed.tree.size - sealed.checkpoint_size))
        rows = self._db.read_log(sealed.position, max(limit, 1))
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
        self._commit(sealed, sealed, [], [], checkpoint=True)
        return True

    def catch_up(self) -> int:
        """Seal everything stored so far, and sign it; returns how many records were sealed."""
        total = 0
        while added := self.seal_batch():
            total += added
        sealed = self._state()
        if sealed.tree.size > sealed.checkpoint_size:
            self._commit(sealed, sealed, [], [], checkpoint=True)
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
                stored = _read_state(cursor)
                if (stored.tree.size, stored.position) != (before.tree.size, before.position):
                    # Another sealer moved on meanwhile: this batch is not ours to store.
                    raise AuditError(
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
        except BaseException:
            self._sealed = None  # read again from the store: it holds what was committed
            raise
        if note is not None:
            after = _Sealed(after.tree, after.position, after.tree.size)
            self._last_signed = self._clock()
        self._sealed = after

    async def run(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Seal the log as it grows until ``stop`` is set; a failed round (the database went
        away) is logged and tried again, waiting longer each time up to 30 s.

        Behind by more than a batch (a first start on a full store, a restart after a long
        stop), it pauses after each batch for ``BACKLOG_PAUSE`` times as long as the batch
        took: ingest shares this process' interpreter and, on SQLite, the database's one writer
        with it, and must not wait on the sealer catching up (measured in bench/audit.py)."""
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
            except Exception:
                log.exception("the audit sealer failed; trying again in %.0f s", backoff)
                added, wait = 0, backoff
                backoff = min(backoff * 2, 30.0)
            else:
                wait = poll_s
            if added >= self._batch:  # (a partial batch: caught up, look again in poll_s)
                wait = (loop.time() - started) * BACKLOG_PAUSE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


def sealer_of(settings: Settings, store: EventStore, **options: Any) -> Sealer:
    """The sealer of ``settings``: its key (``audit_signer``, which refuses a bad one), origin
    and checkpoint cadence."""
    return Sealer(
        store,
        audit_signer(settings),
        audit_origin(settings),
        every=settings.audit_checkpoint_every,
        interval_s=settings.audit_checkpoint_interval_s,
        **options,
    )


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

    what: str  # "position", "checkpoint", or "tree" (a stored subtree node)
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
    """The sealed tree and its checkpoints, read for the API and the CLI. Synchronous: async
    callers run it in a thread."""

    def __init__(self, store: EventStore, batch: int = SEAL_BATCH) -> None:
        self._db = _Database(store)
        self._batch = batch

    # --- checkpoints ---

    def public_key(self) -> str | None:
        """The key string the sealer last signed with (recorded at its start)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute("SELECT value FROM {state} WHERE name = ?", ("public_key",))
            row = cursor.fetchone()
        return None if row is None else str(row[0])

    def sealed_size(self) -> int:
        with self._db.transaction(write=False) as cursor:
            return _read_state(cursor).tree.size

    def checkpoints(self, before: int | None = None, limit: int = 100) -> list[StoredCheckpoint]:
        """The checkpoints, newest first, of sizes below ``before`` (all by default)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} WHERE tree_size < ? "
                "ORDER BY tree_size DESC LIMIT ?",
                (before if before is not None else 2**62, limit),
            )
            return [StoredCheckpoint.of(row) for row in cursor.fetchall()]

    def all_checkpoints(self) -> list[StoredCheckpoint]:
        with self._db.transaction(write=False) as cursor:
            cursor.execute(f"SELECT {_CHECKPOINT_COLUMNS} FROM {{checkpoints}} ORDER BY tree_size")
            return [StoredCheckpoint.of(row) for row in cursor.fetchall()]

    def checkpoint(self, size: int | None = None) -> StoredCheckpoint:
        """The checkpoint of ``size`` leaves, or the latest; ``AuditError`` if there is none."""
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
        if row is None:
            raise AuditError(
                "no checkpoint signed yet" if size is None else f"no checkpoint of size {size}"
            )
        return StoredCheckpoint.of(row)

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
        try:
            root = self.checkpoint(first).root
        except AuditError:
            later = self.checkpoint(second)
            if not 1 <= first <= later.size:
                raise AuditError(
                    f"no tree of {first} leaves before the checkpoint of {later.size}"
                ) from None
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
        event, two events swapped), each checkpoint's signature by ``verifier``, its root with
        the recomputed one at its size, and the consistency of each with the one before."""
        report = VerifyReport()
        checkpoints = self.all_checkpoints()
        report.checkpoints = len(checkpoints)
        self._verify_checkpoints(checkpoints, verifier, report)
        self._verify_records(checkpoints, report, progress)
        return report

    def _verify_checkpoints(
        self,
        checkpoints: Sequence[StoredCheckpoint],
        verifier: NoteVerifier,
        report: VerifyReport,
    ) -> None:
        previous: StoredCheckpoint | None = None
        for stored in checkpoints:
            try:
                signed = parse_checkpoint(open_note(stored.note, [verifier]))
            except NoteError as failure:
                report.found(Finding("checkpoint", stored.size, f"its signature: {failure}"))
                continue
            if (signed.size, signed.root_hash) != (stored.size, stored.root):
                report.found(
                    Finding(
                        "checkpoint", stored.size, "its stored size or root is not the signed one"
                    )
                )
                continue
            if previous is not None:
                try:
                    self.consistency_with(previous.size, previous.root, stored.size)
                except AuditError as failure:
                    report.found(Finding("checkpoint", stored.size, str(failure)))
            previous = stored

    def _verify_records(
        self,
        checkpoints: Sequence[StoredCheckpoint],
        report: VerifyReport,
        progress: Progress | None,
    ) -> None:
        recorder = self._db.recorder
        last = int(recorder.max_notification_id() or 0)
        sealed = self.sealed_size()
        report.sealed = sealed
        due = iter(checkpoints)
        next_checkpoint = next(due, None)
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
                    return
                if position != leaf[0]:
                    if position > leaf[0]:
                        reason = "the sealed event at this position is missing (deleted)"
                        report.found(Finding("position", leaf[0], reason))
                    else:
                        reason = f"not the event sealed as leaf #{index} (position {leaf[0]})"
                        report.found(Finding("position", position, reason))
                    return
                if row_leaf_hash(row) != leaf[1]:
                    reason = (
                        "its stored record no longer matches its sealed leaf (edited or swapped)"
                    )
                    report.found(Finding("position", position, reason))
                    return
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
                while next_checkpoint is not None and next_checkpoint.size == tree.size:
                    if tree.root() != next_checkpoint.root:
                        reason = (
                            "the stored records give another root at this size (changed between "
                            f"positions after {previous_checkpoint} and {position})"
                        )
                        report.found(Finding("checkpoint", next_checkpoint.size, reason))
                    previous_checkpoint = next_checkpoint.position
                    next_checkpoint = next(due, None)
            after = rows[-1][0]
            if progress is not None:
                progress(after, max(last, after))
        if tree.size < sealed and report.ok:
            leaf = self._stored_leaves(tree.size, tree.size + 1).get(tree.size)
            at = leaf[0] if leaf is not None else after + 1
            report.found(
                Finding("position", at, "the sealed event at this position is missing (deleted)")
            )

    def _stored_nodes(self, start: int, end: int) -> dict[tuple[int, int], bytes]:
        """The stored subtree nodes whose last leaf is in ``start``..``end - 1``."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                "SELECT last_leaf, level, hash FROM {nodes} WHERE last_leaf >= ? AND last_leaf < ?",
                (start, end),
            )
            return {(int(last), int(level)): bytes(h) for last, level, h in cursor.fetchall()}

    def _stored_leaves(self, start: int, end: int) -> dict[int, tuple[int, bytes]]:
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                "SELECT leaf_index, position, hash FROM {leaves} "
                "WHERE leaf_index >= ? AND leaf_index < ?",
                (start, end),
            )
            return {int(i): (int(p), bytes(h)) for i, p, h in cursor.fetchall()}


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
