"""Settings, read once at start from (highest first) command-line options, ``MES_HUB_*``
environment variables and an optional ``mes-hub.toml``, then passed down explicitly.

A bad value fails at start with the place it came from, the key and the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hub.errors import MesHubError

ENV_PREFIX = "MES_HUB_"
ROLES = ("admin", "operator", "erp", "supplier", "customer", "auditor", "viewer")
Role = Literal["admin", "operator", "erp", "supplier", "customer", "auditor", "viewer"]
MIN_KEY_LENGTH = 16
# ``json_schema_extra`` of a setting for tests only (the crash tests' failpoints): it works as any
# other but is listed nowhere a user looks (``documented_settings``).
INTERNAL: JsonDict = {"internal": True}
# libpq's ``sslmode`` values; any other is refused by the driver only when it connects.
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class ConfigError(MesHubError):
    """A setting that cannot be used: where it came from (a file or an environment variable),
    the key (``section.name``; None for the file as a whole) and why. Several problems found at
    once travel together (``also``); the message lists them all."""

    def __init__(
        self,
        source: str,
        key: str | None = None,
        reason: str = "",
        *,
        also: Sequence[ConfigError] = (),
    ) -> None:
        self.source, self.key, self.reason, self.also = source, key, reason, tuple(also)
        super().__init__("; ".join(problem.line for problem in (self, *self.also)))

    @property
    def line(self) -> str:
        if self.key is None:
            return f"{self.source}: {self.reason}" if self.reason else self.source
        return f"{self.source}: key '{self.key}': {self.reason}"

    @classmethod
    def of(cls, problems: Sequence[ConfigError]) -> ConfigError:
        first, *rest = problems
        return cls(first.source, first.key, first.reason, also=rest)


# --- sections of the config file, with environment overrides --------------------------------


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def section_values(
    section: str, table: Any, source: str, env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A section's table from the file with ``MES_HUB_<SECTION>__<KEY>`` environment overrides
    (``__`` again for nested keys, the parts between the first and the last kept as written, as
    ids; the value is read as a TOML value when it is one, e.g. ``50``, ``["a", "b"]`` or
    ``{ "P-7" = 20.0 }``, else as text) and ``…_FILE`` ones (the value is the file's content: for
    passwords and secrets mounted as files). Returns the values and where each top-level key
    came from, for the error messages."""
    if not isinstance(table, dict):
        raise ConfigError(source, section, "must be a table")
    values: dict[str, Any] = dict(table)
    origins = {key: source for key in values}
    prefix = f"{ENV_PREFIX}{section.upper()}__"
    for name in sorted(env):
        if not name.startswith(prefix) or name == prefix:
            continue
        path = name[len(prefix) :].split("__")
        text = env[name]
        if path[-1].endswith("_FILE"):
            path[-1] = path[-1][: -len("_FILE")]
            try:
                value: Any = Path(text).read_text().rstrip("\n")
            except OSError as exc:
                where = ".".join([section, *(p.lower() for p in path)])
                raise ConfigError(
                    f"environment variable {name}", where, f"cannot read {text}: {exc.strerror}"
                ) from None
        else:
            value = _env_value(text)
        # The first and last parts name settings (lower case); parts between are kept as
        # written: they may be ids (MES_HUB_PLANT__MACHINES__PRESS_2__COMMISSIONED).
        path[0], path[-1] = path[0].lower(), path[-1].lower()
        node: Any = values
        for depth, key in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                # An entry of an array of tables ([[adapters.opcua]] number 0, …).
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if not isinstance(node, dict):
                where = ".".join([section, *path[: depth + 1]])
                raise ConfigError(
                    f"environment variable {name}",
                    where,
                    "no such entry to override (an array of tables is indexed from 0)",
                )
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        origins[path[0]] = f"environment variable {name}"
    return values, origins


