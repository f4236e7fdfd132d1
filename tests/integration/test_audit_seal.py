"""The sealer over a real store, SQLite and PostgreSQL: the same root as the Merkle tree of the
records read back, nothing lost or sealed twice across a failure or a kill, proofs that check
offline, and ``verify`` naming what was edited, deleted, swapped or re-signed in the database."""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from eventsourcing.persistence import Tracking

from audit.bundle import check_bundle
from audit.merkle import root
from audit.note import NoteSigner, checkpoint_body, open_note, parse_checkpoint, sign_note
from hub.domain import Machine, Origin
from hub.sealer import (
    KEY_FILE,
    PUBLIC_KEY_FILE,
    AuditError,
    AuditLog,
    AuditMismatch,
    Sealer,
    audit_signer,
    audit_verifier,
    record_leaf_hash,
    record_of,
    sealer_of,
)
from hub.settings import ConfigError, Settings, load_settings
from hub.store import EventStore
from tests.conftest import T0, postgres_settings

ROOT = Path(__file__).resolve().parents[2]


# --- a store with events -------------------------------------------------------------------------


def fill(store: EventStore, count: int, machines: int = 7) -> None:
    """``count`` more stored events (a new machine's creation is one), from ``machines``
    machines, in commits of many aggregates each."""
    start = store.last_position()
    fleet = [store.machine("default", f"M{n}") for n in range(machines)]
    done = sum(1 for machine in fleet if machine is None)
    assert done < count
    fleet = [m or Machine(site="default", machine_id=f"M{n}") for n, m in enumerate(fleet)]
    seq = store.tracking_position("test")
    while done < count:
        touched = []
        for machine in fleet[: min(machines, count - done)]:
            done += 1
            at = T0 + timedelta(seconds=start + done)
            availability = "AVAILABLE" if done % 3 else "UNAVAILABLE"
            machine.report_availability(Origin(f"e{start + done}", "urn:test", at), availability)
            touched.append(machine)
        seq += 1
        store.commit(fleet, Tracking("test", seq), [], [])
    assert store.last_position() - start == count or store.application.recorder.__class__


def recomputed_leaves(store: EventStore) -> list[bytes]:
    notifications = store.application.recorder.select_notifications(
        0, 10**9, inclusive_of_start=False
    )
    return [record_leaf_hash(record_of(n)) for n in notifications]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    base = {"audit_checkpoint_every": 500, "audit_checkpoint_interval_s": 3600.0}
    if request.param == "sqlite":
        return load_settings(data_dir=tmp_path / "hub", **base)
    dsn = request.getfixturevalue("postgres_dsn")
    return postgres_settings(dsn, tmp_path / "hub").model_copy(update=base)


@pytest.fixture
def store(store_settings: Settings) -> Iterator[EventStore]:
    opened = EventStore(store_settings)
    yield opened
    opened.close()


def sealed(settings: Settings, store: EventStore, **options: Any) -> Sealer:
    sealer = sealer_of(settings, store, batch=options.pop("batch", 170), **options)
    sealer.prepare()
    sealer.catch_up()
    return sealer


# --- the tree and its checkpoints ----------------------------------------------------------------


def test_the_sealed_root_is_the_root_of_the_records_read_back(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 1_234)
    sealer = sealed(store_settings, store)
    leaves = recomputed_leaves(store)
    assert sealer.size == len(leaves) == 1_234
    audit_log = AuditLog(store)
    checkpoints = audit_log.all_checkpoints()
    # The first batch at once (no checkpoint yet), then every 500 records, and the rest when
    # caught up.
    assert [c.size for c in checkpoints] == [170, 670, 1170, 1234]
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    for checkpoint in checkpoints:
        assert checkpoint.root == root(leaves, checkpoint.size)
        signed = parse_checkpoint(open_note(checkpoint.note, [verifier]))
        assert (signed.origin, signed.size, signed.root_hash) == (
            "mes-hub/default",
            checkpoint.size,
            checkpoint.root,
        )
    assert checkpoints[-1].position == store.last_position()
    assert audit_log.public_key() == verifier.key_string()


def test_the_sealer_follows_the_log_as_it_grows(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 300)
    sealer = sealed(store_settings, store)
    fill(store, 450)
    assert sealer.seal_batch() == 170  # one batch at a time, from where it stopped
    sealer.catch_up()
    assert sealer.size == 750
    latest = AuditLog(store).checkpoint()
    assert (latest.size, latest.root) == (750, root(recomputed_leaves(store)))


