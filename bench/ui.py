"""Live screens benchmark: how soon the floor's open pages see what happens.

One real hub (``mes-hub serve --config``: SQLite, its embedded nats-server, its views process
and read workers) with an admin, a viewer and an operator key. A simulated plant of 200
machines (``adapters.machines.simulator``) publishes to the hub's NATS as the simulator adapter
does (NATS identity ``api``): first some hours of history flat out (so the views hold a shift's
worth, as on a real floor mid-shift), then on at ``--speed`` simulated seconds per wall second.

Then, with the plant still running:
- quiet:   no page open, for a while (the CPU and memory the hub spends without screens);
- screens: 50 plant boards (``GET /ui/live``, every machine) and 50 operator stations
           (``/ui/live?machine=M…``, one machine each, spread over the plant) signed in with
           sessions (``POST /ui/login``: viewers for the boards, operators for the stations).
           The streams are read by httpx clients in a process of their own: they stand for the
           browsers' EventSource (one connection each, reconnecting as EventSource does).

Figures, over the events stored on machines while the streams were open:
- end to end: for each (event, stream showing its machine), the wall time the stream received
  the first ``tiles`` message carrying that machine's tile with ``position`` at or past the
  event's, minus the time the hub recorded the event (the audit view's ``recorded_time``, the
  store event's timestamp, stamped by ingest as it makes the event; on this machine, the
  same clock as the bench's ``time.time()``);
- the baseline, in the same run: the moment the bench (polling the views' tracking table every
  ``--poll-ms``) first saw every view at or past the event's position, minus the same recorded
  time. Their difference is what the screens add;
- server CPU (% of one core) and RSS of the hub's processes, with the streams open and in the
  quiet stretch before.

The bench never asserts timings.

    .venv/bin/python bench/ui.py [--quick] [--machines 200] [--boards 50] [--stations 50]
                                 [--speed 30] [--history-h 3] [--measure-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from api_load import _clean_env, _family, _until_up, free_port  # noqa: E402

from adapters.machines.simulator import SimulatorConfig, factory_events, machine_name  # noqa: E402
from contracts import CloudEvent  # noqa: E402
from hub.api.deps import SESSION_COOKIE  # noqa: E402
from hub.ingest import tracking_name  # noqa: E402
from hub.nats import NatsPublisher, connect  # noqa: E402
from hub.nats_auth import adapter_link  # noqa: E402
from hub.settings import load_settings  # noqa: E402

ADMIN_KEY = "bench-ui-admin-0123456789abcdef"
VIEWER_KEY = "bench-ui-viewer-0123456789abcdef"
OPERATOR_KEY = "bench-ui-operator-0123456789abcdef"
SITE = "default"
# The simulator's operators give these reasons (adapters.machines.simulator.REASONS): the
# plant's catalog holds them, as the demo's does (hub.cli.demo.DEMO_REASONS).
CONFIG = """\
[hub]
data_dir = "{data_dir}"
api_port = {port}
api_keys = "admin:{admin},viewer:{viewer},operator:{operator}"

