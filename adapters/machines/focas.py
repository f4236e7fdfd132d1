"""FANUC CNCs over FOCAS2 Ethernet (TCP 8193), EXPERIMENTAL: our own client, no FANUC library.

FANUC does not document the wire protocol; this client follows public reverse-engineering notes
(diohpix/pyfanuc's ``protocol.txt``, its README and packet samples, and the pyfanuc/pyfocas
clients derived from them; see ``docs/adapters/focas.md``). **It was never run against a real
control.** What the notes say, and what this module relies on:

- Every frame starts with a 10-byte header: magic ``A0 A0 A0 A0``, a version (u16: 1 from the
  client; controls answer 2 or 4), a frame type (u16) and the length of what follows (u16),
  all big-endian.
- A session opens with type ``0x0101`` (payload ``00 02``), answered by ``0x0102`` (``0x0103``:
  every session of the control is in use), and closes with ``0x0201`` / ``0x0202``.
- A request (``0x2101``) carries a count (u16) and that many blocks, each its length (u16,
  counting itself), a function selector (three u16: ``1, 1, function`` for the CNC) and five
  int32 arguments. The answer (``0x2102``) carries the same count of blocks, each its length,
  the selector echoed, an error code (i16: 0 is ``EW_OK``), an error detail (i16), two filler
  bytes, the data length (u16) and the data.

Each poll is one request with these blocks, read with ``readexactly`` to the announced length
(the replies may come in any number of TCP segments) within ``timeout_s``:

- ``cnc_statinfo`` (``0x19``): ``aut`` gives the controller mode, ``run`` the execution,
  ``emergency`` an ``EMERGENCY_STOP`` fault, ``alarm`` (when ``alarms = "flag"``) a fault for
  ALarM and the PMC alarm, a warning for battery, fan and the other warnings of the control;
- ``cnc_rdprgnum`` (``0x1c``): the main program number, published as program ``O<n>``;
- ``cnc_rdmacro`` (``0x15``): the part counter macro variables (e.g. ``#3901``), each a
  mantissa and decimal places, published as whole counts;
- ``cnc_rdalmmsg`` (``0x23``, with ``alarms = "messages"``): the active alarms, each a ``fault``
  condition with the native code ``<type>:<number>``; an alarm gone is cleared with ``normal``.

Changes only are published (``MachineObserver``), with the poll's time: FOCAS gives none.
Execution, mode and program read in one poll make one execution event at most. The first poll
of a run leads with a ``normal`` condition without a code: this adapter is the machine's only
source of conditions. Losing the control (refused, closed, no answer within ``timeout_s``)
publishes ``UNAVAILABLE`` and an ``ADAPTER_CONNECTION`` condition once; the adapter reconnects
with backoff. A reply whose magic, type or length is wrong, or whose blocks do not add up, is bad
input: an ``ADAPTER_INPUT`` warning, and the connection is opened again (the stream is out of
step); ``GARBLED_SESSIONS_LOST`` such sessions in a row, nothing understood in between, count as
a loss. A value that cannot be used (an unknown ``run``, a fractional counter, an error code for
one call) is an ``ADAPTER_INPUT`` warning while the others go on. When publishing fails, the
state stays as it was published, so the next poll finds the same changes again.

Exceptions::

    ConnectionError
     └── FocasLost          the control cannot be reached, closed the session, or did not answer
    ValueError
     └── FocasBadReply      a reply that does not follow the framing
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.machines.base import (
    BAD_INPUT_CODE,
    MachineEvents,
    publish_or_keep,
    stopped,
    url_host,
)
from adapters.machines.observations import MachineObserver, Meaning
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)

# --- the wire ----------------------------------------------------------------------------------

MAGIC = b"\xa0\xa0\xa0\xa0"
HEADER = struct.Struct(">4sHHH")  # magic, version, frame type, length of what follows
CLIENT_VERSION = 1
OPEN_REQUEST, OPEN_RESPONSE, OPEN_REFUSED = 0x0101, 0x0102, 0x0103
CLOSE_REQUEST = 0x0201  # answered by 0x0202
REQUEST, RESPONSE = 0x2101, 0x2102
OPEN_PAYLOAD = b"\x00\x02"
CALL = struct.Struct(">HHHiiiii")  # selector (CNC 1, 1, function) and five int32 arguments
ANSWER_HEAD = struct.Struct(">HHHhh2xH")  # selector echoed, error, detail, filler, data length

STATINFO, RDPRGNUM, RDMACRO, RDALMMSG = 0x19, 0x1C, 0x15, 0x23
ALARM_TEXT = 32  # characters of alarm text asked for per alarm
ALARM_RECORD = struct.Struct(">iiii")  # number, type, axis, text length; then ALARM_TEXT bytes
FUNCTION_NAMES = {
    STATINFO: "cnc_statinfo",
    RDPRGNUM: "cnc_rdprgnum",
    RDMACRO: "cnc_rdmacro",
    RDALMMSG: "cnc_rdalmmsg",
}
# FOCAS return codes (the FOCAS2 documentation's EW_* names) a call can answer with.
ERROR_NAMES = {
    -1: "EW_BUSY",
    1: "EW_FUNC",
    2: "EW_LENGTH",
    3: "EW_NUMBER",
    4: "EW_ATTRIB",
    5: "EW_DATA",
    6: "EW_NOOPT",
    7: "EW_PROT",
    8: "EW_OVRFLOW",
    9: "EW_PARAM",
    10: "EW_BUFFER",
    11: "EW_PATH",
    12: "EW_MODE",
    13: "EW_REJECT",
}

# cnc_statinfo, as documented for the 0i, 16i/18i/21i and 30i/31i/32i series.
EXECUTION_OF_RUN = {
    0: "READY",  # ****: reset
    1: "STOPPED",  # STOP
    2: "FEED_HOLD",  # HOLD
    3: "ACTIVE",  # STaRT: cycle start
    4: "ACTIVE",  # MSTR: a manual numerical command (jog MDI) running
}
MODE_OF_AUT: dict[int, str | None] = {
    0: "MANUAL_DATA_INPUT",  # MDI
    1: "AUTOMATIC",  # MEM
    2: None,  # **** (no mode selected)
    3: "EDIT",
    4: "MANUAL",  # HND (handle)
    5: "MANUAL",  # JOG
    6: "MANUAL",  # T-JOG (teach in jog)
    7: "MANUAL",  # T-HND (teach in handle)
    8: "MANUAL",  # INC (incremental feed)
    9: "MANUAL",  # REF (reference return)
    10: "AUTOMATIC",  # RMT (remote: DNC operation)
}
# cnc_statinfo's ``alarm`` (0i/16i/30i series): level, native code, the documented name.
# Battery, fan, power supply, FSSB, insulation and encoder are warnings of the control; only
# ALarM and the PMC alarm stop the machine.
ALARM_STATUS: dict[int, tuple[str, str, str]] = {
    1: ("FAULT", "CNC_ALARM", "ALarM"),
    2: ("WARNING", "BATTERY_LOW", "BATtery low"),
    3: ("WARNING", "FAN", "FAN (NC or servo amplifier)"),
    4: ("WARNING", "PS_WARNING", "PS warning"),
    5: ("WARNING", "FSSB_WARNING", "FSSB warning"),
    6: ("WARNING", "INSULATION_WARNING", "INSulate warning"),
    7: ("WARNING", "ENCODER_WARNING", "ENCoder warning"),
    8: ("FAULT", "PMC_ALARM", "PMC alarm"),
}
UNKNOWN_ALARM_STATUS = ("FAULT", "CNC_ALARM", "unknown")
EMERGENCY_CODE = "EMERGENCY_STOP"
# Sessions in a row whose replies broke the framing, no poll understood in between, after which
# the control counts as lost: it answers, but nothing it says can be used.
GARBLED_SESSIONS_LOST = 3
RECONNECT_MIN_S = 0.25


class FocasConfig(BaseModel):
    """One FANUC control (one machine) on FOCAS2 Ethernet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    host: str = Field(min_length=1)
    port: int = Field(default=8193, ge=1, le=65535)
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=3600)
    # Macro variables holding the cumulative counters: #3901 is the parts counter of the 0i,
    # 16i and 30i series (#3902 the parts required); a bad counter only if the program keeps one.
    part_count_macro: int = Field(default=3901, ge=1, le=99999)
    bad_count_macro: int | None = Field(default=None, ge=1, le=99999)
    # "messages": each active alarm with its number (cnc_rdalmmsg); "flag": statinfo's alarm
    # status only, as one CNC_ALARM fault (for controls that refuse cnc_rdalmmsg).
    alarms: Literal["messages", "flag"] = "messages"
    max_alarms: int = Field(default=10, ge=1, le=64)

    @model_validator(mode="after")
    def _two_counters(self) -> FocasConfig:
        if self.bad_count_macro == self.part_count_macro:
            raise ValueError(
                f"part_count_macro and bad_count_macro are both #{self.bad_count_macro}"
            )
        return self

    def source(self) -> str:
        return f"focas://{url_host(self.host)}:{self.port}"


