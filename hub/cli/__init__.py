"""The ``mes-hub`` command line (Typer + Rich)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.live import Live
from rich.table import Table

from hub.api.app import create_app
from hub.api.deps import ApiContext
from hub.bootstrap import Hub, build_hub
from hub.server import ApiServer
from hub.settings import ConfigError, Settings, load_settings, redacted_url
from hub.store import EventStore
from projections.config import PlantConfigError, load_plant
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.views.database import ViewDatabase
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader

if TYPE_CHECKING:  # the adapters are imported when an adapter command runs
    from adapters.machines.config import AdaptersConfig
from projections.rules.report import facts_window, report_from_facts

log = logging.getLogger(__name__)
app = typer.Typer(
    help="mes-hub: event-sourced IT-OT integration hub.", no_args_is_help=True, add_completion=False
)
contracts_app = typer.Typer(help="Wire contracts for integrators.", no_args_is_help=True)
adapter_app = typer.Typer(help="Machine and ERP adapters.", no_args_is_help=True)
app.add_typer(contracts_app, name="contracts")
app.add_typer(adapter_app, name="adapter")
projections_app = typer.Typer(help="Views derived from the event store.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="mes-hub.toml (settings under [hub])")
]
NatsUrlOption = Annotated[
    str | None, typer.Option("--nats-url", help="NATS server; none: start an embedded one")
]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Store and NATS data")]


def _settings(config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


def _logging(level: int, file: Path | None = None) -> None:
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


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` with an event that Ctrl-C or SIGTERM sets (for a clean shutdown)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def _api_keys_or_generated(settings: Settings) -> tuple[Settings, str | None]:
    if settings.parsed_api_keys():
        return settings, None
    key = secrets.token_urlsafe(24)
    return settings.model_copy(update={"api_keys": SecretStr(f"admin:{key}")}), key


@app.command()
def serve(
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="API address")] = None,
    port: Annotated[int | None, typer.Option(help="API port (0: any free port)")] = None,
) -> None:
    """Run ingest and the API until Ctrl-C."""
    settings = _settings(config, nats_url=nats_url, data_dir=data_dir, api_host=host, api_port=port)
    plant = _plant(config)
    _logging(logging.INFO)
    settings, generated = _api_keys_or_generated(settings)

    async def main(stop: asyncio.Event) -> None:
        hub = await build_hub(settings, plant=plant)
        api = _api(hub, settings, plant)
        api.start()
        console.print(f"mes-hub API on [bold]{api.url}[/] (docs: {api.url}/docs)")
        console.print(f"NATS: {redacted_url(hub.nats_url)}; store: {settings.store}")
        if generated:
            # Printed once on the terminal, never logged: set MES_HUB_API_KEYS to keep keys.
            console.print(f"No API keys configured; this run's admin key: [bold]{generated}[/]")
        await stop.wait()
        await api.stop()
        await hub.close()

    _run(main)


def _plant(config: Path | None) -> PlantConfig:
    try:
        return load_plant(config)
    except PlantConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


def _api(hub: Hub, settings: Settings, plant: PlantConfig | None = None) -> ApiServer:
    context = ApiContext(
        store=hub.store,
        facts=FactsReader(hub.views),
        orders=OrdersReader(hub.views),
        publisher=hub.publisher,
        api_keys=settings.parsed_api_keys(),
        site=settings.site,
        plant=plant or PlantConfig(),
        max_clock_skew_s=settings.max_clock_skew_s,
    )
    return ApiServer(create_app(context), settings.api_host, settings.api_port)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _machine_table(
    hub: Hub, elapsed: float, published: int, since: datetime, until: datetime | None
) -> Table:
    """The demo's live view; OEE covers the simulated time so far (default calendar)."""
    stats = hub.ingest_stats()
    plant = PlantConfig()
    window = Interval(since, until) if until and until > since else None
    shifts = plant.calendar().shifts(Interval(until, until + timedelta(seconds=1))) if until else []
    table = Table(
        title=f"mes-hub demo — {elapsed:4.0f} s — simulated {until or since:%Y-%m-%d %H:%M} UTC, "
        f"shift {shifts[0].name if shifts else '-'} — published {published}, "
        f"stored {stats.applied}, duplicates {stats.duplicates}, dead-lettered {stats.rejected}",
        expand=False,
    )
    # On a narrow terminal the figures matter more than order ids and alarm texts.
    wide = console.width >= 110
    for column, width in (("machine", 7), ("avail.", 6), ("execution", 11)):
        table.add_column(column, no_wrap=True, min_width=width)
    if wide:
        table.add_column("order", no_wrap=True, overflow="ellipsis", max_width=26)
    for column in ("parts", "bad", "A", "P", "Q", "OEE"):
        table.add_column(column, no_wrap=True, justify="right", min_width=4)
    if wide:
        table.add_column("alarm", overflow="ellipsis", no_wrap=True, max_width=20)
    for machine in hub.store.machines(hub.settings.site):
        colour = {"ACTIVE": "green", "STOPPED": "red", "INTERRUPTED": "yellow"}.get(
            machine.execution or "", "white"
        )
        alarm = next(iter(machine.conditions.values()), None)
        figures = None
        if window is not None:
            facts = FactsReader(hub.views).window(machine.id, facts_window(window, plant))
            facts = facts.settle(plant.machine_rules(machine.machine_id))
            (bucket,) = report_from_facts(
                facts,
                partial(OrdersReader(hub.views).ideal_cycle_times, machine.site),
                window,
                None,
                plant,
                until or since,
            )
            figures = bucket.figures
        row = [
            machine.machine_id,
            (machine.availability or "-")[:5],
            f"[{colour}]{machine.execution or '-'}[/]",
            *([FactsReader(hub.views).current_order(machine.id) or "-"] if wide else []),
            str(figures.produced) if figures else "-",
            str(figures.bad) if figures else "-",
            _percent(figures.availability if figures else None),
            _percent(figures.performance if figures else None),
            _percent(figures.quality if figures else None),
            f"[bold]{_percent(figures.oee if figures else None)}[/]",
            *([alarm["message"] if alarm else ""] if wide else []),
        ]
        table.add_row(*row)
    return table


