"""``mes-hub adapter check|run serial --config FILE`` as a user runs them: real processes, a
machine printing status lines on a pseudo-terminal (``tests.serial_peer``), a real hub."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from hub.bootstrap import Hub
from tests.conftest import eventually
from tests.counting import stored_parts
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.serial_peer import SerialMachine


def serial_config(path: Path, link: Path, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.serial]]\nmachine_id = "LATHE-3"\nport = "{link}"\nbaudrate = 9600\n'
        "reconnect_max_s = 0.5\n"
        '[[adapters.serial.patterns]]\nmatch = "^CYCLE START$"\nmeaning = "execution"\n'
        'value = "ACTIVE"\n'
        '[[adapters.serial.patterns]]\nmatch = "^PART COMPLETE (?P<count>\\\\d+)$"\n'
        'meaning = "part_count"\n'
        '[[adapters.serial.patterns]]\nmatch = "^PROGRAM (?P<program>\\\\S+)$"\n'
        'meaning = "program"\n'
    )
    return path


@contextlib.asynccontextmanager
async def printing(machine: SerialMachine, lines: Callable[[], list[str]]) -> AsyncIterator[None]:
    """The machine prints ``lines()`` again and again (a process that opens the port later
    sees them: what came before it opened is dropped, as a real port's input is)."""

    async def loop() -> None:
        while True:
            machine.print(*lines())
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_check_opens_the_port_and_prints_what_it_would_publish(tmp_path: Path) -> None:
    machine = SerialMachine(tmp_path / "ttyCNC")
    try:
        config = serial_config(tmp_path / "mes-hub.toml", machine.link)
        async with printing(machine, lambda: ["PROGRAM O4711", "CYCLE START", "PART COMPLETE 7"]):
            code, out, err = await mes_hub("adapter", "check", "--config", str(config))
    finally:
        machine.close()
    assert code == 0, err
    assert f"serial {machine.link}" in out and "LATHE-3" in out
    assert "mes.machine.execution.v1" in out and "O4711" in out and "'count': 7" in out
    # The same lines printed again and again are one reading each.
    assert out.count("mes.machine.partcount.v1") == 1


async def test_check_fails_when_the_port_is_absent(tmp_path: Path) -> None:
    config = serial_config(tmp_path / "mes-hub.toml", tmp_path / "ttyGONE")
    code, _, err = await mes_hub("adapter", "check", "--config", str(config))
    assert code == 1 and "cannot open" in err


async def test_adapter_run_serial_feeds_a_running_hub_until_ctrl_c(
    hub: Hub, tmp_path: Path
) -> None:
    machine = SerialMachine(tmp_path / "ttyCNC")
    config = serial_config(tmp_path / "mes-hub.toml", machine.link, hub.nats_url)
    count = {"n": 100}
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "adapter", "run", "serial", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "400"},  # a device path wider than the console
    )  # fmt: skip
    site = hub.settings.site

    def lathe() -> tuple[str | None, int]:
        found = hub.store.machine(site, "LATHE-3")
        parts = stored_parts(hub.store, site, "LATHE-3") if found else 0
        return (found.execution if found else None, parts)

    try:
        lines = lambda: ["CYCLE START", f"PART COMPLETE {count['n']}"]  # noqa: E731
        async with printing(machine, lines):
            await eventually(lambda: lathe()[0] == "ACTIVE", timeout=60)
            count["n"] = 105  # five parts later
            await eventually(lambda: lathe() == ("ACTIVE", 5), timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        machine.close()
    assert process.returncode == 0, err.decode()[-2000:]
    assert f"adapter serial {machine.link}" in " ".join(
        out.decode().split()
    )  # Rich wraps long lines
