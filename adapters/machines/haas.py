"""Haas CNC controls through Machine Data Collection (MDC): poll ``?Q`` queries, publish changes.

A Haas control with Setting 143 set to a port number answers ASCII queries on that TCP port.
One ``HaasConfig`` is one control and one machine. Once per connection the adapter asks
``?Q100`` (the serial number: logged, and checked against ``serial_number`` when configured);
then every ``poll_s`` it asks, one query at a time:

- ``?Q600 <n>`` for the part counter macro (``part_count_macro``, by default #3901, the M30
  counter) and, when configured, ``bad_count_macro``: partcount ``all`` / ``bad``;
- ``?Q500``: ``PROGRAM, O00012, IDLE, PARTS, 380``, or ``STATUS, BUSY`` while a program runs
  (no program and no parts then): execution (IDLE READY, BUSY ACTIVE, FEED HOLD FEED_HOLD,
  ALARM ON STOPPED with a ``fault`` condition ``ALARM``), the program, and the parts counter
  when ``part_count_source = "q500"``;
- ``?Q104``: ``MODE, MEM``: the execution event's controller mode.

Should a control answer ``STATUS, BUSY`` to ``?Q600`` or ``?Q104`` too while it runs, the count
or the mode stays as it was until a poll shows it.

Replies come as ``<STX>payload<ETB><CR><LF>>``; the newer form ``>payload<CR><LF>`` is read
too. The control allows two MDC clients and sends every reply to both, so a reply is matched
to its query by its leading field, and replies to the other client's queries are skipped.
Three replies can answer a macro query and say nothing of whose query they answer: ``MACRO,
<value>`` (no variable named), ``STATUS, BUSY`` and ``UNKNOWN``. When more of them arrive during
a poll than the adapter's own queries took, the other client's may have been taken for the
adapter's: that poll's macro values and its ``UNKNOWN`` answers are not used (the next poll
reads again; counters are cumulative, nothing is lost). An ``UNKNOWN`` may be the other
client's, so the adapter waits a few of its round trips for its own answer after one; a poll
with the other client's traffic reports a refusal only once it repeated over three polls.

The control has no timestamps: every event carries the time of the poll that saw it, and its
id derives from that time and the value (a retried publish is dropped downstream as a
duplicate). A poll repeating the state publishes nothing, because the adapter keeps what it
published. The first poll of a run publishes the whole state, with a ``normal`` condition
without a code (no condition of this machine is active but those it reports). A connection
refused or closed, or a query without an answer within ``timeout_s``, is a loss:
``UNAVAILABLE`` and an ``ADAPTER_CONNECTION`` condition, once; the adapter reconnects with
backoff, and what the control shows then is read anew (a program hidden by BUSY is not carried
over the loss). A reply it cannot read (an unknown status or mode, a fractional or negative
counter, an ``UNKNOWN`` answer, bytes that are no reply) is logged and published as an
``ADAPTER_INPUT`` warning once while it lasts; a ``normal`` clears it when every reply reads
well again.

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

from adapters.machines.base import (
    MachineEvents,
    problem_changes,
    publish_or_keep,
    stopped,
    url_host,
)
from adapters.machines.observations import MachineObserver, Meaning
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)

ControllerMode = Literal["AUTOMATIC", "MANUAL", "MANUAL_DATA_INPUT", "SEMI_AUTOMATIC", "EDIT"]

STX, ETB = 0x02, 0x17
MAX_REPLY = 4096  # bytes: a reply never comes close; more without its end is not a reply
MAX_PENDING = 256  # replies waiting to be matched to a query; a flood beyond is not an answer
JUNK_SAMPLES = 3  # pieces of junk kept (and logged) per poll; the rest are only counted
JUNK_SAMPLE_BYTES = 80
JUNK = "the control sent bytes that are no reply"
RECONNECT_MIN_S = 0.25
# After an UNKNOWN that may answer the other client, our own answer may still come: we wait
# this many of the longest round trips seen in the session (at least GRACE_MIN_S, at most
# timeout_s; the whole timeout_s before the first round trip is known).
GRACE_ROUND_TRIPS = 4
GRACE_MIN_S = 0.1
REFUSALS_TO_REPORT = 3  # polls in a row with UNKNOWN, when the other client was asking too
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
    host: str = Field(min_length=1)
    port: int = Field(default=5051, ge=1, le=65535)  # the number in Setting 143
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=3600)
    part_count_source: Literal["macro", "q500"] = "macro"
    part_count_macro: int = Field(default=3901, ge=1, le=99999)
    bad_count_macro: int | None = Field(default=None, ge=1, le=99999)
    serial_number: str | None = Field(default=None, min_length=1, max_length=64)
    modes: dict[str, ControllerMode] = {}  # Q104 mode -> controller mode; wins over MODES

    @field_validator("modes")
    @classmethod
    def _modes_as_the_control_writes_them(
        cls, value: dict[str, ControllerMode]
    ) -> dict[str, ControllerMode]:
        return {_mode_key(mode): meaning for mode, meaning in value.items()}

    @model_validator(mode="after")
    def _counters_that_can_be_read(self) -> HaasConfig:
        if self.part_count_source == "q500" and "part_count_macro" in self.model_fields_set:
            # Silently not reading the macro the user named would count the wrong counter.
            raise ValueError(
                f"part_count_macro #{self.part_count_macro} is not read with "
                'part_count_source = "q500" (the count is then Q500\'s PARTS): remove one'
            )
        if self.bad_count_macro is not None and self.bad_count_macro == self.part_count_macro:
            raise ValueError(
                f"bad_count_macro #{self.bad_count_macro} is also part_count_macro: "
                "bad parts need a counter of their own"
            )
        return self

    def source(self) -> str:
        return f"haas://{url_host(self.host)}:{self.port}"

    def macros(self) -> list[tuple[int, str]]:
        """(variable, counter kind) read by ``?Q600`` each poll."""
        read = [(self.part_count_macro, "all")] if self.part_count_source == "macro" else []
        if self.bad_count_macro is not None:
            read.append((self.bad_count_macro, "bad"))
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

    @property
    def unowned(self) -> bool:
        """Whether it could answer a macro query without saying whose: ``MACRO, <value>``
        (no variable named), ``STATUS, BUSY``, ``UNKNOWN``, or a reply that cannot be read."""
        return self.name in ("STATUS", "UNKNOWN", "") or (
            self.name == "MACRO" and len(self.fields) == 2
        )

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


# A reply that came but cannot be read (not ASCII, no 'NAME, value', cut short): it answers
# some query, perhaps ours, which then has no answer to read this poll. (Its bytes are junk.)
UNREADABLE = Reply(("",))
UNANSWERED = ("UNKNOWN", "")  # the names of replies that answer a query without an answer


class ReplyReader:
    """Splits what the control sends into replies and junk.

    A reply is ``STX payload ETB``, followed by CR LF and the ``>`` prompt; a line
    ``>payload`` is one too (the form of the newer control's documentation). Outside replies
    only line ends, prompts and spaces are expected: anything else is junk. Junk is counted,
    and the first few pieces kept, until taken: a control spewing noise between two polls an
    hour apart costs no memory."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.junk_pieces = 0
        self.junk_bytes = 0
        self.junk_samples: list[tuple[str, bytes]] = []

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
                replies.append(UNREADABLE)
                del buffer[:restart]
                continue
            if end < 0:
                if len(buffer) > MAX_REPLY:
                    self._junk(bytes(buffer), f"more than {MAX_REPLY} bytes without a reply's end")
                    replies.append(UNREADABLE)
                    buffer.clear()
                break
            payload = bytes(buffer[1:end])
            del buffer[: end + 1]
            reply = Reply.parse(payload.decode("ascii", errors="replace"))
            if reply is None:
                self._junk(payload, "a reply that is not 'NAME, value'")
                replies.append(UNREADABLE)
            else:
                replies.append(reply)
        return replies

    def take_junk(self) -> str | None:
        """What was not a reply since last taken, summed up; None when there was nothing."""
        if not self.junk_pieces:
            return None
        samples = "; ".join(f"{what}: {data!r}" for what, data in self.junk_samples)
        more = " …" if self.junk_pieces > len(self.junk_samples) else ""
        pieces = f"{self.junk_pieces} piece{'s' if self.junk_pieces > 1 else ''}"
        summary = f"{pieces}, {self.junk_bytes} bytes: {samples}{more}"
        self.junk_pieces = self.junk_bytes = 0
        self.junk_samples = []
        return summary

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
        self.junk_pieces += 1
        self.junk_bytes += len(data)
        if len(self.junk_samples) < JUNK_SAMPLES:
            self.junk_samples.append((what, data[:JUNK_SAMPLE_BYTES]))


# --- the connection --------------------------------------------------------------------------


class HaasLost(ConnectionError):
    """The control did not answer (refused, closed, no answer within the timeout)."""


class _Session:
    """One TCP connection to the control's MDC port. A task receives all the time and counts
    every reply (ours and the other client's); replies are kept for matching only while a
    query waits for its answer. Queries are asked one at a time."""

    def __init__(
        self, config: HaasConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.config = config
        self._reader = reader
        self._writer = writer
        self.replies = ReplyReader()
        self._pending: deque[Reply] = deque(maxlen=MAX_PENDING)
        self._asking = False  # a query waits for its answer
        self._arrived = asyncio.Event()
        self._ended: HaasLost | None = None  # why the connection ended, once it has
        self.received = 0  # replies since the poll began, ours and the other client's
        self.unowned = 0  # of those, replies that could answer a macro query (Reply.unowned)
        self.round_trip: float | None = None  # the longest wait for an answer in this session
        self._receiving = asyncio.create_task(self._receive())

    @classmethod
    async def open(cls, config: HaasConfig) -> _Session:
        try:
            async with asyncio.timeout(config.timeout_s):
                reader, writer = await asyncio.open_connection(config.host, config.port)
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise HaasLost(
                f"cannot connect to {url_host(config.host)}:{config.port} ({reason})"
            ) from exc
        return cls(config, reader, writer)

    async def close(self) -> None:
        self._receiving.cancel()
        self._writer.close()
        await asyncio.wait([self._receiving])  # gone before the next session starts

    async def _receive(self) -> None:
        try:
            while data := await self._reader.read(1 << 16):
                for reply in self.replies.feed(data):
                    self.received += 1
                    self.unowned += reply.unowned
                    if self._asking:
                        self._pending.append(reply)
                self._arrived.set()
            self._ended = HaasLost(f"the control closed the connection{BUSY_HINT}")
        except OSError as exc:
            reason = str(exc) or type(exc).__name__
            self._ended = HaasLost(f"connection lost ({reason}){BUSY_HINT}")
        except Exception as exc:
            # Whatever it was, the connection is of no use any more: the poll waiting for an
            # answer must learn so now, not at its timeout.
            log.exception("%s: reading from the control failed", self.config.source())
            self._ended = HaasLost(f"reading from the control failed ({type(exc).__name__})")
        finally:
            self._arrived.set()

    def begin_poll(self) -> None:
        """Count the replies of one poll from now on."""
        self.received = self.unowned = 0

    def _grace(self) -> float:
        """How long our answer may still come after an UNKNOWN that may be the other
        client's: a few of the longest round trips seen (a slow control answers the other
        client's query first, then ours)."""
        timeout = self.config.timeout_s
        if self.round_trip is None:
            return timeout
        return min(timeout, max(GRACE_MIN_S, GRACE_ROUND_TRIPS * self.round_trip))

    async def ask(self, query: str, accepts: Callable[[Reply], bool]) -> Reply:
        """Send ``query`` and return the first reply after it that ``accepts`` takes; replies
        to the other client's queries are skipped. An ``UNKNOWN`` or ``UNREADABLE`` reply when
        such came and nothing we take followed; raises ``HaasLost`` when nothing came."""
        if self._ended is not None:
            raise self._ended
        self._pending.clear()  # received before the query was sent: no answer to it
        self._asking = True
        try:
            return await self._answer(query, accepts)
        finally:
            self._asking = False
            self._pending.clear()

    async def _answer(self, query: str, accepts: Callable[[Reply], bool]) -> Reply:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            self._writer.write(query.encode("ascii") + b"\r\n")
            async with asyncio.timeout(self.config.timeout_s):
                await self._writer.drain()
        except (OSError, TimeoutError) as exc:
            raise HaasLost(f"cannot send {query} ({str(exc) or type(exc).__name__})") from exc
        deadline = sent + self.config.timeout_s
        unanswered: Reply | None = None  # the first UNKNOWN or unreadable reply
        refused_by = deadline  # the deadline for our answer once one came
        while True:
            while self._pending:
                reply = self._pending.popleft()
                if accepts(reply):
                    self.round_trip = max(self.round_trip or 0.0, loop.time() - sent)
                    return reply
                if reply.name in UNANSWERED and unanswered is None:
                    # Ours, unless it answers the other client: then ours still comes.
                    unanswered = reply
                    refused_by = min(deadline, loop.time() + self._grace())
            if self._ended is not None:
                raise self._ended
            left = refused_by - loop.time()
            if left <= 0:
                if unanswered is not None:
                    return unanswered
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
    program_shown: bool = False  # Q500 shows the program (not while BUSY); MDI shows none
    mode: ControllerMode | None = None
    counts: tuple[tuple[str, int], ...] = ()  # (kind, count)
    problems: tuple[tuple[str, str, str], ...] = ()  # (item, what was wrong, raw)
    refused: tuple[tuple[str, str], ...] = ()  # (item, what): our query answered UNKNOWN
    unread: tuple[str, ...] = ()  # items not read: the reply unreadable, or maybe not ours
    other_traffic: bool = False  # replies to the other client's queries came in this poll


class _Poll:
    """One poll's queries, and the replies they took: the rest is the other client's."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.taken = 0
        self.taken_unowned = 0
        session.begin_poll()

    async def ask(self, query: str, accepts: Callable[[Reply], bool]) -> Reply:
        reply = await self.session.ask(query, accepts)
        self.taken += 1  # the control answers each query once
        self.taken_unowned += reply.unowned
        return reply

    def other_traffic(self) -> bool:
        return self.session.received > self.taken

    def foreign_unowned(self) -> bool:
        """Whether more replies that could answer a macro query came than ours took: then
        one of them may have been the other client's (what stays unmatched, possibly ours,
        is counted here too, received or not yet taken)."""
        return self.session.unowned > self.taken_unowned


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
    poll = _Poll(session)
    problems: list[tuple[str, str, str]] = []
    refused: list[tuple[str, str]] = []
    counts: list[tuple[str, int]] = []
    macro_counts: list[tuple[str, int]] = []
    macro_problems: list[tuple[str, str, str]] = []
    unread: list[str] = []  # answered with a reply that cannot be read (its bytes are junk)
    for variable, kind in config.macros():
        item = f"macro #{variable}"
        reply = await poll.ask(f"?Q600 {variable}", _macro(variable))
        if reply is UNREADABLE:
            unread.append(item)
            continue
        if reply.name == "UNKNOWN":
            refused.append((item, f"?Q600 {variable}: the control answered UNKNOWN"))
            continue
        if reply.name == "STATUS":
            continue  # busy: not shown now (the count comes with a later poll)
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
    reply = await poll.ask("?Q500", _is("PROGRAM", "STATUS"))
    if reply is UNREADABLE:
        unread.append("Q500")
    elif reply.name == "UNKNOWN":
        refused.append(("Q500", "?Q500: the control answered UNKNOWN"))
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
    reply = await poll.ask("?Q104", _is("MODE", "STATUS"))
    if reply is UNREADABLE:
        unread.append("Q104")
    elif reply.name == "UNKNOWN":
        refused.append(("Q104", "?Q104: the control answered UNKNOWN"))
    elif reply.name == "MODE":  # not "STATUS, BUSY": then the mode stays as it was
        written = _mode_key(reply.fields[1])
        mode = config.modes.get(written) or MODES.get(written)
        if mode is None:
            problems.append(("Q104", f"Q104: mode {reply.fields[1]!r} is not known", str(reply)))

    if poll.foreign_unowned():
        # The other client's MACRO, STATUS or UNKNOWN came while we asked: which macro value,
        # and which UNKNOWN, is ours cannot be told. Read again next poll.
        log.debug(
            "%s: the other client's replies came between ours; macro values not used this poll",
            config.source(),
        )
        unread += [f"macro #{variable}" for variable, _ in config.macros()]
        unread += [item for item, _ in refused]
        refused = []
    else:
        counts = macro_counts + counts
        problems = macro_problems + problems
    junk = session.replies.take_junk()
    if junk is not None:
        log.debug("%s: %s (%s)", config.source(), JUNK, junk)
        problems.append(("stream", JUNK, junk))
    return _Reading(
        execution,
        status,
        program,
        program_shown,
        mode,
        tuple(counts),
        tuple(problems),
        tuple(refused),
        tuple(unread),
        poll.other_traffic(),
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
    problems: dict[str, str] = field(default_factory=dict)  # item -> what, as reported
    refusals: dict[str, int] = field(default_factory=dict)  # item -> polls in a row UNKNOWN
    last: _Reading | None = None
    last_at: datetime | None = None

    def repeats(self, reading: _Reading, at: datetime) -> bool:
        """Whether ``reading`` is the last poll's again, later: it has nothing new. (A poll
        earlier than the last, the host's clock set back, goes through the whole rule; so
        does one with an UNKNOWN, which counts the polls it lasts.)"""
        last_at = self.last_at
        return (
            self.polled
            and reading == self.last
            and not reading.refused
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
                    if await stopped(stop, next_poll - loop.time()):
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
                    await session.close()
            if await stopped(stop, backoff):
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
            await session.close()
        return self._changes(self._new_machine(), reading, at)

    async def _connect(self) -> _Session:
        """A session with the control, after ``?Q100`` told which control it is."""
        session = await _Session.open(self.config)
        try:
            reply = await session.ask("?Q100", _is("SERIAL NUMBER"))
            serial = None if reply.name in UNANSWERED else reply.fields[1]
            expected = self.config.serial_number
            if expected is not None and serial != expected:
                raise HaasLost(
                    f"the control answers serial number {serial!r}, not {expected!r}: "
                    "another machine at this address?"
                )
        except BaseException:
            await session.close()
            raise
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
        # Decided on a copy: should anything fail on the way, ``machine`` is still what was
        # published, and the next poll finds the same changes again.
        new = copy.deepcopy(machine)
        events = self._changes(new, reading, at)
        return await publish_or_keep(publisher, events, machine, new, log)

    async def _lost(
        self, machine: _Machine, publisher: EventPublisher, reason: str, retry_in: float
    ) -> _Machine:
        config = self.config
        new = copy.deepcopy(machine)
        events = new.observer.lost(f"Haas MDC {url_host(config.host)}:{config.port}: {reason}")
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
        # What the control shows once back is read anew: the execution, mode and program from
        # before the loss are not carried into the first event after it (a program BUSY hides
        # then is not known, and is left out rather than made up).
        observer = new.observer
        observer.execution = observer.mode = observer.program = None
        new.last = None
        new.refusals = {}
        return await publish_or_keep(publisher, events, machine, new, log)

    def _changes(self, machine: _Machine, reading: _Reading, at: datetime) -> list[CloudEvent]:
        """The events that take the hub from what ``machine`` published to ``reading``
        (``machine`` is updated to match)."""
        observer = machine.observer
        stamp = at.isoformat()
        events = observer.value("availability", "Q500", "AVAILABLE", at, f"available|{stamp}")
        if not machine.polled:
            # A fresh run knows every condition of the machine: clear what an earlier run left.
            events.append(observer.reset_conditions(at, f"conditions|{stamp}|reset"))
            machine.polled = True
        if reading.execution is not None or (
            reading.mode is not None and observer.execution is not None
        ):
            events += observer.polled(
                reading.execution,
                reading.mode,
                reading.program,
                at,
                program_read=reading.program_shown,
            )
        if reading.execution is not None:
            if reading.status == "ALARM ON":
                text = "the control reports ALARM ON (Q500); the alarm is on its ALARMS screen"
                uid = f"alarm|{stamp}|on"
                events += observer.condition("alarm", "FAULT", ALARM_CODE, text, at, uid)
            else:
                uid = f"alarm|{stamp}|off"
                events += observer.condition("alarm", "NORMAL", ALARM_CODE, None, at, uid)
        for kind, count in reading.counts:
            meaning: Meaning = "bad_part_count" if kind == "bad" else "part_count"
            uid = f"count:{kind}|{stamp}|{count}"
            events += observer.value(meaning, f"count:{kind}", str(count), at, uid)
        events += self._problem_changes(machine, reading, at)
        machine.last, machine.last_at = reading, at
        return events

    def _problem_changes(
        self, machine: _Machine, reading: _Reading, at: datetime
    ) -> list[CloudEvent]:
        """This poll's wrong answers, each reported once while it lasts. An UNKNOWN is
        reported when no other client asked during the poll (it is ours), else once it
        repeated over ``REFUSALS_TO_REPORT`` polls; an item not read this poll keeps what was
        reported for it, neither reported again nor cleared."""
        problems = list(reading.problems)
        unread = set(reading.unread)
        refusals: dict[str, int] = {}
        for item, what in reading.refused:
            refusals[item] = machine.refusals.get(item, 0) + 1
            if not reading.other_traffic or refusals[item] >= REFUSALS_TO_REPORT:
                problems.append((item, what, "UNKNOWN"))
            else:
                unread.add(item)  # maybe the other client's UNKNOWN: wait whether it repeats
        for item in reading.unread:
            if item in machine.refusals:
                refusals[item] = machine.refusals[item]
        machine.refusals = refusals
        read = {item for item, _, _ in problems}
        problems += [
            (item, what, what)
            for item, what in machine.problems.items()
            if item in unread and item not in read
        ]
        events, machine.problems = problem_changes(log, self.events, machine.problems, problems, at)
        return events
