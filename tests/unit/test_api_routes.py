"""The API without NATS: the fake publisher keeps what the API publishes, and the test hands it
to ingest itself (the Ingestor on a store and views in SQLite files in a temp dir)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import CloudEvent, encode_event
from hub.api.app import create_app
from hub.bootstrap import all_views, api_context
from hub.domain import actor_of, order_aggregate_id
from hub.ingest import IncomingMessage, Ingestor
from hub.nats_auth import signature
from hub.ports import InMemoryPublisher, PublishReceipt
from hub.settings import Settings, load_settings
from hub.store import EventStore, StoreUnavailable
from projections.views.database import SQLiteViews
from projections.views.orders_view import orders_in_play
from projections.views.runner import ProjectionWorker
from tests.conftest import API_ROLES, T0, api_client, api_key, cloud_event

PROBLEM = "application/problem+json"


HUB_KEY = bytes(range(32))


@dataclass
class HubWithoutNats:
    """What ``api_context`` takes of a hub, with the fake publisher in place of NATS."""

    settings: Settings
    store: EventStore
    views: SQLiteViews
    publisher: InMemoryPublisher = field(default_factory=InMemoryPublisher)
    delivered: int = 0

    @property
    def api_publisher(self) -> InMemoryPublisher:  # the API's (in a real hub, its own identity)
        return self.publisher

    def deliver(self) -> None:
        """Ingest what was published since the last call, and bring the views up to date."""
        fresh = self.publisher.published[self.delivered :]
        # Signed as the hub's API publisher signs: ingest takes the actor (the API key) only so.
        bodies = [(subject, encode_event(event.envelope)) for subject, event in fresh]
        messages = [
            IncomingMessage(subject, body, self.delivered + n, signature(HUB_KEY, body))
            for n, (subject, body) in enumerate(bodies, start=1)
        ]
        if messages:
            ingestor = Ingestor(
                self.store, "test", clock=lambda: T0 + timedelta(days=30), hub_key=HUB_KEY
            )
            ingestor.commit(ingestor.prepare(messages))
        self.delivered += len(fresh)
        worker = ProjectionWorker(all_views(), self.store, self.views)
        worker.prepare()
        worker.catch_up()


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[HubWithoutNats]:
    settings = load_settings(
        data_dir=tmp_path / "hub",
        api_keys=",".join(f"{role}:{api_key(role)}" for role in API_ROLES),
    )
    hub = HubWithoutNats(settings, EventStore(settings), SQLiteViews(tmp_path / "views.sqlite"))
    yield hub
    hub.views.close()
    hub.store.close()


@pytest.fixture
async def client(floor: HubWithoutNats) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(floor) as http:
        yield http


def auth(role: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(role)}"}


async def post(client: httpx.AsyncClient, role: str, *events: CloudEvent) -> httpx.Response:
    body = json.dumps([json.loads(encode_event(e)) for e in events])
    headers = {**auth(role), "Content-Type": "application/cloudevents-batch+json"}
    return await client.post("/api/v1/events", content=body, headers=headers)


def released(order_id: str, **data: Any) -> CloudEvent:
    fields = {"part_number": "P-1", "quantity": 10, "due": "2026-03-09T00:00:00Z"} | data
    return cloud_event("mes.erp.order.released.v1", order_id, {"order_id": order_id, **fields})


def started(machine: str, order_id: str, minutes: int = 0) -> CloudEvent:
    return cloud_event("mes.operator.order_started.v1", machine, {"order_id": order_id},
                       at=timedelta(minutes=minutes))  # fmt: skip


def ended(machine: str, order_id: str, minutes: int) -> CloudEvent:
    return cloud_event("mes.operator.order_ended.v1", machine, {"order_id": order_id},
                       at=timedelta(minutes=minutes))  # fmt: skip


def available(machine: str) -> CloudEvent:
    return cloud_event("mes.machine.availability.v1", machine, {"availability": "AVAILABLE"})


async def test_the_store_keeps_which_key_sent_an_event_and_no_client_may_say_so(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    assert (await post(client, "admin", available("M1"))).status_code == 202
    floor.deliver()
    assert (await post(client, "operator", started("M1", "O-1"))).status_code == 202
    floor.deliver()
    stored = floor.store.machine_history("default", "M1")
    me = [(await client.get("/api/v1/me", headers=auth(r))).json() for r in ("operator", "admin")]
    operator_key, admin_key = (m["key_id"].removeprefix("key-") for m in me)
    # Keyed by the hub's secret: not the key's plain hash, which a reader could test guesses on.
    assert admin_key != hashlib.sha256(api_key("admin").encode()).hexdigest()[:16]
    assert [actor_of(e) for e in stored if hasattr(e, "event_id")] == [
        {"kind": "key", "id": f"key-{admin_key}", "role": "admin"},
        {"kind": "key", "id": f"key-{operator_key}", "role": "operator"},
    ]
    assert api_key("operator") not in json.dumps([e.__dict__ for e in stored], default=str)
    # A client naming an actor itself is refused, whoever it names.
    forged = started("M1", "O-2").model_copy(update={"mesactorid": f"key-{admin_key}"})
    refused = await post(client, "operator", forged)
    assert refused.status_code == 400 and "mesactorid" in refused.json()["detail"]


async def test_an_event_is_published_and_only_ingest_makes_it_visible(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    event = cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"})
    response = await client.post(
        "/api/v1/events",
        content=encode_event(event),
        headers={**auth(), "Content-Type": "application/cloudevents+json"},
    )
    assert response.status_code == 202
    assert response.json() == {
        "id": event.id,
        "subject": "mes.default.machine.M1.execution",
        "duplicate": False,
    }
    assert [s for s, _ in floor.publisher.published] == ["mes.default.machine.M1.execution"]
    # The API does not write the store: one way in.
    assert (await client.get("/api/v1/machines/M1", headers=auth())).status_code == 404
    floor.deliver()
    machine = await client.get("/api/v1/machines/M1", headers=auth("auditor"))
    assert machine.status_code == 200 and machine.json()["execution"] == "ACTIVE"
    # Stored already: answered as a duplicate, not published again.
    again = await post(client, "admin", event)
    assert again.json() == [{**response.json(), "duplicate": True}]
    assert len(floor.publisher.published) == 1


@pytest.mark.parametrize(
    ("role", "event", "status"),
    [
        ("operator", available("M1"), 403),
        ("operator", released("SO-1"), 403),
        ("erp", available("M1"), 403),
        ("erp", released("SO-1"), 202),
        ("admin", released("SO-1"), 202),
        ("auditor", released("SO-1"), 403),
        ("supplier", released("SO-1"), 403),
    ],
)
async def test_each_role_sends_only_its_event_families(
    client: httpx.AsyncClient, role: str, event: CloudEvent, status: int
) -> None:
    response = await post(client, role, event)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.headers["content-type"] == PROBLEM


async def test_an_operator_event_for_a_machine_never_heard_of_is_404(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    response = await post(client, "operator", started("M9", "SO-1"))
    assert response.status_code == 404 and response.json()["machine_id"] == "M9"
    assert floor.publisher.published == []


async def test_a_publisher_that_fails_is_a_503(floor: HubWithoutNats) -> None:
    class Down(InMemoryPublisher):
        async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
            raise ConnectionError("no NATS")

    floor.publisher = Down()
    async with api_client(floor) as client:
        response = await post(client, "admin", available("M1"))
    assert response.status_code == 503 and response.headers["content-type"] == PROBLEM
    assert "ConnectionError" in response.json()["detail"]


async def orders_on(floor: HubWithoutNats, client: httpx.AsyncClient) -> None:
    """Six orders, each status among them; SO-1 ran on M1 though the ERP named M2; SO-6 is only
    a change ahead of its release."""
    await post(client, "admin", available("M1"), available("M2"))
    floor.deliver()  # operator events are for machines the hub knows
    await post(
        client,
        "erp",
        released("SO-1", customer="ACME", machine_id="M2"),
        released("SO-2", customer="ACME"),
        released("SO-3", customer="Initech"),
        released("SO-5"),
        cloud_event("mes.erp.order.cancelled.v1", "SO-5", {"order_id": "SO-5", "reason": "x"}),
        cloud_event("mes.erp.order.changed.v1", "SO-6", {"order_id": "SO-6", "customer": "ACME"}),
    )
    taps = await post(
        client,
        "operator",
        started("M1", "SO-1"),
        ended("M1", "SO-1", 30),
        started("M2", "SO-2", 40),
        started("M1", "SO-4", 50),  # ahead of its release: unreleased, running
    )
    assert taps.status_code == 202, taps.text
    floor.deliver()


async def listed(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/api/v1/orders", params=params, headers=auth())
    assert response.status_code == 200, response.text
    return [o["order_id"] for o in response.json()]


async def test_the_order_list_filters_as_the_orders_say(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    await orders_on(floor, client)
    everything = (await client.get("/api/v1/orders", headers=auth())).json()
    assert [o["order_id"] for o in everything] == ["SO-1", "SO-2", "SO-3", "SO-4", "SO-5", "SO-6"]
    # Each status filter finds exactly the orders whose own status it is.
    statuses = {o["order_id"]: o["status"] for o in everything}
    assert set(statuses.values()) == {"unreleased", "released", "running", "ended", "cancelled"}
    for status in ("unreleased", "released", "running", "ended", "cancelled"):
        assert await listed(client, status=status) == [
            order for order, its in statuses.items() if its == status
        ]
    assert await listed(client, customer="ACME") == ["SO-1", "SO-2", "SO-6"]
    # By machine: the one the ERP named, or one the order ran on.
    assert await listed(client, machine="M1") == ["SO-1", "SO-4"]
    assert await listed(client, machine="M2") == ["SO-1", "SO-2"]
    assert await listed(client, machine="M1", status="running") == ["SO-4"]
    assert await listed(client, machine="M3") == []


async def test_the_order_list_comes_a_page_at_a_time(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    await orders_on(floor, client)
    pages, url = [], "/api/v1/orders?limit=2"
    while url:
        response = await client.get(url, headers=auth())
        pages.append([o["order_id"] for o in response.json()])
        link = response.headers.get("link")
        url = link[1 : link.index(">")] if link else ""
        assert not link or link.endswith('; rel="next"')
    assert pages == [["SO-1", "SO-2"], ["SO-3", "SO-4"], ["SO-5", "SO-6"]]
    assert await listed(client, customer="ACME", limit=1, after="SO-1") == ["SO-2"]
    for limit in (0, 1001):
        response = await client.get("/api/v1/orders", params={"limit": limit}, headers=auth())
        assert response.status_code == 422 and response.headers["content-type"] == PROBLEM


async def test_an_order_is_answered_whole(client: httpx.AsyncClient, floor: HubWithoutNats) -> None:
    await orders_on(floor, client)
    body = (await client.get("/api/v1/orders/SO-1", headers=auth("erp"))).json()
    assert (body["status"], body["customer"], body["machine_id"]) == ("ended", "ACME", "M2")
    assert body["runs"] == [
        {"machine_id": "M1", "start": "2026-03-02T06:00:00Z", "end": "2026-03-02T06:30:00Z"}
    ]
    assert body["published_forecast"] is None and body["progress"]["produced"] == 0


def test_every_answer_of_the_api_is_described(floor: HubWithoutNats) -> None:
    schema = create_app(api_context(floor)).openapi()  # type: ignore[arg-type]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            ok = next(status for status in answers if status.startswith("2"))
            if ok == "204":  # (no content, by definition)
                assert "content" not in answers[ok], (method, path)
                continue
            content = answers[ok]["content"]["application/json"]["schema"]
            assert (
                "$ref" in content
                or "$ref" in content.get("items", {})
                or any(
                    "$ref" in s or "$ref" in s.get("items", {}) for s in content.get("anyOf", ())
                )
            ), (method, path, content)
            if path.startswith("/api/v1"):
                for status in ("401", "403", "422"):
                    problem = answers[status]["content"][PROBLEM]["schema"]
                    assert problem == {"$ref": "#/components/schemas/ProblemDetails"}


def test_the_oee_answers_are_described_with_the_window_as_from_and_to(
    floor: HubWithoutNats,
) -> None:
    schema = create_app(api_context(floor)).openapi()  # type: ignore[arg-type]
    components = schema["components"]["schemas"]
    for path in ("/api/v1/oee", "/api/v1/machines/{machine_id}/timeline"):
        answer = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        described = components[answer["schema"]["$ref"].rsplit("/", 1)[-1]]
        assert {"from", "to"} <= set(described["required"]), path
        assert {"from", "to"} <= set(described["properties"]), path
        assert not {"start", "end"} & set(described["properties"]), path
        assert described["properties"]["from"]["format"] == "date-time", path


async def test_forecasts_follow_the_orders_in_play_only(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    await orders_on(floor, client)
    found = set(orders_in_play(floor.views))
    # SO-1 ended, and no final forecast was announced for it yet: still followed, to get one.
    assert {order_aggregate_id("default", f"SO-{n}") for n in (1, 2, 3, 4)} <= found
    # Not SO-5 (cancelled), nor SO-6 (changed ahead of its release: not followed yet).
    assert not found & {order_aggregate_id("default", f"SO-{n}") for n in (5, 6)}


class CountedBody:
    """A request body of ``total`` bytes sent in 64 KiB chunks, counting what was read of it."""

    CHUNK = 64 * 1024

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.total:
            self.sent += self.CHUNK
            yield b" " * self.CHUNK


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_1_mib_is_refused_without_being_read_whole(
    client: httpx.AsyncClient, declared: bool
) -> None:
    body = CountedBody(50 * 1024 * 1024)
    headers = {**auth("operator"), "Content-Type": "application/cloudevents-batch+json"}
    if declared:
        headers["Content-Length"] = str(body.total)
    response = await client.post("/api/v1/events", content=body, headers=headers)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "larger than 1048576 bytes" in response.json()["detail"]
    # Read no further than the limit and a chunk (none at all when the length said it).
    assert body.sent <= (0 if declared else 1024 * 1024) + CountedBody.CHUNK


# --- what the OpenAPI document says (issue 10 item 4) ------------------------------------------


def test_the_reads_document_429_and_503_with_retry_after_and_posts_their_body(
    floor: HubWithoutNats,
) -> None:
    from contracts import EVENT_TYPES

    schema = create_app(api_context(floor)).openapi()  # type: ignore[arg-type]
    problem = {"$ref": "#/components/schemas/ProblemDetails"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            if path.startswith("/api/v1"):
                challenge = answers["401"]["headers"]["WWW-Authenticate"]
                assert challenge["required"], (method, path)
            # Read through the pool: the reads (partners and webhook endpoints are read in the
            # hub's own process: a few rows of its registry and outbox; /me reads nothing) and
            # the ERP retry.
            own = path.startswith(("/api/v1/partners", "/api/v1/webhooks")) or path == "/api/v1/me"
            pooled = (method == "get" and not own) or path.endswith("/retry")
            if path.startswith("/api/v1") and pooled:
                for status in ("429", "503"):
                    assert answers[status]["content"] == {PROBLEM: {"schema": problem}}
                    retry_after = answers[status]["headers"]["Retry-After"]
                    assert retry_after["required"] and retry_after["schema"]["type"] == "integer"
            else:
                assert "429" not in answers, (method, path)
    for path in ("/api/v1/oee", "/api/v1/machines/{machine_id}/timeline"):
        assert "404" in schema["paths"][path]["get"]["responses"], path
    post = schema["paths"]["/api/v1/events"]["post"]
    assert {"400", "404", "413", "415", "503"} <= set(post["responses"])
    body = post["requestBody"]["content"]
    event = {"$ref": "#/components/schemas/CloudEvent"}
    assert body["application/cloudevents+json"]["schema"] == event
    assert body["application/cloudevents-batch+json"]["schema"]["items"] == event
    assert body["application/json"]["schema"]["type"] == "object"  # binary mode: the data
    headers = {p["name"] for p in post["parameters"] if p["in"] == "header"}
    assert {"ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-subject"} <= headers
    # One envelope a type, chosen by type: every type a role may send, none of the hub's own.
    one_of = schema["components"]["schemas"]["CloudEvent"]["discriminator"]["mapping"]
    assert set(one_of) == {t.name for t in EVENT_TYPES.values() if t.stream != "hub"}
    for reference in one_of.values():
        assert reference.rsplit("/", 1)[-1] in schema["components"]["schemas"]


async def test_a_problem_with_retry_after_says_so() -> None:
    from fastapi import FastAPI

    from hub.api.problems import Problem, install_problem_handlers

    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/busy")
    async def busy() -> None:
        raise Problem(429, "ask again in 3 s", headers={"Retry-After": "3"})

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://hub"
    ) as http:
        response = await http.get("/busy")
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["title"] == "Too Many Requests"


async def test_binary_mode_headers_are_percent_decoded_and_the_content_type_read_loosely(
    client: httpx.AsyncClient, floor: HubWithoutNats
) -> None:
    # CloudEvents HTTP binding 3.1.3.2: header values are percent-encoded (and trimmed).
    headers = {
        **auth("admin"),
        "ce-specversion": "1.0",
        "ce-id": "plc%2D7",
        "ce-source": " urn:plant%20A:line%E2%80%931 ",
        "ce-type": "mes.machine.execution.v1",
        "ce-time": "2026-03-02T06:15:00Z",
        "ce-subject": "M1",
    }
    data = json.dumps({"execution": "ACTIVE"})
    for content_type in ("Application/JSON; charset=utf-8", None):
        sent = headers | ({"Content-Type": content_type} if content_type else {})
        response = await client.post("/api/v1/events", content=data, headers=sent)
        assert response.status_code == 202, response.text
    envelope = floor.publisher.published[0][1].envelope
    assert (envelope.id, envelope.source) == ("plc-7", "urn:plant A:line\u20131")
    bad = await client.post(
        "/api/v1/events", content=data, headers=headers | {"ce-source": "urn:%FF"}
    )
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "ce-source"
    wrong = await client.post(
        "/api/v1/events", content=data, headers=headers | {"Content-Type": "text/plain"}
    )
    assert wrong.status_code == 415 and wrong.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    "window",
    [
        {"from": "0001-01-01T00:00:00+01:00", "to": "0001-01-02T00:00:00+01:00"},
        {"from": "9999-12-31T00:00:00Z", "to": "9999-12-31T23:00:00Z"},
    ],
    ids=["year-1", "year-9999"],
)
async def test_a_window_at_the_ends_of_time_is_refused_not_a_server_error(
    client: httpx.AsyncClient, floor: HubWithoutNats, window: dict[str, str]
) -> None:
    await post(client, "admin", available("M1"))
    floor.deliver()
    for path in ("/api/v1/oee", "/api/v1/machines/M1/timeline"):
        try:
            response = await client.get(path, params=window, headers=auth())
        except OverflowError:  # what the in-process client sees of a 500
            pytest.fail(f"{path}: OverflowError")
        assert response.status_code == 422, (path, response.text)


async def test_a_store_that_does_not_answer_is_a_503_with_retry_after_never_a_500(
    client: httpx.AsyncClient, floor: HubWithoutNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    await post(client, "admin", available("M1"))
    floor.deliver()

    def gone(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("cannot connect to PostgreSQL at db:5432: connection refused")

    monkeypatch.setattr(EventStore, "machines", gone)
    monkeypatch.setattr(EventStore, "received_events", gone)
    read = await client.get("/api/v1/machines", headers=auth())
    write = await post(client, "admin", available("M2"))
    for response in (read, write):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["retry-after"] == "5"
        assert "db:5432" not in response.text  # where and why go to the log, not to clients
