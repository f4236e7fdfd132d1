"""The serial status-line adapter against a fake machine on a pseudo-terminal
(``tests.serial_peer``): real pyserial, a real pty, the adapter's real reading loop."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.machines import serial_line
from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.serial_line import SerialConfig, SerialLineAdapter, SerialLineParser
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running, facts
from tests.conftest import eventually
from tests.serial_peer import SerialMachine

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "serial.md"
PATTERNS: list[dict[str, Any]] = [
    {"match": r"^CYCLE START$", "meaning": "execution", "value": "ACTIVE"},
    {
        "match": r"^(?P<execution>FEED HOLD|STOP|RESET|EXEC \w+)$",
        "meaning": "execution",
        "values": {"FEED HOLD": "FEED_HOLD", "STOP": "STOPPED", "RESET": "READY"},
    },
    {"match": r"^M30$", "meaning": "execution", "value": "PROGRAM_COMPLETED"},
    {"match": r"^PART COMPLETE (?P<count>\S+)$", "meaning": "part_count"},
    {"match": r"^REJECT (?P<count>\S+)$", "meaning": "bad_part_count"},
    {"match": r"^PROGRAM (?P<program>\S+)$", "meaning": "program"},
    {"match": r"^ALARM CLEAR(?: (?P<code>\d+))?$", "meaning": "condition_clear"},
    {"match": r"^ALARM (?P<code>\d+) (?P<text>.+)$", "meaning": "condition", "level": "fault"},
]


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SerialMachine]:
    peer = SerialMachine(tmp_path / "ttyCNC")
    yield peer
    peer.close()


def config(link: Path, **kwargs: Any) -> SerialConfig:
    return SerialConfig.model_validate(
        {
            "machine_id": "LATHE-3",
            "port": str(link),
            "baudrate": 9600,
            "patterns": PATTERNS,
            "reconnect_max_s": 0.1,
            **kwargs,
        }
    )


def inputs(publisher: InMemoryPublisher) -> list[dict[str, Any]]:
    conditions = [d for k, d in facts(publisher) if k == "condition"]
    return [d for d in conditions if d.get("native_code") == BAD_INPUT_CODE]


def test_adapter_satisfies_the_port(tmp_path: Path) -> None:
    adapter: MachineAdapter = SerialLineAdapter(config(tmp_path / "ttyX"))
    assert adapter.protocol == SerialLineAdapter.protocol == "serial"


async def test_each_meaning_arrives_once_with_the_time_its_line_ended(
    machine: SerialMachine,
) -> None:
    publisher = InMemoryPublisher()
    running = Running(SerialLineAdapter(config(machine.link)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)  # the port is open: AVAILABLE

    # (line printed, what it publishes): worked examples of every meaning.
    steps: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = [
        # A program before any execution goes with the first execution.
        ("PROGRAM O1234", []),
        ("CYCLE START", [("execution", {"execution": "ACTIVE", "program": "O1234"})]),
        ("PART COMPLETE 0041", [("partcount", {"count": 41, "kind": "all"})]),
        ("PART COMPLETE 0042", [("partcount", {"count": 42, "kind": "all"})]),
        ("PART COMPLETE 0042", []),  # printed again: the same count, nothing new
        ("REJECT 3", [("partcount", {"count": 3, "kind": "bad"})]),
        ("FEED HOLD", [("execution", {"execution": "FEED_HOLD", "program": "O1234"})]),
        ("ALARM 1020 SPINDLE OVERLOAD",
         [("condition", {"level": "fault", "native_code": "1020", "message": "SPINDLE OVERLOAD"})]),
        ("ALARM CLEAR 1020", [("condition", {"level": "normal", "native_code": "1020"})]),
        ("PROGRAM O2000", [("execution", {"execution": "FEED_HOLD", "program": "O2000"})]),
        ("M30", [("execution", {"execution": "PROGRAM_COMPLETED", "program": "O2000"})]),
        ("HELLO OPERATOR", []),  # matches no pattern: ignored
        ("RESET", [("execution", {"execution": "READY", "program": "O2000"})]),
    ]  # fmt: skip
    expected = [("availability", {"availability": "AVAILABLE"})]
    for line, publishes in steps:
        before = datetime.now(UTC)
        machine.print(line)
        expected += publishes
        # A line that publishes nothing is followed by one that does: that it arrived alone
        # shows the first published nothing (the port delivers in order).
        await eventually(lambda: len(publisher.published) >= len(expected))
        after = datetime.now(UTC)
        for _, event in publisher.published[len(expected) - len(publishes) :]:
            assert before <= event.envelope.time <= after
        assert facts(publisher) == expected, line
    await running.finish()
    events = [e.envelope for _, e in publisher.published]
    assert {e.subject for e in events} == {"LATHE-3"}
    assert {e.source for e in events} == {f"serial://{machine.link}"}
    assert len({e.id for e in events}) == len(events)


def test_the_same_line_read_at_the_same_moment_is_the_same_event(tmp_path: Path) -> None:
    at = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    lines = b"CYCLE START\r\nPART COMPLETE 7\r\nALARM 12 DOOR OPEN\r\n"
    first, second = (SerialLineParser(config(tmp_path / "t")) for _ in range(2))
    ids = [[e.id for e in parser.feed(lines, at)] for parser in (first, second)]
    assert len(ids[0]) == 3 and ids[0] == ids[1]
    # Read together, the same text twice is two readings: nothing is dropped as a duplicate.
    again = SerialLineParser(config(tmp_path / "t"))
    events = again.feed(b"CYCLE START\r\nFEED HOLD\r\nCYCLE START\r\n", at)
    assert [e.data["execution"] for e in events] == ["ACTIVE", "FEED_HOLD", "ACTIVE"]
    assert len({e.id for e in events}) == 3
    # The same text at another moment is another reading (of a count that did not change).
    line = b"PART COMPLETE 8\r\n"
    assert first.feed(line, at)[0].id != second.feed(line, at.replace(minute=1))[0].id


async def test_a_value_the_pattern_cannot_use_is_a_warning_and_reading_goes_on(
    machine: SerialMachine,
) -> None:
    publisher = InMemoryPublisher()
    running = Running(SerialLineAdapter(config(machine.link)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)
    machine.print("PART COMPLETE 12X", "EXEC RUNNING", f"PART COMPLETE {2**64}")
    await eventually(lambda: len(inputs(publisher)) == 3)
    messages = [d["message"] for d in inputs(publisher)]
    assert "'12X' is not a whole number" in messages[0]
    assert "execution 'EXEC RUNNING' is not valid" in messages[1]
    assert "beyond any counter" in messages[2]
    assert all(d["level"] == "warning" for d in inputs(publisher))
    machine.print("PART COMPLETE 13")
    await eventually(lambda: ("partcount", {"count": 13, "kind": "all"}) in facts(publisher))
    await running.finish()


async def test_noise_is_one_warning_per_burst(machine: SerialMachine) -> None:
    publisher = InMemoryPublisher()
    running = Running(SerialLineAdapter(config(machine.link)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)
    # A wrong baud rate: bytes ASCII does not have, control characters, many "lines" of them.
    burst = bytes(range(0x80, 0x100)) + b"\r\n\x01\x02\x1b[\r\n\xfe\xff\xfa\r\n" * 20
    machine.send(burst)
    machine.print("PART COMPLETE 5")  # a clean line ends the burst
    await eventually(lambda: ("partcount", {"count": 5, "kind": "all"}) in facts(publisher))
    assert len(inputs(publisher)) == 1
    assert "noise on the line" in inputs(publisher)[0]["message"]
    # Another burst, longer than any line: one warning (what follows the junk on its line is
    # dropped with it, however the port splits the bytes; the next line is read).
    machine.send(b"\xff" * 5000)
    machine.print("PART COMPLETE 99", "PART COMPLETE 6")
    await eventually(lambda: ("partcount", {"count": 6, "kind": "all"}) in facts(publisher))
    assert len(inputs(publisher)) == 2
    assert ("partcount", {"count": 99, "kind": "all"}) not in facts(publisher)
    # Tape leader and flow-control bytes are not noise.
    machine.send(b"\x00\x00\x11PART COMPLETE 7\x13\r\n")
    await eventually(lambda: ("partcount", {"count": 7, "kind": "all"}) in facts(publisher))
    assert len(inputs(publisher)) == 2
    await running.finish()


def test_the_tail_of_an_endless_line_is_never_a_reading(tmp_path: Path) -> None:
    at = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    parser = SerialLineParser(config(tmp_path / "t"))
    # Longer than a line and no end yet: one warning; then the same line goes on and ends.
    (warning,) = parser.feed(b"\xff" * (serial_line.MAX_LINE + 1), at)
    assert warning.data["native_code"] == BAD_INPUT_CODE
    assert parser.feed(b"PART COMPLETE 99\r\n", at) == []  # the endless line's tail
    (count,) = parser.feed(b"PART COMPLETE 6\r\n", at)
    assert count.data == {"count": 6, "kind": "all"}
    # A clean endless line (no junk in it) is noise all the same.
    parser.feed(b"A" * (serial_line.MAX_LINE + 1), at)
    assert parser.feed(b"AAA PART COMPLETE 98\r\nPART COMPLETE 7\r\n", at)[0].data == {
        "count": 7,
        "kind": "all",
    }


@pytest.mark.parametrize("split", [1, 100, 4096, 4097, 5000, 5001, 5017, 5018])
def test_how_the_port_splits_an_endless_line_changes_nothing(tmp_path: Path, split: int) -> None:
    at = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    data = b"\xff" * 5000 + b"PART COMPLETE 99\r\nPART COMPLETE 6\r\n"
    parser = SerialLineParser(config(tmp_path / "t"))
    events = parser.feed(data[:split], at) + parser.feed(data[split:], at)
    assert [e.data.get("native_code") or e.data.get("count") for e in events] == [
        BAD_INPUT_CODE,
        6,
    ]


def test_unmatched_lines_can_be_reported(tmp_path: Path) -> None:
    at = datetime.now(UTC)
    ignoring = SerialLineParser(config(tmp_path / "t"))
    warning = SerialLineParser(config(tmp_path / "t", unmatched="warn"))
    assert ignoring.feed(b"HELLO\n", at) == []
    (event,) = warning.feed(b"HELLO\n", at)
    assert event.data["native_code"] == BAD_INPUT_CODE and "no pattern" in event.data["message"]


async def test_the_port_disappearing_is_unavailable_once_and_a_new_device_recovers(
    machine: SerialMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = InMemoryPublisher()
    adapter = SerialLineAdapter(config(machine.link))
    running = Running(adapter, publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)
    machine.print("CYCLE START")
    await eventually(lambda: len(publisher.published) == 2)

    attempts = count_opens(monkeypatch)
    machine.unplug()
    await eventually(lambda: len(publisher.published) == 4)
    lost = facts(publisher)[2:]
    assert lost[0] == ("availability", {"availability": "UNAVAILABLE"})
    assert lost[1][0] == "condition" and lost[1][1]["level"] == "unavailable"
    assert lost[1][1]["native_code"] == CONNECTION_CODE
    assert str(machine.link) in lost[1][1]["message"]
    # It keeps trying (the backoff is short in this test) without saying so again.
    await eventually(lambda: len(attempts) >= 5)
    assert len(publisher.published) == 4

    machine.plug()  # a new pty behind the same path
    await eventually(lambda: len(publisher.published) == 6)
    assert facts(publisher)[4:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
    ]
    machine.print("PART COMPLETE 9")
    await eventually(lambda: ("partcount", {"count": 9, "kind": "all"}) in facts(publisher))
    await running.finish()


def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt of the adapters to open a port (once it succeeded or failed), from now on."""
    attempts: list[str] = []
    real_open = serial_line.open_port

    def counting_open(config: SerialConfig) -> Any:
        try:
            return real_open(config)
        finally:
            attempts.append(config.port)

    monkeypatch.setattr(serial_line, "open_port", counting_open)
    return attempts


