"""The SHDR adapter against a TCP peer: the real Okuma capture replayed line by line, heartbeats
answered, and malformed lines that must not stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.machines.base import MachineEvents
from adapters.machines.observations import MachineObserver, Meaning
from adapters.machines.shdr import ShdrAdapter, ShdrConfig, _parse_time, replay_lines
from contracts import CloudEvent
from hub.bootstrap import Hub
from hub.ports import InMemoryPublisher
from tests.conftest import eventually, fixtures_dir

MTCONNECT = (fixtures_dir() or Path("/nonexistent")) / "mtconnect"
needs_capture = pytest.mark.skipif(
    not (MTCONNECT / "demo_agent_okuma_shdr.txt").is_file(),
    reason="../shared/fixtures/mtconnect (the real Okuma SHDR capture) is not on this machine",
)


class ShdrPeer:
    """An SHDR adapter on loopback: answers ``* PING`` with ``* PONG``, sends ``lines``."""

    def __init__(self, lines: list[str], pong_ms: int = 10_000) -> None:
        self.lines = lines
        self.pong_ms = pong_ms
        self.pings = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:  # close() only stops listening: drop the clients too
            writer.close()
        self._writers.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)

        async def answer_pings() -> None:
            while line := await reader.readline():
                if line.startswith(b"* PING"):
                    self.pings += 1
                    writer.write(f"* PONG {self.pong_ms}\n".encode())

        answering = asyncio.create_task(answer_pings())
        try:
            for n, line in enumerate(self.lines):
                writer.write(line.encode() + b"\n")
                if n % 200 == 0:
                    await writer.drain()
            await writer.drain()
            await answering
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            answering.cancel()
            writer.close()


@contextlib.asynccontextmanager
async def running(
    peer: ShdrPeer, publisher: InMemoryPublisher | object, **config: object
) -> AsyncIterator[ShdrAdapter]:
    await peer.start()
    adapter = ShdrAdapter(ShdrConfig(host="127.0.0.1", port=peer.port, **config))  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))  # type: ignore[arg-type]
    try:
        yield adapter
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await peer.stop()


def okuma() -> dict[str, object]:
    return {
        "machine_id": "OKUMA-1",
        "devices_xml": MTCONNECT / "demo_agent_Devices.xml",
        "device": "OKUMA",
    }


def changes_in_capture(key: str) -> list[tuple[datetime, str]]:
    """Each (line time, value) where ``key`` takes a new value, read straight from the file."""
    found, last = [], None
    for line in (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines():
        fields = line.split("|")
        for i in range(1, len(fields) - 1, 2):
            if fields[i] == key and fields[i + 1] != last:
                last = fields[i + 1]
                found.append((_parse_time(fields[0]), last))
    return found


def published(publisher: InMemoryPublisher, type_: str) -> list[tuple[datetime, dict[str, object]]]:
    return [(e.envelope.time, dict(e.envelope.data)) for _, e in publisher.published
            if e.envelope.type == type_]  # fmt: skip


def recordings(lines: list[str]) -> list[list[str]]:
    """The capture's recordings: each one starts with a line reporting ``avail`` (the
    adapter's snapshot when a recording began; lines 1, 1390, 6328 and 10605)."""
    parts: list[list[str]] = []
    for line in lines:
        if "|avail|" in line or not parts:
            parts.append([])
        parts[-1].append(line)
    return parts


def first_values(recording: list[str], *keys: str) -> tuple[datetime, dict[str, str]]:
    """A recording's first line's time and the values it gives ``keys``."""
    fields = recording[0].split("|")
    values = {fields[i]: fields[i + 1] for i in range(1, len(fields) - 1, 2) if fields[i] in keys}
    return _parse_time(fields[0]), values


def in_effect(facts: list[tuple[datetime, dict[str, object]]], at: datetime) -> dict[str, object]:
    """What the last published fact at or before ``at`` (by event time) says."""
    before = [data for time, data in sorted(facts, key=lambda f: f[0]) if time <= at]
    assert before, f"nothing published at or before {at}"
    return before[-1]


