"""``mes-hub dnc``: send NC programs to machines over RS-232 (DNC drip feed).

``mes-hub dnc send --config F --machine M PROGRAM_FILE`` streams the program to the port of the
``[[adapters.serial]]`` entry of machine M (its ``dnc`` sub-table gives the sender's options),
shows progress, and records the send as ``mes.machine.program_sent.v1``. The record is kept
safe in three steps: a journal in the dnc folder is written before the first byte and advanced
as the send goes; when the send ends the record is stored on disk in the machine's
store-and-forward buffer (``<buffer>/dnc/<machine>``) and only then sent to the hub's NATS.
Every ``mes-hub dnc`` command starts by catching up: a journal whose sender was killed becomes
a ``failed`` record ("the sender was interrupted; at least N bytes had gone out"), and every
machine's buffer is flushed. ``mes-hub dnc flush`` does only that, and says what went out and
what still waits.

Exit codes of ``send``: 0 completed, 1 failed (or the port cannot be opened or is busy),
2 a refused file or configuration (or a send the contract could not record), 130 cancelled
with Ctrl-C (or SIGTERM, SIGHUP). Of ``flush``: 0 nothing waits, 1 records still wait or may
(NATS unreachable; a buffer broken or held by another command; a send in progress; a journal
set aside because no record could be made of it). The sender is
``adapters.machines.dnc``, imported when the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TransferSpeedColumn,
)

from hub.cli.shared import (
    ConfigOption,
    NatsUrlOption,
    config_file_or_exit,
    config_file_required,
    config_or_exit,
    console,
    err_console,
    setup_logging,
)
from hub.settings import redacted_url

if TYPE_CHECKING:
    from rich.console import Console

    from adapters.forward import StoreAndForward
    from adapters.machines.dnc import NcProgram, SendJournal, SendResult
    from adapters.machines.serial_line import SerialConfig
    from contracts import CloudEvent
    from hub.config import Config
    from hub.nats_auth import Credentials
    from hub.ports import PublishReceipt

log = logging.getLogger("hub.cli")
app = typer.Typer(help="DNC: send NC programs to machines over RS-232.", no_args_is_help=True)
EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 130}  # 130: ended by SIGINT, by custom
CATCH_UP_S = 3.0  # before a send: how long waiting records may take to go out
RECORD_S = 5.0  # after a send: how long its record may take to reach NATS
BUSY_RETRY_S = 10.0  # a buffer another dnc command holds (its catch-up) is free within this
DEFAULT_PORTS = {"ws": 80, "wss": 443}  # a NATS URL without a port: 4222 but for websockets
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="The buffer's folder: the hub's data dir")
]


@dataclass(frozen=True)
class HubLink:
    """Where the records go: the hub's NATS, and the folder of the dnc journals and buffers."""

    config: Config
    url: str
    credentials: Credentials | None
    folder: Path  # <adapter buffer>/dnc: journal/ and one buffer folder per machine

    @property
    def journals(self) -> Path:
        return self.folder / "journal"


def _link(config: Path | None, nats_url: str | None, data_dir: Path | None) -> HubLink:
    """The config file's hub link; exits 2 when the records would have nowhere to go."""
    from hub.nats_auth import adapter_link

    config_file_required(config)
    loaded = config_file_or_exit(config, adapters=True, nats_url=nats_url, data_dir=data_dir)
    assert loaded.adapters is not None
    url, credentials = config_or_exit(lambda: adapter_link(loaded.hub, "machines"))
    if url is None:
        err_console.print(
            "[red]sends are recorded in the hub: give --nats-url (or nats_url in \\[hub]), "
            "or a hub started from the same --data-dir on this machine[/]"
        )
        raise typer.Exit(2)
    base = loaded.adapters.buffer.directory or loaded.hub.data_dir / "adapter-buffer"
    return HubLink(loaded, url, credentials, base / "dnc")


