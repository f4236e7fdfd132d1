"""``mes-hub adapter``: run the machine adapters (or the simulator) against a hub's NATS, or check
them once. The adapters are imported only when one of these commands runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hub.cli.shared import (
    ConfigOption,
    NatsUrlOption,
    adapters_or_exit,
    config_file_or_exit,
    config_file_required,
    config_or_exit,
    console,
    err_console,
    run_until_signal,
    setup_logging,
)
from hub.settings import Settings, redacted_url

if TYPE_CHECKING:  # the adapters are imported when an adapter command runs
    from adapters.machines.config import AdaptersConfig
    from hub.nats_auth import Credentials

log = logging.getLogger("hub.cli")  # the CLI's one logger, whichever group logs
app = typer.Typer(help="Machine and ERP adapters.", no_args_is_help=True)
PROTOCOL_HELP = (
    "mtconnect, shdr, opcua, modbus, haas, lsv2, serial, sparkplug, focas (entries of the config "
    "file) or simulator"
)


@app.command("run")
def adapter_run(
    protocol: Annotated[str, typer.Argument(help=PROTOCOL_HELP)],
    config: ConfigOption = None,
    nats_url: NatsUrlOption = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The buffer's folder; on the hub's machine, its data dir: the adapter finds "
            "the hub's NATS and its identity there",
        ),
    ] = None,
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
    # The file is read once: [hub], and for a machine protocol its [adapters].
    machine_adapters = protocol != "simulator" and config is not None
    loaded = config_file_or_exit(
        config, adapters=machine_adapters, nats_url=nats_url, data_dir=data_dir
    )
    settings = loaded.hub
    from hub.nats_auth import Identity, adapter_link

    # The simulator plays machines and their operators: as the API does, it sends both.
    identity: Identity = "api" if protocol == "simulator" else "machines"
    url, credentials = config_or_exit(lambda: adapter_link(settings, identity))
    if url is None:
        err_console.print(
            "[red]an adapter needs --nats-url (or nats_url in [hub] / MES_HUB_NATS_URL), or a "
            "hub started from the same --data-dir on this machine[/]"
        )
        raise typer.Exit(2)
    link = NatsLink(url, credentials)
    if protocol == "simulator":
        setup_logging(logging.INFO)
        _run_simulator(settings, link, machines, speed, duration, max_events, seed, start)
        return
    config_file_required(config)
    assert loaded.adapters is not None
    setup_logging(logging.INFO)
    _run_adapters(settings, link, loaded.adapters, protocol)


@dataclass(frozen=True)
class NatsLink:
    """Where the hub's NATS is, and the adapter's identity there (None: an open NATS)."""

    url: str
    credentials: Credentials | None


def _run_adapters(
    settings: Settings, link: NatsLink, adapters_config: AdaptersConfig, protocol: str
) -> None:

    from adapters.forward import BufferInUse, StoreAndForward
    from adapters.machines.registry import build_adapters, describe
    from hub.nats import ConnectingPublisher

    adapters = build_adapters(adapters_config, protocol)
    if not adapters:
        err_console.print(f"[red]no [[adapters.{protocol}]] entries in the config file[/]")
        raise typer.Exit(2)
    buffer = adapters_config.buffer
    directory = buffer.directory or settings.data_dir / "adapter-buffer" / protocol

    async def main(stop: asyncio.Event) -> None:
        nats = ConnectingPublisher(
            link.url, settings.site, f"mes-hub-adapter-{protocol}", credentials=link.credentials
        )
        try:
            publisher = StoreAndForward(nats, directory, settings.site, buffer.max_events)
        except BufferInUse as exc:
            err_console.print(f"[red]{escape(str(exc))}[/]")
            raise typer.Exit(2) from None
        for adapter in adapters:
            console.print(f"adapter {describe(adapter)} → NATS {redacted_url(link.url)}")
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
        await nats.close()

    run_until_signal(main)


@app.command("check")
def adapter_check(
    config: ConfigOption = None,
    protocol: Annotated[str | None, typer.Option(help="only this protocol's entries")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="seconds per adapter")] = 15.0,
) -> None:
    """Connect once to every configured machine and print what would be published."""
    from adapters.machines.registry import build_adapters, describe

    adapters = build_adapters(adapters_or_exit(config), protocol)
    if not adapters:
        err_console.print("[red]no adapters configured in \\[adapters][/]")
        raise typer.Exit(2)
    setup_logging(logging.WARNING)

    async def check_all() -> int:
        failures = 0
        for adapter in adapters:
            try:
                events = await asyncio.wait_for(adapter.check(), timeout)
            except Exception as exc:
                failures += 1
                # ``wait_for`` gives up with a TimeoutError that says nothing.
                why = str(exc) or (
                    f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else ""
                )
                failure = f"✗ {describe(adapter)}: {type(exc).__name__}: {why}"
                err_console.print(f"[red]{escape(failure)}[/]")
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
    link: NatsLink,
    machines: int,
    speed: float,
    duration: float,
    max_events: int,
    seed: int,
    start: datetime | None,
) -> None:
    from adapters.machines.simulator import SimulatorConfig, past_start, run_simulator
    from hub.nats import NatsPublisher, connect_or_stop

    async def main(stop: asyncio.Event) -> None:
        client = await connect_or_stop(stop, link.url, "mes-hub-simulator", link.credentials)
        if client is None:  # stopped while NATS could not be reached
            return
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

    run_until_signal(main)
