from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers. Reveals nothing else.")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
