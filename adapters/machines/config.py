"""The ``[adapters]`` table of ``mes-hub.toml``: which machines each protocol reaches, and the
store-and-forward buffer. Validated at start; an error names the file, the key and the reason.

```toml
[hub]
nats_url = "nats://hub:4222"
site = "plant1"

[adapters.buffer]
directory = "/var/lib/mes-hub/adapter-buffer"
max_events = 100000

[[adapters.shdr]]
machine_id = "OKUMA-1"
host = "10.0.0.21"
devices_xml = "/etc/mes-hub/Devices.xml"
```

Each protocol module defines its own entry model; see ``docs/adapters.md``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.machines.modbus import ModbusConfig
from adapters.machines.mtconnect import MtconnectConfig
from adapters.machines.opcua import OpcuaConfig
from adapters.machines.shdr import ShdrConfig


class AdapterConfigError(Exception):
    """An ``[adapters]`` setting that cannot be used: names the file, the key and the reason."""


class BufferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path | None = Field(
        default=None, description="Where events wait while NATS is unreachable"
    )
    max_events: Annotated[int, Field(ge=100, le=100_000_000)] = 100_000


class AdaptersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    buffer: BufferConfig = BufferConfig()
    mtconnect: list[MtconnectConfig] = []
    shdr: list[ShdrConfig] = []
    opcua: list[OpcuaConfig] = []
    modbus: list[ModbusConfig] = []


def load_adapters(config_file: Path) -> AdaptersConfig:
    try:
        raw = tomllib.loads(config_file.read_text()).get("adapters", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AdapterConfigError(f"{config_file}: {exc}") from None
    base = config_file.parent
    try:
        config = AdaptersConfig.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        problems = [
            f"{config_file}: key 'adapters.{'.'.join(str(p) for p in e['loc'])}': {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise AdapterConfigError("; ".join(problems)) from None
    return config