def _env_value(text: str) -> Any:
    """A TOML array, inline table or quoted string is read as such; anything else stays text
    (the section's model converts ``50`` or ``true`` where it wants a number or a flag, and an
    all-digit password stays a password)."""
    if not text.lstrip().startswith(("[", "{", '"')):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def validation_problems(
    exc: ValidationError, section: str, origins: Mapping[str, str], default_source: str
) -> list[ConfigError]:
    """Pydantic's errors as ``ConfigError``s, each naming its source, key and reason."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        source = origins.get(loc[0], default_source) if loc else default_source
        problems.append(ConfigError(source, ".".join([section, *loc]), err["msg"]))
    return problems


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


def _postgres_dsn_problem(conninfo: Mapping[str, str]) -> str | None:
    """What the driver would refuse only when it connects, found at start: a port that is not
    a number, port and host lists that do not pair up, an unknown ``sslmode``. The values are
    not quoted: in a URL whose password has an unescaped ``/`` the password becomes the port."""
    hosts = conninfo.get("host", "").split(",")
    ports = conninfo.get("port", "").split(",")
    # An empty entry of a list means the default (libpq), as a port left out does.
    if not all(port == "" or (port.isdigit() and 1 <= int(port) <= 65535) for port in ports):
        return (
            "the port must be a number from 1 to 65535 (in a URL, a password with '/', ':' or "
            "'@' must be percent-encoded)"
        )
    if len(ports) not in (1, len(hosts)):
        return f"{len(ports)} ports for {len(hosts)} hosts: give one port, or one for each host"
    hostaddrs = conninfo.get("hostaddr")
    if hostaddrs is not None and "host" in conninfo and len(hostaddrs.split(",")) != len(hosts):
        return f"{len(hostaddrs.split(','))} hostaddr values for {len(hosts)} hosts"
    sslmode = conninfo.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        return "sslmode must be one of " + ", ".join(SSLMODES)
    timeout = conninfo.get("connect_timeout")
    if timeout is not None and not timeout.strip().lstrip("-").isdigit():
        return "connect_timeout must be a whole number of seconds"
    return None


def documented_settings() -> list[str]:
    """The ``[hub]`` settings a user is told about (the crash tests' failpoints are not)."""
    return sorted(
        name
        for name, field in Settings.model_fields.items()
        if not (
            isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("internal")
        )
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    data_dir: Path = Field(default=Path(".mes-hub"), description="Event store, NATS data, keys")
    site: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]+$")
    nats_url: str | None = Field(default=None, description="Empty: start an embedded nats-server")
    nats_identities: Path | None = Field(
        default=None,
        description="External NATS: the hub's and its API's passwords (docs/nats.md); the "
        "embedded server's are made in the data dir",
    )
    nats_credentials: Path | None = Field(
        default=None, description="An adapter's NATS credentials (mes-hub nats credentials)"
    )
    store: Literal["sqlite", "postgres"] = "sqlite"
    postgres_dsn: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/dbname",
        validate_default=True,  # (to refuse store = "postgres" without one)
    )
    postgres_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]*$")
    partitions: int = Field(default=1, ge=1, le=64)
    duplicate_window_s: float = Field(default=120.0, gt=0, le=86_400)
    # An event dated more than this after the hub's clock is refused (API) or dead-lettered.
    max_clock_skew_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    stream_max_age_days: float = Field(default=7.0, gt=0)
    # Up to this many events per transaction. Measured on 2 cores (docs/architecture.md): 4,000
    # gives ingest 12 % more events/s than 1,000 under a burst; batches are what has come, so a
    # trickle is not held back.
    ingest_batch: int = Field(default=4000, ge=1, le=10_000)
    snapshot_interval: int = Field(default=200, ge=10)
    projection_batch: int = Field(default=5000, ge=1, le=100_000)
    projection_poll_s: float = Field(default=0.1, gt=0, le=60)
    forecast_interval_s: float = Field(default=60.0, gt=0, description="Re-forecast orders every")
    webhook_progress_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="Tell an order's progress (mes.order.progress.v1) at most once in",
    )
    webhook_disable_after_s: float = Field(
        default=5 * 86400.0,
        gt=0,
        description="Disable a partner's webhook endpoint failing this long without a success",
    )
    confirm_interval_s: float = Field(
        default=0.2, gt=0, le=60, description="How often production confirmations are decided"
    )
    confirm_each_shift: bool = Field(
        default=False,
        description="Also confirm to the ERPs, at each shift end, what the orders still "
        "running made in the shift (a partial confirmation)",
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_keys: SecretStr = Field(default=SecretStr(""), description="role:key,role:key")
    api_read_workers: int = Field(
        default=2, ge=1, le=64, description="Processes answering the API's reads (below ingest)"
    )
    api_read_queue: int = Field(
        default=16, ge=0, le=10_000, description="Reads that may wait for one; more get 429"
    )
    # --- the auditors' log (docs/audit.md) ---
    audit_key: Path | None = Field(
        default=None,
        description="The Ed25519 key that signs the log's checkpoints (a C2SP note signer key "
        "file, mode 0600); empty: one made in the data dir on first start",
    )
    audit_origin: str | None = Field(
        default=None,
        max_length=200,
        description="The checkpoints' origin line; empty: mes-hub/<site>",
    )
    audit_checkpoint_every: int = Field(
        default=10_000, ge=1, description="Sign a checkpoint after this many events"
    )
    audit_checkpoint_interval_s: float = Field(
        default=60.0, gt=0, description="… or this long after the last one, if the log grew"
    )
    store_encryption_key: SecretStr | None = Field(
        default=None,
        description="Encrypt stored events with AES-GCM: a base64 key of 16, 24 or 32 bytes "
        "(mes-hub store new-key); empty: stored as plain JSON",
    )
    store_compression: bool = Field(
        default=False, description="Compress stored events (zlib) before any encryption"
    )
    # Failpoint for crash tests: SIGKILL this process right after the Nth commit, before its ack.
    fault_kill_after_commit: int | None = Field(default=None, ge=1, json_schema_extra=INTERNAL)
    # The same for a view: SIGKILL right after its Nth batch is committed.
    fault_kill_after_view_batch: int | None = Field(default=None, ge=1, json_schema_extra=INTERNAL)
    # And for the outbox: SIGKILL after the Nth delivery a destination took, before its record.
    fault_kill_after_delivery: int | None = Field(default=None, ge=1, json_schema_extra=INTERNAL)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("store_encryption_key")
    @classmethod
    def _check_store_encryption_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        # Checked here, not when the store opens: a bad key must stop the hub before it writes.
        # The key is never echoed.
        try:
            key = base64.b64decode(value.get_secret_value(), validate=True)
        except binascii.Error:
            raise ValueError("is not base64 (make one with: mes-hub store new-key)") from None
        if len(key) not in (16, 24, 32):
            raise ValueError(
                f"decodes to {len(key)} bytes; an AES key is 16, 24 or 32 bytes "
                "(make one with: mes-hub store new-key)"
            )
        return value

    @field_validator("postgres_dsn")
    @classmethod
    def _check_postgres_dsn(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            if info.data.get("store") == "postgres":
                raise ValueError("store is 'postgres' but postgres_dsn is not set")
            return None
        try:
            conninfo = conninfo_to_dict(value.get_secret_value())
        except Exception:
            # The driver's own message may quote the password: say what, not the value.
            raise ValueError("not a valid PostgreSQL connection string") from None
        problem = _postgres_dsn_problem({k: str(v) for k, v in conninfo.items()})
        if problem:
            raise ValueError(problem)
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


def settings_json(settings: Settings) -> bytes:
    """Every setting, secrets included, for a child process' stdin (``settings_from_json``):
    the child runs with exactly what the parent read, from whichever file, environment or
    options it came."""
    values = {
        name: value.get_secret_value() if isinstance(value, SecretStr) else value
        for name, value in settings
    }
    return json.dumps(values, default=str).encode()


def settings_from_json(data: bytes) -> Settings:
    try:
        values = json.loads(data)
    except ValueError:
        raise ConfigError("standard input", None, "not the settings JSON of a parent hub") from None
    try:
        return Settings(**values)
    except (TypeError, ValidationError):
        # (The message would quote values, secrets among them.)
        raise ConfigError("standard input", None, "settings a hub cannot run with") from None


def redacted_url(url: str) -> str:
    """A URL fit to print: any user:password@ is masked."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings once. ``overrides`` are command-line options (None means not given);
    then ``MES_HUB_HUB__<KEY>`` (or ``…_FILE``) and ``MES_HUB_<KEY>`` environment variables;
    then the ``[hub]`` table. (``hub.config.load_config`` reads every section at once.)"""
    if config_file is None and os.environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[ENV_PREFIX + "CONFIG"])
    document = read_toml(config_file) if config_file is not None else {}
    return settings_section(document.get("hub", {}), config_file, **overrides)


def read_toml(path: Path) -> dict[str, Any]:
    """The whole config file, parsed once."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def settings_section(table: Any, config_file: Path | None, **overrides: Any) -> Settings:
    """The ``[hub]`` section (``table``, as read from ``config_file``) under the environment and
    the command-line ``overrides``."""
    env = os.environ
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not isinstance(table, dict):
        raise ConfigError(f"{config_file}: key 'hub': must be a table")
    unknown = sorted(set(table) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(
            f"{config_file}: key 'hub.{unknown[0]}': unknown setting; known settings are "
            + ", ".join(documented_settings())
        )
    file_values = dict(table)
    values, origins = section_values("hub", file_values, str(config_file), env)
    from_section_env = {k for k, origin in origins.items() if origin.startswith("environment")}
    env_keys = {name for name in Settings.model_fields if (ENV_PREFIX + name).upper() in env}
    merged = {
        k: v
        for k, v in values.items()
        if k not in overrides and (k in from_section_env or k not in env_keys)
    }
    try:
        return Settings(**merged, **overrides)
    except ValidationError as exc:
        where = {**{k: f"environment variable {ENV_PREFIX}{k.upper()}" for k in env_keys},
                 **{k: origins[k] for k in from_section_env}}  # fmt: skip
        raise ConfigError(_explain(exc, config_file, file_values, where, overrides)) from None


def _explain(
    exc: ValidationError,
    config_file: Path | None,
    file_values: dict[str, Any],
    env_sources: dict[str, str],
    overrides: dict[str, Any],
) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = str(err["loc"][0]) if err["loc"] else "?"
        if key in overrides:
            where = f"option --{key.replace('_', '-')}"
        elif key in env_sources:
            where = env_sources[key]
        elif key in file_values:
            where = f"{config_file}: key 'hub.{key}'"
        else:
            where = f"setting {key!r}"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)
