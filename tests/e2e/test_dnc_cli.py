"""``mes-hub dnc send`` as a user runs it: a real process, a fake control on a pseudo-terminal
(``tests.serial_peer``), a real hub receiving the record of each send."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.machines.dnc import SendJournal, read_program
from adapters.machines.serial_line import SerialConfig
from hub.bootstrap import Hub
from tests.conftest import api_client, api_key, eventually
from tests.e2e.test_adapter_cli import MES_HUB, mes_hub
from tests.integration.test_dnc import BAUD, write_program
from tests.serial_peer import FakeControl

TYPE = "mes.machine.program_sent.v1"


def dnc_config(path: Path, link: Path, nats_url: str, **dnc: Any) -> Path:
    options = "".join(f"{key} = {value}\n" for key, value in dnc.items())
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{path.parent / "adapter-data"}"\n\n'
        f'[[adapters.serial]]\nmachine_id = "LATHE-3"\nport = "{link}"\nbaudrate = {BAUD}\n'
        f"[adapters.serial.dnc]\n{options}"
    )
    return path


async def records(http: httpx.AsyncClient, hub: Hub) -> list[dict[str, Any]]:
    await hub.wait_caught_up()
    answer = await http.get(
        "/api/v1/audit/events",
        params={"type": TYPE},
        headers={"Authorization": f"Bearer {api_key('auditor')}"},
    )
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


async def test_completed_failed_and_cancelled_sends_exit_0_1_130_and_are_recorded_once(
    hub: Hub, tmp_path: Path
) -> None:
    program_file = write_program(tmp_path / "flange.nc")
    size = len(program_file.read_bytes())

    # Completed: byte-identical through the control's pauses; exit 0.
    control = FakeControl(tmp_path / "ttyA")
    try:
        config = dnc_config(tmp_path / "a.toml", control.link, hub.nats_url)
        code, out, err = await mes_hub(
            "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(program_file)
        )
        await eventually(lambda: len(control.received) >= size)
        assert bytes(control.received) == program_file.read_bytes()
        assert control.overruns == 0 and control.xoffs > 0
    finally:
        control.close()
    assert code == 0, err
    assert "sending" in out and "program O1234" in out and f"{size:,} bytes" in out
    assert "paused by the control (XOFF)" in out
    assert "completed" in out and "recorded in the hub" in out

    # Failed: the control says XOFF and never XON; exit 1.
    control = FakeControl(tmp_path / "ttyB", never_xon=True)
    try:
        config = dnc_config(tmp_path / "b.toml", control.link, hub.nats_url, resume_timeout_s=0.5)
        code, out, err = await mes_hub(
            "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(program_file)
        )
    finally:
        control.close()
    assert code == 1, out + err
    assert "failed" in err and "no XON within 0.5 s" in " ".join(err.split())

    # Cancelled with Ctrl-C mid-way; exit 130.
    control = FakeControl(tmp_path / "ttyC")
    config = dnc_config(tmp_path / "c.toml", control.link, hub.nats_url)
    process = await asyncio.create_subprocess_exec(
        *MES_HUB, "dnc", "send", "--config", str(config), "--machine", "LATHE-3",
        str(program_file), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        await eventually(lambda: len(control.received) > 2000, timeout=60)
        process.send_signal(signal.SIGINT)
        out_bytes, err_bytes = await asyncio.wait_for(process.communicate(), 60)
        received = bytes(control.received)
    finally:
        control.close()
    err = " ".join(err_bytes.decode().split())
    assert process.returncode == 130, err
    assert "cancelled" in err and "Press RESET on the control" in err
    assert received == program_file.read_bytes()[: len(received)] and len(received) < size
    assert "recorded in the hub" in out_bytes.decode()

    async with api_client(hub) as http:
        await eventually(lambda: _count(records(http, hub), 3))
        found = await records(http, hub)
    outcomes = sorted((r["data"]["outcome"], r["data"]["sent_bytes"]) for r in found)
    assert [o for o, _ in outcomes] == ["cancelled", "completed", "failed"]
    assert dict(outcomes)["completed"] == size
    assert dict(outcomes)["cancelled"] == len(received)
    assert {r["subject"] for r in found} == {"LATHE-3"}


async def _count(found: Any, n: int) -> bool:
    return len(await found) >= n


async def test_a_file_without_percent_lines_or_an_unknown_machine_is_refused(
    tmp_path: Path,
) -> None:
    link = tmp_path / "ttyNONE"
    config = dnc_config(tmp_path / "mes-hub.toml", link, "nats://127.0.0.1:1")
    fragment = tmp_path / "fragment.nc"
    fragment.write_text("O1234\nG0 X1\nM30\n")
    code, _, err = await mes_hub(
        "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(fragment)
    )
    assert code == 2 and "refused" in err and "no '%' line" in err
    program = write_program(tmp_path / "ok.nc", blocks=3)
    code, _, err = await mes_hub(
        "dnc", "send", "--config", str(config), "--machine", "MILL-9", str(program)
    )
    assert code == 2 and "no [[adapters.serial]] entry with machine_id = 'MILL-9'" in err
    # A port that is not there: nothing sent, exit 1.
    code, _, err = await mes_hub(
        "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(program)
    )
    assert code == 1 and "cannot open" in err and str(link) in " ".join(err.split())


def start_send(config: Path, program_file: Path) -> Any:
    return asyncio.create_subprocess_exec(
        *MES_HUB, "dnc", "send", "--config", str(config), "--machine", "LATHE-3",
        str(program_file), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def journal_position(config: Path) -> int:
    """How far the running send's journal says it got (0 without one)."""
    folder = config.parent / "adapter-data" / "adapter-buffer" / "dnc" / "journal"
    for path in folder.glob("*.journal"):
        lines = path.read_bytes().split(b"\n")
        if len(lines) > 1 and lines[1].strip():
            return int(lines[1].split()[0])
    return 0