@needs_capture
async def test_every_execution_and_part_count_change_of_the_okuma_capture_arrives() -> None:
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()
    peer, publisher = ShdrPeer(lines), InMemoryPublisher()
    expected_counts = changes_in_capture("ppartcount")
    expected_executions = changes_in_capture("pexecution")
    async with running(peer, publisher, **okuma()):
        await eventually(
            lambda: len(published(publisher, "mes.machine.partcount.v1")) == len(expected_counts)
        )
    counts = published(publisher, "mes.machine.partcount.v1")
    assert [(t, str(d["count"])) for t, d in counts] == expected_counts
    assert all(d["kind"] == "all" for _, d in counts)
    executions = [(t, d["execution"]) for t, d in published(publisher, "mes.machine.execution.v1")]
    # Every change of pexecution is there with its line's time (program changes add events).
    assert [e for e in expected_executions if e not in executions] == []
    assert len(expected_executions) >= 10 and len(expected_counts) >= 5
    assert peer.pings >= 1  # the adapter speaks the heartbeat protocol
    # Each recording starts over with its snapshot, its time going back before what was
    # published. Every recording's first execution (with its program) is published at its
    # first line's time, and AVAILABLE is in effect there: published at that time unless an
    # earlier recording's AVAILABLE already holds then.
    availability = published(publisher, "mes.machine.availability.v1")
    execution = published(publisher, "mes.machine.execution.v1")
    earliest: datetime | None = None
    expected_availability = []
    for recording in recordings(lines):
        start, first = first_values(recording, "avail", "pexecution", "pprogram")
        assert (start, {"execution": first["pexecution"], "mode": "AUTOMATIC",
                        "program": first["pprogram"]}) in execution  # fmt: skip
        if earliest is None or start < earliest:
            expected_availability.append((start, {"availability": first["avail"]}))
        earliest = min(start, earliest or start)
        assert in_effect(availability, start) == {"availability": "AVAILABLE"}
    assert availability == expected_availability
    assert len(availability) == 2  # the first recording's, and the second's 14 minutes earlier


@needs_capture
async def test_replaying_the_capture_again_stores_nothing_new(hub: Hub) -> None:
    # The whole capture: its recordings go back in time, and their repeated first values are
    # published with ids of their own, the same ids both times.
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()
    stored, peer = [], ShdrPeer(lines)  # the same peer (host and port) both times
    for _ in range(2):
        async with running(peer, hub.publisher, **okuma()) as adapter:
            await eventually(lambda: adapter.parser.lines == len(lines))
        await hub.wait_caught_up()
        stored.append(hub.store.last_position())
    machine = hub.store.machine(hub.settings.site, "OKUMA-1")
    assert machine is not None and machine.execution is not None
    # The same lines give the same event ids: the second replay stored nothing.
    assert stored[0] == stored[1] > 5


def test_a_devices_xml_key_that_is_a_condition_takes_the_rest_of_its_line() -> None:
    from adapters.machines.shdr import ShdrParser

    keys = {"system": "condition", "exec": "execution", "count": "part_count"}
    parser = ShdrParser(ShdrConfig(host="x", machine_id="M1", keys=keys))
    assert parser.feed("2026-03-02T06:00:00Z|exec|ACTIVE|count|7") != []
    (fault,) = parser.feed("2026-03-02T06:01:00Z|system|FAULT|1010|HIGH||SPINDLE OVERLOAD")
    assert fault.data == {"level": "fault", "native_code": "1010", "message": "SPINDLE OVERLOAD"}
    assert parser.feed("2026-03-02T06:01:01Z|system|FAULT|1010|HIGH||SPINDLE OVERLOAD") == []
    (cleared,) = parser.feed("2026-03-02T06:02:00Z|system|NORMAL||||")
    assert cleared.data == {"level": "normal", "native_code": "1010"}
    # Escaped and quoted pipes stay inside their value; dev:key lines go to their machine.
    keys = {"prog": "program", "exec": "execution"}
    parser = ShdrParser(ShdrConfig(host="x", devices={"lathe": "L-7"}, keys=keys))
    parser.feed("2026-03-02T06:00:00Z|lathe:exec|READY")
    (event,) = parser.feed('2026-03-02T06:00:01Z|lathe:prog|"O1|A"')
    assert event.subject == "L-7" and event.data["program"] == "O1|A"
    (event,) = parser.feed("2026-03-02T06:00:02Z|lathe:prog|O2\\|B")
    assert event.data["program"] == "O2|B"


