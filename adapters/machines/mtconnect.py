"""MTConnect agent client (httpx): probe, current, then sample from nextSequence."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from contracts import Token


class MtconnectConfig(BaseModel):
    """One MTConnect agent and the devices to take from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://", description="the agent, e.g. http://agent:5000")
    devices: dict[str, Token] = {}  # device name or uuid -> machine id; empty: every device
    interval_ms: int = Field(default=1000, ge=0, le=60_000)
    heartbeat_ms: int = Field(default=10_000, ge=100, le=600_000)
    count: int = Field(default=1000, ge=1, le=100_000)
    streaming: bool = True  # multipart sample stream; False (or if the agent cannot): polling
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
