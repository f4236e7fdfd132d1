"""The ``mes-hub`` command line (Typer + Rich), one module per command group:

- ``serve``: ingest, the views and the API, until Ctrl-C;
- ``demo``: the whole hub embedded with a simulated factory, shown live;
- ``adapter``: ``adapter run`` and ``adapter check``, the machine adapters and the simulator;
- ``projections``: ``rebuild``, ``catch-up`` and ``status`` of the views;
- ``contracts``: ``export`` of the JSON Schemas;
- ``nats``: ``credentials`` of an identity for an adapter host (``hub.nats_auth``);
- ``dnc``: ``send`` a program to an RS-232 machine by drip feed and record it (``program_sent``),
  ``flush`` the records that wait;
- ``erp``: ``check`` each ERP of ``[[erp]]`` once, ``reconcile`` what they were told;
- ``replay``: ``replay`` (the history out as CloudEvents) and ``import`` (a fresh hub from it);
- ``store``: ``new-key`` for encryption at rest;
- ``shared``: what they share — the common options (``--config``, ``--data-dir``,
  ``--nats-url``), configuration loaded or exit code 2 (``config_file_or_exit``: every section
  read once; ``settings_or_exit``, ``adapters_or_exit``; all through ``config_or_exit``),
  logging, ``run_until_signal`` and the API server of a running hub.

Adding a command group (``erp``, ``webhooks``, ``audit``, …): write ``hub/cli/<group>.py`` with
its own ``app = typer.Typer(help="…", no_args_is_help=True)`` and its commands
(``@app.command("name")``), taking the shared options and reading configuration through
``shared``; then register it below with one ``app.add_typer(<group>.app, name="<group>")``. A
single command, as ``serve`` and ``demo`` are, is a plain function registered with
``app.command("name")(…)``. Importing a group does no work: whatever is heavy or optional
(adapters, protocol clients) is imported inside the commands that need it.

``app`` and ``main`` are the whole public surface: the ``mes-hub`` console script and
``python -m hub`` call ``main``.
"""

from __future__ import annotations

import typer

from hub.cli import (
    adapter,
    audit,
    contracts,
    demo,
    dnc,
    erp,
    nats,
    projections,
    replay,
    serve,
    store,
)

app = typer.Typer(
    help="mes-hub: event-sourced IT-OT integration hub.", no_args_is_help=True, add_completion=False
)
app.command("serve")(serve.serve)
app.command("demo")(demo.demo)
app.add_typer(contracts.app, name="contracts")
app.add_typer(adapter.app, name="adapter")
app.add_typer(dnc.app, name="dnc")
app.add_typer(projections.app, name="projections")
app.add_typer(nats.app, name="nats")
app.add_typer(erp.app, name="erp")
app.add_typer(audit.app, name="audit")
app.command("replay")(replay.replay)
app.command("import")(replay.import_)
app.add_typer(store.app, name="store")

__all__ = ["app", "main"]


def main() -> None:
    app()
