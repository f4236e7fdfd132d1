"""What the command groups share: the common options, configuration loaded or the process ends
with exit code 2, logging, running until a signal, and the API server of a running hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from hub.api.app import create_app
from hub.bootstrap import Hub, api_context, api_reads
from hub.config import Config, load_config
from hub.server import ApiServer
from hub.settings import ConfigError, Settings, load_settings
from hub.store import StoreUnavailable, check_store
from projections.rules.plant import PlantConfig

if TYPE_CHECKING:  # the adapters are imported when an adapter command runs
    from adapters.machines.config import AdaptersConfig

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="mes-hub.toml (settings under \\[hub], …)")
]
NatsUrlOption = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server; none: start an embedded one")
]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Store and NATS data")]


# --- configuration, or exit ----------------------------------------------------------------------


def config_or_exit(load: Callable[[], T]) -> T:
    """What ``load`` returns; if it refuses the configuration (``ConfigError``, which every
    section's error is), the error on stderr and exit code 2."""
    try:
        return load()
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def config_file_or_exit(
    config: Path | None, *, adapters: bool = False, **overrides: object
) -> Config:
    """Every section of the config file, read once (``hub.config.load_config``): ``[hub]``
    under the command's ``overrides`` (None: not given), ``[plant]``, and ``[adapters]`` if
    ``adapters``."""
    return config_or_exit(lambda: load_config(config, adapters=adapters, hub_overrides=overrides))


def settings_or_exit(config: Path | None, **overrides: object) -> Settings:
    """``[hub]``; ``overrides``: the command's options (None: not given)."""
    return config_or_exit(lambda: load_settings(config, **overrides))


def adapters_or_exit(config: Path | None) -> AdaptersConfig:
    """``[adapters]``: the config file is required, the machines are in it."""
    from adapters.machines.config import load_adapters

    path = config_file_required(config)
    return config_or_exit(lambda: load_adapters(path))


def config_file_required(config: Path | None) -> Path:
    """``config``; without one, the error on stderr and exit code 2 (the machines are in it)."""
    if config is None:
        err_console.print("[red]--config FILE is required: the machines are in its \\[adapters][/]")
        raise typer.Exit(2)
    return config


# --- running -------------------------------------------------------------------------------------


def setup_logging(level: int, file: Path | None = None) -> None:
    handlers: list[logging.Handler] = []
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # Libraries' own chatter: one line per HTTP request (httpx), and a traceback each time an
    # OPC UA server goes away (asyncua), which the adapters already report in one line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    for handler in handlers:
        handler.addFilter(_store_unavailable_in_one_line)


def _store_unavailable_in_one_line(record: logging.LogRecord) -> bool:
    """A failure logged with its traceback because the store's PostgreSQL went away (a service
    that retries says so at each attempt): its message and why, in one line, no traceback."""
    failure = record.exc_info[1] if record.exc_info else None
    if isinstance(failure, StoreUnavailable):
        record.msg, record.args = f"{record.getMessage()}: {failure}", None
        record.exc_info, record.exc_text = None, None
    return True


def store_unavailable_exit(failure: StoreUnavailable) -> typer.Exit:
    """Say on stderr, in one line, why the store cannot be used; the exit (code 1) to raise."""
    err_console.print(f"[bold red]error:[/] {escape(str(failure))}", soft_wrap=True)
    return typer.Exit(1)


def existing_store_or_exit(settings: Settings) -> None:
    """A command that reads a hub's store must not make an empty one where a misspelled
    ``--data-dir`` points: it says so, naming the path, and exits with code 2. A PostgreSQL
    store must answer: else why not, in one line, and exit code 1."""
    if settings.store == "sqlite" and not settings.sqlite_path.exists():
        err_console.print(
            f"[red]no event store at {settings.sqlite_path}: is --data-dir (or data_dir) the "
            "hub's?[/]"
        )
        raise typer.Exit(2)
    try:
        check_store(settings)
    except StoreUnavailable as failure:
        raise store_unavailable_exit(failure) from None


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` with an event that Ctrl-C or SIGTERM sets (for a clean shutdown). If the
    store's PostgreSQL does not answer, why in one line on stderr and exit code 1; if a setting
    found only when the hub starts is refused (a wrong store encryption key, an audit key file
    open to others), the file, key and reason on stderr and exit code 2, as for any setting."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        config_or_exit(lambda: asyncio.run(runner()))
    except StoreUnavailable as failure:
        raise store_unavailable_exit(failure) from None


def api_server(hub: Hub, plant: PlantConfig | None = None) -> ApiServer:
    """The API of a running hub (``serve`` and ``demo``), on its settings' address; if it cannot
    listen there, the error on stderr and exit code 1 (the caller closes the hub)."""
    settings = hub.settings
    reads = api_reads(settings)
    app = create_app(api_context(hub, plant, reads))
    try:
        return ApiServer(app, settings.api_host, settings.api_port, reads)
    except OSError as exc:  # e.g. the port is taken: one line, exit code 1
        err_console.print(
            f"[bold red]cannot serve the API on {settings.api_host}:{settings.api_port}:[/] "
            f"{exc.strerror or exc}"
        )
        raise typer.Exit(1) from None
