"""Heidenhain TNC controls over LSV2 (TCP 19000) through pyLSV2: poll, publish what changed.

One ``Lsv2Config`` is one control and one machine. The adapter connects as pyLSV2 does (login
``INSPECT``, version and system parameters, buffer size, login ``FILE``), with pyLSV2's safe mode
off, then logs in as ``DNC`` (the state of the program run needs it) and, when a PLC counter is
configured, as ``PLCDEBUG`` (PLC memory needs it; with ``plc_password`` if the control asks for
one). Every ``poll_s`` it reads, in one worker thread per control (pyLSV2 is blocking):

- the execution mode (``R_RI`` 23) -> the execution event's controller ``mode``;
- the program status (``R_RI`` 26) -> its ``execution``;
- the program stack (``R_RI`` 24) -> its ``program``: the main program's path;
- the control's error messages (``R_RI`` 27, 28) -> ``condition`` events, one per error number,
  ``fault`` or ``warning`` by the error's class; an error gone is ``normal`` for its number;
- the configured PLC words (``R_MB``) -> ``partcount`` ``all`` and ``bad``.

Execution, mode and program travel together, as one event per poll that changed any of them.
LSV2 gives these values no timestamp (pyLSV2 does not decode one for errors either), so every
event carries the time of the poll that saw it. The first poll of a run publishes the whole
state, led by a ``normal`` condition without a code: the control's error list is this machine's
only source of conditions, so what an earlier run left active is cleared.

When the control does not answer (refused, closed, no answer within ``timeout_s``), refuses the
``DNC`` login, or answers nothing that is LSV2 on a new connection, ``UNAVAILABLE`` and an
``unavailable`` condition ``ADAPTER_CONNECTION`` saying why are published once; the adapter
reconnects with backoff (a refused login: every ``reconnect_max_s``, as it will not fix itself).
Every answer is checked to be the one the query expects. Values that cannot be used (a value
pyLSV2 does not know, a refused query or ``PLCDEBUG`` login, a negative counter) and telegrams
that are not LSV2 are logged and published once as ``ADAPTER_INPUT`` warnings; a telegram that is
not LSV2 ends the session (the byte stream cannot be trusted any more) and the adapter
reconnects. See ``docs/adapters/heidenhain.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from adapters.machines.base import MachineEvents, problem_changes, publish_or_keep, stopped
from adapters.machines.observations import MachineObserver, Meaning
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_MIN_S = 0.25
LOGOUT_S = 2.0  # the longest wait for the logout when the adapter stops
ERRORS_ITEM = "errors"  # the condition item of the control's error messages

# PLC memory as the PLC program names it: the letter(s) of the area, then the byte address for
# words and double words (W1090, D1200), the number for bits (M100). pyLSV2 reads these areas.
_PLC_ADDRESS = re.compile(r"(?P<area>M|I|O|C|T|S|B|W|D|IW|ID|OW|OD)(?P<number>\d{1,6})")
_NUMERIC_AREAS: dict[str, tuple[str, int, str]] = {
    # area: (pyLSV2 MemoryType read, bytes per value, what it is). A double word is read as the
    # two words it is made of: pyLSV2 1.8 allows double words only in the first half of the
    # word memory (it divides the number of words by 4, not 2).
    "B": ("BYTE", 1, "a byte (signed, -128..127)"),
    "W": ("WORD", 2, "a word (signed, -32768..32767)"),
    "D": ("WORD", 4, "a double word (signed 32 bits)"),
    "IW": ("INPUT_WORD", 2, "an input word (0..65535)"),
    "OW": ("OUTPUT_WORD", 2, "an output word (0..65535)"),
    "ID": ("INPUT_WORD", 4, "an input double word (signed 32 bits)"),
    "OD": ("OUTPUT_WORD", 4, "an output double word (signed 32 bits)"),
}
_OTHER_AREAS = {
    "M": "a marker (one bit)",
    "I": "an input (one bit)",
    "O": "an output (one bit)",
    "C": "a counter flag (one bit)",
    "T": "a timer flag (one bit)",
    "S": "a string",
}

# pyLSV2's ExecState (R_RI 23): the control's operating mode -> the contract's controller mode.
MODES: dict[int, str | None] = {
    0: "MANUAL",  # MANUAL: manual operation (jog, handwheel)
    1: "MANUAL_DATA_INPUT",  # MDI: positioning with manual data input
    2: "MANUAL",  # PASS_REFERENCES: traversing the reference marks, done by hand
    3: "SEMI_AUTOMATIC",  # SINGLE_STEP: program run, single block
    4: "AUTOMATIC",  # AUTOMATIC: program run, full sequence
    5: None,  # UNDEFINED: no mode to tell; the mode stays as last published
}
# pyLSV2's PgmState (R_RI 26): the state of the program run -> the contract's execution.
EXECUTIONS: dict[int, str] = {
    0: "ACTIVE",  # STARTED: the program runs
    1: "STOPPED",  # STOPPED: the program was stopped
    2: "PROGRAM_COMPLETED",  # FINISHED: the program ran to its end
    3: "STOPPED",  # CANCELLED: the run was aborted; it starts again from the beginning
    4: "INTERRUPTED",  # INTERRUPTED: the run was interrupted and can be resumed
    5: "STOPPED",  # ERROR: an error stopped the run
    6: "READY",  # ERROR_CLEARED: the error was acknowledged; the control is ready again
    7: "READY",  # IDLE: no program runs
    8: "READY",  # UNDEFINED: no program state; nothing runs
}
# HEIDENHAIN's error classes as its DNC interface numbers them (DNC_EC_*); the iTNC 530 error
# "Machine guard is open" reads as class 3 (PROGRAMHOLD), group 3 (PLC) through pyLSV2.
ERROR_CLASSES = {
    0: "none", 1: "warning", 2: "feed hold", 3: "program hold", 4: "program abort",
    5: "emergency stop", 6: "reset", 7: "info", 8: "error", 9: "note",
}  # fmt: skip
ERROR_GROUPS = {
    0: "none", 1: "operating", 2: "programming", 3: "PLC", 4: "general", 5: "remote",
    6: "python",
}  # fmt: skip
# T_ER codes that say the control has no error list to give (unknown telegram, no privilege,
# wrong parameter): asked once per session. Any other refusal is asked again next poll.
ERRORS_NOT_SUPPORTED = frozenset({22, 23, 24})
T_ER_NO_NEXT_ERROR = 57  # the end of the error list

DNC_MEANING = (
    "the control lacks the DNC option (or it is not enabled): execution state and program "
    "status cannot be read"
)
PLCDEBUG_MEANING = (
    "PLC memory cannot be read, so the part counters cannot; check plc_password, or leave "
    "part_count and bad_count out"
)


def plc_address(value: str) -> str:
    """A PLC address that can hold a counter: a byte, word or double word, aligned as the PLC
    addresses them (a word at an even byte address, a double word at a multiple of 4)."""
    text = value.strip().upper()
    match = _PLC_ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{value!r} is not a PLC address: write it as the PLC program does, e.g. 'D1200' "
            "(double word), 'W1090' (word), 'B20' (byte), 'IW4', 'OD8'"
        )
    area, number = match["area"], int(match["number"])
    if area in _OTHER_AREAS:
        raise ValueError(f"{text} is {_OTHER_AREAS[area]}, not a number that can count parts")
    size = _NUMERIC_AREAS[area][1]
    if number % size:
        raise ValueError(
            f"{text}: {_NUMERIC_AREAS[area][2]} starts at a byte address that is a multiple "
            f"of {size} ({area}{number - number % size} or {area}{number - number % size + size})"
        )
    return text


class Lsv2Config(BaseModel):
    """One HEIDENHAIN control (one machine) on LSV2 over TCP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    host: str = Field(min_length=1)
    port: int = Field(default=19000, ge=1, le=65535)
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    part_count: str | None = None  # PLC address of the good-and-bad parts counter, e.g. "D1200"
    bad_count: str | None = None  # PLC address of the bad parts counter
    plc_password: SecretStr | None = None  # for the PLCDEBUG login; never shown in logs
    # Error classes published as warnings; every other class is a fault.
    warning_classes: frozenset[int] = frozenset({1, 7, 9})

    @field_validator("host")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        if ":" in value:
            raise ValueError(
                f"{value!r}: pyLSV2 1.8 connects over IPv4 only (an AF_INET socket to the "
                "address gethostbyname gives), so an IPv6 address cannot be used; give the "
                "control's IPv4 address or a host name that resolves to one (the port goes in "
                "'port')"
            )
        return value

    @field_validator("part_count", "bad_count")
    @classmethod
    def _counter_address(cls, value: str | None) -> str | None:
        return None if value is None else plc_address(value)

    def counters(self) -> dict[str, str]:
        """kind (``all``, ``bad``) -> PLC address, for the counters configured."""
        pairs = (("all", self.part_count), ("bad", self.bad_count))
        return {kind: address for kind, address in pairs if address is not None}


