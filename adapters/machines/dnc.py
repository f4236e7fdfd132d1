"""DNC drip feed: stream an ISO NC program to a control over RS-232, with our own XON/XOFF.

A control with a small receive buffer reads a program from its serial port while it runs it
(drip feed) or stores it (read-in). When its buffer fills it sends XOFF (DC3, 0x13); when it
has room again, XON (DC1, 0x11). The sender here does that flow control itself: the port is
opened with ``xonxoff=False`` (a pseudo-terminal, and some USB adapters, ignore the driver's),
incoming bytes are read before every chunk, and writing stops within one chunk of an XOFF.
Writes are paced a little below the line's own rate (95 % of baud rate / bits per byte) and
wait for the port's output queue to empty, so no more than one chunk is ever on its way when
XOFF comes. Writes are non-blocking and counted as they are taken; a port that takes nothing
for ``write_timeout_s`` (outside an XOFF pause) fails the send.

The file must hold one program between ``%`` (end of record) lines: ``read_program`` refuses
anything else rather than adding a ``%`` (a file without them may be a fragment, and a control
takes what follows ``%`` as a complete program), and refuses a program whose bytes would not
arrive as they are: control characters other than TAB, CR and LF inside it (DC1-DC4 are flow
control on the line), or bytes the port's ``bytesize`` cannot carry. It is sent byte-identical
unless ``end_of_block`` asks for another line end; ``leader_nuls`` NULs go first, as tape leader.

A send ends ``completed``, ``cancelled`` (``DripFeed.cancel``; Ctrl-C in ``mes-hub dnc send``)
or ``failed`` (XOFF and no XON within ``resume_timeout_s``, the port gone or not taking data).
A stopped send sends nothing more, not even the closing ``%``: the control must not take a half
program for a whole one. It holds a partial program and waits for data until RESET; the result's
``message`` says so. ``program_sent_event`` makes the ``mes.machine.program_sent.v1`` record,
whose id derives from the machine, the program's hash and when the send started, so publishing
it again never duplicates it. A ``SendJournal`` on disk, written before the first byte and
advanced as the send goes, lets the next ``mes-hub dnc`` command record a send whose sender was
killed (``leftover_sends``). See ``docs/adapters/serial.md``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter, ValidationError

from adapters.machines.base import MachineEvents
from adapters.machines.serial_line import (
    DncOptions,
    PortBusy,
    PortLost,
    SerialConfig,
    open_port,
)
from contracts import CloudEvent, ContractViolation, Token, validate_envelope

if TYPE_CHECKING:
    import serial  # type: ignore[import-untyped]

__all__ = ["PortBusy", "PortLost", "open_port"]  # the sender's port errors, from serial_line

log = logging.getLogger(__name__)

XON, XOFF = 0x11, 0x13
END_OF_BLOCK = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
PROGRESS_EVERY_S = 0.1
JOURNAL_EVERY_BYTES = 1024  # the journal's position lags the port by less than this
PACE = 0.95  # of the line's nominal rate: a UART clock a little slow still keeps up
STALE_TMP_S = 60.0  # a journal being built (".*.tmp") unlocked for this long: its sender died
_BLANK = b" \t\r\x00"
# The program's name as the control knows it: O1234 (ISO/Fanuc), :1234, or <NAME> (Fanuc 30i).
_PROGRAM_NAME = re.compile(rb"^\s*(O\d{1,8}|:\d{1,8}|<[^>\r\n]{1,64}>)", re.IGNORECASE)
# Inside a program: no control characters but TAB, LF, CR (DC1-DC4 are flow control on the line).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_NAMES = {0x00: "NUL", 0x11: "DC1, XON", 0x12: "DC2", 0x13: "DC3, XOFF", 0x14: "DC4"}

Outcome = Literal["completed", "cancelled", "failed"]


class ProgramRefused(ValueError):
    """The file is not one program between ``%`` lines, holds bytes that would not arrive as
    they are, or cannot be read."""


@dataclass(frozen=True)
class NcProgram:
    file: str  # as given
    name: str  # as the control knows it
    data: bytes  # what a complete send delivers (line ends converted if asked)
    sha256: str  # of the file's bytes as stored

    def block_at(self, offset: int) -> int:
        """The block (1-based line) the byte at ``offset`` belongs to (the last block once
        everything is sent)."""
        return min(self.data.count(self.end, 0, offset) + 1, self.blocks)

    @property
    def file_text(self) -> str:
        """The file's name as text to print and record (bytes that are not UTF-8 as ``\\xNN``)."""
        return _text(self.file)

    @cached_property  # a drip-fed program can be hundreds of megabytes: counted once
    def blocks(self) -> int:
        return self.data.rstrip(b"\r\n").count(self.end) + 1

    @cached_property
    def end(self) -> bytes:
        """The byte that ends a block."""
        return b"\n" if b"\n" in self.data else b"\r"


