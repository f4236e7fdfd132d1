"""The FOCAS adapter against the loopback FOCAS peer (``tests/focas_peer.py``), over real TCP."""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.focas import (
    EXECUTION_OF_RUN,
    GARBLED_SESSIONS_LOST,
    MODE_OF_AUT,
    RESPONSE,
    BadValue,
    Call,
    FocasAdapter,
    FocasConfig,
    Session,
    decode_answers,
    decode_macro,
    encode_request,
    program_name,
)
from contracts import CloudEvent
from hub.ports import InMemoryPublisher, PublishReceipt
from tests.adapter_harness import Running, facts, of_kind
from tests.conftest import eventually
from tests.focas_peer import VACANT, FocasPeer, PeerAlarm, macro_bytes

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "focas.md"


@pytest.fixture
async def peer() -> AsyncIterator[FocasPeer]:
    server = FocasPeer()
    await server.start()
    yield server
    await server.stop()


def config(peer: FocasPeer, **kwargs: Any) -> FocasConfig:
    values: dict[str, Any] = {
        "machine_id": "ROBODRILL-1",
        "host": "127.0.0.1",
        "port": peer.port,
        "poll_s": 0.02,
        "timeout_s": 0.5,
        "reconnect_max_s": 0.2,
    }
    return FocasConfig.model_validate({**values, **kwargs})


def warnings(publisher: InMemoryPublisher) -> list[str]:
    return [c["message"] for c in of_kind(publisher, "condition") if c["level"] == "warning"]


def test_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = FocasAdapter(FocasConfig(machine_id="M1", host="cnc"))
    assert adapter.protocol == "focas"
    assert FocasAdapter.protocol == "focas"


async def test_publishes_the_state_then_every_change_once(peer: FocasPeer) -> None:
    peer.set_count(41)
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    initial = [
        ("condition", {"level": "normal"}),
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O1234"}),
        ("partcount", {"count": 41, "kind": "all"}),
    ]
    await eventually(lambda: len(publisher.published) >= len(initial))
    await peer.served(10)
    assert facts(publisher) == initial  # ten more polls of the same state published nothing

    def execution(state: str, mode: str, program: str) -> tuple[str, dict[str, Any]]:
        return ("execution", {"execution": state, "mode": mode, "program": program})

    def condition(level: str, code: str, message: str | None = None) -> tuple[str, dict[str, Any]]:
        data = {"level": level, "native_code": code}
        return ("condition", {**data, "message": message} if message else data)

    overload = PeerAlarm(1010, 2, 0, "SPINDLE OVERLOAD")
    steps: list[tuple[str, Any, tuple[str, dict[str, Any]]]] = [
        ("run", 3, execution("ACTIVE", "AUTOMATIC", "O1234")),  # cycle start
        ("count", 42, ("partcount", {"count": 42, "kind": "all"})),
        ("run", 2, execution("FEED_HOLD", "AUTOMATIC", "O1234")),
        ("main_program", 5678, execution("FEED_HOLD", "AUTOMATIC", "O5678")),
        ("aut", 0, execution("FEED_HOLD", "MANUAL_DATA_INPUT", "O5678")),
        (
            "alarms",
            [overload],
            condition("fault", "2:1010", "SPINDLE OVERLOAD (alarm 1010, type 2)"),
        ),
        ("alarms", [], condition("normal", "2:1010")),
        ("emergency", 1, condition("fault", "EMERGENCY_STOP", "emergency stop")),
        ("emergency", 0, condition("normal", "EMERGENCY_STOP")),
        ("count", 0, ("partcount", {"count": 0, "kind": "all"})),  # the operator reset #3901
    ]
    for n, (knob, value, expected) in enumerate(steps, start=len(initial) + 1):
        if knob == "count":
            peer.set_count(value)
        else:
            setattr(peer, knob, value)
        await eventually(lambda n=n: len(publisher.published) >= n)
        await peer.served(3)
        assert facts(publisher)[-1] == expected
        assert len(publisher.published) == n, f"{knob} = {value} published more than one event"
    await running.finish()

    events = [e.envelope for _, e in publisher.published]
    assert all(e.subject == "ROBODRILL-1" for e in events)
    assert all(e.source == f"focas://127.0.0.1:{peer.port}" for e in events)
    assert len({e.id for e in events}) == len(events)
    # The poll's time: one poll, one time; later polls later.
    assert len({e.time for e in events[: len(initial)]}) == 1
    times = [e.time for e in events]
    assert times == sorted(times)


