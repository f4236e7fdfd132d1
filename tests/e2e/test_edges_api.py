"""Issue 8 through POST /api/v1/events of a real hub (real NATS, real store): time from the
future, strict types, bounded extensions, duplicates by source + id, operator events only for
machines the hub knows, downtime reasons only from the catalog."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from contracts import CloudEvent
from hub.bootstrap import Hub, build_hub
from hub.nats import STREAM
from hub.settings import Settings
from projections.rules.plant import MachinePlantConfig, PlantConfig
from tests.conftest import api_client, api_key, cloud_event, eventually

PROBLEM = "application/problem+json"
CATALOG = {"material": {"waiting": "unplanned"}, "mechanical": {"spindle": "unplanned"}}
PLANT = PlantConfig(reasons=CATALOG, machines={"M9": MachinePlantConfig()})


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub, PLANT) as http:
        yield http


def post(
    client: httpx.AsyncClient, event: dict[str, Any] | list[dict[str, Any]], role: str = "admin"
) -> Any:
    content_type = "application/cloudevents" + ("-batch" if isinstance(event, list) else "")
    return client.post(
        "/api/v1/events",
        content=json.dumps(event),
        headers={
            "Authorization": f"Bearer {api_key(role)}",
            "Content-Type": content_type + "+json",
        },
    )


def as_json(event: CloudEvent) -> dict[str, Any]:
    return json.loads(event.model_dump_json(exclude_none=True))  # type: ignore[no-any-return]


async def last_seq(hub: Hub) -> int:
    return int((await hub.jetstream.stream_info(STREAM)).state.last_seq)


async def reported(hub: Hub, machine_id: str) -> None:
    """The machine reports once (over NATS) and the hub has applied it."""
    await hub.publisher.publish(
        cloud_event("mes.machine.availability.v1", machine_id, {"availability": "AVAILABLE"})
    )
    await eventually(lambda: hub.store.machine("default", machine_id) is not None)


def reason_event(machine_id: str, reason: str, event_id: str | None = None) -> dict[str, Any]:
    return as_json(
        cloud_event(
            "mes.operator.downtime_reason.v1",
            machine_id,
            {"reason": reason, "start": "2026-03-02T08:00:00Z", "operator": "op7"},
            event_id=event_id,
        )
    )


# --- rule 10 ----------------------------------------------------------------------------------


async def test_an_event_from_year_9999_is_refused_and_not_published(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    before = await last_seq(hub)
    event = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
    event["time"] = "9999-12-31T00:00:00Z"
    response = await post(client, event)
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["detail"].startswith("time: 9999-12-31T00:00:00Z is ")
    assert problem["detail"].endswith(
        " days ahead of the hub's clock; at most 300 s allowed ([hub] max_clock_skew_s)"
    )
    assert problem["errors"][0]["field"] == "time"
    assert await last_seq(hub) == before


async def test_ten_days_ahead_is_refused_naming_the_days(client: httpx.AsyncClient) -> None:
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(days=10, hours=1)
    event = as_json(
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=ahead)
    )
    response = await post(client, event)
    assert response.status_code == 400
    when = ahead.isoformat().replace("+00:00", "Z")
    assert response.json()["detail"] == (
        f"time: {when} is 10 days ahead of the hub's clock; at most 300 s allowed "
        "([hub] max_clock_skew_s)"
    )


async def test_a_batch_with_one_event_from_the_future_is_refused_whole(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    before = await last_seq(hub)
    good = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
    future = {**good, "id": "later", "time": "2100-01-01T00:00:00Z"}
    response = await post(client, [good, future])
    assert response.status_code == 400
    assert response.json()["detail"].startswith("event 1: time: 2100-01-01T00:00:00Z is ")
    assert await last_seq(hub) == before


# --- rule 12 ----------------------------------------------------------------------------------

PARTCOUNT = "mes.machine.partcount.v1"
WRONG_TYPES = [
    ("count as a string", PARTCOUNT, {"count": "7", "kind": "all"}, "data.count"),
    ("count as a float", PARTCOUNT, {"count": 5.0, "kind": "all"}, "data.count"),
    ("count as a boolean", PARTCOUNT, {"count": True, "kind": "all"}, "data.count"),
    ("quantity as a boolean", "mes.operator.scrap.v1", {"quantity": True, "reason": "x"},
     "data.quantity"),
    ("reason as a number", "mes.operator.scrap.v1", {"quantity": 1, "reason": 3}, "data.reason"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("type_", "data", "field"), [w[1:] for w in WRONG_TYPES], ids=[w[0] for w in WRONG_TYPES]
)
async def test_a_value_of_the_wrong_json_type_is_refused(
    client: httpx.AsyncClient, hub: Hub, type_: str, data: dict[str, Any], field: str
) -> None:
    await reported(hub, "M1")
    response = await post(client, as_json(cloud_event(type_, "M1", data)))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["field"] == field


async def test_a_time_as_a_number_is_refused(client: httpx.AsyncClient) -> None:
    event = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
    response = await post(client, {**event, "time": 1772431200})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "time"


@pytest.mark.parametrize(
    ("extension", "words"),
    [
        ({"hall": {"number": 2}}, "hall: an extension attribute must be a string, an integer or a "
         "boolean (CloudEvents 1.0 type system), not an object"),
        ({"hall": [2]}, "not an array"),
        ({"hall": None}, "not null"),
        ({"hall": 2.5}, "not a floating-point number"),
        ({"hall": "x" * 1025}, "hall: an extension attribute string has at most 1024 characters"),
        ({"hall": 2**31}, "hall: a CloudEvents Integer is a 32-bit signed integer"),
        ({f"x{n}": n for n in range(21)}, "at most 20 extension attributes are allowed, got 21"),
    ],
    ids=["object", "array", "null", "float", "long string", "big integer", "21 extensions"],
)  # fmt: skip
async def test_extension_attributes_must_be_bounded_scalars(
    client: httpx.AsyncClient, extension: dict[str, Any], words: str
) -> None:
    event = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
    response = await post(client, {**event, **extension})
    assert response.status_code == 400
    assert words in response.json()["detail"]


async def test_scalar_extension_attributes_are_accepted(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    event = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
    extensions = {"hall": 2, "replayed": True, "gateway": "urn:gw:7"}
    response = await post(client, {**event, **extensions})
    assert response.status_code == 202, response.text
    await eventually(lambda: hub.ingest_stats().applied == 1)
    assert hub.ingest_stats().rejected == 0


# --- rule 13 ----------------------------------------------------------------------------------


async def test_one_id_from_two_sources_is_two_events(client: httpx.AsyncClient, hub: Hub) -> None:
    a = as_json(
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, event_id="42")
    )
    b = {**a, "source": "urn:plc:B", "data": {"execution": "STOPPED"}}
    first = await post(client, a)
    second = await post(client, b)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["duplicate"] is False
    assert second.json() == {
        "id": "42",
        "subject": "mes.default.machine.M1.execution",
        "duplicate": False,
    }
    again = await post(client, a)  # the same source and id: the same event
    assert again.json()["duplicate"] is True
    await eventually(lambda: hub.ingest_stats().applied == 2)
    await hub.wait_caught_up()
    stored = [
        (e.event_id, e.source)
        for e in hub.store.machine_history("default", "M1")
        if hasattr(e, "execution")
    ]
    assert stored == [("42", "urn:test"), ("42", "urn:plc:B")]


async def test_a_repeat_after_the_window_is_answered_duplicate_and_not_published(
    settings: Settings,
) -> None:
    hub = await build_hub(settings.model_copy(update={"duplicate_window_s": 1.0}))
    try:
        async with api_client(hub) as client:
            event = as_json(cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}))
            assert (await post(client, event)).json()["duplicate"] is False
            await eventually(lambda: hub.ingest_stats().applied == 1)
            await asyncio.sleep(1.5)  # NATS has forgotten the message id; the store has not
            before = await last_seq(hub)
            again = await post(client, event)
            assert again.status_code == 202
            assert again.json() == {
                "id": event["id"],
                "subject": "mes.default.machine.M1.execution",
                "duplicate": True,
            }
            # In a batch, with a new event beside it: only the new one is published.
            new = {**event, "id": "fresh-1"}
            answers = (await post(client, [event, new])).json()
            assert [a["duplicate"] for a in answers] == [True, False]
            assert await last_seq(hub) == before + 1
            await eventually(lambda: hub.ingest_stats().applied == 2)
            assert hub.ingest_stats().duplicates == 0
    finally:
        await hub.close()


# --- rule 5: operator events need a machine the hub knows --------------------------------------


async def test_an_operator_event_for_a_machine_never_heard_of_is_404(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    before = await last_seq(hub)
    started = as_json(cloud_event("mes.operator.order_started.v1", "M7", {"order_id": "SO-1"}))
    response = await post(client, started, role="operator")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["detail"] == (
        "no machine 'M7' at site 'default': it has never reported and is not configured in "
        "[plant.machines]"
    )
    assert problem["machine_id"] == "M7"
    assert await last_seq(hub) == before
    assert hub.store.machine("default", "M7") is None


async def test_operator_events_alone_do_not_make_a_machine(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    # A phantom left by an earlier operator event over NATS: still not a machine that reported.
    await hub.publisher.publish(
        cloud_event("mes.operator.order_started.v1", "M7", {"order_id": "SO-1"})
    )
    await eventually(lambda: hub.store.machine("default", "M7") is not None)
    ended = as_json(cloud_event("mes.operator.order_ended.v1", "M7", {"order_id": "SO-1"}))
    assert (await post(client, ended, role="operator")).status_code == 404


async def test_operator_events_for_reported_or_configured_machines_are_accepted(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await reported(hub, "M1")
    on_m1 = as_json(cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}))
    on_m9 = as_json(cloud_event("mes.operator.order_started.v1", "M9", {"order_id": "SO-2"}))
    assert (await post(client, on_m1, role="operator")).status_code == 202
    assert (await post(client, on_m9, role="operator")).status_code == 202  # configured
    # A machine reporting in the same batch, before the operator's event, is known.
    first_report = as_json(
        cloud_event("mes.machine.availability.v1", "M5", {"availability": "AVAILABLE"})
    )
    on_m5 = as_json(cloud_event("mes.operator.order_started.v1", "M5", {"order_id": "SO-3"}))
    assert (await post(client, [first_report, on_m5])).status_code == 202
    await eventually(lambda: hub.ingest_stats().applied == 5)  # M1's report + four
    # The other way round, the operator's event would come first: refused.
    on_m6 = as_json(cloud_event("mes.operator.order_started.v1", "M6", {"order_id": "SO-4"}))
    m6_report = as_json(
        cloud_event("mes.machine.availability.v1", "M6", {"availability": "AVAILABLE"})
    )
    late = await post(client, [on_m6, m6_report])
    assert late.status_code == 404
    assert late.json()["detail"].startswith("event 0: no machine 'M6'")


async def test_a_batch_names_the_first_event_for_an_unknown_machine(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await reported(hub, "M1")
    events = [
        as_json(cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"})),
        as_json(cloud_event("mes.operator.scrap.v1", "M8", {"quantity": 1, "reason": "burr"})),
        as_json(cloud_event("mes.operator.scrap.v1", "M8", {"quantity": 2, "reason": "burr"})),
    ]
    response = await post(client, events, role="operator")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("event 1: no machine 'M8' at site 'default'")


# --- rule 8: downtime reasons from the catalog ------------------------------------------------


async def test_an_unknown_reason_code_is_refused_listing_the_catalog(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await reported(hub, "M1")
    before = await last_seq(hub)
    response = await post(client, reason_event("M1", "electrical/fuse"), role="operator")
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["detail"] == (
        "data.reason: unknown reason code 'electrical/fuse'; the reason catalog's codes are: "
        "material/waiting, mechanical/spindle"
    )
    assert problem["reason_codes"] == ["material/waiting", "mechanical/spindle"]
    assert problem["errors"][0]["field"] == "data.reason"
    # A branch of the tree is not a code either: only its leaves are.
    branch = await post(client, reason_event("M1", "mechanical"), role="operator")
    assert branch.status_code == 400
    assert await last_seq(hub) == before


async def test_a_catalog_code_is_accepted_and_over_nats_an_unknown_one_is_kept(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    await reported(hub, "M1")
    known = await post(client, reason_event("M1", "mechanical/spindle"), role="operator")
    assert known.status_code == 202, known.text
    unknown = CloudEvent.model_validate(reason_event("M1", "electrical/fuse"))
    await hub.publisher.publish(unknown)
    await eventually(lambda: hub.ingest_stats().applied == 3)
    await hub.wait_caught_up()
    assert hub.ingest_stats().rejected == 0
    reasons = [e.reason for e in hub.store.machine_history("default", "M1") if hasattr(e, "reason")]
    assert reasons == ["mechanical/spindle", "electrical/fuse"]