async def test_a_port_absent_at_start_is_unavailable_until_it_appears(tmp_path: Path) -> None:
    link = tmp_path / "ttyLATER"
    publisher = InMemoryPublisher()
    running = Running(SerialLineAdapter(config(link)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 2)
    assert facts(publisher)[0] == ("availability", {"availability": "UNAVAILABLE"})
    machine = SerialMachine(link)
    try:
        await eventually(lambda: len(publisher.published) == 4)
        assert facts(publisher)[2][1] == {"availability": "AVAILABLE"}
        await running.finish()
    finally:
        machine.close()


async def test_check_returns_what_the_machine_prints_and_fails_without_a_port(
    machine: SerialMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = SerialLineAdapter(config(machine.link))
    opened = count_opens(monkeypatch)
    check = asyncio.create_task(adapter.check(deadline_s=3))
    await eventually(lambda: bool(opened))  # what came before the port was open is dropped
    machine.print("PROGRAM O7", "CYCLE START", "PART COMPLETE 11")
    events = await check
    assert [e.data for e in events] == [
        {"availability": "AVAILABLE"},
        {"execution": "ACTIVE", "program": "O7"},
        {"count": 11, "kind": "all"},
    ]
    with pytest.raises(ConnectionError, match="cannot open"):
        await SerialLineAdapter(config(tmp_path / "nothing")).check()


def _toml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_config_errors_name_the_file_the_key_and_the_reason(tmp_path: Path) -> None:
    head = '[[adapters.serial]]\nmachine_id = "L1"\nport = "/dev/ttyUSB0"\n'
    pattern = "[[adapters.serial.patterns]]\n"
    bad_regex = _toml(
        tmp_path / "a.toml", head + pattern + 'match = "PART (?P<count"\nmeaning = "part_count"\n'
    )
    with pytest.raises(AdapterConfigError) as error:
        load_adapters(bad_regex)
    text = str(error.value)
    assert str(bad_regex) in text and "adapters.serial.0.patterns.0.match" in text
    assert "not a valid regular expression" in text

    no_group = _toml(
        tmp_path / "b.toml", head + pattern + 'match = "PART DONE"\nmeaning = "part_count"\n'
    )
    with pytest.raises(AdapterConfigError, match=re.escape("(?P<count>...)")) as error:
        load_adapters(no_group)
    assert "adapters.serial.0.patterns.0" in str(error.value)

    wrong_value = _toml(
        tmp_path / "c.toml",
        head + pattern + 'match = "GO"\nmeaning = "execution"\nvalue = "RUNNING"\n',
    )
    with pytest.raises(AdapterConfigError, match="'RUNNING' is not one of"):
        load_adapters(wrong_value)
    settings = _toml(tmp_path / "d.toml", head + "baudrate = 12\nstopbits = 3\n")
    with pytest.raises(AdapterConfigError) as error:
        load_adapters(settings)
    assert "adapters.serial.0.baudrate" in str(error.value)
    assert "stop bits are 1, 1.5 or 2" in str(error.value)


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.serial]]" in b)
    (entry,) = load_adapters(_toml(tmp_path / "mes-hub.toml", example)).serial
    assert {p.meaning for p in entry.patterns} >= {"execution", "part_count", "condition"}
    parser = SerialLineParser(entry)
    at = datetime.now(UTC)
    lines = b"CYCLE START\r\nPART COMPLETE 0042\r\nALARM 1020 SPINDLE OVERLOAD\r\n"
    published = parser.feed(lines, at)
    assert [e.type.split(".")[2] for e in published] == ["execution", "partcount", "condition"]


