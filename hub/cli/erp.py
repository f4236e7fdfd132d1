"""``mes-hub erp``: the ERPs of ``[[erp]]`` — ``check`` each once, and ``reconcile`` what they
were told with what the store says now."""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hub.cli.shared import (
    ConfigOption,
    DataDirOption,
    config_file_or_exit,
    console,
    err_console,
    existing_store_or_exit,
)

app = typer.Typer(help="The ERPs: orders in, production confirmations out.", no_args_is_help=True)
SHOWN = 5  # orders listed per ERP by check


@app.command("check")
def erp_check(config: ConfigOption = None) -> None:
    """Ask each ERP once for its orders (nothing is published or kept) and say what it has and
    whether it takes confirmations; exit code 1 if one cannot be read."""
    from adapters.erp.config import confirmation_sender, order_source

    loaded = config_file_or_exit(config)
    if not loaded.erp:
        err_console.print("[red]no \\[\\[erp]] entries in the config file[/]")
        raise typer.Exit(2)
    failures = 0
    for entry in loaded.erp:
        dialect = getattr(entry, "dialect", "?")
        where = f"{entry.name} ({dialect}, {entry.url})"
        with tempfile.TemporaryDirectory(prefix="mes-hub-erp-check-") as scratch:
            source = order_source(entry, Path(scratch))
            if source is None:
                console.print(f"{escape(where)}: sends no orders (poll_interval_s = 0)")
            else:
                try:
                    events, _ = asyncio.run(asyncio.wait_for(source.changes(None), 60))
                except Exception as exc:  # one line: the dialects say why, never a secret
                    failures += 1
                    said = f"✗ {where}: {type(exc).__name__}: {exc}"
                    err_console.print(f"[red]{escape(said)}[/]", soft_wrap=True)
                    continue
                orders = sorted({e.subject for e in events})
                shown = ", ".join(orders[:SHOWN]) + (" …" if len(orders) > SHOWN else "")
                console.print(
                    f"✓ {escape(where)}: {len(orders)} orders it would send"
                    + (f": {escape(shown)}" if orders else "")
                )
        confirms = confirmation_sender(entry) is not None
        console.print(
            f"  confirmations: {'sent to it' if confirms else 'not sent (confirm = false)'}"
        )
    if failures:
        raise typer.Exit(1)


@app.command("reconcile")
def erp_reconcile(
    order: Annotated[str | None, typer.Option(help="One order; none: every confirmed one")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Per order and ERP: the good parts and scrap the ERP was told (confirmations it took)
    against what the store says now; exit code 1 if one differs."""
    from hub.bootstrap import CONFIRMATIONS_SINCE, open_views
    from hub.domain import Order
    from hub.store import EventStore
    from projections.processes.confirmations import totals
    from projections.processes.forecast_watch import order_runs
    from projections.views.facts_view import FactsReader
    from projections.views.outbox_view import CONFIRMATION, OutboxReader

    loaded = config_file_or_exit(config, data_dir=data_dir)
    settings, plant = loaded.hub, loaded.plant
    existing_store_or_exit(settings)
    since_file = settings.data_dir / CONFIRMATIONS_SINCE
    if not since_file.exists():
        console.print("No confirmation was ever decided here.")
        return
    since = datetime.fromisoformat(since_file.read_text().strip())
    store = EventStore(settings, read_only=True)
    views = open_views(settings)
    try:
        outbox, facts = OutboxReader(views), FactsReader(views)
        told: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        pending: dict[str, int] = defaultdict(int)
        after = ""
        while batch := outbox.messages(
            settings.site, order, limit=500, after=after, kind=CONFIRMATION
        ):
            for message, states in batch:
                after = message.key
                if message.kind != CONFIRMATION:
                    continue
                for destination, state in states.items():
                    if state.outcome in ("delivered", "duplicate"):
                        figures = told[(message.ordering_key, destination)]
                        figures[0] += int(message.payload["yield_quantity"])
                        figures[1] += int(message.payload["scrap_quantity"])
                    else:
                        pending[message.ordering_key] += 1
        table = Table(title="What the ERPs were told, against the store now")
        for column in ("order", "ERP", "told good", "told scrap", "store good", "store scrap",
                       "difference"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("order", "ERP") else "right")
        differing = 0
        now = datetime.now(UTC)
        for order_id, destination in sorted(told):
            found = store.order(settings.site, order_id)
            if not isinstance(found, Order):
                continue
            ended = [r for r in order_runs(found) if r.end is not None and r.end >= since]
            good, scrap = totals(found, ended, facts, plant, now) if ended else (0, 0)
            good_told, scrap_told = told[(order_id, destination)]
            gap = (good - good_told, scrap - scrap_told)
            differing += gap != (0, 0)
            waiting = f" ({pending[order_id]} waiting)" if pending.get(order_id) else ""
            said = "none" if gap == (0, 0) else f"good {gap[0]:+d}, scrap {gap[1]:+d}{waiting}"
            table.add_row(order_id, destination, str(good_told), str(scrap_told), str(good),
                          str(scrap), said)  # fmt: skip
        console.print(table)
        if differing:
            console.print(f"{differing} differ: a correction is decided within moments by a "
                          "running hub, or is waiting to be delivered")  # fmt: skip
            raise typer.Exit(1)
    finally:
        views.close()
        store.close()
