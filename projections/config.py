"""The ``[plant]`` section of the config file: read here, at the edge; validated by the rules'
own model (``projections.rules.plant``), which does no I/O."""

from __future__ import annotations

import tomllib
from pathlib import Path

from projections.rules.plant import PlantConfig, PlantConfigError, plant_from_table

__all__ = ["PlantConfigError", "load_plant"]


def load_plant(config_file: Path | None) -> PlantConfig:
    """The ``[plant]`` table of the config file, or the defaults when there is none."""
    if config_file is None:
        return PlantConfig()
    try:
        raw = tomllib.loads(config_file.read_text()).get("plant", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlantConfigError(f"{config_file}: {exc}") from None
    return plant_from_table(raw, str(config_file))
