"""Partners' webhook endpoints (docs/webhooks.md): registered by the admin with a ``whsec_``
secret shown once, its secret rotated with an overlap during which both sign, paused and
resumed, and what each was sent — every delivery with its attempts, the payload, redelivered or
replayed from a moment on. A partner's key sees and acts on its own endpoints only (another's
are 404 to it)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from adapters.webhooks.destination import cloud_event_body
from contracts import PARTNER_EVENT_TYPES
from hub.api.deps import Caller, Desk, PartnerDesk, WebhookUser, require
from hub.api.policy import WEBHOOK_USERS
from hub.api.problems import Problem, problems
from hub.api.routes.partners import ID_PATTERN, Ids, by
from hub.outbound import Allowlist, OutboundRefused, check_url
from hub.outbox import OutboxMessage

# Who may use these routes at all is checked first: a caller of another role learns nothing
# (not even whether this hub sends webhooks) before its 403. Each route narrows it further.
router = APIRouter(
    prefix="/webhooks", tags=["webhooks"], dependencies=[Depends(require(*WEBHOOK_USERS))]
)

EndpointId = Annotated[str, Path(pattern=ID_PATTERN)]
DeliveryId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
MAX_PAGE = 500
MAX_REPLAY = 10_000  # webhooks a partner's key may have sent again at once
Status = Literal["pending", "delivered", "failed", "dead"]
_OUTCOMES: dict[str, tuple[str, ...]] = {
    "pending": ("pending",), "delivered": ("delivered", "duplicate"),
    "failed": ("failed", "requeued"), "dead": ("dead",),
}  # fmt: skip
DEFAULT_OVERLAP_S = 86400.0


class _EndpointFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("events", check_fields=False)
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or ()) - set(PARTNER_EVENT_TYPES))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a partner event type")
        return value

    @field_validator("allow", check_fields=False)
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or ():
            if not entry or any(c.isspace() for c in entry) or len(entry) > 253:
                raise ValueError("each entry is a network (10.0.0.0/8) or a host name")
        return value


class EndpointIn(_EndpointFields):
    """A partner's endpoint. ``events``: the types it wants (empty: all); ``customers``,
    ``part_numbers``, ``orders``: narrow what its partner may see (empty: no narrowing);
    ``allow``: the internal networks or host names it may be on (a factory receiver), which
    also allows plain http; ``rate_per_s``: webhooks started per second at most;
    ``sign_ed25519``: also sign with the hub's Ed25519 key (``v1a``)."""

    endpoint_id: str = Field(pattern=ID_PATTERN)
    partner_id: str = Field(pattern=ID_PATTERN)
    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://\S+$")
    events: list[str] = Field(default_factory=list, max_length=len(PARTNER_EVENT_TYPES))
    customers: Ids = Field(default_factory=list)
    part_numbers: Ids = Field(default_factory=list)
    orders: Ids = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list, max_length=64)
    rate_per_s: float | None = Field(default=None, gt=0, le=10_000)
    timeout_s: float = Field(default=15.0, gt=0, le=60)
    sign_ed25519: bool = False


class EndpointChange(_EndpointFields):
    """What changes (the rest stays)."""

    url: str | None = Field(default=None, min_length=8, max_length=2048, pattern=r"^https?://\S+$")
    events: list[str] | None = Field(default=None, max_length=len(PARTNER_EVENT_TYPES))
    customers: Ids | None = None
    part_numbers: Ids | None = None
    orders: Ids | None = None
    allow: list[str] | None = Field(default=None, max_length=64)
    rate_per_s: float | None = Field(default=None, gt=0, le=10_000)
    timeout_s: float | None = Field(default=None, gt=0, le=60)
    sign_ed25519: bool | None = None


class SecretView(BaseModel):
    id: str
    fingerprint: str
    created_at: datetime
    expires_at: datetime | None


class EndpointView(BaseModel):
    endpoint_id: str
    partner_id: str | None = Field(description="None: a [[webhook]] entry of the config file")
    url: str | None
    events: list[str]
    customers: list[str]
    part_numbers: list[str]
    orders: list[str]
    allow: list[str]
    rate_per_s: float | None
    timeout_s: float | None
    sign_ed25519: bool
    status: Literal["active", "paused", "disabled"]
    status_reason: str
    status_at: datetime | None
    secrets: list[SecretView]
    created_at: datetime | None


class EndpointCreated(EndpointView):
    secret: str = Field(description="Shown this once: give it to the partner to verify with")


class RotatedSecret(BaseModel):
    endpoint_id: str
    secret: str = Field(description="The new secret, shown this once")
    secrets: list[SecretView] = Field(description="All that sign now, until each expires")


