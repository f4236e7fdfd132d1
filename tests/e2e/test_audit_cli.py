"""``mes-hub audit`` on a real SQLite store: seal, verify, evidence out and checked offline (and
refused once tampered with), checkpoints exported and checked against the grown log."""

from __future__ import annotations

import json
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
    assert "prefix of the log's checkpoint of 520" in checked.output

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
