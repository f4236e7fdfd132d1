"""Modbus TCP PLCs through pymodbus: poll a register map, publish what changed.

One ``ModbusConfig`` is one PLC and one machine. Every ``poll_s`` the adapter reads the register
map (contiguous addresses of one table in one request), decodes each value (type, word order,
scale) and publishes only what changed since the last publish:

- ``running``: non-zero is execution ``ACTIVE``, zero ``STOPPED``;
- ``available``: with the PLC answering, availability ``AVAILABLE`` or ``UNAVAILABLE``;
- ``part_count`` / ``bad_count``: the PLC's cumulative counters, partcount ``all`` / ``bad``;
- ``alarm_code``: non-zero is a ``fault`` condition with that native code; back to 0 clears it.

A PLC has no timestamps, so every event carries the time of the poll that saw it. A poll stamped
earlier than a value's last publication (the host's clock was set back) publishes that value
again: it is a fact from before what the hub has (``docs/adapters.md``). The first
successful poll of a run publishes the whole state, led by a ``normal`` condition without a code
(no condition of this machine is active but those it reports). When the PLC stops answering,
``UNAVAILABLE`` and an ``unavailable`` condition ``ADAPTER_CONNECTION`` are published once; the
adapter reconnects with backoff and, once the PLC answers, publishes ``AVAILABLE``, clears the
connection condition and publishes whatever changed against the state before the loss.

What the PLC answers wrongly (a Modbus exception, a negative or fractional counter, a NaN) is
logged naming the register and published once as an ``ADAPTER_INPUT`` warning; the register keeps
its last good value and the others go on. When no register is wrong any more, a ``normal``
condition with code ``ADAPTER_INPUT`` clears the warning. See ``docs/adapters/modbus.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from adapters.machines.base import (
    CONNECTION_CODE,
    MachineEvents,
    problem_changes,
    publish_or_keep,
    stopped,
    url_host,
)
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)

Meaning = Literal["running", "available", "part_count", "bad_count", "alarm_code"]
Table = Literal["holding", "input", "coil", "discrete"]
RegisterType = Literal["uint16", "int16", "uint32", "int32", "float32", "bool"]

WORDS: dict[str, int] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
    "bool": 1,
}
BIT_TABLES = frozenset({"coil", "discrete"})
# Per-request limits of the Modbus application protocol (v1.1b3, function codes 01 to 04).
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
RECONNECT_MIN_S = 0.25

_DATATYPES = {
    "uint32": AsyncModbusTcpClient.DATATYPE.UINT32,
    "int32": AsyncModbusTcpClient.DATATYPE.INT32,
    "float32": AsyncModbusTcpClient.DATATYPE.FLOAT32,
}
_COUNT_KINDS: dict[str, str] = {"part_count": "all", "bad_count": "bad"}


class ModbusRegister(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: int = Field(ge=0, le=65535)
    table: Literal["holding", "input", "coil", "discrete"] = "holding"
    # Validated even when left out, to check the register fits below address 65536.
    type: Literal["uint16", "int16", "uint32", "int32", "float32", "bool"] = Field(
        default="uint16", validate_default=True
    )
    word_order: Literal["big", "little"] = "big"  # for 32-bit values: which register is high
    scale: float = Field(default=1.0, allow_inf_nan=False)
    meaning: Meaning

    @model_validator(mode="before")
    @classmethod
    def _bits_are_bools(cls, data: Any) -> Any:
        # A coil or discrete input is one bit: its type goes without saying.
        if isinstance(data, dict) and data.get("table") in BIT_TABLES and "type" not in data:
            return {**data, "type": "bool"}
        return data

    @field_validator("type")
    @classmethod
    def _type_fits_table(cls, value: str, info: ValidationInfo) -> str:
        table = info.data.get("table")
        if table in BIT_TABLES and value != "bool":
            raise ValueError(f"a {table} is a single bit: its type must be 'bool', not {value!r}")
        address = info.data.get("address")
        if address is not None and address + WORDS[value] - 1 > 65535:
            raise ValueError(f"a {value} at address {address} runs past register 65535")
        return value

    @field_validator("word_order")
    @classmethod
    def _word_order_for_32_bits(cls, value: str, info: ValidationInfo) -> str:
        # Only checked when given: a word order on a 16-bit value suggests a wrong type.
        type_ = info.data.get("type")
        if type_ is not None and WORDS[type_] != 2:
            raise ValueError(
                f"word_order applies to uint32, int32 and float32 only, not to {type_!r}"
            )
        return value

    @field_validator("scale")
    @classmethod
    def _usable_scale(cls, value: float, info: ValidationInfo) -> float:
        if value == 0:
            raise ValueError("scale 0 would make every value 0")
        if info.data.get("type") == "bool" and value != 1:
            raise ValueError("a bool is not scaled: leave scale at 1")
        return value

    @field_validator("meaning")
    @classmethod
    def _meaning_fits_type(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("type") == "bool" and value not in ("running", "available"):
            raise ValueError(f"{value!r} needs a numeric type, not 'bool'")
        return value

    @property
    def words(self) -> int:
        """How many addresses the value takes in its table (a bit takes one)."""
        return WORDS[self.type]

    def name(self) -> str:
        return f"{self.table} {self.address} ({self.meaning})"


class ModbusConfig(BaseModel):
    """One PLC (one machine) on Modbus TCP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=255)
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    registers: list[ModbusRegister] = Field(min_length=1)
    reconnect_max_s: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("registers")
    @classmethod
    def _one_register_per_meaning(cls, value: list[ModbusRegister]) -> list[ModbusRegister]:
        seen: set[str] = set()
        for register in value:
            if register.meaning in seen:
                raise ValueError(f"meaning {register.meaning!r} is given to more than one register")
            seen.add(register.meaning)
        return value


