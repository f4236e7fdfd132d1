"""Partners' webhooks end to end over a real hub (nats-server, SQLite, the views process):
what each endpoint is owed is decided from the store, signed as Standard Webhooks (checked by
the third-party ``standardwebhooks`` package) and delivered once per id, in order per order, to
loopback receivers; a partner gets only the orders of its customers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook

from adapters.webhooks.config import WebhookConfigError, WebhookEntry, webhook_section
from adapters.webhooks.signing import new_secret
from hub.bootstrap import CONFIRMATIONS_SINCE, PARTNERS_AT, PARTNERS_SINCE, Hub, build_hub
from hub.outbox import InMemoryDestination, RetryPolicy, standard_webhooks_retry
from hub.settings import Settings
from projections.rules.plant import PlantConfig
from tests.conftest import T0, cloud_event, eventually
from tests.erp_standins import served

FAST = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, circuit_failures=3, circuit_open_s=0.3)


class Receiver:
    """A partner's endpoint: keeps what it was sent, verified; fails the first ``fail`` times
    with 503 and ``Retry-After: 0``."""

    def __init__(self, secret: str, fail: int = 0) -> None:
        self.secret, self.fail = secret, fail
        self.taken: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.fail > 0:
                self.fail -= 1
                return Response(status_code=503, headers={"Retry-After": "0"})
            # Verified by the reference library, not by the hub's code.
            event = Webhook(self.secret).verify(body, dict(request.headers))
            self.ids.append(request.headers["webhook-id"])
            self.taken.append(event)
            return Response(status_code=204)

    def told(self) -> list[tuple[str, str]]:
        return [(e["subject"], e["type"].removeprefix("mes.order.")) for e in self.taken]


def entry(name: str, url: str, secret_file: Path, **keys: Any) -> WebhookEntry:
    return WebhookEntry.model_validate({
        "name": name, "url": f"{url}/hook", "secret": {"file": str(secret_file)},
        "allow": ["127.0.0.1"], "timeout_s": 5, **keys,
    })  # fmt: skip


def secret_in(tmp_path: Path, name: str) -> tuple[str, Path]:
    secret = new_secret()
    path = tmp_path / f"{name}.secret"
    path.write_text(secret + "\n")
    return secret, path


def order_life(order_id: str, customer: str, machine: str, start: int) -> list[Any]:
    release = {"order_id": order_id, "part_number": "P-1", "quantity": 5, "customer": customer,
               "due": (T0 + timedelta(days=3)).isoformat()}  # fmt: skip
    return [
        cloud_event("mes.erp.order.released.v1", order_id, release, at=-timedelta(hours=1)),
        cloud_event("mes.operator.order_started.v1", machine, {"order_id": order_id},
                    at=timedelta(minutes=start)),
        cloud_event("mes.machine.partcount.v1", machine, {"count": 0, "kind": "all"},
                    at=timedelta(minutes=start)),
        cloud_event("mes.machine.partcount.v1", machine, {"count": 5, "kind": "all"},
                    at=timedelta(minutes=start + 20)),
        cloud_event("mes.operator.order_ended.v1", machine, {"order_id": order_id},
                    at=timedelta(minutes=start + 30)),
    ]  # fmt: skip


@pytest.fixture
async def started(settings: Settings) -> AsyncIterator[Settings]:
    # Tell partners (and confirm to the ERP) from before T0: the test's orders are not history.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIRMATIONS_SINCE, PARTNERS_SINCE):
        (settings.data_dir / name).write_text((T0 - timedelta(days=1)).isoformat())
    (settings.data_dir / PARTNERS_AT).write_text("0")
    yield settings


async def test_each_partner_gets_its_orders_signed_once_each_in_order(
    started: Settings, tmp_path: Path
) -> None:
    # SO-1 (customer C-7) and SO-2 (C-8) each start, make 5 of 5 and end; the ERP takes their
    # confirmations. C-7's endpoint is told SO-1's started, completed and confirmed, in that
    # order, each once (its first two tries answered 503); C-8's endpoint only SO-2's.
    secret_7, file_7 = secret_in(tmp_path, "c7")
    secret_8, file_8 = secret_in(tmp_path, "c8")
    c7, c8 = Receiver(secret_7, fail=2), Receiver(secret_8)
    erp = InMemoryDestination("erp-1")
    async with served(c7.app) as url_7, served(c8.app) as url_8:
        hub: Hub = await build_hub(
            started, plant=PlantConfig(time_zone="UTC"), destinations=[erp], retry=FAST,
            webhooks=[entry("c7-hooks", url_7, file_7, customers=["C-7"]),
                      entry("c8-hooks", url_8, file_8, customers=["C-8"])],
            webhook_retry=standard_webhooks_retry(scale=0.001),
        )  # fmt: skip
        try:
            await hub.publisher.publish_many(
                [*order_life("SO-1", "C-7", "M1", 0), *order_life("SO-2", "C-8", "M2", 0)]
            )
            await eventually(lambda: len(c7.taken) == 3 and len(c8.taken) == 3, timeout=60)
            await asyncio.sleep(1.0)  # nothing more comes
        finally:
            await hub.close()
    assert c7.told() == [("SO-1", "started.v1"), ("SO-1", "completed.v1"),
                         ("SO-1", "confirmed.v1")]  # fmt: skip
    assert c8.told() == [("SO-2", "started.v1"), ("SO-2", "completed.v1"),
                         ("SO-2", "confirmed.v1")]  # fmt: skip
    assert len(set(c7.ids)) == 3 and c7.ids == [e["id"] for e in c7.taken]
    assert all(e["data"]["customer"] == "C-7" for e in c7.taken)
    assert c7.taken[1]["data"]["good"] == 5 and c7.taken[2]["data"]["final"] is True


@pytest.mark.parametrize(
    ("keys", "where", "why"),
    [
        ({"secret": "whsec_abc"}, "webhook[0].secret", "never written in the config"),
        ({"customers": []}, "webhook[0]", "whose orders it may see"),
        ({"customers": ["C-7"], "all_customers": True}, "webhook[0]", "exclude each other"),
        ({"events": ["mes.order.shipped.v1"]}, "webhook[0].events", "not a partner event"),
        ({"url": "https://user:pw@hooks.example/x"}, "webhook[0].url", "never go in the URL"),
    ],
)
def test_a_bad_webhook_entry_names_the_file_the_key_and_why(
    tmp_path: Path, keys: dict[str, Any], where: str, why: str
) -> None:
    raw = {"name": "c7", "url": "https://hooks.example/x", "secret": {"env": "C7_SECRET"},
           "customers": ["C-7"], **keys}  # fmt: skip
    with pytest.raises(WebhookConfigError) as failed:
        webhook_section([raw], "mes-hub.toml", env={})
    said = str(failed.value)
    assert f"mes-hub.toml: key '{where}'" in said and why in said
    assert "whsec_abc" not in said and "pw@" not in said
