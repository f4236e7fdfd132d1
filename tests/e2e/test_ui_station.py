"""The operator station (``hub.ui.station``) on a real hub (real NATS, real store), through the
app in process: signed in as a tablet is, with a session cookie and its CSRF token."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from contracts import CloudEvent
from hub.bootstrap import Hub
from projections.rules.plant import PlantConfig
from tests.conftest import api_client, api_key, cloud_event, eventually

REASONS = {
    "mechanical": {"spindle": "unplanned", "coolant": "unplanned"},
    "material": {"waiting": "unplanned"},
    "planned": {"changeover": "planned"},
}
STATION = "/ui/station/M7"


def noon_zone(now: datetime) -> str:
    """A time zone in which ``now`` is around noon: the plant's one 24-hour shift (no shifts
    configured) then began hours ago, and the last hour's stops lie wholly inside it."""
    offset = 12 - now.hour
    return "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


NOW = datetime.now(UTC).replace(microsecond=0)
PLANT = PlantConfig(time_zone=noon_zone(NOW), reasons=REASONS, reason_prompt_after_s=60)


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


def iso(at: datetime) -> str:
    return at.isoformat()


def floor_events() -> list[CloudEvent]:
    """M7 ran, stopped 30 to 20 minutes ago, ran, and has been stopped for 5 minutes; order
    SO-1 runs on it, SO-2 is released to it."""
    released = [
        cloud_event(
            "mes.erp.order.released.v1",
            order_id,
            {
                "order_id": order_id,
                "part_number": part,
                "quantity": 100,
                "due": iso(NOW + timedelta(days=1)),
                "machine_id": "M7",
                "ideal_cycle_time_s": 30.0,
            },
            at=ago(60),
        )
        for order_id, part in (("SO-1", "P-1"), ("SO-2", "P-2"))
    ]
    machine = [
        ("mes.machine.availability.v1", {"availability": "AVAILABLE"}, 45),
        ("mes.machine.execution.v1", {"execution": "ACTIVE"}, 45),
        ("mes.machine.partcount.v1", {"count": 0, "kind": "all"}, 45),
        ("mes.operator.order_started.v1", {"order_id": "SO-1"}, 44),
        ("mes.machine.execution.v1", {"execution": "STOPPED"}, 30),
        ("mes.machine.partcount.v1", {"count": 20, "kind": "all"}, 30),
        ("mes.machine.execution.v1", {"execution": "ACTIVE"}, 20),
        ("mes.machine.partcount.v1", {"count": 40, "kind": "all"}, 5),
        ("mes.machine.execution.v1", {"execution": "STOPPED"}, 5),
    ]
    return released + [cloud_event(t, "M7", d, at=ago(m)) for t, d, m in machine]


async def applied(hub: Hub, count: int) -> None:
    await eventually(lambda: hub.ingest_stats().applied == count)
    await hub.wait_projected()


@pytest.fixture
async def floor(hub: Hub) -> Hub:
    events = floor_events()
    await hub.publisher.publish_many(events)
    await applied(hub, len(events))
    return hub