async def test_a_re_read_publishes_nothing_new(peer: FocasPeer) -> None:
    peer.run, peer.alarms = 3, [PeerAlarm(500, 4, 1, "OVER TRAVEL")]
    publisher = InMemoryPublisher()
    adapter = FocasAdapter(config(peer))
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == 5)
    first_poll = [e.envelope.id for _, e in publisher.published]
    await peer.served(20)
    await running.finish()
    # Twenty polls of the same state: the first poll's events, with their ids, and no other.
    assert [e.envelope.id for _, e in publisher.published] == first_poll
    # check() reads the same state once more: the same facts as the run's first poll.
    assert [e.data for e in await adapter.check()] == [d for _, d in facts(publisher)]

    # The same answers at the same poll time make the same events, ids included, in any run:
    # an event sent twice is a duplicate downstream.
    session = Session(adapter.config)
    await session.open()
    try:
        answers = await session.call(adapter.calls)
    finally:
        await session.close()
    at = datetime.now(UTC)
    once = adapter.changes(adapter._new_run(), answers, at)
    again = adapter.changes(adapter._new_run(), answers, at)
    assert [e.id for e in again] == [e.id for e in once] and len(once) == 5
    later = adapter.changes(adapter._new_run(), answers, at + timedelta(seconds=1))
    assert not {e.id for e in later} & {e.id for e in once}  # another poll, other facts


async def test_run_mode_and_program_changed_in_one_poll_make_one_event(peer: FocasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    # Between two polls: MDI selected, a cycle started, another main program (no await in
    # between: the peer answers all three in the same poll).
    peer.aut, peer.run, peer.main_program = 0, 3, 777
    await eventually(lambda: len(publisher.published) >= 5)
    await peer.served(5)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "MANUAL_DATA_INPUT", "program": "O0777"})
    ]  # not READY with MDI, nor ACTIVE with the old program: states the machine never had


@pytest.mark.parametrize(
    ("aut", "run", "mode", "execution"),
    [
        (1, 3, "AUTOMATIC", "ACTIVE"),  # MEM, STaRT: a program in cycle
        (1, 2, "AUTOMATIC", "FEED_HOLD"),  # MEM, HOLD
        (1, 1, "AUTOMATIC", "STOPPED"),  # MEM, STOP (a single block end, M00)
        (1, 0, "AUTOMATIC", "READY"),  # MEM, reset
        (0, 3, "MANUAL_DATA_INPUT", "ACTIVE"),  # MDI, STaRT
        (3, 0, "EDIT", "READY"),  # EDIT
        (4, 4, "MANUAL", "ACTIVE"),  # HND, MSTR (a manual numerical command)
        (5, 0, "MANUAL", "READY"),  # JOG
        (9, 0, "MANUAL", "READY"),  # REF: reference return
        (10, 3, "AUTOMATIC", "ACTIVE"),  # RMT: DNC operation
        (2, 0, None, "READY"),  # ****: no mode selected
    ],
)
async def test_mode_and_execution_worked_examples(
    peer: FocasPeer, aut: int, run: int, mode: str | None, execution: str
) -> None:
    peer.aut, peer.run = aut, run
    events = await FocasAdapter(config(peer)).check()
    (data,) = [e.data for e in events if e.type == "mes.machine.execution.v1"]
    assert data.get("mode") == mode
    assert data["execution"] == execution
    assert MODE_OF_AUT[aut] == mode and EXECUTION_OF_RUN[run] == execution


