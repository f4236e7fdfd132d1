"""POST /api/v1/events of a real hub (real NATS, real store) refuses a downtime reason that covers
time the machine was running, by its own reports as the hub knows them (docs/oee.md, Reasons).

M7 runs from 07:00, stops 08:00-08:40, runs 08:40-09:00, stops 09:00-09:30, runs from 09:30
with a 60-second stop at 10:00 (a micro-stop: running).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from contracts import CloudEvent, DowntimeReasonV1
from hub.api.routes import events as routes
from hub.bootstrap import Hub
from hub.nats import STREAM
from projections.rules.calendar import Interval
from projections.rules.plant import MachinePlantConfig, PlantConfig, ShiftConfig
from projections.rules.timeline import StateReport
from projections.views.facts_view import FactsReader
from tests.conftest import api_client, api_key, cloud_event, eventually

PROBLEM = "application/problem+json"
PLANT = PlantConfig(
    reasons={"material": {"waiting": "unplanned"}, "planned": {"changeover": "planned"}},
    machines={"M9": MachinePlantConfig()},
)
REASON = "mes.operator.downtime_reason.v1"
RULE = "a downtime reason may only cover time the machine was stopped"


def at(hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(2026, 3, 2, hh, mm, ss, tzinfo=UTC)


def z(time: datetime) -> str:
    return time.isoformat().replace("+00:00", "Z")


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub, PLANT) as http:
        yield http


@pytest.fixture
async def m7(hub: Hub) -> None:
    """M7's morning, applied by the hub and in its views."""
    moves = [
        ("ACTIVE", at(7)),
        ("STOPPED", at(8)),
        ("ACTIVE", at(8, 40)),
        ("STOPPED", at(9)),
        ("ACTIVE", at(9, 30)),
        ("INTERRUPTED", at(10)),
        ("ACTIVE", at(10, 1)),
    ]
    events = [
        cloud_event("mes.machine.availability.v1", "M7", {"availability": "AVAILABLE"}, at=at(7)),
        *(cloud_event("mes.machine.execution.v1", "M7", {"execution": e}, at=t) for e, t in moves),
    ]
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == len(events))
    await hub.wait_projected()


def reason(
    start: datetime,
    end: datetime | None = None,
    code: str = "material/waiting",
    machine: str = "M7",
    given: datetime = at(11),
) -> dict[str, Any]:
    data = {"reason": code, "start": z(start), "operator": "op-7"}
    if end is not None:
        data["end"] = z(end)
    event = cloud_event(REASON, machine, data, at=given)
    return json.loads(event.model_dump_json(exclude_none=True))  # type: ignore[no-any-return]


def post(client: httpx.AsyncClient, body: dict[str, Any] | list[dict[str, Any]]) -> Any:
    batch = "-batch" if isinstance(body, list) else ""
    return client.post(
        "/api/v1/events",
        content=json.dumps(body),
        headers={
            "Authorization": f"Bearer {api_key('operator')}",
            "Content-Type": f"application/cloudevents{batch}+json",
        },
    )


async def last_seq(hub: Hub) -> int:
    return int((await hub.jetstream.stream_info(STREAM)).state.last_seq)


def stored_reasons(hub: Hub, machine_id: str = "M7") -> list[Any]:
    return [e for e in hub.store.machine_history("default", machine_id) if hasattr(e, "reason")]


