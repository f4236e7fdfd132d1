"""Haas CNC controls through Machine Data Collection (MDC): poll ``?Q`` queries, publish changes.

A Haas control with Setting 143 set to a port number answers ASCII queries on that TCP port.
One ``HaasConfig`` is one control and one machine. Once per connection the adapter asks
``?Q100`` (the serial number: logged, and checked against ``serial_number`` when configured);
then every ``poll_s`` it asks, one query at a time:

- ``?Q600 <n>`` for the part counter macro (``part_counter_macro``, by default #3901, the M30
  counter) and, when configured, the bad-part macro: partcount ``all`` / ``bad``;
- ``?Q500``: ``PROGRAM, O00012, IDLE, PARTS, 380``, or ``STATUS, BUSY`` while a program runs
  (no program and no parts then): execution (IDLE READY, BUSY ACTIVE, FEED HOLD FEED_HOLD,
  ALARM ON STOPPED with a ``fault`` condition ``ALARM``), the program, and the parts counter
  when ``part_count_source = "q500"``;
- ``?Q104``: ``MODE, MEM``: the execution event's controller mode.

Should a control answer ``STATUS, BUSY`` to ``?Q600`` or ``?Q104`` too while it runs, the count
or the mode stays as it was until a poll shows it.

Replies come as ``<STX>payload<ETB><CR><LF>>``; the newer form ``>payload<CR><LF>`` is read
too. The control allows two MDC clients and sends every reply to both, so a reply is matched
to its query by its leading field, and replies to the other client's queries are skipped. A
``MACRO, <value>`` reply does not say which variable it holds: when more of them arrive during
a poll than the adapter asked for, the other client was reading macros too, and that poll's
macro values are not used (the next poll reads them again; counters are cumulative, nothing is
lost).

The control has no timestamps: every event carries the time of the poll that saw it, and its
id derives from that time and the value, so a poll repeating the state publishes nothing. The
first poll of a run publishes the whole state, with a ``normal`` condition without a code (no
condition of this machine is active but those it reports). A connection refused or closed, or
a query without an answer within ``timeout_s``, is a loss: ``UNAVAILABLE`` and an
``ADAPTER_CONNECTION`` condition, once; the adapter reconnects with backoff. A reply it cannot
read (an unknown status or mode, a fractional or negative counter, an ``UNKNOWN`` answer,
bytes that are no reply) is logged and published once as an ``ADAPTER_INPUT`` warning; a
``normal`` clears it when every reply reads well again.

The adapter only ever sends ``?Q`` queries: it has no way to write macros or settings. See
``docs/adapters/haas.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.machines.base import BAD_INPUT_CODE, MachineEvents, report_bad_input
from adapters.machines.observations import MachineObserver, Meaning
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)

ControllerMode = Literal["AUTOMATIC", "MANUAL", "MANUAL_DATA_INPUT", "SEMI_AUTOMATIC", "EDIT"]

STX, ETB = 0x02, 0x17
MAX_REPLY = 4096  # bytes: a reply never comes close; more without its end is not a reply
RECONNECT_MIN_S = 0.25
UNKNOWN_GRACE_S = 0.5  # after an UNKNOWN, how long our own answer may still come
ALARM_CODE = "ALARM"
BUSY_HINT = " (a control takes two MDC clients at most)"

# Q500's status field. "RUNNING" is not in Haas's documents but in third-party parsers.
STATUSES: dict[str, str] = {
    "IDLE": "READY",
    "BUSY": "ACTIVE",
    "RUNNING": "ACTIVE",
    "FEED HOLD": "FEED_HOLD",
    "ALARM ON": "STOPPED",
}
# Q104's mode, without the parentheses older controls put around it: "(MEM)" is "MEM".
MODES: dict[str, ControllerMode] = {
    "MEM": "AUTOMATIC",
    "MEMORY": "AUTOMATIC",
    "DNC": "AUTOMATIC",
    "MDI": "MANUAL_DATA_INPUT",
    "JOG": "MANUAL",
    "HAND JOG": "MANUAL",
    "HANDLE JOG": "MANUAL",
    "ZERO": "MANUAL",
    "ZERO RET": "MANUAL",
    "ZERO RETURN": "MANUAL",
    "EDIT": "EDIT",
    "LIST PROG": "EDIT",
}
_NAME = re.compile(r"^[A-Z0-9][A-Z0-9 .#_/-]*$")  # a reply's leading field: "M30 #1", "P.O. TIME"
_COUNT = re.compile(r"^\d+$")


class HaasConfig(BaseModel):
    """One Haas control (one machine) with Machine Data Collection on (Setting 143)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    host: str
    port: int = Field(default=5051, ge=1, le=65535)  # the number in Setting 143
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=3600)
    part_count_source: Literal["macro", "q500"] = "macro"
    part_counter_macro: int = Field(default=3901, ge=1, le=99999)
    bad_part_macro: int | None = Field(default=None, ge=1, le=99999)
    serial_number: str | None = Field(default=None, min_length=1, max_length=64)
    modes: dict[str, ControllerMode] = {}  # Q104 mode -> controller mode; wins over MODES

    @field_validator("modes")
    @classmethod
    def _modes_as_the_control_writes_them(
        cls, value: dict[str, ControllerMode]
    ) -> dict[str, ControllerMode]:
        return {_mode_key(mode): meaning for mode, meaning in value.items()}

    @model_validator(mode="after")
    def _two_different_counters(self) -> HaasConfig:
        if self.bad_part_macro is not None and self.bad_part_macro == self.part_counter_macro:
            raise ValueError(
                f"bad_part_macro #{self.bad_part_macro} is the part counter macro: "
                "bad parts need a counter of their own"
            )
        return self

    def source(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"haas://{host}:{self.port}"

    def macros(self) -> list[tuple[int, str]]:
        """(variable, counter kind) read by ``?Q600`` each poll."""
        read = [(self.part_counter_macro, "all")] if self.part_count_source == "macro" else []
        if self.bad_part_macro is not None:
            read.append((self.bad_part_macro, "bad"))
        return read


def _mode_key(mode: str) -> str:
    return " ".join(mode.strip().strip("()").upper().split())


# --- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One reply of the control: its comma-separated fields, trimmed; ``name`` is the first."""

    fields: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.fields[0]

    @classmethod
    def parse(cls, text: str) -> Reply | None:
        """The reply in ``text``, or None when it is not one (junk, a DPRNT line)."""
        if not text.isascii() or not text.isprintable():
            return None
        if text.startswith("STATUS ") and "," not in text:
            text = "STATUS," + text[len("STATUS") :]  # "STATUS BUSY", as some controls write it
        fields = tuple(f.strip() for f in text.split(","))
        if not _NAME.match(fields[0]) or (len(fields) < 2 and fields[0] != "UNKNOWN"):
            return None
        return cls(fields)

    def __str__(self) -> str:
        return ", ".join(self.fields)


class ReplyReader:
    """Splits what the control sends into replies and junk.

    A reply is ``STX payload ETB``, followed by CR LF and the ``>`` prompt; a line
    ``>payload`` is one too (the form of the newer control's documentation). Outside replies
    only line ends, prompts and spaces are expected: anything else is junk."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.junk: list[tuple[str, bytes]] = []  # what was not a reply, since last taken

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        buffer = self._buffer
        replies: list[Reply] = []
        while buffer:
            start = buffer.find(STX)
            if start < 0:
                # No reply begins: whole lines outside replies (the rest waits for its end).
                end = buffer.rfind(b"\n")
                if end < 0 and len(buffer) <= MAX_REPLY:
                    break
                cut = end + 1 if end >= 0 else len(buffer)
                self._outside(bytes(buffer[:cut]), replies)
                del buffer[:cut]
                continue
            if start:
                self._outside(bytes(buffer[:start]), replies)
                del buffer[:start]
                continue
            end = buffer.find(ETB)
            restart = buffer.find(STX, 1)
            if restart > 0 and (end < 0 or restart < end):
                self._junk(bytes(buffer[:restart]), "a reply without its end (ETB)")
                del buffer[:restart]
                continue
            if end < 0:
                if len(buffer) > MAX_REPLY:
                    self._junk(bytes(buffer), f"more than {MAX_REPLY} bytes without a reply's end")
                    buffer.clear()
                break
            payload = bytes(buffer[1:end])
            del buffer[: end + 1]
            reply = Reply.parse(payload.decode("ascii", errors="replace"))
            if reply is None:
                self._junk(payload, "a reply that is not 'NAME, value'")
            else:
                replies.append(reply)
        return replies

    def take_junk(self) -> list[tuple[str, bytes]]:
        junk, self.junk = self.junk, []
        return junk

    def _outside(self, data: bytes, replies: list[Reply]) -> None:
        for raw in data.split(b"\n"):
            line = raw.strip(b"\r\t ")
            if not line.strip(b">"):
                continue  # a line end or a prompt
            if line.startswith(b">"):
                reply = Reply.parse(line.lstrip(b">").decode("ascii", errors="replace").strip())
                if reply is not None:
                    replies.append(reply)
                    continue
            self._junk(line.lstrip(b">"), "bytes outside any reply")

    def _junk(self, data: bytes, what: str) -> None:
        self.junk.append((f"the control sent {what} ({len(data)} bytes)", data[:200]))


# --- the connection --------------------------------------------------------------------------


class HaasLost(ConnectionError):
    """The control did not answer (refused, closed, no answer within the timeout)."""


class _Refused(Exception):
    """The control answered UNKNOWN to our query."""


class _Session:
    """One TCP connection to the control's MDC port. A task receives all the time (so
    "received before a query was sent" is exact, also after a pause between polls); queries
    are asked one at a time."""

    def __init__(
        self, config: HaasConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.config = config
        self._reader = reader
        self._writer = writer
        self.replies = ReplyReader()
        self._pending: deque[Reply] = deque()
        self._arrived = asyncio.Event()
        self._ended: HaasLost | None = None  # why the connection ended, once it has
        self.plain_macros = 0  # "MACRO, <value>" replies seen (ours and the other client's)
        self._receiving = asyncio.create_task(self._receive())

    @classmethod
    async def open(cls, config: HaasConfig) -> _Session:
        try:
            async with asyncio.timeout(config.timeout_s):
                reader, writer = await asyncio.open_connection(config.host, config.port)
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise HaasLost(f"cannot connect to {config.host}:{config.port} ({reason})") from exc
        return cls(config, reader, writer)

    def close(self) -> None:
        self._receiving.cancel()
        self._writer.close()

    async def _receive(self) -> None:
        try:
            while data := await self._reader.read(1 << 16):
                self._pending.extend(self.replies.feed(data))
                self._arrived.set()
            self._ended = HaasLost(f"the control closed the connection{BUSY_HINT}")
        except OSError as exc:
            reason = str(exc) or type(exc).__name__
            self._ended = HaasLost(f"connection lost ({reason}){BUSY_HINT}")
        self._arrived.set()

    def discard_pending(self) -> None:
        """Forget replies received so far: none of them answers a query sent after now."""
        while self._pending:
            self._count(self._pending.popleft())

    def _count(self, reply: Reply) -> None:
        if reply.name == "MACRO" and len(reply.fields) == 2:
            self.plain_macros += 1

    async def ask(self, query: str, accepts: Callable[[Reply], bool]) -> Reply:
        """Send ``query`` and return the first reply after it that ``accepts`` takes; replies
        to the other client's queries are skipped. Raises ``_Refused`` when the control
        answered UNKNOWN (and nothing we take followed), ``HaasLost`` when nothing came."""
        self.discard_pending()
        if self._ended is not None:
            raise self._ended
        loop = asyncio.get_running_loop()
        try:
            self._writer.write(query.encode("ascii") + b"\r\n")
            async with asyncio.timeout(self.config.timeout_s):
                await self._writer.drain()
        except (OSError, TimeoutError) as exc:
            raise HaasLost(f"cannot send {query} ({str(exc) or type(exc).__name__})") from exc
        deadline = loop.time() + self.config.timeout_s
        refused_by = None  # the deadline for our answer once an UNKNOWN came
        while True:
            while self._pending:
                reply = self._pending.popleft()
                self._count(reply)
                if accepts(reply):
                    return reply
                if reply.name == "UNKNOWN" and refused_by is None:
                    # Ours, unless it answers the other client: then ours still comes.
                    refused_by = min(deadline, loop.time() + UNKNOWN_GRACE_S)
            if self._ended is not None:
                raise self._ended
            left = (refused_by or deadline) - loop.time()
            if left <= 0:
                if refused_by is not None:
                    raise _Refused(query)
                raise HaasLost(f"no answer to {query} within {self.config.timeout_s:g} s")
            self._arrived.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # comes with the reply, and the adapter would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()


# --- one poll --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """What one poll read. ``None`` where the control did not say (or said it wrongly)."""

    execution: str | None = None
    status: str | None = None  # Q500's status as the control wrote it
    program: str | None = None
    program_shown: bool = False  # Q500 shows the program (not while BUSY)
    mode: ControllerMode | None = None
    counts: tuple[tuple[str, int], ...] = ()  # (kind, count)
    problems: tuple[tuple[str, str, str], ...] = ()  # (item, what was wrong, raw)
    macros_unread: bool = False  # the macro replies could not be told apart this poll


def _is(*names: str) -> Callable[[Reply], bool]:
    return lambda reply: reply.name in names


def _macro(variable: int) -> Callable[[Reply], bool]:
    def accepts(reply: Reply) -> bool:
        if reply.name == "STATUS":
            return True  # "STATUS, BUSY": a control may answer any query so while it runs
        if reply.name != "MACRO":
            return False
        # "MACRO, <value>" names no variable; "MACRO, <n>, <value>" does: it must be ours.
        return len(reply.fields) == 2 or reply.fields[1] == str(variable)

    return accepts


def _count(text: str) -> int | None:
    """A counter as the control writes it ("380", "380.000000"): a whole number ≥ 0."""
    whole, _, fraction = text.partition(".")
    if not _COUNT.match(whole) or (fraction and not _COUNT.match(fraction)):
        return None
    return int(whole) if not fraction.strip("0") else None


async def _read(session: _Session, config: HaasConfig) -> _Reading:
    """One poll: the counter macros, Q500 and Q104. Raises ``HaasLost``."""
    problems: list[tuple[str, str, str]] = []
    counts: list[tuple[str, int]] = []
    session.discard_pending()
    plain_before = session.plain_macros
    plain_asked = 0
    macro_counts: list[tuple[str, int]] = []
    macro_problems: list[tuple[str, str, str]] = []
    for variable, kind in config.macros():
        item = f"macro #{variable}"
        try:
            reply = await session.ask(f"?Q600 {variable}", _macro(variable))
        except _Refused:
            problems.append((item, f"?Q600 {variable}: the control answered UNKNOWN", "UNKNOWN"))
            continue
        if reply.name == "STATUS":
            continue  # busy: not shown now (the count comes with a later poll)
        plain_asked += len(reply.fields) == 2
        value = _count(reply.fields[-1])
        if value is None:
            what = f"{item} is {reply.fields[-1]!r}: a part counter must be a whole number ≥ 0"
            macro_problems.append((item, what, str(reply)))
            continue
        macro_counts.append((kind, value))

    execution: str | None = None
    status: str | None = None
    program: str | None = None
    program_shown = False
    try:
        reply = await session.ask("?Q500", _is("PROGRAM", "STATUS"))
    except _Refused:
        problems.append(("Q500", "?Q500: the control answered UNKNOWN", "UNKNOWN"))
    else:
        status, wrong = _q500_status(reply)
        if wrong is not None:
            problems.append(("Q500", wrong, str(reply)))
        else:
            execution = STATUSES.get(status or "")
            if execution is None:
                problems.append(("Q500", f"Q500: status {status!r} is not known", str(reply)))
            if reply.name == "PROGRAM":
                program_shown = True
                program = None if reply.fields[1] == "MDI" else reply.fields[1][:256] or None
                if config.part_count_source == "q500":
                    counts.append(("all", int(reply.fields[4])))

    mode: ControllerMode | None = None
    try:
        reply = await session.ask("?Q104", _is("MODE", "STATUS"))
    except _Refused:
        problems.append(("Q104", "?Q104: the control answered UNKNOWN", "UNKNOWN"))
    else:
        if reply.name == "MODE":  # not "STATUS, BUSY": then the mode stays as it was
            written = _mode_key(reply.fields[1])
            mode = config.modes.get(written) or MODES.get(written)
            if mode is None:
                what = f"Q104: mode {reply.fields[1]!r} is not known"
                problems.append(("Q104", what, str(reply)))

    macros_unread = session.plain_macros - plain_before > plain_asked
    if macros_unread:
        # More "MACRO, <value>" replies than we asked for: the other client read macros in the
        # meantime, and which value is ours cannot be told. Read again next poll.
        log.debug("%s: macro replies of another client during the poll; read again", config.host)
    else:
        counts = macro_counts + counts
        problems = macro_problems + problems
    for what, junk in session.replies.take_junk():
        problems.append(("stream", what, repr(junk)))
    return _Reading(
        execution,
        status,
        program,
        program_shown,
        mode,
        tuple(counts),
        tuple(problems),
        macros_unread,
    )


def _q500_status(reply: Reply) -> tuple[str | None, str | None]:
    """Q500's status, or what is wrong with the reply."""
    fields = reply.fields
    if reply.name == "STATUS":
        return fields[1], None  # "STATUS, BUSY": running; program and parts hidden
    if len(fields) != 5 or fields[3] != "PARTS" or not _COUNT.match(fields[4]):
        return None, "Q500: expected 'PROGRAM, <program>, <status>, PARTS, <count>'"
    return fields[2], None