# --- talking to the control (blocking, in the control's worker thread) -----------------------


class ControlLost(ConnectionError):
    """The control did not answer: refused, closed the connection, or timed out."""


class LoginRefused(ConnectionError):
    """The control refused a login the adapter needs (e.g. DNC without the DNC option)."""

    def __init__(self, login: str, error: str, meaning: str) -> None:
        super().__init__(f"the control refused the {login} login ({error}): {meaning}")
        self.login = login


class BrokenTelegram(Exception):
    """The control sent something that is not an LSV2 telegram, or not the answer the query
    expects: the session cannot go on."""


class _Stopped(Exception):
    """The adapter was stopped while a call waited for the control."""


@dataclass(frozen=True)
class ControlError:
    """One of the control's active error messages."""

    number: int
    error_class: int
    group: int
    text: str


@dataclass
class Reading:
    """One poll of the control. ``None``: not read this poll (the problem says why); ``program``
    is also ``None`` when the stack names no main program."""

    mode: int | None = None
    program_state: int | None = None
    program: str | None = None
    errors: list[ControlError] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    # item -> (what is wrong, stable while the same problem lasts; the raw value)
    problems: dict[str, tuple[str, object]] = field(default_factory=dict)


class _PyLsv2Log(logging.Filter):
    """pyLSV2's own log lines. It logs every telegram at debug level, a login's password with
    it: hidden. It logs each failed attempt at error or info level (a refused connection, a
    closed socket, a refused query, on the root logger for some): demoted to debug and shown
    only when this module logs at debug, so one loss is one warning, the adapter's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and "pyLSV2" not in record.pathname:
            return True  # not pyLSV2's
        args = record.args
        if isinstance(args, tuple) and len(args) == 3 and args[0] == "A_LG":
            record.args = (args[0], args[1], "(login telegram not shown)")
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


_PYLSV2_LOG = _PyLsv2Log()


def _pylsv2() -> Any:
    """pyLSV2, imported when a control is reached (it ships no type information)."""
    import pyLSV2  # type: ignore[import-untyped]

    for name in ("LSV2 TCP", "LSV2 Client", "root"):
        logging.getLogger(None if name == "root" else name).addFilter(_PYLSV2_LOG)  # once
    return pyLSV2


def _error_text(error: Any) -> str:
    """``T_ER 23 (T_ER_NO_PRIV)`` for pyLSV2's last error."""
    code = int(error.e_code)
    try:
        name = _pylsv2().LSV2StatusCode(code).name
    except ValueError:
        name = "unknown"
    return f"T_ER {code} ({name})"