@pytest.mark.usefixtures("m7")
async def test_a_reason_over_running_time_is_refused_and_nothing_is_published(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    before = await last_seq(hub)
    response = await post(client, reason(at(8), at(9, 10)))
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["title"] == "Conflict"
    assert problem["detail"] == f"M7 was running from 08:40:00 to 09:00:00 UTC: {RULE}"
    assert problem["machine_id"] == "M7"
    assert problem["running"] == [{"from": z(at(8, 40)), "to": z(at(9))}]
    # Over both stops and the runs after each: every running stretch is listed.
    both = (await post(client, reason(at(8), at(9, 45)))).json()
    assert (
        both["detail"] == f"M7 was running from 08:40:00 to 09:00:00 UTC (and 1 more time): {RULE}"
    )
    assert both["running"] == [
        {"from": z(at(8, 40)), "to": z(at(9))},
        {"from": z(at(9, 30)), "to": z(at(9, 45))},
    ]
    assert await last_seq(hub) == before
    assert stored_reasons(hub) == []


MICRO = "a stop shorter than the micro-stop threshold (120 s) counts as running"


@pytest.mark.usefixtures("m7")
async def test_a_micro_stop_counts_as_running(client: httpx.AsyncClient, hub: Hub) -> None:
    response = await post(client, reason(at(10), at(10, 1)))
    assert response.status_code == 409, response.text
    assert response.json()["running"] == [{"from": z(at(10)), "to": z(at(10, 1))}]
    # The operator saw the machine stopped: the refusal says why that counts as running.
    assert (
        response.json()["detail"]
        == f"M7 was running from 10:00:00 to 10:01:00 UTC ({MICRO}): {RULE}"
    )
    tapped = (await post(client, reason(at(10, 0, 30)))).json()
    assert tapped["detail"] == (
        f"M7 was running at 10:00:30 UTC ({MICRO}): a downtime reason without an end may only "
        "start while the machine is stopped"
    )
    # Running on since (it told no stop): read a day on, no further.
    assert tapped["running"] == [
        {"from": z(at(10, 0, 30)), "to": z(at(10, 0, 30) + timedelta(days=1))}
    ]
    # Over a run and the micro-stop both: the run first, then the rest, and why.
    both = (await post(client, reason(at(8, 30), at(10, 0, 30)))).json()
    assert both["detail"] == (
        f"M7 was running from 08:40:00 to 09:00:00 UTC (and 1 more time; {MICRO}): {RULE}"
    )


@pytest.mark.usefixtures("m7")
async def test_a_reason_over_a_stop_is_accepted_and_labels_it(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    accepted = await post(client, reason(at(8), at(8, 40), "planned/changeover"))
    assert accepted.status_code == 202, accepted.text
    await eventually(lambda: len(stored_reasons(hub)) == 1)
    # Up to the very moment it runs again; and part of a stop.
    assert (await post(client, reason(at(9, 10), at(9, 30)))).status_code == 202


@pytest.mark.usefixtures("m7")
async def test_an_open_ended_reason_is_accepted_during_a_stop_and_refused_while_running(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    during = await post(client, reason(at(8, 5)))
    assert during.status_code == 202, during.text
    # From the moment it stopped, too.
    assert (await post(client, reason(at(9)))).status_code == 202
    before = await last_seq(hub)
    running = await post(client, reason(at(8, 50)))
    assert running.status_code == 409, running.text
    assert running.headers["content-type"] == PROBLEM
    problem = running.json()
    assert problem["detail"] == (
        "M7 was running at 08:50:00 UTC: a downtime reason without an end may only start "
        "while the machine is stopped"
    )
    assert (problem["machine_id"], problem["running"]) == (
        "M7",
        [{"from": z(at(8, 50)), "to": z(at(9))}],
    )
    # The very moment it runs again is running.
    assert (await post(client, reason(at(8, 40)))).status_code == 409
    assert await last_seq(hub) == before
    await eventually(lambda: len(stored_reasons(hub)) == 2)


@pytest.mark.usefixtures("m7")
async def test_in_a_batch_the_refused_reason_is_named_by_its_index(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    before = await last_seq(hub)
    response = await post(client, [reason(at(8), at(8, 40)), reason(at(8, 30), at(8, 50))])
    assert response.status_code == 409, response.text
    assert response.json()["detail"] == (
        f"event 1: M7 was running from 08:40:00 to 08:50:00 UTC: {RULE}"
    )
    assert await last_seq(hub) == before  # the good one was not published either
    assert stored_reasons(hub) == []


@pytest.mark.usefixtures("m7")
async def test_a_retry_of_an_applied_reason_is_a_duplicate_even_once_the_machine_ran(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    tap = reason(at(9, 5))
    assert (await post(client, tap)).status_code == 202
    await eventually(lambda: len(stored_reasons(hub)) == 1)
    # A late report: the machine was running at 09:05 after all.
    late = cloud_event("mes.machine.execution.v1", "M7", {"execution": "ACTIVE"}, at=at(9, 5))
    applied = hub.ingest_stats().applied
    await hub.publisher.publish(late)
    await eventually(lambda: hub.ingest_stats().applied == applied + 1)
    await hub.wait_projected()
    assert (await post(client, reason(at(9, 6)))).status_code == 409
    again = await post(client, tap)  # the tablet never heard the first answer
    assert again.status_code == 202, again.text
    assert again.json()["duplicate"] is True


async def test_machines_without_a_timeline_and_reasons_over_nats_are_not_refused(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    # M9 is configured but never reported: it never ran. M8 reports first in the same batch
    # (the hub does not know it yet when the batch is checked).
    assert (await post(client, {**reason(at(8)), "subject": "M9"})).status_code == 202
    m8 = cloud_event("mes.machine.execution.v1", "M8", {"execution": "ACTIVE"}, at=at(7))
    body = [json.loads(m8.model_dump_json(exclude_none=True)), {**reason(at(8)), "subject": "M8"}]
    answer = await client.post(
        "/api/v1/events",
        content=json.dumps(body),
        headers={
            "Authorization": f"Bearer {api_key('admin')}",
            "Content-Type": "application/cloudevents-batch+json",
        },
    )
    assert answer.status_code == 202, answer.text
    # Over NATS (an adapter or gateway) nothing is checked: a reason over running time is kept.
    await hub.publisher.publish(
        CloudEvent.model_validate({**reason(at(7), at(7, 30)), "subject": "M8"})
    )
    await eventually(lambda: len(stored_reasons(hub, "M8")) == 2)
    assert hub.ingest_stats().rejected == 0


# --- a plant with shifts, breaks and a time zone ------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def local(hh: int, mm: int = 0, ss: int = 0) -> datetime:
    """A time of 2 March 2026 on the plant's clock (CET, UTC+1)."""
    return datetime(2026, 3, 2, hh, mm, ss, tzinfo=BERLIN)


def utc(time: datetime) -> str:
    return z(time.astimezone(UTC))


SHIFTS = PlantConfig(
    time_zone="Europe/Berlin",
    shifts=[
        ShiftConfig(name="early", start=time(6), end=time(14), breaks=[(time(10), time(10, 30))])
    ],
    reasons=PLANT.reasons,
    machines={"M5": MachinePlantConfig(commissioned=local(12))},
)


@pytest.fixture
async def plant_client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub, SHIFTS) as http:
        yield http


@pytest.fixture
async def m6(hub: Hub) -> None:
    """On the plant's clock: M6 runs 07:00-09:40, then through the break (10:00-10:30), then
    11:00-14:20, and once more after the shift (06:00-14:00), 15:00-15:10. M5, commissioned at
    12:00, ran a trial 07:00-08:00."""
    moves = [
        ("M6", "ACTIVE", local(7)),
        ("M6", "STOPPED", local(9, 40)),
        ("M6", "ACTIVE", local(10)),
        ("M6", "STOPPED", local(10, 30)),
        ("M6", "ACTIVE", local(11)),
        ("M6", "STOPPED", local(14, 20)),
        ("M6", "ACTIVE", local(15)),
        ("M6", "STOPPED", local(15, 10)),
        ("M5", "ACTIVE", local(7)),
        ("M5", "STOPPED", local(8)),
    ]
    events = [
        cloud_event("mes.machine.execution.v1", machine, {"execution": e}, at=t)
        for machine, e, t in moves
    ]
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == len(events))
    await hub.wait_projected()


def on_m(machine: str, start: datetime, end: datetime | None = None) -> dict[str, Any]:
    return reason(start, end, machine=machine, given=local(16))


@pytest.mark.usefixtures("m6")
async def test_running_in_a_break_outside_the_shifts_or_before_commissioning_is_running(
    plant_client: httpx.AsyncClient,
) -> None:
    # The timeline shows the break as planned_stop, 15:00 as no_shift and M5's trial as
    # not_commissioned: the machines ran all the same, and the operator's reason says they
    # were stopped. Times are told on the plant's clock, as the station shows them.
    answers = {
        "over the break": await post(plant_client, on_m("M6", local(9, 50), local(10, 40))),
        "tapped in the break": await post(plant_client, on_m("M6", local(10, 10))),
        "after the shift": await post(plant_client, on_m("M6", local(14, 30), local(15, 30))),
        "before commissioning": await post(plant_client, on_m("M5", local(7, 30), local(8, 30))),
    }
    assert {case: answer.status_code for case, answer in answers.items()} == dict.fromkeys(
        answers, 409
    )
    problems = {case: answer.json() for case, answer in answers.items()}
    assert problems["over the break"]["detail"] == (
        f"M6 was running from 10:00:00 to 10:30:00 CET: {RULE}"
    )
    assert problems["over the break"]["running"] == [
        {"from": utc(local(10)), "to": utc(local(10, 30))}
    ]
    assert problems["tapped in the break"]["detail"] == (
        "M6 was running at 10:10:00 CET: a downtime reason without an end may only start "
        "while the machine is stopped"
    )
    assert problems["tapped in the break"]["running"] == [
        {"from": utc(local(10, 10)), "to": utc(local(10, 30))}
    ]
    assert problems["after the shift"]["detail"] == (
        f"M6 was running from 15:00:00 to 15:10:00 CET: {RULE}"
    )
    assert problems["before commissioning"]["detail"] == (
        f"M5 was running from 07:30:00 to 08:00:00 CET: {RULE}"
    )
    # The stops themselves, in or out of the shift, take a reason.
    for stopped in (
        on_m("M6", local(9, 40), local(10)),
        on_m("M6", local(10, 35)),
        on_m("M6", local(14, 20), local(15)),
        on_m("M5", local(8, 10)),
    ):
        accepted = await post(plant_client, stopped)
        assert accepted.status_code == 202, accepted.text


def test_times_are_told_in_the_plant_s_zone_by_its_abbreviation_or_offset() -> None:
    day = local(0).date()
    assert routes._clock(local(9, 40), day, BERLIN) == "09:40:00"
    assert routes._zone_name(local(9, 40), BERLIN) == "CET"
    summer = datetime(2026, 7, 1, 9, 40, tzinfo=BERLIN)
    assert routes._zone_name(summer, BERLIN) == "CEST"
    assert routes._clock(summer, day, BERLIN) == "2026-07-01 09:40:00"
    assert routes._zone_name(summer, ZoneInfo("America/Sao_Paulo")) == "UTC-03"
    assert routes._zone_name(summer, ZoneInfo("UTC")) == "UTC"


class StatesOnly:
    """The facts view as the check may read it: the machine's state reports, over what
    windows; never a window's facts (its counter readings, orders and reasons)."""

    def __init__(self, facts: FactsReader) -> None:
        self._facts = facts
        self.read: list[Interval] = []

    def states(self, machine: Any, window: Interval) -> list[StateReport]:
        self.read.append(window)
        return self._facts.states(machine, window)

    def window(self, *args: Any) -> Any:
        raise AssertionError("the check read a window of every fact")


@pytest.mark.usefixtures("m7")
async def test_the_check_reads_state_reports_over_the_reason_s_span_only(hub: Hub) -> None:
    """The check of a reason over a year used to build the machine's timeline of that year,
    reading every counter reading with it (25 s on a busy machine): it reads the machine's
    state reports over the reason's span alone, and for a reason with no end, those around its
    start."""
    facts = StatesOnly(FactsReader(hub.views))
    view: Any = facts
    now = datetime(2027, 1, 1, tzinfo=UTC)
    threshold = timedelta(seconds=PLANT.micro_stop_threshold_s)
    year = DowntimeReasonV1(reason="material/waiting", start=at(8), end=now, operator="op-7")
    found = routes._running_stretches(view, "default", PLANT, "M7", year, now)
    assert [(r.start, r.end) for r in found] == [(at(8, 40), at(9)), (at(9, 30), now)]
    assert facts.read == [Interval(at(8) - threshold, now + threshold)]
    # With no end, in a stop: the reports within the threshold of its start, no more.
    facts.read.clear()
    tap = DowntimeReasonV1(reason="material/waiting", start=at(8, 5), operator="op-7")
    assert routes._running_stretches(view, "default", PLANT, "M7", tap, now) == []
    moment = timedelta(microseconds=1)
    assert facts.read == [Interval(at(8, 5) - threshold, at(8, 5) + moment + threshold)]
    # While it runs: then until when it ran (a day at most).
    facts.read.clear()
    running = DowntimeReasonV1(reason="material/waiting", start=at(8, 50), operator="op-7")
    (stretch,) = routes._running_stretches(view, "default", PLANT, "M7", running, now)
    assert (stretch.start, stretch.end) == (at(8, 50), at(9))
    assert facts.read[1] == Interval(
        at(8, 50) - threshold, at(8, 50) + timedelta(days=1) + threshold
    )
