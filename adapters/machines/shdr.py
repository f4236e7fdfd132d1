"""SHDR: the line protocol of MTConnect adapters (TCP 7878), the usual route for older controls
and RS-232 machines behind a serial-to-TCP gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts import Token

Meaning = Literal[
    "availability", "execution", "controller_mode", "program", "part_count", "bad_part_count",
    "condition", "message", "ignore",
]  # fmt: skip


class ShdrConfig(BaseModel):
    """One SHDR adapter (one TCP peer): one machine, or several with ``dev:key`` lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(default=7878, ge=1, le=65535)
    machine_id: Token | None = None  # the machine of lines without a ``dev:`` prefix
    devices: dict[str, Token] = {}  # SHDR device name (``dev:key``) -> machine id
    devices_xml: Path | None = None  # maps keys (DataItem name or id) to what they mean
    keys: dict[str, Meaning] = {}  # key -> meaning; wins over Devices.xml
    heartbeat_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