class FocasLost(ConnectionError):
    """The control cannot be reached, closed the session, or did not answer in time."""


class FocasBadReply(ValueError):
    """A reply that does not follow the framing: the stream is out of step."""

    def __init__(self, what: str, raw: bytes) -> None:
        super().__init__(what)
        self.raw = raw


def frame(frame_type: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, CLIENT_VERSION, frame_type, len(payload)) + payload


@dataclass(frozen=True)
class Call:
    """One function call of a request: ``function`` of the CNC with five int32 arguments."""

    function: int
    args: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    def selector(self) -> tuple[int, int, int]:
        return (1, 1, self.function)

    def name(self) -> str:
        """The call as a FOCAS user knows it; a macro read names its variable, so that two
        counters' reads are told apart (``cnc_rdmacro #3901``)."""
        name = FUNCTION_NAMES.get(self.function, f"function {self.function:#04x}")
        return f"{name} #{self.args[0]}" if self.function == RDMACRO else name


@dataclass(frozen=True)
class Answer:
    """What the control answered to one call: its FOCAS return code and data."""

    error: int
    detail: int
    data: bytes

    def error_text(self) -> str:
        return f"{ERROR_NAMES.get(self.error, 'EW_?')} ({self.error}, detail {self.detail})"


def encode_request(calls: list[Call]) -> bytes:
    blocks = b"".join(
        struct.pack(">H", CALL.size + 2) + CALL.pack(*call.selector(), *call.args) for call in calls
    )
    return frame(REQUEST, struct.pack(">H", len(calls)) + blocks)