def read_program(path: Path, end_of_block: str = "as-is", bytesize: int = 8) -> NcProgram:
    """The program of ``path``: one program between a first and a last ``%`` line, every byte
    of it one the line carries as it is (``bytesize`` data bits)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProgramRefused(f"{_text(str(path))}: cannot read ({exc.strerror or exc})") from None
    lines = raw.splitlines()
    # Blanks and tape leader/trailer NULs around a '%' are no content.
    marks = [i for i, line in enumerate(lines) if line.strip(_BLANK) == b"%"]
    filled = [i for i, line in enumerate(lines) if line.strip(_BLANK)]
    if not filled or len(marks) != 2 or (marks[0], marks[1]) != (filled[0], filled[-1]):
        found = {0: "no '%' line", 1: "one '%' line"}.get(len(marks), f"{len(marks)} '%' lines")
        raise ProgramRefused(
            f"{_text(str(path))}: not one program between '%' lines ({found}); a drip feed "
            "sends a file that starts with a '%' line and ends with one, nothing added"
        )
    _check_bytes(path, raw, bytesize)
    data = raw
    if end_of_block != "as-is":
        eob = END_OF_BLOCK[end_of_block]
        data = eob.join(lines) + eob
    after = lines[marks[0] + 1] if marks[0] + 1 < len(lines) else b""
    found_name = _PROGRAM_NAME.match(after)
    name = found_name.group(1).decode("ascii", "replace") if found_name else path.stem
    return NcProgram(str(path), _text(name or path.name), data, hashlib.sha256(raw).hexdigest())


def _check_bytes(path: Path, raw: bytes, bytesize: int) -> None:
    """Refuse what would not arrive as it is: a control character inside the program (between
    the first and the last '%'; a DC3 would pause our own sender, and the control takes it as
    XOFF), or a byte wider than the port's data bits (cut silently on the wire)."""
    first, last = raw.index(b"%"), raw.rindex(b"%")
    control = _CONTROL.search(raw, first + 1, last)

    def line(offset: int) -> int:
        return raw.count(b"\n", 0, offset) + 1

    if control is not None:
        offset = control.start()
        byte = raw[offset]
        name = _CONTROL_NAMES.get(byte, "a control character")
        raise ProgramRefused(
            f"{_text(str(path))}: byte 0x{byte:02X} ({name}) at offset {offset} (line "
            f"{line(offset)}): inside a program only TAB, CR and LF are "
            "sent as control characters (DC1-DC4 are flow control on the line)"
        )
    widest = (1 << bytesize) - 1
    wide = next((i for i, b in enumerate(raw) if b > widest), None) if max(raw) > widest else None
    if wide is not None:
        raise ProgramRefused(
            f"{_text(str(path))}: byte 0x{raw[wide]:02X} at offset {wide} (line "
            f"{line(wide)}) does not fit the port's {bytesize} data bits: "
            "it would arrive cut (use bytesize = 8, or remove it)"
        )


@dataclass(frozen=True)
class Progress:
    sent: int  # program bytes out (leader not counted)
    total: int
    block: int
    blocks: int
    paused: bool  # XOFF from the control


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    sent_bytes: int
    started_at: datetime
    ended_at: datetime  # started_at + the time the send took (a wall clock step changes nothing)
    message: str | None
    block: int
    pauses: int  # how many times the control said XOFF


class JournalUnwritable(Exception):
    """The send journal cannot be written: nothing must be sent (it would not be recorded)."""


class _PortFailed(Exception):
    """The port raised while being read or written."""


