"""The auditors' routes over a real SQLite store and views, fed through real ingest: who did what,
state as of an event time and as known at a position or time, and OEE and order progress "as
reported" against "as known now", with the late facts that made the difference and their actors.

Worked example (one machine, the default plant: one 24-hour shift a day, micro-stops under
120 s count as running; the window T0..T0+8h):
- known at the first report: ACTIVE from T0, STOPPED at 2h, ACTIVE at 3h: planned busy time
  8 h, running 7 h, availability 0.875;
- then, recorded later: an operator labels the 2h-3h stop a changeover (planned: busy time
  7 h); the machine's adapter sends a stop it had buffered, 4h-5h (running 6 h); and the plant
  configuration adds planned maintenance 6h-7h (busy time 6 h, the machine's running in it not
  counted: 5 h). Availability now 5/6.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from contracts import CloudEvent, encode_event
from hub.ingest import IncomingMessage, Ingestor
from hub.nats_auth import signature
from hub.settings import load_settings
from hub.store import EventStore
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import configuration_event
from projections.views.database import PostgresViews, SQLiteViews
from tests.conftest import API_ROLES, T0, api_client, api_key, cloud_event, postgres_settings
from tests.unit.test_api_routes import HUB_KEY, HubWithoutNats

H = timedelta(hours=1)


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
    async with api_client(floor) as http:
        yield http


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(role)}"}


async def key_id(client: httpx.AsyncClient, role: str) -> str:
    """How the audit log names ``role``'s key: as GET /api/v1/me tells its holder."""
    me = await get(client, "/api/v1/me", role)
    assert me["role"] == role and api_key(role) not in str(me)
    return str(me["key_id"])


async def post(client: httpx.AsyncClient, role: str, *events: CloudEvent) -> None:
    body = json.dumps([json.loads(encode_event(e)) for e in events])
    headers = {**auth(role), "Content-Type": "application/cloudevents-batch+json"}
    answer = await client.post("/api/v1/events", content=body, headers=headers)
    assert answer.status_code == 202, answer.text


async def from_adapter(floor: HubWithoutNats, *events: CloudEvent) -> None:
    """As a machine adapter publishes on NATS: no API key, its own source."""
    for event in events:
        await floor.publisher.publish(event.model_copy(update={"source": "urn:adapter:shdr-m1"}))


def execution(value: str, at: timedelta, machine: str = "M1") -> CloudEvent:
    return cloud_event("mes.machine.execution.v1", machine, {"execution": value}, at=at)


async def get(client: httpx.AsyncClient, url: str, role: str = "auditor", **params: Any) -> Any:
    answer = await client.get(url, params=params, headers=auth(role))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def last_position(client: httpx.AsyncClient) -> int:
    page = await get(client, "/api/v1/audit/events", limit=1)
    return int(page["known_up_to"])


async def machine_history(floor: HubWithoutNats) -> int:
    """Deliver and return the log's end."""
    floor.deliver()
    return floor.store.last_position()


