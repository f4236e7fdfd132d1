"""The ``[plant]`` section of the config file, owned by the projections: read at the edge and
validated by the rules' own model (``projections.rules.plant``), which does no I/O.
``MES_HUB_PLANT__<KEY>`` environment variables override the file (``hub.settings``)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hub.settings import ConfigError, section_values, validation_problems
from projections.rules.plant import PlantConfig

SECTION = "plant"


class PlantConfigError(ConfigError):
    """A ``[plant]`` setting that cannot be used."""


def plant_section(table: Any, source: str, env: Mapping[str, str] | None = None) -> PlantConfig:
    """The section as read from ``source`` (a file name), with the environment's overrides."""
    values, origins = section_values(SECTION, table, source, os.environ if env is None else env)
    try:
        return PlantConfig.model_validate(values)
    except ValidationError as exc:
        raise PlantConfigError.of(validation_problems(exc, SECTION, origins, source)) from None


def load_plant(config_file: Path | None, env: Mapping[str, str] | None = None) -> PlantConfig:
    """The ``[plant]`` table of the config file, or the defaults when there is none."""
    if config_file is None:
        return plant_section({}, "defaults", env)
    try:
        raw = tomllib.loads(config_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlantConfigError(str(config_file), None, str(exc)) from None
    return plant_section(raw.get(SECTION, {}), str(config_file), env)
