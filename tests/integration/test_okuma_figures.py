"""The real Okuma capture, replayed over TCP through the SHDR adapter (configured as
``docs/adapters.md`` configures it) into a running hub, against figures computed here by a
separate, deliberately simple reading of the capture file: not by the hub's projections and not
by the adapter's parser.

The capture is four recordings concatenated (lines 1, 1390, 6328 and 10605 start over with the
adapter's snapshot; the time goes back 17 minutes at line 1390, on 34 at 6328, back 33 at 10605).
The rules the expected figures follow (``docs/oee.md``):

- counters by event time: the readings sorted by time, the first counts nothing, each next one
  adds its increase, a decrease is a reset and adds the new count;
- availability implied by execution; UNAVAILABLE in either is offline;
- the machine exists from its first report: before it, no planned busy time and no downtime;
- no calendar: one 24-hour shift, UTC, no breaks, so planned busy time is from the first report
  to the window's end;
- running is execution ACTIVE, a state lasts until the next report by event time, and a stop
  shorter than 120 s between two running stretches counts as running (a micro-stop).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest

from hub.bootstrap import Hub
from tests.conftest import api_client, api_key, eventually
from tests.integration.test_shdr_adapter import (
    MTCONNECT,
    ShdrPeer,
    needs_capture,
    okuma,
    recordings,
    running,
)

pytestmark = needs_capture

MACHINE = "OKUMA-1"
WINDOW = {"from": "2022-08-08T13:00:00Z", "to": "2022-08-08T15:00:00Z"}
MICRO_STOP_S = 120.0  # the plant's default micro-stop threshold
AUTH = {"Authorization": f"Bearer {api_key('auditor')}"}


# --- the expected figures, from the file itself ----------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


def _time(text: str) -> datetime | None:
    """A line's timestamp to the microsecond (the capture writes seven digits); None when the
    line has none (asset bodies, ``*`` commands)."""
    match = _STAMP.match(text)
    if match is None:
        return None
    micros = int((match.group(2) or "").ljust(6, "0")[:6])
    return datetime.fromisoformat(match.group(1)).replace(microsecond=micros, tzinfo=UTC)


@dataclass(frozen=True)
class Reading:
    time: datetime
    line: int  # the file's order breaks ties
    key: str
    value: str


def readings(lines: list[str]) -> list[Reading]:
    """Every ``avail``, ``pexecution`` and ``ppartcount`` of ``time|key|value|key|value...``
    lines, sorted by event time."""
    found = []
    for number, line in enumerate(lines):
        fields = line.split("|")
        at = _time(fields[0])
        if at is None:
            continue
        for i in range(1, len(fields) - 1, 2):
            if fields[i] in ("avail", "pexecution", "ppartcount"):
                found.append(Reading(at, number, fields[i], fields[i + 1]))
    return sorted(found, key=lambda r: (r.time, r.line))


@dataclass
class Stretch:
    start: datetime
    end: datetime
    state: str  # running, stopped or offline

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass(frozen=True)
class Expected:
    first_report: datetime
    parts: int
    planned_busy_time_s: float
    running_s: float  # execution ACTIVE
    micro_stops_s: list[float]  # stops under the threshold between two running stretches
    offline_s: float

    @property
    def actual_production_time_s(self) -> float:
        return self.running_s + sum(self.micro_stops_s)


def expected_figures(lines: list[str], start: datetime, end: datetime) -> Expected:
    found = readings(lines)
    first_report = found[0].time

    # Parts: increments of the counter in event-time order; a decrease is a reset.
    parts, previous = 0, None
    for reading in (r for r in found if r.key == "ppartcount"):
        count = int(reading.value)
        if previous is not None:
            parts += count - previous if count >= previous else count
        previous = count

    # States: each report holds until the next one by event time.
    availability: str | None = None
    execution: str | None = None
    changes: list[tuple[datetime, str]] = []
    for reading in found:
        if reading.key == "avail":
            availability = reading.value
        elif reading.key == "pexecution":
            execution = reading.value
        else:
            continue
        if "UNAVAILABLE" in (availability, execution):
            state = "offline"
        else:
            state = "running" if execution == "ACTIVE" else "stopped"
        changes.append((reading.time, state))
    begin = max(start, first_report)
    stretches: list[Stretch] = []  # merged, inside [begin, end]
    for i, (at, state) in enumerate(changes):
        until = changes[i + 1][0] if i + 1 < len(changes) else end
        at, until = max(at, begin), min(until, end)
        if until <= at:
            continue
        if stretches and stretches[-1].state == state and stretches[-1].end == at:
            stretches[-1].end = until
        else:
            stretches.append(Stretch(at, until, state))
    micro_stops = [
        stretch.seconds
        for before, stretch, after in zip(stretches, stretches[1:], stretches[2:], strict=False)
        if stretch.state == "stopped"
        and before.state == after.state == "running"
        and stretch.seconds < MICRO_STOP_S
    ]
    return Expected(
        first_report=first_report,
        parts=parts,
        planned_busy_time_s=(end - begin).total_seconds(),
        running_s=sum(s.seconds for s in stretches if s.state == "running"),
        micro_stops_s=micro_stops,
        offline_s=sum(s.seconds for s in stretches if s.state == "offline"),
    )


def capture() -> list[str]:
    return (MTCONNECT / "demo_agent_okuma_shdr.txt").read_text().splitlines()


def window() -> tuple[datetime, datetime]:
    return (
        datetime.fromisoformat(WINDOW["from"]),
        datetime.fromisoformat(WINDOW["to"]),
    )


def test_the_separate_reading_of_the_capture() -> None:
    """The expected figures themselves, pinned so that a change in them is seen. By event time
    the counter reads 0 (13:37:18), 1, 0, 1, 0, 1, 2, 3 (14:30:19): five parts, each 0 a reset.
    Running: 604.96 + 186.73 + 16.75 + 548.93 s, one program per recording; no micro-stop (the
    shortest stop between two runs lasts 181 s) and nothing offline."""
    expected = expected_figures(capture(), *window())
    assert len(recordings(capture())) == 4
    assert expected.first_report == datetime(2022, 8, 8, 13, 37, 18, 850148, tzinfo=UTC)
    assert expected.parts == 5
    assert expected.planned_busy_time_s == pytest.approx(4961.149852, abs=1e-6)
    assert expected.running_s == pytest.approx(1357.376086, abs=1e-6)
    assert expected.micro_stops_s == [] and expected.offline_s == 0


def test_the_separate_reading_on_a_tiny_capture() -> None:
    """The reading's rules on lines made up for them: a 60 s stop between two runs is a
    micro-stop, a 180 s one is not; UNAVAILABLE is offline; the counter resets."""
    lines = [
        "2022-08-08T13:10:00.0000000Z|pexecution|ACTIVE|ppartcount|7",  # no avail: available
        "2022-08-08T13:20:00.0000000Z|pexecution|READY|ppartcount|9",
        "2022-08-08T13:21:00.0000000Z|pexecution|ACTIVE",
        "2022-08-08T13:30:00.0000000Z|pexecution|STOPPED|ppartcount|2",  # a reset: +2
        "2022-08-08T13:33:00.0000000Z|pexecution|ACTIVE",
        "2022-08-08T13:40:00.0000000Z|avail|UNAVAILABLE",
        "2022-08-08T13:41:00.0000000Z|avail|AVAILABLE|pexecution|ACTIVE|ppartcount|3",
        "2022-08-08T13:05:00.0000000Z|pexecution|READY",  # late, and the first report
    ]
    expected = expected_figures(lines, *window())
    assert expected.first_report == datetime(2022, 8, 8, 13, 5, tzinfo=UTC)
    assert expected.parts == 2 + 2 + 1
    assert expected.planned_busy_time_s == 115 * 60
    assert expected.running_s == (10 + 9 + 7 + 79) * 60
    assert expected.micro_stops_s == [60.0]  # 13:20-13:21; 13:30-13:33 is 180 s
    assert expected.offline_s == 60.0
    assert expected.actual_production_time_s == 106 * 60


# --- the capture through the adapter into a hub ---------------------------------------------


def in_file_order(lines: list[str]) -> list[str]:
    return lines


def recordings_by_time(lines: list[str]) -> list[str]:
    def start(recording: list[str]) -> datetime:
        at = _time(recording[0].split("|")[0])
        assert at is not None
        return at

    return [line for recording in sorted(recordings(lines), key=start) for line in recording]


def recordings_reversed(lines: list[str]) -> list[str]:
    return [line for recording in reversed(recordings(lines)) for line in recording]


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub) as http:  # no calendar: a 24-hour shift, UTC
        yield http


@pytest.mark.parametrize(
    "arrange", [in_file_order, recordings_by_time, recordings_reversed], ids=lambda f: f.__name__
)
async def test_the_hubs_figures_match_a_separate_reading_of_the_capture(
    hub: Hub, client: httpx.AsyncClient, arrange: Callable[[list[str]], list[str]]
) -> None:
    lines = arrange(capture())
    assert sorted(lines) == sorted(capture())  # the same facts, in another order
    peer = ShdrPeer(lines)
    async with running(peer, hub.publisher, **okuma()) as adapter:
        await eventually(lambda: adapter.parser.lines == len(lines))
    await hub.wait_caught_up()
    await hub.wait_projected()

    start, end = window()
    expected = expected_figures(capture(), start, end)  # from the file as it is
    machine = await client.get(f"/api/v1/machines/{MACHINE}", headers=AUTH)
    assert machine.status_code == 200, machine.text
    oee = await client.get("/api/v1/oee", params={**WINDOW, "machine": MACHINE}, headers=AUTH)
    assert oee.status_code == 200, oee.text
    (bucket,) = oee.json()["buckets"]
    timeline = await client.get(f"/api/v1/machines/{MACHINE}/timeline", params=WINDOW,
                                headers=AUTH)  # fmt: skip
    assert timeline.status_code == 200, timeline.text

    observed = {
        "parts_produced": machine.json()["parts_produced"],
        "produced": bucket["produced"],
        "planned_busy_time_s": bucket["planned_busy_time_s"],
        "actual_production_time_s": bucket["actual_production_time_s"],
    }
    wanted = {
        "parts_produced": expected.parts,
        "produced": expected.parts,
        "planned_busy_time_s": pytest.approx(expected.planned_busy_time_s, abs=1e-3),
        "actual_production_time_s": pytest.approx(expected.actual_production_time_s, abs=1e-3),
    }
    assert observed == wanted
    # The timeline's running intervals are the capture's ACTIVE stretches.
    running_s = sum(
        (datetime.fromisoformat(i["end"]) - datetime.fromisoformat(i["start"])).total_seconds()
        for i in timeline.json()["intervals"]
        if i["state"] == "running"
    )
    assert running_s == pytest.approx(expected.running_s, abs=1e-3)
    # AVAILABLE throughout each recording, and the gaps between them hold the last state.
    offline = [
        interval
        for interval in timeline.json()["intervals"]
        if interval["state"] == "offline"
        and datetime.fromisoformat(interval["end"]) > expected.first_report
    ]
    assert offline == []
