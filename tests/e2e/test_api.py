"""The HTTP API over a real hub: auth, problem+json, CloudEvents in, machine state out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from contracts import encode_event
from hub.bootstrap import Hub
from tests.conftest import api_client, api_key, cloud_event, eventually

PROBLEM = "application/problem+json"


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub) as http:
        yield http


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(role)}"}


def structured(event_json: bytes, role: str = "admin") -> dict[str, object]:
    return {
        "content": event_json,
        "headers": {**auth(role), "Content-Type": "application/cloudevents+json"},
    }


async def test_no_key_is_401_problem_with_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/machines")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["status"] == 401


async def test_a_wrong_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/v1/machines", headers={"Authorization": "Bearer not-a-key-of-ours-000"}
    )
    assert response.status_code == 401
    assert "not valid" in response.json()["detail"]


async def test_a_role_not_admitted_is_403(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/machines", headers=auth("supplier"))
    assert response.status_code == 403
    assert response.headers["content-type"] == PROBLEM
    assert "supplier" in response.json()["detail"]


async def test_an_operator_may_not_release_erp_orders(client: httpx.AsyncClient) -> None:
    event = cloud_event(
        "mes.erp.order.cancelled.v1", "SO-1", {"order_id": "SO-1", "reason": "nope"}
    )
    response = await client.post("/api/v1/events", **structured(encode_event(event), "operator"))
    assert response.status_code == 403


async def test_structured_event_is_published_then_visible_on_the_machine(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    event = cloud_event(
        "mes.machine.execution.v1", "M1", {"execution": "FEED_HOLD", "mode": "MANUAL"}
    )
    response = await client.post("/api/v1/events", **structured(encode_event(event)))
    assert response.status_code == 202
    assert response.json() == {
        "id": event.id,
        "subject": "mes.default.machine.M1.execution",
        "duplicate": False,
    }
    await eventually(lambda: hub.store.machine("default", "M1") is not None)
    machine = await client.get("/api/v1/machines/M1", headers=auth("auditor"))
    assert machine.status_code == 200
    body = machine.json()
    assert (body["machine_id"], body["execution"], body["mode"]) == ("M1", "FEED_HOLD", "MANUAL")
    for field in ("availability", "program", "state_since", "parts_produced", "parts_bad"):
        assert field in body
    assert body["order_id"] is None and body["last_event_time"] is not None
    listing = await client.get("/api/v1/machines", headers=auth("operator"))
    assert [m["machine_id"] for m in listing.json()] == ["M1"]


async def test_binary_mode_event_is_accepted(client: httpx.AsyncClient, hub: Hub) -> None:
    # Operator events are for machines the hub knows: M4 reports first.
    await hub.publisher.publish(
        cloud_event("mes.machine.availability.v1", "M4", {"availability": "AVAILABLE"})
    )
    await eventually(lambda: hub.store.machine("default", "M4") is not None)
    headers = {
        **auth("operator"),
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "tablet-0001",
        "ce-source": "urn:tablet:7",
        "ce-type": "mes.operator.order_started.v1",
        "ce-time": "2026-03-02T06:15:00Z",
        "ce-subject": "M4",
    }
    response = await client.post(
        "/api/v1/events", content=json.dumps({"order_id": "SO-9"}), headers=headers
    )
    assert response.status_code == 202, response.text
    await eventually(lambda: hub.store.order("default", "SO-9") is not None)
    order = await client.get("/api/v1/orders/SO-9", headers=auth("erp"))
    # Started before the ERP's release arrived: running, with no release recorded yet.
    assert (order.json()["status"], order.json()["running_on"]) == ("running", ["M4"])
    assert order.json()["released_at"] is None


async def test_a_batch_is_published_whole(client: httpx.AsyncClient, hub: Hub) -> None:
    events = [
        json.loads(
            encode_event(cloud_event("mes.machine.partcount.v1", "M7", {"count": n, "kind": "all"}))
        )
        for n in (10, 11, 12)
    ]
    response = await client.post(
        "/api/v1/events",
        content=json.dumps(events),
        headers={**auth("admin"), "Content-Type": "application/cloudevents-batch+json"},
    )
    assert response.status_code == 202
    assert [r["id"] for r in response.json()] == [e["id"] for e in events]
    await eventually(lambda: hub.ingest_stats().applied == 3)


async def test_a_republished_event_is_reported_as_duplicate(client: httpx.AsyncClient) -> None:
    body = encode_event(
        cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"})
    )
    await client.post("/api/v1/events", **structured(body))
    again = await client.post("/api/v1/events", **structured(body))
    assert again.status_code == 202 and again.json()["duplicate"] is True


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"{nope", "application/cloudevents+json", 400, "not JSON"),
        (b'{"specversion": "1.0"}', "application/cloudevents+json", 400, "id: Field required"),
        (b"[]", "application/cloudevents-batch+json", 400, "non-empty JSON array"),
        (b"hello", "text/plain", 415, "send a CloudEvent"),
    ],
)
async def test_bad_requests_get_problem_json_naming_what_is_wrong(
    client: httpx.AsyncClient, body: bytes, content_type: str, status: int, words: str
) -> None:
    response = await client.post(
        "/api/v1/events", content=body, headers={**auth("admin"), "Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    assert words in response.json()["detail"]


async def test_bad_event_data_names_the_field_and_rule(client: httpx.AsyncClient) -> None:
    event = cloud_event("mes.machine.partcount.v1", "M1", {"count": 1, "kind": "all"})
    body = encode_event(event).replace(b'"kind":"all"', b'"kind":"good"')
    response = await client.post("/api/v1/events", **structured(body))
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "data.kind"


async def test_unknown_machine_and_order_are_404_problems(client: httpx.AsyncClient) -> None:
    for path in ("/api/v1/machines/NOPE", "/api/v1/orders/NOPE"):
        response = await client.get(path, headers=auth("admin"))
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM


async def test_every_api_route_requires_a_key(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method in operations:
            concrete = path.replace("{machine_id}", "M1").replace("{order_id}", "SO-1")
            response = await client.request(method, concrete)
            assert response.status_code == 401, (method, path)


async def test_healthz_answers_without_a_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.json() == {"status": "ok"}
