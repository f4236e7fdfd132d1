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
2 a refused file or configuration, 130 cancelled with Ctrl-C (or SIGTERM, SIGHUP). Of
``flush``: 0 nothing waits, 1 records still wait (NATS unreachable). The sender is
``adapters.machines.dnc``, imported when the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
from collections.abc import AsyncIterator
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
        PortBusy,
        ProgramRefused,
        SendJournal,
        open_port,
        read_program,
    )

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
    console.print(
        f"sending {escape(program.file)} (program {escape(program.name)}, {len(program.data):,} "
        f"bytes, {program.blocks:,} blocks) to {machine} on {escape(entry.port)} at "
        f"{entry.baudrate} baud"
    )
    journal = SendJournal(link.journals, entry, program, _user())
    try:
        result = _send_with_progress(port, entry, program, journal)
    except OSError as exc:  # the journal could not be written: nothing was sent
        err_console.print(
            f"[red]nothing sent: the send journal cannot be written in "
            f"{escape(str(link.journals))} ({escape(str(exc))})[/]"
        )
        raise typer.Exit(1) from None
    finally:
        port.close()
    if result.outcome == "completed":
        console.print(
            f"[green]completed[/]: {result.sent_bytes:,} bytes, {result.block:,} blocks, "
            f"paused {result.pauses} times by the control (XOFF)"
        )
    else:
        err_console.print(f"[red]{result.outcome}[/]: {escape(result.message or '')}")
    _record(link, entry, program, result, journal)
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
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(
            program.name, total=len(program.data), block=0, blocks=program.blocks, state=""
        )
        paused_shown = False

        def show(update: SendProgress) -> None:
            nonlocal paused_shown
            state = "paused by the control (XOFF)" if update.paused else ""
            progress.update(task, completed=update.sent, block=update.block, state=state)
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
            result: SendResult = feed.send()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return result


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
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(first.hostname or "127.0.0.1", first.port or 4222), timeout
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
    command has held it for ``BUSY_RETRY_S``. With nothing answering at the NATS address, its
    ``drain`` returns at once."""
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
    try:
        yield _MachineBuffer(buffer, not isinstance(nats, _Unreachable))
    finally:
        await buffer.close()
        await nats.close()


def _record(
    link: HubLink, entry: SerialConfig, program: NcProgram, result: SendResult, journal: SendJournal
) -> None:
    """Store the send's record on disk, then publish it: if NATS cannot be reached, it waits in
    the machine's buffer for the next ``mes-hub dnc`` command (or ``mes-hub dnc flush``)."""
    from adapters.forward import BufferInUse
    from adapters.machines.dnc import program_sent_event
    from contracts import ContractViolation

    try:
        event = program_sent_event(entry, program, result, journal.sent_by)
    except ContractViolation as exc:
        journal.end()
        err_console.print(f"[red]the send was not recorded: the contract refuses the record: "
                          f"{escape(exc.reason)}[/]")  # fmt: skip
        return
    journal.finish(event)  # should the store below not happen, the next command stores it

    async def store() -> None:
        try:
            async with _buffer(link, entry.machine_id) as buffer:
                await buffer.store([event])
                journal.end()
                if await buffer.drain(timeout=RECORD_S):
                    console.print(f"recorded in the hub: {event.type} {event.id}")
                else:
                    console.print(
                        f"[yellow]NATS unreachable: the record waits in "
                        f"{escape(str(link.folder / entry.machine_id))}; the next mes-hub dnc "
                        "command sends it (or mes-hub dnc flush)[/]"
                    )
        except BufferInUse as exc:
            err_console.print(
                f"[yellow]the record waits in the send journal {escape(str(journal.path))} "
                f"({escape(str(exc))}); the next mes-hub dnc command stores it[/]"
            )

    asyncio.run(store())


def _catch_up(link: HubLink, timeout: float, quiet: bool) -> int:
    """Record the sends whose sender was killed, then flush every machine's buffer (for up to
    ``timeout``); prints what went out and what waits (only if anything did, when ``quiet``).
    Returns how many records still wait."""
    from adapters.forward import BufferInUse
    from adapters.machines.dnc import leftover_sends
    from contracts import ContractViolation

    async def recover() -> None:
        for leftover in leftover_sends(link.journals):
            try:
                async with _buffer(link, leftover.machine_id) as buffer:
                    await buffer.store([leftover.event])
            except BufferInUse as exc:
                console.print(f"[yellow]{escape(str(exc))}: {leftover.journal} waits[/]")
                continue
            except ContractViolation as exc:
                log.error("the record of %s is refused (%s): kept as .unreadable",
                          leftover.journal, exc.reason)  # fmt: skip
                os.replace(leftover.journal, leftover.journal.with_suffix(".unreadable"))
                continue
            leftover.journal.unlink()
            data = leftover.event.data
            assert isinstance(data, dict)
            console.print(
                f"{leftover.machine_id}: recorded a send whose sender was interrupted: "
                f"{data['program']} from {data['file']}, {data['outcome']} at "
                f"{data['sent_bytes']:,} of {data['size_bytes']:,} bytes"
            )

    async def flush(machine_id: str) -> int:
        try:
            async with _buffer(link, machine_id) as buffer:
                before = buffer.waiting()
                if before == 0:
                    return 0
                await buffer.drain(timeout=timeout)
                left = buffer.waiting()
        except BufferInUse as exc:
            console.print(f"[yellow]{machine_id}: not flushed now ({escape(str(exc))})[/]")
            return 0
        if before > left:
            console.print(f"{machine_id}: {before - left} record(s) sent to the hub")
        if left:
            console.print(f"[yellow]{machine_id}: {left} record(s) wait (NATS unreachable)[/]")
        return left

    async def main() -> int:
        await recover()
        machines = sorted(p.name for p in link.folder.glob("*") if (p / "buffer.sqlite").is_file())
        left = await asyncio.gather(*(flush(m) for m in machines))
        if not quiet and not any(left):
            console.print("nothing waits: every record of a send is in the hub")
        return sum(left)

    return asyncio.run(main())
