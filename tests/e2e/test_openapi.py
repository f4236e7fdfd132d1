"""The OpenAPI document tells clients the truth: Schemathesis sends what the document describes
(and what it does not allow) to a real hub over HTTP, and every answer must be one the document
describes — its status code, content type, headers and body. And the pages that show the
document work on a plant network without the internet."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr

from contracts import encode_event
from hub.api.app import create_app
from hub.bootstrap import Hub, api_context, build_hub
from hub.nats import EmbeddedNatsServer
from hub.server import ApiServer
from hub.settings import load_settings
from tests.conftest import (
    API_ROLES,
    T0,
    api_client,
    api_key,
    cloud_event,
    eventually,
    fresh_schema,
)

ADMIN = {"Authorization": f"Bearer {api_key('admin')}"}
EXAMPLES = 25  # per operation, mode and variant: about 10 s a store on this machine

# The checks that hold the API to its document. Not positive_data_acceptance: the document
# cannot say all the contract refuses (an event from the future, an order id other than the
# subject), which is answered 400, as documented.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def _config(store: str) -> schemathesis.Config:
    # NUL too: PostgreSQL cannot take it, so the API refuses it (tests below).
    generation = {"deterministic": True, "max-examples": EXAMPLES, "allow-x00": True}
    checks = {"enabled": False, **{name: {"enabled": True} for name in CHECKS}}
    return schemathesis.Config.from_dict({"checks": checks, "generation": generation})


KNOWN = {
    "machine_id": "M1",
    "order_id": "SO-1",
    "confirmation_id": "0" * 32,
    "partner_id": "P1",
    "endpoint_id": "e1",
    "key_id": "?",
    "delivery_id": "0" * 32,
}
# What a DELETE names: a partner and an endpoint of their own (the others stay for the rest).
DELETED = {"partner_id": "P2", "endpoint_id": "e3"}
# Operations no generated request can make succeed: a retry needs a dead confirmation, an
# import a real B2MML schedule (their successes are tested in test_outbox / test_erp_b2mml).
NEVER_TAKEN_HERE = {
    "POST /api/v1/erp/confirmations/{confirmation_id}/retry",
    "POST /api/v1/erp/b2mml",
    # A delivery needs an order event for the endpoint, a new endpoint a partner that exists
    # (tested in test_webhook_api).
    "POST /api/v1/webhooks",
    "GET /api/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}",
    "POST /api/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver",
}
RELEASED = {"order_id": "SO-1", "part_number": "P-1", "quantity": 10, "due": "2026-03-09T06:00:00Z"}
KNOWN_QUERY = {"machine": "M1", "known_at": "1"}
WINDOW = {"from": (T0 - timedelta(days=1)).isoformat(), "to": (T0 + timedelta(days=1)).isoformat()}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_hub(
    request: pytest.FixtureRequest, tmp_path: Path, nats_server: EmbeddedNatsServer
) -> AsyncIterator[Hub]:
    """A real hub on each store (its views on the same database), with a real nats-server."""
    store: dict[str, Any] = {"store": request.param}
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        store |= {"postgres_dsn": SecretStr(dsn), "postgres_schema": fresh_schema(dsn)}
    settings = load_settings(
        data_dir=tmp_path / "hub",
        nats_url=nats_server.url,
        api_keys=",".join(f"{role}:{api_key(role)}" for role in API_ROLES),
        **store,
    )
    running = await build_hub(settings)
    yield running
    await running.close()


@pytest.fixture
async def served(any_hub: Hub) -> AsyncIterator[str]:
    """The API over HTTP on a free port, in the hub's event loop (as ``mes-hub serve``)."""
    server = ApiServer(create_app(api_context(any_hub)), "127.0.0.1", 0)
    server.start()
    yield server.url
    await server.stop()


async def _floor(hub: Hub) -> None:
    """A machine that reports and an order that runs on it, so that the reads answer with data."""
    for event in (
        cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"}),
        cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}),
        cloud_event("mes.machine.partcount.v1", "M1", {"count": 7, "kind": "all"}),
        cloud_event("mes.erp.order.released.v1", "SO-1", RELEASED),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}),
    ):
        await hub.publisher.publish(event)
    await eventually(lambda: hub.store.order("default", "SO-1") is not None)
    # Two partners with an endpoint each (on a public address no one answers) and a key.
    async with api_client(hub) as http:
        for partner, endpoint in (("P1", "e1"), ("P2", "e2"), ("P1", "e3")):
            made = await http.post(
                "/api/v1/partners", headers=ADMIN,
                json={"partner_id": partner, "name": partner, "kind": "customer",
                      "all_orders": True},
            )  # fmt: skip
            assert made.status_code in (201, 409), made.text
            body = {"endpoint_id": endpoint, "partner_id": partner,
                    "url": "https://192.0.2.1/hook", "allow": ["192.0.2.0/24"]}  # fmt: skip
            assert (await http.post("/api/v1/webhooks", json=body, headers=ADMIN)).is_success
        key = await http.post("/api/v1/partners/P1/keys", headers=ADMIN)
        KNOWN["key_id"] = key.json()["key_id"]