class SendJournal:
    """A send in progress, on disk: written before the first byte, its position advanced as the
    send goes, removed once the send's record is stored. The file is locked while its sender
    lives; one that is not locked is a sender that was killed (``leftover_sends``).

    The first line is the record's fixed part (JSON); the second, rewritten in place, the
    program bytes that had surely gone out (written and no longer in the port's queue) and the
    milliseconds since the start; a third, once the send ended, its record (``finish``), which
    the next command stores if this one could not."""

    def __init__(
        self, directory: Path, config: SerialConfig, program: NcProgram, sent_by: str | None
    ) -> None:
        self.directory = directory
        self.config = config
        self.program = program
        self.sent_by = sent_by
        self.path: Path | None = None
        self._fd = -1
        self._offset = 0
        self._failed = False
        self.holds_record = False  # ``finish`` wrote the record: the next command can store it

    def begin(self, started_at: datetime) -> None:
        """Write the journal (``JournalUnwritable`` if it cannot be: then nothing must be sent)."""
        config, program = self.config, self.program
        header = {
            "machine_id": config.machine_id,
            "source": config.source(),
            "data": _record_data(config, program, self.sent_by, started_at),
        }
        stamp = started_at.strftime("%Y%m%dT%H%M%S%f")
        name = f"{config.machine_id}.{stamp}.{os.getpid()}"
        building = self.directory / f".{name}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(building, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise JournalUnwritable(f"{building}: {exc.strerror or exc}") from None
        try:
            # Locked before it has its name: a reader never sees an unlocked half journal.
            fcntl.flock(fd, fcntl.LOCK_EX)
            first = json.dumps(header).encode() + b"\n"
            os.write(fd, first + _position_line(0, 0))
            os.fsync(fd)
            path = self.directory / f"{name}.journal"
            os.replace(building, path)
            _sync_directory(self.directory)  # the new name survives a power cut too
        except BaseException as exc:
            os.close(fd)
            building.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise JournalUnwritable(f"{building}: {exc.strerror or exc}") from None
            raise
        self.path, self._fd, self._offset = path, fd, len(first)

    def advance(self, sent: int, elapsed_s: float) -> None:
        """The program bytes that have surely gone out, ``elapsed_s`` after the start."""
        if self._fd < 0:
            return
        try:
            os.pwrite(self._fd, _position_line(sent, elapsed_s), self._offset)
        except OSError as exc:  # the position on disk stays lower: still true ("at least")
            if not self._failed:
                log.warning("the send journal %s cannot be advanced: %s", self.path, exc)
                self._failed = True

    def finish(self, record: CloudEvent) -> None:
        """The send ended with ``record``: kept here until it is stored."""
        if self._fd < 0:
            return
        try:
            os.pwrite(self._fd, record.model_dump_json().encode() + b"\n",
                      self._offset + len(_position_line(0, 0)))  # fmt: skip
            os.fsync(self._fd)
        except OSError as exc:
            log.warning("the send journal %s cannot take the record: %s", self.path, exc)
        else:
            self.holds_record = True

    def end(self) -> None:
        """The send's record is stored: the journal goes."""
        if self._fd < 0:
            return
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # the lock goes with it
        self._fd = -1

    def set_aside(self) -> Path | None:
        """The send's record cannot be made (the contract refuses it): the journal is kept as
        ``.unreadable`` for a person to read, and reported by every ``mes-hub dnc flush``."""
        if self._fd < 0 or self.path is None:
            return None
        kept = self.path.with_suffix(".unreadable")
        try:
            os.replace(self.path, kept)
            _sync_directory(self.directory)
        except OSError as exc:
            log.error("the send journal %s cannot be set aside: %s", self.path, exc)
            kept = self.path
        os.close(self._fd)
        self._fd = -1
        return kept


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry, not only the file's bytes)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _position_line(sent: int, elapsed_s: float) -> bytes:
    return f"{sent:015d} {max(0, round(elapsed_s * 1000)):015d}\n".encode()  # fixed width


@dataclass(frozen=True)
class LeftoverSend:
    """A send whose sender died: the record it would have made (outcome failed)."""

    machine_id: str
    event: CloudEvent
    journal: Path


