"""A partner's webhook endpoint as an outbox destination (adapters/webhooks/destination.py), against
real receivers on loopback (uvicorn): every delivery verified by the third-party
``standardwebhooks`` package, not by our code; the id the same on a retry; 410 for good; a
Retry-After honoured by the sender; a hanging receiver delaying no other endpoint; internal
addresses refused before any request; the Standard Webhooks retry schedule."""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from adapters.webhooks.destination import WEBHOOK, WebhookDestination, retry_after_s
from adapters.webhooks.signing import SigningKey, new_secret
from hub.outbound import Allowlist
from hub.outbox import (
    STANDARD_WEBHOOKS_SCHEDULE,
    Delivered,
    DeliveryFailed,
    OutboxMessage,
    RetryPolicy,
    Sender,
    standard_webhooks_retry,
)
from hub.ports import InMemoryPublisher
from hub.server import ApiServer
from projections.rules.keys import idempotency_key
from tests.conftest import eventually

LOOPBACK = Allowlist.of(["127.0.0.1"])


# --- receivers on loopback --------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A partner's endpoint: records each POST, answers as planned (``plan``: status and
    headers, one per request, then 200); ``/hang`` waits until ``release`` is set."""

    hits: list[Hit] = field(default_factory=list)
    plan: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{path:path}")
        async def take(path: str, request: Request) -> Response:
            self.hits.append(Hit(path, await request.body(), dict(request.headers)))
            if path == "hang":
                await self.release.wait()
            status, headers = self.plan.popleft() if self.plan else (200, {})
            return Response(f'{{"path": "{path}"}}', status, headers, "application/json")

        return app


@asynccontextmanager
async def receiving() -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver on a free loopback port, and its base URL."""
    receiver = Receiver()
    server = ApiServer(receiver.app(), "127.0.0.1", 0)
    server.start()
    try:
        yield receiver, server.url
    finally:
        receiver.release.set()  # (a hanging request ends, so the server can stop)
        await server.stop()


def message(event_id: str = "4d09f838a0edf9365e88c2554f54cad3", order_id: str = "SO-1") -> Any:
    data = {"order_id": order_id, "customer": "C-7", "part_number": "P-100", "quantity": 10,
            "machine_id": "M1", "started_at": "2026-03-02T06:00:00Z"}  # fmt: skip
    payload = {"event_id": event_id, "event_type": "mes.order.started.v1", "data": data,
               "event_time": "2026-03-02T06:00:00Z", "order_id": order_id}  # fmt: skip
    return OutboxMessage(
        key=f"msg-{event_id}", kind=WEBHOOK, site="default", ordering_key=order_id, sequence=1,
        payload=payload, decided_at=datetime.now(UTC), position=1,
    )  # fmt: skip


