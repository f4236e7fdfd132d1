"""Dependencies of the routes: the services, and who may call what."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hub.api.problems import Problem
from hub.ports import EventPublisher
from hub.settings import ApiKey, Role
from hub.store import EventStore
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader


@dataclass(frozen=True)
class ApiContext:
    """What the API needs, handed over by the composition root."""

    store: EventStore
    facts: FactsReader
    orders: OrdersReader
    publisher: EventPublisher
    api_keys: list[ApiKey]
    site: str
    plant: PlantConfig = field(default_factory=PlantConfig)
    # ``[hub] max_clock_skew_s``: an event dated further than this after now is refused.
    max_clock_skew_s: float = 300.0


def get_context(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context


Context = Annotated[ApiContext, Depends(get_context)]
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


@dataclass(frozen=True)
class Caller:
    role: Role


def _identify(context: ApiContext, presented: str) -> Caller | None:
    # Compare against every key in constant time, so timing tells nothing about near misses.
    found: Caller | None = None
    for api_key in context.api_keys:
        if hmac.compare_digest(api_key.key.get_secret_value().encode(), presented.encode()):
            found = Caller(api_key.role)
    return found


def require(*roles: Role) -> Callable[..., Awaitable[Caller]]:
    """A dependency admitting callers whose key has one of ``roles``."""

    async def check(
        context: Context,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Caller:
        challenge = {"WWW-Authenticate": 'Bearer realm="mes-hub"'}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(
                401, "an API key is required: Authorization: Bearer <key>", headers=challenge
            )
        caller = _identify(context, credentials.credentials)
        if caller is None:
            raise Problem(401, "the API key is not valid", headers=challenge)
        if caller.role not in roles:
            raise Problem(
                403, f"role {caller.role!r} may not do this; admitted: {', '.join(roles)}"
            )
        return caller

    check.__name__ = "require_" + "_".join(roles)
    return check


READERS: tuple[Role, ...] = ("admin", "operator", "erp", "auditor")
EventWriter = Annotated[Caller, Depends(require("admin", "operator", "erp"))]
Reader = Annotated[Caller, Depends(require(*READERS))]