[plant.reasons]
mechanical = {{ spindle = "unplanned", coolant = "unplanned" }}
material = {{ waiting = "unplanned" }}
tooling = {{ change = "unplanned" }}
quality = {{ inspection = "unplanned" }}
planned = {{ break = "planned", changeover = "planned", maintenance = "planned" }}
"""
BENCH_ROLES = ("readers (clients)", "bench (publisher)")
MACHINE = "machine (all processes)"
POSITION = re.compile(rb'"position":(-?\d+)')
MACHINE_ID = re.compile(rb'"machine_id":"([^"]*)"')


# --- figures -------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of sorted ``values``."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[rank]


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:,.0f}"


def summary(values: list[float]) -> tuple[int, float, float, float, float, float]:
    ordered = sorted(values)
    return (
        len(ordered), pct(ordered, 50), pct(ordered, 95), pct(ordered, 99), pct(ordered, 99.9),
        ordered[-1] if ordered else float("nan"),
    )  # fmt: skip


# --- the hub and its processes -------------------------------------------------------------------


class Probe:
    """In a thread, every ``poll_s``: the store's last position and how far the slowest view
    has read (``time.time()`` of each first sighting), and every second the CPU times and RSS
    of the hub's processes."""

    def __init__(self, data_dir: Path, hub: subprocess.Popen[Any], poll_s: float) -> None:
        self.data_dir, self.hub, self.poll_s = data_dir, hub, poll_s
        self.store_seen: list[tuple[int, float]] = []  # (position, first seen stored)
        self.views_seen: list[tuple[int, float]] = []  # (position, first seen read by all views)
        self.ingested = 0  # the NATS stream position ingest has committed
        self.clients: subprocess.Popen[Any] | None = None
        self.samples: list[tuple[float, dict[str, float], dict[str, float]]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="bench-probe", daemon=True),
            threading.Thread(target=self._sample, name="bench-usage", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            cpu, rss = _usage(self.hub, self.clients)
            every = psutil.cpu_times()
            cpu[f"{MACHINE}/0"] = (
                every.user
                + every.nice
                + every.system
                + getattr(every, "irq", 0.0)
                + getattr(every, "softirq", 0.0)
                + getattr(every, "steal", 0.0)
            )
            self.samples.append((now, cpu, rss))
            self._stop.wait(max(0.0, now + 1.0 - time.time()))

    def _run(self) -> None:
        store = views = None
        tracking = tracking_name(0, 1)
        while not self._stop.is_set():
            now = time.time()
            try:
                if store is None:
                    store = _read_only(self.data_dir / "events.sqlite")
                    views = _read_only(self.data_dir / "views.sqlite")
                assert views is not None
                (stored,) = store.execute("SELECT MAX(rowid) FROM stored_events").fetchone()
                (read,) = views.execute("SELECT MIN(position) FROM mes_view_tracking").fetchone()
                row = store.execute(
                    "SELECT notification_id FROM tracking WHERE application_name = ?", (tracking,)
                ).fetchone()
            except sqlite3.Error:
                store = views = None
            else:
                seen = time.time()
                if stored and (not self.store_seen or stored > self.store_seen[-1][0]):
                    self.store_seen.append((int(stored), seen))
                if read and (not self.views_seen or read > self.views_seen[-1][0]):
                    self.views_seen.append((int(read), seen))
                self.ingested = int(row[0]) if row and row[0] else self.ingested
            self._stop.wait(max(0.0, now + self.poll_s - time.time()))

    def store_last(self) -> int:
        return self.store_seen[-1][0] if self.store_seen else 0

    def views_last(self) -> int:
        return self.views_seen[-1][0] if self.views_seen else 0


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise sqlite3.OperationalError(f"{path} not there yet")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


def _usage(
    hub: subprocess.Popen[Any], clients: subprocess.Popen[Any] | None
) -> tuple[dict[str, float], dict[str, float]]:
    """CPU seconds by process (``role/pid``) and RSS (MiB) by role, now."""
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}
    try:
        family = _family(hub, clients)  # (api_load's: roles of the hub's tree and the bench's)
    except psutil.Error:
        return cpu, rss
    for role, processes in family.items():
        for process in processes:
            with contextlib.suppress(psutil.Error):
                with process.oneshot():
                    times, memory = process.cpu_times(), process.memory_info()
                cpu[f"{role}/{process.pid}"] = times.user + times.system
                rss[role] = rss.get(role, 0.0) + memory.rss / 2**20
    return cpu, rss


@dataclass
class Usage:
    """What the processes used over a stretch: CPU (% of one core) and mean/peak RSS, by role."""

    seconds: float
    cpu_pct: dict[str, float] = field(default_factory=dict)
    rss_mean: dict[str, float] = field(default_factory=dict)
    rss_peak: dict[str, float] = field(default_factory=dict)

    def hub_cpu(self, with_nats: bool = False) -> float:
        return sum(v for r, v in self.cpu_pct.items() if _is_hub(r, with_nats))

    def hub_rss(self, peak: bool = False, with_nats: bool = False) -> float:
        found = self.rss_peak if peak else self.rss_mean
        return sum(v for r, v in found.items() if _is_hub(r, with_nats))


def _is_hub(role: str, with_nats: bool) -> bool:
    return role not in (*BENCH_ROLES, MACHINE) and (with_nats or role != "nats-server")


def usage_between(probe: Probe, began: float, ended: float) -> Usage:
    window = [s for s in probe.samples if began <= s[0] <= ended]
    if len(window) < 2:
        return Usage(ended - began)
    first, last = window[0], window[-1]
    seconds = last[0] - first[0]
    cpu: dict[str, float] = {}
    for key, total in last[1].items():
        # A process started in the stretch (a read worker replaced) counts from zero.
        used = total - first[1].get(key, 0.0)
        role = key.rsplit("/", 1)[0]
        cpu[role] = cpu.get(role, 0.0) + used / seconds * 100
    roles = {r for s in window for r in s[2]}
    mean = {r: statistics.fmean(s[2].get(r, 0.0) for s in window) for r in roles}
    peak = {r: max(s[2].get(r, 0.0) for s in window) for r in roles}
    return Usage(seconds, cpu, mean, peak)


class Interrupt:
    """Ctrl-C (or SIGTERM) cancels the run, and again every half second until the run is in
    its cleanup: Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that lands as
    its inner future completes, and the publisher waits in many."""

    def __init__(self) -> None:
        self.cleaning = False
        self.requested = False

    def install(self) -> None:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._cancel, task)

    def _cancel(self, task: asyncio.Task[Any]) -> None:
        self.requested = True
        if not task.done() and not self.cleaning:
            task.cancel()
            asyncio.get_running_loop().call_later(0.5, self._cancel, task)


# --- the plant ------------------------------------------------------------------------------------


