"""The DNC drip feed against a fake control on a pseudo-terminal (``tests.serial_peer``): a small
receive buffer executed slowly, XOFF at high water, XON at low water, overruns recorded.
Real pyserial, a real pty, the sender's own XON/XOFF."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.markup import escape

from adapters.machines import dnc
from adapters.machines.dnc import (
    DripFeed,
    PortBusy,
    ProgramRefused,
    Progress,
    SendJournal,
    SendResult,
    leftover_sends,
    open_port,
    program_sent_event,
    read_program,
    trial_record,
    unreadable_journals,
)
from adapters.machines.serial_line import SerialConfig, SerialLineAdapter
from contracts import ContractViolation, validate_envelope
from hub.bootstrap import Hub
from hub.cli import dnc as cli_dnc
from hub.cli.dnc import HubLink, _catch_up, _link, _record
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running
from tests.conftest import api_client, api_key, eventually
from tests.serial_peer import FakeControl

BAUD = 38_400  # 3,840 bytes/s on the line; the control executes 2,500 bytes/s: it must pause


def write_program(path: Path, blocks: int = 360, name: str = "O1234") -> Path:
    """An ISO program of about 30 bytes a block (a 10 KB program for 360 blocks)."""
    rng = random.Random(blocks)
    body = [
        f"N{n} G01 X{rng.uniform(0, 500):.3f} Y{rng.uniform(0, 500):.3f} F{rng.randint(50, 900)}"
        for n in range(1, blocks + 1)
    ]
    path.write_bytes(
        ("\r\n".join(["%", f"{name} (TEST PART)", *body, "M30", "%"]) + "\r\n").encode()
    )
    return path


def config(link: Path, **dnc: Any) -> SerialConfig:
    return SerialConfig.model_validate(
        {"machine_id": "LATHE-3", "port": str(link), "baudrate": BAUD, "dnc": dnc}
    )


@pytest.fixture
def control(tmp_path: Path) -> Iterator[FakeControl]:
    fake = FakeControl(tmp_path / "ttyDNC")
    yield fake
    fake.close()


def send(
    control: FakeControl,
    program_file: Path,
    on_progress: Any = None,
    feed_hook: Any = None,
    **dnc: Any,
) -> tuple[Any, Any]:
    entry = config(control.link, **dnc)
    program = read_program(program_file, entry.dnc.end_of_block)
    port = open_port(entry)
    try:
        feed = DripFeed(port, entry, program, on_progress)
        if feed_hook is not None:
            feed_hook(feed)
        return program, feed.send()
    finally:
        port.close()


async def test_a_10_kb_program_arrives_byte_identical_through_xoff_pauses(
    control: FakeControl, tmp_path: Path
) -> None:
    program_file = write_program(tmp_path / "part.nc")
    updates: list[Progress] = []
    program, result = await asyncio.to_thread(send, control, program_file, updates.append)
    await eventually(lambda: len(control.received) >= len(program.data))
    assert len(program.data) > 10_000
    assert bytes(control.received) == program_file.read_bytes() == program.data
    assert control.overruns == 0
    # Writing stopped within one chunk of each XOFF (what was on its way, and one more chunk
    # written as the XOFF came in).
    assert control.after_xoff and max(control.after_xoff) <= 2 * 16
    # The sender saw the pauses (an XOFF and its XON between two reads count as none).
    assert control.xoffs >= 3 and 1 <= result.pauses <= control.xoffs
    assert (result.outcome, result.sent_bytes, result.message) == (
        "completed",
        len(program.data),
        None,
    )
    assert result.block == program.blocks == 364
    assert result.started_at <= result.ended_at
    # Progress: told while paused, and to the end.
    assert any(u.paused for u in updates)
    assert updates[-1] == Progress(len(program.data), len(program.data), 364, 364, False)
    assert [u.sent for u in updates] == sorted(u.sent for u in updates)


async def test_without_flow_control_the_same_control_is_overrun(
    control: FakeControl, tmp_path: Path
) -> None:
    # What the test above would see from a sender deaf to XOFF (pyserial's own xonxoff on a pty).
    program_file = write_program(tmp_path / "part.nc", blocks=150)
    _, result = await asyncio.to_thread(send, control, program_file, xon_xoff=False)
    assert result.outcome == "completed"
    assert control.xoffs >= 1 and control.overruns > 0


async def test_leader_and_end_of_block_are_sent_as_configured(
    control: FakeControl, tmp_path: Path
) -> None:
    program_file = tmp_path / "O77.nc"
    program_file.write_bytes(b"%\nO0077\nG0 X1\nM30\n%\n")
    program, result = await asyncio.to_thread(
        send, control, program_file, leader_nuls=10, end_of_block="crlf"
    )
    expected = b"\0" * 10 + b"%\r\nO0077\r\nG0 X1\r\nM30\r\n%\r\n"
    await eventually(lambda: len(control.received) >= len(expected))
    assert bytes(control.received) == expected
    # The record counts the program, not the leader; the hash is the file's.
    assert (result.sent_bytes, program.name) == (len(expected) - 10, "O0077")


async def test_a_cancelled_send_stops_and_leaves_a_partial_program_without_end_of_record(
    control: FakeControl, tmp_path: Path
) -> None:
    program_file = write_program(tmp_path / "part.nc")
    feeds: list[DripFeed] = []

    def cancel_midway(update: Progress) -> None:
        if update.sent > 3000:
            feeds[0].cancel()

    program, result = await asyncio.to_thread(
        send, control, program_file, cancel_midway, feeds.append
    )
    assert result.outcome == "cancelled"
    assert 3000 < result.sent_bytes < len(program.data)
    await eventually(lambda: len(control.received) >= result.sent_bytes)
    # What the control got is the program's beginning, exactly, and nothing after it: no '%'.
    assert bytes(control.received) == program.data[: result.sent_bytes]
    assert control.received.count(b"%") == 1
    assert control.overruns == 0
    assert result.block == program.block_at(result.sent_bytes)
    assert result.message is not None
    assert f"after {result.sent_bytes} of {len(program.data)} bytes (block {result.block}" in (
        result.message
    )
    assert "no end-of-record '%'" in result.message and "Press RESET" in result.message
    event = program_sent_event(config(control.link), program, result, "operator1")
    validate_envelope(event)
    assert event.data["outcome"] == "cancelled" and event.data["message"] == result.message


async def test_a_control_that_never_sends_xon_fails_the_send(tmp_path: Path) -> None:
    control = FakeControl(tmp_path / "ttyDNC", never_xon=True)
    try:
        program_file = write_program(tmp_path / "part.nc")
        program, result = await asyncio.to_thread(send, control, program_file, resume_timeout_s=0.5)
    finally:
        control.close()
    assert result.outcome == "failed"
    assert "the control sent XOFF and no XON within 0.5 s" in (result.message or "")
    assert result.sent_bytes < len(program.data)
    assert control.after_xoff[0] <= 2 * 16
    assert bytes(control.received) == program.data[: result.sent_bytes]
    assert control.overruns == 0
    event = program_sent_event(config(control.link), program, result, None)
    assert validate_envelope(event).data.outcome == "failed"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"O1234\nG0 X1\nM30\n", "no '%' line"),
        (b"%\nO1234\nG0 X1\nM30\n", "one '%' line"),
        (b"%\nO1\nM30\n%\n%\nO2\nM30\n%\n", "4 '%' lines"),
        (b"%\nO1\nM30\n%\nG0 X1\n", "not one program between '%' lines"),
        (b"", "no '%' line"),
    ],
)
def test_a_file_that_is_not_one_program_between_percent_lines_is_refused(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "bad.nc"
    path.write_bytes(content)
    with pytest.raises(ProgramRefused, match=why):
        read_program(path)
    with pytest.raises(ProgramRefused, match="cannot read"):
        read_program(tmp_path / "missing.nc")


def test_the_program_name_is_the_controls_else_the_file_stem(tmp_path: Path) -> None:
    named = tmp_path / "a.nc"
    named.write_bytes(b"\0\0%\r\nO1234 (FLANGE)\r\nM30\r\n%\r\n")
    fanuc = tmp_path / "b.nc"
    fanuc.write_bytes(b"%\n<FLANGE_OP2>\nM30\n%\n")
    plain = tmp_path / "flange-rev-c.nc"
    plain.write_bytes(b"%\n(FLANGE)\nG0 X1\nM30\n%\n")
    assert [read_program(p).name for p in (named, fanuc, plain)] == [
        "O1234",
        "<FLANGE_OP2>",
        "flange-rev-c",
    ]


async def test_a_busy_port_is_refused(control: FakeControl) -> None:
    entry = config(control.link)
    first = open_port(entry)
    try:
        with pytest.raises(PortBusy, match="in use by another process"):
            open_port(entry)
    finally:
        first.close()
    # The status adapter holds the port while it runs: a send must wait for it to stop.
    running = Running(SerialLineAdapter(entry), InMemoryPublisher())  # type: ignore[arg-type]
    try:
        await eventually(lambda: _busy(entry))
    finally:
        await running.finish()
    open_port(entry).close()  # free again


def _busy(entry: SerialConfig) -> bool:
    try:
        open_port(entry).close()
    except PortBusy:
        return True
    return False


async def test_the_record_of_a_send_is_stored_once(
    control: FakeControl, tmp_path: Path, hub: Hub
) -> None:
    program_file = write_program(tmp_path / "part.nc", blocks=20)
    program, result = await asyncio.to_thread(send, control, program_file)
    event = program_sent_event(config(control.link), program, result, "operator1")
    # The same record again (a retry after a lost acknowledgement) has the same id.
    again = program_sent_event(config(control.link), program, result, "operator1")
    assert again.id == event.id
    await hub.publisher.publish(event)
    await hub.publisher.publish(again)
    async with api_client(hub) as http:

        async def stored() -> list[Any]:
            await hub.wait_caught_up()
            answer = await http.get(
                "/api/v1/audit/events",
                params={"type": "mes.machine.program_sent.v1"},
                headers={"Authorization": f"Bearer {api_key('auditor')}"},
            )
            events: list[Any] = answer.json()["events"]
            return events

        await eventually(lambda: _nonempty(stored()))
        (record,) = await stored()
    assert record["event_id"] == event.id and record["subject"] == "LATHE-3"
    data = {k: v for k, v in record["data"].items() if v is not None}
    assert data["sha256"] == program.sha256 and data["outcome"] == "completed"
    assert data["sent_bytes"] == data["size_bytes"] == len(program.data)
    assert data["program"] == "O1234" and data["port"] == str(control.link)


async def _nonempty(found: Any) -> bool:
    return bool(await found)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"%\nO1\nG0 X1\x13\nM30\n%\n", "byte 0x13 (DC3, XOFF) at offset 10 (line 3)"),
        (b"%\r\nO1\r\nG0\x11 X1\r\n%\r\n", "byte 0x11 (DC1, XON) at offset 9 (line 3)"),
        (b"%\nO1\nM30\x00\n%\n", "byte 0x00 (NUL) at offset 8 (line 3)"),
        (b"%\nO1\x1b\nM30\n%\n", "byte 0x1B (a control character) at offset 4 (line 2)"),
    ],
)
def test_control_characters_inside_a_program_are_refused_with_where(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "bad.nc"
    path.write_bytes(content)
    with pytest.raises(ProgramRefused, match=re.escape(why)):
        read_program(path)
    # TAB, CR and LF are fine, and NULs of tape leader and trailer around the '%' lines.
    path.write_bytes(b"\0\0%\r\nO1\tG0 X1\r\nM30\r\n%\0\0\r\n")
    assert read_program(path).name == "O1"


def test_bytes_wider_than_the_ports_data_bits_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wide.nc"
    path.write_bytes("%\nO1\n(MAß 12)\nM30\n%\n".encode("latin-1"))
    with pytest.raises(ProgramRefused, match=re.escape("byte 0xDF at offset 8 (line 3)")):
        read_program(path, bytesize=7)
    assert read_program(path, bytesize=8).data == path.read_bytes()  # 8 bits carry it as it is


async def test_a_port_that_takes_no_data_fails_the_send(tmp_path: Path) -> None:
    # A control that stops reading (hung, cable pulled) and says no XOFF: the pty's buffers
    # fill and the port takes nothing more. Fast line, a program larger than those buffers.
    control = FakeControl(tmp_path / "ttyDNC", consume_per_s=1e9, capacity=1 << 30)
    control.stop_reading.set()
    try:
        program_file = write_program(tmp_path / "big.nc", blocks=12_000)
        entry = SerialConfig.model_validate(
            {"machine_id": "LATHE-3", "port": str(control.link), "baudrate": 4_000_000,
             "dnc": {"write_timeout_s": 0.5, "chunk_bytes": 4096}}
        )  # fmt: skip
        program = read_program(program_file)
        port = open_port(entry)
        try:
            result = await asyncio.to_thread(DripFeed(port, entry, program).send)
        finally:
            port.close()
    finally:
        control.close()
    assert result.outcome == "failed"
    assert "the port took no data for 0.5 s" in (result.message or "")
    assert 0 < result.sent_bytes < len(program.data)


async def test_the_record_keeps_its_order_when_the_wall_clock_steps_back(
    control: FakeControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SteppingBack(datetime):
        """The wall clock: set back an hour once the send has started (NTP, an operator)."""

        calls = 0

        @classmethod
        def now(cls, tz: Any = None) -> Any:
            cls.calls += 1
            real = datetime.now(tz)
            return real if cls.calls <= 2 else real - timedelta(hours=1)

    monkeypatch.setattr(dnc, "datetime", SteppingBack)
    program_file = write_program(tmp_path / "part.nc", blocks=10)
    program, result = await asyncio.to_thread(send, control, program_file)
    assert result.outcome == "completed" and result.started_at <= result.ended_at
    validate_envelope(program_sent_event(config(control.link), program, result, None))
    # A record the contract refuses is refused where it is made, not later in a buffer.
    backwards = SendResult(
        "completed", result.sent_bytes, result.started_at,
        result.started_at - timedelta(seconds=1), None, 1, 0,
    )  # fmt: skip
    with pytest.raises(ContractViolation, match="started_at"):
        program_sent_event(config(control.link), program, backwards, None)


async def test_the_journal_says_how_far_a_send_got_and_is_left_alone_while_it_runs(
    control: FakeControl, tmp_path: Path
) -> None:
    journals = tmp_path / "journal"
    entry = config(control.link)
    program = read_program(write_program(tmp_path / "part.nc"))
    port = open_port(entry)
    journal = SendJournal(journals, entry, program, "operator1")
    seen: list[list[Any]] = []

    def look(update: Progress) -> None:
        if update.sent > 4000 and not seen:
            seen.append(list(leftover_sends(journals)))  # the sender lives: not a leftover
            feed.cancel()

    feed = DripFeed(port, entry, program, look, journal)
    try:
        result = await asyncio.to_thread(feed.send)
    finally:
        port.close()
    assert seen == [[]] and result.outcome == "cancelled"
    # The sender dies before it records the send (its journal is no longer locked).
    assert journal.path is not None
    os.close(journal._fd)
    (leftover,) = leftover_sends(journals)
    record = validate_envelope(leftover.event)
    assert leftover.machine_id == "LATHE-3" and record.envelope.subject == "LATHE-3"
    assert record.data.outcome == "failed"  # type: ignore[union-attr]
    assert 3000 <= record.data.sent_bytes <= result.sent_bytes  # type: ignore[union-attr]
    assert "the sender was interrupted" in (record.data.message or "")  # type: ignore[union-attr]
    # The same send as its own record would be: the hub keeps whichever comes first.
    own = program_sent_event(entry, program, result, "operator1")
    assert leftover.event.id == own.id
    assert record.envelope.time >= record.data.started_at  # type: ignore[union-attr]


async def test_an_error_of_the_progress_display_is_not_taken_for_the_port(
    control: FakeControl, tmp_path: Path
) -> None:
    def broken(update: Progress) -> None:
        raise RuntimeError("the display broke")

    program_file = write_program(tmp_path / "part.nc", blocks=20)
    with pytest.raises(RuntimeError, match="the display broke"):
        await asyncio.to_thread(send, control, program_file, broken)


# ``mes-hub dnc``'s catch-up (``hub.cli.dnc._catch_up``), in this process: the records of sends
# whose sender died, and every machine's buffer, against a real hub or none.


def hub_link(tmp_path: Path, nats_url: str = "nats://127.0.0.1:1") -> HubLink:
    path = tmp_path / "mes-hub.toml"
    path.write_text(
        f'[hub]\nnats_url = "{nats_url}"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[[adapters.serial]]\nmachine_id = "LATHE-3"\nport = "{tmp_path / "ttyX"}"\n'
    )
    return _link(path, None, None)


def died_mid_send(link: HubLink, tmp_path: Path, record: str | None = None) -> SendJournal:
    """A sender that wrote its journal, got 2,048 bytes out and died; with ``record`` (an
    outcome) it died after making its record but before storing it."""
    entry = config(tmp_path / "ttyX")
    program = read_program(write_program(tmp_path / "part.nc"))
    journal = SendJournal(link.journals, entry, program, "operator1")
    started = datetime.now(UTC)
    journal.begin(started)
    journal.advance(2048, 1.5)
    if record is not None:
        result = SendResult(record, 3000, started, started + timedelta(seconds=2), "why", 9, 1)  # type: ignore[arg-type]
        journal.finish(program_sent_event(entry, program, result, "operator1"))
    os.close(journal._fd)  # killed: the lock goes
    return journal


def flat(text: str) -> str:
    """Printed text without the line breaks Rich puts in long words and lines."""
    return "".join(text.split())


def catch_up(link: HubLink) -> int:
    return _catch_up(link, timeout=5, quiet=False)


async def test_a_journal_that_holds_its_record_is_stored_once_with_the_original_outcome(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed between making the record and storing it: the record is the sender's own.
    link = hub_link(tmp_path, hub.nats_url)
    died_mid_send(link, tmp_path, record="cancelled")
    assert await asyncio.to_thread(catch_up, link) == 0
    out = flat(capsys.readouterr().out)
    assert flat("LATHE-3: recorded a send whose sender was interrupted: O1234") in out
    assert flat("cancelled at 3,000 of") in out
    assert list(link.journals.iterdir()) == []
    assert await asyncio.to_thread(catch_up, link) == 0  # nothing left to record
    assert flat("nothing waits") in flat(capsys.readouterr().out)
    async with api_client(hub) as http:
        await eventually(lambda: _nonempty(audit(http, hub)))
        (stored,) = await audit(http, hub)
    assert stored["data"]["outcome"] == "cancelled" and stored["data"]["sent_bytes"] == 3000


async def audit(http: Any, hub: Hub) -> list[Any]:
    await hub.wait_caught_up()
    answer = await http.get(
        "/api/v1/audit/events",
        params={"type": "mes.machine.program_sent.v1"},
        headers={"Authorization": f"Bearer {api_key('auditor')}"},
    )
    events: list[Any] = answer.json()["events"]
    return events


def test_a_record_line_torn_by_a_crash_falls_back_to_the_journals_position(
    tmp_path: Path,
) -> None:
    link = hub_link(tmp_path)
    journal = died_mid_send(link, tmp_path, record="cancelled")
    assert journal.path is not None
    os.truncate(journal.path, journal.path.stat().st_size - 40)  # the record line cut short
    (leftover,) = leftover_sends(link.journals)
    record = validate_envelope(leftover.event)
    assert (record.data.outcome, record.data.sent_bytes) == ("failed", 2048)  # type: ignore[union-attr]
    assert leftover.machine_id == "LATHE-3" and journal.path.exists()  # not set aside


def test_journals_set_aside_held_or_waiting_are_told_on_every_flush(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = hub_link(tmp_path)
    link.journals.mkdir(parents=True)
    (link.journals / "LATHE-3.20260101T000000000000.1.journal").write_bytes(b"{not json\n")
    for _ in range(2):  # the unreadable journal is set aside, then told again
        assert catch_up(link) == 1
        err = flat(capsys.readouterr().err)
        assert (
            flat("LATHE-3.20260101T000000000000.1.unreadable: a send whose record could not") in err
        )
    # A send in progress (its journal locked by its sender): its record is not in the hub yet.
    running = died_mid_send(link, tmp_path)
    assert running.path is not None
    fd = os.open(running.path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert catch_up(link) == 2
        out = flat(capsys.readouterr().out)
        assert (
            flat(f"{running.path}: a send in progress") in out and flat("nothing waits") not in out
        )
    finally:
        os.close(fd)
    # Its sender died: recorded (waits for NATS) and the set-aside journal still told.
    assert catch_up(link) == 2
    captured = capsys.readouterr()
    assert flat("LATHE-3: 1 record(s) wait (NATS unreachable)") in flat(captured.out)
    assert flat(".unreadable: a send whose record could not") in flat(captured.err)


def test_a_buffer_held_by_another_command_counts_as_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_dnc, "BUSY_RETRY_S", 0.2)
    link = hub_link(tmp_path)
    journal = died_mid_send(link, tmp_path)
    (link.folder / "LATHE-3").mkdir(parents=True)
    (link.folder / "LATHE-3" / "buffer.sqlite").touch()
    fd = os.open(link.folder / "LATHE-3" / "buffer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another mes-hub dnc command holds LATHE-3's buffer
    try:
        # The leftover journal waits, and the buffer was not flushed: both may hold records.
        assert catch_up(link) == 2
    finally:
        os.close(fd)
    out = flat(capsys.readouterr().out)
    assert flat(f"{journal.path} waits") in out and flat("LATHE-3: not flushed now") in out
    assert flat("nothing waits") not in out
    assert journal.path is not None and journal.path.exists()


def test_a_broken_buffer_is_told_and_the_other_machines_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = hub_link(tmp_path)
    broken = link.folder / "MILL-9"
    broken.mkdir(parents=True)
    (broken / "buffer.sqlite").write_bytes(b"this is not a database" * 100)
    died_mid_send(link, tmp_path)  # LATHE-3, whose buffer is fine
    assert catch_up(link) == 2  # LATHE-3's record waits for NATS; MILL-9's buffer may hold some
    captured = capsys.readouterr()
    err, out = flat(captured.err), flat(captured.out)
    assert flat(f"MILL-9: the buffer {broken} is broken (DatabaseError") in err
    assert flat("LATHE-3: recorded a send whose sender was interrupted") in out
    assert flat("LATHE-3: 1 record(s) wait (NATS unreachable)") in out


def test_a_journal_whose_sender_died_building_it_is_removed_after_a_minute(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    old, young, held = (directory / f".LATHE-3.{n}.tmp" for n in ("old", "young", "held"))
    for path in (old, young, held):
        path.write_bytes(b"{")
    long_ago = time.time() - 120
    for path in (old, held):
        os.utime(path, (long_ago, long_ago))
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its sender is still building it
    try:
        assert list(leftover_sends(directory)) == []
    finally:
        os.close(fd)
    assert (old.exists(), young.exists(), held.exists()) == (False, True, True)


def test_a_file_name_that_is_not_utf8_is_recorded_as_text(tmp_path: Path) -> None:
    path = Path(os.fsdecode(bytes(tmp_path) + b"/\xff\xfe.nc"))
    write_program(path, blocks=3, name="(NONE)")
    program = read_program(path)
    assert program.name == "\\xff\\xfe" and program.file_text == f"{tmp_path}/\\xff\\xfe.nc"
    record = validate_envelope(trial_record(config(tmp_path / "ttyX"), program, None))
    assert record.data.file == program.file_text  # type: ignore[union-attr]


def test_a_record_the_contract_refuses_keeps_the_journal_set_aside(tmp_path: Path) -> None:
    entry = SerialConfig.model_validate(
        {"machine_id": "LATHE-3", "port": "/dev/" + "d" * 1100}  # the source is too long
    )
    program = read_program(write_program(tmp_path / "part.nc", blocks=3))
    with pytest.raises(ContractViolation, match="source"):
        trial_record(entry, program, None)
    journal = SendJournal(tmp_path / "journal", config(tmp_path / "ttyX"), program, None)
    journal.begin(datetime.now(UTC))
    assert journal.path is not None
    kept = journal.set_aside()
    assert kept == journal.path.with_suffix(".unreadable") and kept.exists()
    assert unreadable_journals(tmp_path / "journal") == [kept]


@pytest.mark.parametrize("journal_takes_it", [True, False])
def test_a_record_that_cannot_be_stored_is_kept_in_the_journal_or_printed(
    tmp_path: Path, journal_takes_it: bool
) -> None:
    link = hub_link(tmp_path)
    (link.folder / "LATHE-3").mkdir(parents=True)
    (link.folder / "LATHE-3" / "buffer.sqlite").write_bytes(b"this is not a database" * 100)
    entry = config(tmp_path / "ttyX")
    program = read_program(write_program(tmp_path / "part.nc"))
    journal = SendJournal(link.journals, entry, program, "operator1")
    started = datetime.now(UTC)
    journal.begin(started)
    assert journal.path is not None
    if not journal_takes_it:  # the disk refuses the record (full, gone read-only)
        os.close(journal._fd)
        journal._fd = os.open(journal.path, os.O_RDONLY)
    result = SendResult("completed", len(program.data), started, started, None, 364, 0)
    told = flat(" ".join(line for line, _ in _record(link, entry, program, result, journal)))
    assert flat(f"LATHE-3: the buffer {link.folder / 'LATHE-3'} is broken") in told
    event = program_sent_event(entry, program, result, "operator1")
    if journal_takes_it:
        assert flat(f"the record waits in the send journal {journal.path}") in told
        assert journal.path.read_bytes().split(b"\n")[2] == event.model_dump_json().encode()
    else:
        assert flat("the record could not be kept") in told
        assert flat(escape(event.model_dump_json())) in told
