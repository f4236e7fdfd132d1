"""RS-232 status lines: machines that print what they do on their serial port.

Older controls, presses and gauges print a line when something happens, e.g.::

    CYCLE START
    PART COMPLETE 0042
    ALARM 1020 SPINDLE OVERLOAD
    M30

One ``SerialConfig`` is one port and one machine. The adapter opens the port (pyserial, opened
exclusively so a DNC send cannot share it, ``adapters.machines.dnc``), splits what arrives into
lines and matches each line against the configured ``patterns`` in order; the first that matches
says what the line means:

- ``execution``: a fixed ``value`` (``ACTIVE`` for ``CYCLE START``) or the group ``execution``
  through ``values`` (the machine's word -> an MTConnect execution);
- ``part_count`` / ``bad_part_count``: the group ``count``, the machine's cumulative counter;
- ``program``: the group ``program`` (travels in the execution event, as for every adapter);
- ``condition``: ``level`` warning or fault, with the groups ``code`` and ``text``;
- ``condition_clear``: a ``normal`` for the group ``code``, or for every active code without it.

Changes only are published, through ``MachineObserver`` (the same rules as SHDR). The machine
gives no time: an event carries the moment its line ended. Its id is keyed on that moment and
the line's text, so the same reading is the same event. A line that matches nothing is ignored
(or, with ``unmatched = "warn"``, reported); a line whose value is not valid (an execution the
map does not know, a count beyond 64 bits) is an ``ADAPTER_INPUT`` warning. Noise (bytes the
encoding does not have, control characters: a wrong baud rate) is one warning per burst.

The port opened is ``AVAILABLE``. The port gone (unplugged USB adapter, open fails, read error)
is ``UNAVAILABLE`` once with an ``ADAPTER_CONNECTION`` condition; the adapter reopens the
device path with backoff, which starts over only after a session that read something. Reading
never waits for publishing: one task reads and stamps into a bounded queue, another publishes.
Silence is not loss: an idle machine prints nothing. See
``docs/adapters/serial.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.machines.base import MachineEvents, stopped
from adapters.machines.observations import EXECUTIONS, MachineObserver
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

if TYPE_CHECKING:  # pyserial is imported when a port is opened
    import serial  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

PatternMeaning = Literal[
    "execution", "part_count", "bad_part_count", "program", "condition", "condition_clear"
]
# The groups a pattern's regex must have for its meaning (execution: unless a fixed value).
NEEDED_GROUPS: dict[str, tuple[str, ...]] = {
    "part_count": ("count",),
    "bad_part_count": ("count",),
    "program": ("program",),
}
LINE_ENDS = {"lf": b"\n", "cr": b"\r", "crlf": b"\r\n"}
MAX_LINE = 4096  # longer without an end of line is noise (a wrong baud rate, a stuck line)
# Bytes that are not text but are no noise either: tape leader/trailer (NUL) and the device
# control codes a control sends for flow control (DC1 XON, DC2, DC3 XOFF, DC4).
_IGNORED = bytes([0x00, 0x11, 0x12, 0x13, 0x14])
_NOISE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters left in a line
RECONNECT_MIN_S = 0.25
READ_QUEUE = 4096  # reads waiting to be published (each at most 64 KB) before reads are dropped
CONDITION_ITEM = "alarm"  # every pattern's conditions are one item: a clear without code clears all


class SerialPattern(BaseModel):
    """One kind of line: a regex (Python ``re``, matched with ``search``) and what it means."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1)
    meaning: PatternMeaning
    value: str | None = None  # execution: a fixed value (e.g. ACTIVE)
    values: dict[str, str] = {}  # execution: the group's text -> execution value
    level: Literal["warning", "fault"] = "fault"  # condition

    @field_validator("match")
    @classmethod
    def _compiles(cls, text: str) -> str:
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return text

    @model_validator(mode="after")
    def _groups_for_meaning(self) -> SerialPattern:
        groups = set(re.compile(self.match).groupindex)
        needed = NEEDED_GROUPS.get(self.meaning, ())
        if self.meaning == "execution":
            if self.value is None and "execution" not in groups:
                raise ValueError(
                    'an execution pattern needs a fixed value (value = "ACTIVE") or a group '
                    "(?P<execution>...) in match"
                )
            wrong = [v for v in [self.value, *self.values.values()] if v and v not in EXECUTIONS]
            if wrong:
                raise ValueError(
                    f"execution {wrong[0]!r} is not one of {', '.join(sorted(EXECUTIONS))}"
                )
        elif self.value is not None or self.values:
            raise ValueError("value and values are for execution patterns only")
        missing = [g for g in needed if g not in groups]
        if missing:
            raise ValueError(
                f"a {self.meaning} pattern needs the group (?P<{missing[0]}>...) in match"
            )
        return self


