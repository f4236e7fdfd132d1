"""One configuration: every section from one read of the file, environment overrides for every
section (values and secrets from files), and errors that name the file or variable, the key and
the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.machines.config import AdapterConfigError
from hub.config import load_config
from hub.settings import ConfigError
from projections.config import PlantConfigError

CONFIG = """
[hub]
site = "plant1"
partitions = 2

[plant]
time_zone = "Europe/Berlin"
max_parts_per_reading = 500

[[adapters.shdr]]
machine_id = "LATHE-3"
host = "127.0.0.1"
port = 7878
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mes-hub.toml"
    path.write_text(CONFIG)
    return path


def test_every_section_comes_from_one_file(config: Path) -> None:
    loaded = load_config(config, adapters=True)
    assert (loaded.hub.site, loaded.hub.partitions) == ("plant1", 2)
    assert (loaded.plant.time_zone, loaded.plant.max_parts_per_reading) == ("Europe/Berlin", 500)
    assert loaded.adapters is not None
    assert [e.machine_id for e in loaded.adapters.shdr] == ["LATHE-3"]
    # Without adapters=True the protocol sections are not validated (serve does not need them).
    assert load_config(config).adapters is None


def test_every_section_takes_environment_overrides(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MES_HUB_HUB__PARTITIONS", "4")
    monkeypatch.setenv("MES_HUB_PLANT__MAX_PARTS_PER_READING", "50")
    monkeypatch.setenv("MES_HUB_PLANT__MACHINES__PRESS_2__COMMISSIONED", "2026-03-01T06:00:00Z")
    monkeypatch.setenv("MES_HUB_ADAPTERS__BUFFER__MAX_EVENTS", "2000")
    loaded = load_config(config, adapters=True)
    assert loaded.hub.partitions == 4
    assert loaded.plant.max_parts_per_reading == 50
    assert str(loaded.plant.machines["PRESS_2"].commissioned) == "2026-03-01 06:00:00+00:00"
    assert loaded.adapters is not None and loaded.adapters.buffer.max_events == 2000
    # The command line wins over the environment.
    assert load_config(config, hub_overrides={"partitions": 8}).hub.partitions == 8


def test_a_secret_can_come_from_a_file_named_in_the_environment(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "api-keys"
    secret.write_text("admin:a-key-from-a-mounted-secret\n")
    monkeypatch.setenv("MES_HUB_HUB__API_KEYS_FILE", str(secret))
    keys = load_config(config).hub.parsed_api_keys()
    assert [(k.role, k.key.get_secret_value()) for k in keys] == [
        ("admin", "a-key-from-a-mounted-secret")
    ]
    monkeypatch.setenv("MES_HUB_HUB__API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert (caught.value.source, caught.value.key) == (
        "environment variable MES_HUB_HUB__API_KEYS_FILE",
        "hub.api_keys",
    )
    assert "cannot read" in caught.value.reason and "a-key-from" not in str(caught.value)


def test_an_error_names_the_variable_or_file_the_key_and_the_reason(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MES_HUB_PLANT__MAX_PARTS_PER_READING", "0")
    with pytest.raises(PlantConfigError) as caught:
        load_config(config)
    error = caught.value
    assert (error.source, error.key) == (
        "environment variable MES_HUB_PLANT__MAX_PARTS_PER_READING",
        "plant.max_parts_per_reading",
    )
    assert "greater than or equal to 1" in error.reason
    monkeypatch.delenv("MES_HUB_PLANT__MAX_PARTS_PER_READING")
    config.write_text(CONFIG.replace("port = 7878", "port = 70000"))
    with pytest.raises(AdapterConfigError) as adapters:
        load_config(config, adapters=True)
    assert (adapters.value.source, adapters.value.key) == (str(config), "adapters.shdr.0.port")
    # Every section's error is a ConfigError: one catcher at the entry point.
    assert isinstance(adapters.value, ConfigError)


def test_an_unknown_section_is_refused_naming_the_known_ones(config: Path) -> None:
    config.write_text(CONFIG + '\n[plnat]\ntime_zone = "UTC"\n')
    with pytest.raises(ConfigError, match=r"key 'plnat': unknown section; known sections are hub"):
        load_config(config)


def test_an_entry_of_an_array_of_tables_takes_its_secret_from_a_file(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [[adapters.shdr]] entry 0's port from the environment; a digits-only value stays text
    # until the model converts it, and a site of digits stays a site.
    monkeypatch.setenv("MES_HUB_ADAPTERS__SHDR__0__PORT", "7879")
    monkeypatch.setenv("MES_HUB_HUB__SITE", "2024")
    loaded = load_config(config, adapters=True)
    assert loaded.adapters is not None and loaded.adapters.shdr[0].port == 7879
    assert loaded.hub.site == "2024"
    monkeypatch.setenv("MES_HUB_ADAPTERS__SHDR__3__PORT", "7879")
    with pytest.raises(ConfigError) as caught:
        load_config(config, adapters=True)
    assert caught.value.key == "adapters.shdr.3"


def test_a_postgres_dsn_the_driver_would_refuse_names_the_file_and_key_not_the_password(
    config: Path,
) -> None:
    config.write_text(
        CONFIG.replace(
            "partitions = 2",
            'store = "postgres"\n'
            'postgres_dsn = "postgresql://mes:Pw-secret-4711@db/mes?sslmode=sometimes"',
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert message.startswith(f"{config}: key 'hub.postgres_dsn': ")
    assert "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full" in (
        message
    )
    assert "Pw-secret" not in message
