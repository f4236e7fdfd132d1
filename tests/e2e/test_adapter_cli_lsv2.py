"""``mes-hub adapter check|run`` for HEIDENHAIN controls as a user runs them: real processes, the
LSV2 server of ``tests/lsv2_peer.py`` on loopback (a control as pyLSV2 sees it), a real hub."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.bootstrap import Hub
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.lsv2_peer import Lsv2Peer, PeerError


@pytest.fixture
async def control() -> AsyncIterator[Lsv2Peer]:
    peer = Lsv2Peer()
    peer.set_plc("D1200", 100)
    await peer.start()
    yield peer
    await peer.stop()


def lsv2_config(path: Path, port: int, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.lsv2]]\nmachine_id = "DMU-50"\nhost = "127.0.0.1"\nport = {port}\n'
        'poll_s = 0.1\ntimeout_s = 2.0\npart_count = "D1200"\n'
    )
    return path


async def test_check_prints_what_it_would_publish(control: Lsv2Peer, tmp_path: Path) -> None:
    control.program_state = 0  # a program runs
    control.errors = [PeerError(1200, "Coolant level low", error_class=1)]
    config = lsv2_config(tmp_path / "mes-hub.toml", control.port)
    code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code == 0, err
    assert f"lsv2 127.0.0.1:{control.port}" in out and "DMU-50" in out
    assert "mes.machine.execution.v1" in out and "ACTIVE" in out and "PART-7.h" in out
    assert "'count': 100" in out and "Coolant level low" in out


async def test_check_says_which_login_the_control_refused(
    control: Lsv2Peer, tmp_path: Path
) -> None:
    control.dnc_option = False
    config = lsv2_config(tmp_path / "mes-hub.toml", control.port)
    code, _, err = await mes_hub("adapter", "check", "--config", str(config))
    err = " ".join(err.split())
    assert code == 1
    assert "LoginRefused: the control refused the DNC login" in err
    assert "the control lacks the DNC option (or it is not enabled)" in err


async def test_adapter_run_lsv2_feeds_the_hub_until_ctrl_c(
    control: Lsv2Peer, hub: Hub, tmp_path: Path
) -> None:
    control.program_state = 0
    config = lsv2_config(tmp_path / "mes-hub.toml", control.port, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "lsv2", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    site = hub.settings.site

    def machine() -> tuple[str | None, int]:
        found = hub.store.machine(site, "DMU-50")
        parts = stored_parts(hub.store, site, "DMU-50") if found else 0
        return (found.execution if found else None, parts)

    try:
        await eventually(lambda: machine()[0] == "ACTIVE", timeout=60)
        control.set_plc("D1200", 106)  # six parts later
        await eventually(lambda: machine() == ("ACTIVE", 6), timeout=30)
        control.program_state = 2  # M30
        await eventually(lambda: machine()[0] == "PROGRAM_COMPLETED", timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert f"adapter lsv2 127.0.0.1:{control.port}" in " ".join(
        out.decode().split()
    )  # Rich wraps long lines