@pytest.mark.parametrize(
    ("mantissa", "decimals", "base", "count"),
    [
        (25, 0, 10, 25),  # 25.
        (25_000_000, 6, 10, 25),  # 25.000000: how a 30i sends #3901
        (1_200, 2, 10, 12),  # 12.00
        (12, 2, 2, 3),  # 12 / 2**2
        (0, 0, 10, 0),
        (2_147_483_647, 0, 10, 2_147_483_647),  # the largest mantissa
    ],
)
def test_macro_decoding_worked_examples(
    mantissa: int, decimals: int, base: int, count: int
) -> None:
    assert decode_macro(macro_bytes(mantissa, decimals, base)) == count


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (macro_bytes(12_345, 3, 10), "a count must be a whole number, got 12.345"),
        (macro_bytes(-3, 0, 10), "a count cannot be negative, got -3"),
        (macro_bytes(-3_000, 3, 10), "a count cannot be negative, got -3"),
        (VACANT, "the macro variable is vacant (<empty>)"),
        (macro_bytes(12, 0, 16), "the macro value has base 16, not 10 or 2"),
        (b"\x00" * 7, "a macro value is 8 bytes, not 7"),
    ],
)
def test_macro_values_that_are_no_count(raw: bytes, reason: str) -> None:
    with pytest.raises(BadValue, match=re.escape(reason)):
        decode_macro(raw)


async def test_a_counter_with_decimals_and_a_bad_counter(peer: FocasPeer) -> None:
    peer.set_count(7, decimals=6)  # 7000000 with 6 decimals
    peer.macros[3902] = macro_bytes(2_500, 3)  # 2.5: not a count
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer, bad_count_macro=3902)), publisher)
    await eventually(lambda: len(warnings(publisher)) == 1)
    await peer.served(10)
    assert warnings(publisher) == [
        "macro #3902 (bad_count_macro): a count must be a whole number, got 2.5"
    ]  # once, however many polls
    first_poll = [e.envelope for _, e in publisher.published[:5]]
    assert first_poll[-1].data["native_code"] == BAD_INPUT_CODE
    assert len({e.time for e in first_poll}) == 1  # the warning too carries the poll's time
    peer.macros[3902] = macro_bytes(3_000, 3)  # 3.000
    await eventually(
        lambda: (
            {"level": "normal", "native_code": BAD_INPUT_CODE} in of_kind(publisher, "condition")
        )
    )
    await running.finish()
    assert of_kind(publisher, "partcount") == [
        {"count": 7, "kind": "all"},
        {"count": 3, "kind": "bad"},
    ]


async def test_replies_split_byte_by_byte_still_decode(peer: FocasPeer) -> None:
    peer.run, peer.alarms = 3, [PeerAlarm(1010, 2, 0, "SPINDLE OVERLOAD"), PeerAlarm(7, 6)]
    peer.set_count(12)
    whole = [e.data for e in await FocasAdapter(config(peer)).check()]
    peer.write_size = 1  # every byte of every reply its own TCP write
    split = [e.data for e in await FocasAdapter(config(peer)).check()]
    assert split == whole
    assert {"level": "fault", "native_code": "6:7"} in split  # an alarm without text
    peer.write_size = 7  # pieces that cut the header and the blocks anywhere
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == len(whole))
    await peer.served(5)
    peer.set_count(13)
    await eventually(lambda: of_kind(publisher, "partcount")[-1] == {"count": 13, "kind": "all"})
    await running.finish()
    assert warnings(publisher) == []


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("magic", "a reply starts with a1 a1 a1 a1, not a0 a0 a0 a0"),
        # The announced length 3 bytes short: the last block no longer fits in it.
        ("length", "the block of cnc_rdalmmsg says 16 bytes"),
        ("noise", "a reply starts with 48 54 54 50, not a0 a0 a0 a0"),
        ("type", "a request was answered with frame type 0x2103"),
    ],
)
async def test_a_broken_reply_is_bad_input_and_the_session_is_opened_again(
    peer: FocasPeer, kind: Any, reason: str
) -> None:
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    await peer.served(2)
    sessions = peer.sessions
    peer.garbage(kind)
    await eventually(lambda: len(warnings(publisher)) == 1)
    await eventually(lambda: peer.sessions > sessions)  # opened again
    peer.run = 3
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await eventually(
        lambda: (
            of_kind(publisher, "condition")[-1]
            == {"level": "normal", "native_code": BAD_INPUT_CODE}
        )
    )
    await running.finish()
    (warning,) = warnings(publisher)
    assert warning.startswith("reply not understood: ") and reason in warning
    # The control still answered: no loss was published.
    assert of_kind(publisher, "availability") == [{"availability": "AVAILABLE"}]