async def test_malformed_lines_give_a_condition_event_and_the_adapter_goes_on() -> None:
    lines = [
        "2026-03-02T06:00:00Z|avail|AVAILABLE|exec|READY",
        "not a timestamp|exec|ACTIVE",
        "2026-03-02T06:00:01Z|count|twelve",
        "2026-03-02T06:00:02Z|exec|DANCING",
        "2026-03-02T06:00:03Z|exec",
        "2026-03-02T06:00:04Z|@ASSET@|T1|CuttingTool|--multiline--XYZ",
        "<CuttingTool|with|pipes|exec|STOPPED/>",
        "--multiline--XYZ",
        "2026-03-02T06:00:05Z|exec|ACTIVE|count|12",
    ]
    keys = {"avail": "availability", "exec": "execution", "count": "part_count"}
    publisher = InMemoryPublisher()
    async with running(ShdrPeer(lines), publisher, machine_id="M1", keys=keys):
        await eventually(lambda: len(published(publisher, "mes.machine.partcount.v1")) == 1)
    conditions = [d for _, d in published(publisher, "mes.machine.condition.v1")]
    assert [c["native_code"] for c in conditions] == ["ADAPTER_INPUT"] * 4
    assert "twelve" in str(conditions) or "not a number" in str(conditions)
    executions = [d["execution"] for _, d in published(publisher, "mes.machine.execution.v1")]
    assert executions == ["READY", "ACTIVE"]  # the asset body's "STOPPED" was not read as data


async def test_a_lost_adapter_makes_the_machine_unavailable_until_it_is_back() -> None:
    publisher = InMemoryPublisher()
    peer = ShdrPeer(["2026-03-02T06:00:00Z|avail|AVAILABLE|exec|ACTIVE"])
    keys = {"avail": "availability", "exec": "execution"}
    availabilities: Callable[[], list[object]] = lambda: [  # noqa: E731
        d["availability"] for _, d in published(publisher, "mes.machine.availability.v1")
    ]
    async with running(peer, publisher, machine_id="M1", keys=keys, reconnect_max_s=0.5):
        await eventually(lambda: availabilities() == ["AVAILABLE"])
        await peer.stop()  # the gateway goes away: connections are refused
        await eventually(lambda: availabilities() == ["AVAILABLE", "UNAVAILABLE"])
        peer.lines = ["2026-03-02T07:00:00Z|avail|AVAILABLE|exec|ACTIVE"]
        await peer.start()
        await eventually(lambda: availabilities() == ["AVAILABLE", "UNAVAILABLE", "AVAILABLE"])
    conditions = [(d["level"], d.get("native_code"))
                  for _, d in published(publisher, "mes.machine.condition.v1")]  # fmt: skip
    assert conditions == [("unavailable", "ADAPTER_CONNECTION"), ("normal", "ADAPTER_CONNECTION")]


def test_values_no_counter_can_hold_are_reported_not_published_and_never_crash() -> None:
    from adapters.machines.shdr import ShdrParser

    parser = ShdrParser(ShdrConfig(host="x", machine_id="M1", keys={"count": "part_count"}))
    for value in ("NaN", "inf", "1e400", "1e19", "-1", "2.5"):
        (event,) = parser.feed(f"2026-03-02T06:00:00Z|count|{value}")
        assert event.data["native_code"] == "ADAPTER_INPUT", value
    assert [e.data for e in parser.feed("2026-03-02T06:00:01Z|count|7")] == [
        {"count": 7, "kind": "all"}
    ]