# --- deciding what to publish ----------------------------------------------------------------


@dataclass
class _Machine:
    """One machine's published state: the observer's, and the bad input reported."""

    observer: MachineObserver
    polled: bool = False  # the first poll of the run published the whole state
    problems: dict[str, str] = field(default_factory=dict)
    last: _Reading | None = None
    last_at: datetime | None = None

    def repeats(self, reading: _Reading, at: datetime) -> bool:
        """Whether ``reading`` is the last poll's again, later: it has nothing new. (A poll
        earlier than the last, the host's clock set back, goes through the whole rule.)"""
        last_at = self.last_at
        return (
            self.polled
            and reading == self.last
            and last_at is not None
            and at >= last_at
            and not self.observer.connection_down
        )


class HaasAdapter:
    """Polls one Haas control and publishes the changes of its machine (see the module
    docstring)."""

    protocol: ClassVar[str] = "haas"

    def __init__(self, config: HaasConfig) -> None:
        self.config = config
        self.events = MachineEvents(config.machine_id, config.source())
        self.serial_number: str | None = None  # as the control answered ?Q100

    def _new_machine(self) -> _Machine:
        return _Machine(MachineObserver(self.events, log))

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        machine = self._new_machine()
        first_backoff = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first_backoff
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            session: _Session | None = None
            try:
                session = await self._connect()
                next_poll = loop.time()
                while not stop.is_set():
                    machine = await self._poll(session, machine, publisher)
                    backoff = first_backoff
                    next_poll += self.config.poll_s
                    if next_poll < loop.time():
                        next_poll = loop.time()  # a slow control: do not burst to catch up
                    if await _stopped(stop, next_poll - loop.time()):
                        return
            except HaasLost as exc:
                machine = await self._lost(machine, publisher, str(exc), backoff)
            except Exception as exc:
                # Whatever else went wrong, the adapter must live on: reconnect.
                log.exception("%s %s: session failed", self.events.source, self.config.machine_id)
                reason = f"session failed ({type(exc).__name__})"
                machine = await self._lost(machine, publisher, reason, backoff)
            finally:
                if session is not None:
                    session.close()
            if await _stopped(stop, backoff):
                return
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def check(self) -> list[CloudEvent]:
        """Connect, read once and return the first events of ``run``, publishing nothing. A
        control that does not answer raises ``HaasLost`` (a ``ConnectionError``)."""
        session = await self._connect()
        try:
            at = datetime.now(UTC)
            reading = await _read(session, self.config)
        finally:
            session.close()
        return self._changes(self._new_machine(), reading, at)

    async def _connect(self) -> _Session:
        """A session with the control, after ``?Q100`` told which control it is."""
        session = await _Session.open(self.config)
        try:
            reply = await session.ask("?Q100", _is("SERIAL NUMBER"))
        except _Refused:
            serial = None
        except BaseException:
            session.close()
            raise
        else:
            serial = reply.fields[1]
        expected = self.config.serial_number
        if expected is not None and serial != expected:
            session.close()
            raise HaasLost(
                f"the control answers serial number {serial!r}, not {expected!r}: "
                "another machine at this address?"
            )
        self.serial_number = serial
        log.info(
            "%s %s: connected to the control with serial number %s",
            self.events.source,
            self.config.machine_id,
            serial,
        )
        return session

    async def _poll(
        self, session: _Session, machine: _Machine, publisher: EventPublisher
    ) -> _Machine:
        at = datetime.now(UTC)
        reading = await _read(session, self.config)
        if machine.repeats(reading, at):
            return machine  # the same as last poll: nothing to publish
        before = copy.deepcopy(machine)
        events = self._changes(machine, reading, at)
        return await self._publish(publisher, events, before, machine)

    async def _lost(
        self, machine: _Machine, publisher: EventPublisher, reason: str, retry_in: float
    ) -> _Machine:
        before = copy.deepcopy(machine)
        config = self.config
        events = machine.observer.lost(f"Haas MDC {config.host}:{config.port}: {reason}")
        if not events:
            log.debug("%s %s: still no answer (%s)", self.events.source, config.machine_id, reason)
            return machine
        log.warning(
            "%s %s: control not answering (%s); reconnecting from %.2f s up to %.1f s apart",
            self.events.source,
            config.machine_id,
            reason,
            retry_in,
            config.reconnect_max_s,
        )
        machine.last = None  # the next answer is published against what was published
        return await self._publish(publisher, events, before, machine)

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], old: _Machine, new: _Machine
    ) -> _Machine:
        """The new state once its events are published; the old one if publishing failed, so
        the next poll finds the same changes again."""
        if not events:
            return new
        try:
            await publisher.publish_many(events)
        except Exception:
            log.exception(
                "%s %s: publishing %d events failed; retrying with the next poll",
                self.events.source,
                self.config.machine_id,
                len(events),
            )
            return old
        return new

    def _changes(self, machine: _Machine, reading: _Reading, at: datetime) -> list[CloudEvent]:
        """The events that take the hub from what ``machine`` published to ``reading``."""
        observer = machine.observer
        stamp = at.isoformat()
        events = observer.value("availability", "Q500", "AVAILABLE", at, f"available|{stamp}")
        if not machine.polled:
            # A fresh run knows every condition of the machine: clear what an earlier run left.
            events.append(self.events.condition("normal", at, f"conditions|{stamp}|reset"))
            machine.polled = True
        if reading.execution is not None:
            events += self._execution(observer, reading, at)
            if reading.status == "ALARM ON":
                text = "the control reports ALARM ON (Q500); the alarm is on its ALARMS screen"
                uid = f"alarm|{stamp}|on"
                events += observer.condition("alarm", "FAULT", ALARM_CODE, text, at, uid)
            else:
                uid = f"alarm|{stamp}|off"
                events += observer.condition("alarm", "NORMAL", ALARM_CODE, None, at, uid)
        elif reading.mode is not None and observer.execution is not None:
            events += self._execution(observer, reading, at)
        for kind, count in reading.counts:
            meaning: Meaning = "bad_part_count" if kind == "bad" else "part_count"
            uid = f"count:{kind}|{stamp}|{count}"
            events += observer.value(meaning, f"count:{kind}", str(count), at, uid)
        events += self._problem_changes(machine, reading, at)
        machine.last, machine.last_at = reading, at
        return events

    def _execution(
        self, observer: MachineObserver, reading: _Reading, at: datetime
    ) -> list[CloudEvent]:
        """One execution event with mode and program when any of them changed. What the poll
        did not read (the program while BUSY, a mode the control did not answer) stays as
        last published: never a made-up change."""
        read = {
            "execution": reading.execution or observer.execution,
            "mode": reading.mode or observer.mode,
            "program": reading.program if reading.program_shown else observer.program,
        }
        if all(observer.published(item).repeats(value, at) for item, value in read.items()):
            return []
        for item, value in read.items():
            observer.published(item).add(value, at)
            setattr(observer, item, value)
        uid = f"execution|{at.isoformat()}|{read['execution']}|{read['mode']}|{read['program']}"
        execution = read["execution"] or "UNAVAILABLE"
        return [self.events.execution(execution, at, uid, read["mode"], read["program"])]

    def _problem_changes(
        self, machine: _Machine, reading: _Reading, at: datetime
    ) -> list[CloudEvent]:
        """Each problem once while it lasts; a ``normal`` when none is left."""
        events = []
        problems = {item: what for item, what, _ in reading.problems}
        if reading.macros_unread:
            # Not read this poll: a macro reported wrong stays so until a poll reads it.
            problems |= {i: w for i, w in machine.problems.items() if i.startswith("macro #")}
        for item, what, raw in reading.problems:
            if machine.problems.get(item) == what:
                continue  # reported already: a reply stuck wrong is reported once
            key = f"{item}|{at.isoformat()}|{what}"
            event = report_bad_input(log, self.events, what, raw, key)
            # Stamped when made; the warning belongs to the poll that saw the reply.
            events.append(event.model_copy(update={"time": at}))
        if machine.problems and not problems:
            key = f"bad-input-cleared|{at.isoformat()}"
            events.append(self.events.condition("normal", at, key, native_code=BAD_INPUT_CODE))
        machine.problems = problems
        return events


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; whether it is."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
    return stop.is_set()