async def test_a_call_the_control_refuses_is_named(peer: FocasPeer) -> None:
    peer.call_errors[0x23] = 6  # EW_NOOPT: no alarm message option
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(warnings(publisher)) == 1)
    peer.run = 3  # the other calls go on
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await running.finish()
    assert warnings(publisher) == ["cnc_rdalmmsg: the control answered EW_NOOPT (6, detail 0)"]


async def test_alarms_from_the_status_flag(peer: FocasPeer) -> None:
    """statinfo's ``alarm``: ALarM (1) and the PMC alarm (8) are faults; battery, fan and the
    other warnings (2 to 7) are warnings; one value replaces the one before."""
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer, alarms="flag")), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    expected = [
        (2, [("warning", "BATTERY_LOW", "alarm status 2 (BATtery low)")]),
        (1, [("normal", "BATTERY_LOW", None), ("fault", "CNC_ALARM", "alarm status 1 (ALarM)")]),
        (8, [("normal", "CNC_ALARM", None), ("fault", "PMC_ALARM", "alarm status 8 (PMC alarm)")]),
        (0, [("normal", "PMC_ALARM", None)]),
    ]
    seen = 1  # the first poll's clearing normal
    for value, conditions in expected:
        peer.alarm = value
        seen += len(conditions)
        await eventually(lambda seen=seen: len(of_kind(publisher, "condition")) >= seen)
        await peer.served(3)
        published = of_kind(publisher, "condition")
        assert len(published) == seen, f"alarm {value}: {published}"
        assert [
            (c["level"], c["native_code"], c.get("message")) for c in published[-len(conditions) :]
        ] == conditions
    await running.finish()


