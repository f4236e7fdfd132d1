"""``mes-hub adapter run|check --config FILE`` as a user runs them: real processes, a real SHDR
peer on loopback, a real hub."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters.machines.config import AdaptersConfig
from hub.bootstrap import Hub
from hub.settings import Settings
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.integration.test_shdr_adapter import MTCONNECT, ShdrPeer, needs_capture

MES_HUB = [sys.executable, "-m", "hub"]


async def mes_hub(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def okuma_config(path: Path, port: int, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.shdr]]\nhost = "127.0.0.1"\nport = {port}\nmachine_id = "OKUMA-1"\n'
        f'devices_xml = "{MTCONNECT / "demo_agent_Devices.xml"}"\ndevice = "OKUMA"\n'
    )
    return path


async def test_a_bad_adapters_table_stops_at_start_with_file_key_and_reason(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text('[[adapters.shdr]]\nport = 99999\n[[adapters.modbus]]\nmachine_id = "P 1"\n')
    code, _, err = await mes_hub("adapter", "check", "--config", str(config))
    err = " ".join(err.split())
    assert code == 2
    assert str(config) in err and "adapters.shdr.0.host" in err and "Field required" in err
    assert "adapters.shdr.0.port" in err and "adapters.modbus.0.machine_id" in err


@needs_capture
async def test_check_connects_once_and_prints_what_it_would_publish(tmp_path: Path) -> None:
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()[:40]
    peer = ShdrPeer(lines)
    await peer.start()
    try:
        config = okuma_config(tmp_path / "mes-hub.toml", peer.port)
        code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    finally:
        await peer.stop()
    assert code == 0, err
    assert "shdr 127.0.0.1" in out and "OKUMA-1" in out
    assert "mes.machine.execution.v1" in out and "IMTS-2022-2-HOB.MIN" in out


@needs_capture
async def test_adapter_run_feeds_a_running_hub_and_stops_cleanly_on_ctrl_c(
    hub: Hub, tmp_path: Path
) -> None:
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()
    peer = ShdrPeer(lines)
    await peer.start()
    config = okuma_config(tmp_path / "mes-hub.toml", peer.port, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "shdr", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        site = hub.settings.site
        await eventually(
            lambda: (
                (m := hub.store.machine(site, "OKUMA-1")) is not None
                and m.counter_values.get("all") is not None
                and m.execution is not None
            ),
            timeout=60,
        )
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        await peer.stop()
    assert process.returncode == 0, err.decode()[-2000:]
    assert "adapter shdr 127.0.0.1" in out.decode()


@pytest.mark.parametrize("protocol", ["nope"])
async def test_an_unknown_protocol_is_refused(protocol: str, tmp_path: Path) -> None:
    code, _, err = await mes_hub("adapter", "run", protocol, "--nats-url", "nats://127.0.0.1:1")
    assert code == 2 and "unknown adapter 'nope'" in err and "mtconnect" in err


async def test_messages_naming_a_config_section_keep_its_brackets(tmp_path: Path) -> None:
    # Rich markup once ate "[adapters]" and "[hub]" from what the CLI printed.
    empty = tmp_path / "empty.toml"
    empty.write_text("[hub]\n")
    code, _, err = await mes_hub("adapter", "check", "--config", str(empty))
    assert code == 2 and "no adapters configured in [adapters]" in err
    code, _, err = await mes_hub("adapter", "run", "shdr", "--nats-url", "nats://127.0.0.1:1")
    assert code == 2 and "the machines are in its [adapters]" in err


async def test_adapter_run_modbus_feeds_the_hub_from_a_plc(hub: Hub, tmp_path: Path) -> None:
    from tests.integration.test_modbus_adapter import UNIT, Plc

    plc = Plc()
    await plc.set("holding", 0, [1])  # running
    await plc.set("holding", 10, [0, 1234])  # part counter, uint32 big-endian
    await plc.start()
    config = tmp_path / "mes-hub.toml"
    config.write_text(
        f'[hub]\nnats_url = "{hub.nats_url}"\ndata_dir = "{tmp_path / "adapter-data"}"\n\n'
        f'[[adapters.modbus]]\nmachine_id = "PRESS-2"\nhost = "127.0.0.1"\nport = {plc.port}\n'
        f"unit = {UNIT}\npoll_s = 0.1\n"
        '[[adapters.modbus.registers]]\naddress = 0\nmeaning = "running"\n'
        '[[adapters.modbus.registers]]\naddress = 10\ntype = "uint32"\nmeaning = "part_count"\n'
    )
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "modbus", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    site = hub.settings.site

    def press() -> tuple[str | None, int]:
        machine = hub.store.machine(site, "PRESS-2")
        parts = stored_parts(hub.store, site, "PRESS-2") if machine else 0
        return (machine.execution if machine else None, parts)

    try:
        await eventually(lambda: press()[0] == "ACTIVE", timeout=60)
        await plc.set("holding", 10, [0, 1240])  # six parts later
        await eventually(lambda: press() == ("ACTIVE", 6), timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        await plc.stop()
    assert process.returncode == 0, err.decode()[-2000:]


def test_adapter_run_reads_the_config_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from hub.cli import adapter, app

    config = tmp_path / "mes-hub.toml"
    config.write_text(
        '[hub]\nnats_url = "nats://127.0.0.1:1"\n\n'
        '[[adapters.shdr]]\nhost = "127.0.0.1"\nport = 7878\nmachine_id = "OKUMA-1"\n'
    )
    reads: list[Path] = []
    read_text = Path.read_text

    def counting_read_text(path: Path, *args: Any, **kwargs: Any) -> str:
        if path == config:
            reads.append(path)
        return read_text(path, *args, **kwargs)

    ran: list[tuple[Settings, Any, AdaptersConfig, str]] = []
    monkeypatch.setattr(Path, "read_text", counting_read_text)
    monkeypatch.setattr(adapter, "_run_adapters", lambda *args: ran.append(args))
    monkeypatch.setattr(adapter, "setup_logging", lambda *args, **kwargs: None)
    result = CliRunner().invoke(app, ["adapter", "run", "shdr", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert reads == [config]
    ((settings, link, adapters, protocol),) = ran
    assert (settings.nats_url, link.url, protocol) == ("nats://127.0.0.1:1",) * 2 + ("shdr",)
    assert [entry.machine_id for entry in adapters.shdr] == ["OKUMA-1"]


async def test_check_names_a_control_that_does_not_answer_within_the_timeout(
    tmp_path: Path,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers: a hung control

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "mes-hub.toml"
    config.write_text(
        f'[[adapters.haas]]\nmachine_id = "VF2-3"\nhost = "127.0.0.1"\nport = {port}\n'
        "timeout_s = 30\n"
    )
    try:
        code, _, err = await mes_hub("adapter", "check", "--config", str(config), "--timeout", "1")
    finally:
        server.close()
    assert code == 1
    assert "haas 127.0.0.1" in err and "no answer within 1 s" in err, err


def test_the_console_names_an_ipv6_peer_in_brackets() -> None:
    from adapters.machines.config import AdaptersConfig
    from adapters.machines.registry import build_adapters, describe

    config = AdaptersConfig.model_validate(
        {"focas": [{"machine_id": "ROBODRILL-1", "host": "fd00::31", "part_count_macro": 3901}]}
    )
    assert [describe(a) for a in build_adapters(config)] == ["focas [fd00::31]:8193"]