class Plant:
    """The simulated machines' events, published to the hub's NATS: ``preload`` flat out up to
    ``live_from`` (simulated time), then ``run`` paced at ``speed`` — as
    ``adapters.machines.simulator.run_simulator`` paces them (never ahead of the wall clock),
    on one stream of events so that the history and what follows are one plant's."""

    def __init__(self, config: SimulatorConfig, live_from: datetime) -> None:
        self.events: Iterator[CloudEvent] = factory_events(config)
        self.live_from = live_from
        self.published = 0
        self.last_seq = 0
        self.paced: list[tuple[float, int]] = []  # (wall time, published so far) while paced
        self.behind_s = 0.0  # how far the paced publisher fell behind its schedule, at most
        self._next: CloudEvent | None = None

    async def _flush(self, publisher: NatsPublisher, pending: list[CloudEvent]) -> None:
        receipts = await publisher.publish_many(pending)
        self.published += sum(1 for r in receipts if not r.duplicate)
        self.last_seq = max([self.last_seq, *(r.stream_seq or 0 for r in receipts)])
        pending.clear()

    async def preload(
        self, publisher: NatsPublisher, interrupt: Interrupt, batch: int = 1000
    ) -> None:
        pending: list[CloudEvent] = []
        for event in self.events:
            if interrupt.requested:
                raise asyncio.CancelledError
            if event.time >= self.live_from:
                self._next = event
                break
            pending.append(event)
            if len(pending) >= batch:
                await self._flush(publisher, pending)
        if pending:
            await self._flush(publisher, pending)

    async def run(self, publisher: NatsPublisher, speed: float, stop: asyncio.Event) -> None:
        wall_start = time.monotonic()
        pending: list[CloudEvent] = []
        events = itertools.chain([self._next] if self._next else [], self.events)
        for event in events:
            elapsed = time.monotonic() - wall_start
            wait = (event.time - self.live_from).total_seconds() / speed - elapsed
            # As run_simulator: a machine cannot report the future (the hub refuses it).
            wait = max(wait, (event.time - datetime.now(UTC)).total_seconds())
            self.behind_s = max(self.behind_s, -wait)
            if wait > 0:
                if pending:
                    await self._flush(publisher, pending)
                    self.paced.append((time.time(), self.published))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                break
            pending.append(event)
            if len(pending) >= 500:
                await self._flush(publisher, pending)
        if pending:
            await self._flush(publisher, pending)

    def rate_between(self, began: float, ended: float) -> float:
        inside = [(t, n) for t, n in self.paced if began <= t <= ended]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# --- the screens (a process of their own) ---------------------------------------------------------


async def screens(url: str, plan_file: str, out_file: str) -> None:
    """Sign every device in, open its stream, say ``ready`` once each has its first tiles, and
    read until a line arrives on stdin; then write what each stream received to ``out_file``.
    Each stream has a client (a connection) of its own, as each browser has."""
    plan = json.loads(Path(plan_file).read_text())
    devices: list[dict[str, Any]] = plan["devices"]
    opened = asyncio.Event()
    first_tiles = 0
    lag: list[float] = []  # how late this process' event loop woke (its own delay)

    async def sign_in(device: dict[str, Any]) -> str:
        async with httpx.AsyncClient(base_url=url, timeout=60, verify=False) as http:
            answer = await http.post("/ui/login", data={"key": device["key"]})
            if answer.status_code != 303 or SESSION_COOKIE not in answer.cookies:
                raise RuntimeError(f"sign-in refused: {answer.status_code} {answer.text[:200]}")
            return str(answer.cookies[SESSION_COOKIE])

    tokens = await asyncio.gather(*(sign_in(d) for d in devices))

    async def follow(device: dict[str, Any], token: str, record: dict[str, Any]) -> None:
        nonlocal first_tiles
        params = [("machine", m) for m in device["machines"]] if device["machines"] else None
        timeout = httpx.Timeout(60, read=60)  # (a keepalive comes every 15 s)
        cookies = {SESSION_COOKIE: token}
        async with httpx.AsyncClient(
            base_url=url, timeout=timeout, verify=False, cookies=cookies
        ) as http:
            while True:
                record["opened"].append(time.time())
                got_first = False
                try:
                    async with http.stream("GET", "/ui/live", params=params) as answer:
                        if answer.status_code != 200:
                            record["refused"].append(answer.status_code)
                            await asyncio.sleep(2.0)
                            continue
                        buffer = b""
                        async for chunk in answer.aiter_raw():
                            received = time.time()
                            buffer += chunk
                            while b"\n\n" in buffer:
                                message, buffer = buffer.split(b"\n\n", 1)
                                name, data = _parse(message)
                                if name == "tiles":
                                    # (Not json.loads: 50 boards x every tile every 5 s would
                                    # keep this process' loop busy, and late to stamp.)
                                    head = POSITION.search(data, 0, 40)
                                    assert head is not None, data[:80]
                                    machines = [m.decode() for m in MACHINE_ID.findall(data)]
                                    full = data.endswith(b'"full":true}')
                                    record["tiles"].append((received, int(head[1]), machines, full))
                                    if not got_first:
                                        got_first = True
                                        first_tiles += 1
                                        if first_tiles == len(devices):
                                            opened.set()
                                elif name == "views":
                                    record["views"] += 1
                except httpx.HTTPError as exc:
                    record["errors"].append(type(exc).__name__)
                # Closed (too far behind, or the hub went): EventSource opens it again after
                # the retry the hub gave (2 s).
                record["closed"].append(time.time())
                await asyncio.sleep(2.0)

    async def ticker() -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.05)
            lag.append(time.perf_counter() - began - 0.05)

    records = [
        {"kind": d["kind"], "machines": d["machines"], "opened": [], "closed": [], "tiles": [],
         "views": 0, "refused": [], "errors": []}
        for d in devices
    ]  # fmt: skip
    tasks = [
        asyncio.create_task(follow(d, t, r))
        for d, t, r in zip(devices, tokens, records, strict=True)
    ]
    tasks.append(asyncio.create_task(ticker()))
    await opened.wait()
    print("ready", flush=True)
    lag.clear()
    # "stop P": every stream has had a round at or past P (or 60 s went by), then they close.
    target = int((await asyncio.to_thread(sys.stdin.readline)).split()[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        not r["tiles"] or r["tiles"][-1][1] < target for r in records
    ):
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lag.sort()
    Path(out_file).write_text(
        json.dumps({"streams": records, "lag_p99": pct(lag, 99), "lag_max": lag[-1] if lag else 0})
    )
    print("done", flush=True)


def _parse(message: bytes) -> tuple[str | None, bytes]:
    name, data = None, b""
    for line in message.split(b"\n"):
        if line.startswith(b"event: "):
            name = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
    return name, data


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Plan:
    machines: int
    boards: int
    stations: int
    speed: float
    history_h: float
    warmup_s: float
    quiet_s: float
    measure_s: float
    poll_s: float

    @property
    def live_s(self) -> float:
        """Wall seconds the paced plant must last (with a margin), from its start."""
        return 2 * self.warmup_s + self.quiet_s + self.measure_s + 90


@dataclass
class Outcome:
    plan: Plan
    preload_events: int = 0
    preload_s: float = 0.0
    caught_up_s: float = 0.0
    quiet: Usage | None = None
    loaded: Usage | None = None
    rate_quiet: float = float("nan")
    rate_loaded: float = float("nan")
    behind_s: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)
    streams: list[dict[str, Any]] = field(default_factory=list)
    lag_p99: float = 0.0
    lag_max: float = 0.0
    # (position, machine, recorded time) of the machines' events stored since the quiet stretch
    events: list[tuple[int, str, float]] = field(default_factory=list)
    store_seen: list[tuple[int, float]] = field(default_factory=list)
    views_seen: list[tuple[int, float]] = field(default_factory=list)
    views_quiet: list[float] = field(default_factory=list)  # store→views in the quiet stretch
    first_tiles_s: list[float] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


