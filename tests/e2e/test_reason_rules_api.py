"""POST /api/v1/events of a real hub (real NATS, real store) refuses a downtime reason that covers
time the machine was running, by its timeline as the hub knows it (docs/oee.md, Reasons).

M7 runs from 07:00, stops 08:00-08:40, runs 08:40-09:00, stops 09:00-09:30, runs from 09:30
with a 60-second stop at 10:00 (a micro-stop: running).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from contracts import CloudEvent
from hub.bootstrap import Hub
from hub.nats import STREAM
from projections.rules.plant import MachinePlantConfig, PlantConfig
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
    start: datetime, end: datetime | None = None, code: str = "material/waiting"
) -> dict[str, Any]:
    data = {"reason": code, "start": z(start), "operator": "op-7"}
    if end is not None:
        data["end"] = z(end)
    event = cloud_event(REASON, "M7", data, at=at(11))
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


@pytest.mark.usefixtures("m7")
async def test_a_micro_stop_counts_as_running(client: httpx.AsyncClient, hub: Hub) -> None:
    response = await post(client, reason(at(10), at(10, 1)))
    assert response.status_code == 409, response.text
    assert response.json()["running"] == [{"from": z(at(10)), "to": z(at(10, 1))}]


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