def test_a_condition_escalating_on_the_same_code_is_published() -> None:
    from adapters.machines.shdr import ShdrParser

    parser = ShdrParser(ShdrConfig(host="x", machine_id="M1", keys={"system": "condition"}))
    (warning,) = parser.feed("2026-03-02T06:00:00Z|system|WARNING|1010|||SPINDLE WARM")
    (fault,) = parser.feed("2026-03-02T06:00:01Z|system|FAULT|1010|||SPINDLE HOT")
    (eased,) = parser.feed("2026-03-02T06:00:02Z|system|WARNING|1010|||SPINDLE WARM")
    assert [e.data["level"] for e in (warning, fault, eased)] == ["warning", "fault", "warning"]


def test_one_coarse_timestamp_with_several_values_gives_several_facts() -> None:
    from adapters.machines.shdr import ShdrParser

    parser = ShdrParser(ShdrConfig(host="x", machine_id="M1", keys={"exec": "execution"}))
    lines = ["2026-03-02T06:00:00Z|exec|ACTIVE", "2026-03-02T06:00:00Z|exec|READY",
             "2026-03-02T06:00:00Z|exec|ACTIVE", "|exec|READY", "|exec|ACTIVE"]  # fmt: skip
    ids = [e.id for line in lines for e in parser.feed(line)]
    assert len(ids) == len(set(ids)) == 5


async def test_back_after_a_loss_the_hub_sees_the_machine_available_again(hub: Hub) -> None:
    # The gateway repeats its old snapshot line (an old timestamp) after the outage.
    line = "2026-03-02T06:00:00Z|avail|AVAILABLE|exec|ACTIVE"
    peer, keys = ShdrPeer([line]), {"avail": "availability", "exec": "execution"}
    site = hub.settings.site

    def availability() -> str | None:
        machine = hub.store.machine(site, "M1")
        return machine.availability if machine else None

    async with running(peer, hub.publisher, machine_id="M1", keys=keys, reconnect_max_s=0.3):
        await eventually(lambda: availability() == "AVAILABLE")
        await peer.stop()
        await eventually(lambda: availability() == "UNAVAILABLE")
        await peer.start()
        await eventually(lambda: availability() == "AVAILABLE")
    machine = hub.store.machine(site, "M1")
    assert machine is not None and not machine.conditions  # the connection condition cleared


async def test_each_loss_is_a_new_fact_even_after_the_adapter_restarts() -> None:
    publisher = InMemoryPublisher()
    for _ in range(2):  # two runs of the adapter, the gateway down both times
        adapter = ShdrAdapter(ShdrConfig(host="127.0.0.1", port=9, machine_id="M1",
                                         reconnect_max_s=0.2))  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(publisher, stop))
        before = len(publisher.published)
        await eventually(lambda b=before: len(publisher.published) > b)
        stop.set()
        await asyncio.wait_for(task, 10)
    states = [d["availability"] for _, d in published(publisher, "mes.machine.availability.v1")]
    assert states == ["UNAVAILABLE", "UNAVAILABLE"]  # the second was not taken for the first


# --- the back-in-time rule (``MachineObserver``, shared by SHDR and MTConnect) -------------------


def observer() -> MachineObserver:
    return MachineObserver(MachineEvents("M1", "shdr://gateway:7878"), logging.getLogger("test"))


def at(minute: int) -> datetime:
    return datetime(2026, 3, 2, 6, minute, tzinfo=UTC)


