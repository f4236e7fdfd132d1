"""An open-ended downtime reason (an operator's one tap "for the current stop") through the
machine facts view, on SQLite and PostgreSQL: posted to the API, applied by ingest, read back as
the timeline and OEE of windows that open before, during and after the stop it was given for.

Worked example (docs/oee.md, Reasons): M7 runs from 07:00, stops 08:00-08:40, runs 08:40-09:00,
stops 09:00-09:30, runs again. At 08:05 the operator taps "material/waiting" for the stop going
on (start 08:00, no end). It ends where the machine next runs, 08:40: the stop at 09:00 is
``unassigned``, whatever window is asked for.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from contracts import encode_event
from hub.settings import load_settings
from hub.store import EventStore
from projections.rules.plant import PlantConfig
from projections.views.database import PostgresViews, SQLiteViews
from tests.conftest import API_ROLES, api_client, api_key, cloud_event, postgres_settings
from tests.unit.test_api_routes import HubWithoutNats

PLANT = PlantConfig(
    reasons={"material": {"waiting": "unplanned"}, "planned": {"changeover": "planned"}}
)


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 3, 2, hh, mm, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def floor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubWithoutNats]:
    """A store and views on SQLite, or on PostgreSQL (a fresh schema each)."""
    keys = ",".join(f"{role}:{api_key(role)}" for role in API_ROLES)
    views: Any
    if request.param == "sqlite":
        settings = load_settings(data_dir=tmp_path / "hub", api_keys=keys)
        views = SQLiteViews(tmp_path / "views.sqlite")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        settings = postgres_settings(dsn, tmp_path / "hub").model_copy(
            update={"api_keys": SecretStr(keys)}
        )
        views = PostgresViews(dsn, settings.postgres_schema, pool_size=2)
    hub = HubWithoutNats(settings, EventStore(settings), views)
    yield hub
    hub.views.close()
    hub.store.close()


@pytest.fixture
async def client(floor: HubWithoutNats) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(floor, PLANT) as http:
        yield http


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(role)}"}


async def from_adapter(floor: HubWithoutNats, *moves: tuple[str, datetime]) -> None:
    """M7's adapter reports executions over NATS (no API key), and the hub applies them."""
    for execution, time in moves:
        event = cloud_event("mes.machine.execution.v1", "M7", {"execution": execution}, at=time)
        await floor.publisher.publish(event.model_copy(update={"source": "urn:adapter:m7"}))
    floor.deliver()


async def tapped(
    client: httpx.AsyncClient,
    floor: HubWithoutNats,
    start: datetime,
    reason: str = "material/waiting",
    given: datetime = at(8, 5),
) -> None:
    """The operator's tap (at 08:05 unless said): ``reason`` from ``start``, no end, posted to
    the API and applied."""
    event = cloud_event(
        "mes.operator.downtime_reason.v1",
        "M7",
        {"reason": reason, "start": start.isoformat(), "operator": "op-7"},
        at=given,
    )
    answer = await client.post(
        "/api/v1/events",
        content=json.dumps(json.loads(encode_event(event))),
        headers={**auth("operator"), "Content-Type": "application/cloudevents+json"},
    )
    assert answer.status_code == 202, answer.text
    floor.deliver()


async def get(client: httpx.AsyncClient, url: str, **params: Any) -> Any:
    answer = await client.get(url, params=params, headers=auth("auditor"))
    assert answer.status_code == 200, answer.text
    return answer.json()


def z(time: datetime) -> str:
    return time.isoformat().replace("+00:00", "Z")


async def stops(client: httpx.AsyncClient, start: datetime, end: datetime) -> list[Any]:
    """The timeline's stops in [start, end): (from, to, reason)."""
    body = await get(client, "/api/v1/machines/M7/timeline", **{"from": z(start), "to": z(end)})
    return [
        (i["start"], i["end"], i["reason"])
        for i in body["intervals"]
        if i["state"] in ("stopped", "offline")
    ]


async def downtime(client: httpx.AsyncClient, start: datetime, end: datetime) -> Any:
    body = await get(client, "/api/v1/oee", machine="M7", **{"from": z(start), "to": z(end)})
    (bucket,) = body["buckets"]
    return bucket["downtime_s_by_reason"]


