"""``mes-hub audit`` on a real SQLite store: seal, verify, evidence out and checked offline (and
refused once tampered with), checkpoints exported and checked against the grown log."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub.cli import app
from hub.settings import load_settings
from hub.store import EventStore
from tests.integration.test_audit_seal import fill

ROOT = Path(__file__).resolve().parents[2]
MES_HUB = [sys.executable, "-m", "hub"]
runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "hub"
    store = EventStore(load_settings(data_dir=data))
    fill(store, 420)
    store.close()
    sealed = runner.invoke(app, ["audit", "seal", "--data-dir", str(data)])
    assert sealed.exit_code == 0, sealed.output
    assert "sealed 420 events" in sealed.output
    return data


def test_verify_passes_then_names_the_edited_position_with_exit_1(data_dir: Path) -> None:
    ok = subprocess.run(
        [*MES_HUB, "audit", "verify", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "verify OK" in ok.stdout and "420 records" in ok.stdout
    with sqlite3.connect(data_dir / "events.sqlite") as connection:
        connection.execute("UPDATE stored_events SET state = state || ' ' WHERE rowid = 300")
    connection.close()
    failed = subprocess.run(
        [*MES_HUB, "audit", "verify", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "first bad position 300" in failed.stderr


def test_evidence_checks_offline_and_fails_once_tampered_with(
    data_dir: Path, tmp_path: Path
) -> None:
    bundle_file = tmp_path / "evidence.json"
    made = runner.invoke(
        app,
        ["audit", "evidence", "--position", "123", "--out", str(bundle_file),
         "--data-dir", str(data_dir)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    key_file = data_dir / "audit.vkey"
    for key in (str(key_file), key_file.read_text().strip()):  # a file, or the key string
        checked = runner.invoke(
            app, ["audit", "verify-bundle", str(bundle_file), "--public-key", key]
        )
        assert checked.exit_code == 0, checked.output
        assert "bundle OK" in checked.output and "position 123" in checked.output

    bundle = json.loads(bundle_file.read_text())
    bundle["record"]["state"] = bundle["record"]["state"][:-4] + "AAAA"
    bundle_file.write_text(json.dumps(bundle))
    refused = runner.invoke(
        app, ["audit", "verify-bundle", str(bundle_file), "--public-key", str(key_file)]
    )
    assert refused.exit_code == 1
    assert "bundle FAILED" in refused.output and "the record" in refused.output


def test_verify_bundle_runs_offline_with_the_audit_package_alone(
    data_dir: Path, tmp_path: Path
) -> None:
    bundle_file = tmp_path / "evidence.json"
    runner.invoke(
        app,
        ["audit", "evidence", "--position", "7", "--out", str(bundle_file),
         "--data-dir", str(data_dir)],
    )  # fmt: skip
    # What an auditor runs elsewhere: this repository's audit/ package and its two libraries.
    script = (
        "import json, sys; from audit.bundle import check_bundle; "
        "from audit.note import NoteVerifier; "
        "b = json.load(open(sys.argv[1])); "
        "print(check_bundle(b, NoteVerifier.from_key_string(sys.argv[2])).leaf_index); "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('hub', 'contracts')]"
    )
    key = (data_dir / "audit.vkey").read_text().strip()
    offline = subprocess.run(
        [sys.executable, "-c", script, str(bundle_file), key],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == "6"


def test_an_exported_checkpoint_is_consistent_with_the_grown_log(
    data_dir: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "checkpoint.txt"
    exported = runner.invoke(
        app, ["audit", "checkpoint", "--export", "--out", str(kept), "--data-dir", str(data_dir)]
    )
    assert exported.exit_code == 0, exported.output
    assert kept.read_text().startswith("mes-hub/default\n420\n")
    printed = runner.invoke(app, ["audit", "checkpoint", "--export", "--data-dir", str(data_dir)])
    assert printed.output == kept.read_text()

    store = EventStore(load_settings(data_dir=data_dir))
    fill(store, 100)
    store.close()
    assert runner.invoke(app, ["audit", "seal", "--data-dir", str(data_dir)]).exit_code == 0
    checked = runner.invoke(
        app, ["audit", "checkpoint", "--check", str(kept), "--data-dir", str(data_dir)]
    )
    assert checked.exit_code == 0, checked.output
    assert "prefix of the log's latest signed checkpoint of 520" in " ".join(checked.output.split())

    # A checkpoint the hub never signed (another key) is refused.
    from audit.note import NoteSigner, checkpoint_body, sign_note

    forged = tmp_path / "forged.txt"
    forged.write_text(
        sign_note(checkpoint_body("mes-hub/default", 3, bytes(32)), NoteSigner.generate("x"))
    )
    refused = runner.invoke(
        app, ["audit", "checkpoint", "--check", str(forged), "--data-dir", str(data_dir)]
    )
    assert refused.exit_code == 1 and "not a checkpoint signed by this hub" in refused.output


def test_evidence_of_a_cloudevent_id_covers_every_event_it_became(
    data_dir: Path, tmp_path: Path
) -> None:
    from datetime import timedelta

    from eventsourcing.persistence import Tracking

    from hub.bootstrap import open_views, projection_workers
    from hub.domain import Order, Origin
    from hub.store import Entity
    from tests.conftest import T0

    settings = load_settings(data_dir=data_dir)
    store = EventStore(settings)
    # An operator's order start is stored twice: on the machine and on the order.
    machine = store.machine("default", "M1")
    assert machine is not None
    order = Order(site="default", order_id="SO-9")
    tap = Origin("tap-42", "urn:tablet", T0 + timedelta(hours=1))
    machine.start_order(tap, "SO-9")
    order.start_on(tap, "M1")
    store.commit([machine, order], Tracking("test-tap", 1), [],
                 [Entity("order", "default", "SO-9", order.id)])  # fmt: skip
    views = open_views(settings)
    for worker in projection_workers(settings, store, views):
        worker.prepare()
        worker.catch_up()
    views.close()
    store.close()
    assert runner.invoke(app, ["audit", "seal", "--data-dir", str(data_dir)]).exit_code == 0
    out = tmp_path / "tap.json"
    made = runner.invoke(
        app, ["audit", "evidence", "--event", "tap-42", "--out", str(out),
              "--data-dir", str(data_dir)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    document = json.loads(out.read_text())
    assert document["format"] == "mes-hub-evidence-set-v1"
    topics = [b["record"]["topic"] for b in document["bundles"]]
    assert topics == ["hub.domain:Machine.OrderStarted", "hub.domain:Order.Started"]
    checked = runner.invoke(
        app, ["audit", "verify-bundle", str(out), "--public-key", str(data_dir / "audit.vkey")]
    )
    assert checked.exit_code == 0, checked.output
    assert checked.output.count("bundle OK") == 2
    unknown = runner.invoke(
        app, ["audit", "evidence", "--event", "no-such", "--out", str(out),
              "--data-dir", str(data_dir)],
    )  # fmt: skip
    assert unknown.exit_code == 1 and "no stored event" in unknown.output


def test_checkpoint_check_takes_the_root_from_the_signed_note_not_the_column(
    data_dir: Path, tmp_path: Path
) -> None:
    # An auditor keeps the checkpoint of 420; the log grows to 520 and is sealed. Then event 500
    # is rewritten and the tree beyond 420 sealed again; the genuine note of 520 is put back
    # over the new one, whose root column stays the rewritten tree's. The stored tree is
    # consistent with that column: only the signed note tells.
    kept = tmp_path / "checkpoint.txt"
    runner.invoke(
        app, ["audit", "checkpoint", "--export", "--out", str(kept), "--data-dir", str(data_dir)]
    )
    database = data_dir / "events.sqlite"
    with sqlite3.connect(database) as connection:
        (state_at_420,) = connection.execute(
            "SELECT value FROM mes_audit_state WHERE name = 'tree'"
        ).fetchone()
    connection.close()
    store = EventStore(load_settings(data_dir=data_dir))
    fill(store, 100)
    store.close()
    assert runner.invoke(app, ["audit", "seal", "--data-dir", str(data_dir)]).exit_code == 0
    with sqlite3.connect(database) as connection:
        (genuine,) = connection.execute(
            "SELECT note FROM mes_audit_checkpoints WHERE tree_size = 520"
        ).fetchone()
        connection.execute("UPDATE stored_events SET state = state || ' ' WHERE rowid = 500")
        connection.execute("DELETE FROM mes_audit_leaves WHERE leaf_index >= 420")
        connection.execute("DELETE FROM mes_audit_nodes WHERE last_leaf >= 420")
        connection.execute("DELETE FROM mes_audit_checkpoints WHERE tree_size > 420")
        connection.execute(
            "UPDATE mes_audit_state SET value = ? WHERE name = 'tree'", (state_at_420,)
        )
    connection.close()
    assert runner.invoke(app, ["audit", "seal", "--data-dir", str(data_dir)]).exit_code == 0
    with sqlite3.connect(database) as connection:
        connection.execute(
            "UPDATE mes_audit_checkpoints SET note = ? WHERE tree_size = 520", (genuine,)
        )
    connection.close()
    checked = runner.invoke(
        app, ["audit", "checkpoint", "--check", str(kept), "--data-dir", str(data_dir)]
    )
    assert checked.exit_code == 1, checked.output
    assert "root column is not its signed note's" in " ".join(checked.output.split())


def test_an_auditor_verifies_with_the_public_key_alone(data_dir: Path, tmp_path: Path) -> None:
    kept = tmp_path / "checkpoint.txt"
    runner.invoke(
        app, ["audit", "checkpoint", "--export", "--out", str(kept), "--data-dir", str(data_dir)]
    )
    public = tmp_path / "hub.vkey"
    (data_dir / "audit.vkey").rename(public)
    (data_dir / "audit.key").unlink()  # the auditor's copy holds no private key
    for command in (["verify"], ["checkpoint", "--check", str(kept)]):
        done = runner.invoke(
            app, ["audit", *command, "--public-key", str(public), "--data-dir", str(data_dir)]
        )
        assert done.exit_code == 0, (command, done.output)
    public.rename(data_dir / "audit.vkey")  # by default, the data dir's public key
    done = runner.invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])
    assert done.exit_code == 0 and "verify OK" in done.output, done.output


def test_an_unreadable_key_file_is_a_clear_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub import sealer

    def refused(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sealer, "read_signer", refused)
    (data_dir / "audit.vkey").unlink()
    done = runner.invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])
    assert done.exit_code == 2, done.output
    assert "Permission denied" in done.output and "--public-key" in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


def test_a_wrong_store_key_is_a_configuration_error(tmp_path: Path) -> None:
    from eventsourcing.cryptography import AESCipher

    data = tmp_path / "hub"
    right, wrong = AESCipher.create_key(32), AESCipher.create_key(32)
    store = EventStore(load_settings(data_dir=data, store_encryption_key=right))
    fill(store, 20)
    store.close()
    for command in (["verify"], ["seal"], ["checkpoint", "--export"]):
        done = subprocess.run(
            [*MES_HUB, "audit", *command, "--data-dir", str(data)],
            env={**os.environ, "COLUMNS": "200", "MES_HUB_STORE_ENCRYPTION_KEY": wrong},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        error = " ".join(done.stderr.split())
        assert done.returncode == 2, (command, error)
        assert "configuration error" in error and "store_encryption_key" in error, error
        assert "Traceback" not in error and wrong not in error


def test_verify_bundle_prints_and_requires_the_origin(data_dir: Path, tmp_path: Path) -> None:
    bundle_file = tmp_path / "evidence.json"
    runner.invoke(
        app,
        ["audit", "evidence", "--position", "9", "--out", str(bundle_file),
         "--data-dir", str(data_dir)],
    )  # fmt: skip
    key = str(data_dir / "audit.vkey")
    plain = runner.invoke(app, ["audit", "verify-bundle", str(bundle_file), "--public-key", key])
    assert plain.exit_code == 0 and "origin mes-hub/default" in plain.output, plain.output
    same = runner.invoke(
        app,
        ["audit", "verify-bundle", str(bundle_file), "--public-key", key,
         "--origin", "mes-hub/default"],
    )  # fmt: skip
    assert same.exit_code == 0, same.output
    other = runner.invoke(
        app,
        ["audit", "verify-bundle", str(bundle_file), "--public-key", key,
         "--origin", "mes-hub/plant-7"],
    )  # fmt: skip
    assert other.exit_code == 1
    assert "the checkpoint's origin" in other.output and "mes-hub/plant-7" in other.output