def test_a_repeat_is_suppressed_after_what_was_published_and_published_before_it() -> None:
    cases: list[tuple[Meaning, str]] = [
        ("execution", "ACTIVE"), ("part_count", "7"), ("availability", "AVAILABLE"),
    ]  # fmt: skip
    for meaning, value in cases:
        machine = observer()

        def read(minute: int, m: Meaning = meaning, v: str = value) -> list[CloudEvent]:
            return machine.value(m, "k", v, at(minute), f"{at(minute).isoformat()}|k|{v}")

        (first,) = read(10)
        assert read(20) == [], meaning  # A at t2 > t1: the hub has A in effect then
        (earlier,) = read(5)  # A at t0 < t1: a new recording, a replayed buffer
        assert earlier.time == at(5) and earlier.data == first.data, meaning
        assert earlier.id != first.id, meaning  # another fact, not a duplicate of the first
        assert read(5) == [] and read(7) == [], meaning  # known now, and in effect from t0


def test_a_repeat_of_an_old_value_is_published_where_the_hub_has_another() -> None:
    machine = observer()
    assert machine.value("execution", "k", "ACTIVE", at(10), "a") != []
    assert machine.value("execution", "k", "READY", at(5), "b") != []  # an old buffer
    # READY again at 06:11: the last value published, later than it, but the hub has ACTIVE
    # in effect at 06:11 (from 06:10): a change there, not a repeat.
    (event,) = machine.value("execution", "k", "READY", at(11), "c")
    assert (event.time, event.data["execution"]) == (at(11), "READY")
    assert machine.value("execution", "k", "READY", at(6), "d") == []  # READY since 06:05


def test_conditions_follow_the_same_rule() -> None:
    machine = observer()

    def fault(minute: int) -> list[CloudEvent]:
        return machine.condition("system", "FAULT", "1010", "HOT", at(minute), f"{minute}|f")

    (first,) = fault(10)
    assert fault(20) == []
    (earlier,) = fault(5)
    assert earlier.time == at(5) and earlier.id != first.id
    assert earlier.data == {"level": "fault", "native_code": "1010", "message": "HOT"}
    # NORMAL at 06:07 (the fault active then, from 06:05) clears it at 06:07; the fault of
    # 06:10 is the machine's again from then on, by event time.
    (cleared,) = machine.condition("system", "NORMAL", None, None, at(7), "7|n")
    assert (cleared.time, cleared.data) == (at(7), {"level": "normal", "native_code": "1010"})
    assert machine.condition("system", "NORMAL", None, None, at(8), "8|n") == []
    # A NORMAL earlier than any fault of the item clears nothing: nothing was active then.
    assert machine.condition("system", "NORMAL", None, None, at(1), "1|n") == []


def test_a_new_recordings_mode_and_program_go_with_its_own_execution() -> None:
    machine = observer()
    first_line: list[tuple[Meaning, str]] = [
        ("controller_mode", "AUTOMATIC"), ("program", "O1"), ("execution", "READY"),
    ]  # fmt: skip
    for item, value in first_line:
        machine.value(item, item, value, at(30), f"30|{item}")
    assert machine.value("execution", "x", "ACTIVE", at(31), "31|x") != []
    # A new recording at 06:10, mode and program first on its line: they wait for the
    # execution of the same moment instead of going out with the ACTIVE of 06:31.
    assert machine.value("controller_mode", "m", "MANUAL", at(10), "10|m") == []
    assert machine.value("program", "p", "O2", at(10), "10|p") == []
    (event,) = machine.value("execution", "x", "READY", at(10), "10|x")
    assert (event.time, event.data) == (
        at(10),
        {"execution": "READY", "mode": "MANUAL", "program": "O2"},
    )
    # Later on that recording a program change goes with the execution in effect then.
    (event,) = machine.value("program", "p", "O3", at(11), "11|p")
    assert event.data == {"execution": "READY", "mode": "MANUAL", "program": "O3"}


@needs_capture
def test_the_capture_parsed_twice_gives_the_same_events() -> None:
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()
    config = ShdrConfig.model_validate({"host": "127.0.0.1", **okuma()})
    first, second = replay_lines(config, lines), replay_lines(config, lines)
    assert [(e.id, e.data) for e in first] == [(e.id, e.data) for e in second]
    assert len({e.id for e in first}) == len(first)
