"""``mes-hub adapter check|run sparkplug --config FILE`` as a user runs them: real processes, a
real MQTT broker with a Sparkplug B edge node on loopback, a real hub."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pysparkplug import DataType

from hub.bootstrap import Hub
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.sparkplug_peer import Broker, EdgeNode


@pytest.fixture
def edge_node() -> Iterator[EdgeNode]:
    broker = Broker()
    broker.start()
    node = EdgeNode(
        broker.port,
        metrics={
            "Running": (DataType.BOOLEAN, True),
            "Program": (DataType.STRING, "O1234"),
            "Strokes": (DataType.UINT32, 500),
        },
    )
    node.connect()
    yield node
    node.close()
    broker.kill()


def press_config(path: Path, node: EdgeNode, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.sparkplug]]\nhost = "127.0.0.1"\nport = {node.port}\ngroup_id = "Plant1"\n'
        "check_wait_s = 10\n\n"
        '[[adapters.sparkplug.machines]]\nmachine_id = "PRESS-9"\nedge_node = "Line1"\n'
        'execution = { metric = "Running" }\nprogram = "Program"\npart_count = "Strokes"\n'
    )
    return path


async def test_check_prints_what_the_births_would_publish(
    edge_node: EdgeNode, tmp_path: Path
) -> None:
    config = press_config(tmp_path / "mes-hub.toml", edge_node)
    code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code == 0, err
    assert f"sparkplug 127.0.0.1:{edge_node.port}: 4 events" in out
    assert "PRESS-9" in out and "mes.machine.execution.v1" in out and "O1234" in out
    assert edge_node.rebirth_requests == 1  # check asked for the births


async def test_check_of_an_unreachable_broker_fails(tmp_path: Path) -> None:
    from tests.sparkplug_peer import free_port

    config = tmp_path / "mes-hub.toml"
    config.write_text(
        f'[[adapters.sparkplug]]\nhost = "127.0.0.1"\nport = {free_port()}\ngroup_id = "G"\n'
        'machines = [{ machine_id = "M1", edge_node = "N1", part_count = "P" }]\n'
    )
    code, _, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code == 1
    assert "BrokerLost: cannot connect" in " ".join(err.split())


async def test_adapter_run_feeds_the_hub_until_ctrl_c(
    hub: Hub, edge_node: EdgeNode, tmp_path: Path
) -> None:
    config = press_config(tmp_path / "mes-hub.toml", edge_node, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "sparkplug", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    site = hub.settings.site

    def press() -> tuple[str | None, int]:
        machine = hub.store.machine(site, "PRESS-9")
        parts = stored_parts(hub.store, site, "PRESS-9") if machine else 0
        return (machine.execution if machine else None, parts)

    try:
        await eventually(lambda: press()[0] == "ACTIVE", timeout=60)
        edge_node.set(Strokes=507)  # seven strokes later
        await eventually(lambda: press() == ("ACTIVE", 7), timeout=30)
        edge_node.set(Running=False)
        await eventually(lambda: press()[0] == "STOPPED", timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]
    assert f"adapter sparkplug 127.0.0.1:{edge_node.port}" in " ".join(
        out.decode().split()
    )  # Rich wraps long lines