async def until(condition: Any, timeout: float, what: str, hub: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if hub.poll() is not None:
            raise RuntimeError(f"the hub exited ({hub.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def run(plan: Plan, workdir: Path) -> Outcome:
    interrupt = Interrupt()
    interrupt.install()
    outcome = Outcome(plan)
    data_dir = workdir / "data"
    port = free_port()
    config = workdir / "mes-hub.toml"
    config.write_text(
        CONFIG.format(
            data_dir=data_dir, port=port, admin=ADMIN_KEY, viewer=VIEWER_KEY, operator=OPERATOR_KEY
        )
    )
    url = f"http://127.0.0.1:{port}"
    log = workdir / "hub.log"
    with log.open("w") as output:
        hub = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            start_new_session=True,  # (Ctrl-C reaches the bench only: it stops the hub in order)
        )
    clients: subprocess.Popen[str] | None = None
    probe = Probe(data_dir, hub, plan.poll_s)
    stop_plant = asyncio.Event()
    plant_task: asyncio.Task[None] | None = None
    nats = None
    try:
        await _until_up(url)
        probe.start()
        link_url, credentials = adapter_link(load_settings(data_dir=data_dir), "api")
        if link_url is None:
            raise RuntimeError("the hub left no NATS URL and credentials in its data dir")
        nats = await connect(link_url, "bench-ui-simulator", credentials)
        publisher = NatsPublisher(nats.jetstream(publish_async_max_pending=8000), SITE)

        # The plant: its history flat out, then paced. Simulated time reaches the wall clock's
        # only after ``live_s`` wall seconds at ``speed``.
        now = datetime.now(UTC).replace(microsecond=0)
        live_from = now - timedelta(seconds=plan.speed * plan.live_s)
        start = live_from - timedelta(hours=plan.history_h)
        plant = Plant(SimulatorConfig(machines=plan.machines, seed=7, start=start), live_from)
        began = time.monotonic()
        await plant.preload(publisher, interrupt)
        await until(lambda: probe.ingested >= plant.last_seq, 600, "ingest", hub)
        outcome.preload_events, outcome.preload_s = plant.published, time.monotonic() - began
        await until(lambda: probe.views_last() >= probe.store_last() > 0, 600, "the views", hub)
        outcome.caught_up_s = time.monotonic() - began
        say(
            f"history: {outcome.preload_events:,} events ({plan.history_h:g} h of "
            f"{plan.machines} machines) stored in {outcome.preload_s:.1f} s, read by every "
            f"view after {outcome.caught_up_s:.1f} s"
        )
        plant_task = asyncio.create_task(plant.run(publisher, plan.speed, stop_plant))

        # Quiet: the plant runs, no page is open.
        await asyncio.sleep(plan.warmup_s)
        quiet_from = time.time()
        await asyncio.sleep(plan.quiet_s)
        quiet_to = time.time()
        outcome.quiet = usage_between(probe, quiet_from, quiet_to)
        outcome.rate_quiet = plant.rate_between(quiet_from, quiet_to)
        say(f"quiet: {plan.quiet_s:g} s with no page open; plant {outcome.rate_quiet:.0f} events/s")

        # The screens.
        machines = [machine_name(i) for i in range(plan.machines)]
        step = max(1, plan.machines // max(1, plan.stations))
        devices = [{"kind": "board", "key": VIEWER_KEY, "machines": []}] * plan.boards + [
            {"kind": "station", "key": OPERATOR_KEY,
             "machines": [machines[(n * step) % plan.machines]]}
            for n in range(plan.stations)
        ]  # fmt: skip
        plan_file, out_file = workdir / "screens.json", workdir / "received.json"
        plan_file.write_text(json.dumps({"devices": devices}))
        opening = time.time()
        clients = subprocess.Popen(
            [sys.executable, __file__, "screens", url, str(plan_file), str(out_file)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        probe.clients = clients
        assert clients.stdout is not None and clients.stdin is not None
        line = await asyncio.wait_for(asyncio.to_thread(clients.stdout.readline), 120)
        if line.strip() != "ready":
            raise RuntimeError(f"the screens' process did not start: {line!r}")
        say(
            f"screens: {plan.boards} boards and {plan.stations} stations signed in, their "
            f"streams open with their first tiles after {time.time() - opening:.1f} s"
        )
        await asyncio.sleep(plan.warmup_s)
        window_from = time.time()
        await asyncio.sleep(plan.measure_s)
        window_to = time.time()
        outcome.window = (window_from, window_to)
        outcome.loaded = usage_between(probe, window_from, window_to)
        outcome.rate_loaded = plant.rate_between(window_from, window_to)
        # The streams go once each has had a round past what was stored in the window.
        clients.stdin.write(f"stop {probe.store_last()}\n")
        clients.stdin.flush()
        await asyncio.wait_for(asyncio.to_thread(clients.stdout.readline), 90)
        clients.wait(30)
        received = json.loads(out_file.read_text())
        outcome.streams = received["streams"]
        outcome.lag_p99, outcome.lag_max = received["lag_p99"], received["lag_max"]
        outcome.first_tiles_s = [
            s["tiles"][0][0] - s["opened"][0] for s in outcome.streams if s["tiles"]
        ]
        stop_plant.set()
        await plant_task
        outcome.behind_s = plant.behind_s
        # Every event of the window read by the views (and so in the audit view).
        await until(lambda: probe.views_last() >= probe.store_last(), 120, "the views", hub)
        probe.stop()
        outcome.store_seen, outcome.views_seen = probe.store_seen, probe.views_seen
        outcome.events = machine_events(data_dir / "views.sqlite", quiet_from - 5)
        outcome.views_quiet = [
            d for _, d in views_delays(outcome, quiet_from, quiet_to - 2).values()
        ]
        return outcome
    finally:
        interrupt.cleaning = True
        probe.stop()
        stop_plant.set()
        if plant_task is not None and not plant_task.done():
            plant_task.cancel()
            with contextlib.suppress(BaseException):
                await plant_task
        if nats is not None:
            with contextlib.suppress(Exception):
                await nats.close()
        for process in (clients, hub):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM) if process is hub else process.kill()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if hub.returncode not in (0, -signal.SIGTERM, None):
            say(f"(the hub exited with {hub.returncode}; the end of its log:)")
            say("\n".join(log.read_text(errors="replace").splitlines()[-20:]))


def machine_events(views_db: Path, since: float) -> list[tuple[int, str, float]]:
    """(position, machine, recorded time in seconds since the epoch) of every event stored on
    a machine of the site since ``since``: the audit view keeps each position's recorded time
    (``projections.views.audit_view``) and which machine an aggregate is."""
    with contextlib.closing(_read_only(views_db)) as db:
        rows = db.execute(
            "SELECT a.position, e.entity, a.recorded_time FROM mes_view_audit_log a "
            "JOIN mes_view_audit_entities e ON e.aggregate = a.aggregate "
            "WHERE e.kind = 'machine' AND e.site = ? AND a.recorded_time >= ? "
            "ORDER BY a.position",
            (SITE, int(since * 1_000_000)),
        ).fetchall()
    return [(int(p), str(m), int(r) / 1_000_000) for p, m, r in rows]


def _first_at_or_past(seen: list[tuple[int, float]], position: int) -> float | None:
    index = bisect.bisect_left(seen, (position, float("-inf")))
    return seen[index][1] if index < len(seen) else None


def views_delays(outcome: Outcome, began: float, ended: float) -> dict[int, tuple[float, float]]:
    """By position, of the machine events recorded in [began, ended]: (first seen stored -
    recorded, every view read - recorded)."""
    found = {}
    for position, _, recorded in outcome.events:
        if began <= recorded <= ended:
            stored = _first_at_or_past(outcome.store_seen, position)
            read = _first_at_or_past(outcome.views_seen, position)
            if stored is not None and read is not None:
                found[position] = (stored - recorded, read - recorded)
    return found


@dataclass
class Delays:
    end_to_end: dict[str, list[float]] = field(default_factory=lambda: {"board": [], "station": []})
    added: list[float] = field(default_factory=list)  # end to end - views, per (event, stream)
    # End to end by the round that brought it: the first after a refresh of every tile, or not.
    by_round: dict[str, list[float]] = field(default_factory=lambda: {"after": [], "other": []})
    missed: dict[str, int] = field(default_factory=lambda: {"board": 0, "station": 0})
    skipped: int = 0  # events a stream had not opened for yet (its first tiles were later)


def end_to_end(outcome: Outcome, baseline: dict[int, tuple[float, float]]) -> Delays:
    """For each event recorded in the window and each stream showing its machine: the first
    ``tiles`` message of that stream carrying the machine with position ≥ the event's."""
    began, ended = outcome.window
    events = [e for e in outcome.events if began <= e[2] <= ended]
    delays = Delays()
    # The refreshes of every tile: the rounds whose message to a board holds every machine.
    refreshes = {
        t[1] for s in outcome.streams if s["kind"] == "board" for t in s["tiles"]
        if not t[3] and len(t[2]) >= outcome.plan.machines
    }  # fmt: skip
    for stream in outcome.streams:
        kind = stream["kind"]
        # Per machine: the positions and receive times of the messages carrying its tile.
        by_machine: dict[str, tuple[list[int], list[float], list[bool]]] = {}
        after_refresh = False  # the previous message was a refresh of every tile
        for received, position, machines, full in stream["tiles"]:
            for machine in machines:
                positions, times, flags = by_machine.setdefault(machine, ([], [], []))
                positions.append(position)
                times.append(received)
                flags.append(after_refresh)
            after_refresh = not full and position in refreshes
        shown = set(stream["machines"]) if stream["machines"] else None
        first = stream["tiles"][0][1] if stream["tiles"] else None
        for position, machine, recorded in events:
            if shown is not None and machine not in shown:
                continue
            if first is None or position <= first:
                delays.skipped += 1
                continue
            positions, times, flags = by_machine.get(machine, ([], [], []))
            index = bisect.bisect_left(positions, position)
            if index == len(positions):
                delays.missed[kind] += 1
                continue
            delay = times[index] - recorded
            delays.end_to_end[kind].append(delay)
            delays.by_round["after" if flags[index] else "other"].append(delay)
            if position in baseline:
                delays.added.append(delay - baseline[position][1])
    return delays


def rounds(outcome: Outcome) -> None:
    """The live feed's rounds as the boards saw them (every board gets every round): how long
    after the views reached a round's position its first board had it (the follower's poll
    wait, ``changed_machines``, ``read_tiles`` in the read pool, the send), and how long the
    last board of the round waited after the first (the fan-out to 50 streams)."""
    began, ended = outcome.window
    plan = outcome.plan
    seen: dict[int, list[float]] = {}
    sizes: dict[int, int] = {}
    for stream in outcome.streams:
        if stream["kind"] != "board":
            continue
        for received, position, machines, full in stream["tiles"][1:]:
            if began <= received <= ended and not full:
                seen.setdefault(position, []).append(received)
                sizes[position] = len(machines)
    light = {p: t for p, t in seen.items() if sizes[p] < plan.machines}
    refresh = {p: t for p, t in seen.items() if sizes[p] >= plan.machines}
    if not seen:
        return
    say(
        f"\nthe live feed's rounds, as the boards received them ({len(light)} rounds with the "
        f"changed machines' tiles, p50 {pct(sorted(sizes[p] for p in light), 50):.0f} tiles; "
        f"{len(refresh)} refreshes of every tile with the shift's OEE, every "
        f"{(ended - began) / max(1, len(refresh)):.1f} s):"
    )
    say(f"  {'(ms)':<46}{'rounds':>7}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}")

    def line(name: str, values: list[float]) -> None:
        n, p50, p95, p99, _, top = summary(values)
        say(f"  {name:<46}{n:>7}{ms(p50):>8}{ms(p95):>8}{ms(p99):>8}{ms(top):>8}")

    for name, group in (("light", light), ("refresh", refresh)):
        after = []
        for position, times in group.items():
            reached = _first_at_or_past(outcome.views_seen, position)
            if reached is not None:
                after.append(min(times) - reached)
        line(f"views at P -> first board has round P ({name})", after)
        line(f"first -> last of 50 boards ({name})", [max(t) - min(t) for t in group.values()])
    starts = sorted(min(t) for t in seen.values())
    line("between one round and the next (any)", [b - a for a, b in itertools.pairwise(starts)])


def round_costs(workdir: Path, outcome: Outcome, repeats: int = 3) -> None:
    """What a round costs done alone, in this process (the hub stopped, nothing else of ours
    running; a read worker runs at a lower CPU priority): the read pool's ``read_tiles`` for
    every tile with the shift's figures (the refresh every ``figures_every_s``), every tile
    without, and a light round's machines; the store's ``changed_machines`` and the views'
    positions (the follower's own reads, in its threads)."""
    from hub.bootstrap import _views_read_up_to, read_sources
    from hub.config import load_config
    from hub.ui.floor import read_tiles

    config = load_config(workdir / "mes-hub.toml")
    sources = read_sources(config.hub)
    plant, site = config.plant, config.hub.site
    now = datetime.now(UTC)
    sizes = sorted(
        len(t[2]) for s in outcome.streams if s["kind"] == "board" for t in s["tiles"][1:]
        if len(t[2]) < outcome.plan.machines
    )  # fmt: skip
    typical = int(pct(sizes, 50)) if sizes else 10
    machines = sorted(sources.store.machine_ids(site))
    last = sources.store.last_position()
    per_round = (
        max(1, round(len(outcome.events) / max(1, len(sizes) / outcome.plan.boards)))
        if sizes else 50
    )  # fmt: skip

    def timed(work: Any) -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            work()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    say(f"\na round's parts done alone after the run (median of {repeats}, ms):")
    parts = [
        ("read_tiles, every tile + shift OEE (refresh)",
         lambda: read_tiles(sources, site, plant, None, now, True)),
        ("read_tiles, every tile, no shift OEE",
         lambda: read_tiles(sources, site, plant, None, now, False)),
        (f"read_tiles, {typical} machines (a light round)",
         lambda: read_tiles(sources, site, plant, machines[:typical], now, False)),
        (f"changed_machines over {per_round} positions",
         lambda: sources.store.changed_machines(site, last - per_round, last)),
        ("the views' position (min of the tracking table)",
         lambda: _views_read_up_to(sources.facts._db)),
    ]  # fmt: skip
    for name, work in parts:
        say(f"  {name:<52}{ms(timed(work)):>8}")
    sources.store.close()


def report(outcome: Outcome) -> None:
    plan = outcome.plan
    began, ended = outcome.window
    baseline = views_delays(outcome, began, ended)
    delays = end_to_end(outcome, baseline)
    stored = [s for s, _ in baseline.values()]
    views = [v for _, v in baseline.values()]
    every = delays.end_to_end["board"] + delays.end_to_end["station"]
    inside = [e for e in outcome.events if began <= e[2] <= ended]
    window_events = len(inside)
    # What a screen redraws is a machine, not an event: machines with news in each second.
    seconds: dict[int, set[str]] = {}
    for _, machine, recorded in inside:
        seconds.setdefault(int(recorded), set()).add(machine)
    changing = statistics.fmean(len(m) for m in seconds.values()) if seconds else 0.0
    cpus = os.cpu_count()
    say(
        f"\nUI live bench: {plan.machines} simulated machines at speed {plan.speed:g} "
        f"(plant: {outcome.rate_loaded:.0f} events/s published while measured, "
        f"{window_events:,} events stored on machines in the {ended - began:.0f} s window, "
        f"{changing:.0f} machines a second with news); "
        f"{plan.boards} boards + {plan.stations} stations on GET /ui/live, read by httpx "
        f"streaming clients standing for the browsers' EventSource; {cpus} CPUs; SQLite."
    )
    say("delay from the event recorded in the store to … (ms):")
    header = f"  {'':<34}{'pairs':>9}{'p50':>8}{'p95':>8}{'p99':>8}{'p99.9':>8}{'max':>8}"
    say(header)

    def row(name: str, values: list[float]) -> None:
        n, p50, p95, p99, p999, top = summary(values)
        say(f"  {name:<34}{n:>9,}{ms(p50):>8}{ms(p95):>8}{ms(p99):>8}{ms(p999):>8}{ms(top):>8}")

    row("stored (seen by the bench)", stored)
    row("views updated (the baseline)", views)
    row("stream: every (event, stream)", every)
    row("stream: boards", delays.end_to_end["board"])
    row("stream: stations", delays.end_to_end["station"])
    row("  by the round after a refresh", delays.by_round["after"])
    row("  by any other round", delays.by_round["other"])
    row("what the screens add (per pair)", delays.added)
    row("views updated, quiet stretch", outcome.views_quiet)
    _, v50, _, v99, _, _ = summary(views)
    _, e50, _, e99, _, _ = summary(every)
    say(
        f"  end to end p50 {ms(e50)} ms / p99 {ms(e99)} ms against the views' p50 {ms(v50)} ms "
        f"/ p99 {ms(v99)} ms: the screens add {ms(e50 - v50)} ms at p50, {ms(e99 - v99)} ms at "
        f"p99 (aim: p99 under 1,000 ms end to end: {'met' if e99 < 1.0 else 'NOT met'})"
    )
    missed = delays.missed["board"] + delays.missed["station"]
    reopened = sum(len(s["opened"]) - 1 for s in outcome.streams)
    refused = sum(len(s["refused"]) for s in outcome.streams)
    failed = sum(len(s["errors"]) for s in outcome.streams)
    messages = sum(len(s["tiles"]) for s in outcome.streams)
    full = sum(1 for s in outcome.streams for t in s["tiles"] if t[3])
    say(
        f"  streams: {messages:,} tiles messages ({full:,} with every tile), "
        f"{sum(s['views'] for s in outcome.streams):,} views messages; reopened {reopened} "
        f"(closed as too far behind, or dropped), refused {refused}, failed {failed}; "
        f"pairs never delivered {missed}"
    )
    first = sorted(outcome.first_tiles_s)
    say(
        f"  a stream's first tiles (every tile) after opening: p50 {ms(pct(first, 50))} ms, "
        f"max {ms(first[-1] if first else float('nan'))} ms (100 opened at once)"
    )
    # Clocks: the recorded time is stamped before the commit, so "stored" - "recorded" must
    # be ≥ 0; a negative one would be the hub's clock ahead of the bench's.
    skew = min(stored) if stored else float("nan")
    say(
        f"  clocks: hub and bench on one machine (time.time()); stored - recorded is at least "
        f"{ms(skew)} ms (negative would show skew); the bench's poll every "
        f"{plan.poll_s * 1000:g} ms adds up to that to the baseline; the screens' process woke "
        f"late by {ms(outcome.lag_p99)} ms at p99 (max {ms(outcome.lag_max)} ms) of its own"
    )
    say(
        f"  the paced plant fell behind its schedule by {outcome.behind_s:.2f} s at most "
        f"(quiet stretch: {outcome.rate_quiet:.0f} events/s)"
    )
    quiet, loaded = outcome.quiet, outcome.loaded
    assert quiet is not None and loaded is not None
    ours = ["hub (ingest, API)", "views", "read workers", "other", "nats-server", *BENCH_ROLES]

    def others(usage: Usage) -> float:
        return usage.cpu_pct.get(MACHINE, 0.0) - sum(usage.cpu_pct.get(r, 0.0) for r in ours)

    if others(loaded) > 25:
        say(
            f"  NOTE: processes not this bench's used {others(loaded):.0f}% of a core while "
            f"the streams were measured (the machine: {loaded.cpu_pct.get(MACHINE, 0):.0f}% of "
            f"{cpus}00%); the read workers, at a lower CPU priority than theirs, lose to them"
        )
    say("\nCPU (% of one core, averaged) and RSS (MiB, mean / peak), by process:")
    say(
        f"  {'process':<26}{'CPU quiet':>10}{'CPU screens':>13}{'RSS quiet':>15}{'RSS screens':>15}"
    )

    def cpu_row(name: str, cpu_q: float, cpu_l: float, rss: tuple[float, ...] | None) -> None:
        memory = f"{rss[0]:>9.0f} /{rss[1]:>4.0f}{rss[2]:>9.0f} /{rss[3]:>4.0f}" if rss else ""
        say(f"  {name:<26}{cpu_q:>9.1f}%{cpu_l:>12.1f}%{memory}")

    hub_roles = ["hub (ingest, API)", "views", "read workers", "other"]
    for role in [*hub_roles, "nats-server", *BENCH_ROLES]:
        cpu_row(
            role + (" (mp tracker)" if role == "other" else ""),
            quiet.cpu_pct.get(role, 0.0),
            loaded.cpu_pct.get(role, 0.0),
            (quiet.rss_mean.get(role, 0.0), quiet.rss_peak.get(role, 0.0),
             loaded.rss_mean.get(role, 0.0), loaded.rss_peak.get(role, 0.0)),
        )  # fmt: skip
    cpu_row(
        "= hub, views, read workers",
        quiet.hub_cpu(),
        loaded.hub_cpu(),
        (quiet.hub_rss(), quiet.hub_rss(True), loaded.hub_rss(), loaded.hub_rss(True)),
    )
    cpu_row("(not this bench's)", others(quiet), others(loaded), None)
    cpu_row(
        "(the whole machine)", quiet.cpu_pct.get(MACHINE, 0), loaded.cpu_pct.get(MACHINE, 0), None
    )
    say(
        f"  the screens cost the hub {loaded.hub_cpu() - quiet.hub_cpu():+.1f}% of a core and "
        f"{loaded.hub_rss() - quiet.hub_rss():+.0f} MiB (quiet {quiet.seconds:.0f} s, screens "
        f"{loaded.seconds:.0f} s; the plant ran through both); load average at the end "
        + ", ".join(f"{v:.1f}" for v in os.getloadavg())
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--boards", type=int, default=50)
    parser.add_argument("--stations", type=int, default=50)
    parser.add_argument("--speed", type=float, default=30.0, help="simulated s per wall s")
    parser.add_argument("--history-h", type=float, help="history before the run (3; quick 0.5)")
    parser.add_argument("--measure-s", type=float, help="streams open, measured (60; quick 15)")
    parser.add_argument("--quiet-s", type=float, help="no stream open, measured (20; quick 5)")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="the bench's polling")
    parser.add_argument("--keep", type=Path, help="keep the hub's data dir and log here")
    args = parser.parse_args()
    quick = args.quick
    plan = Plan(
        machines=args.machines,
        boards=args.boards,
        stations=args.stations,
        speed=args.speed,
        history_h=args.history_h if args.history_h is not None else (0.5 if quick else 3.0),
        warmup_s=3.0 if quick else 8.0,
        quiet_s=args.quiet_s if args.quiet_s is not None else (5.0 if quick else 20.0),
        measure_s=args.measure_s if args.measure_s is not None else (15.0 if quick else 60.0),
        poll_s=args.poll_ms / 1000,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mes-hub-bench-ui-") as tmp:
        workdir = Path(tmp)
        try:
            try:
                outcome = asyncio.run(run(plan, workdir))
            except asyncio.CancelledError:  # (Ctrl-C: the run cleaned up after itself)
                raise KeyboardInterrupt from None
            report(outcome)
            rounds(outcome)
            round_costs(workdir, outcome, repeats=1 if quick else 3)
        finally:
            if args.keep is not None:
                shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
    say(f"\n(bench ran {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "screens":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(screens(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        try:
            main()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