async def test_a_sender_killed_mid_send_is_recorded_as_failed_by_the_next_command(
    hub: Hub, tmp_path: Path
) -> None:
    program_file = write_program(tmp_path / "flange.nc")
    control = FakeControl(tmp_path / "ttyK")
    config = dnc_config(tmp_path / "k.toml", control.link, hub.nats_url)
    process = await start_send(config, program_file)
    try:
        await eventually(lambda: journal_position(config) >= 2048, timeout=60)
        process.kill()  # SIGKILL: no handler runs, no record is made
        await process.communicate()
        position = journal_position(config)
        await eventually(lambda: len(control.received) >= position)
        received = len(control.received)
    finally:
        control.close()
    assert process.returncode == -signal.SIGKILL

    code, out, err = await mes_hub("dnc", "flush", "--config", str(config))
    out = " ".join(out.split())
    assert code == 0, out + err
    assert "LATHE-3: recorded a send whose sender was interrupted: O1234" in out
    assert "LATHE-3: 1 record(s) sent to the hub" in out
    assert journal_position(config) == 0  # the journal is gone
    async with api_client(hub) as http:
        await eventually(lambda: _count(records(http, hub), 1))
        (record,) = await records(http, hub)
    data = record["data"]
    assert data["outcome"] == "failed" and position <= data["sent_bytes"] <= received
    assert (
        f"at least {data['sent_bytes']} of {data['size_bytes']} bytes had gone out"
        in (data["message"])
    )
    assert "the sender was interrupted" in data["message"]
    # Another command finds nothing more to record.
    code, out, _ = await mes_hub("dnc", "flush", "--config", str(config))
    assert code == 0 and "nothing waits" in out


async def test_records_made_while_nats_is_down_wait_on_disk_and_flush_delivers_them_once(
    hub: Hub, tmp_path: Path
) -> None:
    program_file = write_program(tmp_path / "flange.nc")
    control = FakeControl(tmp_path / "ttyD")
    down = dnc_config(tmp_path / "d.toml", control.link, "nats://127.0.0.1:1")
    try:
        # The terminal closes mid-send (SIGHUP): cancelled as with Ctrl-C; exit 130.
        process = await start_send(down, program_file)
        await eventually(lambda: len(control.received) > 2000, timeout=60)
        process.send_signal(signal.SIGHUP)
        out_bytes, err_bytes = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 130, err_bytes.decode()
        assert "cancelled" in err_bytes.decode()
        assert "NATS unreachable: the record waits" in " ".join(out_bytes.decode().split())
        # A complete send, NATS still down.
        small = write_program(tmp_path / "small.nc", blocks=20)
        code, out, err = await mes_hub(
            "dnc", "send", "--config", str(down), "--machine", "LATHE-3", str(small)
        )
        assert code == 0, err
        assert "NATS unreachable: the record waits" in " ".join(out.split())
    finally:
        control.close()
    code, out, _ = await mes_hub("dnc", "flush", "--config", str(down), "--timeout", "1")
    assert code == 1 and "LATHE-3: 2 record(s) wait (NATS unreachable)" in out

    # NATS is reachable: both go out, once.
    code, out, err = await mes_hub(
        "dnc", "flush", "--config", str(down), "--nats-url", hub.nats_url
    )
    assert code == 0, out + err
    assert "LATHE-3: 2 record(s) sent to the hub" in out
    code, out, _ = await mes_hub("dnc", "flush", "--config", str(down), "--nats-url", hub.nats_url)
    assert code == 0 and "nothing waits" in out
    async with api_client(hub) as http:
        await eventually(lambda: _count(records(http, hub), 2))
        found = await records(http, hub)
    assert sorted(r["data"]["outcome"] for r in found) == ["cancelled", "completed"]


def journals(config: Path) -> Path:
    return config.parent / "adapter-data" / "adapter-buffer" / "dnc" / "journal"


