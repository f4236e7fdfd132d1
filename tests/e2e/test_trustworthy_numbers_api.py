"""Issue 8's rules through the HTTP API of a real hub (real NATS, real store, real views), as
worked examples with hand-computed answers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from contracts import CloudEvent
from hub.bootstrap import Hub
from projections.rules.plant import PlantConfig
from tests.conftest import api_client, api_key, cloud_event, eventually

AUTH = {"Authorization": f"Bearer {api_key('auditor')}"}
PLANT = PlantConfig.model_validate(
    {
        "ideal_cycle_times": {"part_numbers": {"P-7": 20.0}},
        "machines": {"SPARE-1": {"commissioned": "2026-03-02T12:00:00Z"}},
    }
)
BIG = 2**63 - 1


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub, PLANT) as http:
        yield http


def at(hh: int, mm: int = 0, day: int = 2) -> datetime:
    return datetime(2026, 3, day, hh, mm, tzinfo=UTC)


async def store(hub: Hub, events: list[CloudEvent]) -> None:
    before = hub.ingest_stats().applied
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == before + len(events))
    await hub.wait_projected()


def morning(machine: str, order: str) -> list[CloudEvent]:
    """A machine that reports execution but never availability; a counter with a reset; an
    order tapped in at 06:10 and ended at 08:00.

    Hand-computed, window 06:00-09:00 (default calendar: one 24-hour shift):
    - running 06:00-07:00 and 07:30-09:00 = 9,000 s of PBT 10,800 s (first report 06:00);
      stopped 07:00-07:30 = 1,800 s unassigned.
    - counter 100 (06:00) -> 110 (06:30, +10) -> 2 (07:10, reset, +2) -> 9 (08:00, +7)
      -> 12 (08:30, +3): 22 parts, one reset.
    - the order ran 06:10-08:00: the readings at 06:30, 07:10 and 08:00 report its parts
      (10 + 2 + 7 = 19); the one at 08:30 none of its.
    - by hour: 06-07 has 10; 07-08 has 2 + 7 = 9 (08:00 is that bucket's end); 08-09 has 3.
    """
    count = "mes.machine.partcount.v1"
    execution = "mes.machine.execution.v1"
    return [
        cloud_event(execution, machine, {"execution": "ACTIVE"}, at=at(6)),
        cloud_event(count, machine, {"count": 100, "kind": "all"}, at=at(6)),
        cloud_event("mes.operator.order_started.v1", machine, {"order_id": order}, at=at(6, 10)),
        cloud_event(count, machine, {"count": 110, "kind": "all"}, at=at(6, 30)),
        cloud_event(execution, machine, {"execution": "STOPPED"}, at=at(7)),
        cloud_event(count, machine, {"count": 2, "kind": "all"}, at=at(7, 10)),
        cloud_event(execution, machine, {"execution": "ACTIVE"}, at=at(7, 30)),
        cloud_event(count, machine, {"count": 9, "kind": "all"}, at=at(8)),
        cloud_event("mes.operator.order_ended.v1", machine, {"order_id": order}, at=at(8)),
        cloud_event(count, machine, {"count": 12, "kind": "all"}, at=at(8, 30)),
    ]


async def oee(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/api/v1/oee", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_three_arrival_orders_give_the_same_parts_timeline_oee_and_order_progress(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    facts = {m: morning(m, f"SO-{m}") for m in ("IN-ORDER", "REVERSED", "SHUFFLED")}
    facts["REVERSED"].reverse()
    random.Random(8).shuffle(facts["SHUFFLED"])
    for events in facts.values():
        await store(hub, events)
    window = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T09:00:00Z"}
    seen = []
    for machine in facts:
        state = (await client.get(f"/api/v1/machines/{machine}", headers=AUTH)).json()
        assert (state["parts_produced"], state["counter_resets"]) == (22, 1)
        (whole,) = (await oee(client, machine=machine, **window))["buckets"]
        assert (whole["planned_busy_time_s"], whole["actual_production_time_s"]) == (10_800, 9_000)
        assert whole["availability"] == pytest.approx(9_000 / 10_800)  # never reported avail.
        assert whole["downtime_s_by_reason"] == {"unassigned": 1_800}
        assert whole["produced"] == 22
        hours = (await oee(client, machine=machine, group_by="hour", **window))["buckets"]
        assert [b["produced"] for b in hours] == [10, 9, 3]
        order = (await client.get(f"/api/v1/orders/SO-{machine}", headers=AUTH)).json()
        assert order["progress"]["produced"] == 19
        # The run is 06:10-08:00 whichever tap arrived first.
        assert (order["status"], order["running_on"]) == ("ended", [])
        assert [(r["start"], r["end"]) for r in order["runs"]] == [
            ("2026-03-02T06:10:00Z", "2026-03-02T08:00:00Z")
        ]
        assert order["progress"]["actual_end"] == "2026-03-02T08:00:00Z"
        assert state["order_id"] is None
        timeline = await client.get(
            f"/api/v1/machines/{machine}/timeline", params=window, headers=AUTH
        )
        intervals = [
            (i["start"], i["end"], i["state"], i["reason"]) for i in timeline.json()["intervals"]
        ]
        seen.append((intervals, whole["oee"], [b["produced"] for b in hours]))
    assert seen[0] == seen[1] == seen[2]
    # Cut where the order starts (06:10) and ends (08:00) as well as where the state changes.
    assert [(start[11:16], state) for start, _, state, _ in seen[0][0]] == [
        ("06:00", "running"),
        ("06:10", "running"),
        ("07:00", "stopped"),
        ("07:30", "running"),
        ("08:00", "running"),
    ]


async def test_a_late_order_start_re_attributes_the_parts_it_covers(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    count = "mes.machine.partcount.v1"
    await store(
        hub,
        [
            cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(6)),
            cloud_event(count, "M1", {"count": 0, "kind": "all"}, at=at(6)),
            cloud_event(count, "M1", {"count": 5, "kind": "all"}, at=at(6, 20)),
            cloud_event(count, "M1", {"count": 9, "kind": "all"}, at=at(6, 40)),
        ],
    )
    day = {"from": "2026-03-02T00:00:00Z", "to": "2026-03-03T00:00:00Z", "machine": "M1"}
    assert (await oee(client, group_by="order", **day))["buckets"] == []
    # The operator's taps arrive after the readings: SO-1 ran 06:10-06:30.
    await store(
        hub,
        [
            cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}, at=at(6, 10)),
            cloud_event("mes.operator.order_ended.v1", "M1", {"order_id": "SO-1"}, at=at(6, 30)),
        ],
    )
    (bucket,) = (await oee(client, group_by="order", **day))["buckets"]
    assert (bucket["label"], bucket["produced"]) == ("SO-1", 5)
    order = (await client.get("/api/v1/orders/SO-1", headers=AUTH)).json()
    assert order["progress"]["produced"] == 5


async def test_hourly_buckets_add_up_to_the_shift_with_the_last_reading_at_its_end(
    hub: Hub,
) -> None:
    plant = PlantConfig.model_validate(
        {"shifts": [{"name": "early", "start": "06:00", "end": "14:00"}]}
    )
    events = [cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(6))]
    events += [
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 7 * h, "kind": "all"}, at=at(6 + h))
        for h in range(9)
    ]  # 0 at 06:00 ... 56 at 14:00, the shift's end
    await store(hub, events)
    shift = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T14:00:00Z", "machine": "M1"}
    async with api_client(hub, plant) as client:
        hours = (await oee(client, group_by="hour", **shift))["buckets"]
        (whole,) = (await oee(client, group_by="shift", **shift))["buckets"]
    assert [b["produced"] for b in hours] == [7] * 8
    assert whole["produced"] == 56 == sum(b["produced"] for b in hours)


async def test_a_day_before_any_report_has_no_downtime_for_the_site(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await store(hub, morning("M1", "SO-1"))
    sunday = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
    # M1 first reported on Monday 06:00; SPARE-1 never reported and is commissioned from
    # Monday 12:00: Sunday is nobody's downtime.
    (site,) = (await oee(client, **sunday))["buckets"]
    assert (site["planned_busy_time_s"], site["downtime_s_by_reason"]) == (0, {})
    (m1,) = (await oee(client, machine="M1", **sunday))["buckets"]
    assert (m1["planned_busy_time_s"], m1["availability"]) == (0, None)
    timeline = await client.get("/api/v1/machines/M1/timeline", params=sunday, headers=AUTH)
    assert {i["state"] for i in timeline.json()["intervals"]} == {"not_commissioned"}
    # From its commissioning, SPARE-1's silence is offline downtime in the site figures:
    # 12:00-13:00, M1 still running (1 h) and SPARE-1 offline (1 h).
    noon = {"from": "2026-03-02T12:00:00Z", "to": "2026-03-02T13:00:00Z"}
    (site,) = (await oee(client, **noon))["buckets"]
    assert (site["planned_busy_time_s"], site["actual_production_time_s"]) == (7_200, 3_600)
    assert site["downtime_s_by_reason"] == {"unassigned": 3_600}
    before_and_after = {"from": "2026-03-02T11:00:00Z", "to": "2026-03-02T13:00:00Z"}
    timeline = await client.get(
        "/api/v1/machines/SPARE-1/timeline", params=before_and_after, headers=AUTH
    )
    assert [(i["start"][11:16], i["state"]) for i in timeline.json()["intervals"]] == [
        ("11:00", "not_commissioned"),
        ("12:00", "offline"),
    ]


async def test_a_jump_to_2_63_changes_nothing_and_warns_until_acknowledged(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    count = "mes.machine.partcount.v1"
    readings = [(0, at(6)), (BIG, at(6, 10)), (5, at(6, 20)), (BIG, at(6, 30))]
    await store(
        hub,
        [cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(6))]
        + [cloud_event(count, "M1", {"count": c, "kind": "all"}, at=t) for c, t in readings],
    )
    state = (await client.get("/api/v1/machines/M1", headers=AUTH)).json()
    assert (state["parts_produced"], state["implausible_readings"]) == (5, 2)
    (jump,) = [c for c in state["conditions"] if c["native_code"] == "MES_HUB_COUNTER_JUMP"]
    assert jump["level"] == "warning"
    assert jump["since"] == "2026-03-02T06:30:00Z"
    (bucket,) = (
        await oee(client, machine="M1", **{"from": "2026-03-02T06:00Z", "to": "2026-03-02T07:00Z"})
    )["buckets"]
    assert (bucket["produced"], bucket["implausible_readings"]) == (5, 2)
    # Acknowledged by a normal condition of that code (a machine event: admin or adapter).
    await store(
        hub,
        [
            cloud_event(
                "mes.machine.condition.v1",
                "M1",
                {"level": "normal", "native_code": "MES_HUB_COUNTER_JUMP"},
                at=at(6, 40),
            )
        ],
    )
    state = (await client.get("/api/v1/machines/M1", headers=AUTH)).json()
    assert [c["native_code"] for c in state["conditions"]] == []
    assert state["parts_produced"] == 5


async def test_the_timeline_and_oee_end_at_now(client: httpx.AsyncClient, hub: Hub) -> None:
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    await store(
        hub, [cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=started)]
    )
    window = {
        "from": started.isoformat(),
        "to": (started + timedelta(hours=5)).isoformat(),  # four hours in the future
    }
    asked = datetime.now(UTC)
    timeline = await client.get("/api/v1/machines/M1/timeline", params=window, headers=AUTH)
    (interval,) = timeline.json()["intervals"]
    assert interval["state"] == "running"
    assert asked <= datetime.fromisoformat(interval["end"]) <= datetime.now(UTC)
    (bucket,) = (await oee(client, machine="M1", **window))["buckets"]
    assert bucket["availability"] == 1.0  # not 0.2: the four future hours are not downtime
    assert 3_600 <= bucket["planned_busy_time_s"] < 3_600 + 60
    assert bucket["provisional"] is True


async def test_an_order_without_an_ideal_cycle_time_takes_its_part_numbers(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    # No PRI from the ERP; the plant says P-7 takes 20 s: 30 parts in 20 minutes running ->
    # ideal time 600 s of 1,200 s: performance 0.5.
    count = "mes.machine.partcount.v1"
    release = {
        "order_id": "SO-7",
        "part_number": "P-7",
        "quantity": 100,
        "due": "2026-03-09T00:00:00Z",
    }
    await store(
        hub,
        [
            cloud_event("mes.erp.order.released.v1", "SO-7", release, at=at(5)),
            cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(6)),
            cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-7"}, at=at(6)),
            cloud_event(count, "M1", {"count": 0, "kind": "all"}, at=at(6)),
            cloud_event(count, "M1", {"count": 30, "kind": "all"}, at=at(6, 20)),
        ],
    )
    window = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T06:20:00Z", "machine": "M1"}
    (bucket,) = (await oee(client, **window))["buckets"]
    assert (bucket["ideal_time_s"], bucket["parts_without_ideal_time"]) == (600, 0)
    assert bucket["performance"] == pytest.approx(0.5)


async def test_an_unknown_reason_code_over_nats_is_kept_and_counted_as_a_warning(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    # The API refuses the code (tests/e2e/test_edges_api.py); a gateway publishing straight to
    # NATS gets it stored: the 20-minute stop carries it, unplanned, with a warning count.
    execution = "mes.machine.execution.v1"
    reason = {"reason": "coolant/empty", "start": "2026-03-02T06:30:00Z", "operator": "op-7",
              "end": "2026-03-02T06:50:00Z"}  # fmt: skip
    await store(
        hub,
        [
            cloud_event(execution, "M1", {"execution": "ACTIVE"}, at=at(6)),
            cloud_event(execution, "M1", {"execution": "STOPPED"}, at=at(6, 30)),
            cloud_event(execution, "M1", {"execution": "ACTIVE"}, at=at(6, 50)),
            cloud_event("mes.operator.downtime_reason.v1", "M1", reason, at=at(6, 55)),
        ],
    )
    window = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T07:00:00Z", "machine": "M1"}
    (bucket,) = (await oee(client, **window))["buckets"]
    assert bucket["downtime_s_by_reason"] == {"coolant/empty": 1_200}
    assert bucket["stops_with_unknown_reason"] == 1
    assert bucket["availability"] == pytest.approx(40 / 60)