def test_a_checkpoint_is_signed_when_the_interval_passes_and_the_log_grew(
    store_settings: Settings, store: EventStore
) -> None:
    now = [0.0]
    wall = [T0]

    def make() -> Sealer:
        made = sealer_of(store_settings, store, clock=lambda: now[0], now=lambda: wall[0])
        made.prepare()
        return made

    sealer = make()
    fill(store, 10)
    assert sealer.seal_batch() == 10  # the first: signed at once
    fill(store, 5)
    assert sealer.seal_batch() == 5
    assert not sealer.checkpoint_if_due()  # (the interval has not passed)
    now[0] += 3600
    assert sealer.checkpoint_if_due()
    assert not sealer.checkpoint_if_due()  # the log did not grow since
    # After a restart the interval still runs from the last checkpoint.
    fill(store, 5)
    wall[0] += timedelta(seconds=1800)
    restarted = make()
    assert restarted.seal_batch() == 5 and not restarted.checkpoint_if_due()
    now[0] += 1800  # (once loaded, it counts on its own clock)
    assert restarted.checkpoint_if_due()
    assert [c.size for c in AuditLog(store).all_checkpoints()] == [10, 15, 20]


def test_a_failure_inside_a_batch_stores_nothing_of_it_and_the_next_sealer_resumes(
    store_settings: Settings, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, 1_000)
    sealer = sealer_of(store_settings, store, batch=200)
    sealer.prepare()
    assert sealer.seal_batch() + sealer.seal_batch() == 400
    from hub import sealer as module

    real = module._Cursor.executemany

    def fail_at_nodes(cursor: Any, template: str, rows: Any) -> None:
        real(cursor, template, rows)  # the leaves went in; the nodes will not
        if "{nodes}" in template:
            raise RuntimeError("the process dies here")

    monkeypatch.setattr(module._Cursor, "executemany", fail_at_nodes)
    with pytest.raises(RuntimeError):
        sealer.seal_batch()
    monkeypatch.undo()
    assert AuditLog(store).sealed_size() == 400
    resumed = sealed(store_settings, store, batch=200)
    assert resumed.size == 1_000
    assert_sealed_once(store)


def assert_sealed_once(store: EventStore) -> None:
    """Every record sealed exactly once, in order, and the tree's root theirs."""
    leaves = recomputed_leaves(store)
    audit_log = AuditLog(store)
    stored = audit_log._stored_leaves(0, 10**9)
    positions = [n.id for n in store.application.recorder.select_notifications(0, 10**9)]
    assert [stored[i][0] for i in range(len(stored))] == positions
    assert [stored[i][1] for i in range(len(stored))] == leaves
    assert audit_log.checkpoint().root == root(leaves)