@app.command()
def demo(
    machines: Annotated[int, typer.Option(min=1, max=5000, help="Simulated machines")] = 10,
    speed: Annotated[float, typer.Option(min=0, help="Simulated seconds per second")] = 60.0,
    duration: Annotated[float, typer.Option(min=0, help="Wall seconds; 0: until Ctrl-C")] = 60.0,
    seed: Annotated[int, typer.Option(help="Simulator seed")] = 1,
    data_dir: DataDirOption = None,
    port: Annotated[int, typer.Option(help="API port (0: any free port)")] = 0,
) -> None:
    """Run the whole hub embedded with a simulated factory and show it live."""
    from adapters.machines.simulator import (
        SimulatorConfig,
        SimulatorRun,
        past_start,
        run_simulator,
    )

    directory = data_dir or Path(tempfile.mkdtemp(prefix="mes-hub-demo-"))
    key = secrets.token_urlsafe(24)
    settings = _settings(
        None, data_dir=directory, api_port=port, api_keys=f"admin:{key}", nats_url=""
    )
    _logging(logging.INFO, directory / "hub.log")

    async def main(stop: asyncio.Event) -> None:
        hub = await build_hub(settings)
        api = _api(hub, settings)
        api.start()
        console.print(f"[bold]mes-hub demo[/]: {machines} simulated machines at {speed:g}x")
        console.print(f"API: {api.url}/api/v1/machines   docs: {api.url}/docs")
        console.print(f"admin key (this run only): [bold]{key}[/]")
        console.print(f"try: curl -H 'Authorization: Bearer {key}' {api.url}/api/v1/machines")
        console.print(f"data and log: {directory}\n")
        progress = SimulatorRun()
        simulation = SimulatorConfig(
            machines=machines,
            seed=seed,
            site=settings.site,
            start=past_start(speed, duration or None),  # ends about now: no event from the future
        )
        simulator = asyncio.create_task(
            run_simulator(
                simulation,
                hub.publisher,
                speed=speed,
                duration_s=duration or None,
                progress=progress,
            )
        )
        started = time.monotonic()

        async def table() -> Table:
            return await asyncio.to_thread(
                _machine_table,
                hub,
                time.monotonic() - started,
                progress.published,
                simulation.start,
                progress.simulated_until,
            )

        with Live(console=console, refresh_per_second=2) as live:
            while not stop.is_set() and not simulator.done():
                live.update(await table())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            simulator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulator
            # No forecast round may publish after the last wait, or the summary would not add up.
            await hub.stop_forecast_watch()
            with contextlib.suppress(asyncio.TimeoutError):
                await hub.wait_caught_up(timeout=30)
            live.update(await table())
        stats = hub.ingest_stats()
        await api.stop()
        await hub.close()
        console.print(
            f"\n[bold]Summary[/]: {progress.published} events published, {stats.applied} stored "
            f"exactly once (with {hub.forecast_watch.published} delivery forecast changes the hub "
            f"published), {stats.duplicates} duplicates dropped, {stats.rejected} dead-lettered; "
            f"simulated until {progress.simulated_until:%Y-%m-%d %H:%M:%S} UTC. "
            f"Data kept in {directory}."
        )

    _run(main)


