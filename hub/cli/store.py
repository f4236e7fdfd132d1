"""``mes-hub store``: the event store itself (``new-key``: a key for encryption at rest,
docs/at-rest.md)."""

from __future__ import annotations

import typer

from hub.cli.shared import err_console

app = typer.Typer(help="The event store: encryption at rest.", no_args_is_help=True)

KEY_BYTES = 32  # AES-256


@app.command("new-key")
def store_new_key() -> None:
    """Print a fresh AES-256 key (base64) for ``store_encryption_key``. Only printed: keep it
    where the hub's secrets are kept; a store encrypted with it cannot be read without it."""
    from eventsourcing.cryptography import AESCipher

    # Plain on stdout, one line, so `mes-hub store new-key > key` is the key alone.
    typer.echo(AESCipher.create_key(KEY_BYTES))
    err_console.print(
        "set it as [bold]store_encryption_key[/] under \\[hub] (or MES_HUB_STORE_ENCRYPTION_KEY) "
        "before the store's first start; keep a copy: without it the store cannot be read"
    )