def endpoint(
    url: str, secrets: Sequence[str], *, allow: Allowlist = LOOPBACK, **options: Any
) -> WebhookDestination:
    return WebhookDestination(
        "acme", url, lambda: list(secrets), allow=allow, site="plant-1", **options
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- signed deliveries ------------------------------------------------------------------------


async def test_a_delivery_is_a_cloud_event_that_the_standardwebhooks_library_verifies() -> None:
    secret, key = new_secret(), SigningKey.generate()
    async with receiving() as (receiver, url):
        acme = endpoint(f"{url}/hooks/mes?token=abc", [secret], signing_key=key)
        try:
            taken = await acme.deliver(message(), "outbox-key")
        finally:
            await acme.close()
    assert taken == Delivered(200, '{"path": "hooks/mes"}')
    (hit,) = receiver.hits
    event = Webhook(secret).verify(hit.body, hit.headers)  # the partner's check
    assert event == {
        "specversion": "1.0",
        "id": "4d09f838a0edf9365e88c2554f54cad3",
        "source": "urn:mes-hub:plant-1",
        "type": "mes.order.started.v1",
        "time": "2026-03-02T06:00:00Z",
        "subject": "SO-1",
        "datacontenttype": "application/json",
        "data": message().payload["data"],
    }
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["webhook-id"] == event["id"]  # the event's id, not the outbox's key
    assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
    # The v1a entry verifies with the published public key.
    v1a = [s for s in hit.headers["webhook-signature"].split() if s.startswith("v1a,")]
    public = base64.b64decode(key.public_key().removeprefix("whpk_"))
    signed = f"{event['id']}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(v1a[0][4:]), signed)


async def test_during_a_rotation_each_secret_alone_verifies_and_after_it_only_the_new() -> None:
    old, new, stranger = new_secret(), new_secret(), new_secret()
    current = [old, new]
    async with receiving() as (receiver, url):
        acme = WebhookDestination(
            "acme", f"{url}/in", lambda: current, allow=LOOPBACK, site="plant-1"
        )
        try:
            await acme.deliver(message("evt-1"), "k1")
            current[:] = [new]  # the overlap is over
            await acme.deliver(message("evt-2"), "k2")
        finally:
            await acme.close()
    during, after = receiver.hits
    assert len(during.headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(during.body, during.headers)["id"] == "evt-1"
    Webhook(new).verify(after.body, after.headers)
    for secret, hit in ((stranger, during), (old, after)):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(hit.body, hit.headers)


async def test_a_retry_carries_the_same_webhook_id_signed_afresh() -> None:
    secret = new_secret()
    stamps = iter([time.time() - 30, time.time()])
    async with receiving() as (receiver, url):
        receiver.plan.append((500, {}))
        acme = endpoint(f"{url}/in", [secret], clock=lambda: next(stamps))
        try:
            with pytest.raises(DeliveryFailed) as failed:
                await acme.deliver(message("evt-9"), "k")
            assert (failed.value.status, failed.value.permanent) == (500, False)
            assert failed.value.retry_after_s is None
            assert failed.value.reason.startswith("127.0.0.1: HTTP 500")
            assert (await acme.deliver(message("evt-9"), "k")).status == 200
        finally:
            await acme.close()
    first, second = receiver.hits
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "evt-9"
    assert first.body == second.body
    assert first.headers["webhook-timestamp"] != second.headers["webhook-timestamp"]
    for hit in (first, second):
        Webhook(secret).verify(hit.body, hit.headers)


async def test_410_gone_is_permanent_and_says_the_endpoint_is_gone() -> None:
    async with receiving() as (receiver, url):
        receiver.plan.append((410, {}))
        acme = endpoint(f"{url}/in", [new_secret()])
        try:
            with pytest.raises(DeliveryFailed) as failed:
                await acme.deliver(message(), "k")
        finally:
            await acme.close()
    assert failed.value.permanent and failed.value.status == 410
    assert "gone" in failed.value.reason and "127.0.0.1" in failed.value.reason


async def test_retry_after_is_read_for_429_502_503_504_only() -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    cases = [
        (503, {"Retry-After": "7"}, 7.0),
        (429, {"Retry-After": format_datetime(later, usegmt=True)}, 120.0),
        (502, {"Retry-After": "0"}, 0.0),
        (504, {}, None),
        (500, {"Retry-After": "7"}, None),  # (not one the spec says to throttle on)
        (429, {"Retry-After": "soon"}, None),
    ]
    async with receiving() as (receiver, url):
        receiver.plan.extend((status, headers) for status, headers, _ in cases)
        acme = endpoint(f"{url}/in", [new_secret()])
        try:
            for status, headers, expected in cases:
                with pytest.raises(DeliveryFailed) as failed:
                    await acme.deliver(message(), "k")
                assert (failed.value.status, failed.value.permanent) == (status, False)
                if expected is None:
                    assert failed.value.retry_after_s is None, status
                else:
                    assert failed.value.retry_after_s == pytest.approx(expected, abs=2), status
        finally:
            await acme.close()
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", time.time()) == 0.0  # past: now


async def test_the_answer_kept_is_capped_and_never_carries_the_secret() -> None:
    secret = new_secret()
    app = FastAPI()

    @app.post("/echo")
    async def echo() -> Response:
        return Response(f"bad signature with {secret} " + "x" * 100_000, 400)

    server = ApiServer(app, "127.0.0.1", 0)
    server.start()
    acme = endpoint(f"{server.url}/echo", [secret])
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await acme.deliver(message(), "k")
    finally:
        await acme.close()
        await server.stop()
    assert failed.value.status == 400 and not failed.value.permanent
    said = failed.value.excerpt
    assert said.startswith("bad signature with *** x") and len(said) <= 512
    assert secret not in said and secret.removeprefix("whsec_") not in said
    assert secret not in failed.value.reason


# --- the sender honours Retry-After -----------------------------------------------------------


@dataclass
class OneMessageOutbox:
    """The ``Outbox`` port, owing one message that the view never sees taken."""

    owed: OutboxMessage

    def undelivered(
        self, destination: str, kinds: Sequence[str], after: int = 0, limit: int = 64
    ) -> tuple[int, list[OutboxMessage]]:
        return 0, [self.owed] if self.owed.kind in kinds else []


async def _next_attempt_after(retry_after: str, policy: RetryPolicy) -> tuple[float, Sender]:
    """Seconds from before the attempt to the next one the sender set, after a 503 saying
    ``Retry-After: retry_after``."""
    async with receiving() as (receiver, url):
        receiver.plan.append((503, {"Retry-After": retry_after}))
        publisher = InMemoryPublisher()
        sender = Sender(
            endpoint(f"{url}/in", [new_secret()]), OneMessageOutbox(message()), publisher,
            "default", idempotency_key, policy,
        )  # fmt: skip
        before = datetime.now(UTC)
        try:
            assert await sender.round() == 1
            await eventually(lambda: len(publisher.published) == 1)
        finally:
            await sender.close()
    (_, attempt), *_ = publisher.published
    data = attempt.envelope.data
    assert isinstance(data, dict)
    assert (data["outcome"], data["status_code"]) == ("failed", 503)
    assert "Retry-After: " in data["reason"]
    next_at = datetime.fromisoformat(data["next_attempt_at"])
    return (next_at - before).total_seconds(), sender


async def test_a_503_with_retry_after_puts_the_next_attempt_at_least_that_late() -> None:
    quick = standard_webhooks_retry(scale=0.001)  # the schedule's first delay: 5 ms
    wait, sender = await _next_attempt_after("7", quick)
    assert 7 <= wait < 9
    assert await sender.round() == 0  # not due again yet
    # The whole endpoint waits: another order's message is not sent to it either.
    assert sender.circuit.state == "open" and not sender.circuit.allows()
    # Honoured up to the policy's cap; and a longer delay of the policy's own still wins.
    capped = standard_webhooks_retry(0.001, jitter=0, max_retry_after_s=60)
    wait, _ = await _next_attempt_after("86400", capped)
    assert 60 <= wait < 62
    longer = standard_webhooks_retry(scale=3, jitter=0)  # its first delay: 15 s
    wait, _ = await _next_attempt_after("7", longer)
    assert 15 <= wait < 17


# --- a slow endpoint, a dead one, a refused one ------------------------------------------------


async def test_a_hanging_endpoint_fails_retryably_and_delays_no_other() -> None:
    async with receiving() as (receiver, url):
        hanging = endpoint(f"{url}/hang", [new_secret()], timeout_s=1.0)
        healthy = WebhookDestination(
            "globex", f"{url}/ok", lambda: [new_secret()], allow=LOOPBACK, site="plant-1"
        )
        try:
            slow = asyncio.create_task(hanging.deliver(message("evt-a", "SO-1"), "k1"))
            await eventually(lambda: [h.path for h in receiver.hits] == ["hang"])
            fast = asyncio.create_task(healthy.deliver(message("evt-b", "SO-2"), "k2"))
            done, _ = await asyncio.wait({slow, fast}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {fast}  # taken while the other still waits
            assert fast.result().status == 200
            with pytest.raises(DeliveryFailed) as failed:
                await slow
        finally:
            await hanging.close()
            await healthy.close()
    assert not failed.value.permanent and failed.value.status is None
    assert failed.value.reason == "127.0.0.1: no answer within 1 s"


async def test_an_endpoint_that_is_down_fails_retryably_naming_the_host() -> None:
    acme = endpoint(f"http://127.0.0.1:{free_port()}/in", [new_secret()])
    try:
        with pytest.raises(DeliveryFailed) as failed:
            await acme.deliver(message(), "k")
    finally:
        await acme.close()
    assert not failed.value.permanent
    assert failed.value.reason.startswith("127.0.0.1: cannot reach the endpoint: ConnectError")
    assert "\n" not in failed.value.reason


@pytest.mark.parametrize(
    ("host", "allow", "why"),
    [
        ("127.0.0.1", Allowlist(), "internal address (loopback)"),
        ("127.0.0.1", Allowlist.of(["10.0.0.0/8"]), "internal address (loopback)"),
        ("10.1.2.3", LOOPBACK, "internal address (private)"),
        ("169.254.169.254", LOOPBACK, "internal address (cloud metadata)"),
        ("[::ffff:127.0.0.1]", Allowlist(), "IPv4-mapped 127.0.0.1"),
    ],
)
async def test_an_internal_address_not_allowlisted_is_refused_for_good_before_any_request(
    host: str, allow: Allowlist, why: str
) -> None:
    async with receiving() as (receiver, url):
        port = url.rsplit(":", 1)[1]
        acme = endpoint(f"http://{host}:{port}/in", [new_secret()], allow=allow)
        try:
            with pytest.raises(DeliveryFailed) as failed:
                await acme.deliver(message(), "k")
        finally:
            await acme.close()
    assert failed.value.permanent and why in failed.value.reason
    assert receiver.hits == []


# --- the retry policy -------------------------------------------------------------------------


def test_the_standard_webhooks_schedule_gives_the_spec_s_delays_and_ten_attempts() -> None:
    spec = [5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600, 24 * 3600]
    policy, rng = standard_webhooks_retry(), random.Random(12)
    assert policy.schedule == STANDARD_WEBHOOKS_SCHEDULE == tuple(float(s) for s in spec)
    assert policy.max_attempts == 10  # immediately, then once after each delay
    for attempt, expected in enumerate(spec, 1):
        for _ in range(50):
            assert expected * 0.8 <= policy.delay_s(attempt, rng) <= expected * 1.2
    assert 24 * 3600 * 0.8 <= policy.delay_s(15, rng) <= 24 * 3600 * 1.2  # the last repeated
    exact = standard_webhooks_retry(jitter=0)
    assert [exact.delay_s(n, rng) for n in range(1, 10)] == spec
    assert sum(spec) == 75 * 3600 + 35 * 60 + 5  # the spec's "75:35:05 since start"
    # Configurable: shorter in tests, more or fewer attempts.
    assert standard_webhooks_retry(scale=0.01, jitter=0).delay_s(2, rng) == pytest.approx(3)
    assert standard_webhooks_retry(max_attempts=4).max_attempts == 4
    assert RetryPolicy(schedule=(1, 2)).max_attempts == 3
    with pytest.raises(ValueError):
        RetryPolicy(schedule=())


def test_the_erp_policy_is_unchanged_and_retry_after_is_honoured_up_to_its_cap() -> None:
    policy, rng = RetryPolicy(jitter=0), random.Random(1)
    assert RetryPolicy().max_attempts == 30 and policy.schedule is None
    assert [policy.delay_s(n, rng) for n in (1, 2, 3, 13)] == [1, 2, 4, 3600]
    assert policy.next_delay_s(1, rng) == 1
    assert policy.next_delay_s(1, rng, retry_after_s=7) == 7
    assert policy.next_delay_s(13, rng, retry_after_s=7) == 3600  # its own is longer
    assert policy.next_delay_s(1, rng, retry_after_s=10**9) == 3600  # capped (max_retry_after_s)
    assert RetryPolicy(jitter=0, max_retry_after_s=60).next_delay_s(1, rng, 10**9) == 60
