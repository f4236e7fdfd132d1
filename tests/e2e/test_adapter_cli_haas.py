"""``mes-hub adapter check|run`` for Haas MDC as a user runs them: real processes, the loopback
control (tests/haas_peer.py) and a real hub."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from hub.bootstrap import Hub
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.haas_peer import HaasPeer


def haas_config(path: Path, port: int, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.haas]]\nmachine_id = "VF2-9"\nhost = "127.0.0.1"\nport = {port}\n'
        'serial_number = "1234567"\npoll_s = 0.1\n'
    )
    return path


async def test_check_prints_what_it_would_publish(tmp_path: Path) -> None:
    peer = HaasPeer(program="O00031", status="FEED HOLD", mode="MEM", macros={3901: 42})
    await peer.start()
    try:
        config = haas_config(tmp_path / "mes-hub.toml", peer.port)
        code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    finally:
        await peer.stop()
    assert code == 0, err
    assert f"haas 127.0.0.1:{peer.port}: 4 events" in out
    assert "mes.machine.execution.v1" in out and "FEED_HOLD" in out and "O00031" in out
    assert "'count': 42" in out
    assert peer.queries == ["?Q100", "?Q600 3901", "?Q500", "?Q104"]


async def test_check_of_an_unreachable_control_fails(tmp_path: Path) -> None:
    peer = HaasPeer()
    await peer.start()
    port = peer.port
    await peer.stop()  # nobody listens there now
    config = haas_config(tmp_path / "mes-hub.toml", port)
    code, _, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code == 1
    assert f"cannot connect to 127.0.0.1:{port}" in " ".join(err.split())


async def test_adapter_run_feeds_the_hub_until_ctrl_c(hub: Hub, tmp_path: Path) -> None:
    peer = HaasPeer(program="O00031", status="BUSY", mode="MEM", macros={3901: 100})
    await peer.start()
    config = haas_config(tmp_path / "mes-hub.toml", peer.port, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "haas", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    site = hub.settings.site

    def machine() -> tuple[str | None, int]:
        found = hub.store.machine(site, "VF2-9")
        parts = stored_parts(hub.store, site, "VF2-9") if found else 0
        return (found.execution if found else None, parts)

    try:
        await eventually(lambda: machine()[0] == "ACTIVE", timeout=60)
        peer.macro(3901, 106)  # six parts later
        await eventually(lambda: machine() == ("ACTIVE", 6), timeout=30)
        peer.set(status="IDLE")
        await eventually(lambda: machine()[0] == "READY", timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        await peer.stop()
    assert process.returncode == 0, err.decode()[-2000:]
    assert f"haas 127.0.0.1:{peer.port}" in " ".join(out.decode().split())
    assert all(query.startswith("?Q") for query in peer.queries)