async def test_dropped_unavailable_once_then_back(
    peer: FocasPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.focas")
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    peer.refuse_sessions = True  # from now on, every session is refused
    peer.drop()
    await eventually(lambda: len(publisher.published) == 6)

    def retries() -> int:
        return sum("still not answering" in r.getMessage() for r in caplog.records)

    await eventually(lambda: retries() >= 3)  # three failed reconnects: still one UNAVAILABLE
    unavailable, lost = facts(publisher)[4:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert lost[1]["level"] == "unavailable" and lost[1]["native_code"] == CONNECTION_CODE
    # "the control closed the connection …", or "connection lost (ConnectionResetError …)"
    # when the next request was written after the peer had gone.
    assert re.match(rf"FOCAS 127\.0\.0\.1:{peer.port}: (the control closed|connection lost)",
                    lost[1]["message"])  # fmt: skip
    assert any("every FOCAS session is in use" in r.getMessage() for r in caplog.records)

    peer.set_count(5)  # parts made while the adapter could not read them
    peer.refuse_sessions = False
    await eventually(lambda: len(publisher.published) == 9)
    await running.finish()
    assert facts(publisher)[6:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("partcount", {"count": 5, "kind": "all"}),
    ]


async def test_a_hung_control_is_lost_after_the_timeout(peer: FocasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    peer.hang()
    await eventually(lambda: len(publisher.published) == 6)
    assert of_kind(publisher, "condition")[-1]["message"].endswith("no answer within 0.5 s")
    peer.run = 3
    peer.resume()
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await running.finish()
    assert [a["availability"] for a in of_kind(publisher, "availability")] == [
        "AVAILABLE",
        "UNAVAILABLE",
        "AVAILABLE",
    ]


async def test_unreachable_from_the_start_publishes_unavailable_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.focas")
    nobody = FocasPeer()
    await nobody.start()
    await nobody.stop()  # a port that was free a moment ago: connection refused
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(nobody)), publisher)
    await eventually(
        lambda: sum("still not answering" in r.getMessage() for r in caplog.records) >= 2
    )
    await running.finish()
    assert [kind for kind, _ in facts(publisher)] == ["availability", "condition"]
    (condition,) = of_kind(publisher, "condition")
    assert condition["native_code"] == CONNECTION_CODE
    assert condition["message"].startswith(f"FOCAS 127.0.0.1:{nobody.port}: cannot connect")
    with pytest.raises(ConnectionError, match="cannot connect"):
        await FocasAdapter(config(nobody)).check()


async def test_reconnects_wait_first_then_double_as_the_log_says(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The waits are recorded, not slept: the order of wait and doubling is the logic tested.
    nobody = FocasPeer()
    await nobody.start()
    await nobody.stop()  # connection refused
    waits: list[float] = []
    stop = asyncio.Event()

    async def recorded(_: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 6:
            stop.set()
        await asyncio.sleep(0)
        return stop.is_set()

    monkeypatch.setattr("adapters.machines.focas.stopped", recorded)
    caplog.set_level(logging.WARNING, logger="adapters.machines.focas")
    adapter = FocasAdapter(config(nobody, reconnect_max_s=2.0))
    await asyncio.wait_for(adapter.run(InMemoryPublisher(), stop), 10)
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "reconnecting from 0.25 s up to 2.0 s apart" in warning


async def test_an_ipv6_host_is_bracketed_in_the_loss() -> None:
    nobody = FocasPeer()
    await nobody.start()
    await nobody.stop()  # its port, on ::1 too: nothing listens (or no IPv6 at all)
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(nobody, host="::1")), publisher)
    await eventually(lambda: len(publisher.published) == 2)
    await running.finish()
    (condition,) = of_kind(publisher, "condition")
    where = f"[::1]:{nobody.port}"
    assert condition["message"].startswith(f"FOCAS {where}: cannot connect to {where} (")


def test_an_empty_host_is_an_error() -> None:
    with pytest.raises(ValidationError) as caught:
        FocasConfig(machine_id="M1", host="")
    (error,) = caught.value.errors()
    assert error["loc"] == ("host",) and error["type"] == "string_too_short"


def test_a_bad_entry_names_its_field() -> None:
    with pytest.raises(ValidationError) as caught:
        FocasConfig.model_validate({"machine_id": "M1", "host": "cnc", "part_count_macro": 0})
    (error,) = caught.value.errors()
    assert error["loc"] == ("part_count_macro",)
    with pytest.raises(ValidationError, match="both #3901"):
        FocasConfig.model_validate({"machine_id": "M1", "host": "cnc", "bad_count_macro": 3901})


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ('machine_id = "M 1"\nhost = "cnc"', "adapters.focas.0.machine_id", "pattern"),
        ('machine_id = "M1"', "adapters.focas.0.host", "Field required"),
        ('machine_id = "M1"\nhost = "cnc"\nport = 99999', "adapters.focas.0.port", "less than"),
        (
            'machine_id = "M1"\nhost = "cnc"\nalarms = "all"',
            "adapters.focas.0.alarms",
            "'messages'",
        ),
        ('machine_id = "M1"\nhost = "cnc"\npassword = "x"', "adapters.focas.0.password", "Extra"),
    ],
)
def test_the_config_file_error_names_file_key_and_reason(
    tmp_path: Path, entry: str, key: str, reason: str
) -> None:
    path = tmp_path / "mes-hub.toml"
    path.write_text(f"[[adapters.focas]]\n{entry}\n")
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert str(path) in text and f"'{key}'" in text and reason in text


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.focas]]" in b)
    path = tmp_path / "mes-hub.toml"
    path.write_text(example)
    (entry,) = load_adapters(path).focas
    assert entry.part_count_macro == 3901


