"""OPC UA machine tools (OPC 40501) through asyncua."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts import Token


class OpcuaConfig(BaseModel):
    """One OPC 40501 MachineTool on an OPC UA server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host:4840/path")
    # The MachineTool object, as browse names from Objects, each "<namespace uri or index>:<name>"
    browse_path: list[str] = Field(min_length=1)
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path | None = None  # the client's certificate (DER or PEM)
    private_key: Path | None = None
    server_certificate: Path | None = None
    username: str | None = None
    password: str | None = None
    publishing_interval_ms: int = Field(default=500, ge=10, le=60_000)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