async def test_publishing_that_fails_is_retried_not_dropped(
    machine: SerialMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Flaky(InMemoryPublisher):
        failures = 2

        async def publish_many(self, events: list[Any]) -> list[Any]:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("NATS down")
            return await super().publish_many(events)

    publisher = Flaky()
    opened = count_opens(monkeypatch)
    running = Running(SerialLineAdapter(config(machine.link)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: bool(opened))
    machine.print("CYCLE START")
    await eventually(lambda: len(publisher.published) == 2)
    assert [k for k, _ in facts(publisher)] == ["availability", "execution"]
    await running.finish()


async def test_a_port_that_fails_at_once_is_reopened_with_growing_backoff(
    machine: SerialMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff starts over only after a session that brought data (docs/adapters.md): a
    port that opens and fails at once is not hammered, nor AVAILABLE/UNAVAILABLE flapping."""
    waits: list[float] = []
    real_stopped = serial_line.stopped

    async def recording(stop: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        return await real_stopped(stop, 0.01)  # the test need not wait the backoff out

    talking: list[bool] = []  # True: the next session brings a line before it fails

    async def failing_read(port: Any, timeout: float) -> bytes:
        if talking and talking.pop():
            return b"CYCLE START\r\n"
        raise serial_line.PortLost("read failed: input/output error")

    monkeypatch.setattr(serial_line, "stopped", recording)
    monkeypatch.setattr(serial_line, "_read", failing_read)
    publisher = InMemoryPublisher()
    running = Running(SerialLineAdapter(config(machine.link, reconnect_max_s=2)), publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(waits) >= 5)
    assert waits[:5] == [0.25, 0.5, 1.0, 2.0, 2.0]  # the port opened every time
    talking.append(True)  # a session that brings data: the next wait is short again
    await eventually(lambda: len(waits) >= 8 and not talking)
    await running.finish()
    after = waits[waits.index(2.0) :]
    assert 0.25 in after and after[after.index(0.25) + 1] == 0.5
    assert ("execution", {"execution": "ACTIVE"}) in facts(publisher)


class Held(InMemoryPublisher):
    """A publisher whose every publish after the first waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish_many(self, events: list[Any]) -> list[Any]:
        if self.published:
            await self.release.wait()
        return await super().publish_many(events)


async def test_reading_never_waits_for_publishing(machine: SerialMachine) -> None:
    publisher = Held()
    adapter = SerialLineAdapter(config(machine.link))
    running = Running(adapter, publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)
    machine.print("CYCLE START")  # its publish is held
    await eventually(lambda: adapter.read_bytes == 13)
    machine.print("PART COMPLETE 1")
    await eventually(lambda: adapter.read_bytes == 30)  # read while the publish waits
    released_at = datetime.now(UTC)
    publisher.release.set()
    await eventually(lambda: len(publisher.published) == 3)
    await running.finish()
    (count,) = [e.envelope for s, e in publisher.published if s.endswith("partcount")]
    assert count.time < released_at  # stamped when the line arrived, not when published


async def test_reads_publishing_cannot_take_are_dropped_and_reported(
    machine: SerialMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serial_line, "READ_QUEUE", 1)
    publisher = Held()
    adapter = SerialLineAdapter(config(machine.link))
    running = Running(adapter, publisher)  # type: ignore[arg-type]
    await eventually(lambda: len(publisher.published) == 1)
    machine.print("CYCLE START")  # taken by the publisher, held
    await eventually(lambda: adapter.read_bytes == 13)
    machine.print("PART COMPLETE 1")  # waits in the queue
    await eventually(lambda: adapter.read_bytes == 30)
    machine.send(b"PART COMPL")  # no room: dropped, and the rest of its line with it
    await eventually(lambda: adapter.dropped_bytes == 10)
    publisher.release.set()
    await eventually(lambda: ("partcount", {"count": 1, "kind": "all"}) in facts(publisher))
    machine.send(b"ETE 2\r\nPART COMPLETE 3\r\n")  # the cut line's end, then a whole line
    await eventually(lambda: ("partcount", {"count": 3, "kind": "all"}) in facts(publisher))
    await running.finish()
    counts = [d["count"] for k, d in facts(publisher) if k == "partcount"]
    assert counts == [1, 3]
    (warning,) = inputs(publisher)
    assert "10 bytes from the port dropped: publishing did not keep up" in warning["message"]
