"""The adapter configurations the README and docs/adapters.md show are ones the hub takes as they
are: every protocol's example, validated by the same code as ``mes-hub adapter run``."""

from __future__ import annotations

import tomllib
from pathlib import Path

from adapters.machines.config import adapters_section
from adapters.machines.registry import PROTOCOLS, build_adapters
from tests.unit.test_documented_plant import toml_blocks

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_shows_every_protocol_and_each_example_is_valid(tmp_path: Path) -> None:
    (block,) = [b for b in toml_blocks((ROOT / "README.md").read_text()) if "[[adapters." in b]
    table = tomllib.loads(block)["adapters"]
    for name in ("client-cert.der", "client-key.pem", "dmg-5-server.der"):
        (tmp_path / name).touch()  # the OPC UA entry names files beside the config; they exist
    config = adapters_section(table, "README.md", tmp_path)
    assert set(table) == set(PROTOCOLS), "the README's example names every protocol"
    adapters = build_adapters(config)
    assert sorted(a.protocol for a in adapters) == sorted(PROTOCOLS)
    # Worked examples: the entries are read as the README's comments say.
    assert config.haas[0].part_count_macro == 3901
    assert config.serial[0].patterns[0].meaning == "part_count"
    assert config.sparkplug[0].machines[0].edge_node == "Press3-Gateway"


def test_docs_adapters_links_a_page_for_every_protocol_page_that_exists() -> None:
    overview = (ROOT / "docs" / "adapters.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs" / "adapters").glob("*.md"))
    assert pages, "docs/adapters/ has the protocol pages"
    for page in pages:
        assert f"adapters/{page}" in overview, f"docs/adapters.md does not link {page}"