@app.command("send")
def dnc_send(
    program_file: Annotated[Path, typer.Argument(help="The program: one program between % lines")],
    machine: Annotated[str, typer.Option("--machine", help="machine_id of an [[adapters.serial]]")],
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Drip-feed PROGRAM_FILE to a machine's serial port; record the send in the hub."""
    from adapters.machines.dnc import (
        JournalUnwritable,
        PortBusy,
        ProgramRefused,
        SendJournal,
        open_port,
        read_program,
        trial_record,
    )
    from contracts import ContractViolation

    link = _link(config, nats_url, data_dir)
    adapters = link.config.adapters
    assert adapters is not None
    entry = next((e for e in adapters.serial if e.machine_id == machine), None)
    if entry is None:
        err_console.print(
            f"[red]no \\[\\[adapters.serial]] entry with machine_id = {escape(repr(machine))} "
            f"in {escape(str(config))}[/]"
        )
        raise typer.Exit(2)
    try:
        program = read_program(program_file, entry.dnc.end_of_block, entry.bytesize)
    except ProgramRefused as exc:
        err_console.print(f"[red]refused: {escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    try:  # a send whose record the contract would refuse is not started
        trial_record(entry, program, _user())
    except ContractViolation as exc:
        err_console.print(f"[red]refused: the send could not be recorded: {escape(exc.reason)}[/]")
        raise typer.Exit(2) from None
    setup_logging(logging.WARNING)
    _catch_up(link, CATCH_UP_S, quiet=True)
    try:
        port = open_port(entry)
    except PortBusy as exc:
        err_console.print(f"[red]port busy: {escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    except ConnectionError as exc:
        err_console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    _say(
        f"sending {escape(program.file_text)} (program {escape(program.name)}, "
        f"{len(program.data):,} bytes, {program.blocks:,} blocks) to {machine} on "
        f"{escape(entry.port)} at {entry.baudrate} baud"
    )
    journal = SendJournal(link.journals, entry, program, _user())
    try:
        result = _send_with_progress(port, entry, program, journal)
    except JournalUnwritable as exc:  # nothing was sent
        _say(f"[red]nothing sent: the send journal cannot be written ({escape(str(exc))})[/]",
             error=True)  # fmt: skip
        raise typer.Exit(1) from None
    finally:
        port.close()
    # Recorded before anything is printed: the terminal may be gone (SIGHUP), the pipe closed.
    told = _record(link, entry, program, result, journal)
    if result.outcome == "completed":
        _say(
            f"[green]completed[/]: {result.sent_bytes:,} bytes, {result.block:,} blocks, "
            f"paused {result.pauses} times by the control (XOFF)"
        )
    else:
        _say(f"[red]{result.outcome}[/]: {escape(result.message or '')}", error=True)
    for line, error in told:
        _say(line, error)
    raise typer.Exit(EXIT_CODES[result.outcome])


@app.command("flush")
def dnc_flush(
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    data_dir: DataDirOption = None,
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for NATS")] = 15.0,
) -> None:
    """Send the records of past sends that wait (NATS was unreachable, a sender was killed)."""
    link = _link(config, nats_url, data_dir)
    setup_logging(logging.WARNING)
    waiting = _catch_up(link, timeout, quiet=False)
    raise typer.Exit(1 if waiting else 0)


def _send_with_progress(
    port: object, entry: SerialConfig, program: NcProgram, journal: SendJournal
) -> SendResult:
    """The send, in this thread, with Rich progress; Ctrl-C (SIGINT), SIGTERM or SIGHUP (the
    terminal closed) cancels it cleanly (the record is still made)."""
    from adapters.machines.dnc import DripFeed
    from adapters.machines.dnc import Progress as SendProgress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TextColumn("block {task.fields[block]}/{task.fields[blocks]}  {task.fields[state]}"),
    )
    # Refreshed from this thread only (no refresh thread): a terminal that is gone (EIO) or a
    # closed pipe is met here, where it silences the display and the send goes on.
    progress = Progress(*columns, console=console, transient=False, auto_refresh=False)
    task = progress.add_task(
        program.name, total=len(program.data), block=0, blocks=program.blocks, state=""
    )
    paused_shown = False

    def show(update: SendProgress) -> None:
        nonlocal paused_shown
        state = "paused by the control (XOFF)" if update.paused else ""
        progress.update(task, completed=update.sent, block=update.block, state=state)
        with _output_lost(console):
            progress.refresh()
            if update.paused and not paused_shown and not console.is_terminal:
                # Piped output gets no live bar: say it once in a line.
                console.print(f"paused by the control (XOFF) at {update.sent:,} bytes")
                paused_shown = True

    feed = DripFeed(port, entry, program, show, journal)

    def cancel(_signum: int, _frame: FrameType | None) -> None:
        feed.cancel()

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, cancel) for sig in stops}
    try:
        with _output_lost(console):
            progress.start()
        result: SendResult = feed.send()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with _output_lost(console):
            progress.stop()
    return result


@contextlib.contextmanager
def _output_lost(target: Console) -> Iterator[None]:
    """Printing to a terminal that closed (``OSError``, EIO) or a closed pipe (Rich's
    ``SystemExit``) silences ``target`` from then on, instead of ending the command."""
    try:
        yield
    except (OSError, SystemExit):
        target.quiet = True
        with contextlib.suppress(OSError, ValueError):  # what Python flushes at exit goes nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, target.file.fileno())
            os.close(devnull)