async def test_the_log_names_who_did_what_and_filters_by_it(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(floor, execution("ACTIVE", 0 * H))
    floor.deliver()
    await post(client, "operator", cloud_event(
        "mes.operator.order_started.v1", "M1", {"order_id": "O-1"}, at=H))  # fmt: skip
    floor.deliver()
    operator = await key_id(client, "operator")
    page = await get(client, "/api/v1/audit/events")
    listed = [(e["type"], e["subject"], (e["actor"] or {}).get("id")) for e in page["events"]]
    assert listed == [
        ("registered", "M1", None),
        ("mes.machine.execution.v1", "M1", "urn:adapter:shdr-m1"),
        ("mes.operator.order_started.v1", "M1", operator),
        ("registered", "O-1", None),
        ("mes.operator.order_started.v1", "O-1", operator),
    ]
    started = page["events"][2]
    assert started["actor"] == {"kind": "key", "id": operator, "role": "operator"}
    assert started["data"] == {"order_id": "O-1"}
    assert started["event_time"].startswith("2026-03-02T07:00:00")
    assert [e["position"] for e in page["events"]] == sorted(e["position"] for e in page["events"])
    # Filters: by actor, by type, by machine; paging by cursor.
    mine = await get(client, "/api/v1/audit/events", actor=operator)
    assert [e["subject"] for e in mine["events"]] == ["M1", "O-1"]
    by_type = await get(client, "/api/v1/audit/events", type="mes.machine.execution.v1")
    assert len(by_type["events"]) == 1
    first = await get(client, "/api/v1/audit/events", machine="M1", limit=2)
    assert first["next_after"] is not None
    rest = await get(client, "/api/v1/audit/events", machine="M1", after=first["next_after"])
    assert [e["type"] for e in first["events"] + rest["events"]] == [
        "registered", "mes.machine.execution.v1", "mes.operator.order_started.v1"]  # fmt: skip
    history = await get(client, "/api/v1/audit/orders/O-1/history")
    assert [e["type"] for e in history["events"]] == ["registered", "mes.operator.order_started.v1"]
    late = await get(client, "/api/v1/audit/events", event_from=(T0 + H / 2).isoformat())
    assert [e["type"] for e in late["events"]] == ["mes.operator.order_started.v1"] * 2


async def test_only_auditors_and_admins_read_the_log_and_auditors_write_nothing(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    floor.deliver()  # (the hub prepares its views when it starts)
    for role in ("operator", "erp"):
        refused = await client.get("/api/v1/audit/events", headers=auth(role))
        assert refused.status_code == 403, role
    assert (await client.get("/api/v1/audit/events", headers=auth("admin"))).status_code == 200
    # Every route that changes something refuses the auditor's key.
    schema = (await client.get("/openapi.json")).json()
    writes = [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in {"post", "put", "patch", "delete"}
    ]
    assert len(writes) >= 10
    for method, path in writes:
        url = path.replace("{", "").replace("}", "")
        answer = await client.request(method, url, headers=auth("auditor"), json={})
        assert answer.status_code == 403, (method, path, answer.status_code)


async def test_state_as_of_an_event_time_and_as_known_at_a_position(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(floor, execution("ACTIVE", 0 * H), execution("STOPPED", 2 * H))
    before_late = await machine_history(floor)
    # A feed hold at 1h that the adapter had buffered arrives after the stop at 2h.
    await from_adapter(floor, execution("FEED_HOLD", H))
    await machine_history(floor)
    at = (T0 + 1.5 * H).isoformat()
    then = await get(client, "/api/v1/audit/machines/M1/state", as_of=at, known_at=str(before_late))
    now = await get(client, "/api/v1/audit/machines/M1/state", as_of=at)
    assert then["state"]["state"] == "running" and then["known_at"]["position"] == before_late
    assert now["state"]["state"] != "running"
    assert now["state"]["since"].startswith("2026-03-02T07:00:00")
    # The record as the hub held it then: its last execution by event time, STOPPED.
    assert then["record"]["execution"] == "STOPPED" and then["record"]["version"] == 3
    # By recorded time: a moment before the late event was stored answers the same.
    by_time = await get(
        client,
        "/api/v1/audit/machines/M1/state",
        as_of=at,
        known_at=then["known_at"]["recorded_time"],
    )
    assert by_time["known_at"]["position"] == before_late
    # Beyond what is stored: refused, not guessed.
    for beyond in (str(floor.store.last_position() + 1), "2999-01-01T00:00:00Z"):
        refused = await client.get(
            "/api/v1/audit/machines/M1/state",
            params={"known_at": beyond},
            headers=auth("auditor"),
        )
        assert refused.status_code == 422, beyond
        assert refused.headers["content-type"] == "application/problem+json"


async def test_oee_as_reported_against_as_known_now_lists_the_late_facts_and_their_actors(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(
        floor, execution("ACTIVE", 0 * H), execution("STOPPED", 2 * H), execution("ACTIVE", 3 * H)
    )
    reported = await machine_history(floor)
    # Late, from three actors: an operator's reason, the adapter's buffered stop, the plant.
    await post(client, "operator", cloud_event(
        "mes.operator.downtime_reason.v1", "M1",
        {"reason": "planned/changeover", "start": (T0 + 2 * H).isoformat(),
         "end": (T0 + 3 * H).isoformat(), "operator": "op-7"},
        at=3 * H,
    ))  # fmt: skip
    floor.deliver()
    await from_adapter(floor, execution("STOPPED", 4 * H), execution("ACTIVE", 5 * H))
    floor.deliver()
    maintenance = PlantConfig.model_validate(
        {"planned_stops": [{"start": T0 + 6 * H, "end": T0 + 7 * H}], "effective_from": T0 - 24 * H}
    )
    configured = configuration_event("default", None, maintenance, T0 + 9 * H)
    assert configured is not None
    await floor.publisher.publish(configured)
    floor.deliver()
    diff = await get(
        client,
        "/api/v1/oee/diff",
        machine="M1",
        **{"from": T0.isoformat(), "to": (T0 + 8 * H).isoformat()},
        known_at=str(reported),
    )
    (bucket,) = diff["buckets"]
    then, now = bucket["as_reported"], bucket["as_known_now"]
    assert (then["planned_busy_time_s"], then["actual_production_time_s"]) == (28800, 25200)
    assert then["availability"] == pytest.approx(0.875)
    assert (now["planned_busy_time_s"], now["actual_production_time_s"]) == (21600, 18000)
    assert now["availability"] == pytest.approx(5 / 6)
    assert bucket["changed"] is True
    actors = [(c["type"], c["actor"]["kind"], c["actor"].get("role")) for c in bucket["changes"]]
    assert actors == [
        ("mes.operator.downtime_reason.v1", "key", "operator"),
        ("mes.machine.execution.v1", "adapter", "machine"),
        ("mes.machine.execution.v1", "adapter", "machine"),
        ("mes.hub.plant.configured.v1", "hub", None),
    ]
    assert "planned/changeover" in bucket["changes"][0]["summary"]
    # Known at the end of the log, nothing changed.
    same = await get(
        client,
        "/api/v1/oee/diff",
        machine="M1",
        **{"from": T0.isoformat(), "to": (T0 + 8 * H).isoformat()},
        known_at=str(floor.store.last_position()),
    )
    assert [b["changed"] for b in same["buckets"]] == [False] and same["buckets"][0][
        "changes"
    ] == []


async def test_order_progress_as_of_and_as_reported_against_now(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    def count(value: int, at: timedelta) -> CloudEvent:
        return cloud_event("mes.machine.partcount.v1", "M1", {"count": value, "kind": "all"}, at=at)

    await post(client, "erp", cloud_event("mes.erp.order.released.v1", "O-1", {
        "order_id": "O-1", "part_number": "P-1", "quantity": 10,
        "due": (T0 + 24 * H).isoformat()}))  # fmt: skip
    await from_adapter(floor, execution("ACTIVE", 0 * H), count(0, 0 * H))
    floor.deliver()
    await post(client, "operator", cloud_event(
        "mes.operator.order_started.v1", "M1", {"order_id": "O-1"}))  # fmt: skip
    await from_adapter(floor, count(5, H))
    reported = await machine_history(floor)
    # Late: the reading at 30 min, and scrap found at inspection.
    await from_adapter(floor, count(3, H / 2))
    await post(client, "operator", cloud_event(
        "mes.operator.scrap.v1", "M1", {"order_id": "O-1", "quantity": 1, "reason": "burr"},
        at=2 * H))  # fmt: skip
    floor.deliver()
    diff = await get(client, "/api/v1/audit/orders/O-1/progress/diff", known_at=str(reported))
    then, now = diff["as_reported"], diff["as_known_now"]
    assert (then["produced"], then["good"], then["scrapped"]) == (5, 5, 0)
    assert (now["produced"], now["good"], now["scrapped"]) == (5, 4, 1)
    assert diff["changed"] is True
    assert [(c["type"], c["actor"]["kind"]) for c in diff["changes"]] == [
        ("mes.machine.partcount.v1", "adapter"),
        ("mes.operator.scrap.v1", "key"),
    ]
    # As of 45 minutes in, as known now: the 3 parts read at 30 minutes.
    at = await get(client, "/api/v1/audit/orders/O-1/state", as_of=(T0 + 0.75 * H).isoformat())
    assert at["progress"]["produced"] == 3 and at["record"]["order_id"] == "O-1"
    # The scrap was reported at 2 h: by 45 minutes in, none.
    assert at["progress"]["scrapped"] == 0


async def diff_of(client: httpx.AsyncClient, known_at: str, **params: Any) -> Any:
    window = {"from": T0.isoformat(), "to": (T0 + 8 * H).isoformat()}
    return await get(client, "/api/v1/oee/diff", machine="M1", known_at=known_at,
                     **window, **params)  # fmt: skip


async def test_a_reason_given_the_next_morning_is_listed_for_the_stop_it_labels(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(
        floor, execution("ACTIVE", 0 * H), execution("STOPPED", 2 * H), execution("ACTIVE", 3 * H)
    )
    reported = await machine_history(floor)
    # Given at 06:00 the next day (event time), for 2h-3h of the night before.
    await post(client, "operator", cloud_event(
        "mes.operator.downtime_reason.v1", "M1",
        {"reason": "planned/changeover", "start": (T0 + 2 * H).isoformat(),
         "end": (T0 + 3 * H).isoformat(), "operator": "op-7"},
        at=24 * H,
    ))  # fmt: skip
    floor.deliver()
    (bucket,) = (await diff_of(client, str(reported)))["buckets"]
    assert bucket["as_reported"]["planned_busy_time_s"] == 28800
    assert bucket["as_known_now"]["planned_busy_time_s"] == 25200
    assert [c["type"] for c in bucket["changes"]] == ["mes.operator.downtime_reason.v1"]


async def test_a_late_stop_is_listed_for_every_bucket_it_goes_on_changing(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(floor, execution("ACTIVE", 0 * H))
    reported = await machine_history(floor)
    # A stop at 1h30 the adapter had buffered: the machine stood still for the rest of the
    # window (as far as anyone knows now).
    await from_adapter(floor, execution("STOPPED", 1.5 * H))
    floor.deliver()
    buckets = (await diff_of(client, str(reported), group_by="hour"))["buckets"]
    assert len(buckets) == 8
    changed = [b["changed"] for b in buckets]
    listed = [len(b["changes"]) for b in buckets]
    assert changed == [False, True, True, True, True, True, True, True]
    assert listed == [0, 1, 1, 1, 1, 1, 1, 1]
    assert buckets[3]["as_reported"]["actual_production_time_s"] == 3600
    assert buckets[3]["as_known_now"]["actual_production_time_s"] == 0


async def test_as_reported_uses_the_ideal_cycle_time_the_order_had_then(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    def count(value: int, at: timedelta) -> CloudEvent:
        return cloud_event("mes.machine.partcount.v1", "M1", {"count": value, "kind": "all"}, at=at)

    await post(client, "erp", cloud_event("mes.erp.order.released.v1", "O-1", {
        "order_id": "O-1", "part_number": "P-1", "quantity": 1000, "ideal_cycle_time_s": 60.0,
        "due": (T0 + 24 * H).isoformat()}))  # fmt: skip
    await from_adapter(floor, execution("ACTIVE", 0 * H), count(0, 0 * H))
    floor.deliver()
    await post(client, "operator", cloud_event(
        "mes.operator.order_started.v1", "M1", {"order_id": "O-1"}))  # fmt: skip
    await from_adapter(floor, count(60, 2 * H))
    reported = await machine_history(floor)
    # The ERP halves the ideal cycle time afterwards: the performance as reported stays.
    await post(client, "erp", cloud_event("mes.erp.order.changed.v1", "O-1", {
        "order_id": "O-1", "ideal_cycle_time_s": 30.0}, at=9 * H))  # fmt: skip
    floor.deliver()
    (bucket,) = (await diff_of(client, str(reported)))["buckets"]
    # 60 parts in 8 h running: 60 x 60 s = 1 h ideal; then 60 x 30 s = 30 min.
    assert bucket["as_reported"]["ideal_time_s"] == 3600
    assert bucket["as_known_now"]["ideal_time_s"] == 1800
    assert [(c["type"], c["actor"]["role"]) for c in bucket["changes"]] == [
        ("mes.erp.order.changed.v1", "erp")
    ]


async def test_a_shift_moved_by_a_calendar_change_shows_what_was_reported_apart(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    early = {"shifts": [{"name": "early", "start": "06:00", "end": "14:00"}],
             "effective_from": T0 - 24 * H}  # fmt: skip
    configured = configuration_event("default", None, PlantConfig.model_validate(early), T0)
    assert configured is not None
    await floor.publisher.publish(configured)
    await from_adapter(floor, execution("ACTIVE", 0 * H))
    reported = await machine_history(floor)
    later = {"shifts": [{"name": "early", "start": "07:00", "end": "15:00"}],
             "effective_from": T0 - 24 * H}  # fmt: skip
    moved = configuration_event(
        "default", floor.store.plant("default"), PlantConfig.model_validate(later), T0 + 9 * H
    )
    assert moved is not None
    await floor.publisher.publish(moved)
    floor.deliver()
    diff = await diff_of(client, str(reported), group_by="shift")
    now_starts = [b["start"] for b in diff["buckets"]]
    assert now_starts == ["2026-03-02T07:00:00Z"]
    assert diff["buckets"][0]["as_reported"] is None and diff["buckets"][0]["changed"] is True
    assert [b["start"] for b in diff["dropped"]] == ["2026-03-02T06:00:00Z"]
    assert [c["type"] for c in diff["buckets"][0]["changes"]] == ["mes.hub.plant.configured.v1"]


async def test_known_at_a_time_speaks_for_that_moment_and_not_beyond_the_views(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    await from_adapter(floor, execution("ACTIVE", 0 * H))
    first = await machine_history(floor)
    asked = datetime.now(UTC)
    state = await get(client, "/api/v1/audit/machines/M1/state", known_at=asked.isoformat())
    assert state["known_at"]["position"] == first
    assert state["known_at"]["moment"] == asked.isoformat().replace("+00:00", "Z")
    # Stored but not read by the views yet: not in the audit log, refused.
    ingestor = Ingestor(floor.store, "late", clock=lambda: T0 + 24 * H, hub_key=HUB_KEY)
    late = execution("STOPPED", H)
    body = encode_event(late)
    ingestor.commit(ingestor.prepare(
        [IncomingMessage("mes.default.machine.M1.execution", body, 1, signature(HUB_KEY, body))]
    ))  # fmt: skip
    beyond = floor.store.last_position()
    refused = await client.get(
        "/api/v1/audit/machines/M1/state", params={"known_at": str(beyond)}, headers=auth("auditor")
    )
    assert refused.status_code == 422 and "not in the audit log yet" in refused.json()["detail"]


async def test_an_event_with_no_room_for_its_actor_is_refused_at_once(
    floor: HubWithoutNats, client: httpx.AsyncClient
) -> None:
    crowded = execution("ACTIVE", 0 * H).model_copy(update={f"ext{n}": "x" for n in range(18)})
    refused = await client.post(
        "/api/v1/events", content=encode_event(crowded),
        headers={**auth("admin"), "Content-Type": "application/cloudevents+json"},
    )  # fmt: skip
    assert refused.status_code == 400 and "at most 17 extension" in refused.json()["detail"]