class _Socket:
    """pyLSV2's socket with two changes. A ``recv`` that finds the connection closed raises
    ``ConnectionResetError``: pyLSV2 1.8 calls ``recv`` again and again when a connection closes
    in the middle of an answer (it spins until the deadline). And it counts the bytes received
    since the last ``send``: no byte at all is a control gone, some bytes not understood are
    a telegram that is not LSV2."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.received = 0

    def send(self, data: bytes) -> int:
        self.received = 0
        return self._sock.send(data)

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if not data:
            raise ConnectionResetError("the control closed the connection")
        self.received += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Session:
    """One LSV2 connection to the control, used from its one worker thread; only ``abort`` is
    called from the event loop's thread.

    pyLSV2 1.8 reports a query the control refused (``T_ER``), a connection the control closed
    (no answer at all) and an answer of the wrong kind alike, as a failed result or a default
    value; the answer it got tells them apart, and is checked after every query."""

    def __init__(self, config: Lsv2Config, strict: bool = False) -> None:
        self.config = config
        self.strict = strict  # a refused PLCDEBUG login fails the session (check), or not (run)
        self.client: Any = None
        self.aborted = False  # given up on from the event loop: the worker closes the socket
        self.polled = False  # a poll of this session was read (and published)
        self._socket: _Socket | None = None
        self._errors_refused: str | None = None  # why the control does not list its errors
        self.plc_refused: str | None = None  # why PLC memory cannot be read (PLCDEBUG refused)
        self._plc_retry_at = 0.0

    def _answer(self) -> str:
        # The response code of the last telegram (T_OK, S_RI, T_ER, NONE for none at all).
        return str(self.client._llcom.last_response.value)

    def _nothing_received(self) -> bool:
        return self._socket is None or self._socket.received == 0

    def _go_on(self) -> None:
        """Between the steps of ``open``: a session given up on goes no further."""
        if self.aborted:
            raise ControlLost("given up on while connecting")

    def open(self) -> None:
        lsv2, config = _pylsv2(), self.config
        # safe_mode=False: pyLSV2's safe mode blocks the DNC and PLCDEBUG logins.
        client = lsv2.LSV2(config.host, port=config.port, timeout=config.timeout_s, safe_mode=False)
        self._socket = _Socket(client._llcom._tcpsock)
        client._llcom._tcpsock = self._socket
        self.client = client
        self._go_on()
        try:
            client.connect()
        except OSError:
            raise
        except Exception as exc:
            if self._answer() == "NONE" and self._nothing_received():
                raise ControlLost("the control closed the connection while it was set up") from exc
            raise BrokenTelegram(f"connection set-up not understood: {_describe(exc)}") from exc
        self._go_on()
        self._login(lsv2.Login.DNC, "", DNC_MEANING)
        self._go_on()
        if config.counters():
            try:
                self._plc_login()
            except LoginRefused as exc:
                if self.strict:
                    raise
                # Execution and errors are readable: the machine is not lost, its counters
                # are (an ADAPTER_INPUT warning); the login is tried again now and then.
                self.plc_refused = str(exc)

    def _plc_login(self) -> None:
        config = self.config
        password = config.plc_password.get_secret_value() if config.plc_password else ""
        self._plc_retry_at = time.monotonic() + config.reconnect_max_s
        self._login(_pylsv2().Login.PLCDEBUG, password, PLCDEBUG_MEANING)
        self.plc_refused = None

    def _login(self, login: Any, password: str, meaning: str) -> None:
        if self.client.login(login, password):
            return
        answer = self._answer()
        if answer == "NONE":
            raise ControlLost(f"no answer to the {login.value} login")
        if answer != "T_ER":
            raise BrokenTelegram(f"{login.value} login: answered {answer}, expected T_OK")
        raise LoginRefused(login.value, _error_text(self.client.last_error), meaning)

    def read(self) -> Reading:
        client, reading = self.client, Reading()
        mode = self._query("execution mode", "S_RI", client.execution_state, reading)
        reading.mode = None if mode is None else int(mode)
        state = self._query("program status", "S_RI", client.program_status, reading)
        reading.program_state = None if state is None else int(state)
        stack = self._query("program stack", "S_RI", client.program_stack, reading)
        if stack is not None:
            reading.program = str(stack.main) or None
        reading.errors = self._errors(reading)
        if self.config.counters():
            self._counters(reading)
        return reading

    def _counters(self, reading: Reading) -> None:
        if self.plc_refused is not None and time.monotonic() >= self._plc_retry_at:
            with contextlib.suppress(LoginRefused):
                self._plc_login()
        if self.plc_refused is not None:
            reading.problems["PLCDEBUG"] = (self.plc_refused, None)
            return
        memory_types = _pylsv2().MemoryType
        for kind, address in self.config.counters().items():
            area, number = _split(address)
            memory, size, _ = _NUMERIC_AREAS[area]
            words = 2 if size == 4 else 1  # a double word: its two words, low word first
            what = f"PLC {address} ({'part_count' if kind == 'all' else 'bad_count'})"
            read = functools.partial(
                self.client.read_plc_memory,
                number // min(size, 2),
                getattr(memory_types, memory),
                words,
            )
            values = self._query(what, "S_MB", read, reading)
            if values is None:
                continue
            if len(values) != words or not all(isinstance(v, int) for v in values):
                reading.problems[what] = (f"{what}: not a whole number", values)
                continue
            value = int(values[0])
            if words == 2:  # little-endian words, as the PLC stores them; signed 32 bits
                value = (value & 0xFFFF) | (int(values[1]) & 0xFFFF) << 16
                value -= 1 << 32 if value >= 1 << 31 else 0
            if value < 0:
                problem = f"{what}: a count cannot be negative"
                if area == "W":
                    problem += " (a word past 32767 reads negative: use a double word)"
                reading.problems[what] = (problem, value)
            else:
                reading.counts[kind] = value

    def _errors(self, reading: Reading) -> list[ControlError] | None:
        what = "error messages"
        if self._errors_refused is not None:
            # Asked once per session: a control without the function will not grow it.
            reading.problems[what] = (self._errors_refused, None)
            return None
        try:
            messages = self.client.get_error_messages()
        except OSError:
            raise
        except Exception as exc:
            self._failed(what, "S_RI", exc, reading)
            return None
        answer, code = self._answer(), int(self.client.last_error.e_code)
        if answer == "NONE":
            raise ControlLost(f"no answer to the {what} query (connection closed)")
        if answer == "T_ER" and code == T_ER_NO_NEXT_ERROR:
            # The list ends with "no next error": it is complete.
            return [
                ControlError(int(m.e_number), int(m.e_class), int(m.e_group), str(m.e_text))
                for m in messages
            ]
        if answer == "T_ER":
            error = _error_text(self.client.last_error)
            if messages:
                # Broken off partway: the errors not listed are not known to be gone.
                problem = f"{what}: the list broke off ({error}); conditions left as they were"
                reading.problems[what] = (problem, len(messages))
            elif code in ERRORS_NOT_SUPPORTED:
                # TNC 640 without TNCremoPlus, for one (pyLSV2's notes).
                self._errors_refused = (
                    f"{what}: the control refused them ({error}); its errors are not published "
                    "as conditions"
                )
                reading.problems[what] = (self._errors_refused, None)
            else:
                reading.problems[what] = (f"{what}: the control refused the query ({error})", None)
            return None
        if answer == "S_RI":
            # An error message with nothing in it ends pyLSV2's list early.
            problem = f"{what}: an empty answer in the list; conditions left as they were"
            reading.problems[what] = (problem, len(messages))
            return None
        raise BrokenTelegram(f"{what}: answered {answer}, expected S_RI or T_ER")

    def _query(self, what: str, expected: str, call: Callable[[], T], reading: Reading) -> T | None:
        """One pyLSV2 query of one telegram: its value, or ``None`` with the problem noted in
        ``reading``. Raises ``ControlLost`` (no answer) and ``BrokenTelegram`` (not LSV2, or not
        the answer this query expects: pyLSV2 would return a default value for it)."""
        try:
            value = call()
        except OSError:
            raise
        except _pylsv2().LSV2InputException as exc:
            # Refused before any telegram: an address beyond the control's PLC memory.
            reading.problems[what] = (f"{what}: beyond the control's PLC memory", str(exc))
            return None
        except Exception as exc:
            self._failed(what, expected, exc, reading)
            return None
        answer = self._answer()
        if answer == "NONE":
            raise ControlLost(f"no answer to the {what} query (connection closed)")
        if answer == "T_ER":
            error = _error_text(self.client.last_error)
            reading.problems[what] = (f"{what}: the control refused the query ({error})", None)
            return None
        if answer != expected:
            raise BrokenTelegram(f"{what}: answered {answer}, expected {expected}")
        if self._socket is not None and self._socket.received <= 8:
            # The answer has no value: pyLSV2 would give its default (UNDEFINED, None, []).
            reading.problems[what] = (f"{what}: answered {expected} without a value", None)
            return None
        return value

    def _failed(self, what: str, expected: str, exc: Exception, reading: Reading) -> None:
        """A query that raised: an answer pyLSV2 cannot decode (a problem), else the stream is
        broken or gone."""
        answer = self._answer()
        if answer == expected:
            # The whole answer came; it holds what pyLSV2 cannot decode (a number it does not
            # know). The kind of error names the problem; its text, with the value, is logged.
            problem = f"{what}: an answer pyLSV2 cannot decode ({type(exc).__name__})"
            reading.problems[what] = (problem, str(exc))
            return
        if answer == "NONE" and self._nothing_received():
            raise ControlLost(f"no answer to the {what} query (connection closed)") from exc
        raise BrokenTelegram(f"{what}: {_describe(exc)}") from exc

    def abort(self) -> None:
        """From the event loop's thread: end a call that waits on the socket (its ``recv``
        returns at once). The socket is closed by the worker (``discard``), never here: a
        descriptor closed under a thread that uses it can be reused by another connection."""
        self.aborted = True
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def discard(self) -> None:
        """In the worker, after the call that was given up on: close the socket."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()

    def close(self) -> None:
        """Log out and hang up."""
        if self.client is None:
            return
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.discard()


