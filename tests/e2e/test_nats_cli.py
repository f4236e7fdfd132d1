"""NATS identities from the command line: an adapter on the hub's machine finds the embedded
server and its identity in the data dir; an external nats-server configured from
``mes-hub nats server-config`` takes the hub with the same identities file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from hub.bootstrap import build_hub
from hub.cli import app
from hub.nats import EmbeddedNatsServer
from hub.nats_auth import identities, server_config
from hub.settings import load_settings
from projections.rules.plant import PlantConfig
from tests.conftest import eventually


async def test_an_adapter_on_the_hub_s_machine_connects_with_what_the_hub_left(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hub"
    hub = await build_hub(load_settings(data_dir=data_dir), projections=False)
    try:
        printed = CliRunner().invoke(
            app, ["nats", "credentials", "--identity", "machines", "--data-dir", str(data_dir)]
        )
        assert printed.exit_code == 0, printed.output
        document = json.loads(printed.output)
        assert (document["url"], document["user"]) == (hub.nats_url, "machines")
        assert document["site"] == "default"
        # Set up for another site, an adapter with this file is refused before it starts.
        credentials_file = tmp_path / "adapter-nats.json"
        credentials_file.write_text(printed.output)
        elsewhere = CliRunner().invoke(
            app,
            ["adapter", "run", "simulator", "--machines", "1", "--max-events", "1"],
            env={"MES_HUB_NATS_CREDENTIALS": str(credentials_file), "MES_HUB_SITE": "plant2"},
        )
        assert elsewhere.exit_code != 0
        assert str(credentials_file) in elsewhere.output and "'site'" in elsewhere.output
        assert "set [hub] site = 'default'" in elsewhere.output
        assert document["password"] not in elsewhere.output
        refused = CliRunner().invoke(
            app, ["nats", "credentials", "--identity", "hub", "--data-dir", str(data_dir)]
        )
        assert refused.exit_code == 2 and "unknown identity 'hub'" in refused.output
        # No --nats-url, no credentials: the simulator finds both in the hub's data dir.
        simulator = subprocess.run(
            [sys.executable, "-m", "hub", "adapter", "run", "simulator", "--data-dir",
             str(data_dir), "--machines", "3", "--speed", "0", "--max-events", "30"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        assert simulator.returncode == 0, simulator.stderr.decode()[-2000:]
        await eventually(lambda: hub.ingest_stats().applied >= 30, timeout=30)
        assert hub.ingest_stats().rejected == 0
    finally:
        await hub.close()


async def test_an_external_nats_configured_from_server_config_takes_the_hub(
    tmp_path: Path,
) -> None:
    identities_file = tmp_path / "nats-identities.json"
    made = CliRunner().invoke(app, ["nats", "server-config", "--identities", str(identities_file)])
    assert made.exit_code == 0, made.output
    block = made.stdout[made.stdout.index("authorization") :]
    assert block == server_config(identities(identities_file), "default")
    written = tmp_path / "nats-auth.conf"
    to_file = CliRunner().invoke(
        app,
        ["nats", "server-config", "--identities", str(identities_file), "--output", str(written)],
    )
    assert to_file.exit_code == 0, to_file.output
    assert written.read_text() == block and (written.stat().st_mode & 0o077) == 0
    with EmbeddedNatsServer(tmp_path / "nats", authorization=block) as server:
        settings = load_settings(
            data_dir=tmp_path / "hub", nats_url=server.url, nats_identities=identities_file
        )
        hub = await build_hub(settings, projections=False, plant=PlantConfig(time_zone="UTC"))
        try:
            # The hub's own event, signed, through the hub identity; ingest takes it.
            await eventually(lambda: hub.ingest_stats().applied == 1, timeout=30)
            assert hub.store.plant("default") is not None
        finally:
            await hub.close()
