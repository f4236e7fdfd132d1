"""``mes-hub projections``: rebuild, catch up and inspect the views (no NATS needed)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hub.cli.shared import (
    ConfigOption,
    DataDirOption,
    console,
    err_console,
    existing_store_or_exit,
    settings_or_exit,
)
from hub.settings import Settings
from hub.store import EventStore
from projections.views.database import ViewDatabase

app = typer.Typer(help="Views derived from the event store.", no_args_is_help=True)


@contextlib.contextmanager
def _store_and_views(
    config: Path | None, data_dir: Path | None
) -> Iterator[tuple[Settings, EventStore, ViewDatabase]]:
    """The event store and the views, for the projections commands (no NATS needed)."""
    from hub.bootstrap import open_views

    settings = settings_or_exit(config, data_dir=data_dir)
    existing_store_or_exit(settings)
    store = EventStore(settings)
    views = open_views(settings)
    try:
        yield settings, store, views
    finally:
        views.close()
        store.close()


@app.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="One view; none: every view")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Drop views and build them again from the first stored event."""
    from rich.progress import MofNCompleteColumn, Progress, TaskID, TimeRemainingColumn

    from hub.bootstrap import all_views, projection_workers
    from projections.views.runner import Progress as RebuildProgress

    known = [view.name for view in all_views()]
    if name is not None and name not in known:
        err_console.print(f"[red]unknown view {name!r}; views: {', '.join(known)}[/]")
        raise typer.Exit(2)
    with _store_and_views(config, data_dir) as (settings, store, views):
        columns = (
            *Progress.get_default_columns()[:-1],
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            chosen = [name] if name else None
            for worker in projection_workers(settings, store, views, chosen, rebuild=True):
                task = bar.add_task(worker.name, total=store.last_position())
                started = time.perf_counter()

                def advance(progress: RebuildProgress, task: TaskID = task) -> None:
                    bar.update(task, completed=progress.position, total=progress.last)

                read = worker.rebuild(advance)
                seconds = time.perf_counter() - started
                rate = read / seconds if seconds else 0.0
                bar.console.print(
                    f"{worker.name}: {read:,} events in {seconds:.1f} s "
                    f"({rate:,.0f} events/s), position {worker.position}"
                )


@app.command("catch-up")
def projections_catch_up(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Bring every view up to the end of the event store, from where each stopped."""
    from hub.bootstrap import projection_workers

    with _store_and_views(config, data_dir) as (settings, store, views):
        for worker in projection_workers(settings, store, views):
            worker.prepare()
            before = worker.position
            read = worker.catch_up()
            console.print(f"{worker.name}: {before} -> {worker.position} ({read:,} events)")


@app.command("status")
def projections_status(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """How far each view has read the event store."""
    from rich.markup import escape

    from hub.bootstrap import all_views
    from projections.rules.plant import PlantConfig
    from projections.rules.plant_history import PlantHistory
    from projections.views.runner import positions

    with _store_and_views(config, data_dir) as (settings, store, views):
        stored, read = store.last_position(), positions(views)
        table = Table("view", "position", "behind")
        for view in all_views():
            position = read.get(view.name, 0)
            table.add_row(view.name, str(position), str(stored - position))
        console.print(f"event store: {stored} events")
        console.print(table)
        recorded = store.plant(settings.site)
        plants = PlantHistory.of(recorded, PlantConfig())
        count = len(recorded.configurations) if recorded else 0
        console.print(
            f"plant configurations: {count} recorded, {len(plants.unreadable)} unreadable"
        )
        for skipped in plants.unreadable:
            line = f"#{skipped.number} ({skipped.recorded_at}): {skipped.reason}"
            console.print(f"  [yellow]{escape(line)}[/]")


@app.command("follow")
def projections_follow(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    settings_from_stdin: Annotated[
        bool,
        typer.Option(
            hidden=True, help="Settings JSON as the first line of input; stop when input ends"
        ),
    ] = False,
) -> None:
    """Keep every view up to date with the event store until stopped (Ctrl-C or SIGTERM).
    ``serve`` runs this in a process of its own; run it yourself to keep the views elsewhere."""
    import asyncio
    import logging

    from hub.bootstrap import follow_views
    from hub.children import read_settings_line, stop_when_input_ends
    from hub.cli.shared import config_or_exit, run_until_signal, setup_logging
    from hub.settings import settings_from_json

    if settings_from_stdin:  # started by a hub
        settings = config_or_exit(lambda: settings_from_json(read_settings_line()))
    else:
        settings = settings_or_exit(config, data_dir=data_dir)
        existing_store_or_exit(settings)
    setup_logging(logging.INFO)

    async def main(stop: asyncio.Event) -> None:
        if settings_from_stdin:
            stop_when_input_ends(stop)
        await follow_views(settings, stop)

    run_until_signal(main)