def leftover_sends(directory: Path, held: list[Path] | None = None) -> Iterator[LeftoverSend]:
    """The sends in ``directory`` whose sender is gone, each while its journal is held: remove
    ``journal`` once the record is stored (else the next command finds it again). The journals
    another process holds (a send in progress, or another command recording it) are appended
    to ``held``. Journals that were never finished being built are removed."""
    _remove_stale_tmp(directory)
    for path in sorted(directory.glob("*.journal")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # its sender ended meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if held is not None:
                    held.append(path)
                continue
            if os.fstat(fd).st_nlink == 0:
                continue  # ended and removed while we waited for the lock
            try:
                found = _leftover(os.pread(fd, 1 << 20, 0), path)
            except (ValueError, KeyError, TypeError) as exc:
                unreadable = path.with_suffix(".unreadable")
                log.error("the send journal %s cannot be read (%s): kept as %s", path, exc,
                          unreadable)  # fmt: skip
                os.replace(path, unreadable)
                _sync_directory(directory)
                continue
            yield found
        finally:
            os.close(fd)


def unreadable_journals(directory: Path) -> list[Path]:
    """The journals set aside because no record could be made of them: a person must look."""
    return sorted(directory.glob("*.unreadable"))


def _remove_stale_tmp(directory: Path) -> None:
    """Remove the journals whose sender died while building them (before the first byte was
    sent: nothing to record). One still locked is being built; a young one may be about to be."""
    for path in directory.glob(".*.tmp"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > STALE_TMP_S:
                path.unlink(missing_ok=True)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)


_TOKEN: TypeAdapter[str] = TypeAdapter(Token)


def _leftover(text: bytes, path: Path) -> LeftoverSend:
    first, second, third, *_ = [*text.split(b"\n"), b""]
    header = json.loads(first)
    if third.strip():  # the send ended and its record was made: that is the record
        try:
            event = CloudEvent.model_validate_json(third)
        except ValueError as exc:  # torn by a crash while it was written: the position tells
            log.warning("the record in the send journal %s is cut (%s): recording the send "
                        "from its position", path, type(exc).__name__)  # fmt: skip
        else:
            # The subject names the buffer's folder: a token, never a path.
            return LeftoverSend(_TOKEN.validate_python(event.subject), event, path)
    sent_text, elapsed_text = second.split()
    sent, elapsed_ms = int(sent_text), int(elapsed_text)
    data: dict[str, Any] = dict(header["data"])
    started_at = datetime.fromisoformat(data["started_at"])
    data["sent_bytes"] = min(sent, data["size_bytes"])
    data["outcome"] = "failed"
    data["message"] = (
        f"failed: the sender was interrupted (killed, or the computer stopped) before it "
        f"could record the send; at least {sent} of {data['size_bytes']} bytes had gone out. "
        "The control may hold a partial program waiting for data: check it, press RESET"
    )[:1024]
    ended_at = started_at + timedelta(milliseconds=elapsed_ms)
    event = _record_event(header["machine_id"], header["source"], data, started_at, ended_at)
    return LeftoverSend(event.subject, event, path)


class DripFeed:
    """One send of ``program`` on an open port; ``send`` blocks until it ends (run it in a
    thread, or the main thread with ``cancel`` from a signal handler)."""

    def __init__(
        self,
        port: serial.Serial,
        config: SerialConfig,
        program: NcProgram,
        on_progress: Callable[[Progress], None] | None = None,
        journal: SendJournal | None = None,
    ) -> None:
        self.port = port
        self.options: DncOptions = config.dnc
        self.program = program
        self.journal = journal
        self._bytes_per_s = PACE * config.baudrate / config.bits_per_byte()
        self._on_progress = on_progress
        self._cancel = threading.Event()
        self._paused = False
        self.pauses = 0
        self._ends = 0  # block ends sent so far: the running block count
        self._started_at = datetime.now(UTC)
        self._clock = time.monotonic()

    def cancel(self) -> None:
        """Stop at once (before the next chunk): nothing more is written."""
        self._cancel.set()

    def send(self) -> SendResult:
        """Send the program. With a journal, ``JournalUnwritable`` is raised before
        anything is sent."""
        options = self.options
        leader = options.leader_nuls
        data = b"\0" * leader + self.program.data
        payload = memoryview(data)  # chunks without copies
        self._started_at, self._clock = datetime.now(UTC), time.monotonic()
        if self.journal is not None:
            self.journal.begin(self._started_at)
        position = journaled = queued = 0
        next_write = last_progress = time.monotonic()
        paused_since: float | None = None
        last_report = 0.0
        try:
            while position < len(payload):
                if self._cancel.is_set():
                    return self._stopped("cancelled", position, "cancelled")
                now = time.monotonic()
                self._take_input(0)
                if self._paused:
                    if paused_since is None:
                        paused_since = now
                        self.pauses += 1
                        self._report(position, True)
                        self._journal(position)
                    if now - paused_since > options.resume_timeout_s:
                        why = (f"failed: the control sent XOFF and no XON within "
                               f"{options.resume_timeout_s:g} s")  # fmt: skip
                        return self._stopped("failed", position, why)
                    self._take_input(0.05)
                    continue
                if paused_since is not None:
                    paused_since = None
                    last_progress = now  # waiting for XON is no lack of progress
                    self._report(position, False)
                waiting = self._out_waiting()
                if waiting < queued:
                    last_progress = now
                queued = waiting
                # Idle by our own pacing is no lack of progress: the clock runs from then.
                if now - max(last_progress, next_write) > options.write_timeout_s:
                    return self._stopped("failed", position, self._no_progress())
                if now < next_write or waiting:
                    # The line is still carrying the last chunk: wait, listening for XOFF.
                    self._take_input(max(next_write - now, 0.0005))
                    continue
                written = self._write(payload[position : position + options.chunk_bytes])
                if not written:  # the driver's buffer is full
                    self._take_input(0.005)
                    continue
                block_ends = data.count(self.program.end, max(position, leader), position + written)
                self._ends += block_ends  # the running block count: never a rescan
                position += written
                last_progress = now
                next_write = max(now, next_write) + written / self._bytes_per_s
                if position - journaled >= JOURNAL_EVERY_BYTES:
                    journaled = position
                    self._journal(position)
                if now - last_report >= PROGRESS_EVERY_S:
                    last_report = now
                    self._report(position, False)
            stopped = self._drain(position)
            if stopped is not None:
                return stopped
        except _PortFailed as exc:
            why = f"failed: the port stopped taking data ({exc})"
            return self._stopped("failed", position, why)
        self._report(position, False)
        self._journal(position)
        return SendResult("completed", position - leader, self._started_at, self._ended_at(),
                          None, self.program.blocks, self.pauses)  # fmt: skip

    def _drain(self, position: int) -> SendResult | None:
        """Wait for the port's queue to empty (the last byte on the wire), failing when it does
        not go down for ``write_timeout_s``; a cancel drops what still waits."""
        queued, last_progress = self._out_waiting(), time.monotonic()
        while queued:
            if self._cancel.is_set():
                self._discard()
                return self._stopped("cancelled", position - queued, "cancelled")
            self._take_input(0.01)
            waiting, now = self._out_waiting(), time.monotonic()
            if waiting < queued:
                last_progress = now
            elif now - last_progress > self.options.write_timeout_s:
                return self._stopped("failed", position - waiting, self._no_progress())
            queued = waiting
        return None

    def _no_progress(self) -> str:
        return (
            f"failed: the port took no data for {self.options.write_timeout_s:g} s (no XOFF "
            "from the control: a cable, a handshake line or the serial adapter?)"
        )

    def _write(self, chunk: memoryview) -> int:
        """Write what the port takes now, without waiting (pyserial's own ``write`` spins on a
        full buffer with ``write_timeout=0`` and, with a timeout, raises without saying how
        much went out); its count is what was taken."""
        try:
            return os.write(self.port.fileno(), chunk)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _PortFailed(f"{type(exc).__name__}: {exc}") from None

    def _out_waiting(self) -> int:
        try:
            return int(self.port.out_waiting)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise _PortFailed(f"{type(exc).__name__}: {exc}") from None

    def _discard(self) -> None:
        try:
            self.port.reset_output_buffer()
        except OSError as exc:
            log.warning("%s: the port's queue could not be dropped: %s", self.port.port, exc)

    def _take_input(self, wait: float) -> None:
        """Read what the control sent (waiting up to ``wait`` for it); the last XOFF or XON
        decides. Raises ``_PortFailed`` when the device is gone."""
        try:
            if wait > 0:
                select.select([self.port.fileno()], [], [], wait)
            waiting = self.port.in_waiting
            incoming: bytes = self.port.read(waiting) if waiting else b""
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            raise _PortFailed(f"{type(exc).__name__}: {exc}") from None
        if not self.options.xon_xoff:
            return
        for byte in incoming:
            if byte == XOFF:
                self._paused = True
            elif byte == XON:
                self._paused = False

    def _sent(self, position: int) -> int:
        return max(0, position - self.options.leader_nuls)

    def _block(self) -> int:
        return min(self._ends + 1, self.program.blocks)

    def _ended_at(self) -> datetime:
        return self._started_at + timedelta(seconds=time.monotonic() - self._clock)

    def _journal(self, position: int) -> None:
        """Advance the journal to the bytes surely out: written, and no longer queued."""
        if self.journal is not None:
            try:
                queued = self._out_waiting()
            except _PortFailed:
                return
            self.journal.advance(self._sent(position - queued), time.monotonic() - self._clock)

    def _report(self, position: int, paused: bool) -> None:
        if self._on_progress is None:
            return
        program = self.program
        update = Progress(self._sent(position), len(program.data), self._block(),
                          program.blocks, paused)  # fmt: skip
        self._on_progress(update)

    def _stopped(self, outcome: Outcome, position: int, why: str) -> SendResult:
        sent, program = self._sent(position), self.program
        self._journal(position)
        block = self._block()
        message = (
            f"{why} after {sent} of {len(program.data)} bytes (block {block} of "
            f"{program.blocks}); nothing more was sent, no end-of-record '%': the control "
            "holds a partial program and is waiting for data. Press RESET on the control"
        )
        return SendResult(outcome, sent, self._started_at, self._ended_at(), message[:1024],
                          block, self.pauses)  # fmt: skip


def _record_data(
    config: SerialConfig, program: NcProgram, sent_by: str | None, started_at: datetime
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "program": program.name[:256],
        "file": program.file_text[:1024],
        "sha256": program.sha256,
        "size_bytes": len(program.data),
        "started_at": started_at.isoformat(),
        "port": config.port[:256],
    }
    if sent_by:
        data["sent_by"] = sent_by[:128]
    return data


def _text(name: str) -> str:
    """A file name as text the record can carry: bytes that are not UTF-8 (kept by Python as
    lone surrogates, which the contract refuses) are written as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _record_event(
    machine_id: str,
    source: str,
    data: dict[str, Any],
    started_at: datetime,
    ended_at: datetime,
) -> CloudEvent:
    """The record, checked against the contract (``ContractViolation`` if it is refused); the
    same send (machine, program hash, start) has the same id."""
    events = MachineEvents(machine_id, source)
    key = f"program_sent|{data['sha256']}|{started_at.isoformat()}"
    try:
        event = events.event("mes.machine.program_sent.v1", data, ended_at, key)
    except ValidationError as exc:  # the envelope itself (a source too long): the same refusal
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ContractViolation(f"{where}: {error['msg']}", field=where) from None
    validate_envelope(event)
    return event


def program_sent_event(
    config: SerialConfig, program: NcProgram, result: SendResult, sent_by: str | None
) -> CloudEvent:
    """The record of a send (``ContractViolation`` if the contract refuses it)."""
    data = _record_data(config, program, sent_by, result.started_at)
    data["sent_bytes"] = result.sent_bytes
    data["outcome"] = result.outcome
    if result.message:
        data["message"] = result.message
    return _record_event(config.machine_id, config.source(), data, result.started_at,
                         result.ended_at)  # fmt: skip


def trial_record(config: SerialConfig, program: NcProgram, sent_by: str | None) -> CloudEvent:
    """The record a send of ``program`` would make, checked before the port is opened: a send
    the contract would refuse to record is not started (``ContractViolation``)."""
    now = datetime.now(UTC)
    result = SendResult("completed", len(program.data), now, now, None, program.blocks, 0)
    return program_sent_event(config, program, result, sent_by)