# --- reading ---------------------------------------------------------------------------------


class PlcLost(ConnectionError):
    """The PLC did not answer (refused, timed out, connection closed)."""


@dataclass(frozen=True)
class _Read:
    """One request: ``count`` addresses of ``table`` from ``address``, holding ``registers``."""

    table: Table
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]

    @classmethod
    def single(cls, register: ModbusRegister) -> _Read:
        return cls(register.table, register.address, register.words, (register,))


def plan_reads(registers: list[ModbusRegister]) -> list[_Read]:
    """Group the registers into as few requests as the protocol allows. Only contiguous (or
    overlapping) addresses share a request: a gap may be an address the PLC does not have."""
    reads: list[_Read] = []
    tables: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
    for table in tables:
        limit = MAX_BITS_PER_READ if table in BIT_TABLES else MAX_REGISTERS_PER_READ
        group: list[ModbusRegister] = []
        start = end = 0
        for register in sorted((r for r in registers if r.table == table), key=lambda r: r.address):
            reg_end = register.address + register.words
            if group and register.address <= end and max(end, reg_end) - start <= limit:
                group.append(register)
                end = max(end, reg_end)
                continue
            if group:
                reads.append(_Read(table, start, end - start, tuple(group)))
            group, start, end = [register], register.address, reg_end
        if group:
            reads.append(_Read(table, start, end - start, tuple(group)))
    return reads


@dataclass(frozen=True)
class _Reading:
    """One register in one poll: a decoded value, or what was wrong and what the PLC sent."""

    value: bool | int | None = None
    problem: str | None = None
    raw: object = None


def _exception_text(code: int) -> str:
    try:
        name = ExcCodes(code).name.lower().replace("_", " ")
    except ValueError:
        name = "unknown"
    return f"the PLC answered Modbus exception {code} ({name})"


