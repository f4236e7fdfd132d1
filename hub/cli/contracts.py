"""``mes-hub contracts``: the wire contracts, for integrators."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hub.cli.shared import console

app = typer.Typer(help="Wire contracts for integrators.", no_args_is_help=True)


@app.command("export")
def contracts_export(
    directory: Annotated[Path, typer.Argument(help="Where to write the schema files")],
) -> None:
    """Write one JSON Schema per v1 event type."""
    from contracts import export_json_schemas

    for path in export_json_schemas(directory):
        console.print(str(path))
