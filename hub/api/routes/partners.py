"""Partners — the suppliers and customers the hub sends webhooks to — and their API keys
(docs/webhooks.md). The admin registers a partner with the orders it may see, and issues it a
key (shown once); a partner's key reads its own partner and nothing of another's."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from hub.api.deps import Caller, Desk, PartnerDesk, WebhookUser, require
from hub.api.policy import WEBHOOK_USERS
from hub.api.problems import Problem, problems
from hub.ports import Asker
from hub.webhook_registry import Registry

# Who may use these routes at all is checked first: a caller of another role learns nothing
# (not even whether this hub sends webhooks) before its 403. Each route narrows it further.
router = APIRouter(
    prefix="/partners", tags=["partners"], dependencies=[Depends(require(*WEBHOOK_USERS))]
)

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
PartnerId = Annotated[str, Path(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Ids = Annotated[list[Name], Field(max_length=1000)]
# (a partner that may see nothing is a mistake, said at once)
_SEES = "say which orders it may see: customers, part_numbers, orders, or all_orders = true"


class PartnerIn(BaseModel):
    """A partner: a customer (its orders: ``customers``) or a supplier (the orders of the
    ``part_numbers`` it supplies); ``orders`` names more, ``all_orders`` grants every one."""

    model_config = ConfigDict(extra="forbid")

    partner_id: str = Field(pattern=ID_PATTERN)
    name: Name
    kind: Literal["customer", "supplier"]
    customers: Ids = Field(default_factory=list)
    part_numbers: Ids = Field(default_factory=list)
    orders: Ids = Field(default_factory=list)
    all_orders: bool = False

    @model_validator(mode="after")
    def _sees_something(self) -> PartnerIn:
        if sees_nothing(self.model_dump()):
            raise ValueError(_SEES)
        return self


class PartnerChange(BaseModel):
    """What changes (the rest stays)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    customers: Ids | None = None
    part_numbers: Ids | None = None
    orders: Ids | None = None
    all_orders: bool | None = None


class KeyView(BaseModel):
    key_id: str
    role: str
    issued_at: datetime
    revoked_at: datetime | None


class PartnerView(BaseModel):
    partner_id: str
    name: str
    kind: str
    customers: list[str]
    part_numbers: list[str]
    orders: list[str]
    all_orders: bool
    keys: list[KeyView]
    endpoints: list[str]
    created_at: datetime
    updated_at: datetime


class IssuedKey(BaseModel):
    key_id: str
    role: str
    key: str = Field(description="Shown this once: the hub keeps only its SHA-256")


def partner_view(partner: dict[str, Any], endpoints: list[str]) -> PartnerView:
    return PartnerView(
        **{k: partner[k] for k in ("partner_id", "name", "kind", "customers", "part_numbers",
                                   "orders", "all_orders", "created_at", "updated_at")},
        keys=[KeyView(key_id=k, **{f: v[f] for f in ("role", "issued_at", "revoked_at")})
              for k, v in sorted(partner["keys"].items())],
        endpoints=endpoints,
    )  # fmt: skip


def by(caller: Caller) -> Asker:
    """Who asked, as the store keeps it (never the key): in the change's words, and as the
    actor of its event."""
    partner = f":{caller.partner}" if caller.partner else ""
    return caller.asking(f"api:{caller.role}{partner}:{caller.key_id}")


async def _partner(desk: Desk, caller: Caller, partner_id: str) -> dict[str, Any]:
    """The partner, if the caller may see it (a partner sees only itself: 404 for others)."""
    partner = (await desk.fresh()).partner(partner_id)
    if partner is None or (caller.partner is not None and caller.partner != partner_id):
        raise Problem(404, f"no partner {partner_id!r}")
    return partner


def _answer(registry: Registry, partner_id: str) -> PartnerView:
    partner = registry.partner(partner_id)
    if partner is None:  # (deleted meanwhile)
        raise Problem(404, f"no partner {partner_id!r}")
    own = sorted(
        e["endpoint_id"] for e in registry.partner_endpoints() if e["partner_id"] == partner_id
    )
    return partner_view(partner, own)