def test_the_documented_mapping_is_the_code(tmp_path: Path) -> None:
    """The doc's tables of ``aut`` and ``run`` values are the ones the adapter uses."""
    text = DOC.read_text()
    aut = dict(re.findall(r"^\| `aut` (\d+) \| [^|]+ \| (\w+) \|", text, flags=re.MULTILINE))
    run = dict(re.findall(r"^\| `run` (\d+) \| [^|]+ \| (\w+) \|", text, flags=re.MULTILINE))
    assert {int(k): (None if v == "none" else v) for k, v in aut.items()} == MODE_OF_AUT
    assert {int(k): v for k, v in run.items()} == EXECUTION_OF_RUN


def test_frames_as_the_notes_show_them() -> None:
    """pyfanuc's README: the request header and one statinfo block, byte for byte."""
    from adapters.machines.focas import Call, encode_request

    request = encode_request([Call(0x19)])
    assert request[:10] == bytes.fromhex("a0a0a0a0 0001 2101 001e".replace(" ", ""))
    assert request[10:18] == bytes.fromhex("0001 001c 0001 0001".replace(" ", ""))
    assert request[18:20] == struct.pack(">H", 0x19) and len(request) == 10 + 0x1E


async def test_the_same_number_in_two_alarm_types_is_two_conditions(peer: FocasPeer) -> None:
    """The hub keys a machine's conditions by native code: ``<type>:<number>`` keeps an alarm
    100 of type 0 apart from an alarm 100 of type 4."""
    peer.alarms = [PeerAlarm(100, 0, 0, "PARAMETER WRITE ENABLE"), PeerAlarm(100, 4, 1, "OT")]
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    peer.alarms = peer.alarms[1:]  # the type-0 alarm is reset, the over-travel stays
    await eventually(lambda: len(of_kind(publisher, "condition")) == 4)
    await peer.served(5)
    await running.finish()
    assert of_kind(publisher, "condition")[1:] == [
        {
            "level": "fault",
            "native_code": "0:100",
            "message": "PARAMETER WRITE ENABLE (alarm 100, type 0)",
        },
        {"level": "fault", "native_code": "4:100", "message": "OT (alarm 100, type 4)"},
        {"level": "normal", "native_code": "0:100"},
    ]  # and no normal for 4:100: it is still active


async def test_two_counters_failing_differently_warn_once_each(peer: FocasPeer) -> None:
    peer.macros[3902] = macro_bytes(0, 0)
    peer.macro_errors = {3901: 3, 3902: 4}  # EW_NUMBER, EW_ATTRIB
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer, bad_count_macro=3902)), publisher)
    await eventually(lambda: len(warnings(publisher)) == 2)
    await peer.served(10)
    await running.finish()
    assert sorted(warnings(publisher)) == [
        "cnc_rdmacro #3901: the control answered EW_NUMBER (3, detail 0)",
        "cnc_rdmacro #3902: the control answered EW_ATTRIB (4, detail 0)",
    ]  # once each, however many polls


async def test_statinfo_in_another_layout_is_bad_input(peer: FocasPeer) -> None:
    """A 30i-style ODBST (``hdck`` and ``tmmode`` first, 18 bytes) read as the 14-byte one
    would put every field two places off: it is refused, the other calls go on."""
    peer.statinfo_30i = True
    peer.run = 3
    peer.set_count(9)
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(warnings(publisher)) == 1)
    await eventually(lambda: len(of_kind(publisher, "partcount")) == 1)
    await peer.served(5)
    await running.finish()
    assert warnings(publisher) == ["cnc_statinfo answered 18 bytes, not 14"]
    assert of_kind(publisher, "execution") == []  # no execution made up from the wrong fields
    assert of_kind(publisher, "partcount") == [{"count": 9, "kind": "all"}]


