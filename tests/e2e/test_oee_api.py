"""Timeline and OEE through the HTTP API of a real hub (real NATS, real store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, time
from pathlib import Path

import httpx
import pytest

from contracts import CloudEvent
from hub.bootstrap import Hub
from projections.config import PlantConfigError, load_plant
from projections.rules.plant import PlantConfig, ShiftConfig
from tests.conftest import api_client, api_key, cloud_event, eventually

PLANT = PlantConfig(
    shifts=[
        ShiftConfig(name="early", start=time(6), end=time(14), breaks=[(time(10), time(10, 30))])
    ],
    reasons={"material": {"waiting": "unplanned"}, "planned": {"changeover": "planned"}},
)
AUTH = {"Authorization": f"Bearer {api_key('auditor')}"}
SHIFT = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T14:00:00Z"}


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub, PLANT) as http:
        yield http


def at(hh: int, mm: int = 0) -> datetime:
    return datetime.fromisoformat(f"2026-03-02T{hh:02d}:{mm:02d}:00+00:00")


async def shift_with_a_ten_minute_stop(hub: Hub) -> None:
    events = [
        cloud_event(
            "mes.erp.order.released.v1",
            "SO-1",
            {
                "order_id": "SO-1",
                "part_number": "P-1",
                "quantity": 500,
                "due": "2026-03-03T00:00:00Z",
                "ideal_cycle_time_s": 60,
            },
            at=at(5),
        ),
        cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"}, at=at(5)),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}, at=at(5, 59)),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 1000, "kind": "all"}, at=at(6)),
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(6)),
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "STOPPED"}, at=at(8)),
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=at(8, 10)),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 1400, "kind": "all"}, at=at(13)),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 0, "kind": "bad"}, at=at(6)),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 8, "kind": "bad"}, at=at(13)),
    ]
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == len(events))
    await hub.wait_projected()


async def test_shift_oee_through_the_api_with_the_raw_figures(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await shift_with_a_ten_minute_stop(hub)
    response = await client.get("/api/v1/oee", params={**SHIFT, "machine": "M1"}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["machine"], body["from"], body["group_by"]) == ("M1", "2026-03-02T06:00:00Z", None)
    (bucket,) = body["buckets"]
    assert bucket["planned_busy_time_s"] == 450 * 60
    assert bucket["actual_production_time_s"] == 440 * 60
    assert bucket["availability"] == pytest.approx(440 / 450)
    # 400 parts at 60 s ideal = 24,000 s in 26,400 s running; 8 bad
    assert (bucket["produced"], bucket["bad"], bucket["good"]) == (400, 8, 392)
    assert bucket["performance"] == pytest.approx(24_000 / 26_400)
    assert bucket["quality"] == pytest.approx(392 / 400)
    assert bucket["oee"] == pytest.approx(440 / 450 * 24_000 / 26_400 * 392 / 400)
    assert bucket["downtime_s_by_reason"] == {"unassigned": 600}
    assert bucket["provisional"] is False


async def test_grouped_by_shift_and_by_order(client: httpx.AsyncClient, hub: Hub) -> None:
    await shift_with_a_ten_minute_stop(hub)
    day = {"from": "2026-03-02T00:00:00Z", "to": "2026-03-03T00:00:00Z", "machine": "M1"}
    by_shift = (
        await client.get("/api/v1/oee", params={**day, "group_by": "shift"}, headers=AUTH)
    ).json()
    assert [b["label"] for b in by_shift["buckets"]] == ["early"]
    by_order = (
        await client.get("/api/v1/oee", params={**day, "group_by": "order"}, headers=AUTH)
    ).json()
    assert [b["label"] for b in by_order["buckets"]] == ["SO-1"]
    assert by_order["buckets"][0]["produced"] == 400


async def test_a_late_reason_relabels_the_stop_in_the_timeline(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await shift_with_a_ten_minute_stop(hub)
    timeline = await client.get("/api/v1/machines/M1/timeline", params=SHIFT, headers=AUTH)
    stops = [i for i in timeline.json()["intervals"] if i["state"] == "stopped"]
    assert [(s["start"], s["reason"]) for s in stops] == [("2026-03-02T08:00:00Z", "unassigned")]
    await hub.publisher.publish(
        cloud_event(
            "mes.operator.downtime_reason.v1",
            "M1",
            {
                "reason": "planned/changeover",
                "start": "2026-03-02T08:00:00Z",
                "end": "2026-03-02T08:10:00Z",
                "operator": "op7",
            },
            at=at(11),
        )
    )
    await eventually(lambda: hub.ingest_stats().applied == 11)
    await hub.wait_projected()
    oee = (await client.get("/api/v1/oee", params={**SHIFT, "machine": "M1"}, headers=AUTH)).json()
    assert oee["buckets"][0]["availability"] == 1.0  # a planned stop leaves PBT
    assert oee["buckets"][0]["planned_stop_s_by_reason"]["planned/changeover"] == 600


async def test_site_figure_without_machine(client: httpx.AsyncClient, hub: Hub) -> None:
    await shift_with_a_ten_minute_stop(hub)
    await hub.publisher.publish_many(
        [
            cloud_event(
                "mes.machine.availability.v1", "M2", {"availability": "AVAILABLE"}, at=at(5)
            ),
            cloud_event("mes.machine.execution.v1", "M2", {"execution": "ACTIVE"}, at=at(6)),
        ]
    )
    await eventually(lambda: hub.ingest_stats().applied == 12)
    await hub.wait_projected()
    site = (await client.get("/api/v1/oee", params=SHIFT, headers=AUTH)).json()
    assert site["machine"] is None
    assert site["buckets"][0]["planned_busy_time_s"] == 2 * 450 * 60
    assert site["buckets"][0]["availability"] == pytest.approx((440 + 450) / 900)


async def test_bad_windows_are_problems(client: httpx.AsyncClient, hub: Hub) -> None:
    await shift_with_a_ten_minute_stop(hub)
    backwards = {"from": SHIFT["to"], "to": SHIFT["from"], "machine": "M1"}
    response = await client.get("/api/v1/oee", params=backwards, headers=AUTH)
    assert response.status_code == 422 and "after from" in response.json()["detail"]
    naive = {"from": "2026-03-02T06:00:00", "to": "2026-03-02T14:00:00"}
    assert (await client.get("/api/v1/oee", params=naive, headers=AUTH)).status_code == 422
    unknown = await client.get("/api/v1/oee", params={**SHIFT, "machine": "NOPE"}, headers=AUTH)
    assert unknown.status_code == 404
    assert (await client.get("/api/v1/oee", params=SHIFT)).status_code == 401


def test_a_bad_plant_config_names_file_key_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text('[plant]\ntime_zone = "Mars/Olympus"\n[plant.reasons]\nx = { y = "maybe" }\n')
    with pytest.raises(PlantConfigError) as caught:
        load_plant(config)
    message = str(caught.value)
    assert str(config) in message and "plant.time_zone" in message and "Mars/Olympus" in message
    assert "plant.reasons" in message and "'x/y'" in message


async def test_order_progress_counts_what_the_floor_made(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await shift_with_a_ten_minute_stop(hub)
    await hub.publisher.publish(
        cloud_event("mes.operator.order_ended.v1", "M1", {"order_id": "SO-1"}, at=at(13))
    )
    await eventually(lambda: hub.ingest_stats().applied == 11)
    await hub.wait_projected()
    order = (await client.get("/api/v1/orders/SO-1", headers=AUTH)).json()
    progress = order["progress"]
    # 400 made, 8 bad: 392 good of 500
    assert (progress["produced"], progress["good"], progress["bad"]) == (400, 392, 8)
    assert (progress["remaining"], progress["percent_complete"]) == (108, pytest.approx(0.784))
    assert (progress["actual_start"], progress["actual_end"]) == (
        "2026-03-02T05:59:00Z",
        "2026-03-02T13:00:00Z",
    )
    # Running 06:00-08:00 and 08:10-13:00: 410 min for 400 parts, against 60 s ideal.
    assert progress["running_time_s"] == 410 * 60
    assert progress["actual_cycle_time_s"] == pytest.approx(61.5)
    assert progress["ideal_cycle_time_s"] == 60
    assert order["status"] == "ended"
    # Planned busy time on the order: 06:00-13:00 less the 30 min break = 390 min, 392 good.
    assert progress["busy_time_s"] == 390 * 60
    assert order["forecast"]["effective_cycle_time_s"] == pytest.approx(390 * 60 / 392)
    assert order["forecast"]["status"] == "late"  # due 2026-03-03, 108 still to make

    async def listed(**params: str) -> list[str]:
        response = await client.get("/api/v1/orders", params=params, headers=AUTH)
        return [o["order_id"] for o in response.json()]

    assert await listed() == ["SO-1"]
    assert await listed(status="ended", machine="M1") == ["SO-1"]
    assert await listed(status="running") == []
    assert await listed(customer="nobody") == []


def test_overlapping_shifts_are_refused_because_they_would_count_busy_time_twice(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text(
        "[[plant.shifts]]\nname = 'night'\nstart = '22:00'\nend = '06:00'\ndays = ['sun']\n"
        "[[plant.shifts]]\nname = 'early'\nstart = '05:30'\nend = '14:00'\ndays = ['mon']\n"
    )
    with pytest.raises(PlantConfigError) as caught:
        load_plant(config)
    assert "plant.shifts" in str(caught.value) and "'night' and 'early' overlap" in str(
        caught.value
    )


async def test_a_forecast_change_is_stored_on_the_order_once_and_announces_lateness(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await shift_with_a_ten_minute_stop(hub)
    stored = hub.ingest_stats().applied
    # 392 good parts in 451 busy minutes (05:59-13:30, one 24-hour shift a day): 69 s a part,
    # so the 108 still to make take about two hours more, well before the due date. The same
    # round tells the order's first progress (mes.hub.order.progressed.v1): 392 good.
    assert await hub.forecast_watch.check(now=at(13, 30)) == 2
    assert (hub.forecast_watch.published, hub.forecast_watch.progressed) == (1, 1)
    await eventually(lambda: hub.ingest_stats().applied == stored + 2)
    order = (await client.get("/api/v1/orders/SO-1", headers=AUTH)).json()
    first = order["published_forecast"]
    assert order["published_forecast_changes"] == 1
    assert (first["status"], first["remaining"], first["previous_status"]) == (
        "on_track",
        108,
        None,
    )
    assert at(15) < datetime.fromisoformat(first["eta"]) < at(16)

    # Nothing new to tell: no event. Republishing the same change is a duplicate, not news.
    await hub.wait_projected()  # the watch says nothing while the views are behind the store
    assert await hub.forecast_watch.check(now=at(13, 40)) == 0
    again = hub.forecast_watch.changes(datetime.fromisoformat("2026-03-03T01:00:00+00:00"))
    receipts = await hub.publisher.publish_many(again + again)
    assert [r.duplicate for r in receipts] == [False, True]  # (progress unchanged: not told)
    await eventually(lambda: hub.ingest_stats().applied == stored + 3)
    order = (await client.get("/api/v1/orders/SO-1", headers=AUTH)).json()
    late = order["published_forecast"]
    assert order["published_forecast_changes"] == 2
    assert (late["status"], late["previous_status"]) == ("late", "on_track")
    assert late["previous_eta"] == first["eta"]


async def test_only_the_hub_may_publish_forecast_changes(client: httpx.AsyncClient) -> None:
    event = cloud_event(
        "mes.hub.delivery_forecast.changed.v1",
        "SO-1",
        {"order_id": "SO-1", "status": "done", "eta": None, "due": None, "remaining": 0,
         "effective_cycle_time_s": None, "basis": "none"},
    )  # fmt: skip
    admin = {"Authorization": f"Bearer {api_key('admin')}"}
    response = await client.post(
        "/api/v1/events",
        content=event.model_dump_json(),
        headers={**admin, "Content-Type": "application/cloudevents+json"},
    )
    assert response.status_code == 403, response.text


async def test_each_day_is_judged_by_the_calendar_in_force_that_day(hub: Hub) -> None:
    # Round the clock until 2 March, then one early shift with a break (recorded back-dated).
    assert await hub.record_plant(PlantConfig())
    await eventually(lambda: hub.ingest_stats().applied == 1)
    early_from_march_2 = PLANT.model_copy(
        update={"effective_from": datetime.fromisoformat("2026-03-02T00:00:00+00:00")}
    )
    assert await hub.record_plant(early_from_march_2)
    await eventually(lambda: hub.ingest_stats().applied == 2)
    assert not await hub.record_plant(early_from_march_2)  # unchanged: nothing recorded
    running = [
        cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"},
                    at=datetime.fromisoformat("2026-03-01T00:00:00+00:00")),
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"},
                    at=datetime.fromisoformat("2026-03-01T00:00:00+00:00")),
    ]  # fmt: skip
    await hub.publisher.publish_many(running)
    await eventually(lambda: hub.ingest_stats().applied == 4)
    await hub.wait_projected()
    window = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-03T00:00:00Z", "machine": "M1"}
    async with api_client(hub, early_from_march_2) as client:
        by_day = await client.get("/api/v1/oee", params={**window, "group_by": "day"}, headers=AUTH)
        whole = await client.get("/api/v1/oee", params=window, headers=AUTH)
    assert by_day.status_code == 200, by_day.text
    first, second = by_day.json()["buckets"]
    assert first["planned_busy_time_s"] == 24 * 3600  # 1 March: 24 hours
    assert second["planned_busy_time_s"] == 7.5 * 3600  # 2 March: 06-14 less the break
    assert second["planned_stop_s_by_reason"] == {"planned/break": 1800}
    (total,) = whole.json()["buckets"]
    assert total["planned_busy_time_s"] == 31.5 * 3600


async def test_the_forecast_watch_stays_silent_while_the_views_are_behind(hub: Hub) -> None:
    from projections.processes.forecast_watch import ForecastWatch
    from projections.views.facts_view import FactsReader

    await shift_with_a_ten_minute_stop(hub)
    site = hub.settings.site
    behind = ForecastWatch(
        site, lambda: hub.store.orders(site), FactsReader(hub.views), PlantConfig(),
        hub.publisher, ready=lambda: False,
    )  # fmt: skip
    assert behind.changes(at(13, 30)) == []
    caught_up = ForecastWatch(
        site, lambda: hub.store.orders(site), FactsReader(hub.views), PlantConfig(),
        hub.publisher,
    )  # fmt: skip
    assert [(e.type, e.subject) for e in caught_up.changes(at(13, 30))] == [
        ("mes.hub.order.progressed.v1", "SO-1"),
        ("mes.hub.delivery_forecast.changed.v1", "SO-1"),
    ]


async def test_a_forecast_round_loads_only_the_orders_still_in_play(hub: Hub) -> None:
    from hub.bootstrap import open_orders

    def release(order_id: str) -> CloudEvent:
        return cloud_event("mes.erp.order.released.v1", order_id, {
            "order_id": order_id, "part_number": "P-1", "quantity": 10,
            "due": "2026-03-03T00:00:00Z", "ideal_cycle_time_s": 60,
        }, at=at(5))  # fmt: skip

    done = {"order_id": "SO-C", "status": "done", "eta": None, "due": None, "remaining": 0,
            "effective_cycle_time_s": None, "basis": "observed"}  # fmt: skip
    events = [
        release("SO-A"),
        release("SO-B"),
        cloud_event("mes.erp.order.cancelled.v1", "SO-B", {"order_id": "SO-B", "reason": "x"}),
        release("SO-C"),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-C"}, at=at(6)),
        cloud_event("mes.operator.order_ended.v1", "M1", {"order_id": "SO-C"}, at=at(7)),
        cloud_event("mes.hub.delivery_forecast.changed.v1", "SO-C", done, at=at(7)),
        release("SO-D"),
        cloud_event("mes.operator.order_started.v1", "M2", {"order_id": "SO-D"}, at=at(6)),
        # SO-E: a start tapped twice, one end, then "done": ended, not in play any more.
        release("SO-E"),
        cloud_event("mes.operator.order_started.v1", "M3", {"order_id": "SO-E"}, at=at(6)),
        cloud_event("mes.operator.order_started.v1", "M3", {"order_id": "SO-E"}, at=at(6, 30)),
        cloud_event("mes.operator.order_ended.v1", "M3", {"order_id": "SO-E"}, at=at(7)),
        cloud_event(
            "mes.hub.delivery_forecast.changed.v1", "SO-E", {**done, "order_id": "SO-E"}, at=at(7)
        ),
        # SO-F: announced "late" after its run, a stray second end, then resumed: in play.
        release("SO-F"),
        cloud_event("mes.operator.order_started.v1", "M4", {"order_id": "SO-F"}, at=at(6)),
        cloud_event("mes.operator.order_ended.v1", "M4", {"order_id": "SO-F"}, at=at(7)),
        cloud_event(
            "mes.hub.delivery_forecast.changed.v1",
            "SO-F",
            {**done, "order_id": "SO-F", "status": "late"},
            at=at(7),
        ),
        cloud_event("mes.operator.order_ended.v1", "M4", {"order_id": "SO-F"}, at=at(7, 30)),
        cloud_event("mes.operator.order_started.v1", "M4", {"order_id": "SO-F"}, at=at(8)),
    ]
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == len(events))
    await hub.wait_projected()
    in_play = open_orders(hub.store, hub.views, hub.settings.site)
    # Released, and running: in play. Cancelled, and ended after "done": not loaded any more.
    # Ended or running by event time, as the order folds its taps, not by counting them.
    assert sorted(o.order_id for o in in_play) == ["SO-A", "SO-D", "SO-F"]