TWO_STOPS = [
    ("ACTIVE", at(7)),
    ("STOPPED", at(8)),
    ("ACTIVE", at(8, 40)),
    ("STOPPED", at(9)),
    ("ACTIVE", at(9, 30)),
]


async def test_an_open_ended_reason_labels_only_its_stop_in_every_window(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(floor, *TWO_STOPS)
    await tapped(client, floor, at(8))
    # The whole morning: the tap labels 08:00-08:40, not the stop at 09:00.
    assert await stops(client, at(7), at(10)) == [
        (z(at(8)), z(at(8, 40)), "material/waiting"),
        (z(at(9)), z(at(9, 30)), "unassigned"),
    ]
    # A window opening at 08:50, after the run that ended the reason: read from the view,
    # the reason given before the window labels nothing in it.
    assert await stops(client, at(8, 50), at(10)) == [(z(at(9)), z(at(9, 30)), "unassigned")]
    assert await downtime(client, at(8, 50), at(10)) == {"unassigned": 1800}
    # One opening at 09:10, in the next stop: the window's own reports say stopped since 09:00
    # and running from 09:30, not that the machine ran at 08:40. Only the view can tell that the
    # run ended the reason (it leaves the reason out); given the reason alone, the timeline
    # would end it at 09:30 and label the stop with it.
    assert await stops(client, at(9, 10), at(10)) == [(z(at(9, 10)), z(at(9, 30)), "unassigned")]
    assert await downtime(client, at(9, 10), at(10)) == {"unassigned": 1200}
    # A window opening mid-stop (08:10): the reason still labels the rest of that stop.
    assert await stops(client, at(8, 10), at(10)) == [
        (z(at(8, 10)), z(at(8, 40)), "material/waiting"),
        (z(at(9)), z(at(9, 30)), "unassigned"),
    ]
    assert await downtime(client, at(8, 10), at(10)) == {
        "material/waiting": 1800,
        "unassigned": 1800,
    }


async def test_a_run_reported_late_ends_an_open_reason_and_the_figures_recompute(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    # As first known: stopped since 08:00, so the tap labels everything after it.
    await from_adapter(floor, ("ACTIVE", at(7)), ("STOPPED", at(8)))
    await tapped(client, floor, at(8))
    reported = floor.store.last_position()
    assert await stops(client, at(8, 50), at(9, 40)) == [
        (z(at(8, 50)), z(at(9, 40)), "material/waiting")
    ]
    # The adapter's buffer comes in: the machine ran 08:40-09:00, and stopped again.
    await from_adapter(floor, ("ACTIVE", at(8, 40)), ("STOPPED", at(9)), ("ACTIVE", at(9, 30)))
    assert await stops(client, at(8, 50), at(9, 40)) == [(z(at(9)), z(at(9, 30)), "unassigned")]
    # As known when the tap was applied, and as known now (the view, filtered by position).
    window = {"from": z(at(8, 50)), "to": z(at(9, 40))}
    diff = await get(client, "/api/v1/oee/diff", machine="M7", known_at=str(reported), **window)
    (bucket,) = diff["buckets"]
    assert bucket["as_reported"]["downtime_s_by_reason"] == {"material/waiting": 3000}
    assert bucket["as_known_now"]["downtime_s_by_reason"] == {"unassigned": 1800}


async def test_reasons_tapped_stop_after_stop_each_label_their_own(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    # One tap per stop, each open-ended, read through windows that open after both.
    await from_adapter(floor, *TWO_STOPS, ("STOPPED", at(10)), ("ACTIVE", at(10, 20)))
    await tapped(client, floor, at(8))
    await tapped(client, floor, at(9, 1), "planned/changeover", given=at(9, 2))
    assert await stops(client, at(7), at(11)) == [
        (z(at(8)), z(at(8, 40)), "material/waiting"),
        (z(at(9)), z(at(9, 1)), "unassigned"),
        (z(at(10)), z(at(10, 20)), "unassigned"),
    ]
    body = await get(
        client, "/api/v1/machines/M7/timeline", **{"from": z(at(9, 20)), "to": z(at(11))}
    )
    labelled = [(i["start"], i["state"], i["reason"]) for i in body["intervals"]]
    assert labelled == [
        (z(at(9, 20)), "planned_stop", "planned/changeover"),
        (z(at(9, 30)), "running", None),
        (z(at(10)), "stopped", "unassigned"),
        (z(at(10, 20)), "running", None),
    ]


async def test_a_retry_of_a_reason_accepted_but_not_yet_applied_is_a_duplicate(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    """The tablet never heard the answer to its tap and sends it again, while the tap is still
    on its way to the store (in NATS' duplicate window) and a machine event landed meanwhile
    that says the machine was running at the tap's start: the same event, a duplicate, not a
    conflict (docs/oee.md, rule 15)."""
    await from_adapter(floor, *TWO_STOPS)
    tap = cloud_event(
        "mes.operator.downtime_reason.v1",
        "M7",
        {"reason": "material/waiting", "start": at(9, 5).isoformat(), "operator": "op-7"},
        at=at(9, 6),
    )
    headers = {**auth("operator"), "Content-Type": "application/cloudevents+json"}
    body = json.dumps(json.loads(encode_event(tap)))
    first = await client.post("/api/v1/events", content=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["duplicate"] is False
    # Accepted, not applied: the adapter's late report of a run at 09:05 is applied first.
    on_its_way = floor.publisher.published.pop()
    await from_adapter(floor, ("ACTIVE", at(9, 5)))
    floor.publisher.published.append(on_its_way)
    # A new reason from 09:05 conflicts with the run; the retry of the accepted one does not.
    other = cloud_event(
        "mes.operator.downtime_reason.v1",
        "M7",
        {"reason": "material/waiting", "start": at(9, 5).isoformat(), "operator": "op-7"},
        at=at(9, 7),
    )
    refused = await client.post(
        "/api/v1/events", content=json.dumps(json.loads(encode_event(other))), headers=headers
    )
    assert refused.status_code == 409, refused.text
    again = await client.post("/api/v1/events", content=body, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json()["duplicate"] is True
    floor.deliver()
    reasons = [e for e in floor.store.machine_history("default", "M7") if hasattr(e, "reason")]
    assert len(reasons) == 1


async def test_taps_over_a_long_stop_more_than_a_page_of_them_label_it_as_the_latest_given(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    """Stopped 08:00-12:00, tapped again and again: every tap still goes on at 11:00, and the
    view reads them a page (20) at a time, latest start first, each moment whole. Asked from
    11:00, the stop is labelled by the tap given last, wherever it is in the pages."""
    await from_adapter(floor, ("ACTIVE", at(7)), ("STOPPED", at(8)), ("ACTIVE", at(12)))

    def tap(start: datetime, given: datetime, reason: str = "material/waiting") -> Any:
        data = {"reason": reason, "start": start.isoformat(), "operator": "op-7"}
        event = cloud_event("mes.operator.downtime_reason.v1", "M7", data, at=given)
        return json.loads(encode_event(event))

    async def post(*taps: Any) -> None:
        answer = await client.post(
            "/api/v1/events",
            content=json.dumps(list(taps)),
            headers={**auth("operator"), "Content-Type": "application/cloudevents-batch+json"},
        )
        assert answer.status_code == 202, answer.text
        floor.deliver()

    # 08:06 to 08:24, one a minute; three at 08:05, the first stored given last of all: the
    # first page (the 20 latest starts) ends inside 08:05.
    await post(
        *(tap(at(8, m), at(8, 30 + m)) for m in range(6, 25)),
        tap(at(8, 5), at(11, 40), "planned/changeover"),
        tap(at(8, 5), at(8, 40)),
        tap(at(8, 5), at(8, 41)),
    )
    window = {"from": z(at(11)), "to": z(at(13))}
    body = await get(client, "/api/v1/machines/M7/timeline", **window)
    assert [(i["start"], i["state"], i["reason"]) for i in body["intervals"]] == [
        (z(at(11)), "planned_stop", "planned/changeover"),
        (z(at(12)), "running", None),
    ]
    # One more, from 08:00, on the second page, given after all the others.
    await post(tap(at(8), at(11, 50)))
    assert await stops(client, at(11), at(13)) == [(z(at(11)), z(at(12)), "material/waiting")]