def decode_answers(payload: bytes, calls: list[Call]) -> list[Answer]:
    """The answers of a ``0x2102`` payload, one per call, checked against the request."""
    if len(payload) < 2:
        raise FocasBadReply(f"a reply of {len(payload)} bytes has no block count", payload)
    (count,) = struct.unpack_from(">H", payload)
    if count != len(calls):
        raise FocasBadReply(f"{count} blocks answer {len(calls)} calls", payload)
    answers: list[Answer] = []
    offset = 2
    for call in calls:
        if offset + 2 > len(payload):
            raise FocasBadReply(f"the reply ends before the block of {call.name()}", payload)
        (size,) = struct.unpack_from(">H", payload, offset)
        block = payload[offset + 2 : offset + size]
        if size < 2 + ANSWER_HEAD.size or offset + size > len(payload):
            raise FocasBadReply(f"the block of {call.name()} says {size} bytes", payload)
        # An error answer has the same shape, with no data (pyfanuc's sample_with_error).
        *selector, error, detail, length = ANSWER_HEAD.unpack_from(block)
        if tuple(selector) != call.selector():
            raise FocasBadReply(f"a block answers {tuple(selector)}, not {call.name()}", payload)
        data = block[ANSWER_HEAD.size :]
        if length != len(data):
            raise FocasBadReply(
                f"the block of {call.name()} says {length} data bytes and holds {len(data)}",
                payload,
            )
        answers.append(Answer(error, detail, data))
        offset += size
    if offset != len(payload):
        raise FocasBadReply(f"{len(payload) - offset} bytes after the last block", payload)
    return answers


# --- values ------------------------------------------------------------------------------------


class BadValue(ValueError):
    """A value the control answered that cannot be published."""


def decode_macro(raw: bytes) -> int:
    """A macro variable as a whole count. FANUC sends 8 bytes: the mantissa (int32), a filler
    byte, the base (10, or 2), and the exponent: value = mantissa / base ** exponent, e.g.
    ``00 00 00 19 00 0a 00 00`` is 25 and ``01 7d 78 40 00 0a 00 06`` is 25000000 / 10**6 = 25.
    ``FF FF`` in the last two bytes is a vacant variable (``<empty>`` on the screen)."""
    if len(raw) != 8:
        raise BadValue(f"a macro value is 8 bytes, not {len(raw)}")
    mantissa, base, flag, exponent = struct.unpack(">ixBBB", raw)
    if (flag, exponent) == (0xFF, 0xFF):
        raise BadValue("the macro variable is vacant (<empty>)")
    if base not in (2, 10):
        raise BadValue(f"the macro value has base {base}, not 10 or 2")
    whole, rest = divmod(mantissa, base**exponent)
    if rest:
        raise BadValue(f"a count must be a whole number, got {mantissa / base**exponent:g}")
    if whole < 0:
        raise BadValue(f"a count cannot be negative, got {whole}")
    return int(whole)


