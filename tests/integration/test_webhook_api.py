"""Partners and their webhook endpoints through the API, over a real hub (nats-server, SQLite,
the views process) and loopback receivers that verify every signature with the third-party
``standardwebhooks`` package: a partner registered by the admin gets a secret once and only the
orders it may see; its key reads only its own; a rotation signs with both secrets; a paused or
gone (410, so disabled) endpoint misses nothing once resumed; a delivery can be read with its
attempts, redelivered, and everything since a moment replayed — the same webhook-id each time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from hub.bootstrap import Hub, build_hub
from hub.domain import actor_of, webhooks_aggregate_id
from hub.outbox import InMemoryDestination, standard_webhooks_retry
from hub.settings import Settings
from projections.rules.plant import PlantConfig
from tests.conftest import T0, api_client, api_key, cloud_event, eventually
from tests.erp_standins import served
from tests.integration.test_webhooks import FAST

ADMIN = {"Authorization": f"Bearer {api_key('admin')}"}
# (progress, sent on the forecast watch's timer, is left out: these tests count what arrives)
TOLD = ["mes.order.started.v1", "mes.order.completed.v1", "mes.order.confirmed.v1"]


class Receiver:
    """A partner's endpoint: answers ``answer`` (204 by default); keeps, in arrival order,
    each webhook it took, verified with ``secrets`` — every one of them must verify it."""

    def __init__(self) -> None:
        self.secrets: list[str] = []
        self.answer = 204
        self.taken: list[tuple[str, dict[str, Any]]] = []  # (webhook-id, the event)
        self.refused = 0
        self.raw: list[tuple[bytes, dict[str, str]]] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> Response:
            body, headers = await request.body(), dict(request.headers)
            if self.answer >= 300:
                self.refused += 1
                return Response(status_code=self.answer)
            events = [Webhook(secret).verify(body, headers) for secret in self.secrets]
            self.raw.append((body, headers))
            self.taken.append((headers["webhook-id"], events[0]))
            return Response(status_code=204)

    def told(self) -> list[tuple[str, str]]:
        return [(e["subject"], e["type"].removeprefix("mes.order.")) for _, e in self.taken]

    def ids(self) -> list[str]:
        return [webhook_id for webhook_id, _ in self.taken]


def order(order_id: str, customer: str, part: str, machine: str) -> list[Any]:
    """Released, started, 2 of 2 made and ended, just after now (after the endpoints exist)."""
    base = datetime.now(UTC) - T0
    at = [base + timedelta(seconds=s) for s in (-60, 1, 1, 2, 3)]
    release = {"order_id": order_id, "part_number": part, "quantity": 2, "customer": customer,
               "due": (T0 + base + timedelta(days=3)).isoformat()}  # fmt: skip
    return [
        cloud_event("mes.erp.order.released.v1", order_id, release, at=at[0]),
        cloud_event("mes.operator.order_started.v1", machine, {"order_id": order_id}, at=at[1]),
        cloud_event("mes.machine.partcount.v1", machine, {"count": 0, "kind": "all"}, at=at[2]),
        cloud_event("mes.machine.partcount.v1", machine, {"count": 2, "kind": "all"}, at=at[3]),
        cloud_event("mes.operator.order_ended.v1", machine, {"order_id": order_id}, at=at[4]),
    ]


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    running = await build_hub(
        settings, plant=PlantConfig(time_zone="UTC"), destinations=[InMemoryDestination("erp")],
        retry=FAST, webhook_retry=standard_webhooks_retry(scale=0.0005),
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.close()


async def register(
    http: httpx.AsyncClient, partner: dict[str, Any], endpoint_id: str, url: str, **more: Any
) -> tuple[str, str]:
    """The partner, its endpoint and a key: (the endpoint's secret, the partner's key)."""
    made = await http.post("/api/v1/partners", json=partner, headers=ADMIN)
    assert made.status_code == 201, made.text
    body = {"endpoint_id": endpoint_id, "partner_id": partner["partner_id"], "url": f"{url}/hook",
            "allow": ["127.0.0.1/32"], "timeout_s": 3, "events": TOLD, **more}  # fmt: skip
    endpoint = await http.post("/api/v1/webhooks", json=body, headers=ADMIN)
    assert endpoint.status_code == 201, endpoint.text
    key = await http.post(f"/api/v1/partners/{partner['partner_id']}/keys", headers=ADMIN)
    assert key.status_code == 201 and key.json()["role"] == partner["kind"]
    return endpoint.json()["secret"], key.json()["key"]


async def test_partners_get_what_they_may_see_and_their_keys_read_only_their_own(
    hub: Hub,
) -> None:
    # Customer C7 may see customer C-7's orders; supplier S1 those of part P-2, which it
    # supplies. SO-1 (C-7, P-1) goes to C7 only, SO-2 (C-8, P-2) to S1 only, SO-3 (C-9, P-3)
    # to no one. Each key reads its own partner, endpoint and deliveries, and nothing else.
    c7, s1 = Receiver(), Receiver()
    async with served(c7.app) as url_7, served(s1.app) as url_1, api_client(hub) as http:
        c7_partner = {"partner_id": "C7", "name": "Customer Seven", "kind": "customer",
                      "customers": ["C-7"]}  # fmt: skip
        s1_partner = {"partner_id": "S1", "name": "Supplier One", "kind": "supplier",
                      "part_numbers": ["P-2"]}  # fmt: skip
        secret_7, key_7 = await register(http, c7_partner, "c7-main", url_7)
        secret_1, key_1 = await register(http, s1_partner, "s1-main", url_1, sign_ed25519=True)
        c7.secrets, s1.secrets = [secret_7], [secret_1]
        assert secret_7.startswith("whsec_") and secret_7 != secret_1
        await hub.publisher.publish_many(
            [*order("SO-1", "C-7", "P-1", "M1"), *order("SO-2", "C-8", "P-2", "M2"),
             *order("SO-3", "C-9", "P-3", "M3")]
        )  # fmt: skip
        await eventually(lambda: len(c7.taken) == 3 and len(s1.taken) == 3, timeout=60)
        await asyncio.sleep(1.0)  # (nothing more comes)
        assert c7.told() == [("SO-1", "started.v1"), ("SO-1", "completed.v1"),
                             ("SO-1", "confirmed.v1")]  # fmt: skip
        assert [subject for subject, _ in s1.told()] == ["SO-2"] * 3
        assert {e["data"]["customer"] for _, e in s1.taken} == {"C-8"}

        as_7 = {"Authorization": f"Bearer {key_7}"}
        as_1 = {"Authorization": f"Bearer {key_1}"}
        # The secret is shown once: never again, to anyone.
        shown = (await http.get("/api/v1/webhooks/c7-main", headers=ADMIN)).text
        assert secret_7 not in shown and secret_7.removeprefix("whsec_") not in shown
        # A partner's key: its own, and 404 for another's (not even whether it exists).
        mine = await http.get("/api/v1/webhooks", headers=as_7)
        assert [e["endpoint_id"] for e in mine.json()] == ["c7-main"]
        partners = (await http.get("/api/v1/partners", headers=as_1)).json()
        assert [p["partner_id"] for p in partners] == ["S1"]
        for path in ("/api/v1/webhooks/s1-main", "/api/v1/webhooks/s1-main/deliveries",
                     "/api/v1/partners/S1"):  # fmt: skip
            refused = await http.get(path, headers=as_7)
            assert refused.status_code == 404, path
            assert refused.headers["content-type"] == "application/problem+json"
        for method, path in (("post", "/api/v1/partners"), ("post", "/api/v1/partners/C7/keys"),
                             ("delete", "/api/v1/webhooks/c7-main"),
                             ("get", "/api/v1/machines")):  # fmt: skip
            assert (await http.request(method, path, headers=as_7)).status_code == 403, path
        deliveries = (await http.get("/api/v1/webhooks/c7-main/deliveries", headers=as_7)).json()
        assert sorted(d["payload"]["subject"] for d in deliveries) == ["SO-1"] * 3
        assert {d["status"] for d in deliveries} == {"delivered"}
        assert {d["webhook_id"] for d in deliveries} == set(c7.ids())
        one = await http.get(
            f"/api/v1/webhooks/c7-main/deliveries/{deliveries[0]['id']}", headers=as_7
        )
        history = one.json()["history"]
        assert [a["outcome"] for a in history] == ["delivered"] and history[0]["status_code"] == 204
        # The v1a key is published for partners who verify with a public key.
        public = await http.get("/api/v1/webhooks/public-key", headers=as_1)
        assert public.json()["public_key"].startswith("whpk_")
        # A revoked key reads nothing more.
        key_id = (await http.get("/api/v1/partners/C7", headers=ADMIN)).json()["keys"][0]["key_id"]
        revoked = await http.delete(f"/api/v1/partners/C7/keys/{key_id}", headers=ADMIN)
        assert revoked.status_code == 204
        assert (await http.get("/api/v1/webhooks", headers=as_7)).status_code == 401


async def test_rotation_pause_gone_resume_redeliver_and_replay_lose_nothing(hub: Hub) -> None:
    partner = {"partner_id": "C7", "name": "C7", "kind": "customer", "customers": ["C-7"]}
    receiver = Receiver()
    async with served(receiver.app) as url, api_client(hub) as http:
        old, _ = await register(http, partner, "c7-main", url)
        receiver.secrets = [old]
        # A rotation: while it overlaps, each webhook verifies with the old and the new one.
        rotated = await http.post("/api/v1/webhooks/c7-main/rotate-secret", headers=ADMIN,
                                  params={"overlap_s": 3600})  # fmt: skip
        new = rotated.json()["secret"]
        assert new != old and len(rotated.json()["secrets"]) == 2
        receiver.secrets = [old, new]
        await hub.publisher.publish_many(order("SO-1", "C-7", "P-1", "M1"))
        await eventually(lambda: len(receiver.taken) == 3, timeout=60)

        # Paused: SO-2 happens meanwhile and is kept; resumed, it arrives, in order.
        paused = await http.post("/api/v1/webhooks/c7-main/pause", headers=ADMIN)
        assert paused.json()["status"] == "paused"
        await hub.publisher.publish_many(order("SO-2", "C-7", "P-1", "M2"))
        await asyncio.sleep(3.0)
        assert len(receiver.taken) == 3
        assert (
            await http.post("/api/v1/webhooks/c7-main/resume", headers=ADMIN)
        ).status_code == 200
        await eventually(lambda: len(receiver.taken) == 6, timeout=60)

        # 410 Gone: the hub disables the endpoint, saying why; SO-3 is kept meanwhile.
        receiver.answer = 410
        await hub.publisher.publish_many(order("SO-3", "C-7", "P-1", "M3"))

        async def disabled() -> bool:
            found = (await http.get("/api/v1/webhooks/c7-main", headers=ADMIN)).json()
            return bool(found["status"] == "disabled" and "410" in found["status_reason"])

        await eventually(disabled, timeout=60)
        receiver.answer = 204
        await asyncio.sleep(2.0)
        assert len(receiver.taken) == 6  # nothing while disabled
        resumed = await http.post("/api/v1/webhooks/c7-main/resume", headers=ADMIN)
        assert resumed.json()["requeued"] >= 1
        await eventually(lambda: len(receiver.taken) == 9, timeout=60)
        assert receiver.told() == [
            (order_id, kind) for order_id in ("SO-1", "SO-2", "SO-3")
            for kind in ("started.v1", "completed.v1", "confirmed.v1")
        ]  # fmt: skip
        first_ids = receiver.ids()
        assert len(set(first_ids)) == 9

        # Redelivered: the same webhook-id again, and nothing else.
        listed = (await http.get("/api/v1/webhooks/c7-main/deliveries", headers=ADMIN)).json()
        so_1_started = next(d for d in listed if d["webhook_id"] == first_ids[0])
        again = await http.post(
            f"/api/v1/webhooks/c7-main/deliveries/{so_1_started['id']}/redeliver", headers=ADMIN
        )
        assert again.status_code == 202
        await eventually(lambda: len(receiver.taken) == 10, timeout=60)
        assert receiver.ids()[9] == first_ids[0]

        # Replayed since before SO-1 (said in another offset: the same moment): all nine
        # again, each with its id, in order per order.
        east = timezone(timedelta(hours=5))
        since = (datetime.now(UTC) - timedelta(hours=1)).astimezone(east).isoformat()
        replayed = await http.post(
            "/api/v1/webhooks/c7-main/replay", params={"since": since}, headers=ADMIN
        )
        assert replayed.status_code == 202 and replayed.json()["requeued"] == 9
        await eventually(lambda: len(receiver.taken) == 19, timeout=90)
        again_ids = receiver.ids()[10:]
        assert sorted(again_ids) == sorted(first_ids)
        subject = {webhook_id: event["subject"] for webhook_id, event in receiver.taken}
        for order_id in ("SO-1", "SO-2", "SO-3"):
            mine = [i for i in again_ids if subject[i] == order_id]
            assert mine == [i for i in first_ids if subject[i] == order_id]


@pytest.mark.parametrize(
    ("url", "allow", "why"),
    [
        ("http://127.0.0.1:9/hook", [], "loopback"),
        ("https://10.1.2.3/hook", [], "private"),
        ("https://169.254.169.254/latest", [], "metadata"),
        ("https://[::ffff:127.0.0.1]/hook", [], "127.0.0.1"),
        ("https://localhost/hook", [], "loopback"),
        ("http://93.184.216.34/hook", ["10.0.0.0/8"], "https"),
    ],
)
async def test_an_endpoint_on_an_internal_address_or_in_clear_is_refused_at_once(
    hub: Hub, url: str, allow: list[str], why: str
) -> None:
    async with api_client(hub) as http:
        partner = {"partner_id": "C7", "name": "C7", "kind": "customer", "customers": ["C-7"]}
        assert (await http.post("/api/v1/partners", json=partner, headers=ADMIN)).status_code == 201
        body = {"endpoint_id": "e1", "partner_id": "C7", "url": url, "allow": allow}
        refused = await http.post("/api/v1/webhooks", json=body, headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert why in refused.json()["detail"]


async def test_a_partner_that_may_see_nothing_is_refused(hub: Hub) -> None:
    async with api_client(hub) as http:
        partner = {"partner_id": "C7", "name": "C7", "kind": "customer"}
        refused = await http.post("/api/v1/partners", json=partner, headers=ADMIN)
    assert refused.status_code == 422
    assert "which orders it may see" in refused.text


async def test_after_the_overlap_only_the_new_secret_signs(hub: Hub) -> None:
    # Worked example: secret A, rotated to B with an overlap of 0: what is sent next verifies
    # with B and not with A.
    receiver = Receiver()
    partner = {"partner_id": "C7", "name": "C7", "kind": "customer", "customers": ["C-7"]}
    async with served(receiver.app) as url, api_client(hub) as http:
        old, _ = await register(http, partner, "c7-main", url)
        rotated = await http.post("/api/v1/webhooks/c7-main/rotate-secret", headers=ADMIN,
                                  params={"overlap_s": 0})  # fmt: skip
        new = rotated.json()["secret"]
        receiver.secrets = [new]
        await hub.publisher.publish_many(order("SO-1", "C-7", "P-1", "M1"))
        await eventually(lambda: len(receiver.taken) == 3, timeout=60)
    body, headers = receiver.raw[0]
    assert Webhook(new).verify(body, headers)["subject"] == "SO-1"
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


async def test_a_settings_key_of_a_partner_role_reads_no_partner(hub: Hub) -> None:
    # MES_HUB_API_KEYS may hold a supplier key: it belongs to no partner, so it would see every
    # partner's; it is refused, saying how to get a partner's key.
    supplier = {"Authorization": f"Bearer {api_key('supplier')}"}
    async with api_client(hub) as http:
        for path in ("/api/v1/partners", "/api/v1/webhooks"):
            refused = await http.get(path, headers=supplier)
            assert refused.status_code == 403, path
            assert "belongs to no partner" in refused.json()["detail"]


async def test_an_endpoint_id_is_never_used_twice_nor_an_erps_name(hub: Hub) -> None:
    # c7-main deleted: its deliveries stay C7's, so the id is not given to anyone again; "erp"
    # is the ERP's name (its outbox files and attempts): no endpoint takes it.
    receiver = Receiver()
    partner = {"partner_id": "C7", "name": "C7", "kind": "customer", "customers": ["C-7"]}
    async with served(receiver.app) as url, api_client(hub) as http:
        await register(http, partner, "c7-main", url)
        assert (await http.delete("/api/v1/webhooks/c7-main", headers=ADMIN)).status_code == 204
        assert (await http.get("/api/v1/webhooks/c7-main", headers=ADMIN)).status_code == 404
        for endpoint_id in ("c7-main", "erp"):
            body = {"endpoint_id": endpoint_id, "partner_id": "C7", "url": f"{url}/hook",
                    "allow": ["127.0.0.1/32"]}  # fmt: skip
            refused = await http.post("/api/v1/webhooks", json=body, headers=ADMIN)
            assert refused.status_code == 409, endpoint_id
            assert "choose another" in refused.json()["detail"]


async def test_an_endpoint_failing_longer_than_allowed_is_disabled_and_says_why(
    settings: Settings,
) -> None:
    # [hub] webhook_disable_after_s = 1 (5 days in a plant): an endpoint answering 503 since
    # its first attempt is disabled by the hub once it has failed for a second, the reason
    # stored with the change and shown by the API; resumed, it gets what it missed.
    receiver = Receiver()
    receiver.answer = 503
    short = settings.model_copy(update={"webhook_disable_after_s": 1.0})
    running = await build_hub(
        short, plant=PlantConfig(time_zone="UTC"), destinations=[InMemoryDestination("erp")],
        retry=FAST, webhook_retry=standard_webhooks_retry(scale=0.0005),
    )  # fmt: skip
    partner = {"partner_id": "C7", "name": "C7", "kind": "customer", "customers": ["C-7"]}
    try:
        async with served(receiver.app) as url, api_client(running) as http:
            receiver.secrets = [(await register(http, partner, "c7-main", url))[0]]
            await running.publisher.publish_many(order("SO-1", "C-7", "P-1", "M1"))

            async def disabled() -> bool:
                found = (await http.get("/api/v1/webhooks/c7-main", headers=ADMIN)).json()
                return bool(found["status"] == "disabled")

            await eventually(disabled, timeout=60)
            found = (await http.get("/api/v1/webhooks/c7-main", headers=ADMIN)).json()
            assert "has failed for" in found["status_reason"] and receiver.refused >= 2
            receiver.answer = 204
            resumed = await http.post("/api/v1/webhooks/c7-main/resume", headers=ADMIN)
            assert resumed.status_code == 200
            await eventually(lambda: len(receiver.taken) == 3, timeout=60)
            assert receiver.told()[0] == ("SO-1", "started.v1")
        stored = running.store.history(webhooks_aggregate_id("default"))
        told = [e.change for e in stored if hasattr(e, "change")]
        async with api_client(running) as http:
            admin_key = (await http.get("/api/v1/me", headers=ADMIN)).json()["key_id"]
        assert [(c["action"], c["by"]) for c in told][-2:] == [
            ("endpoint_disabled", "hub"), ("endpoint_resumed", f"api:admin:{admin_key}"),
        ]  # fmt: skip
        # The resume is stored as the admin key's doing; the disabling, as the hub's.
        actors = [actor_of(e) for e in stored if hasattr(e, "change")][-2:]
        assert actors == [
            {"kind": "hub", "id": "urn:mes-hub:default:webhooks"},
            {"kind": "key", "id": admin_key, "role": "admin"},
        ]
    finally:
        await running.close()