def _variants(operation: schemathesis.APIOperation) -> list[dict[str, Any]]:
    """Everything generated; then the path naming what the hub has; then, for the reports, a
    window around it (generated ones are mostly refused: too long, or ending before they start)."""
    names = {p.name for p in operation.path_parameters}
    gone = DELETED if operation.method.upper() == "DELETE" and "key_id" not in names else {}
    path = {name: gone.get(name, KNOWN[name]) for name in names}
    variants: list[dict[str, Any]] = [{}]
    if path:
        variants.append({"path_parameters": path})
    asked = {p.name for p in operation.query}
    if {"from", "to"} <= asked:
        # (The OEE diff names its machine and a position of the log in the query.)
        known = {name: value for name, value in KNOWN_QUERY.items() if name in asked}
        variants.append({"path_parameters": path or None, "query": WINDOW | known})
    return variants


def _fuzz(base_url: str, config: schemathesis.Config) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Every operation in both modes (data the document allows, and data it does not), in each
    variant. Returns the statuses answered by operation, and the failures, one report per
    operation, mode and variant."""
    document = httpx.get(f"{base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document, config=config)
    answered: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            for fixed in _variants(operation):

                @settings(
                    max_examples=EXAMPLES,
                    derandomize=True,
                    database=None,
                    deadline=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: as found
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(mode, headers=ADMIN, **fixed))
                def check(case: schemathesis.Case) -> None:
                    response = case.call_and_validate(base_url=base_url, timeout=30)
                    answered[(operation.label, response.status_code)] += 1

                try:
                    check()
                except Unsatisfiable:  # nothing to break, e.g. a path parameter of any text
                    pass
                except (Exception, BaseExceptionGroup) as failure:
                    failures.append(f"{operation.label} ({mode.value}, {fixed or 'generated'}):")
                    failures[-1] += f"\n{failure}"
    return answered, failures


async def test_every_answer_is_one_the_openapi_document_describes(
    any_hub: Hub, served: str
) -> None:
    await _floor(any_hub)
    config = _config(any_hub.settings.store)
    answered, failures = await asyncio.to_thread(_fuzz, served, config)
    assert not failures, "\n\n".join(failures)
    # Each operation answered with data at least once: its success schema was checked too.
    succeeded = {operation for operation, status in answered if status < 300}
    never = {operation for operation, _ in answered} - succeeded - NEVER_TAKEN_HERE
    assert not never, f"never answered with data: {sorted(never)}"


BOTH_STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize(
    "any_hub",
    BOTH_STORES,
    indirect=True,
)
async def test_text_with_nul_is_answered_not_a_server_error(served: str) -> None:
    async with httpx.AsyncClient(base_url=served, headers=ADMIN) as client:
        for params in ({"customer": "\x00"}, {"after": "SO-\x00"}, {"machine": "M\x00"}):
            response = await client.get("/api/v1/orders", params=params)
            assert response.status_code < 500, (params, response.text)


@pytest.mark.parametrize(
    "any_hub",
    BOTH_STORES,
    indirect=True,
)
async def test_an_event_with_nul_in_its_data_does_not_stop_the_views(
    any_hub: Hub, served: str
) -> None:
    event = cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"})
    body = json.loads(encode_event(event)) | {"data": {"execution": "ACTIVE", "program": "a\x00"}}
    async with httpx.AsyncClient(base_url=served, headers=ADMIN) as client:
        sent = await client.post(
            "/api/v1/events",
            json=body,
            headers={"Content-Type": "application/cloudevents+json"},
        )
        assert sent.status_code == 400, sent.text  # refused: PostgreSQL cannot keep NUL
        (error,) = sent.json()["errors"]
        assert error["field"] == "data.program" and "must not contain NUL" in error["rule"]
        # The views go on: two counter readings after it are counted (from the views).
        for minute, count in ((1, 5), (2, 8)):
            reading = {"count": count, "kind": "all"}
            at = timedelta(minutes=minute)
            await any_hub.publisher.publish(
                cloud_event("mes.machine.partcount.v1", "M1", reading, at=at)
            )

        async def counted() -> bool:
            machine = await client.get("/api/v1/machines/M1")
            return machine.status_code == 200 and machine.json()["parts_produced"] == 3

        await eventually(counted, timeout=5)


# --- the docs pages, without the internet ---------------------------------------------------------


class _Assets(HTMLParser):
    """The URLs a page loads: scripts, styles, icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(str(found["src"]))
        if tag == "link" and found.get("href"):
            self.urls.append(str(found["href"]))


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(api_context(hub))), base_url="http://hub"
    ) as http:
        yield http


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js": "javascript", "swagger-ui.css": "text/css"}),
        ("/redoc", {"redoc.standalone.js": "javascript"}),
    ],
)
async def test_the_docs_pages_load_everything_from_the_hub(
    client: httpx.AsyncClient, page: str, assets: dict[str, str]
) -> None:
    # Open, without a key, as the OpenAPI document itself.
    response = await client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", response.text), "the page names another host"
    parser = _Assets()
    parser.feed(response.text)
    loaded = {url.rsplit("/", 1)[-1]: url for url in parser.urls}
    assert set(assets) | {"favicon.png"} == set(loaded)
    for name, url in loaded.items():
        assert url.startswith("/docs/static/"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert assets.get(name, "image/png") in asset.headers["content-type"], url
        assert len(asset.content) > 1000, url
    assert re.search(r"""(url: |spec-url=)['"]/openapi.json['"]""", response.text)
    assert (await client.get("/openapi.json")).status_code == 200
    if page == "/docs":  # Swagger UI would send the document's URL to validator.swagger.io
        assert '"validatorUrl": null' in response.text
