"""The SHDR adapter against a TCP peer: the real Okuma capture replayed line by line, heartbeats
answered, and malformed lines that must not stop it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import pytest

from adapters.machines.shdr import ShdrAdapter, ShdrConfig, _parse_time
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
    (availability,) = published(publisher, "mes.machine.availability.v1")
    assert availability[1] == {"availability": "AVAILABLE"}


@needs_capture
async def test_replaying_the_capture_again_stores_nothing_new(hub: Hub) -> None:
    lines = (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()[:2000]
    stored, peer = [], ShdrPeer(lines)  # the same peer (host and port) both times
    for _ in range(2):
        async with running(peer, hub.publisher, **okuma()) as adapter:
            await eventually(lambda: adapter.parser.lines == len(lines))
        await hub.wait_caught_up()
        stored.append(hub.store.event_count())
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