@contracts_app.command("export")
def contracts_export(
    directory: Annotated[Path, typer.Argument(help="Where to write the schema files")],
) -> None:
    """Write one JSON Schema per v1 event type."""
    from contracts import export_json_schemas

    for path in export_json_schemas(directory):
        console.print(str(path))


PROTOCOL_HELP = "mtconnect, shdr, opcua, modbus (entries of the config file) or simulator"


def _adapters_config(config: Path | None) -> AdaptersConfig:
    from adapters.machines.config import AdapterConfigError, load_adapters

    if config is None:
        err_console.print("[red]--config FILE is required: the machines are in its [adapters][/]")
        raise typer.Exit(2)
    try:
        return load_adapters(config)
    except AdapterConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


@adapter_app.command("run")
def adapter_run(
    protocol: Annotated[str, typer.Argument(help=PROTOCOL_HELP)],
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    machines: Annotated[int, typer.Option(min=1, help="simulator: machines")] = 10,
    speed: Annotated[float, typer.Option(min=0, help="simulator: speed, 0 = flat out")] = 60.0,
    duration: Annotated[float, typer.Option(min=0, help="simulator: wall seconds, 0 = ∞")] = 0.0,
    max_events: Annotated[int, typer.Option(min=0, help="simulator: stop after N, 0 = ∞")] = 0,
    seed: Annotated[int, typer.Option(help="simulator: seed")] = 1,
    start: Annotated[
        datetime | None,
        typer.Option(help="simulator: simulated start (UTC); same seed and start, same events"),
    ] = None,
) -> None:
    """Run adapters that publish to the hub's NATS: every configured machine of a protocol."""
    from adapters.machines.registry import PROTOCOLS

    if protocol != "simulator" and protocol not in PROTOCOLS:
        err_console.print(
            f"[red]unknown adapter {protocol!r}; available: {', '.join(PROTOCOLS)}, simulator[/]"
        )
        raise typer.Exit(2)
    settings = _settings(config, nats_url=nats_url)
    if settings.nats_url is None:
        err_console.print(
            "[red]an adapter needs --nats-url (or nats_url in [hub] / MES_HUB_NATS_URL)[/]"
        )
        raise typer.Exit(2)
    _logging(logging.INFO)
    if protocol == "simulator":
        _run_simulator(settings, machines, speed, duration, max_events, seed, start)
    else:
        _run_adapters(settings, _adapters_config(config), protocol)


def _run_adapters(settings: Settings, adapters_config: AdaptersConfig, protocol: str) -> None:
    from adapters.forward import StoreAndForward
    from adapters.machines.registry import build_adapters, describe
    from hub.nats import ConnectingPublisher

    adapters = build_adapters(adapters_config, protocol)
    if not adapters:
        err_console.print(f"[red]no [[adapters.{protocol}]] entries in the config file[/]")
        raise typer.Exit(2)
    assert settings.nats_url is not None
    url = settings.nats_url
    buffer = adapters_config.buffer
    directory = buffer.directory or settings.data_dir / "adapter-buffer" / protocol

    async def main(stop: asyncio.Event) -> None:
        link = ConnectingPublisher(url, settings.site, f"mes-hub-adapter-{protocol}")
        publisher = StoreAndForward(link, directory, settings.site, buffer.max_events)
        for adapter in adapters:
            console.print(f"adapter {describe(adapter)} → NATS {redacted_url(url)}")
        console.print(f"store-and-forward buffer: {directory} (at most {buffer.max_events:,})")
        tasks = [asyncio.create_task(a.run(publisher, stop)) for a in adapters]
        await stop.wait()
        done, running = await asyncio.wait(tasks, timeout=10)
        for task in running:  # a publish still waiting on NATS: the buffer keeps its events
            task.cancel()
        for task in done:
            if task.exception() is not None:
                log.error("adapter stopped with an error", exc_info=task.exception())
        if not await publisher.drain(timeout=5):
            console.print(f"{publisher.waiting():,} events wait in the buffer for the next run")
        await publisher.close()
        await link.close()

    _run(main)