class Requeued(BaseModel):
    endpoint_id: str
    status: str
    requeued: int = Field(description="Deliveries asked for again")


class AttemptView(BaseModel):
    attempt: int
    outcome: str
    status_code: int | None
    reason: str
    excerpt: str
    duration_ms: int | None = None
    next_attempt_at: datetime | None
    recorded_at: datetime


class DeliveryView(BaseModel):
    id: str = Field(description="The delivery's id (redeliver it by this)")
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt")
    event_type: str
    order_id: str
    decided_at: datetime
    status: Status
    attempts: int
    status_code: int | None
    reason: str
    next_attempt_at: datetime | None
    payload: dict[str, Any] = Field(description="The CloudEvent as POSTed")
    history: list[AttemptView] | None = Field(
        default=None, description="Every attempt (one delivery's page only)"
    )


class PublicKey(BaseModel):
    public_key: str = Field(description="whpk_…: verify the v1a (Ed25519) signatures with it")


def _status(message: OutboxMessage) -> Status:
    outcome = message.outcome or "pending"
    for status, outcomes in _OUTCOMES.items():
        if outcome in outcomes:
            return status  # type: ignore[return-value]
    return "pending"


def _delivery(message: OutboxMessage, site: str) -> DeliveryView:
    return DeliveryView(
        id=message.key,
        webhook_id=str(message.payload["event_id"]),
        event_type=str(message.payload["event_type"]),
        order_id=message.ordering_key,
        decided_at=message.decided_at,
        status=_status(message),
        attempts=message.attempts,
        status_code=message.status_code,
        reason=message.reason,
        next_attempt_at=message.next_attempt_at,
        payload=json.loads(cloud_event_body(message.payload, site)),
    )


def endpoint_view(endpoint: dict[str, Any]) -> EndpointView:
    lists = ("events", "customers", "part_numbers", "orders", "allow")
    return EndpointView(
        endpoint_id=endpoint["endpoint_id"],
        partner_id=endpoint.get("partner_id"),
        url=endpoint.get("url"),
        **{name: list(endpoint.get(name) or []) for name in lists},
        rate_per_s=endpoint.get("rate_per_s"),
        timeout_s=endpoint.get("timeout_s"),
        sign_ed25519=bool(endpoint.get("sign_ed25519")),
        status=endpoint.get("status") or "active",
        status_reason=endpoint.get("status_reason") or "",
        status_at=endpoint.get("status_at"),
        secrets=[SecretView(**s) for s in endpoint.get("secrets", [])],
        created_at=endpoint.get("created_at"),
    )


async def _endpoints(desk: Desk) -> dict[str, dict[str, Any]]:
    """Every endpoint: the partners', and the config file's (with their status, if any)."""
    registry = await desk.fresh()
    found = {e["endpoint_id"]: e for e in registry.partner_endpoints()}
    for name in desk.config_endpoints:
        found[name] = {"endpoint_id": name, "partner_id": None, **(registry.endpoint(name) or {})}
    return found


async def _endpoint(desk: Desk, caller: Caller, endpoint_id: str) -> dict[str, Any]:
    """The endpoint, if the caller may see it (a partner: only its own; else 404)."""
    endpoint = (await _endpoints(desk)).get(endpoint_id)
    others = caller.partner is not None and (endpoint or {}).get("partner_id") != caller.partner
    if endpoint is None or others:
        raise Problem(404, f"no webhook endpoint {endpoint_id!r}")
    return endpoint


async def _check_url(url: str, allow: list[str]) -> None:
    """Said no at once (the senders check again at every connection): an address that is not
    public and not allowed, plain http outside the allowlist, a name that does not resolve."""
    try:
        await asyncio.to_thread(check_url, url, Allowlist.of(allow))
    except OutboundRefused as refused:
        said = str(refused)
        raise Problem(422, f"url: {said}", errors=[{"field": "url", "rule": said}]) from None


@router.get("/public-key", summary="The hub's Ed25519 public key (verify v1a signatures)")
async def public_key(desk: Desk, _: WebhookUser) -> PublicKey:
    key = await asyncio.to_thread(desk.secrets.signing_key)
    return PublicKey(public_key=key.public_key())


