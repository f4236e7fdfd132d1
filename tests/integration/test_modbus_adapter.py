"""The Modbus TCP adapter against a real pymodbus TCP server on loopback."""

from __future__ import annotations

import logging
import math
import re
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.modbus import ModbusAdapter, ModbusConfig, ModbusRegister
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running, facts, of_kind
from tests.conftest import eventually
from tests.counting import stored_counters

UNIT = 1
HOLDING_SIZE = 20  # holding registers 0..19 exist; 20 and up answer "illegal address"
DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "modbus.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def words32(value: int, word_order: str = "big") -> list[int]:
    high, low = value >> 16 & 0xFFFF, value & 0xFFFF
    return [high, low] if word_order == "big" else [low, high]


def float_words(value: float) -> list[int]:
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


class Plc:
    """A Modbus TCP server on loopback whose values the test sets; it can be stopped and started
    again on the same port with the values it had. Counts the read requests it answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.holding = [0] * HOLDING_SIZE
        self.inputs = [0] * 8
        self.coils = [False] * 16
        self.discrete = [False] * 16
        self.requests: list[tuple[int, int, int]] = []  # (function code, address, count)
        self.server: ModbusTcpServer | None = None

    async def _action(
        self,
        function_code: int,
        _start: int,
        address: int,
        count: int,
        _registers: list[int],
        _values: list[int] | list[bool] | None,
    ) -> None:
        self.requests.append((function_code, address, count))

    async def start(self) -> None:
        device = SimDevice(
            UNIT,
            simdata=(
                [SimData(0, values=list(self.coils), datatype=DataType.BITS)],
                [SimData(0, values=list(self.discrete), datatype=DataType.BITS)],
                [SimData(0, values=list(self.holding), datatype=DataType.REGISTERS)],
                [SimData(0, values=list(self.inputs), datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        self.server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    async def set(self, table: str, address: int, values: list[int] | list[bool]) -> None:
        """Change values, in the running server and for the next start."""
        store: list[Any] = {
            "coil": self.coils,
            "discrete": self.discrete,
            "holding": self.holding,
            "input": self.inputs,
        }[table]
        store[address : address + len(values)] = values
        if self.server is not None:
            # The write function codes of each table (2 and 4 are reads: the simulator writes
            # with any function code that addresses the table).
            function = {"coil": 15, "discrete": 2, "holding": 16, "input": 4}[table]
            await self.server.async_setValues(UNIT, function, address, values)

    async def served(self, n: int) -> None:
        """Wait until the server has answered ``n`` more read requests (polls, not seconds)."""
        target = len(self.requests) + n
        await eventually(lambda: len(self.requests) >= target)


@pytest.fixture
async def plc() -> AsyncIterator[Plc]:
    server = Plc()
    await server.start()
    yield server
    await server.stop()


def config(plc: Plc, registers: list[dict[str, Any]], **kwargs: Any) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {
            "machine_id": "PRESS-1",
            "host": "127.0.0.1",
            "port": plc.port,
            "unit": UNIT,
            "poll_s": 0.05,
            "timeout_s": 1.0,
            "reconnect_max_s": 0.2,
            "registers": registers,
            **kwargs,
        }
    )


MAIN_MAP = [
    {"address": 0, "table": "coil", "meaning": "running"},  # a coil is a bool without saying
    {"address": 0, "type": "uint32", "word_order": "big", "meaning": "part_count"},
    {"address": 2, "type": "uint32", "word_order": "little", "meaning": "bad_count"},
    {"address": 4, "meaning": "alarm_code"},
]


def test_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = ModbusAdapter(
        ModbusConfig(machine_id="M1", host="plc", registers=[{"address": 0, "meaning": "running"}])
    )
    assert adapter.protocol == "modbus"
    assert ModbusAdapter.protocol == "modbus"


async def test_publishes_the_state_then_only_changes(plc: Plc) -> None:
    await plc.set("holding", 0, words32(70_000, "big") + words32(70_005, "little"))
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(plc, MAIN_MAP)), publisher)

    initial = [
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "STOPPED"}),
        ("partcount", {"count": 70_000, "kind": "all"}),
        ("partcount", {"count": 70_005, "kind": "bad"}),
        ("condition", {"level": "normal"}),
    ]
    await eventually(lambda: len(publisher.published) >= len(initial))
    await plc.served(10)
    assert facts(publisher) == initial  # more polls of the same values published nothing

    await plc.set("coil", 0, [True])
    await eventually(lambda: len(publisher.published) == 6)
    # Across the 16-bit boundary: a wrong word order would decode 65536 as 1.
    await plc.set("holding", 0, words32(65_536, "big"))
    await eventually(lambda: len(publisher.published) == 7)
    await plc.set("holding", 2, words32(70_006, "little"))
    await eventually(lambda: len(publisher.published) == 8)
    await plc.set("holding", 4, [17])
    await eventually(lambda: len(publisher.published) == 9)
    await plc.set("holding", 4, [0])
    await eventually(lambda: len(publisher.published) == 10)
    await plc.served(5)
    await running.finish()

    assert facts(publisher) == [
        *initial,
        ("execution", {"execution": "ACTIVE"}),
        ("partcount", {"count": 65_536, "kind": "all"}),
        ("partcount", {"count": 70_006, "kind": "bad"}),
        (
            "condition",
            {
                "level": "fault",
                "native_code": "17",
                "message": "alarm code 17 (register holding 4)",
            },
        ),
        ("condition", {"level": "normal", "native_code": "17"}),
    ]
    events = [e.envelope for _, e in publisher.published]
    assert all(e.subject == "PRESS-1" for e in events)
    assert all(e.source == f"modbus://127.0.0.1:{plc.port}/{UNIT}" for e in events)
    assert len({e.id for e in events}) == len(events)
    # The event time is the poll's: one poll, one time.
    assert len({e.time for e in events[: len(initial)]}) == 1


async def test_an_alarm_replaced_by_another_is_cleared_first(plc: Plc) -> None:
    await plc.set("holding", 4, [5])
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(plc, [MAIN_MAP[3]])), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    await plc.set("holding", 4, [6])
    await eventually(lambda: len(of_kind(publisher, "condition")) == 4)
    await running.finish()
    codes = [(c["level"], c.get("native_code")) for c in of_kind(publisher, "condition")]
    assert codes == [("normal", None), ("fault", "5"), ("normal", "5"), ("fault", "6")]


async def test_word_order_scale_and_float32_decode(plc: Plc) -> None:
    await plc.set("holding", 0, words32(123_456, "little"))
    await plc.set("holding", 2, float_words(12.3))
    registers = [
        {"address": 0, "type": "uint32", "word_order": "little", "meaning": "part_count"},
        # A float32 counter in tens: 12.3 is 12.30000019 as a float32, times 10 still 123 parts.
        {"address": 2, "type": "float32", "scale": 10, "meaning": "bad_count"},
    ]
    events = await ModbusAdapter(config(plc, registers)).check()
    counts = [e.data for e in events if e.type == "mes.machine.partcount.v1"]
    assert counts == [{"count": 123_456, "kind": "all"}, {"count": 123, "kind": "bad"}]

    await plc.set("holding", 0, [7, 0])  # little-endian 7: 7 in the low word comes first
    scaled = [
        {
            "address": 0,
            "type": "int32",
            "word_order": "little",
            "scale": 10,
            "meaning": "part_count",
        }
    ]
    events = await ModbusAdapter(config(plc, scaled)).check()
    assert [e.data for e in events if e.type == "mes.machine.partcount.v1"] == [
        {"count": 70, "kind": "all"}
    ]


async def test_input_registers_and_discrete_inputs(plc: Plc) -> None:
    await plc.set("input", 2, [1])
    await plc.set("input", 3, [250])
    await plc.set("discrete", 5, [True])
    registers = [
        {"address": 5, "table": "discrete", "meaning": "running"},
        {"address": 2, "table": "input", "type": "bool", "meaning": "available"},
        {"address": 3, "table": "input", "meaning": "part_count"},
    ]
    adapter = ModbusAdapter(config(plc, registers))
    assert [e.data for e in await adapter.check()] == [
        {"availability": "AVAILABLE"},
        {"execution": "ACTIVE"},
        {"count": 250, "kind": "all"},
        {"level": "normal"},
    ]
    await plc.set("input", 2, [0])  # the PLC says the machine is not available
    await plc.set("discrete", 5, [False])
    assert [e.data for e in await adapter.check()][:2] == [
        {"availability": "UNAVAILABLE"},
        {"execution": "STOPPED"},
    ]


async def test_contiguous_registers_are_read_together(plc: Plc) -> None:
    registers = [
        {"address": 0, "type": "uint32", "meaning": "part_count"},
        {"address": 2, "type": "uint32", "meaning": "bad_count"},
        {"address": 4, "meaning": "alarm_code"},
        {"address": 9, "meaning": "available"},  # a gap: its own request
        {"address": 3, "table": "coil", "type": "bool", "meaning": "running"},
    ]
    await ModbusAdapter(config(plc, registers)).check()
    assert sorted(plc.requests) == [(1, 3, 1), (3, 0, 5), (3, 9, 1)]


async def test_end_to_end_through_the_hub(plc: Plc, hub: Any) -> None:
    await plc.set("holding", 0, words32(1_000))
    adapter = ModbusAdapter(config(plc, MAIN_MAP, machine_id="PRESS-7"))
    running = Running(adapter, hub.publisher)
    site = hub.settings.site

    async def machine() -> Any:
        await hub.wait_caught_up()
        return hub.store.machine(site, "PRESS-7")

    async def baseline_read() -> bool:
        found = await machine()
        return found is not None and found.counter_values.get("all") == 1_000

    await eventually(baseline_read)
    await plc.set("coil", 0, [True])
    for count in (1_001, 1_002, 1_003):
        await plc.set("holding", 0, words32(count))
        await plc.served(2)
    await plc.set("holding", 4, [42])

    async def produced() -> bool:
        found = await machine()
        return (
            found is not None
            and stored_counters(hub.store, hub.settings.site, found.machine_id).produced == 3
            and found.execution == "ACTIVE"
            and "42" in found.conditions
        )

    await eventually(produced)
    await running.finish()
    found = await machine()
    assert found.availability == "AVAILABLE"
    assert found.conditions["42"]["level"] == "fault"
    assert stored_counters(hub.store, hub.settings.site, found.machine_id).bad == 0


async def test_unavailable_once_then_available_again(
    plc: Plc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.modbus")
    await plc.set("holding", 0, words32(10))
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(plc, MAIN_MAP)), publisher)
    await eventually(lambda: len(publisher.published) == 5)

    await plc.stop()
    await eventually(lambda: len(publisher.published) == 7)

    def retries() -> int:
        return sum("still not answering" in r.getMessage() for r in caplog.records)

    await eventually(lambda: retries() >= 3)  # three failed reconnects: still one UNAVAILABLE
    unavailable, lost = facts(publisher)[5:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert lost[0] == "condition"
    assert lost[1]["level"] == "unavailable"
    assert lost[1]["native_code"] == CONNECTION_CODE
    # Then pymodbus's words: "not connected", or "no response" if a request was under way.
    assert lost[1]["message"].startswith(f"Modbus TCP 127.0.0.1:{plc.port} unit 1: Modbus Error")
    lost_at = len(publisher.published)

    await plc.set("coil", 0, [True])  # changed while the PLC was unreachable
    await plc.start()
    await eventually(lambda: len(publisher.published) == lost_at + 3)
    assert facts(publisher)[lost_at:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("execution", {"execution": "ACTIVE"}),
    ]
    await plc.set("holding", 0, words32(11))  # polling goes on
    await eventually(lambda: len(publisher.published) == lost_at + 4)
    await running.finish()
    assert facts(publisher)[-1] == ("partcount", {"count": 11, "kind": "all"})
    assert any("PLC not answering" in r.getMessage() for r in caplog.records)


async def test_unreachable_from_the_start_publishes_unavailable_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.modbus")
    nobody = Plc()  # never started: connection refused
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(nobody, MAIN_MAP)), publisher)
    await eventually(
        lambda: sum("still not answering" in r.getMessage() for r in caplog.records) >= 2
    )
    await running.finish()
    assert [kind for kind, _ in facts(publisher)] == ["availability", "condition"]
    assert of_kind(publisher, "availability") == [{"availability": "UNAVAILABLE"}]
    (condition,) = of_kind(publisher, "condition")
    assert condition["level"] == "unavailable"
    assert condition["native_code"] == CONNECTION_CODE
    assert condition["message"].startswith(f"Modbus TCP 127.0.0.1:{nobody.port} unit 1: ")


async def test_illegal_addresses_are_reported_and_the_rest_goes_on(
    plc: Plc, caplog: pytest.LogCaptureFixture
) -> None:
    registers = [
        {"address": 18, "meaning": "alarm_code"},
        # Right after the last holding register: read in one request with 18, which fails.
        {"address": 19, "type": "uint32", "meaning": "part_count"},
        {"address": 500, "meaning": "bad_count"},
        {"address": 1, "table": "coil", "type": "bool", "meaning": "running"},
    ]
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(plc, registers)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await plc.served(8)
    await plc.set("coil", 1, [True])  # the adapter still polls
    await eventually(lambda: of_kind(publisher, "execution")[-1] == {"execution": "ACTIVE"})
    await plc.set("holding", 18, [3])  # the good register of the failed range still works
    await eventually(
        lambda: any(c.get("native_code") == "3" for c in of_kind(publisher, "condition"))
    )
    await running.finish()

    warnings = [c for c in of_kind(publisher, "condition") if c["level"] == "warning"]
    assert len(warnings) == 2  # each bad register once, however many polls
    assert all(w["native_code"] == BAD_INPUT_CODE for w in warnings)
    messages = sorted(w["message"] for w in warnings)
    assert messages[0].startswith("register holding 19 (part_count): ")
    assert messages[1].startswith("register holding 500 (bad_count): ")
    assert all("exception 2 (illegal address)" in m for m in messages)
    assert of_kind(publisher, "partcount") == []
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("holding 500 (bad_count)" in line for line in logged)


async def test_a_negative_counter_is_reported_not_published(plc: Plc) -> None:
    await plc.set("holding", 0, [0xFFFF, 12])  # int16 -1
    registers = [
        {"address": 0, "type": "int16", "meaning": "bad_count"},
        {"address": 1, "meaning": "part_count"},
    ]
    publisher = InMemoryPublisher()
    running = Running(ModbusAdapter(config(plc, registers)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    await plc.served(5)
    await plc.set("holding", 0, [4])
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await running.finish()

    assert of_kind(publisher, "partcount") == [
        {"count": 12, "kind": "all"},
        {"count": 4, "kind": "bad"},
    ]
    reset, warning, cleared = of_kind(publisher, "condition")
    assert reset == {"level": "normal"}
    assert warning == {
        "level": "warning",
        "native_code": BAD_INPUT_CODE,
        "message": "register holding 0 (bad_count): a count cannot be negative, got -1",
    }
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    first_poll = [e.envelope for _, e in publisher.published[:4]]
    assert [e.type for e in first_poll][-1] == "mes.machine.condition.v1"
    assert len({e.time for e in first_poll}) == 1  # the warning too carries the poll's time


async def test_nan_and_fractional_values_are_reported(plc: Plc) -> None:
    await plc.set("holding", 0, [*float_words(math.nan), 5, 3])
    registers = [
        {"address": 0, "type": "float32", "meaning": "alarm_code"},
        {"address": 2, "scale": 0.5, "meaning": "part_count"},  # 2.5 parts
        {"address": 3, "meaning": "running"},
    ]
    events = await ModbusAdapter(config(plc, registers)).check()
    messages = sorted(
        e.data["message"] for e in events if e.data.get("native_code") == BAD_INPUT_CODE
    )
    assert messages == [
        "register holding 0 (alarm_code): the float32 value is nan",
        "register holding 2 (part_count): a count must be a whole number, got 2.5",
    ]
    assert {"execution": "ACTIVE"} in [e.data for e in events]


async def test_check_returns_the_state_without_publishing(plc: Plc) -> None:
    await plc.set("holding", 0, words32(5) + words32(1, "little") + [9])
    await plc.set("coil", 0, [True])
    adapter = ModbusAdapter(config(plc, MAIN_MAP))
    events = await adapter.check()
    assert [(e.type.split(".")[2], e.data) for e in events] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "ACTIVE"}),
        ("partcount", {"count": 5, "kind": "all"}),
        ("partcount", {"count": 1, "kind": "bad"}),
        ("condition", {"level": "normal"}),
        (
            "condition",
            {"level": "fault", "native_code": "9", "message": "alarm code 9 (register holding 4)"},
        ),
    ]
    # check() left no state behind: a run afterwards publishes the whole state itself.
    publisher = InMemoryPublisher()
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == len(events))
    await running.finish()
    assert [e.envelope.data for _, e in publisher.published] == [e.data for e in events]


async def test_check_of_an_unreachable_plc_raises() -> None:
    nobody = Plc()  # never started: connection refused
    with pytest.raises(ConnectionError, match=f"cannot connect to 127.0.0.1:{nobody.port}"):
        await ModbusAdapter(config(nobody, MAIN_MAP)).check()


@pytest.mark.parametrize(
    ("register", "field", "message"),
    [
        ({"address": 0, "type": "float64", "meaning": "part_count"}, "type", "Input should be"),
        (
            {"address": 0, "table": "coil", "type": "uint16", "meaning": "running"},
            "type",
            "must be 'bool'",
        ),
        (
            {"address": 0, "type": "uint16", "word_order": "little", "meaning": "part_count"},
            "word_order",
            "word_order applies to uint32",
        ),
        ({"address": 65535, "type": "uint32", "meaning": "part_count"}, "type", "runs past"),
        ({"address": 0, "type": "bool", "meaning": "part_count"}, "meaning", "numeric type"),
        ({"address": 0, "scale": 0, "meaning": "part_count"}, "scale", "scale 0"),
        ({"address": 0, "scale": "nan", "meaning": "part_count"}, "scale", "finite"),
        ({"address": 0, "meaning": "spindle_speed"}, "meaning", "Input should be"),
    ],
)
def test_a_bad_register_entry_names_its_field(
    register: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ModbusRegister.model_validate(register)
    (error,) = caught.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]


def test_a_meaning_given_twice_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        ModbusConfig.model_validate(
            {
                "machine_id": "M1",
                "host": "plc",
                "registers": [
                    {"address": 0, "meaning": "running"},
                    {"address": 1, "meaning": "running"},
                ],
            }
        )
    (error,) = caught.value.errors()
    assert error["loc"] == ("registers",)
    assert "'running' is given to more than one register" in error["msg"]


def test_the_config_file_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mes-hub.toml"
    path.write_text(
        '[[adapters.modbus]]\nmachine_id = "M1"\nhost = "plc"\n\n'
        '[[adapters.modbus.registers]]\naddress = 0\ntype = "float64"\nmeaning = "part_count"\n'
    )
    with pytest.raises(AdapterConfigError, match=r"'adapters\.modbus\.0\.registers\.0\.type'"):
        load_adapters(path)


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.modbus]]" in b)
    path = tmp_path / "mes-hub.toml"
    path.write_text(example)
    (entry,) = load_adapters(path).modbus
    assert {r.meaning for r in entry.registers} == {
        "running",
        "available",
        "part_count",
        "bad_count",
        "alarm_code",
    }
