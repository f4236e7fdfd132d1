"""``mes-hub demo``: the whole hub embedded, fed by a simulated factory, shown live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from fastapi import FastAPI, Request, Response
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from adapters.webhooks.config import WebhookEntry
from adapters.webhooks.signing import new_secret, sign
from hub.api.deps import key_id
from hub.api.policy import SCREEN_USERS
from hub.bootstrap import CONFIRMATIONS_SINCE, PARTNERS_SINCE, Hub, build_hub
from hub.cli.shared import (
    DataDirOption,
    api_server,
    console,
    run_until_signal,
    settings_or_exit,
    setup_logging,
)
from hub.ingest import IngestStats
from hub.nats_auth import signing_key, write_private
from hub.outbox import InMemoryDestination
from hub.reports import Reports
from hub.sealer import checkpoint_reference
from hub.server import ApiServer
from hub.settings import Role, Settings
from hub.tasks import cancel_task
from hub.ui.sessions import SESSIONS_FILE, Sessions
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader

# Without a terminal (``mes-hub demo | cat``, a CI log) there is no live view: a progress line
# this often instead.
PROGRESS_EVERY_S = 5.0


DEMO_ENDPOINT = "demo-receiver"
# The reason catalog of the demo's plant: the simulator's operators give these
# (``adapters.machines.simulator.REASONS``); an operator at a station picks from them too.
DEMO_REASONS: dict[str, Any] = {
    "mechanical": {"spindle": "unplanned", "coolant": "unplanned"},
    "material": {"waiting": "unplanned"},
    "tooling": {"change": "unplanned"},
    "quality": {"inspection": "unplanned"},
    "planned": {"break": "planned", "changeover": "planned", "maintenance": "planned"},
}


def screen_links(
    settings: Settings, keys: dict[Role, str], url: str, machine_id: str
) -> tuple[str, str]:
    """One-time sign-in links: the plant board as a viewer, ``machine_id``'s station as an
    operator (``hub.ui.sessions``: each opens one session, within a day)."""
    secret = signing_key(settings.data_dir)
    sessions = Sessions(settings.data_dir / SESSIONS_FILE, {})
    try:
        board = sessions.issue_link(key_id(keys["viewer"], secret), "viewer")
        station = sessions.issue_link(key_id(keys["operator"], secret), "operator")
    finally:
        sessions.close()
    return (
        f"{url}/ui/enter/{board}?next=/ui/",
        f"{url}/ui/enter/{station}?next=/ui/station/{machine_id}",
    )


class DemoReceiver:
    """A partner's endpoint on this machine: takes each webhook whose Standard Webhooks
    signature checks out with its secret (401 otherwise), and counts them by type."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.ids: set[str] = set()
        self.by_type: Counter[str] = Counter()
        self.refused = 0
        self.came = asyncio.Event()
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> Response:
            body, said = await request.body(), request.headers
            self.came.set()
            try:
                expected = sign([self.secret], said["webhook-id"],
                                int(said["webhook-timestamp"]), body).split()  # fmt: skip
            except (KeyError, ValueError):
                expected = []
            if not set(expected) & set(said.get("webhook-signature", "").split()):
                self.refused += 1
                return Response(status_code=401)
            if said["webhook-id"] not in self.ids:
                self.ids.add(said["webhook-id"])
                self.by_type[json.loads(body)["type"].removeprefix("mes.order.")] += 1
            return Response(status_code=204)

    async def quiet(self, for_s: float = 2.0) -> None:
        """Until nothing came for ``for_s``."""
        while True:
            self.came.clear()
            try:
                await asyncio.wait_for(self.came.wait(), for_s)
            except TimeoutError:
                return

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.by_type.items()))
        return (
            f"{len(self.ids)} partner webhooks taken by the local receiver, each signature "
            f"checked ({kinds or 'none'}; {self.refused} refused)"
        )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _print_full_width(table: Table) -> None:
    """``table`` at its natural width: a pipe or a file has no width to cut it to (Rich would
    take 80 columns)."""
    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    Console(file=console.file, width=max(natural, 1)).print(table)