async def test_a_control_whose_replies_are_never_understood_is_lost(peer: FocasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    sessions = peer.sessions
    peer.garbage("magic", replies=None)  # every reply from now on
    await eventually(lambda: len(of_kind(publisher, "availability")) == 2)
    await eventually(lambda: peer.sessions >= sessions + GARBLED_SESSIONS_LOST + 2)
    peer.clean()
    await eventually(lambda: len(of_kind(publisher, "availability")) == 3)
    await eventually(
        lambda: (
            of_kind(publisher, "condition")[-1]
            == {"level": "normal", "native_code": BAD_INPUT_CODE}
        )
    )
    await running.finish()
    assert [a["availability"] for a in of_kind(publisher, "availability")] == [
        "AVAILABLE",
        "UNAVAILABLE",  # once, however many sessions after the third
        "AVAILABLE",
    ]
    conditions = of_kind(publisher, "condition")[1:]
    assert [(c["level"], c["native_code"]) for c in conditions] == [
        ("warning", BAD_INPUT_CODE),
        ("unavailable", CONNECTION_CODE),
        ("normal", CONNECTION_CODE),
        ("normal", BAD_INPUT_CODE),
    ]
    assert conditions[1]["message"] == (
        f"FOCAS 127.0.0.1:{peer.port}: no reply understood in {GARBLED_SESSIONS_LOST} sessions "
        "in a row (a reply starts with a1 a1 a1 a1, not a0 a0 a0 a0)"
    )


class Refusing(InMemoryPublisher):
    """Refuses every batch while ``down`` (NATS and its disk buffer failing), counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused: list[int] = []  # the size of each batch refused

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        if self.down:
            self.refused.append(len(events))
            raise ConnectionError("nats: no servers available")
        return await super().publish_many(events)


async def test_a_publish_that_fails_is_found_again_by_the_next_poll(peer: FocasPeer) -> None:
    publisher = Refusing()
    running = Running(FocasAdapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    publisher.down = True
    for run in 3, 2, 3:  # cycle start, feed hold, cycle start, each seen by a poll
        refused = len(publisher.refused)
        peer.run = run
        await eventually(lambda refused=refused: len(publisher.refused) >= refused + 2)
    refused = len(publisher.refused)
    peer.set_count(1)
    await eventually(lambda: len(publisher.refused) >= refused + 2)
    # Each poll offers what changed against what was published, no more: nothing piles up.
    assert max(publisher.refused) == 2, publisher.refused
    back = datetime.now(UTC)
    publisher.down = False
    await eventually(lambda: len(publisher.published) >= 6)
    await peer.served(5)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O1234"}),
        ("partcount", {"count": 1, "kind": "all"}),
    ]  # once each, with the time of the poll that published them
    assert all(e.envelope.time >= back for _, e in publisher.published[4:])


async def test_an_unexpected_failure_is_a_loss_and_the_adapter_recovers(
    peer: FocasPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = FocasAdapter(config(peer))
    changes = adapter.changes
    failures = [RuntimeError("a bug")]

    def failing_once(*args: Any) -> list[CloudEvent]:
        if failures:
            raise failures.pop()
        return changes(*args)

    monkeypatch.setattr(adapter, "changes", failing_once)
    publisher = InMemoryPublisher()
    running = Running(adapter, publisher)
    await eventually(lambda: len(of_kind(publisher, "execution")) == 1)
    await running.finish()
    assert [k for k, _ in facts(publisher)][:2] == ["availability", "condition"]
    lost = of_kind(publisher, "condition")[0]
    assert lost["level"] == "unavailable" and lost["native_code"] == CONNECTION_CODE
    assert lost["message"] == f"FOCAS 127.0.0.1:{peer.port}: session failed (RuntimeError: a bug)"
    assert of_kind(publisher, "availability") == [
        {"availability": "UNAVAILABLE"},
        {"availability": "AVAILABLE"},
    ]


# diohpix/pyfanuc, sample_with_error.md (commit b7b199dd49e5d9160d4b3dc8a447c49b146bff22): a
# request of nine calls to a real control and its answer, byte for byte as published there
# (one line per field as there, the notes' comments left out). Two calls were refused: 0x25
# with error 1, the last 0x26 with error 6.
SAMPLE_REQUEST = """
a0 a0 a0 a0 00 01 21 01
00 fe
00 09
00 1c
00 01 00 01 00 1a 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 1c 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 1d 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 24 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 25 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 26 00 00 00 04 ff ff ff ff 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 26 00 00 00 01 ff ff ff ff 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 26 00 00 00 06 ff ff ff ff 00 00 00 00 00 00 00 00 00 00 00 00
00 1c
00 01 00 01 00 26 00 00 00 07 ff ff ff ff 00 00 00 00 00 00 00 00 00 00 00 00
"""
SAMPLE_RESPONSE = """
a0 a0 a0 a0 00 02 21 02
01 6a
00 09
00 14
00 01 00 01 00 1a 00 00 00 00 00 00
00 04
00 00 00 00
00 18
00 01 00 01 00 1c 00 00 00 00 00 00
00 08
00 00 0b b8 00 00 0b b8
00 14
00 01 00 01 00 1d 00 00 00 00 00 00
00 04
00 00 00 00
00 18
00 01 00 01 00 24 00 00 00 00 00 00
00 08
00 00 00 00 00 0a 00 04
00 10
00 01 00 01 00 25 00 01 00 00 00 00 00 00
00 50
00 01 00 01 00 26 00 00 00 00 00 00
00 40
00 2f 7a e9 00 0a 00 04 00 02 bc 02 00 0a 00 04
00 00 00 00 00 0a 00 04 00 00 00 00 00 0a 00 04
ff ec ed 30 00 0a 00 04 00 36 ee 80 00 0a 00 04
00 00 00 00 00 0a 00 04 00 00 00 00 00 0a 00 04
00 50
00 01 00 01 00 26 00 00 00 00 00 00
00 40
ff fd b0 bd 00 0a 00 04 ff ed 51 11 00 0a 00 04
ff ff f7 ad 00 0a 00 04 ff ff ff 9d 00 0a 00 04
ff ec ed 30 00 0a 00 04 00 32 2a 47 00 0a 00 04
00 00 00 00 00 0a 00 04 00 00 00 00 00 0a 00 04
00 50
00 01 00 01 00 26 00 00 00 00 00 00
00 40
00 16 d1 05 00 0a 00 04 00 04 78 0b 00 0a 00 04
ff ff fe 62 00 0a 00 04 00 00 10 af 00 0a 00 04
00 0a e5 67 00 0a 00 04 e4 18 b6 0e 00 0a 00 04
00 00 00 00 00 0a 00 04 00 00 00 00 00 0a 00 04
00 10
00 01 00 01 00 26 00 06 00 00 00 00 00 00
"""


def test_a_published_capture_decodes_through_our_client() -> None:
    """pyfanuc's captured request is what our encoder writes for the same calls, and its
    captured answer decodes: the data of each call, and the two errors with no data."""
    calls = [Call(0x1A), Call(0x1C), Call(0x1D), Call(0x24), Call(0x25)] + [
        Call(0x26, (kind, -1, 0, 0, 0)) for kind in (4, 1, 6, 7)
    ]
    assert encode_request(calls) == bytes.fromhex(SAMPLE_REQUEST)
    response = bytes.fromhex(SAMPLE_RESPONSE)
    magic, _version, frame_type, length = struct.unpack_from(">4sHHH", response)
    assert (magic, frame_type, length) == (b"\xa0" * 4, RESPONSE, len(response) - 10)
    answers = decode_answers(response[10:], calls)
    assert [(a.error, len(a.data)) for a in answers] == [
        (0, 4), (0, 8), (0, 4), (0, 8), (1, 0), (0, 64), (0, 64), (0, 64), (6, 0)
    ]  # fmt: skip
    assert answers[4].error_text() == "EW_FUNC (1, detail 0)"
    assert answers[8].error_text() == "EW_NOOPT (6, detail 0)"
    _running, main = struct.unpack(">ii", answers[1].data)
    assert program_name(main) == "O3000"  # "running and main O3000", as the notes say
    # A broken copy of it is refused, never half read.
    with pytest.raises(ValueError, match="says 0 data bytes and holds 4"):
        decode_answers(
            response[10:].replace(
                bytes.fromhex("0004 0000 0000"), bytes.fromhex("0000 0000 0000"), 1
            ),
            calls,
        )