def _decode(register: ModbusRegister, raw: list[int] | list[bool]) -> _Reading:
    """A register's value as its meaning needs it, or why it cannot be used."""
    value: float
    if register.table in BIT_TABLES:
        value = 1 if raw[0] else 0
    elif register.type == "bool":
        word = int(raw[0])
        if word not in (0, 1):
            return _Reading(problem=f"a bool register must hold 0 or 1, not {word}", raw=word)
        value = word
    elif register.type == "uint16":
        value = int(raw[0])
    elif register.type == "int16":
        word = int(raw[0])
        value = word - 0x10000 if word & 0x8000 else word
    else:
        converted = AsyncModbusTcpClient.convert_from_registers(
            [int(w) for w in raw], _DATATYPES[register.type], word_order=register.word_order
        )
        value = cast(float, converted)
    if isinstance(value, float) and not math.isfinite(value):
        return _Reading(problem=f"the {register.type} value is {value}", raw=list(raw))
    if register.scale != 1:
        value = value * register.scale
    if register.meaning in ("running", "available"):
        return _Reading(value=value != 0)
    number = _integral(value, register.type == "float32")
    if number is None:
        what = "a count" if register.meaning in _COUNT_KINDS else "an alarm code"
        return _Reading(problem=f"{what} must be a whole number, got {value}", raw=list(raw))
    if register.meaning in _COUNT_KINDS and number < 0:
        return _Reading(problem=f"a count cannot be negative, got {number}", raw=list(raw))
    return _Reading(value=number)


def _integral(value: float, single_precision: bool) -> int | None:
    """``value`` as an int if it is one, allowing for float arithmetic: 30 * 0.1 is
    3.0000000000000004, and a float32 holds about 7 significant digits (2 ulps: 2**-22)."""
    if isinstance(value, int):
        return value
    nearest = round(value)
    tolerance = (2**-22 if single_precision else 1e-9) * max(1.0, abs(value))
    return nearest if abs(value - nearest) <= tolerance else None


