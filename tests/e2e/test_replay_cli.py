"""``mes-hub replay``, ``mes-hub import`` and ``mes-hub store new-key`` as a user runs them:
real processes, a real hub's store."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from hub.bootstrap import build_hub
from hub.settings import Settings, load_settings
from hub.store import EventStore
from tests.conftest import T0, cloud_event

MES_HUB = [sys.executable, "-m", "hub"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MES_HUB, *args],
        capture_output=True,
        text=True,
        timeout=180,
        # (Wide: what is asserted on is not cut by the wrapping of a long temporary path.)
        env={**os.environ, "COLUMNS": "500", **(env or {})},
    )


async def a_hub_that_ran(settings: Settings) -> None:
    events = [
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 5, "kind": "all"},
                    at=timedelta(minutes=10)),
        cloud_event("mes.erp.order.released.v1", "SO-1",
                    {"order_id": "SO-1", "part_number": "P", "quantity": 3,
                     "due": "2026-03-03T00:00:00Z"}),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"},
                    at=timedelta(minutes=1)),
    ]  # fmt: skip
    hub = await build_hub(settings, projections=False)
    try:
        await hub.publisher.publish_many(events)
        await hub.wait_caught_up(60)
    finally:
        await hub.close()


@pytest.fixture
async def ran(tmp_path: Path) -> Path:
    data_dir = tmp_path / "original"
    await a_hub_that_ran(load_settings(data_dir=data_dir))
    return data_dir


def test_replay_writes_json_lines_and_import_builds_a_hub_from_them(
    ran: Path, tmp_path: Path
) -> None:
    out = tmp_path / "history.jsonl"
    result = run("replay", "--data-dir", str(ran), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "4 CloudEvents written" in result.stderr
    assert out.stat().st_mode & 0o777 == 0o600  # plain CloudEvents: for its owner only
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["type"] for line in lines][:1] == ["mes.machine.execution.v1"]
    assert {line["messite"] for line in lines} == {"default"}
    assert all(isinstance(line["mesposition"], int) for line in lines)
    assert lines[0]["mesactorkind"] == "adapter" and lines[0]["mesactorid"] == "urn:test"
    assert lines[0]["time"] == T0.isoformat().replace("+00:00", "Z")

    # A window by position, then by recorded time.
    second = lines[1]["mesposition"]
    part = tmp_path / "part.jsonl"
    result = run("replay", "--data-dir", str(ran), "--out", str(part), "--from", str(second),
                 "--to", str(second))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["id"] for x in part.read_text().splitlines()] == [lines[1]["id"]]
    later = datetime.fromisoformat(lines[-1]["mesrecordedtime"]) + timedelta(seconds=1)
    result = run("replay", "--data-dir", str(ran), "--out", str(part), "--from", later.isoformat())
    assert result.returncode == 0 and part.read_text() == ""

    new = tmp_path / "imported"
    result = run("import", str(out), "--data-dir", str(new))
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())  # (as wrapped to the terminal's width, or 80)
    assert "imported 4 CloudEvents" in said and "4 stored" in said
    store = EventStore(load_settings(data_dir=new), read_only=True)
    try:
        machine = store.machine("default", "M1")
        assert machine is not None and machine.order_id == "SO-1"
        assert machine.counter_values == {"all": 5}
    finally:
        store.close()

    # Not twice into the same hub.
    result = run("import", str(out), "--data-dir", str(new))
    assert result.returncode == 2 and "import into an empty --data-dir" in result.stderr


def test_bad_bounds_and_exports_are_refused(ran: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    result = run("replay", "--data-dir", str(ran), "--out", str(out), "--from", "yesterday")
    assert result.returncode == 2 and "a log position (an integer)" in result.stderr
    result = run("replay", "--data-dir", str(ran), "--out", str(out), "--to", "2026-03-02T06:00")
    assert result.returncode == 2 and "with its offset" in result.stderr
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"specversion": "1.0"}\n')
    result = run("import", str(bad), "--data-dir", str(tmp_path / "new"))
    assert result.returncode == 2 and "line 1: not a CloudEvent to import" in result.stderr
    result = run("replay", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out))
    assert result.returncode == 2 and "no event store" in result.stderr


def test_new_key_makes_a_key_and_a_wrong_key_is_refused_at_start(tmp_path: Path) -> None:
    result = run("store", "new-key")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert len(base64.b64decode(key, validate=True)) == 32
    assert "store_encryption_key" in result.stderr
    data_dir = tmp_path / "hub"
    EventStore(load_settings(data_dir=data_dir, store_encryption_key=key)).close()
    other = run("store", "new-key").stdout.strip()
    out = tmp_path / "x.jsonl"
    for env, why in (
        ({"MES_HUB_STORE_ENCRYPTION_KEY": other}, "not the key this store was encrypted with"),
        ({}, "is not set, but this store is encrypted"),
    ):
        result = run("replay", "--data-dir", str(data_dir), "--out", str(out), env=env)
        assert result.returncode == 2, result.stderr
        assert "hub.store_encryption_key" in result.stderr and why in result.stderr
        assert key not in result.stderr + result.stdout
        assert other not in result.stderr + result.stdout
    result = run("replay", "--data-dir", str(data_dir), "--out", str(out),
                 env={"MES_HUB_STORE_ENCRYPTION_KEY": key})  # fmt: skip
    assert result.returncode == 0, result.stderr
