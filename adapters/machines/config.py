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

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.machines.focas import FocasConfig
from adapters.machines.haas import HaasConfig
from adapters.machines.lsv2 import Lsv2Config
from adapters.machines.modbus import ModbusConfig
from adapters.machines.mtconnect import MtconnectConfig
from adapters.machines.opcua import OpcuaConfig
from adapters.machines.serial_line import SerialConfig
from adapters.machines.shdr import ShdrConfig
from adapters.machines.sparkplug import SparkplugConfig
from hub.settings import ConfigError, section_values, validation_problems

SECTION = "adapters"


class AdapterConfigError(ConfigError):
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
    serial: list[SerialConfig] = []
    focas: list[FocasConfig] = []
    sparkplug: list[SparkplugConfig] = []
    lsv2: list[Lsv2Config] = []
    haas: list[HaasConfig] = []


def adapters_section(
    table: Any, source: str, base: Path, env: Mapping[str, str] | None = None
) -> AdaptersConfig:
    """The section as read from ``source``, with ``MES_HUB_ADAPTERS__<KEY>`` overrides; file
    names in it are relative to ``base`` (the config file's folder)."""
    values, origins = section_values(SECTION, table, source, os.environ if env is None else env)
    try:
        return AdaptersConfig.model_validate(values, context={"base": base})
    except ValidationError as exc:
        raise AdapterConfigError.of(validation_problems(exc, SECTION, origins, source)) from None


def load_adapters(config_file: Path, env: Mapping[str, str] | None = None) -> AdaptersConfig:
    try:
        raw = tomllib.loads(config_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AdapterConfigError(str(config_file), None, str(exc)) from None
    return adapters_section(raw.get(SECTION, {}), str(config_file), config_file.parent, env)