@dataclass(frozen=True)
class Status:
    """``cnc_statinfo``'s fields."""

    aut: int
    run: int
    motion: int
    mstb: int
    emergency: int
    alarm: int
    edit: int

    @classmethod
    def decode(cls, data: bytes) -> Status:
        # Exactly 14, as pyfanuc's statinfo accepts: a longer ODBST (the 30i's layout leads
        # with hdck and tmmode) would put every field two places off.
        if len(data) != 14:
            raise BadValue(f"cnc_statinfo answered {len(data)} bytes, not 14")
        return cls(*struct.unpack(">7h", data))


@dataclass(frozen=True)
class Alarm:
    number: int
    type: int
    axis: int
    text: str


def decode_alarms(data: bytes) -> list[Alarm]:
    """``cnc_rdalmmsg``'s records: number, type, axis, text length (int32 each), then the text
    in ``ALARM_TEXT`` bytes (the layout pyfanuc's ``readalarmcode`` reads)."""
    size = ALARM_RECORD.size + ALARM_TEXT
    if len(data) % size:
        raise BadValue(f"cnc_rdalmmsg answered {len(data)} bytes, not records of {size}")
    alarms = []
    for offset in range(0, len(data), size):
        number, type_, axis, length = ALARM_RECORD.unpack_from(data, offset)
        raw = data[offset + ALARM_RECORD.size : offset + size][: max(0, min(length, ALARM_TEXT))]
        text = raw.split(b"\0", 1)[0].decode("latin-1").strip()
        alarms.append(Alarm(number, type_, axis, text))
    return alarms


def program_name(main: int) -> str | None:
    return f"O{main:04d}" if main > 0 else None


# --- one session -------------------------------------------------------------------------------


class Session:
    """One open FOCAS session on one TCP connection; one request outstanding at a time."""

    def __init__(self, config: FocasConfig) -> None:
        self.config = config
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        config = self.config
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(config.host, config.port), config.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            where = f"{url_host(config.host)}:{config.port}"
            raise FocasLost(f"cannot connect to {where} ({exc!r})") from exc
        frame_type, payload = await self.exchange(frame(OPEN_REQUEST, OPEN_PAYLOAD))
        if frame_type == OPEN_REFUSED:
            raise FocasLost("the control refused the session: every FOCAS session is in use")
        if frame_type != OPEN_RESPONSE:
            raise FocasBadReply(
                f"the session was answered with frame type {frame_type:#06x}", payload
            )

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one frame and read the whole answer: the header, then exactly the length it
        announces, however many segments it takes. Raises ``FocasLost`` or ``FocasBadReply``."""
        assert self._reader is not None and self._writer is not None
        try:
            # The write too: a control that stopped reading fills the socket buffer and
            # drain() would wait for ever.
            async with asyncio.timeout(self.config.timeout_s):
                self._writer.write(request)
                await self._writer.drain()
                header = await self._reader.readexactly(HEADER.size)
                magic, _version, frame_type, length = HEADER.unpack(header)
                if magic != MAGIC:
                    raise FocasBadReply(
                        f"a reply starts with {magic.hex(' ')}, not a0 a0 a0 a0", header
                    )
                payload = await self._reader.readexactly(length)
        except TimeoutError as exc:
            raise FocasLost(f"no answer within {self.config.timeout_s:g} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise FocasLost(
                f"the control closed the connection ({len(exc.partial)} bytes of a reply read)"
            ) from exc
        except OSError as exc:
            raise FocasLost(f"connection lost ({exc!r})") from exc
        return frame_type, payload

    async def call(self, calls: list[Call]) -> list[Answer]:
        frame_type, payload = await self.exchange(encode_request(calls))
        if frame_type != RESPONSE:
            raise FocasBadReply(
                f"a request was answered with frame type {frame_type:#06x}", payload
            )
        return decode_answers(payload, calls)

    async def close(self) -> None:
        """Close the session politely when the control still listens, then the connection."""
        writer = self._writer
        if writer is None:
            return
        self._writer = None
        with contextlib.suppress(Exception):
            if not writer.is_closing() and self._reader is not None:
                async with asyncio.timeout(min(0.5, self.config.timeout_s)):
                    writer.write(frame(CLOSE_REQUEST, b""))
                    await writer.drain()
                    await self._reader.readexactly(HEADER.size)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --- from answers to events --------------------------------------------------------------------


@dataclass
class _Run:
    """What one ``run`` (or ``check``) published of the machine."""

    observer: MachineObserver
    polled: bool = False  # the first poll (with its clearing normal) is done
    problems: dict[str, str] = field(default_factory=dict)  # item -> what is wrong, reported
    last: list[Answer] | None = None  # the answers of the last poll published
    last_at: datetime | None = None
    garbled: int = 0  # sessions in a row whose replies broke the framing

    def repeats(self, answers: list[Answer], at: datetime) -> bool:
        """Whether ``answers`` are the last poll's again, later: they have nothing new."""
        return (
            self.polled
            and answers == self.last
            and self.last_at is not None
            and at >= self.last_at
            and not self.observer.connection_down
        )


