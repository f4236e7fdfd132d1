"""``mes-hub adapter check|run`` with a FOCAS entry, as a user runs them: real processes, the
loopback FOCAS peer, a real hub."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from hub.bootstrap import Hub
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.focas_peer import FocasPeer, PeerAlarm


def focas_config(path: Path, port: int, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.focas]]\nmachine_id = "ROBODRILL-2"\nhost = "127.0.0.1"\nport = {port}\n'
        "poll_s = 0.1\n"
    )
    return path


async def test_check_prints_what_the_control_would_publish(tmp_path: Path) -> None:
    peer = FocasPeer()
    peer.run, peer.main_program = 3, 4711
    peer.alarms = [PeerAlarm(1010, 2, 0, "SPINDLE OVERLOAD")]
    await peer.start()
    try:
        config = focas_config(tmp_path / "mes-hub.toml", peer.port)
        code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    finally:
        await peer.stop()
    assert code == 0, err
    assert f"focas 127.0.0.1:{peer.port}" in out and "ROBODRILL-2" in out
    assert "mes.machine.execution.v1" in out and "O4711" in out and "ACTIVE" in out
    assert "2:1010" in out and "SPINDLE OVERLOAD" in out  # alarm 1010 of type 2


async def test_check_of_an_unreachable_control_fails(tmp_path: Path) -> None:
    nobody = FocasPeer()
    await nobody.start()
    await nobody.stop()
    config = focas_config(tmp_path / "mes-hub.toml", nobody.port)
    code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code != 0
    assert "cannot connect" in out + err


async def test_adapter_run_focas_feeds_a_running_hub_until_ctrl_c(hub: Hub, tmp_path: Path) -> None:
    peer = FocasPeer()
    peer.run = 3
    peer.set_count(100)
    await peer.start()
    config = focas_config(tmp_path / "mes-hub.toml", peer.port, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "focas", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    site = hub.settings.site

    def machine() -> tuple[str | None, str | None, int]:
        found = hub.store.machine(site, "ROBODRILL-2")
        if found is None:
            return (None, None, 0)
        return (found.execution, found.program, stored_parts(hub.store, site, "ROBODRILL-2"))

    try:
        await eventually(lambda: machine()[0] == "ACTIVE", timeout=60)
        peer.set_count(103)  # three parts later
        peer.main_program = 2001
        await eventually(lambda: machine() == ("ACTIVE", "O2001", 3), timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        await peer.stop()
    assert process.returncode == 0, err.decode()[-2000:]
    assert "adapter focas 127.0.0.1" in " ".join(out.decode().split())