class DncOptions(BaseModel):
    """The drip feed's sender options (``mes-hub dnc send``), see ``adapters.machines.dnc``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    xon_xoff: bool = True  # honour the control's XOFF/XON (our own flow control, not the driver's)
    resume_timeout_s: float = Field(default=300.0, gt=0, le=86400)  # longest wait in XOFF
    leader_nuls: int = Field(default=0, ge=0, le=4096)  # NULs before the program (tape leader)
    end_of_block: Literal["as-is", "lf", "crlf", "cr"] = "as-is"  # as-is: byte-identical
    chunk_bytes: int = Field(default=16, ge=1, le=4096)  # written at once; XOFF acts within one
    # The longest the port may take no data (nothing written, its queue not going down) outside
    # an XOFF pause before the send fails: a dead USB adapter, a cable, a held handshake line.
    write_timeout_s: float = Field(default=10.0, gt=0, le=3600)


class SerialConfig(BaseModel):
    """One serial port (one machine): its line settings and what its lines mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    port: str = Field(min_length=1)  # the device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/…
    baudrate: int = Field(default=9600, ge=50, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = 1
    encoding: Literal["ascii", "latin-1"] = "ascii"
    line_end: Literal["lf", "cr", "crlf"] = "lf"
    unmatched: Literal["ignore", "warn"] = "ignore"
    patterns: list[SerialPattern] = []
    reconnect_max_s: float = Field(default=10.0, gt=0, le=3600)
    dnc: DncOptions = DncOptions()

    @field_validator("stopbits")
    @classmethod
    def _stop_bits(cls, value: float) -> float:
        if value not in (1, 1.5, 2):
            raise ValueError("stop bits are 1, 1.5 or 2")
        return value

    def source(self) -> str:
        return f"serial://{self.port}"

    @property
    def endpoint(self) -> str:
        """The peer, as ``mes-hub adapter`` names it (``registry.describe``)."""
        return self.port

    def bits_per_byte(self) -> float:
        """What one byte takes on the wire: start bit, data, parity, stop bits."""
        return 1 + self.bytesize + (0 if self.parity == "none" else 1) + float(self.stopbits)


class PortLost(ConnectionError):
    """The port cannot be opened or read (absent, unplugged, I/O error)."""


class PortBusy(PortLost):
    """Another process has the port open (the status adapter, a DNC send)."""


def open_port(config: SerialConfig) -> serial.Serial:
    """The machine's port, opened exclusively (``PortBusy`` if another process has it,
    ``PortLost`` if it cannot be opened), non-blocking, with no flow control of the driver's:
    the drip feed does its own (see ``dnc``). The status adapter and the drip feed both open
    it here."""
    import serial

    parity = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN,
              "odd": serial.PARITY_ODD, "mark": serial.PARITY_MARK,
              "space": serial.PARITY_SPACE}[config.parity]  # fmt: skip
    try:
        return serial.Serial(
            config.port,
            baudrate=config.baudrate,
            bytesize=config.bytesize,
            parity=parity,
            stopbits=config.stopbits,
            timeout=0,
            xonxoff=False,
            rtscts=False,
            exclusive=True,
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        # pyserial's lock failure carries flock's errno (its wording is no interface).
        if getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise PortBusy(
                f"{config.port} is in use by another process (the status adapter "
                "'mes-hub adapter run serial', or a DNC send 'mes-hub dnc send'): stop it first"
            ) from None
        raise PortLost(f"cannot open {config.port}: {exc}") from None


# --- lines -----------------------------------------------------------------------------------


class LineReader:
    """Bytes in, lines out; noise (undecodable bytes, control characters, an endless line)
    reported once per burst: the next clean line ends the burst. A line longer than
    ``MAX_LINE`` is noise as a whole: what follows its first ``MAX_LINE`` bytes is dropped up to
    and including its line end, however the bytes arrive, so its tail is never read as a line."""

    def __init__(self, config: SerialConfig) -> None:
        self.config = config
        self._end = LINE_ENDS[config.line_end]
        self._buffer = b""
        self._discarding = False  # inside an endless line: dropped up to its end
        self.in_noise = False

    def reset(self) -> None:
        self._buffer, self._discarding, self.in_noise = b"", False, False

    def skip_line(self) -> None:
        """Bytes of the line being read were lost: drop the rest of it, up to its end."""
        self._buffer, self._discarding = b"", True

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        """(text, raw) per complete line; text None for a noisy line."""
        data = self._buffer + chunk.translate(None, _IGNORED)
        if self._discarding:
            cut = data.find(self._end)
            if cut < 0:
                # Keep what may be the start of a two-byte line end (CR of CR LF).
                self._buffer = data[len(data) - len(self._end) + 1 :] if len(self._end) > 1 else b""
                return []
            data, self._discarding = data[cut + len(self._end) :], False
        *raws, self._buffer = data.split(self._end)
        if len(self._buffer) > MAX_LINE:
            raws.append(self._buffer[: MAX_LINE + 1])  # longer than a line: noise
            self.skip_line()
        lines: list[tuple[str | None, bytes]] = []
        for raw in raws:
            stripped = raw.strip(b"\r\n") if self.config.line_end != "crlf" else raw
            if len(stripped) > MAX_LINE:
                lines.append((None, stripped))
                continue
            try:
                text = stripped.decode(self.config.encoding)
            except UnicodeDecodeError:
                lines.append((None, stripped))
                continue
            lines.append((None, stripped) if _NOISE.search(text) else (text.strip(), stripped))
        return lines


class SerialLineParser:
    """Lines of one machine to contract events (changes only, through ``MachineObserver``)."""

    def __init__(self, config: SerialConfig) -> None:
        self.config = config
        self.events = MachineEvents(config.machine_id, config.source())
        self.observer = MachineObserver(self.events, log)
        self.lines = LineReader(config)
        self._patterns = [(re.compile(p.match), p) for p in config.patterns]
        self.read = 0  # lines read (noise included), for the benchmark and the curious

    def opened(self, at: datetime) -> list[CloudEvent]:
        self.lines.reset()
        return self.observer.value("availability", "port", "AVAILABLE", at, f"open|{at}")

    def lost(self, why: str) -> list[CloudEvent]:
        return self.observer.lost(why)

    def feed(self, chunk: bytes, at: datetime) -> list[CloudEvent]:
        """The events of what arrived at ``at`` (when its lines ended)."""
        events: list[CloudEvent] = []
        # Lines read together share their moment: the same text twice in one read (CYCLE START,
        # FEED HOLD, CYCLE START) is two readings, told apart by which occurrence it is.
        seen: dict[str, int] = {}
        for text, raw in self.lines.feed(chunk):
            self.read += 1
            if text is None:
                if not self.lines.in_noise:
                    self.lines.in_noise = True
                    events += self.observer.bad(
                        f"noise on the line (wrong baud rate, parity or encoding "
                        f"{self.config.encoding}?); ignored until the next clean line",
                        raw[:200],
                    )
                continue
            if text:  # a blank line is no sign the noise is over
                self.lines.in_noise = False
                n = seen[text] = seen.get(text, 0) + 1
                events += self.line(text, at, n)
        return events

    def line(self, text: str, at: datetime, occurrence: int = 1) -> list[CloudEvent]:
        """The events of one line that ended at ``at`` (its ``occurrence``-th at that moment)."""
        for regex, pattern in self._patterns:
            found = regex.search(text)
            if found is not None:
                uid = f"{at.isoformat()}|{text}" + (f"|{occurrence}" if occurrence > 1 else "")
                return self._meaning(pattern, found, text, at, uid)
        if self.config.unmatched == "warn":
            return self.observer.bad("a line that no pattern matches", text)
        log.debug("%s: no pattern matches %r", self.config.source(), text)
        return []

    def _meaning(
        self, pattern: SerialPattern, found: re.Match[str], text: str, at: datetime, uid: str
    ) -> list[CloudEvent]:
        observer = self.observer
        groups = found.groupdict()
        name = f"line {text!r}"
        if pattern.meaning == "execution":
            raw = pattern.value or (groups.get("execution") or "").strip()
            value = pattern.values.get(raw, raw) if pattern.value is None else raw
            return observer.value("execution", name, value, at, uid)
        if pattern.meaning in ("part_count", "bad_part_count"):
            count = (groups.get("count") or "").strip()
            if not (count.isascii() and count.isdigit()):  # "+5", "1e3", "²" are no counts
                return observer.bad(f"{name}: part count {count!r} is not a whole number", text)
            return observer.value(pattern.meaning, name, count, at, uid)
        if pattern.meaning == "program":
            return observer.value("program", name, (groups.get("program") or "").strip(), at, uid)
        code = (groups.get("code") or "").strip() or None
        if pattern.meaning == "condition_clear":
            return observer.condition(CONDITION_ITEM, "NORMAL", code, None, at, uid)
        message = (groups.get("text") or "").strip() or text
        return observer.condition(CONDITION_ITEM, pattern.level, code, message, at, uid)


# --- the adapter -----------------------------------------------------------------------------


class SerialLineAdapter:
    """Reads one machine's status lines from its serial port (see the module docstring)."""

    protocol: ClassVar[str] = "serial"

    def __init__(self, config: SerialConfig) -> None:
        self.config = config
        self.parser = SerialLineParser(config)
        self.read_bytes = 0  # what the port delivered
        self.dropped_bytes = 0  # read but dropped: publishing did not keep up (READ_QUEUE)
        self._brought_data = False  # the current session read something

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        first = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first
        while not stop.is_set():
            self._brought_data = False
            try:
                port = open_port(self.config)
            except PortLost as exc:
                why = str(exc)
            else:
                log.info("%s %s: port open", self.config.source(), self.config.machine_id)
                try:
                    await self._publish(publisher, self.parser.opened(datetime.now(UTC)), stop)
                    await self._session(port, publisher, stop)
                    return  # stopped
                except PortLost as exc:
                    why = str(exc)
                except Exception as exc:
                    # Whatever else went wrong, the adapter must live on: reopen.
                    log.exception("%s: session failed", self.config.source())
                    why = f"{type(exc).__name__}: {exc}"
                finally:
                    port.close()
                if self._brought_data:
                    backoff = first  # the machine was there and talking: try again soon
            events = self.parser.lost(f"serial port {self.config.port}: {why}"[:1024])
            if events:
                log.warning("%s %s: port lost (%s); reopening from %.2f s up to %.1f s apart",
                            self.config.source(), self.config.machine_id, why, backoff,
                            self.config.reconnect_max_s)  # fmt: skip
            await self._publish(publisher, events, stop)
            if await stopped(stop, backoff):
                return
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def _session(
        self, port: serial.Serial, publisher: EventPublisher, stop: asyncio.Event
    ) -> None:
        """Read until stopped; raises ``PortLost``. Reading never waits for publishing: this
        task reads and stamps what arrives into a bounded queue, another parses and publishes
        it, so a slow publish neither delays the times nor leaves the port unread. Should the
        queue be full (publishing stuck for ``READ_QUEUE`` reads), what arrives is dropped
        and reported as bad input, never silently."""
        queue: asyncio.Queue[tuple[bytes, datetime, int] | None] = asyncio.Queue(READ_QUEUE)
        publishing = asyncio.create_task(self._publish_from(queue, publisher, stop))
        dropped = 0  # bytes dropped since the last chunk queued
        try:
            while not stop.is_set() and not publishing.done():
                chunk = await _read(port, 0.2)
                if not chunk:
                    continue
                self._brought_data = True
                self.read_bytes += len(chunk)
                if queue.full():
                    if not dropped:
                        log.error("%s %s: publishing does not keep up; dropping what the "
                                  "port delivers", self.config.source(),
                                  self.config.machine_id)  # fmt: skip
                    dropped += len(chunk)
                    self.dropped_bytes += len(chunk)
                    continue
                queue.put_nowait((chunk, datetime.now(UTC), dropped))
                dropped = 0
        except asyncio.CancelledError:
            publishing.cancel()
            raise
        finally:
            # What was read is published before the adapter says the port is lost, in order.
            while not publishing.done():
                try:
                    queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    await asyncio.wait([publishing], timeout=0.05)
            await asyncio.wait([publishing])
            if not publishing.cancelled():
                publishing.result()  # its error, if it failed

    async def _publish_from(
        self,
        queue: asyncio.Queue[tuple[bytes, datetime, int] | None],
        publisher: EventPublisher,
        stop: asyncio.Event,
    ) -> None:
        while (item := await queue.get()) is not None:
            chunk, at, dropped = item
            events: list[CloudEvent] = []
            if dropped:
                self.parser.lines.skip_line()  # a line cut by the gap is no reading
                events += self.parser.observer.bad(
                    f"{dropped} bytes from the port dropped: publishing did not keep up",
                    chunk[:200],
                )
            events += self.parser.feed(chunk, at)
            await self._publish(publisher, events, stop)

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], stop: asyncio.Event
    ) -> None:
        """Publish, retrying until it works (or the adapter stops): the state already counts
        these events as told, so they must not be dropped."""
        delay = 0.2
        while events:
            try:
                await publisher.publish_many(events)
                return
            except Exception:
                log.exception("%s: publishing %d events failed; retrying in %.1f s",
                              self.config.source(), len(events), delay)  # fmt: skip
            if await stopped(stop, delay):
                return
            delay = min(delay * 2, 5.0)

    async def check(self, deadline_s: float = 5.0) -> list[CloudEvent]:
        """Open the port, read what the machine prints until a second of silence (at most
        ``deadline_s``) and return the events. A port that cannot be opened raises
        ``PortLost`` (a ``ConnectionError``)."""
        parser = SerialLineParser(self.config)
        port = open_port(self.config)
        try:
            events = parser.opened(datetime.now(UTC))
            ends = time.monotonic() + deadline_s
            while (left := ends - time.monotonic()) > 0:
                chunk = await _read(port, min(1.0, left))
                if not chunk:
                    break
                events += parser.feed(chunk, datetime.now(UTC))
        finally:
            port.close()
        return events


async def _read(port: serial.Serial, timeout: float) -> bytes:
    """What has arrived, waiting up to ``timeout`` for it without blocking the loop (b"" when
    nothing came). Raises ``PortLost`` when the device is gone."""
    import serial

    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = port.fileno()
    loop.add_reader(fd, readable)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)
    if not ready.done():
        return b""
    try:
        # Readable and no data is a hang-up (pyserial raises): the device is gone.
        data: bytes = port.read(1 << 16)
    except (serial.SerialException, OSError) as exc:
        raise PortLost(str(exc)) from None
    return data