@router.post(
    "",
    status_code=201,
    summary="Register a partner's endpoint (admin; its secret shown once)",
    responses=problems(404, 409, 503),
)
async def create_endpoint(body: EndpointIn, desk: Desk, caller: PartnerDesk) -> EndpointCreated:
    await _check_url(body.url, body.allow)
    async with desk.changes.lock:
        registry = await desk.fresh()
        if registry.partner(body.partner_id) is None:
            raise Problem(404, f"no partner {body.partner_id!r}")
        taken = registry.used(body.endpoint_id) or body.endpoint_id in desk.reserved
        if taken:  # (a deleted endpoint's id too: what it was sent stays its partner's)
            raise Problem(409, f"the id {body.endpoint_id!r} is taken, or was: choose another")
        fields = body.model_dump(exclude={"endpoint_id", "partner_id"})
        secret = await desk.register_endpoint(body.partner_id, body.endpoint_id, fields, by(caller))
        endpoint = await _endpoint(desk, caller, body.endpoint_id)
    return EndpointCreated(**endpoint_view(endpoint).model_dump(), secret=secret)


@router.get("", summary="Webhook endpoints (a partner's key: its own)")
async def list_endpoints(desk: Desk, caller: WebhookUser) -> list[EndpointView]:
    return [
        endpoint_view(e)
        for _, e in sorted((await _endpoints(desk)).items())
        if caller.partner is None or e["partner_id"] == caller.partner
    ]


@router.get("/{endpoint_id}", summary="A webhook endpoint", responses=problems(404))
async def get_endpoint(endpoint_id: EndpointId, desk: Desk, caller: WebhookUser) -> EndpointView:
    return endpoint_view(await _endpoint(desk, caller, endpoint_id))


def _managed(endpoint: dict[str, Any]) -> None:
    if endpoint["partner_id"] is None:
        raise Problem(409, f"{endpoint['endpoint_id']} is a [[webhook]] entry: edit the config")


@router.patch("/{endpoint_id}", summary="Change an endpoint (admin)", responses=problems(404, 409))
async def change_endpoint(
    endpoint_id: EndpointId, body: EndpointChange, desk: Desk, caller: PartnerDesk
) -> EndpointView:
    # (null leaves a field as it is, but for rate_per_s, where it lifts the limit)
    given = body.model_dump(exclude_unset=True)
    fields = {k: v for k, v in given.items() if v is not None or k == "rate_per_s"}
    async with desk.changes.lock:
        endpoint = await _endpoint(desk, caller, endpoint_id)
        _managed(endpoint)
        if "url" in fields or "allow" in fields:
            await _check_url(fields.get("url") or endpoint["url"],
                             fields.get("allow", endpoint["allow"]))  # fmt: skip
        await desk.change(
            {"action": "endpoint_saved", "partner_id": endpoint["partner_id"],
             "endpoint_id": endpoint_id, "fields": fields}, by(caller)
        )  # fmt: skip
    return endpoint_view(await _endpoint(desk, caller, endpoint_id))


@router.delete(
    "/{endpoint_id}", status_code=204, summary="Delete an endpoint (admin)",
    responses=problems(404, 409),
)  # fmt: skip
async def delete_endpoint(endpoint_id: EndpointId, desk: Desk, caller: PartnerDesk) -> Response:
    async with desk.changes.lock:
        endpoint = await _endpoint(desk, caller, endpoint_id)
        _managed(endpoint)
        await desk.delete_endpoint(endpoint, by(caller))
    return Response(status_code=204)


@router.post(
    "/{endpoint_id}/rotate-secret",
    summary="A new secret (admin; shown once); the old ones sign too for overlap_s",
    responses=problems(404, 409),
)
async def rotate_secret(
    endpoint_id: EndpointId,
    desk: Desk,
    caller: PartnerDesk,
    overlap_s: Annotated[float, Query(ge=0, le=30 * 86400)] = DEFAULT_OVERLAP_S,
) -> RotatedSecret:
    async with desk.changes.lock:
        endpoint = await _endpoint(desk, caller, endpoint_id)
        _managed(endpoint)
        secret = await desk.rotate(endpoint, overlap_s, by(caller))
    now = endpoint_view(await _endpoint(desk, caller, endpoint_id))
    return RotatedSecret(endpoint_id=endpoint_id, secret=secret, secrets=now.secrets)


@router.post(
    "/{endpoint_id}/pause",
    summary="Pause an endpoint: what it is owed is kept, and goes on resume",
    responses=problems(404),
)
async def pause(endpoint_id: EndpointId, desk: Desk, caller: WebhookUser) -> EndpointView:
    async with desk.changes.lock:
        await _endpoint(desk, caller, endpoint_id)
        await desk.set_status(endpoint_id, "endpoint_paused", by(caller))
    return endpoint_view(await _endpoint(desk, caller, endpoint_id))