@pytest.fixture
async def client(floor: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(floor, PLANT) as http:
        yield http


async def sign_in(client: httpx.AsyncClient, role: str, next_path: str = STATION) -> str:
    """Sign ``client`` in with ``role``'s key as a tablet does; the page's CSRF token."""
    answer = await client.post("/ui/login", data={"key": api_key(role), "next": next_path})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == next_path
    page = await client.get(next_path)  # (the 403 page of a viewer has it too)
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def embedded(html: str) -> dict[str, Any]:
    found = re.search(
        r'<script type="application/json" id="station-data">(.*?)</script>', html, re.S
    )
    assert found, html
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def reason_event(data: dict[str, Any]) -> dict[str, Any]:
    """A tap as the page sends it: a structured CloudEvent with an id made in the browser."""
    event = cloud_event("mes.operator.downtime_reason.v1", "M7", data, at=datetime.now(UTC))
    return event.model_dump(mode="json", exclude_none=True)


async def send_tap(
    client: httpx.AsyncClient, csrf: str | None, event: dict[str, Any]
) -> httpx.Response:
    headers = {"Content-Type": "application/cloudevents+json"}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return await client.post("/api/v1/events", content=json.dumps(event), headers=headers)


async def station_data(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get(f"{STATION}/data")
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    data: dict[str, Any] = answer.json()
    return data


def past_stop(data: dict[str, Any]) -> dict[str, Any]:
    (stop,) = [s for s in data["stops"] if s["end"] is not None]
    return stop


# --- the page ------------------------------------------------------------------------------


async def test_the_page_renders_the_tile_and_embeds_its_data(client: httpx.AsyncClient) -> None:
    await sign_in(client, "operator")
    page = await client.get(STATION)
    assert page.status_code == 200, page.text
    html = page.text
    assert '<section id="tile" class="tile state-stopped"' in html
    assert 'id="tile-state" class="tile-state">Stopped<' in html
    assert "no reason given yet" in html
    assert f'data-since="{iso(ago(5))}"' in html  # counted up by mes.js
    assert "<strong>SO-1</strong>" in html and "of 100 good" in html
    assert 'href="/ui/static/station.css"' in html and 'src="/ui/static/station.js"' in html
    data = embedded(html)
    assert data["tile"]["machine_id"] == "M7" and data["tile"]["state"] == "stopped"
    assert data["prompt_after_s"] == 60
    assert data["reasons"]["mechanical/spindle"] == "unplanned"
    assert data["reasons"]["planned/changeover"] == "planned"
    # The shift's figures, provisional while the shift runs.
    assert data["tile"]["shift"]["provisional"] is True
    assert 'class="tile-shift provisional"' in html


async def test_data_has_the_unassigned_stops_and_the_orders(client: httpx.AsyncClient) -> None:
    await sign_in(client, "operator")
    data = await station_data(client)
    assert [(s["start"], s["end"], s["unassigned"]) for s in data["stops"]] == [
        (iso(ago(5)), None, True),  # going on
        (iso(ago(30)), iso(ago(20)), True),
    ]
    assert {(o["order_id"], o["status"]) for o in data["orders"]} == {
        ("SO-1", "running"),
        ("SO-2", "released"),
    }
    assert data["tile"]["order_id"] == "SO-1" and data["tile"]["order_quantity"] == 100


async def test_the_station_is_for_operators_and_admins(client: httpx.AsyncClient) -> None:
    # Not signed in: the page sends to the sign-in page and back; the JSON route says 401.
    answer = await client.get(STATION)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login?next=/ui/station/M7"
    assert (await client.get(f"{STATION}/data")).status_code == 401

    await sign_in(client, "viewer")
    refused = await client.get(STATION)
    assert refused.status_code == 403 and "Not for this role" in refused.text
    assert "a viewer may not open this page" in refused.text
    data = await client.get(f"{STATION}/data")
    assert data.status_code == 403
    assert data.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/ui/stations")).status_code == 403


async def test_an_admin_may_open_it_and_a_script_may_read_it_with_a_key(
    client: httpx.AsyncClient,
) -> None:
    await sign_in(client, "admin")
    assert (await client.get(STATION)).status_code == 200
    client.cookies.clear()
    with_key = await client.get(
        f"{STATION}/data", headers={"Authorization": f"Bearer {api_key('operator')}"}
    )
    assert with_key.status_code == 200 and with_key.json()["tile"]["machine_id"] == "M7"


async def test_a_machine_never_heard_of_is_the_404_page(client: httpx.AsyncClient) -> None:
    await sign_in(client, "operator")
    unknown = await client.get("/ui/station/M99")
    assert unknown.status_code == 404 and "No machine “M99”" in unknown.text
    bad = await client.get("/ui/station/M%207%3Cb%3E")
    assert bad.status_code == 404 and "<b>" not in bad.text
    data = await client.get("/ui/station/M99/data")
    assert data.status_code == 404 and "M99" in data.json()["detail"]
    too_long = await client.get("/ui/station/" + "M" * 129)
    assert too_long.status_code == 404


async def test_the_stations_list_links_to_each_station(client: httpx.AsyncClient) -> None:
    await sign_in(client, "operator", "/ui/stations")
    listed = await client.get("/ui/stations")
    assert listed.status_code == 200
    assert 'href="/ui/station/M7"' in listed.text and "Stopped" in listed.text


# --- taps ----------------------------------------------------------------------------------


async def test_a_tap_needs_the_pages_csrf_token(client: httpx.AsyncClient, floor: Hub) -> None:
    csrf = await sign_in(client, "operator")
    data = await station_data(client)
    stop = past_stop(data)
    tap = reason_event(
        {"reason": "mechanical/spindle", "start": stop["start"], "end": stop["end"],
         "operator": "Anna"}
    )  # fmt: skip
    without = await send_tap(client, None, tap)
    assert without.status_code == 403, without.text
    assert "X-CSRF-Token" in without.json()["detail"]
    wrong = await send_tap(client, "not-the-token", tap)
    assert wrong.status_code == 403
    accepted = await send_tap(client, csrf, tap)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["duplicate"] is False
    # Sent again (the tablet never heard the answer): harmless.
    await applied(floor, len(floor_events()) + 1)
    again = await send_tap(client, csrf, tap)
    assert again.status_code == 202 and again.json()["duplicate"] is True


async def test_a_viewer_session_cannot_tap(client: httpx.AsyncClient) -> None:
    csrf = await sign_in(client, "viewer")
    tap = reason_event({"reason": "mechanical/spindle", "start": iso(ago(5)), "operator": "Anna"})
    refused = await send_tap(client, csrf, tap)
    assert refused.status_code == 403, refused.text


async def test_a_reason_shows_in_the_data_as_what_won(
    client: httpx.AsyncClient, floor: Hub
) -> None:
    csrf = await sign_in(client, "operator")
    stop = past_stop(await station_data(client))
    count = len(floor_events())

    async def give(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal count
        answer = await send_tap(client, csrf, reason_event({**body, "operator": "Anna"}))
        assert answer.status_code == 202, answer.text
        count += 1
        await applied(floor, count)
        return await station_data(client)

    data = await give({"reason": "mechanical/spindle", "start": stop["start"], "end": stop["end"]})
    labelled = past_stop(data)
    assert labelled["unassigned"] is False
    assert [p["reason"] for p in labelled["pieces"]] == ["mechanical/spindle"]

    # A later reason over the same stop wins.
    data = await give({"reason": "mechanical/coolant", "start": stop["start"], "end": stop["end"]})
    assert [p["reason"] for p in past_stop(data)["pieces"]] == ["mechanical/coolant"]

    # Split in two at a chosen time: two reasons, [start, t) and [t, end).
    cut = iso(ago(25))
    await give({"reason": "material/waiting", "start": stop["start"], "end": cut})
    data = await give({"reason": "planned/changeover", "start": cut, "end": stop["end"]})
    pieces = past_stop(data)["pieces"]
    assert [(p["start"], p["end"], p["reason"], p["state"]) for p in pieces] == [
        (stop["start"], cut, "material/waiting", "stopped"),
        (cut, stop["end"], "planned/changeover", "planned_stop"),
    ]

    # The prompt's tap: open-ended, for the stop going on; it labels it, and the tile says so.
    ongoing = data["stops"][0]
    assert ongoing["end"] is None and data["tile"]["reason"] == "unassigned"
    data = await give({"reason": "material/waiting", "start": ongoing["start"]})
    assert data["tile"]["reason"] == "material/waiting"
    assert data["stops"][0]["unassigned"] is False
    assert not any(s["unassigned"] for s in data["stops"])
