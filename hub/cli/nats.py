"""``mes-hub nats``: the NATS identities of the hub (docs/nats.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hub.cli.shared import ConfigOption, DataDirOption, console, err_console, settings_or_exit

app = typer.Typer(help="The hub's NATS identities.", no_args_is_help=True)


@app.command("credentials")
def nats_credentials(
    identity: Annotated[
        str, typer.Option(help="machines (machine adapters), erp (ERP adapters) or reader")
    ] = "machines",
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print one identity's credentials file for an adapter host (JSON: url, user, password).
    Keep it like a password: give it to the adapter with nats_credentials (or
    MES_HUB_NATS_CREDENTIALS), readable by the adapter's user only."""
    from hub.nats_auth import CREDENTIALS_FILE, IDENTITIES, NATS_URL_FILE, nats_identities

    offered = [i for i in IDENTITIES if i not in ("hub", "api")]  # those stay with the hub
    if identity not in offered:
        err_console.print(f"[red]unknown identity {identity!r}; one of {', '.join(offered)}[/]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, data_dir=data_dir)
    if settings.nats_url is None and not (settings.data_dir / CREDENTIALS_FILE).exists():
        err_console.print(
            f"[red]no NATS identities in {settings.data_dir}: is --data-dir the hub's (and has "
            "it started once)?[/]"
        )
        raise typer.Exit(2)
    credentials = nats_identities(settings)
    if credentials is None:
        err_console.print(
            "[red]this hub's NATS has no identities: set nats_identities (docs/nats.md)[/]"
        )
        raise typer.Exit(2)
    url_file = settings.data_dir / NATS_URL_FILE
    url = settings.nats_url or (url_file.read_text().strip() if url_file.exists() else "")
    document = credentials[identity].document(url or "nats://<hub host>:4222", settings.site)
    console.print_json(json.dumps(document))


@app.command("server-config")
def nats_server_config(
    identities_file: Annotated[
        Path,
        typer.Option(
            "--identities",
            help="The identities' passwords (JSON); made, mode 0600, if it does not exist",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(help="Write the block there (mode 0600: it holds every password)"),
    ] = None,
    site: Annotated[str, typer.Option(help="The site whose subjects adapters may publish")] = (
        "default"
    ),
) -> None:
    """Print the authorization block of an external nats-server for the hub's identities (the
    hub is given the same file as nats_identities): one source for both sides."""
    from hub.cli.shared import config_or_exit
    from hub.nats_auth import identities, new_credentials, server_config, write_private

    if not identities_file.exists():
        made = new_credentials()
        write_private(identities_file, json.dumps({i: c.password for i, c in made.items()}))
        err_console.print(f"made {identities_file} (mode 0600): give it to the hub too")
    credentials = config_or_exit(lambda: identities(identities_file))
    block = server_config(credentials, site)
    if output is None:
        print(block, end="")
    else:
        write_private(output, block)
        err_console.print(f"wrote {output} (mode 0600): nats-server --config {output}")
