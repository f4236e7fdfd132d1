from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from hub.api.deps import AnyCaller

router = APIRouter(tags=["health"])
me_router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/healthz", summary="Liveness: the process answers. Reveals nothing else.")
async def healthz() -> Health:
    return Health()


class Me(BaseModel):
    role: str
    key_id: str = Field(description="How the audit log names this key (never the key)")
    partner: str | None = Field(description="A partner's key: whose")


@me_router.get("/me", summary="Who this key is: its role, and its id in the audit log")
async def me(caller: AnyCaller) -> Me:
    return Me(role=caller.role, key_id=caller.key_id, partner=caller.partner)
