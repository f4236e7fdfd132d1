"""The plant configurations the docs show are ones the hub takes as they are."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import projections.rules.plant as plant_module
from projections.config import PlantConfigError, load_plant
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


CATALOG = """
[plant]
reason_prompt_after_s = 90

[plant.reasons]
mechanical = { spindle = "unplanned", coolant = "unplanned" }
material = { waiting = "unplanned" }
planned = { changeover = "planned", break = "planned" }
"""


def test_a_station_offers_the_reasons_listed_for_its_machine(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text(
        CATALOG + '[plant.stations.LATHE-3]\nreasons = ["mechanical", "planned/changeover"]\n'
    )
    plant = load_plant(config)
    assert plant.reason_prompt_after_s == 90
    assert plant.station_reasons("LATHE-3") == {
        "mechanical/spindle": "unplanned",
        "mechanical/coolant": "unplanned",
        "planned/changeover": "planned",
    }
    # A machine without a list of its own is offered the whole catalog.
    assert set(plant.station_reasons("MILL-1")) == set(plant.planned_reasons())


@pytest.mark.parametrize("listed", ["electrical", "mechanical/spin", "mechanical/spindle/x"])
def test_a_station_listing_a_reason_the_catalog_lacks_is_refused(
    tmp_path: Path, listed: str
) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text(CATALOG + f'[plant.stations.LATHE-3]\nreasons = ["{listed}"]\n')
    with pytest.raises(PlantConfigError) as refused:
        load_plant(config)
    message = str(refused.value)
    assert str(config) in message and "plant.stations" in message
    assert f"LATHE-3.reasons: {listed!r} is neither a reason code nor a branch" in message