@pytest.mark.parametrize("output", ["terminal", "pipe"])
async def test_a_send_whose_terminal_or_pipe_closed_is_cancelled_and_recorded_once(
    hub: Hub, tmp_path: Path, output: str
) -> None:
    # The terminal window closes (its pty gone: writes fail with EIO, and SIGHUP comes), or the
    # pipe the output went to closes (a pager quit): the send is cancelled, and its record is
    # still made although nothing can be printed.
    program_file = write_program(tmp_path / "flange.nc")
    control = FakeControl(tmp_path / "ttyH")
    config = dnc_config(tmp_path / "h.toml", control.link, hub.nats_url)
    command = [*MES_HUB, "dnc", "send", "--config", str(config), "--machine", "LATHE-3",
               str(program_file)]  # fmt: skip
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "xterm"}
    if output == "terminal":
        master, slave = os.openpty()
        process = subprocess.Popen(command, stdout=slave, stderr=slave, env=env)
        os.close(slave)
    else:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        await eventually(lambda: len(control.received) > 2000, timeout=60)
        if output == "terminal":
            os.close(master)  # writing to the terminal fails from now on
        else:
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            process.stderr.close()
        process.send_signal(signal.SIGHUP)
        code = await asyncio.to_thread(process.wait, 60)
        assert code == 130
        assert list(journals(config).glob("*")) == []  # recorded: no journal is left
        async with api_client(hub) as http:
            await eventually(lambda: _count(records(http, hub), 1))
            (record,) = await records(http, hub)
        assert record["data"]["outcome"] == "cancelled"
        sent = record["data"]["sent_bytes"]
        await eventually(lambda: len(control.received) >= sent)
        assert bytes(control.received) == program_file.read_bytes()[:sent]
    finally:
        if process.poll() is None:
            process.kill()
        control.close()


async def test_a_file_name_that_is_not_utf8_is_sent_and_recorded(hub: Hub, tmp_path: Path) -> None:
    program_file = Path(os.fsdecode(bytes(tmp_path) + b"/fl\xe4nsch.nc"))  # latin-1 "flänsch"
    write_program(program_file, blocks=20)
    control = FakeControl(tmp_path / "ttyU")
    try:
        config = dnc_config(tmp_path / "u.toml", control.link, hub.nats_url)
        code, out, err = await mes_hub(
            "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(program_file)
        )
    finally:
        control.close()
    assert code == 0, out + err
    assert "recorded in the hub" in out
    async with api_client(hub) as http:
        await eventually(lambda: _count(records(http, hub), 1))
        (record,) = await records(http, hub)
    # The name's byte that is not UTF-8 is written as \xNN; the program's name is the control's.
    assert record["data"]["file"] == f"{tmp_path}/fl\\xe4nsch.nc"
    assert record["data"]["program"] == "O1234"
    assert record["data"]["outcome"] == "completed"


async def test_a_send_the_contract_could_not_record_is_refused_before_the_port_opens(
    tmp_path: Path,
) -> None:
    # A device path so long that the record's source ("serial://<port>") exceeds the
    # contract's 1024 characters: the send could not be recorded, so it is not started (the
    # port, which does not exist, is not even tried).
    link = tmp_path / ("d" * 1100)
    config = dnc_config(tmp_path / "r.toml", link, "nats://127.0.0.1:1")
    program = write_program(tmp_path / "flange.nc", blocks=3)
    code, _, err = await mes_hub(
        "dnc", "send", "--config", str(config), "--machine", "LATHE-3", str(program)
    )
    err = " ".join(err.split())
    assert code == 2, err
    assert "refused: the send could not be recorded" in err and "cannot open" not in err
    assert not journals(config).exists()


async def test_two_commands_catching_up_at_once_record_a_killed_send_once(
    hub: Hub, tmp_path: Path
) -> None:
    config = dnc_config(tmp_path / "t.toml", tmp_path / "ttyT", hub.nats_url)
    entry = SerialConfig.model_validate({"machine_id": "LATHE-3", "port": str(tmp_path / "ttyT")})
    program = read_program(write_program(tmp_path / "flange.nc"))
    journal = SendJournal(journals(config), entry, program, "operator1")
    journal.begin(datetime.now(UTC))
    journal.advance(4096, 2.0)
    os.close(journal._fd)  # the sender was killed mid-send
    first, second = await asyncio.gather(
        mes_hub("dnc", "flush", "--config", str(config)),
        mes_hub("dnc", "flush", "--config", str(config)),
    )
    outs = " ".join(first[1].split()) + " ".join(second[1].split())
    assert outs.count("LATHE-3: recorded a send whose sender was interrupted") == 1, outs
    # The other command found nothing, or the journal held by the first: "may still wait".
    assert {first[0], second[0]} <= {0, 1}
    assert list(journals(config).glob("*")) == []
    async with api_client(hub) as http:
        await eventually(lambda: _count(records(http, hub), 1))
        (record,) = await records(http, hub)
    assert record["data"]["outcome"] == "failed" and record["data"]["sent_bytes"] == 4096