class FocasAdapter:
    """Polls one FANUC control and publishes the changes of its machine (see the docstring)."""

    protocol: ClassVar[str] = "focas"

    def __init__(self, config: FocasConfig) -> None:
        self.config = config
        self.events = MachineEvents(config.machine_id, config.source())
        calls = [Call(STATINFO), Call(RDPRGNUM)]
        # (meaning, the config key that names it, macro variable, its call)
        self._counters: list[tuple[Meaning, str, int, Call]] = []
        counters: tuple[tuple[Meaning, str, int | None], ...] = (
            ("part_count", "part_count_macro", config.part_count_macro),
            ("bad_part_count", "bad_count_macro", config.bad_count_macro),
        )
        for meaning, key, macro in counters:
            if macro is not None:
                call = Call(RDMACRO, (macro, macro, 0, 0, 0))
                self._counters.append((meaning, key, macro, call))
                calls.append(call)
        if config.alarms == "messages":
            # type -1: every alarm type; with text, ALARM_TEXT characters each.
            calls.append(Call(RDALMMSG, (-1, config.max_alarms, 1, ALARM_TEXT, 0)))
        self.calls = calls

    def _new_run(self) -> _Run:
        return _Run(MachineObserver(self.events, log))

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        state = self._new_run()
        first_backoff = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first_backoff
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            session = Session(self.config)
            try:
                await session.open()
                log.info("%s %s: session open", self.events.source, self.config.machine_id)
                next_poll = loop.time()
                while not stop.is_set():
                    state = await self._poll(session, state, publisher)
                    # Only a session that brought data starts the backoff over: a control
                    # that accepts and hangs up at once is retried ever more slowly.
                    backoff = first_backoff
                    next_poll += self.config.poll_s
                    if next_poll < loop.time():
                        next_poll = loop.time()  # a slow control: do not burst to catch up
                    if await stopped(stop, next_poll - loop.time()):
                        break
            except FocasLost as exc:
                state = await self._lost(publisher, state, str(exc), backoff)
            except FocasBadReply as exc:
                state = await self._garbled(publisher, state, exc, backoff)
            except Exception as exc:
                # Whatever else went wrong, the adapter must live on: the machine is out of
                # sight until a session answers again.
                log.exception("%s %s: session failed", self.events.source, self.config.machine_id)
                reason = f"session failed ({type(exc).__name__}: {exc})"
                state = await self._lost(publisher, state, reason, backoff)
            finally:
                await session.close()
            # Wait first, then double: the wait is the one ``_lost`` announced.
            if await stopped(stop, backoff):
                break
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def check(self) -> list[CloudEvent]:
        """Open a session, poll once and return the first events of ``run`` (nothing is
        published). An unreachable control raises ``FocasLost`` (a ``ConnectionError``)."""
        session = Session(self.config)
        try:
            await session.open()
            answers = await session.call(self.calls)
        finally:
            await session.close()
        return self.changes(self._new_run(), answers, datetime.now(UTC))

    async def _poll(self, session: Session, state: _Run, publisher: EventPublisher) -> _Run:
        answers = await session.call(self.calls)
        at = datetime.now(UTC)
        state.garbled = 0  # understood
        if state.repeats(answers, at):
            return state  # the same answers as last poll: nothing to publish
        # Worked out on a copy: whatever fails on the way leaves the state as published.
        new = copy.deepcopy(state)
        events = self.changes(new, answers, at)
        new.last, new.last_at = answers, at
        return await self._publish(publisher, events, state, new)

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], old: _Run, new: _Run
    ) -> _Run:
        return await publish_or_keep(publisher, events, old, new, log)

    async def _lost(
        self, publisher: EventPublisher, state: _Run, why: str, retry_in: float
    ) -> _Run:
        config = self.config
        before = copy.deepcopy(state)
        events = state.observer.lost(f"FOCAS {url_host(config.host)}:{config.port}: {why}")
        if not events:
            log.debug("%s %s: still not answering (%s)", self.events.source, config.machine_id, why)
            return state
        log.warning(
            "%s %s: control lost (%s); reconnecting from %.2f s up to %.1f s apart",
            self.events.source,
            config.machine_id,
            why,
            retry_in,
            config.reconnect_max_s,
        )
        state.last = None  # the next answers are published against what was published
        return await self._publish(publisher, events, before, state)

    async def _garbled(
        self, publisher: EventPublisher, state: _Run, exc: FocasBadReply, retry_in: float
    ) -> _Run:
        """A reply that broke the framing: an ``ADAPTER_INPUT`` warning and a new session; a
        control that sends nothing understood ``GARBLED_SESSIONS_LOST`` sessions in a row is
        lost (it answers, but the machine is out of sight all the same)."""
        lost = state.observer.available is False
        (log.debug if lost else log.warning)(
            "%s %s: reply not understood, opening the session again",
            self.events.source,
            self.config.machine_id,
        )
        state.garbled += 1
        state.last = None  # the next answers understood are published in full against the state
        before = copy.deepcopy(state)
        events = self._problem(state, "framing", f"reply not understood: {exc}", exc.raw)
        state = await self._publish(publisher, events, before, state)
        if state.garbled >= GARBLED_SESSIONS_LOST:
            why = f"no reply understood in {state.garbled} sessions in a row ({exc})"
            state = await self._lost(publisher, state, why, retry_in)
        return state

    def _problem(
        self, state: _Run, item: str, what: str, raw: object, at: datetime | None = None
    ) -> list[CloudEvent]:
        """An ``ADAPTER_INPUT`` warning, once while the same problem stays; it belongs to the
        poll that saw it (``at``), when there is one."""
        if state.problems.get(item) == what:
            return []
        state.problems[item] = what
        events = state.observer.bad(what, raw)
        return [e.model_copy(update={"time": at}) for e in events] if at else events

    def changes(self, state: _Run, answers: list[Answer], at: datetime) -> list[CloudEvent]:
        """The events one poll's answers (read at ``at``) make, ``state`` updated as if they
        were published."""
        stamp = at.isoformat()
        observer = state.observer
        events: list[CloudEvent] = []
        seen_problems: set[str] = set()

        def problem(item: str, what: str, raw: object) -> None:
            seen_problems.add(item)
            events.extend(self._problem(state, item, what, raw, at))

        if not state.polled:
            # A fresh run knows every condition of the machine: clear what an earlier run left.
            events.append(observer.reset_conditions(at, f"conditions|{stamp}|reset"))
            state.polled = True
        events += observer.value("availability", "focas", "AVAILABLE", at, f"{stamp}|available")
        by_call = dict(zip(self.calls, answers, strict=True))
        for call, answer in by_call.items():
            if answer.error:
                problem(
                    call.name(),
                    f"{call.name()}: the control answered {answer.error_text()}",
                    answer.data,
                )
        status = self._status(by_call, problem)
        execution = mode = None
        if status is not None:
            mode = MODE_OF_AUT.get(status.aut, "?")
            if mode == "?":
                problem("aut", f"cnc_statinfo: aut {status.aut} is not a known mode", status.aut)
                mode = None
            execution = EXECUTION_OF_RUN.get(status.run)
            if execution is None:
                problem("run", f"cnc_statinfo: run {status.run} is not a known state", status.run)
        program = self._program(by_call, problem)
        if execution is not None or observer.execution is not None:
            # One event for the poll: execution, mode and program as read together (what was
            # not read, None, stays as published). Never a program without an execution read.
            events += observer.polled(execution, mode, program, at)
        if status is not None:
            emergency = ("FAULT", EMERGENCY_CODE, "emergency stop")
            events += self._status_condition(
                state, "emergency", emergency if status.emergency == 1 else None, at
            )
            if self.config.alarms == "flag":
                flag = None
                if status.alarm:
                    level, code, name = ALARM_STATUS.get(status.alarm, UNKNOWN_ALARM_STATUS)
                    flag = (level, code, f"alarm status {status.alarm} ({name})")
                events += self._status_condition(state, "alarm", flag, at)
        for meaning, key, macro, call in self._counters:
            answer = by_call[call]
            if answer.error:
                continue
            try:
                count = decode_macro(answer.data[:8]) if len(answer.data) >= 8 else None
            except BadValue as exc:
                problem(f"#{macro}", f"macro #{macro} ({key}): {exc}", answer.data)
                continue
            if count is None:
                problem(
                    f"#{macro}", f"macro #{macro}: {len(answer.data)} bytes answered", answer.data
                )
                continue
            events += observer.value(
                meaning, f"#{macro}", str(count), at, f"{stamp}|#{macro}|{count}"
            )
        if self.config.alarms == "messages":
            answer = by_call[self.calls[-1]]
            if not answer.error:
                try:
                    events += self._alarms(state, decode_alarms(answer.data), at)
                except BadValue as exc:
                    problem("cnc_rdalmmsg", str(exc), answer.data)
        for item in set(state.problems) - seen_problems:
            del state.problems[item]
            if not state.problems:
                key = f"bad-input-cleared|{stamp}"
                events.append(self.events.condition("normal", at, key, BAD_INPUT_CODE))
        return events

    @staticmethod
    def _status(
        by_call: dict[Call, Answer], problem: Callable[[str, str, object], None]
    ) -> Status | None:
        answer = by_call[Call(STATINFO)]
        if answer.error:
            return None
        try:
            return Status.decode(answer.data)
        except BadValue as exc:
            problem("cnc_statinfo", str(exc), answer.data)
            return None

    @staticmethod
    def _program(
        by_call: dict[Call, Answer], problem: Callable[[str, str, object], None]
    ) -> str | None:
        """The main program ``O<n>``; None when not read, or when none is selected (0)."""
        answer = by_call[Call(RDPRGNUM)]
        if answer.error:
            return None
        if len(answer.data) != 8:
            what = f"cnc_rdprgnum answered {len(answer.data)} bytes, not 8"
            problem("cnc_rdprgnum", what, answer.data)
            return None
        _running, main = struct.unpack(">ii", answer.data)
        return program_name(main)

    def _status_condition(
        self, state: _Run, item: str, now: tuple[str, str, str] | None, at: datetime
    ) -> list[CloudEvent]:
        """The one condition a status field shows, ``(level, code, message)`` or None: a new
        code clears the one before it."""
        observer, stamp = state.observer, at.isoformat()
        events: list[CloudEvent] = []
        for code in sorted(observer.active_codes.get(item, {})):
            if now is None or code != now[1]:
                uid = f"{stamp}|{item}|{code}|normal"
                events += observer.condition(item, "NORMAL", code, None, at, uid)
        if now is not None:
            level, code, text = now
            events += observer.condition(item, level, code, text, at, f"{stamp}|{item}|{code}")
        return events

    def _alarms(self, state: _Run, alarms: list[Alarm], at: datetime) -> list[CloudEvent]:
        """Each active alarm a fault with the native code ``<type>:<number>`` (the same number
        in two alarm types is two alarms; the hub keys conditions by code); one gone is
        cleared."""
        observer, stamp = state.observer, at.isoformat()
        events: list[CloudEvent] = []
        now = {f"{a.type}:{a.number}": a for a in alarms}
        for code in sorted(set(observer.active_codes.get("alarms", {})) - set(now)):
            uid = f"{stamp}|alarm|{code}|gone"
            events += observer.condition("alarms", "NORMAL", code, None, at, uid)
        for code, alarm in now.items():
            text = f"{alarm.text} (alarm {alarm.number}, type {alarm.type})" if alarm.text else None
            uid = f"{stamp}|alarm|{code}"
            events += observer.condition("alarms", "FAULT", code, text, at, uid)
        return events
