"""``mes-hub serve``: ingest, the views and the API, until Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Annotated

import typer
from pydantic import SecretStr

from hub.bootstrap import build_hub
from hub.cli.shared import (
    ConfigOption,
    DataDirOption,
    NatsUrlOption,
    api_server,
    config_file_or_exit,
    console,
    run_until_signal,
    setup_logging,
)
from hub.nats_auth import write_private
from hub.settings import Settings, redacted_url

ADMIN_KEY_FILE = "admin-key"


def _api_keys_or_generated(settings: Settings) -> tuple[Settings, str | None]:
    """The configured API keys; without any, an admin key made on the first start and kept in
    the data dir (mode 0600), so scripts and bookmarks keep working across restarts."""
    if settings.parsed_api_keys():
        return settings, None
    path = settings.data_dir / ADMIN_KEY_FILE
    key = path.read_text().strip() if path.exists() else ""
    if len(key) < 16:
        key = secrets.token_urlsafe(24)
        write_private(path, key)
    return settings.model_copy(update={"api_keys": SecretStr(f"admin:{key}")}), key


def serve(
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="API address")] = None,
    port: Annotated[int | None, typer.Option(help="API port (0: any free port)")] = None,
) -> None:
    """Run ingest and the API until Ctrl-C."""
    loaded = config_file_or_exit(
        config, nats_url=nats_url, data_dir=data_dir, api_host=host, api_port=port
    )
    settings, plant = loaded.hub, loaded.plant
    setup_logging(logging.INFO)
    settings, generated = _api_keys_or_generated(settings)

    async def main(stop: asyncio.Event) -> None:
        hub = await build_hub(settings, plant=plant, erp=loaded.erp, webhooks=loaded.webhooks)
        try:  # the hub owns the embedded nats-server and the store: closed on every path
            api = api_server(hub, plant)
            try:
                api.start()
                console.print(f"mes-hub API on [bold]{api.url}[/] (docs: {api.url}/docs)")
                console.print(f"NATS: {redacted_url(hub.nats_url)}; store: {settings.store}")
                if generated:
                    # Printed once on the terminal, never logged: set MES_HUB_API_KEYS to keep.
                    console.print(
                        f"No API keys configured; the admin key (kept in "
                        f"{settings.data_dir / ADMIN_KEY_FILE}): [bold]{generated}[/]"
                    )
                await stop.wait()
            finally:
                await api.stop()
        finally:
            await hub.close()

    run_until_signal(main)