def _machine_table(
    hub: Hub,
    reports: Reports,
    elapsed: float,
    published: int,
    since: datetime,
    until: datetime | None,
    full: bool = False,
) -> Table:
    """The demo's live view; OEE covers the simulated time so far, as the API reports it with
    the simulated clock's now. ``full``: every column and every text whole (for a pipe, where
    the table is printed at its natural width), not fitted to the terminal."""
    stats = hub.ingest_stats()
    calendar = reports.plant.calendar()
    window = Interval(since, until) if until and until > since else None
    shifts = calendar.shifts(Interval(until, until + timedelta(seconds=1))) if until else []
    table = Table(
        title=f"mes-hub demo — {elapsed:4.0f} s — simulated {until or since:%Y-%m-%d %H:%M} UTC, "
        f"shift {shifts[0].name if shifts else '-'} — published {published}, "
        f"stored {stats.applied}, duplicates {stats.duplicates}, dead-lettered {stats.rejected}",
        expand=False,
    )
    # On a narrow terminal the figures matter more than order ids and alarm texts.
    wide = full or console.width >= 110
    for column, width in (("machine", 7), ("avail.", 6), ("execution", 11)):
        table.add_column(column, no_wrap=True, min_width=width)
    if wide:
        table.add_column("order", no_wrap=True, overflow="ellipsis", max_width=None if full else 26)
    for column in ("parts", "bad", "A", "P", "Q", "OEE"):
        table.add_column(column, no_wrap=True, justify="right", min_width=4)
    if wide:
        table.add_column("alarm", overflow="ellipsis", no_wrap=True, max_width=None if full else 20)
    machines = hub.store.machines(reports.site)
    oee = (
        reports.machines_oee([m.machine_id for m in machines], window, None, until or since)
        if window is not None
        else {}
    )
    for machine in machines:
        colour = {"ACTIVE": "green", "STOPPED": "red", "INTERRUPTED": "yellow"}.get(
            machine.execution or "", "white"
        )
        alarm = next(iter(machine.conditions.values()), None)
        figures = None
        if window is not None:
            (bucket,) = oee[machine.machine_id]
            figures = bucket.figures
        row = [
            machine.machine_id,
            (machine.availability or "-") if full else (machine.availability or "-")[:5],
            f"[{colour}]{machine.execution or '-'}[/]",
            *([reports.facts.current_order(machine.id) or "-"] if wide else []),
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
        machine_name,
        past_start,
        run_simulator,
    )

    directory = data_dir or Path(tempfile.mkdtemp(prefix="mes-hub-demo-"))
    # An admin's key, and the keys the floor's screens sign in with (one-time links below).
    keys: dict[Role, str] = {role: secrets.token_urlsafe(24) for role in SCREEN_USERS}
    key = keys["admin"]
    settings = settings_or_exit(
        None,
        data_dir=directory,
        api_port=port,
        api_keys=",".join(f"{role}:{secret}" for role, secret in keys.items()),
        nats_url="",
    )
    setup_logging(logging.INFO, directory / "hub.log")

    # The defaults (one 24-hour shift a day, UTC) with a reason catalog holding the reasons
    # the simulated operators give, and those the station offers for the stops left unassigned.
    plant = PlantConfig(reasons=DEMO_REASONS)
    # On a terminal, a live table redrawn in place (as Rich's Live draws one). Otherwise (a
    # pipe, a file, a dumb terminal) Live would show nothing until the end: plain lines, each
    # printed (and flushed) as it happens, not folded at a width a pipe does not have.
    live = console.is_terminal and not console.is_dumb_terminal

    def say(text: str) -> None:
        console.print(text, soft_wrap=not live)

    async def show(hub: Hub, stop: asyncio.Event) -> tuple[SimulatorRun, IngestStats]:
        """Serve the API and run the factory until the simulation ends or ``stop``; what was
        published, and what ingest made of it."""
        api = api_server(hub, plant)
        try:
            api.start()
            # The table's figures come from the entry point the API's come from, on one plant.
            facts, orders = FactsReader(hub.views), OrdersReader(hub.views)
            reports = Reports(hub.store, facts, orders, settings.site, plant)
            say(f"[bold]mes-hub demo[/]: {machines} simulated machines at {speed:g}x")
            say(f"API: {api.url}/api/v1/machines   docs: {api.url}/docs")
            say(f"admin key (this run only): [bold]{key}[/]")
            say(f"try: curl -H 'Authorization: Bearer {key}' {api.url}/api/v1/machines")
            board, station = screen_links(settings, keys, api.url, machine_name(0))
            say(f"plant board (opens signed in as a viewer, once): [bold]{board}[/]")
            say(f"{machine_name(0)}'s operator station (as an operator, once): [bold]{station}[/]")
            if duration:
                say(f"(the pages are live while the demo runs: {duration:g} s; --duration 0 "
                    "keeps it running until Ctrl-C)")  # fmt: skip
            say(f"data and log: {directory}\n")
            progress = SimulatorRun()
            simulation = SimulatorConfig(
                machines=machines, seed=seed, site=settings.site, start=simulated_start
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

            async def table(full: bool = False) -> Table:
                return await asyncio.to_thread(
                    _machine_table,
                    hub,
                    reports,
                    time.monotonic() - started,
                    progress.published,
                    simulation.start,
                    progress.simulated_until,
                    full,
                )

            async def wind_down() -> None:
                await cancel_task(simulator)
                # No forecast round may publish after the last wait, or the summary would
                # not add up.
                await hub.stop_forecast_watch()
                with contextlib.suppress(asyncio.TimeoutError):
                    await hub.wait_caught_up(timeout=30)

            def progress_line() -> str:
                stats = hub.ingest_stats()
                until = progress.simulated_until or simulation.start
                return (
                    f"{time.monotonic() - started:4.0f} s: simulated until "
                    f"{until:%Y-%m-%d %H:%M} UTC, events published: {progress.published}, "
                    f"events stored: {stats.applied}, duplicates {stats.duplicates}, "
                    f"dead-lettered {stats.rejected}"
                )

            try:
                if live:
                    with Live(console=console, refresh_per_second=2) as view:
                        while not stop.is_set() and not simulator.done():
                            view.update(await table())
                            with contextlib.suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(stop.wait(), 1.0)
                        await wind_down()
                        view.update(await table())
                else:
                    say(
                        f"simulating {machines} machines at {speed:g}x "
                        + (f"for {duration:g} s…" if duration else "until Ctrl-C…")
                    )
                    due = started + PROGRESS_EVERY_S
                    while not stop.is_set() and not simulator.done():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), 1.0)
                        if (now := time.monotonic()) >= due:
                            say(progress_line())
                            due = now + PROGRESS_EVERY_S
                    ended = "stopped" if stop.is_set() else "done"
                    say(f"simulation {ended}; waiting for the hub to store what was published…")
                    await wind_down()
                    say(progress_line())
                    say("")
                    _print_full_width(await table(full=True))
            finally:
                simulator.cancel()
            return progress, hub.ingest_stats()
        finally:
            await api.stop()

    # The simulated factory's orders are confirmed to a simulated ERP (in this process): the
    # hub decides each confirmation and delivers it through its outbox as to a real one, from
    # the simulation's start (a hub confirms runs that end after it began to confirm).
    simulated_start = past_start(speed, duration or None)  # ends about now: none from the future
    erp = InMemoryDestination("simulated-erp")
    # And the partners' webhooks go to a receiver on this machine that checks each signature,
    # told from the simulation's start too.
    receiver = DemoReceiver(new_secret())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "webhooks").mkdir(exist_ok=True)
    for since in (
        directory / CONFIRMATIONS_SINCE,
        directory / PARTNERS_SINCE,
        directory / "webhooks" / f"{DEMO_ENDPOINT}.since",
    ):
        if not since.exists():
            since.write_text(simulated_start.isoformat())
    secret_file = directory / "webhooks" / "demo-receiver.secret"
    write_private(secret_file, receiver.secret)

    async def main(stop: asyncio.Event) -> None:
        if not live:
            say("starting the hub (embedded NATS server, event store, views)…")
        partner = ApiServer(receiver.app, "127.0.0.1", 0)
        partner.start()
        endpoint = WebhookEntry.model_validate({
            "name": DEMO_ENDPOINT, "url": f"{partner.url}/hook", "all_customers": True,
            "secret": {"file": str(secret_file)}, "allow": ["127.0.0.1/32"],
        })  # fmt: skip
        checkpoint: str | None = None
        try:
            hub = await build_hub(settings, destinations=[erp], webhooks=[endpoint])
            try:  # the hub owns the embedded nats-server and the store: closed on every path
                say(f"partners' webhooks: to {partner.url}/hook (a receiver checking signatures)")
                progress, stats = await show(hub, stop)
                # What is owed to the receiver by now goes before the summary.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(receiver.quiet(), 15)
                checkpoint = await asyncio.to_thread(checkpoint_reference, hub.store)
            finally:
                if not live:
                    say("stopping the hub…")
                await hub.close()
        finally:
            await partner.stop()
        until = progress.simulated_until  # None: stopped before the first event
        say(
            f"\n[bold]Summary[/]: {progress.published} events published, {stats.applied} stored "
            f"exactly once (with {hub.forecast_watch.published} delivery forecast changes the hub "
            f"published), {stats.duplicates} duplicates dropped, {stats.rejected} dead-lettered; "
            f"{len(erp.taken)} production confirmations taken by the simulated ERP; "
            f"{receiver.summary()}; "
            + (f"simulated until {until:%Y-%m-%d %H:%M:%S} UTC. " if until else "")
            + f"Data kept in {directory}."
        )
        if checkpoint is not None:
            size = checkpoint.rsplit(" ", 2)[1]
            say(
                f"The log is sealed and signed up to its first {size} events (checkpoint "
                f"{escape(checkpoint)}); prove it: mes-hub audit verify --data-dir {directory}"
            )

    run_until_signal(main)