class _Connection:
    """One TCP connection to the PLC and the read plan it uses."""

    def __init__(self, config: ModbusConfig) -> None:
        self.config = config
        # retries=0: a PLC that misses ``timeout_s`` is treated as lost at once (TCP does not
        # drop requests); reconnect_delay=0: the adapter reconnects itself, with its own backoff.
        self.client = AsyncModbusTcpClient(
            config.host,
            port=config.port,
            timeout=config.timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        self.plan = plan_reads(config.registers)

    async def open(self) -> None:
        if not await self.client.connect():
            raise PlcLost(f"cannot connect to {self.config.host}:{self.config.port}")

    def close(self) -> None:
        self.client.close()

    async def read_all(self) -> dict[str, _Reading]:
        """Every register of the map, by meaning. Raises ``PlcLost``."""
        readings: dict[str, _Reading] = {}
        plan: list[_Read] = []
        for read in self.plan:
            answer = await self._request(read)
            if isinstance(answer, _Reading) and len(read.registers) > 1:
                # One bad address fails its whole range: from now on read that range register
                # by register, so the others keep working and the bad one is named.
                singles = [_Read.single(r) for r in read.registers]
                plan.extend(singles)
                for single in singles:
                    self._take(single, await self._request(single), readings)
            else:
                plan.append(read)
                self._take(read, answer, readings)
        self.plan = plan
        return readings

    @staticmethod
    def _take(
        read: _Read, answer: list[int] | list[bool] | _Reading, into: dict[str, _Reading]
    ) -> None:
        for register in read.registers:
            if isinstance(answer, _Reading):
                into[register.meaning] = answer
                continue
            offset = register.address - read.address
            into[register.meaning] = _decode(register, answer[offset : offset + register.words])

    async def _request(self, read: _Read) -> list[int] | list[bool] | _Reading:
        """The values read, or why the PLC refused them (a problem). Raises ``PlcLost``."""
        client, unit = self.client, self.config.unit
        functions = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        try:
            response: ModbusPDU = await functions[read.table](
                read.address, count=read.count, device_id=unit
            )
        except (ModbusException, OSError, TimeoutError) as exc:
            raise PlcLost(str(exc) or type(exc).__name__) from exc
        if response.isError():
            code = getattr(response, "exception_code", 0)
            return _Reading(problem=_exception_text(code), raw=str(response))
        # Bits come padded to whole bytes; registers come as asked, unless the PLC errs.
        values = response.bits if read.table in BIT_TABLES else response.registers
        if len(values) < read.count:
            problem = f"the PLC answered {len(values)} values for {read.count} addresses"
            return _Reading(problem=problem, raw=list(values))
        return list(values[: read.count])


# --- deciding what to publish ----------------------------------------------------------------


@dataclass
class _State:
    """What was last published (or, for problems, reported) for one machine."""

    available: bool | None = None
    values: dict[str, bool | int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    polled: bool = False
    connection_reported: bool = False  # an ADAPTER_CONNECTION condition is active
    # When each value ("available", "running", counters, "alarm_code") was last published.
    published_at: dict[str, datetime] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            self.available,
            dict(self.values),
            dict(self.problems),
            self.polled,
            self.connection_reported,
            dict(self.published_at),
        )

    def repeats(self, item: str, value: object, was: object, at: datetime) -> bool:
        """Whether ``value`` at ``at`` repeats what was published: the same value, and not
        earlier than when it was published (the host's clock set back: the poll is a fact
        from before what the hub has, and is published again)."""
        published = self.published_at.get(item)
        return value == was and (published is None or at >= published)


class ModbusAdapter:
    """Polls one PLC and publishes the changes of its machine (see the module docstring)."""

    protocol: ClassVar[str] = "modbus"

    def __init__(self, config: ModbusConfig) -> None:
        self.config = config
        self.events = MachineEvents(
            config.machine_id, f"modbus://{url_host(config.host)}:{config.port}/{config.unit}"
        )
        self._registers: dict[str, ModbusRegister] = {r.meaning: r for r in config.registers}

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        state = _State()
        first_backoff = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first_backoff
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            connection = _Connection(self.config)
            try:
                await connection.open()
                log.info("%s %s: connected", self.events.source, self.config.machine_id)
                next_poll = loop.time()
                while not stop.is_set():
                    state = await self._poll(connection, state, publisher)
                    backoff = first_backoff
                    next_poll += self.config.poll_s
                    if next_poll < loop.time():
                        next_poll = loop.time()  # a slow PLC: do not burst to catch up
                    if await stopped(stop, next_poll - loop.time()):
                        return
            except PlcLost as exc:
                state = await self._lost(state, publisher, str(exc), backoff)
            finally:
                connection.close()
            if await stopped(stop, backoff):
                return
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def check(self) -> list[CloudEvent]:
        """Connect, read the map once and return the first events of ``run``. A PLC that does
        not answer raises ``PlcLost`` (a ``ConnectionError``), as the other adapters do."""
        connection = _Connection(self.config)
        try:
            await connection.open()
            now = datetime.now(UTC)
            readings = await connection.read_all()
        finally:
            connection.close()
        events, _ = self._changes(_State(), readings, now)
        return events

    async def _poll(
        self, connection: _Connection, state: _State, publisher: EventPublisher
    ) -> _State:
        now = datetime.now(UTC)
        readings = await connection.read_all()
        events, new_state = self._changes(state, readings, now)
        return await self._publish(publisher, events, state, new_state)

    async def _lost(
        self, state: _State, publisher: EventPublisher, reason: str, retry_in: float
    ) -> _State:
        machine = self.config.machine_id
        if state.connection_reported:
            log.debug("%s %s: still not answering (%s)", self.events.source, machine, reason)
            return state
        log.warning(
            "%s %s: PLC not answering (%s); reconnecting from %.2f s up to %.1f s apart",
            self.events.source,
            machine,
            reason,
            retry_in,
            self.config.reconnect_max_s,
        )
        at = datetime.now(UTC)
        # UNAVAILABLE unless the PLC's own flag said so already; the condition says why.
        events = [] if state.available is False else [self._availability(False, at)]
        config = self.config
        message = f"Modbus TCP {config.host}:{config.port} unit {config.unit}: {reason}"
        key = f"lost|{at.isoformat()}"
        events.append(self.events.condition("unavailable", at, key, CONNECTION_CODE, message))
        new_state = state.copy()
        if state.available is not False:
            new_state.published_at["available"] = at
        new_state.available = False
        new_state.connection_reported = True
        return await self._publish(publisher, events, state, new_state)

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], old: _State, new: _State
    ) -> _State:
        return await publish_or_keep(publisher, events, old, new, log)

    def _availability(self, available: bool, at: datetime) -> CloudEvent:
        value = "AVAILABLE" if available else "UNAVAILABLE"
        return self.events.availability(available, at, f"availability|{at.isoformat()}|{value}")

    def _key(self, meaning: str, at: datetime, value: object) -> str:
        register = self._registers[meaning]
        return f"{register.table}:{register.address}|{at.isoformat()}|{value}"

    def _changes(
        self, state: _State, readings: dict[str, _Reading], at: datetime
    ) -> tuple[list[CloudEvent], _State]:
        """The events that take the hub from ``state`` to what the PLC shows now."""
        new = state.copy()
        events: list[CloudEvent] = []
        for meaning, reading in readings.items():
            if reading.value is not None:
                new.values[meaning] = reading.value
        # The PLC answered; it is available unless its own flag, if it has one, says otherwise.
        available = bool(new.values.get("available", True))
        if not state.repeats("available", available, state.available, at):
            events.append(self._availability(available, at))
            new.published_at["available"] = at
        new.available = available
        if state.connection_reported:
            key = f"connected|{at.isoformat()}"
            events.append(self.events.condition("normal", at, key, CONNECTION_CODE))
            new.connection_reported = False
        running = new.values.get("running")
        if running is not None and not state.repeats(
            "running", running, state.values.get("running"), at
        ):
            execution = "ACTIVE" if running else "STOPPED"
            events.append(self.events.execution(execution, at, self._key("running", at, running)))
            new.published_at["running"] = at
        for meaning, kind in _COUNT_KINDS.items():
            count = new.values.get(meaning)
            if count is not None and not state.repeats(
                meaning, count, state.values.get(meaning), at
            ):
                key = self._key(meaning, at, count)
                events.append(self.events.part_count(int(count), kind, at, key))
                new.published_at[meaning] = at
        if not state.polled:
            # A fresh run knows every condition of the machine: clear what an earlier run left.
            events.append(self.events.condition("normal", at, f"conditions|{at.isoformat()}|reset"))
            new.polled = True
        events.extend(self._alarm_changes(state, new, at))
        events.extend(self._problem_changes(state, new, readings, at))
        return events, new

    def _alarm_changes(self, old: _State, new: _State, at: datetime) -> list[CloudEvent]:
        code, was = new.values.get("alarm_code"), old.values.get("alarm_code")
        if code is None or old.repeats("alarm_code", code, was, at):
            return []
        register = self._registers["alarm_code"]
        events = []
        new.published_at["alarm_code"] = at
        if was and was != code:
            key = self._key("alarm_code", at, f"{was}->{code}")
            events.append(self.events.condition("normal", at, key, native_code=str(was)))
        if code:
            events.append(
                self.events.condition(
                    "fault",
                    at,
                    self._key("alarm_code", at, code),
                    native_code=str(code),
                    message=f"alarm code {code} (register {register.table} {register.address})",
                )
            )
        return events

    def _problem_changes(
        self, old: _State, new: _State, readings: dict[str, _Reading], at: datetime
    ) -> list[CloudEvent]:
        problems = [
            (meaning, f"register {self._registers[meaning].name()}: {r.problem}", r.raw)
            for meaning, r in readings.items()
            if r.problem is not None
        ]
        events, new.problems = problem_changes(log, self.events, old.problems, problems, at)
        return events
