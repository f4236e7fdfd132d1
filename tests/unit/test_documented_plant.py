"""The plant configurations the docs show are ones the hub takes as they are."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import projections.rules.plant as plant_module
from projections.rules.plant import PlantConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, re.S)


@pytest.mark.parametrize("where", ["oee.md", "screens.md", "plant.py"])
def test_each_documented_plant_is_valid(where: str) -> None:
    text = (plant_module.__doc__ or "") if where == "plant.py" else (DOCS / where).read_text()
    plants = [tomllib.loads(b)["plant"] for b in toml_blocks(text) if "[plant" in b]
    assert plants, f"no [plant] example in {where}"
    for plant in plants:
        config = PlantConfig.model_validate(plant)
        # (A key written after a subtable would land in it: the catalog would refuse it.)
        assert config.reason_prompt_after_s == 300
        assert set(config.station_reasons("LATHE-3")) <= set(config.planned_reasons())
        assert "planned/changeover" in config.station_reasons("LATHE-3")