@router.post(
    "/{endpoint_id}/resume",
    summary="Resume a paused or disabled endpoint: what it missed goes now, in order",
    responses=problems(404),
)
async def resume(endpoint_id: EndpointId, desk: Desk, caller: WebhookUser) -> Requeued:
    async with desk.changes.lock:
        await _endpoint(desk, caller, endpoint_id)
        count = await desk.resume(endpoint_id, by(caller))
    return Requeued(endpoint_id=endpoint_id, status="active", requeued=count)


@router.post(
    "/{endpoint_id}/replay",
    status_code=202,
    summary="Send again everything decided for the endpoint since a moment",
    description="Every webhook decided for the endpoint at or after `since` goes again, in "
    "order per order, with the same `webhook-id` as before (a receiver drops what it has); "
    "what was held while it was disabled is among them, and a disabled endpoint is active "
    "again. A paused one stays paused (409): resume it.",
    responses=problems(404, 409, 422),
)
async def replay(
    endpoint_id: EndpointId,
    desk: Desk,
    caller: WebhookUser,
    since: Annotated[AwareDatetime, Query(description="ISO 8601 with its offset")],
) -> Requeued:
    async with desk.changes.lock:
        endpoint = await _endpoint(desk, caller, endpoint_id)
        if endpoint.get("status") == "paused":
            raise Problem(409, f"{endpoint_id} is paused: resume it first")
        # A partner may not flood the store (a requeue is stored per webhook): a bounded
        # replay; the admin's is not.
        bounded = caller.partner is not None
        if bounded and await desk.replay_size(endpoint_id, since, MAX_REPLAY) > MAX_REPLAY:
            raise Problem(422, f"more than {MAX_REPLAY} webhooks since then: choose a later since")
    count = await desk.replay(endpoint_id, since, by(caller))
    return Requeued(endpoint_id=endpoint_id, status="active", requeued=count)


@router.get(
    "/{endpoint_id}/deliveries",
    summary="What the endpoint was sent or is owed, newest first",
    description="Each webhook decided for the endpoint with how delivering it went: attempts, "
    "the last status code and reason, the next retry, and the payload. `before`: the "
    "`Link` header's next page.",
    response_model=list[DeliveryView],
    responses=problems(404),
)
async def deliveries(
    request: Request,
    endpoint_id: EndpointId,
    desk: Desk,
    caller: WebhookUser,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    await _endpoint(desk, caller, endpoint_id)
    found = await asyncio.to_thread(
        desk.outbox.addressed, endpoint_id, before=before,
        outcomes=_OUTCOMES[status] if status else (), limit=limit + 1,
    )  # fmt: skip
    page = [_delivery(m, desk.site).model_dump(mode="json") for m in found[:limit]]
    answer = Response(json.dumps(page), media_type="application/json")
    if len(found) > limit:
        following = request.url.include_query_params(before=found[limit - 1].position)
        answer.headers["Link"] = f'<{following}>; rel="next"'
    return answer


async def _one(desk: Desk, endpoint_id: str, delivery_id: str) -> OutboxMessage:
    found = await asyncio.to_thread(desk.outbox.addressed, endpoint_id, key=delivery_id, limit=1)
    if not found:
        raise Problem(404, f"no delivery {delivery_id!r} to {endpoint_id}")
    return found[0]


@router.get(
    "/{endpoint_id}/deliveries/{delivery_id}",
    summary="One delivery with every attempt",
    responses=problems(404),
)
async def delivery(
    endpoint_id: EndpointId, delivery_id: DeliveryId, desk: Desk, caller: WebhookUser
) -> DeliveryView:
    await _endpoint(desk, caller, endpoint_id)
    message = await _one(desk, endpoint_id, delivery_id)
    attempts = await desk.attempts(message, endpoint_id)
    view = _delivery(message, desk.site)
    view.history = [AttemptView(**a) for a in attempts if a["outcome"] != "requeued"]
    return view


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    summary="Send one delivery again now (the same webhook-id)",
    description="Whatever its state — taken, failed or dead — it goes again at once, its "
    "attempts counted afresh. As always, its order's webhooks not sent yet wait for it.",
    responses=problems(404, 409),
)
async def redeliver(
    endpoint_id: EndpointId, delivery_id: DeliveryId, desk: Desk, caller: WebhookUser
) -> Requeued:
    endpoint = await _endpoint(desk, caller, endpoint_id)
    message = await _one(desk, endpoint_id, delivery_id)
    if message.outcome is None:
        raise Problem(409, f"delivery {delivery_id} was not tried yet: it goes when due")
    await desk.redeliver(endpoint_id, message, by(caller))
    return Requeued(endpoint_id=endpoint_id, status=endpoint.get("status") or "active", requeued=1)