def sees_nothing(partner: dict[str, Any]) -> bool:
    return not (
        partner.get("all_orders") or partner.get("customers") or partner.get("part_numbers")
        or partner.get("orders")
    )  # fmt: skip


@router.post(
    "",
    status_code=201,
    summary="Register a partner (admin)",
    responses=problems(409, 503),
)
async def create_partner(body: PartnerIn, desk: Desk, caller: PartnerDesk) -> PartnerView:
    async with desk.changes.lock:
        if (await desk.fresh()).partner(body.partner_id) is not None:
            raise Problem(409, f"partner {body.partner_id!r} exists: PATCH it")
        fields = body.model_dump(exclude={"partner_id"})
        await desk.change(
            {"action": "partner_saved", "partner_id": body.partner_id, "fields": fields}, by(caller)
        )  # fmt: skip
    return _answer(await desk.fresh(), body.partner_id)


@router.get("", summary="Partners (a partner's key: its own)")
async def list_partners(desk: Desk, caller: WebhookUser) -> list[PartnerView]:
    registry = await desk.fresh()
    return [
        _answer(registry, partner_id)
        for partner_id in sorted(registry.partners)
        if caller.partner is None or caller.partner == partner_id
    ]


@router.get("/{partner_id}", summary="A partner", responses=problems(404))
async def get_partner(partner_id: PartnerId, desk: Desk, caller: WebhookUser) -> PartnerView:
    await _partner(desk, caller, partner_id)
    return _answer(await desk.fresh(), partner_id)


@router.patch("/{partner_id}", summary="Change a partner (admin)", responses=problems(404))
async def change_partner(
    partner_id: PartnerId, body: PartnerChange, desk: Desk, caller: PartnerDesk
) -> PartnerView:
    async with desk.changes.lock:
        partner = await _partner(desk, caller, partner_id)
        fields = body.model_dump(exclude_none=True)
        if sees_nothing({**partner, **fields}):
            raise Problem(422, _SEES)
        await desk.change(
            {"action": "partner_saved", "partner_id": partner_id, "fields": fields}, by(caller)
        )  # fmt: skip
    return _answer(await desk.fresh(), partner_id)


@router.delete(
    "/{partner_id}",
    status_code=204,
    summary="Delete a partner, its keys and its endpoints (admin)",
    responses=problems(404),
)
async def delete_partner(partner_id: PartnerId, desk: Desk, caller: PartnerDesk) -> Response:
    async with desk.changes.lock:
        await _partner(desk, caller, partner_id)
        gone = [
            e for e in (await desk.fresh()).partner_endpoints() if e["partner_id"] == partner_id
        ]
        await desk.change({"action": "partner_deleted", "partner_id": partner_id}, by(caller))
        for endpoint in gone:
            await desk.forget(endpoint["endpoint_id"])
    return Response(status_code=204)


@router.post(
    "/{partner_id}/keys",
    status_code=201,
    summary="Issue the partner an API key (admin; shown once)",
    description="The key has the partner's role (supplier or customer) and reads only the "
    "partner's own subscriptions and deliveries.",
    responses=problems(404),
)
async def issue_key(partner_id: PartnerId, desk: Desk, caller: PartnerDesk) -> IssuedKey:
    async with desk.changes.lock:
        partner = await _partner(desk, caller, partner_id)
        key_id, key = await desk.issue_key(partner_id, partner["kind"], by(caller))
    return IssuedKey(key_id=key_id, role=partner["kind"], key=key)


@router.delete(
    "/{partner_id}/keys/{key_id}",
    status_code=204,
    summary="Revoke a partner's key (admin)",
    responses=problems(404),
)
async def revoke_key(
    partner_id: PartnerId,
    key_id: Annotated[str, Path(pattern=ID_PATTERN)],
    desk: Desk,
    caller: PartnerDesk,
) -> Response:
    async with desk.changes.lock:
        partner = await _partner(desk, caller, partner_id)
        if key_id not in partner["keys"]:
            raise Problem(404, f"partner {partner_id!r} has no key {key_id!r}")
        await desk.change(
            {"action": "key_revoked", "partner_id": partner_id, "key_id": key_id}, by(caller)
        )  # fmt: skip
    return Response(status_code=204)