@adapter_app.command("check")
def adapter_check(
    config: ConfigOption = None,
    protocol: Annotated[str | None, typer.Option(help="only this protocol's entries")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="seconds per adapter")] = 15.0,
) -> None:
    """Connect once to every configured machine and print what would be published."""
    from adapters.machines.registry import build_adapters, describe

    adapters = build_adapters(_adapters_config(config), protocol)
    if not adapters:
        err_console.print("[red]no adapters configured in [adapters][/]")
        raise typer.Exit(2)
    _logging(logging.WARNING)

    async def check_all() -> int:
        failures = 0
        for adapter in adapters:
            try:
                events = await asyncio.wait_for(adapter.check(), timeout)
            except Exception as exc:
                failures += 1
                err_console.print(f"[red]✗ {describe(adapter)}: {type(exc).__name__}: {exc}[/]")
                continue
            table = Table(
                title=f"✓ {describe(adapter)}: {len(events)} events", title_justify="left"
            )
            for column in ("machine", "type", "event time", "data"):
                table.add_column(column, overflow="fold")
            for event in events:
                table.add_row(event.subject, event.type, event.time.isoformat(), str(event.data))
            console.print(table)
        return failures

    failures = asyncio.run(check_all())
    if failures:
        raise typer.Exit(1)


def _run_simulator(
    settings: Settings,
    machines: int,
    speed: float,
    duration: float,
    max_events: int,
    seed: int,
    start: datetime | None,
) -> None:
    from adapters.machines.simulator import SimulatorConfig, past_start, run_simulator
    from hub.nats import NatsPublisher, connect

    assert settings.nats_url is not None
    url = settings.nats_url

    async def main(stop: asyncio.Event) -> None:
        client = await connect(url, name="mes-hub-simulator")
        publisher = NatsPublisher(client.jetstream(), settings.site)
        task = asyncio.create_task(
            run_simulator(
                SimulatorConfig(
                    machines=machines,
                    seed=seed,
                    site=settings.site,
                    start=(start or past_start(speed, duration or None)).replace(
                        tzinfo=UTC, microsecond=0
                    ),
                ),
                publisher,
                speed=speed,
                duration_s=duration or None,
                max_events=max_events or None,
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            run = await task
            console.print(f"published {run.published} events ({run.duplicates} duplicates)")
        await client.drain()

    _run(main)


@contextlib.contextmanager
def _store_and_views(
    config: Path | None, data_dir: Path | None
) -> Iterator[tuple[Settings, EventStore, ViewDatabase]]:
    """The event store and the views, for the projections commands (no NATS needed)."""
    from hub.bootstrap import open_views
    from hub.store import EventStore

    settings = _settings(config, data_dir=data_dir)
    store = EventStore(settings)
    views = open_views(settings)
    try:
        yield settings, store, views
    finally:
        views.close()
        store.close()


@projections_app.command("rebuild")
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


@projections_app.command("catch-up")
def projections_catch_up(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Bring every view up to the end of the event store, from where each stopped."""
    from hub.bootstrap import projection_workers

    with _store_and_views(config, data_dir) as (settings, store, views):
        for worker in projection_workers(settings, store, views):
            worker.prepare()
            before = worker.position
            read = worker.catch_up()
            console.print(f"{worker.name}: {before} -> {worker.position} ({read:,} events)")


@projections_app.command("status")
def projections_status(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """How far each view has read the event store."""
    from hub.bootstrap import all_views
    from projections.views.runner import positions

    with _store_and_views(config, data_dir) as (_, store, views):
        stored, read = store.last_position(), positions(views)
        table = Table("view", "position", "behind")
        for view in all_views():
            position = read.get(view.name, 0)
            table.add_row(view.name, str(position), str(stored - position))
        console.print(f"event store: {stored} events")
        console.print(table)


def main() -> None:
    app()
