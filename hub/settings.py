"""Settings, read once at start from (highest first) command-line options, ``MES_HUB_*``
environment variables and an optional ``mes-hub.toml``, then passed down explicitly.

A bad value fails at start with the place it came from, the key and the reason.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "MES_HUB_"
ROLES = ("admin", "operator", "erp", "supplier", "auditor")
Role = Literal["admin", "operator", "erp", "supplier", "auditor"]
MIN_KEY_LENGTH = 16


class ConfigError(Exception):
    """A setting that cannot be used; the message names where it came from, the key and why."""


class ApiKey(BaseModel):
    role: Role
    key: SecretStr

    def __repr__(self) -> str:  # never show the key, even in a debugger or traceback
        return f"ApiKey(role={self.role!r}, key='**********')"


def parse_api_keys(value: str) -> list[ApiKey]:
    """``role:key,role:key`` into keys; refuses unknown roles and short (guessable) keys."""
    keys: list[ApiKey] = []
    for number, item in enumerate((part.strip() for part in value.split(",")), start=1):
        if not item:
            continue
        role, sep, key = item.partition(":")
        if not sep:
            raise ValueError(f"entry {number} must be role:key")
        if role not in ROLES:
            # Not echoed: an entry written key:role would print the key.
            raise ValueError(f"entry {number} has an unknown role; roles are {', '.join(ROLES)}")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(
                f"the key for role {role!r} is shorter than {MIN_KEY_LENGTH} characters"
            )
        keys.append(ApiKey(role=role, key=SecretStr(key)))
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    data_dir: Path = Field(default=Path(".mes-hub"), description="Event store, NATS data, keys")
    site: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]+$")
    nats_url: str | None = Field(default=None, description="Empty: start an embedded nats-server")
    store: Literal["sqlite", "postgres"] = "sqlite"
    postgres_dsn: SecretStr | None = Field(
        default=None, description="postgresql://user:password@host:port/dbname"
    )
    postgres_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]*$")
    partitions: int = Field(default=1, ge=1, le=64)
    duplicate_window_s: float = Field(default=120.0, gt=0, le=86_400)
    # An event dated more than this after the hub's clock is refused (API) or dead-lettered.
    max_clock_skew_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    stream_max_age_days: float = Field(default=7.0, gt=0)
    ingest_batch: int = Field(default=1000, ge=1, le=10_000)
    snapshot_interval: int = Field(default=200, ge=10)
    projection_batch: int = Field(default=5000, ge=1, le=100_000)
    projection_poll_s: float = Field(default=0.1, gt=0, le=60)
    forecast_interval_s: float = Field(default=60.0, gt=0, description="Re-forecast orders every")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_keys: SecretStr = Field(default=SecretStr(""), description="role:key,role:key")
    # Failpoint for crash tests: SIGKILL this process right after the Nth commit, before its ack.
    fault_kill_after_commit: int | None = Field(default=None, ge=1)
    # The same for a view: SIGKILL right after its Nth batch is committed.
    fault_kill_after_view_batch: int | None = Field(default=None, ge=1)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("postgres_dsn")
    @classmethod
    def _check_postgres_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                conninfo_to_dict(value.get_secret_value())
            except Exception:
                # The driver's own message may quote the password: say what, not the value.
                raise ValueError("not a valid PostgreSQL connection string") from None
        return value

    @field_validator("nats_url")
    @classmethod
    def _check_nats_url(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and not value.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError("must start with nats://, tls://, ws:// or wss://")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    def parsed_api_keys(self) -> list[ApiKey]:
        return parse_api_keys(self.api_keys.get_secret_value())

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "events.sqlite"

    @property
    def views_sqlite_path(self) -> Path:
        return self.data_dir / "views.sqlite"

    @property
    def nats_data_dir(self) -> Path:
        return self.data_dir / "nats"


def redacted_url(url: str) -> str:
    """A URL fit to print: any user:password@ is masked."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings once. ``overrides`` are command-line options (None means not given)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    file_values: dict[str, Any] = {}
    if config_file is None and os.environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        file_values = _read_toml(config_file)
    env_keys = {name for name in Settings.model_fields if (ENV_PREFIX + name).upper() in os.environ}
    merged_file = {k: v for k, v in file_values.items() if k not in env_keys and k not in overrides}
    try:
        return Settings(**merged_file, **overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, config_file, file_values, env_keys, overrides)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    # Other tables ([plant], adapters' own) are read by their owners.
    hub_section = raw.get("hub", {})
    if not isinstance(hub_section, dict):
        raise ConfigError(f"{path}: key 'hub': must be a table")
    unknown = sorted(set(hub_section) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(
            f"{path}: key 'hub.{unknown[0]}': unknown setting; known settings are "
            + ", ".join(sorted(Settings.model_fields))
        )
    return dict(hub_section)


def _explain(
    exc: ValidationError,
    config_file: Path | None,
    file_values: dict[str, Any],
    env_keys: set[str],
    overrides: dict[str, Any],
) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = str(err["loc"][0]) if err["loc"] else "?"
        if key in overrides:
            where = f"option --{key.replace('_', '-')}"
        elif key in env_keys:
            where = f"environment variable {ENV_PREFIX}{key.upper()}"
        elif key in file_values:
            where = f"{config_file}: key 'hub.{key}'"
        else:
            where = f"setting {key!r}"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)