def _say(text: str, error: bool = False) -> None:
    target = err_console if error else console
    with _output_lost(target):
        target.print(text)


def _user() -> str | None:
    """The OS user running the send: the effective uid's name (not $USER, which anyone sets)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # no user name for this uid (a container)
        return None


class _Unreachable:
    """The hub's NATS when nothing answers at its address: every publish fails at once."""

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        raise ConnectionRefusedError(f"nothing answers at {redacted_url(self.url)}")

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        raise ConnectionRefusedError(f"nothing answers at {redacted_url(self.url)}")

    def __init__(self, url: str) -> None:
        self.url = url

    async def close(self) -> None:
        return None


async def _answers(url: str, timeout: float = 2.0) -> bool:
    """Whether something accepts a connection at the NATS URL's first server. Asked first
    because a connect in progress to a NATS that refuses can fail to end when it is cancelled
    (the client retries without end, and Python 3.11's ``wait_for`` may swallow the cancel):
    a command must never hang on the way out."""
    first = urlsplit(url.split(",")[0].strip())
    port = first.port or DEFAULT_PORTS.get(first.scheme, 4222)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(first.hostname or "127.0.0.1", port), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass(frozen=True)
class _MachineBuffer:
    """A machine's buffer, and whether NATS answered when it was opened."""

    forward: StoreAndForward
    reachable: bool

    async def store(self, events: list[CloudEvent]) -> None:
        await self.forward.store(events)

    def waiting(self) -> int:
        return self.forward.waiting()

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for what waits to go out (not at all without NATS)."""
        if not self.reachable:
            return self.waiting() == 0
        return await self.forward.drain(timeout)


@contextlib.asynccontextmanager
async def _buffer(link: HubLink, machine_id: str) -> AsyncIterator[_MachineBuffer]:
    """The store-and-forward buffer of one machine's sends (its own, so that two sends to two
    machines never share one), in front of the hub's NATS; ``BufferInUse`` once another dnc
    command has held it for ``BUSY_RETRY_S``; ``sqlite3.DatabaseError`` or ``OSError`` when
    the buffer is broken. With nothing answering at the NATS address, its ``drain`` returns at
    once."""
    from adapters.forward import BufferInUse, StoreAndForward
    from hub.nats import ConnectingPublisher

    settings, adapters = link.config.hub, link.config.adapters
    assert adapters is not None
    nats: ConnectingPublisher | _Unreachable = _Unreachable(link.url)
    if await _answers(link.url):
        nats = ConnectingPublisher(
            link.url, settings.site, "mes-hub-dnc", credentials=link.credentials
        )
    waited = 0.0
    while True:
        try:
            buffer = StoreAndForward(
                nats, link.folder / machine_id, settings.site, adapters.buffer.max_events
            )
            break
        except BufferInUse:
            if waited >= BUSY_RETRY_S:
                await nats.close()
                raise
            await asyncio.sleep(0.2)
            waited += 0.2
        except BaseException:
            await nats.close()
            raise
    try:
        yield _MachineBuffer(buffer, not isinstance(nats, _Unreachable))
    finally:
        await buffer.close()
        await nats.close()


def _broken(link: HubLink, machine_id: str, exc: BaseException) -> str:
    return (
        f"[red]{machine_id}: the buffer {escape(str(link.folder / machine_id))} is broken "
        f"({escape(type(exc).__name__)}: {escape(str(exc))}): its records cannot be stored or "
        "sent until it is repaired or moved away[/]"
    )


def _record(
    link: HubLink, entry: SerialConfig, program: NcProgram, result: SendResult, journal: SendJournal
) -> list[tuple[str, bool]]:
    """Store the send's record on disk, then publish it: if NATS cannot be reached, it waits in
    the machine's buffer for the next ``mes-hub dnc`` command (or ``mes-hub dnc flush``).
    Prints nothing (the output may be gone): returns the lines to print, each with whether it
    is an error."""
    from adapters.forward import BufferInUse
    from adapters.machines.dnc import program_sent_event
    from contracts import ContractViolation

    try:
        event = program_sent_event(entry, program, result, journal.sent_by)
    except ContractViolation as exc:
        kept = journal.set_aside()
        return [(f"[red]the send was not recorded: the contract refuses the record "
                 f"({escape(exc.reason)}); its journal is kept as {escape(str(kept))}[/]",
                 True)]  # fmt: skip
    journal.finish(event)  # should the store below not happen, the next command stores it
    told: list[tuple[str, bool]] = []

    def not_stored(why: str) -> None:
        if journal.holds_record:
            told.append((f"[yellow]the record waits in the send journal "
                         f"{escape(str(journal.path))} ({why}); the next mes-hub dnc command "
                         "stores it[/]", True))  # fmt: skip
        else:
            told.append((f"[red]the record could not be kept ({why}); here it is, to give to "
                         f"the hub by hand:[/]\n{escape(event.model_dump_json())}",
                         True))  # fmt: skip

    async def store() -> None:
        try:
            async with _buffer(link, entry.machine_id) as buffer:
                await buffer.store([event])
                journal.end()
                if await buffer.drain(timeout=RECORD_S):
                    told.append((f"recorded in the hub: {event.type} {event.id}", False))
                else:
                    told.append((
                        f"[yellow]NATS unreachable: the record waits in "
                        f"{escape(str(link.folder / entry.machine_id))}; the next mes-hub dnc "
                        "command sends it (or mes-hub dnc flush)[/]", False,
                    ))  # fmt: skip
        except BufferInUse as exc:
            not_stored(escape(str(exc)))
        except (sqlite3.DatabaseError, OSError) as exc:
            told.append((_broken(link, entry.machine_id, exc), True))
            not_stored("its machine's buffer is broken")

    asyncio.run(store())
    return told


def _catch_up(link: HubLink, timeout: float, quiet: bool) -> int:
    """Record the sends whose sender was killed, then flush every machine's buffer (for up to
    ``timeout``); prints what went out and what waits (only if anything did, when ``quiet``:
    then a send in progress is not told). Returns how many records still wait, or may: a
    journal held by another command, one set aside, a buffer held or broken count one each."""
    from adapters.forward import BufferInUse
    from adapters.machines.dnc import leftover_sends, unreadable_journals
    from contracts import ContractViolation

    async def recover() -> int:
        waiting = 0
        held: list[Path] = []
        for leftover in leftover_sends(link.journals, held):
            try:
                async with _buffer(link, leftover.machine_id) as buffer:
                    await buffer.store([leftover.event])
            except BufferInUse as exc:
                _say(f"[yellow]{escape(str(exc))}: {escape(str(leftover.journal))} waits[/]")
                waiting += 1
                continue
            except ContractViolation as exc:
                kept = leftover.journal.with_suffix(".unreadable")
                log.error("the record of %s is refused (%s): kept as %s",
                          leftover.journal, exc.reason, kept)  # fmt: skip
                os.replace(leftover.journal, kept)
                continue  # told below, with every journal set aside
            except (sqlite3.DatabaseError, OSError) as exc:
                _say(_broken(link, leftover.machine_id, exc), error=True)
                waiting += 1
                continue
            leftover.journal.unlink()
            data = leftover.event.data
            assert isinstance(data, dict)
            _say(
                f"{leftover.machine_id}: recorded a send whose sender was interrupted: "
                f"{escape(str(data['program']))} from {escape(str(data['file']))}, "
                f"{data['outcome']} at {data['sent_bytes']:,} of {data['size_bytes']:,} bytes"
            )
        if held and not quiet:
            for path in held:
                _say(f"[yellow]{escape(str(path))}: a send in progress, or another mes-hub dnc "
                     "command recording it: its record is not in the hub yet[/]")  # fmt: skip
        waiting += len(held)
        unreadable = unreadable_journals(link.journals) if link.journals.is_dir() else []
        for path in unreadable:
            _say(f"[red]{escape(str(path))}: a send whose record could not be made (see the "
                 "log of the command that set it aside); read it, then remove it[/]",
                 error=True)  # fmt: skip
        return waiting + len(unreadable)

    async def flush(machine_id: str) -> int:
        try:
            async with _buffer(link, machine_id) as buffer:
                before = buffer.waiting()
                if before == 0:
                    return 0
                await buffer.drain(timeout=timeout)
                left = buffer.waiting()
        except BufferInUse as exc:
            _say(f"[yellow]{machine_id}: not flushed now ({escape(str(exc))}): its records "
                 "may still wait[/]")  # fmt: skip
            return 1
        except (sqlite3.DatabaseError, OSError) as exc:
            _say(_broken(link, machine_id, exc), error=True)
            return 1
        if before > left:
            _say(f"{machine_id}: {before - left} record(s) sent to the hub")
        if left:
            _say(f"[yellow]{machine_id}: {left} record(s) wait (NATS unreachable)[/]")
        return left

    async def main() -> int:
        waiting = await recover()
        machines = sorted(p.name for p in link.folder.glob("*") if (p / "buffer.sqlite").is_file())
        left = await asyncio.gather(*(flush(m) for m in machines))
        waiting += sum(left)
        if not quiet and not waiting:
            _say("nothing waits: every record of a send is in the hub")
        return waiting

    return asyncio.run(main())
