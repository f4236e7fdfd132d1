"""``mes-hub replay`` and ``mes-hub import`` (docs/replay.md): the event history out as
CloudEvents JSON Lines, and a fresh hub built from such an export.

``replay`` reads the store only (no NATS): the stored events between two positions or two
recorded times, back into the CloudEvents the hub received (``hub.exporting``). ``import``
starts a hub of its own in an empty data dir — embedded NATS and ingest, nothing that would add
events of its own (no forecast, confirmation or partner watch, no outbox sender, no ERP poller)
— publishes every exported CloudEvent through the hub's own publisher, so its own events and
the actors keep their signature, waits until ingest has stored them all, then brings the views
up to date and says what it counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress, TaskID, TimeRemainingColumn

from hub.cli.shared import (
    ConfigOption,
    DataDirOption,
    config_or_exit,
    console,
    err_console,
    existing_store_or_exit,
    settings_or_exit,
    store_unavailable_exit,
)
from hub.exporting import (
    ExportError,
    ExportStats,
    Selection,
    ToImport,
    events_to_import,
    export_line,
    exported_events,
)
from hub.settings import Settings
from hub.store import EventStore, StoreUnavailable

if TYPE_CHECKING:
    from hub.bootstrap import Hub

PUBLISH_BATCH = 500
# An import gives up when ingest has stored nothing new for this long (it keeps retrying what
# fails; something is wrong, and the user should hear of it rather than wait for ever).
STALL_S = 120.0

FromOption = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="First log position (an integer), or recorded time (RFC 3339 with its offset); "
        "included. Default: the first event",
    ),
]
ToOption = Annotated[
    str | None,
    typer.Option(
        "--to",
        help="Last log position (an integer, included), or recorded time (RFC 3339, excluded). "
        "Default: the last event stored when the export begins",
    ),
]


def _progress() -> Progress:
    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err_console)


def bound(text: str | None, option: str) -> int | datetime | None:
    """``--from``/``--to``: a log position (an integer), or a recorded time (RFC 3339 with its
    offset); else the error on stderr and exit code 2."""
    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        err_console.print(
            f"[red]{option} {escape(text)!r}: a log position (an integer) or a recorded time in "
            "RFC 3339 with its offset, e.g. 2026-03-02T06:00:00Z[/]"
        )
        raise typer.Exit(2)
    return moment


def selection(start: int | datetime | None, end: int | datetime | None) -> Selection:
    return Selection(
        first=start if isinstance(start, int) else 1,
        last=end if isinstance(end, int) else None,
        since=start if isinstance(start, datetime) else None,
        until=end if isinstance(end, datetime) else None,
    )


# --- replay ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _written_whole(out: Path) -> Iterator[BinaryIO]:
    """A file written beside ``out`` and renamed to it when complete: a failed export leaves
    no truncated file that looks like a whole one. ``-``: standard output."""
    if str(out) == "-":
        with os.fdopen(os.dup(1), "wb") as stdout:
            yield stdout
        return
    partial = out.with_name(f".{out.name}.partial")
    try:
        # 0600: the history in plain CloudEvents, even from an encrypted store.
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def replay(
    out: Annotated[
        Path, typer.Option("--out", help="The CloudEvents JSON Lines file to write ('-': stdout)")
    ],
    start: FromOption = None,
    end: ToOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Write the event history as CloudEvents JSON Lines, in log order.

    Each line is a CloudEvent as the hub received it, with its log position, recorded time,
    site and actor as extension attributes (docs/replay.md)."""
    chosen = selection(bound(start, "--from"), bound(end, "--to"))
    settings = settings_or_exit(config, data_dir=data_dir)
    existing_store_or_exit(settings)
    store = config_or_exit(lambda: EventStore(settings, read_only=True))
    stats = ExportStats()
    try:
        with _written_whole(out) as file, _progress() as bar:
            task = bar.add_task("replay", total=None)
            first = max(chosen.first, 1)

            def advance(done: ExportStats) -> None:
                total = max(done.last - first + 1, 0)
                bar.update(task, completed=min(done.position - first + 1, total), total=total)

            for event in exported_events(store, chosen, stats, on_batch=advance):
                file.write(export_line(event))
            advance(ExportStats(position=stats.last, last=stats.last))
    except ExportError as failure:
        err_console.print(f"[bold red]error:[/] {escape(str(failure))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except StoreUnavailable as failure:
        raise store_unavailable_exit(failure) from None
    finally:
        store.close()
    where = "standard output" if str(out) == "-" else str(out)
    err_console.print(
        f"{stats.exported:,} CloudEvents written to {escape(where)} (log positions "
        f"{chosen.first} to {stats.last}; sites: {', '.join(sorted(stats.sites)) or 'none'}); "
        f"{stats.not_cloud_events:,} stored events are none of their own (an aggregate's "
        f"creation, the order's half of an operator's start or end)"
        + (f", {stats.outside:,} recorded outside the times asked" if stats.outside else "")
    )


# --- import ---------------------------------------------------------------------------------


@dataclass
class ImportReport:
    published: int = 0  # CloudEvents published
    applied: int = 0  # stored by ingest
    duplicates: int = 0  # dropped as repeats
    rejected: int = 0  # dead-lettered
    stored_position: int = 0  # the new store's last position
    views: dict[str, int] | None = None  # each view's position


Advance = Callable[[str, int, int | None], None]  # (stage, done, total)


def refuse_a_used_target(settings: Settings) -> str | None:
    """Why the data dir (or schema) cannot take an import; None if it can. An import builds a
    fresh hub: into a store with events of its own the two histories would mix."""
    if settings.nats_data_dir.exists() and any(settings.nats_data_dir.iterdir()):
        return (
            f"{settings.nats_data_dir} holds a NATS stream (a hub ran here): import into an "
            "empty --data-dir"
        )
    store = EventStore(settings)
    try:
        held = store.last_position()
    finally:
        store.close()
    if held:
        return (
            f"the event store of this data dir holds events already (log position {held}): "
            "import builds a fresh hub; give an empty --data-dir (or postgres_schema)"
        )
    return None


async def import_events(
    settings: Settings, items: Iterator[ToImport], advance: Advance, total: int | None = None
) -> ImportReport:
    """Publish ``items`` into a hub of their own at ``settings`` (empty: see
    ``refuse_a_used_target``), wait until ingest has stored them and bring the views up to
    date. ``settings`` must name no NATS of its own (the hub starts an embedded one)."""
    from hub.bootstrap import build_hub

    assert settings.nats_url is None, "an import publishes into a NATS of its own"
    hub = await build_hub(settings, ingest=True, projections=False)
    report = ImportReport()
    try:
        report.published = await _publish(hub, items, advance, total)
        await _ingested(hub, advance)
        stats = hub.ingest_stats()
        report.applied, report.duplicates = stats.applied, stats.duplicates
        report.rejected = stats.rejected
        report.stored_position = await asyncio.to_thread(hub.store.last_position)
        report.views = await asyncio.to_thread(_views_caught_up, hub, advance)
    finally:
        await hub.close()
    return report


async def _publish(hub: Hub, items: Iterator[ToImport], advance: Advance, total: int | None) -> int:
    """Publish in file order through the hub's own publisher (one per site: the site is in the
    subject), a batch at a time."""
    from hub.nats import NatsPublisher
    from hub.nats_auth import signing_key

    key = await asyncio.to_thread(signing_key, hub.settings.data_dir)
    publishers: dict[str, NatsPublisher] = {}
    published = 0
    batch: list[ToImport] = []

    async def flush() -> None:
        nonlocal published
        if not batch:
            return
        site = batch[0].site or hub.settings.site
        publisher = publishers.get(site)
        if publisher is None:
            publisher = publishers[site] = NatsPublisher(hub.jetstream, site, signing_key=key)
        await publisher.publish_many([item.event for item in batch])
        published += len(batch)
        batch.clear()
        advance("publish", published, total)

    for item in items:
        if batch and (len(batch) >= PUBLISH_BATCH or item.site != batch[0].site):
            await flush()
        batch.append(item)
    await flush()
    return published


async def _ingested(hub: Hub, advance: Advance) -> None:
    """Wait until every ingest partition has stored its position at the stream's end."""
    from hub.nats import STREAM

    loop = asyncio.get_running_loop()
    end = (await hub.jetstream.stream_info(STREAM)).state.last_seq
    last_move, reached = loop.time(), -1
    while True:
        lowest = min(p.ingestor.stats.position for p in hub.partitions)
        advance("ingest", min(lowest, end), end)
        if lowest >= end:
            return
        if lowest != reached:
            last_move, reached = loop.time(), lowest
        elif loop.time() - last_move > STALL_S:
            raise TimeoutError(
                f"ingest stored nothing for {STALL_S:.0f} s, at stream position {lowest} of "
                f"{end}: see the log above"
            )
        await asyncio.sleep(0.1)


def _views_caught_up(hub: Hub, advance: Advance) -> dict[str, int]:
    """Every view read up to the end of the store (in this process: the hub runs no views)."""
    from hub.bootstrap import projection_workers, view_positions

    for worker in projection_workers(hub.settings, hub.store, hub.views):
        worker.prepare()
        worker.catch_up(lambda p: advance("views", p.position, p.last))
    return view_positions(hub.views)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield from file


def import_(
    file: Annotated[Path, typer.Argument(help="A CloudEvents JSON Lines export (mes-hub replay)")],
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="The new hub's data dir (empty, or not there yet)")
    ],
    config: ConfigOption = None,
) -> None:
    """Build a fresh hub in DIR from an export of mes-hub replay.

    Its store, views and OEE are the original's; its log positions and recorded times are its
    own (docs/replay.md)."""
    if not file.is_file():
        err_console.print(f"[red]no export at {escape(str(file))}[/]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, data_dir=data_dir)
    # Its own embedded NATS, always: an import must not publish into a stream another hub reads.
    settings = settings.model_copy(update={"nats_url": None})
    try:
        why_not = config_or_exit(lambda: refuse_a_used_target(settings))
    except StoreUnavailable as failure:
        raise store_unavailable_exit(failure) from None
    if why_not is not None:
        err_console.print(f"[red]{escape(why_not)}[/]")
        raise typer.Exit(2)
    try:  # (counted first, for the progress bar; and a bad line is found before any publish)
        total = sum(1 for _ in events_to_import(_lines(file)))
    except ExportError as failure:
        err_console.print(f"[bold red]error:[/] {escape(str(failure))}", soft_wrap=True)
        raise typer.Exit(2) from None
    with _progress() as bar:
        tasks: dict[str, TaskID] = {}

        def advance(stage: str, done: int, of: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=of)
            bar.update(tasks[stage], completed=done, total=of)

        try:
            report = asyncio.run(
                import_events(settings, events_to_import(_lines(file)), advance, total)
            )
        except StoreUnavailable as failure:
            raise store_unavailable_exit(failure) from None
    views = ", ".join(f"{k} {v}" for k, v in sorted((report.views or {}).items()))
    console.print(
        f"imported {report.published:,} CloudEvents into {escape(str(settings.data_dir))}: "
        f"{report.applied:,} stored, {report.duplicates:,} repeats dropped, "
        f"{report.rejected:,} refused; store at log position {report.stored_position:,}; "
        f"views at {views}"
    )
    if report.rejected:
        err_console.print(
            f"[red]{report.rejected:,} events were refused by ingest: they are in the dead-letter "
            "stream (mes.dlq.>) of the new hub's NATS, with the reason[/]"
        )
        raise typer.Exit(1)
