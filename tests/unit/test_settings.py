"""A bad configuration fails at start with the file (or variable), the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.settings import ConfigError, load_settings


def test_defaults_run_embedded_with_sqlite() -> None:
    settings = load_settings()
    assert (settings.nats_url, settings.store, settings.partitions) == (None, "sqlite", 1)


def test_file_key_and_reason_are_named(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text("[hub]\npartitions = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert str(config) in message and "hub.partitions" in message
    assert "greater than or equal to 1" in message


def test_unknown_key_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text("[hub]\npartitons = 2\n")
    with pytest.raises(ConfigError, match=r"hub\.partitons': unknown setting; known settings"):
        load_settings(config)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text("[hub\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config)


def test_environment_beats_file_and_is_named_when_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text('[hub]\nsite = "plant1"\npartitions = 2\n')
    monkeypatch.setenv("MES_HUB_PARTITIONS", "4")
    assert load_settings(config).partitions == 4
    assert load_settings(config).site == "plant1"
    monkeypatch.setenv("MES_HUB_PARTITIONS", "many")
    with pytest.raises(ConfigError, match="environment variable MES_HUB_PARTITIONS"):
        load_settings(config)


def test_weak_or_unknown_api_keys_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(api_keys="admin:short-secret")
    assert "shorter than 16" in str(caught.value)
    assert "short-secret" not in str(caught.value)
    with pytest.raises(ConfigError, match="entry 1 has an unknown role"):
        load_settings(api_keys="root:0123456789abcdef0123")
    # Written the wrong way round, the key would be the "role": it must not be printed.
    with pytest.raises(ConfigError) as caught:
        load_settings(api_keys="admin:0123456789abcdef0123,supersecretkey-987654:erp")
    assert "entry 2 has an unknown role" in str(caught.value)
    assert "supersecretkey" not in str(caught.value)


def test_a_malformed_postgres_dsn_is_refused_without_showing_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        # The driver itself would say: unexpected spaces found in "hunter 2" ...
        load_settings(store="postgres", postgres_dsn="postgresql://mes:hunter 2@db/mes")
    assert "not a valid PostgreSQL connection string" in str(caught.value)
    assert "hunter" not in str(caught.value)


def test_dsn_parameters_such_as_sslmode_reach_the_driver(tmp_path: Path) -> None:
    from hub.store import HubPostgresFactory, store_environment

    settings = load_settings(
        data_dir=tmp_path,
        store="postgres",
        postgres_dsn="postgresql://mes:pw@db:5432/mes?sslmode=verify-full&application_name=hub",
    )
    factory = HubPostgresFactory(store_environment(settings))
    kwargs = factory.datastore.pool.kwargs
    assert isinstance(kwargs, dict)
    assert (kwargs["sslmode"], kwargs["application_name"], kwargs["host"]) == (
        "verify-full",
        "hub",
        "db",
    )


def test_urls_are_printed_without_credentials() -> None:
    from hub.settings import redacted_url

    assert redacted_url("nats://hub:s3cret@nats1:4222") == "nats://***@nats1:4222"
    assert redacted_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_api_keys_never_show_in_repr() -> None:
    settings = load_settings(api_keys="admin:0123456789abcdef-secret")
    assert "0123456789abcdef-secret" not in repr(settings)
    assert "0123456789abcdef-secret" not in repr(settings.parsed_api_keys())


def test_a_child_process_gets_every_setting_secrets_included_and_nothing_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub.settings import settings_from_json, settings_json

    parent = load_settings(
        data_dir=tmp_path / "hub",
        store="postgres",
        postgres_dsn="postgresql://mes:hunter2@db:5433/mes?sslmode=require",
        api_keys="admin:0123456789abcdef0123",
        projection_batch=321,
    )
    # The child's environment says otherwise: what the parent read wins.
    monkeypatch.setenv("MES_HUB_PROJECTION_BATCH", "999")
    child = settings_from_json(settings_json(parent))
    assert child == parent
    assert child.postgres_dsn is not None
    assert child.postgres_dsn.get_secret_value().startswith("postgresql://mes:hunter2@db:5433")


def test_settings_a_hub_cannot_run_with_are_refused_on_stdin_without_echoing_them() -> None:
    from hub.settings import settings_from_json

    with pytest.raises(ConfigError, match="standard input: not the settings JSON"):
        settings_from_json(b"api_keys=admin:secret")
    with pytest.raises(ConfigError) as caught:
        settings_from_json(b'{"api_keys": "admin:short-secret", "store": "nowhere"}')
    assert "standard input: settings a hub cannot run with" in str(caught.value)
    assert "short-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgresql://mes:Pw-secret-4711@db:abc/mes", "the port must be a number from 1 to 65535"),
        ("postgresql://mes:Pw-secret-4711@db:99999/mes", "the port must be a number from 1 to"),
        ("postgresql://mes:Pw-secret-4711@db/mes?sslmode=sometimes", "sslmode must be one of"),
        ("postgresql://mes:Pw-secret-4711@a:1,b:2,c:3/mes?port=1,2", "2 ports for 3 hosts"),
        ("postgresql://mes:Pw-secret-4711@db/mes?connect_timeout=soon", "connect_timeout"),
        # An unescaped "/" in the password: libpq reads "Pw-secret-4711" as the port.
        ("postgresql://mes:Pw-secret-4711/x@db/mes", "a password with '/', ':' or '@' must be"),
    ],
)
def test_a_postgres_dsn_the_driver_would_refuse_only_when_connecting_is_refused_at_start(
    dsn: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MES_HUB_POSTGRES_DSN", dsn)
    with pytest.raises(ConfigError) as caught:
        load_settings(store="postgres")
    message = str(caught.value)
    assert message.startswith("environment variable MES_HUB_POSTGRES_DSN: ")
    assert reason in message
    assert "Pw-secret" not in message


def test_host_and_port_lists_are_taken_as_libpq_takes_them() -> None:
    for dsn in (
        "postgresql://mes:pw@db1:5432,db2:5433/mes?sslmode=verify-full",
        "postgresql://mes:pw@db1,db2:5433/mes",  # db1 on the default port
        "host=db1,db2 port=5433 dbname=mes sslmode=require",
        "postgresql://mes:pw@[::1]:5432/mes?sslmode=disable&connect_timeout=3",
        "postgresql://mes@/mes?host=/var/run/postgresql",
    ):
        assert load_settings(store="postgres", postgres_dsn=dsn).postgres_dsn is not None, dsn


def test_a_postgres_store_without_a_dsn_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="store is 'postgres' but postgres_dsn is not set"):
        load_settings(store="postgres")


def test_the_crash_tests_failpoints_work_but_are_not_among_the_documented_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from hub.cli import app
    from hub.settings import documented_settings

    config = tmp_path / "mes-hub.toml"
    config.write_text("[hub]\npartitons = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "api_keys" in str(caught.value) and "fault_kill" not in str(caught.value)
    assert "postgres_dsn" in documented_settings()
    assert not [name for name in documented_settings() if name.startswith("fault_")]
    for command in (["serve", "--help"], ["demo", "--help"], ["projections", "follow", "--help"]):
        shown = CliRunner().invoke(app, command, env={"COLUMNS": "200"}).output
        assert "fault_kill" not in shown and "fault-kill" not in shown, command
    # The crash tests set them as any setting.
    monkeypatch.setenv("MES_HUB_FAULT_KILL_AFTER_COMMIT", "3")
    assert load_settings().fault_kill_after_commit == 3
    config.write_text("[hub]\nfault_kill_after_view_batch = 7\n")
    assert load_settings(config).fault_kill_after_view_batch == 7