def _split(address: str) -> tuple[str, int]:
    match = _PLC_ADDRESS.fullmatch(address)
    assert match is not None  # validated in the config
    return match["area"], int(match["number"])


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- deciding what to publish ----------------------------------------------------------------


@dataclass
class _Run:
    """What this run told the hub: replaced as a whole once an event publish succeeded, so a
    failed publish leaves it as it was and the next poll finds the same changes again."""

    observer: MachineObserver
    problems: dict[str, str] = field(default_factory=dict)  # bad input reported, by item
    cleared: bool = False  # the first poll's normal without a code is published
    last: Reading | None = None  # the last reading published in full (none after a loss)
    last_at: datetime | None = None


class Lsv2Adapter:
    """Polls one HEIDENHAIN control and publishes the changes of its machine (see the module
    docstring)."""

    protocol: ClassVar[str] = "lsv2"

    def __init__(self, config: Lsv2Config) -> None:
        self.config = config
        self.events = MachineEvents(config.machine_id, f"lsv2://{config.host}:{config.port}")
        self.state = self._new_run()

    def _new_run(self) -> _Run:
        return _Run(MachineObserver(self.events, log))

    def _deadline(self) -> float:
        # Each telegram waits at most timeout_s (pyLSV2's socket timeout); a call that goes on
        # much longer is stuck.
        return 2 * self.config.timeout_s + 1

    async def _call(
        self,
        executor: ThreadPoolExecutor,
        session: Session,
        work: Callable[[], T],
        stop: asyncio.Event | None,
        deadline: float | None = None,
    ) -> T:
        """``work`` in the control's worker thread, given up on at the deadline, when ``stop``
        is set or when the task is cancelled: the session is then aborted (the blocked call
        returns at once and the worker ends it) and ``ControlLost``, ``_Stopped`` or the
        cancellation is raised."""
        loop, limit = asyncio.get_running_loop(), deadline or self._deadline()
        call = loop.run_in_executor(executor, work)
        waits: set[asyncio.Future[Any]] = {call}
        if stop is not None:
            waits.add(asyncio.ensure_future(stop.wait()))
        try:
            done, _ = await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            session.abort()
            call.cancel()
            raise
        finally:
            for waiting in waits - {call}:
                waiting.cancel()
        if call in done:
            return call.result()
        session.abort()
        call.cancel()  # its outcome no longer matters
        if stop is not None and stop.is_set():
            raise _Stopped
        raise ControlLost(f"no answer within {limit:g} s (the call was given up on)")

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        self.state = self._new_run()
        config = self.config
        first_backoff = min(RECONNECT_MIN_S, config.reconnect_max_s)
        backoff = first_backoff
        # One thread per control: pyLSV2 blocks, and one client is used by one thread.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lsv2-{config.machine_id}")
        session: Session | None = None
        try:
            while not stop.is_set():
                session = Session(config)
                wait = backoff
                try:
                    await self._call(executor, session, session.open, stop)
                    log.info("%s %s: connected", self.events.source, config.machine_id)
                    await self._poll(executor, session, publisher, stop)
                    # Stopped between polls: log out politely, not waiting long.
                    with contextlib.suppress(Exception):
                        await self._call(executor, session, session.close, None, LOGOUT_S)
                    return
                except _Stopped:
                    return
                except Exception as exc:
                    if stop.is_set():
                        return  # the adapter stopping is not the control failing
                    if isinstance(exc, LoginRefused):
                        wait = config.reconnect_max_s  # an option or a password is missing
                    await self._failed(publisher, exc, wait, session.polled)
                session.abort()  # the connection is no use any more: no logout
                executor.submit(session.discard)
                if session.polled:
                    # Only a session that brought data starts the backoff over: a control that
                    # accepts and then fails is not hammered.
                    backoff, wait = first_backoff, min(wait, first_backoff)
                if await stopped(stop, wait):
                    return
                backoff = min(backoff * 2, config.reconnect_max_s)
        finally:
            if session is not None:
                session.abort()
                executor.submit(session.discard)
            executor.shutdown(wait=False)

    async def _failed(
        self, publisher: EventPublisher, exc: Exception, retry_in: float, polled: bool
    ) -> None:
        """A session that ended on ``exc``: what it tells the hub."""
        if isinstance(exc, ControlLost | OSError):  # LoginRefused is a ConnectionError too
            await self._lost(publisher, _describe_loss(exc, self.config.timeout_s), retry_in)
        elif isinstance(exc, BrokenTelegram):
            await self._broken(publisher, str(exc))
            if not polled:
                # Not one poll understood on this connection: the machine is out of sight.
                why = f"the control answers, but not in LSV2 ({exc})"
                await self._lost(publisher, why, retry_in)
        else:
            log.error(
                "%s %s: session failed",
                self.events.source,
                self.config.machine_id,
                exc_info=exc,
            )

    async def _poll(
        self,
        executor: ThreadPoolExecutor,
        session: Session,
        publisher: EventPublisher,
        stop: asyncio.Event,
    ) -> None:
        """Poll every ``poll_s`` until ``stop``; raises when the session cannot go on."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while not stop.is_set():
            reading = await self._call(executor, session, session.read, stop)
            # Stamped once read: what it saw was in effect then (never before it happened).
            at = datetime.now(UTC)
            before = self.state
            if before.last != reading or before.last_at is None or at < before.last_at:
                # Worked out on a copy: a failed publish leaves the state as published.
                new = copy.deepcopy(before)
                events = self._changes(new, reading, at)
                new.last, new.last_at = reading, at
                self.state = await self._publish(publisher, events, before, new)
            session.polled = True
            next_poll = max(next_poll + self.config.poll_s, loop.time())
            await stopped(stop, next_poll - loop.time())

    async def check(self) -> list[CloudEvent]:
        """Connect, read once and return the first events of ``run``. A control that does not
        answer raises ``ControlLost`` (a ``ConnectionError``; the socket's own errors, refused,
        reset or timed out, as ``cannot connect to host:port (…)``), a refused login (``DNC``
        or ``PLCDEBUG``) ``LoginRefused`` (a ``ConnectionError`` too), a telegram that is not
        LSV2 ``BrokenTelegram``."""
        config = self.config
        session = Session(config, strict=True)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsv2-check")
        try:
            await self._call(executor, session, session.open, None)
            reading = await self._call(executor, session, session.read, None)
            at = datetime.now(UTC)
            with contextlib.suppress(Exception):
                await self._call(executor, session, session.close, None, LOGOUT_S)
            return self._changes(self._new_run(), reading, at)
        except (ControlLost, LoginRefused):
            raise  # ConnectionErrors that say what happened already
        except OSError as exc:  # the socket's: refused, reset, timed out (TimeoutError too)
            why = _describe_loss(exc, config.timeout_s)
            raise ControlLost(f"cannot connect to {config.host}:{config.port} ({why})") from exc
        finally:
            session.abort()
            executor.submit(session.discard)
            executor.shutdown(wait=False)

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], old: _Run, new: _Run
    ) -> _Run:
        return await publish_or_keep(publisher, events, old, new, log)

    async def _lost(self, publisher: EventPublisher, why: str, retry_in: float) -> None:
        machine = self.config.machine_id
        before = self.state
        if before.observer.available is False:
            log.debug(
                "%s %s: still lost (%s); next attempt in %.2f s",
                self.events.source, machine, why, retry_in,
            )  # fmt: skip
            return
        new = copy.deepcopy(before)
        events = new.observer.lost(f"LSV2 {self.config.host}:{self.config.port}: {why}")
        log.warning(
            "%s %s: %s; reconnecting in %.2f s, then up to %.1f s apart",
            self.events.source, machine, why, retry_in, self.config.reconnect_max_s,
        )  # fmt: skip
        new.last = None  # the next reading is published against what was published
        self.state = await self._publish(publisher, events, before, new)

    async def _broken(self, publisher: EventPublisher, detail: str) -> None:
        """A telegram that is not LSV2: one warning while it lasts (the detail goes to the log;
        other problems reported stay reported)."""
        before = self.state
        what = "the control sent a telegram that is not LSV2 (or not the answer asked for); "
        what += "reconnecting"
        events, now = problem_changes(
            log, self.events, before.problems, [("telegram", what, detail)], datetime.now(UTC)
        )
        new = copy.deepcopy(before)
        new.problems = {**before.problems, **now}
        new.last = None
        self.state = await self._publish(publisher, events, before, new)

    def _changes(self, state: _Run, reading: Reading, at: datetime) -> list[CloudEvent]:
        """The events that take the hub from what was published (``state``, updated) to what
        the control shows."""
        observer, stamp = state.observer, at.isoformat()
        events = observer.value("availability", "control", "AVAILABLE", at, f"{stamp}|control")
        if not state.cleared:
            # The control's error list is this machine's only source of conditions: a fresh
            # run clears what an earlier one left active.
            events.append(observer.reset_conditions(at, f"conditions|{stamp}|reset"))
            state.cleared = True
        execution = None if reading.program_state is None else EXECUTIONS[reading.program_state]
        mode = None if reading.mode is None else MODES[reading.mode]
        if execution is not None or observer.execution is not None:
            # What was not read (None) stays as published; never a mode without an execution.
            events += observer.polled(execution, mode, reading.program, at)
        for kind, count in reading.counts.items():
            meaning: Meaning = "bad_part_count" if kind == "bad" else "part_count"
            address = self.config.counters()[kind]
            events += observer.value(meaning, address, str(count), at, f"{stamp}|{address}")
        if reading.errors is not None:
            events += self._condition_changes(observer, reading.errors, at)
        problems = [(item, what, raw) for item, (what, raw) in reading.problems.items()]
        found, state.problems = problem_changes(log, self.events, state.problems, problems, at)
        return events + found

    def _condition_changes(
        self, observer: MachineObserver, errors: list[ControlError], at: datetime
    ) -> list[CloudEvent]:
        stamp = at.isoformat()
        events: list[CloudEvent] = []
        active: dict[str, ControlError] = {}
        for error in errors:
            active.setdefault(str(error.number), error)  # one condition per error number
        for code in sorted(set(observer.active_codes.get(ERRORS_ITEM, {})) - set(active)):
            events += observer.condition(ERRORS_ITEM, "NORMAL", code, None, at, f"{stamp}|{code}")
        for code, error in active.items():
            level = "WARNING" if error.error_class in self.config.warning_classes else "FAULT"
            kind = ERROR_CLASSES.get(error.error_class, f"class {error.error_class}")
            group = ERROR_GROUPS.get(error.group, f"group {error.group}")
            text = f"{error.text} ({kind}, {group})" if error.text else f"{kind}, {group}"
            events += observer.condition(ERRORS_ITEM, level, code, text, at, f"{stamp}|{code}")
        return events


def _describe_loss(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, ControlLost | LoginRefused):
        return str(exc)
    if isinstance(exc, TimeoutError):  # pyLSV2's socket timeout, on connect or on an answer
        return f"no answer within {timeout_s:g} s"
    return _describe(exc)