def test_a_sealer_killed_inside_its_transaction_resumes_losing_and_repeating_nothing(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 1_000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}
    env |= {
        "MES_HUB_DATA_DIR": str(store_settings.data_dir),
        "MES_HUB_STORE": store_settings.store,
        "MES_HUB_AUDIT_CHECKPOINT_EVERY": "500",
    }
    if store_settings.store == "postgres":
        assert store_settings.postgres_dsn is not None
        env |= {
            "MES_HUB_POSTGRES_DSN": store_settings.postgres_dsn.get_secret_value(),
            "MES_HUB_POSTGRES_SCHEMA": store_settings.postgres_schema,
        }
    command = [sys.executable, "-m", "hub", "audit", "seal", "--batch", "150"]
    killed = subprocess.run(
        [*command, "--kill-in-batch", "4"], env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr.decode()
    audit_log = AuditLog(store)
    assert audit_log.sealed_size() == 450  # three batches committed, the fourth not at all
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()
    assert audit_log.sealed_size() == 1_000
    assert_sealed_once(store)
    # The first batch (no checkpoint yet), then every 500 records, then the rest.
    assert [c.size for c in audit_log.all_checkpoints()] == [150, 650, 1000]


# --- proofs ---------------------------------------------------------------------------------------


def test_every_proof_checks_against_every_checkpoint(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 1_100)
    sealed(store_settings, store)
    audit_log = AuditLog(store)
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    positions = [n.id for n in store.application.recorder.select_notifications(0, 10**9)]
    sizes = [c.size for c in audit_log.all_checkpoints()]
    for index in [*range(0, 1_100, 97), 499, 500, 1_099]:
        for size in (s for s in sizes if s > index):
            bundle = audit_log.evidence(positions[index], verifier.key_string(), size)
            checked = check_bundle(bundle, verifier)
            assert (checked.leaf_index, checked.checkpoint.size) == (index, size)
    for first in sizes:
        for second in (s for s in sizes if s >= first):
            proof = audit_log.consistency(first, second)
            assert proof.second.size == second
    assert sizes == [170, 670, 1100]
    # From any tree size (an auditor's own checkpoint), to a signed one.
    leaves = recomputed_leaves(store)
    for first in (1, 2, 333, 1_099):
        proof = audit_log.consistency(first, 1_100)
        assert proof.first_root == root(leaves, first)
    with pytest.raises(AuditError, match="no tree of 1101 leaves"):
        audit_log.consistency(1_101, 1_100)
    with pytest.raises(AuditError, match="not in the checkpoint of size 670"):
        audit_log.evidence(positions[700], verifier.key_string(), 670)
    with pytest.raises(AuditError, match="no checkpoint of size 671"):
        audit_log.evidence(positions[1], verifier.key_string(), 671)


def test_a_proof_through_an_edited_stored_node_is_refused(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 600)
    sealed(store_settings, store)
    tamper(store_settings, "UPDATE {nodes} SET hash = {zero} WHERE level = 3")
    audit_log = AuditLog(store)
    with pytest.raises(AuditMismatch, match="no longer matches"):
        audit_log.evidence(1, "unused", 600)
    with pytest.raises(AuditMismatch, match="not a prefix"):
        audit_log.consistency(170, 600)
    # verify names the node (every record still matches its leaf).
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = audit_log.verify(verifier)
    assert report.bad_position is None
    tree = [p for p in report.problems if p.what == "tree"]
    assert tree and "leaves 0 to 7 (level 3" in tree[0].reason
    positions = [n.id for n in store.application.recorder.select_notifications(0, 10**9)]
    assert tree[0].at == positions[7]


# --- verify, after the database was edited -------------------------------------------------------


def tamper(settings: Settings, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run SQL on the store's database behind the hub's back. ``{events}``: the stored events'
    table, ``{position}`` its position column; ``{nodes}``, ``{checkpoints}``, ``{leaves}``,
    ``{state}``: the audit's;
    ``{zero}``: 32 zero bytes."""
    audit = {"nodes", "checkpoints", "leaves", "state"}
    if settings.store == "sqlite":
        names = {"events": "stored_events", "position": "rowid"}
        names |= {table: f"mes_audit_{table}" for table in audit}
        names |= {"zero": "zeroblob(32)"}
        with sqlite3.connect(settings.sqlite_path) as connection:
            connection.execute(statement.format(**names), params)
        connection.close()
        return
    import psycopg

    assert settings.postgres_dsn is not None
    schema = settings.postgres_schema
    names = {"events": f"{schema}.mes_hub_events", "position": "notification_id"}
    names |= {table: f"{schema}.mes_audit_{table}" for table in audit}
    names |= {"zero": "'\\x" + "00" * 32 + "'::bytea"}
    with psycopg.connect(settings.postgres_dsn.get_secret_value()) as connection:
        connection.execute(statement.format(**names).replace("?", "%s"), params)  # type: ignore[arg-type]


def stored_row(store: EventStore, position: int) -> tuple[str, bytes]:
    (found,) = store.application.recorder.select_notifications(position, 1)
    assert found.id == position
    return found.topic, bytes(found.state)


def edit_a_byte(settings: Settings, store: EventStore, position: int) -> None:
    _, state = stored_row(store, position)
    changed = bytearray(state)
    changed[len(state) // 2] ^= 0x01
    tamper(
        settings, "UPDATE {events} SET state = ? WHERE {position} = ?", (bytes(changed), position)
    )


def delete(settings: Settings, store: EventStore, position: int) -> None:
    tamper(settings, "DELETE FROM {events} WHERE {position} = ?", (position,))


def swap(settings: Settings, store: EventStore, position: int) -> None:
    other = position + 5
    (topic_a, state_a), (topic_b, state_b) = stored_row(store, position), stored_row(store, other)
    update = "UPDATE {events} SET topic = ?, state = ? WHERE {position} = ?"
    tamper(settings, update, (topic_b, state_b, position))
    tamper(settings, update, (topic_a, state_a, other))


@pytest.mark.parametrize(
    "change", [edit_a_byte, delete, swap], ids=["edited", "deleted", "swapped"]
)
@pytest.mark.parametrize("where", [1, 377, 1_200], ids=["first", "middle", "last-sealed"])
def test_verify_names_the_first_position_that_no_longer_matches(
    store_settings: Settings,
    store: EventStore,
    change: Callable[[Settings, EventStore, int], None],
    where: int,
) -> None:
    fill(store, 1_200 if change is not swap else 1_210)
    sealed(store_settings, store)
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    audit_log = AuditLog(store)
    assert audit_log.verify(verifier).ok
    position = [n.id for n in store.application.recorder.select_notifications(0, 10**9)][where - 1]
    change(store_settings, store, position)
    report = audit_log.verify(verifier)
    assert not report.ok
    assert report.bad_position is not None, report.problems
    assert report.bad_position.at == position, report.problems
    expected = {edit_a_byte: "edited", delete: "deleted", swap: "swapped"}[change]
    assert expected in report.bad_position.reason


def test_verify_names_a_checkpoint_signed_again_with_another_key(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 1_200)
    sealed(store_settings, store)
    audit_log = AuditLog(store)
    middle = audit_log.all_checkpoints()[1]  # (of 170, 670, 1170 and 1200 leaves)
    forger = NoteSigner.generate("mes-hub/default")
    forged = sign_note(checkpoint_body("mes-hub/default", middle.size, middle.root), forger)
    tamper(
        store_settings,
        "UPDATE {checkpoints} SET note = ? WHERE tree_size = ?",
        (forged, middle.size),
    )
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = audit_log.verify(verifier)
    assert not report.ok and report.bad_position is None
    assert report.bad_checkpoint is not None and report.bad_checkpoint.at == middle.size
    assert "signature" in report.bad_checkpoint.reason


def test_verify_names_a_checkpoint_whose_records_were_rewritten_with_their_leaves(
    store_settings: Settings, store: EventStore
) -> None:
    # Whoever rewrites a record and its stored leaf alike still cannot re-sign the root.
    fill(store, 700)
    sealed(store_settings, store)
    edit_a_byte(store_settings, store, 600)
    (notification,) = store.application.recorder.select_notifications(600, 1)
    table = "mes_audit_leaves"
    if store_settings.store == "postgres":
        table = f"{store_settings.postgres_schema}.{table}"
    tamper(
        store_settings,
        f"UPDATE {table} SET hash = ? WHERE position = ?",
        (record_leaf_hash(record_of(notification)), 600),
    )
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = AuditLog(store).verify(verifier)
    assert report.bad_position is None
    # The first checkpoint holding position 600 (of 170, 670 and 700 leaves).
    assert report.bad_checkpoint is not None and report.bad_checkpoint.at == 670
    assert "after 170 and 670" in report.bad_checkpoint.reason
    assert "another root" in report.bad_checkpoint.reason


def test_verify_does_not_trust_a_rewound_state(store_settings: Settings, store: EventStore) -> None:
    # An event edited and the sealer's state set back to an empty tree: the sealed size is
    # taken from the leaves and the checkpoints too, never from the state alone.
    fill(store, 1_200)
    sealed(store_settings, store)
    edit_a_byte(store_settings, store, 5)
    tamper(
        store_settings,
        "UPDATE {state} SET value = ? WHERE name = 'tree'",
        ('{"size": 0, "hashes": [], "position": 0}',),
    )
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = AuditLog(store).verify(verifier)
    assert not report.ok
    assert report.sealed == 1_200 and report.unsealed == 0
    assert report.bad_position is not None and report.bad_position.at == 5, report.problems
    assert any(p.what == "state" and "says 0 sealed leaves" in p.reason for p in report.problems)


def test_verify_names_a_log_cut_back_with_its_leaves_and_state(
    store_settings: Settings, store: EventStore
) -> None:
    # The last 130 events deleted, with their leaves and nodes, and the state gone: what is
    # left matches its leaves, but the checkpoints of 1170 and 1200 leaves cover records that
    # are not there.
    fill(store, 1_200)
    sealed(store_settings, store)
    positions = [n.id for n in store.application.recorder.select_notifications(0, 10**9)]
    cut = positions[1_070]
    tamper(store_settings, "DELETE FROM {events} WHERE {position} >= ?", (cut,))
    tamper(store_settings, "DELETE FROM {leaves} WHERE leaf_index >= 1070")
    tamper(store_settings, "DELETE FROM {nodes} WHERE last_leaf >= 1070")
    tamper(store_settings, "DELETE FROM {state} WHERE name = 'tree'")
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = AuditLog(store).verify(verifier)
    assert not report.ok and report.records == 1_070
    covering = [p for p in report.problems if "records that are not there" in p.reason]
    assert [p.at for p in covering] == [1_170, 1_200], report.problems
    assert report.bad_position is not None and report.bad_position.at == cut


@pytest.mark.parametrize("value", ["not json", '{"size": 3, "hashes": [], "position": 9}'])
def test_an_unreadable_state_is_a_finding_not_a_traceback(
    store_settings: Settings, store: EventStore, value: str
) -> None:
    fill(store, 300)
    sealed(store_settings, store)
    tamper(store_settings, "UPDATE {state} SET value = ? WHERE name = 'tree'", (value,))
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    report = AuditLog(store).verify(verifier)
    assert not report.ok and report.records == 300
    assert [p.what for p in report.problems] == ["state"]
    assert "unreadable" in report.problems[0].reason


def test_a_checkpoint_row_whose_columns_are_not_its_note_is_refused(
    store_settings: Settings, store: EventStore
) -> None:
    # The genuine note kept, the root column forged: sizes and roots come from the note.
    fill(store, 600)
    sealed(store_settings, store)
    tamper(store_settings, "UPDATE {checkpoints} SET root = {zero} WHERE tree_size = 600")
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    audit_log = AuditLog(store, verifier=verifier)
    for read in (
        lambda: audit_log.checkpoint(),
        lambda: audit_log.checkpoints(),
        lambda: audit_log.consistency(170, 600),
        lambda: audit_log.consistency_with(170, audit_log.checkpoint(170).root),
        lambda: audit_log.evidence(3, verifier.key_string()),
    ):
        with pytest.raises(AuditMismatch, match="root column is not its signed note's"):
            read()
    assert audit_log.checkpoint(170).size == 170  # (the others still read)
    report = AuditLog(store).verify(verifier)
    assert report.bad_checkpoint is not None and report.bad_checkpoint.at == 600


def test_a_store_the_sealer_never_ran_on_is_not_sealed_yet_and_reading_creates_nothing(
    store_settings: Settings, store: EventStore
) -> None:
    fill(store, 10)
    audit_log = AuditLog(store)
    for read in (audit_log.checkpoint, audit_log.sealed_size, audit_log.public_key):
        with pytest.raises(AuditError, match="nothing is sealed yet"):
            read()
    verifier = NoteSigner.generate("mes-hub/default").verifier
    with pytest.raises(AuditError, match="nothing is sealed yet"):
        audit_log.verify(verifier)
    assert not AuditLog(store)._db.has_tables()  # a reader made no table
    sealer_of(store_settings, store)  # where the hub starts: made there
    assert AuditLog(store)._db.has_tables()
    assert audit_log.sealed_size() == 0


def test_two_sealers_at_once_seal_each_record_once(
    store_settings: Settings, store: EventStore
) -> None:
    # The hub's sealer and `mes-hub audit seal --follow` on the same store at the same time:
    # whichever stores a batch first, the other goes on from there; nothing sealed twice, no
    # failure logged.
    import signal
    import threading
    import time

    fill(store, 2_000)
    hubs = sealer_of(store_settings, store, batch=40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}
    env |= {
        "MES_HUB_DATA_DIR": str(store_settings.data_dir),
        "MES_HUB_STORE": store_settings.store,
        "MES_HUB_AUDIT_CHECKPOINT_EVERY": "500",
    }
    if store_settings.store == "postgres":
        assert store_settings.postgres_dsn is not None
        env |= {
            "MES_HUB_POSTGRES_DSN": store_settings.postgres_dsn.get_secret_value(),
            "MES_HUB_POSTGRES_SCHEMA": store_settings.postgres_schema,
        }
    command = [sys.executable, "-m", "hub", "audit", "seal", "--follow", "--batch", "35"]
    other = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    audit_log = AuditLog(store)
    try:
        deadline = time.monotonic() + 60
        while audit_log.sealed_size() < 35 and time.monotonic() < deadline:
            time.sleep(0.01)  # the other one has begun
        failures: list[BaseException] = []

        def in_the_hub() -> None:
            try:
                for _ in range(3):
                    hubs.catch_up()
                    fill(store, 300)
            except BaseException as failure:  # pragma: no cover - what the test reports
                failures.append(failure)

        thread = threading.Thread(target=in_the_hub)
        thread.start()
        thread.join(120)
        assert not failures, failures
        hubs.catch_up()
        while audit_log.checkpoint().size < 2_900 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        other.send_signal(signal.SIGINT)
        _, errors = other.communicate(timeout=60)
    assert other.returncode in (0, 130), errors.decode()
    assert "failed" not in errors.decode() and "Traceback" not in errors.decode(), errors.decode()
    assert audit_log.sealed_size() == 2_900
    assert_sealed_once(store)
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    assert audit_log.verify(verifier).ok


async def test_the_sealer_keeps_pace_when_checkpoints_come_more_often_than_batches(
    store_settings: Settings, store: EventStore
) -> None:
    # every=100 < batch: each read stops at a checkpoint, a full read all the same, so no
    # poll_s wait between them (which would seal 100 events per poll).
    import asyncio

    fill(store, 2_000)
    often = store_settings.model_copy(update={"audit_checkpoint_every": 100})
    sealer = sealer_of(often, store, batch=5_000)
    stop = asyncio.Event()
    running = asyncio.create_task(sealer.run(stop, poll_s=30.0))
    try:
        async with asyncio.timeout(20):
            while await asyncio.to_thread(AuditLog(store).sealed_size) < 2_000:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    assert [c.size for c in AuditLog(store).all_checkpoints()][-1] == 2_000


# --- the checkpoint key ---------------------------------------------------------------------------


def test_with_no_key_set_one_is_made_once_owner_only_with_its_public_key_beside(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=tmp_path / "hub")
    signer = audit_signer(settings)
    key_file = tmp_path / "hub" / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "hub" / PUBLIC_KEY_FILE).read_text().strip() == (
        signer.verifier.key_string()
    )
    assert audit_signer(settings).key_string() == signer.key_string()  # the same key, kept
    assert signer.name == "mes-hub/default"


def key_settings(tmp_path: Path, text: str | None, mode: int = 0o600) -> Settings:
    path = tmp_path / "checkpoints.key"
    if text is not None:
        path.write_text(text)
        path.chmod(mode)
    return load_settings(data_dir=tmp_path / "hub", audit_key=path)


@pytest.mark.parametrize(
    ("text", "mode", "reason"),
    [
        (None, 0o600, "file not found"),
        ("not a key\n", 0o600, "not an Ed25519 note signer key"),
        ("PRIVATE+KEY+x+00000000+AAAA\n", 0o600, "not an Ed25519 note signer key"),
        (NoteSigner.generate("plant").key_string(), 0o644, "readable by group or others"),
        (NoteSigner.generate("plant").key_string(), 0o640, "readable by group or others"),
    ],
    ids=["missing", "malformed", "bad-key", "world-readable", "group-readable"],
)
def test_a_bad_key_file_is_refused_naming_the_file_the_setting_and_why(
    tmp_path: Path, text: str | None, mode: int, reason: str
) -> None:
    settings = key_settings(tmp_path, text, mode)
    with pytest.raises(ConfigError) as refused:
        audit_signer(settings)
    assert refused.value.source == str(tmp_path / "checkpoints.key")
    assert refused.value.key == "hub.audit_key"
    assert reason in refused.value.reason
    if text is not None:  # a key, even a broken one, is never echoed
        assert text.strip() not in str(refused.value)


def test_a_good_key_file_signs(tmp_path: Path) -> None:
    key = NoteSigner.generate("plant-7")
    settings = key_settings(tmp_path, key.key_string() + "\n")
    assert audit_signer(settings).key_string() == key.key_string()
    verifier = audit_verifier(settings)
    assert verifier is not None and verifier.key_string() == key.verifier.key_string()


def test_a_missing_key_file_is_refused_when_the_store_holds_checkpoints_signed_with_it(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=tmp_path / "hub")
    store = EventStore(settings)
    try:
        fill(store, 50)
        sealed(settings, store)
        (tmp_path / "hub" / KEY_FILE).unlink()
        with pytest.raises(ConfigError) as refused:
            sealer_of(settings, store)
        assert refused.value.key == "hub.audit_key"
        assert refused.value.source == str(tmp_path / "hub" / KEY_FILE)
        assert "rotation is not supported" in refused.value.reason
        assert not (tmp_path / "hub" / KEY_FILE).exists()  # no new key made meanwhile
    finally:
        store.close()


def test_another_key_than_the_checkpoints_were_signed_with_is_refused_and_not_recorded(
    tmp_path: Path,
) -> None:
    first = load_settings(data_dir=tmp_path / "hub")
    store = EventStore(first)
    try:
        fill(store, 50)
        sealed(first, store)
        recorded = AuditLog(store).public_key()
        other = key_settings(tmp_path, NoteSigner.generate("mes-hub-default").key_string())
        other = other.model_copy(update={"data_dir": first.data_dir})
        with pytest.raises(ConfigError) as refused:
            sealer_of(other, store)
        assert refused.value.key == "hub.audit_key"
        assert "signed with another key" in refused.value.reason
        assert "rotation is not supported" in refused.value.reason
        assert AuditLog(store).public_key() == recorded  # not overwritten
        # The key they were signed with starts again.
        assert sealer_of(first, store).size == 50
    finally:
        store.close()


def test_a_key_made_is_flushed_to_disk_with_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    settings = load_settings(data_dir=tmp_path / "hub")
    audit_signer(settings)
    data_dir = str((tmp_path / "hub").resolve())
    assert str((tmp_path / "hub" / KEY_FILE).resolve()) in synced
    assert str((tmp_path / "hub" / PUBLIC_KEY_FILE).resolve()) in synced
    assert data_dir in synced


async def test_a_hub_with_a_bad_key_file_refuses_to_start(
    tmp_path: Path, settings: Settings
) -> None:
    from hub.bootstrap import build_hub

    path = tmp_path / "world.key"
    path.write_text(NoteSigner.generate("plant").key_string())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"hub\.audit_key"):
        await build_hub(settings.model_copy(update={"audit_key": path}))


# --- the API ------------------------------------------------------------------------------------


@dataclass
class HubForApi:
    """What ``api_context`` takes of a hub: its settings, store and views (no NATS here)."""

    settings: Settings
    store: EventStore
    views: Any
    publisher: Any

    @property
    def api_publisher(self) -> Any:
        return self.publisher


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings, EventStore]]:
    from hub.api.app import create_app
    from hub.bootstrap import api_context
    from hub.ports import InMemoryPublisher
    from projections.views.database import SQLiteViews
    from tests.conftest import API_ROLES, api_key

    settings = load_settings(
        data_dir=tmp_path / "hub",
        api_keys=",".join(f"{role}:{api_key(role)}" for role in API_ROLES),
        audit_checkpoint_every=100,
    )
    store = EventStore(settings)
    views = SQLiteViews(tmp_path / "views.sqlite")
    fill(store, 250)
    sealed(settings, store)
    app = create_app(api_context(HubForApi(settings, store, views, InMemoryPublisher())))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client, settings, store
    views.close()
    store.close()


ROUTES = [
    "/api/v1/audit/checkpoints",
    "/api/v1/audit/checkpoints/latest",
    "/api/v1/audit/proofs/inclusion?position=5",
    "/api/v1/audit/proofs/consistency?from=100&to=200",
    "/api/v1/audit/verify",
    "/api/v1/audit/public-key",
]


def as_role(role: str) -> dict[str, str]:
    from tests.conftest import api_key

    return {"Authorization": f"Bearer {api_key(role)}"}


@pytest.mark.parametrize("role", ["admin", "auditor"])
async def test_auditors_and_admins_read_every_audit_route(
    api: tuple[httpx.AsyncClient, Settings, EventStore], role: str
) -> None:
    client = api[0]
    for route in ROUTES:
        answer = await client.get(route, headers=as_role(role))
        assert answer.status_code == 200, (route, answer.text)


@pytest.mark.parametrize("role", ["operator", "erp", "supplier"])
async def test_other_roles_are_refused_every_audit_route(
    api: tuple[httpx.AsyncClient, Settings, EventStore], role: str
) -> None:
    client = api[0]
    for route in ROUTES:
        answer = await client.get(route, headers=as_role(role))
        assert answer.status_code == 403, (route, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")


async def test_the_api_gives_checkpoints_proofs_that_check_and_verify(
    api: tuple[httpx.AsyncClient, Settings, EventStore],
) -> None:
    client, settings, store = api
    auditor = as_role("auditor")
    verifier = audit_verifier(settings)
    assert verifier is not None
    key = (await client.get("/api/v1/audit/public-key", headers=auditor)).json()
    assert key == {"public_key": verifier.key_string()}

    first = (await client.get("/api/v1/audit/checkpoints?limit=2", headers=auditor)).json()
    assert [c["size"] for c in first["checkpoints"]] == [250, 200]
    assert first["next_before"] == 200
    rest = await client.get("/api/v1/audit/checkpoints?before=200&limit=2", headers=auditor)
    assert [c["size"] for c in rest.json()["checkpoints"]] == [100]
    assert rest.json()["next_before"] is None

    plain = await client.get(
        "/api/v1/audit/checkpoints/latest", headers=auditor | {"Accept": "text/plain"}
    )
    assert plain.headers["content-type"].startswith("text/plain")
    assert parse_checkpoint(open_note(plain.text, [verifier])).size == 250
    as_json = (await client.get("/api/v1/audit/checkpoints/latest", headers=auditor)).json()
    assert as_json["size"] == 250 and as_json["note"] == plain.text

    bundle = await client.get(
        "/api/v1/audit/proofs/inclusion?position=42&tree_size=100", headers=auditor
    )
    checked = check_bundle(bundle.json(), verifier)
    assert (checked.record.position, checked.checkpoint.size) == (42, 100)
    consistency = await client.get(
        "/api/v1/audit/proofs/consistency?from=100&to=250", headers=auditor
    )
    assert len(consistency.json()["proof"]) > 0
    assert consistency.json()["first"]["note"].startswith("mes-hub/default\n100\n")
    any_size = await client.get("/api/v1/audit/proofs/consistency?from=1", headers=auditor)
    first_leaf = base64.b64encode(recomputed_leaves(store)[0]).decode()
    assert any_size.json()["first"] == {"size": 1, "root": first_leaf}
    assert any_size.json()["second"]["size"] == 250

    missing = await client.get("/api/v1/audit/proofs/inclusion?position=9999", headers=auditor)
    assert missing.status_code == 404
    not_yet = await client.get(
        "/api/v1/audit/proofs/inclusion?position=150&tree_size=100", headers=auditor
    )
    assert not_yet.status_code == 404 and "later checkpoint" in not_yet.json()["detail"]

    assert (await client.get("/api/v1/audit/verify", headers=auditor)).json()["ok"] is True
    edit_a_byte(settings, store, 77)
    report = (await client.get("/api/v1/audit/verify", headers=auditor)).json()
    assert report["ok"] is False and report["first_bad_position"]["at"] == 77
    refused = await client.get("/api/v1/audit/proofs/inclusion?position=77", headers=auditor)
    assert refused.status_code == 409


async def test_the_api_verifies_with_the_configured_key_not_the_stored_one(
    api: tuple[httpx.AsyncClient, Settings, EventStore],
) -> None:
    # Whoever holds the database clears the audit tables and seals again with a key of their
    # own (recording it): the API still checks with the hub's configured key.
    client, settings, store = api
    auditor = as_role("auditor")
    for table in ("leaves", "nodes", "state", "checkpoints"):
        tamper(settings, f"DELETE FROM {{{table}}}")
    forger = Sealer(store, NoteSigner.generate("mes-hub-default"), "mes-hub/default", every=100)
    forger.prepare()
    forger.catch_up()
    report = (await client.get("/api/v1/audit/verify", headers=auditor)).json()
    assert report["ok"] is False
    assert report["first_bad_checkpoint"]["at"] == 100
    assert "signature" in report["first_bad_checkpoint"]["reason"]
    assert any(p["what"] == "key" for p in report["problems"])
    verifier = audit_verifier(settings)
    assert verifier is not None
    key = (await client.get("/api/v1/audit/public-key", headers=auditor)).json()
    assert key == {"public_key": verifier.key_string()}
    latest = await client.get("/api/v1/audit/checkpoints/latest", headers=auditor)
    assert latest.status_code == 409 and "signed note" in latest.json()["detail"]


async def test_the_api_refuses_a_checkpoint_whose_root_column_is_not_its_note(
    api: tuple[httpx.AsyncClient, Settings, EventStore],
) -> None:
    client, settings, _ = api
    auditor = as_role("auditor")
    tamper(settings, "UPDATE {checkpoints} SET root = {zero} WHERE tree_size = 250")
    for route in (
        "/api/v1/audit/checkpoints",
        "/api/v1/audit/checkpoints/latest",
        "/api/v1/audit/proofs/inclusion?position=5",
        "/api/v1/audit/proofs/consistency?from=100",
    ):
        answer = await client.get(route, headers=auditor)
        assert answer.status_code == 409, (route, answer.text)
        assert "root column is not its signed note's" in answer.json()["detail"]


async def test_a_consistency_proof_from_a_larger_tree_is_a_bad_request(
    api: tuple[httpx.AsyncClient, Settings, EventStore],
) -> None:
    client = api[0]
    answer = await client.get(
        "/api/v1/audit/proofs/consistency?from=250&to=100", headers=as_role("auditor")
    )
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "larger than to" in answer.json()["detail"]


async def test_one_verify_at_a_time(
    api: tuple[httpx.AsyncClient, Settings, EventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading

    client = api[0]
    auditor = as_role("auditor")
    entered, release = threading.Event(), threading.Event()
    real = AuditLog.verify

    def slow(self: AuditLog, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AuditLog, "verify", slow)
    first = asyncio.create_task(client.get("/api/v1/audit/verify", headers=auditor))
    assert await asyncio.to_thread(entered.wait, 30)
    second = await client.get("/api/v1/audit/verify", headers=auditor)
    assert second.status_code == 429
    assert int(second.headers["Retry-After"]) >= 1
    release.set()
    assert (await first).json()["ok"] is True
    again = await client.get("/api/v1/audit/verify", headers=auditor)
    assert again.status_code == 200 and again.json()["ok"] is True


# --- in a running hub --------------------------------------------------------------------------


async def test_a_running_hub_seals_what_it_stores_and_signs_it(settings: Settings) -> None:
    from contracts import encode_event
    from hub.bootstrap import SEALER, build_hub
    from tests.conftest import cloud_event, eventually

    quick = settings.model_copy(update={"audit_checkpoint_interval_s": 0.2})
    hub = await build_hub(quick, projections=False)
    try:
        assert SEALER in [service.name for service in hub.services]
        for n in range(30):
            event = cloud_event(
                "mes.machine.execution.v1", "M1", {"execution": "ACTIVE" if n % 2 else "READY"},
                at=timedelta(seconds=n),
            )  # fmt: skip
            await hub.jetstream.publish("mes.default.machine.M1.execution", encode_event(event))
        await hub.wait_caught_up()
        audit_log = AuditLog(hub.store)

        def sealed_all() -> bool:
            try:
                latest = audit_log.checkpoint()
            except AuditError:
                return False
            return latest.position == hub.store.last_position()

        await eventually(sealed_all)
        verifier = audit_verifier(quick)
        assert verifier is not None
        assert audit_log.verify(verifier).ok
        assert audit_log.checkpoint().root == root(recomputed_leaves(hub.store))
    finally:
        await hub.close()


def test_verify_while_the_hub_goes_on_sealing_and_signing_is_ok(
    store_settings: Settings, store: EventStore
) -> None:
    # A verify takes minutes on a real log, and the hub's sealer goes on meanwhile: what it
    # seals and signs after verify began is not "records that are not there".
    # More checkpoints than verify reads in one page (500), so it reads the next page after
    # the sealer signed more.
    fill(store, 600)
    often = store_settings.model_copy(update={"audit_checkpoint_every": 1})
    sealer = sealed(often, store)
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    grown: list[int] = []

    def meanwhile(position: int, last: int) -> None:
        if not grown:
            fill(store, 40)
            grown.append(sealer.catch_up())

    report = AuditLog(store, batch=100).verify(verifier, meanwhile)
    assert grown and grown[0] == 40
    assert report.ok, report.to_json()
    assert report.sealed == 600 and report.records == 600 and report.checkpoints == 600


def test_verify_names_values_of_the_wrong_type_instead_of_failing(tmp_path: Path) -> None:
    # SQLite keeps whatever is written into a column (PostgreSQL refuses it itself): a text
    # hash or root is tampering too, named, not a traceback.
    store_settings = load_settings(
        data_dir=tmp_path / "hub", audit_checkpoint_every=500, audit_checkpoint_interval_s=3600.0
    )
    store = EventStore(store_settings)
    fill(store, 300)
    sealed(store_settings, store)
    verifier = audit_verifier(store_settings)
    assert verifier is not None
    with sqlite3.connect(store_settings.sqlite_path) as connection:
        connection.execute("UPDATE mes_audit_leaves SET hash = 'x' WHERE leaf_index = 41")
    connection.close()
    report = AuditLog(store).verify(verifier)
    assert not report.ok and report.bad_position is not None
    with sqlite3.connect(store_settings.sqlite_path) as connection:
        connection.execute("UPDATE mes_audit_checkpoints SET root = 'x'")
    connection.close()
    report = AuditLog(store).verify(verifier)
    assert not report.ok and report.bad_checkpoint is not None
    store.close()
