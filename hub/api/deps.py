"""Dependencies of the routes: the services each route uses, and who may call it.

The composition root hands the app one ``ApiContext``; routes do not take it whole but name the
services they use (``Store``, ``Facts``, ``Orders``, ``Reads``, ``Publisher``, ``Plant``, ``Site``,
``MaxClockSkew``) and the callers they admit (``Reader``, ``EventWriter``: roles from
``hub.api.policy``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hub.api.policy import (
    AUDITORS,
    ERP_DESK,
    EVENT_WRITERS,
    PARTNER_DESK,
    PARTNERS,
    READERS,
    WEBHOOK_USERS,
)
from hub.api.problems import Problem
from hub.api.reads import ReadPool
from hub.api.webhook_desk import PARTNER_KEY, WebhookDesk, key_hash
from hub.outbox import OutboxMessage
from hub.ports import Asker, EventPublisher
from hub.settings import ROLES, ApiKey, Role
from hub.store import EventStore
from hub.ui.sessions import Session, Sessions
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader

if TYPE_CHECKING:
    from hub.ui.live import LiveFeed

T = TypeVar("T")


@dataclass(frozen=True)
class ApiContext:
    """What the API needs, handed over by the composition root."""

    store: EventStore
    facts: FactsReader
    orders: OrdersReader
    publisher: EventPublisher
    api_keys: list[ApiKey]
    site: str
    reads: ReadPool  # where the read routes' work runs (``hub.api.reads``)
    plant: PlantConfig = field(default_factory=PlantConfig)
    # ``[hub] max_clock_skew_s``: an event dated further than this after now is refused.
    max_clock_skew_s: float = 300.0
    # Asks for an outbox message to be tried again (``hub.outbox.Requeue``); None: no outbox.
    requeue: Callable[[OutboxMessage, str, Asker], Awaitable[None]] | None = None
    # The outbox's destinations, each with the store position it is owed what was decided
    # after (a destination added later is not owed the history): a message is sent once all
    # that are owed it took it.
    destinations: dict[str, int] = field(default_factory=dict)
    # Partners and their webhook endpoints (``hub.api.routes.partners``, ``…webhooks``);
    # None: this hub keeps no views, so sends no webhooks.
    webhooks: WebhookDesk | None = None
    # What keys' ids are made with (``key_id``): the hub's own secret (its signing key).
    key_id_secret: bytes = b""
    # The public key string of the checkpoints' key from the settings, which the audit routes
    # verify with (``hub.sealer.audit_verifier``); None: the hub has made no key yet.
    audit_public_key: str | None = None
    # The floor's screens' signed-in devices (``hub.ui.sessions``); None: no screens.
    sessions: Sessions | None = None
    # What pushes the views' changes to the screens' open pages (``hub.ui.live``).
    live: LiveFeed | None = None


async def get_context(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context


# The whole context, which the services and callers below are built from (routes name those).
Context = Annotated[ApiContext, Depends(get_context)]

# --- the services ----------------------------------------------------------------------------


def _service(part: Callable[[ApiContext], T]) -> Callable[[ApiContext], Awaitable[T]]:
    """A dependency giving one part of the context."""

    async def dependency(context: Context) -> T:
        return part(context)

    return dependency


Store = Annotated[EventStore, Depends(_service(lambda c: c.store))]
Facts = Annotated[FactsReader, Depends(_service(lambda c: c.facts))]
Orders = Annotated[OrdersReader, Depends(_service(lambda c: c.orders))]
Publisher = Annotated[EventPublisher, Depends(_service(lambda c: c.publisher))]
Plant = Annotated[PlantConfig, Depends(_service(lambda c: c.plant))]
Site = Annotated[str, Depends(_service(lambda c: c.site))]
MaxClockSkew = Annotated[float, Depends(_service(lambda c: c.max_clock_skew_s))]
Destinations = Annotated[dict[str, int], Depends(_service(lambda c: c.destinations))]
Requeuer = Annotated[
    Callable[[OutboxMessage, str, Asker], Awaitable[None]] | None,
    Depends(_service(lambda c: c.requeue)),
]
Reads = Annotated[ReadPool, Depends(_service(lambda c: c.reads))]

# --- the callers -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


@dataclass(frozen=True)
class Caller:
    role: Role
    partner: str | None = None  # a partner's key (roles supplier, customer): whose
    # The key's id (``key_id``), recorded as the actor of what the caller sends; never the key.
    key_id: str = ""
    # A screen's signed-in device calling with its session cookie (``hub.ui``), not a key.
    session: Session | None = None

    def actor_attributes(self) -> dict[str, str]:
        """The CloudEvent extension attributes naming this caller as the actor of an event it
        sends (the hub's API publisher signs them; ingest records them)."""
        return self.asking("").attributes()

    def asking(self, by: str) -> Asker:
        """This caller as the asker of something the hub records as its own event."""
        return Asker(by, {"kind": "key", "id": self.key_id, "role": self.role})


def key_id(presented: str, secret: bytes) -> str:
    """An API key's id in the audit log: the first 16 hex digits of an HMAC-SHA256 of the key
    under a secret of the hub's (``ApiContext.key_id_secret``), so that whoever reads the log
    cannot test guesses of a key against it. ``GET /api/v1/me`` tells a key's holder its id."""
    return "key-" + hmac.new(secret, presented.encode(), hashlib.sha256).hexdigest()[:16]


async def identify(context: ApiContext, presented: str) -> Caller | None:
    # Compare against every key in constant time, so timing tells nothing about near misses.
    found: Caller | None = None
    for api_key in context.api_keys:
        if hmac.compare_digest(api_key.key.get_secret_value().encode(), presented.encode()):
            found = Caller(api_key.role, key_id=key_id(presented, context.key_id_secret))
    if found is None and context.webhooks is not None and presented.startswith(PARTNER_KEY):
        # A partner's key, issued by the API: the store keeps its SHA-256 only (a hash looked
        # up, not compared: its timing tells nothing of the key).
        registry = await asyncio.to_thread(context.webhooks.registry)
        owner = registry.key_owner(key_hash(presented))
        if owner is not None and owner[1] in PARTNERS:
            found = Caller(
                owner[1], partner=owner[0], key_id=key_id(presented, context.key_id_secret)
            )
    return found


SESSION_COOKIE = "mes_hub_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def session_caller(context: ApiContext, request: Request) -> Caller | None:
    """The caller a screen's session cookie signs in (``hub.ui.sessions``), or None. A request
    that changes something must also carry the session's CSRF token in ``X-CSRF-Token``: a
    page of another site cannot read it (403 otherwise)."""
    token = request.cookies.get(SESSION_COOKIE)
    if context.sessions is None or not token:
        return None
    session = await asyncio.to_thread(context.sessions.find, token)
    if session is None:
        return None
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.url.path.startswith("/ui/") and _is_form(request):
            # The screens' own forms (sign out, the admin's) carry it as a field.
            sent = str((await request.form()).get("csrf", ""))
        sent = sent or ""
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise Problem(
                403,
                f"this request changes something: it needs the page's {CSRF_HEADER} header "
                "(a request from another site has none)",
                extensions={"csrf_required": True},
            )
    return Caller(session.role, key_id=session.key_id, session=session)


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind in ("application/x-www-form-urlencoded", "multipart/form-data")


def require(*roles: Role) -> Callable[..., Awaitable[Caller]]:
    """A dependency admitting callers whose key has one of ``roles``: given as a bearer token,
    or by a screen's session cookie (``session_caller``)."""

    async def check(
        context: Context,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Caller:
        challenge = {"WWW-Authenticate": 'Bearer realm="mes-hub"'}
        caller: Caller | None = None
        if credentials is None and (caller := await session_caller(context, request)) is None:
            raise Problem(
                401, "an API key is required: Authorization: Bearer <key>", headers=challenge
            )
        if credentials is not None and credentials.scheme.lower() != "bearer":
            raise Problem(
                401, "an API key is required: Authorization: Bearer <key>", headers=challenge
            )
        if caller is None:
            assert credentials is not None
            caller = await identify(context, credentials.credentials)
        if caller is None:
            raise Problem(401, "the API key is not valid", headers=challenge)
        if caller.role in PARTNERS and caller.partner is None:
            # A supplier or customer key of the settings belongs to no partner: it would see
            # every partner's. A partner's key is issued by POST /api/v1/partners/{id}/keys.
            raise Problem(
                403, f"a {caller.role} key from the settings belongs to no partner; use a key "
                "issued for the partner (POST /api/v1/partners/{id}/keys)",
            )  # fmt: skip
        if caller.role not in roles:
            raise Problem(
                403, f"role {caller.role!r} may not do this; admitted: {', '.join(roles)}"
            )
        return caller

    check.__name__ = "require_" + "_".join(roles)
    return check


Reader = Annotated[Caller, Depends(require(*READERS))]
AnyCaller = Annotated[Caller, Depends(require(*ROLES))]
EventWriter = Annotated[Caller, Depends(require(*EVENT_WRITERS))]
ErpDesk = Annotated[Caller, Depends(require(*ERP_DESK))]
PartnerDesk = Annotated[Caller, Depends(require(*PARTNER_DESK))]
WebhookUser = Annotated[Caller, Depends(require(*WEBHOOK_USERS))]
Auditor = Annotated[Caller, Depends(require(*AUDITORS))]


async def get_desk(context: Context) -> WebhookDesk:
    if context.webhooks is None:
        raise Problem(503, "this hub sends no webhooks (it keeps no views)")
    return context.webhooks


Desk = Annotated[WebhookDesk, Depends(get_desk)]
