"""Ingest benchmark: 1,000 simulated machines through a running hub, against a raw baseline.

Every run gets the same pre-generated workload on a fresh embedded nats-server:
- raw:      a bare consumer process that inserts the raw messages into SQLite in batches and
            acks, reading JetStream with nats-py's ``fetch()``;
- raw-pull: the same, reading with the hub's pull consumer (``hub.pull``), so the baseline gets
            whatever the hub's cheaper pull gets;
- hub:      ``mes-hub serve`` (validation, aggregates, event store, tracking, dedupe) on SQLite,
            its views kept by its views process.

Figures: sustained events/s from first publish to last stored, p50/p99 publish-to-stored latency
(stored = the consumer's committed position reached the message's stream sequence), peak RSS of
the consuming processes (the hub's with its views process), the ratios hub/raw and hub/raw-pull,
and for the hub how long after the last event was stored its views had read it too.

    .venv/bin/python bench/ingest.py [--events 200000] [--machines 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.simulator import SimulatorConfig, factory_events, past_start  # noqa: E402
from contracts import dedupe_key, encode_event, nats_subject_for, validate_envelope  # noqa: E402
from hub.ingest import tracking_name  # noqa: E402
from hub.nats import MSG_ID_HEADER, EmbeddedNatsServer, connect, ensure_streams  # noqa: E402
from hub.settings import load_settings  # noqa: E402


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float
    views_lag_s: float | None = None  # the hub's views: last event read minus last stored

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def workload(machines: int, events: int) -> list[tuple[str, bytes, str]]:
    # Dated in the past: the hub refuses events from the future ([hub] max_clock_skew_s).
    config = SimulatorConfig(machines=machines, seed=42, start=past_start(0, None))
    out = []
    for event in itertools.islice(factory_events(config), events):
        out.append(
            (
                nats_subject_for("default", validate_envelope(event)),
                encode_event(event),
                dedupe_key(event),
            )
        )
    return out


class PositionProbe:
    """Samples a consumer's committed position from its SQLite file, in a thread, and the
    resident memory of the consumer and its children."""

    def __init__(self, db: Path, query: str, process: psutil.Process) -> None:
        self.db, self.query, self.process = db, query, process
        self.times: list[float] = []
        self.positions: list[int] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        tick = 0
        while not self._stop.is_set():
            tick += 1
            if tick % 20 == 0:
                with contextlib.suppress(psutil.Error):
                    family = [self.process, *self.process.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in family)
                    self.peak_rss = max(self.peak_rss, rss)
            try:
                if connection is None:
                    connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
                row = connection.execute(self.query).fetchone()
            except sqlite3.Error:
                connection = None
                time.sleep(0.01)
                continue
            position = int(row[0] or 0) if row else 0
            if not self.positions or position > self.positions[-1]:
                self.times.append(time.perf_counter())
                self.positions.append(position)
            time.sleep(0.002)

    def stored_at(self, seq: int) -> float | None:
        index = bisect.bisect_left(self.positions, seq)
        return self.times[index] if index < len(self.positions) else None


async def drive(
    name: str,
    nats_url: str,
    items: list[tuple[str, bytes, str]],
    probe: PositionProbe,
    rate: float | None = None,
    timeout: float = 600,
) -> Result:
    """Publish ``items`` flat out (``rate`` None) or at ``rate`` events/s; wait until stored."""
    client = await connect(nats_url, name="bench-publisher")
    js = client.jetstream(publish_async_max_pending=8000)
    published_at: list[float] = []
    futures = []
    first = time.perf_counter()
    for n, (subject, body, message_id) in enumerate(items):
        if rate is not None and n % 20 == 0:
            wait = first + n / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        published_at.append(time.perf_counter())
        futures.append(await js.publish_async(subject, body, headers={MSG_ID_HEADER: message_id}))
    acks = await asyncio.gather(*futures)
    await client.close()
    sequences = [a.seq for a in acks]
    last_seq = max(sequences)
    deadline = time.perf_counter() + timeout
    while probe.stored_at(last_seq) is None:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: not all events stored within {timeout} s")
        await asyncio.sleep(0.05)
    latencies = sorted(
        (probe.stored_at(seq) or 0) - sent
        for seq, sent in zip(sequences, published_at, strict=True)
    )
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(
        name=name,
        events=len(items),
        seconds=(probe.stored_at(last_seq) or 0) - first,
        p50_ms=quantiles[49] * 1000,
        p99_ms=quantiles[98] * 1000,
        peak_rss_mb=probe.peak_rss / 2**20,
    )


async def measure(
    name: str,
    items: list[tuple[str, bytes, str]],
    workdir: Path,
    rate: float | None,
    command: Callable[[str, Path], list[str]],
    db: Path,
    position_query: str,
    views_lag: Callable[[Path], float] | None = None,
) -> Result:
    """Start a fresh nats-server and the consumer ``command``, then drive the workload."""
    workdir = Path(tempfile.mkdtemp(dir=workdir))
    with EmbeddedNatsServer(workdir / "nats") as nats_server:
        client = await connect(nats_server.url)
        await ensure_streams(client.jetstream(), load_settings())
        await client.close()
        process = subprocess.Popen(
            [sys.executable, *command(nats_server.url, workdir)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / f"{name}.log").open("w"),
            env={**os.environ, "MES_HUB_API_KEYS": "admin:bench-0123456789abcdef"},
        )
        try:
            while not (workdir / db).exists():
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # let it create its tables and subscribe
            probe = PositionProbe(workdir / db, position_query, psutil.Process(process.pid))
            probe.start()
            try:
                result = await drive(name, nats_server.url, items, probe, rate)
            finally:
                probe.stop()
            if views_lag is not None:
                stored_at = probe.stored_at(probe.positions[-1]) or time.perf_counter()
                result.views_lag_s = await asyncio.to_thread(views_lag, workdir) - stored_at
            return result
        finally:
            process.terminate()
            process.wait(30)


async def run_raw(
    items: list[tuple[str, bytes, str]],
    workdir: Path,
    rate: float | None = None,
    pull: str = "stock",
) -> Result:
    return await measure(
        "raw" if pull == "stock" else "raw-pull",
        items,
        workdir,
        rate,
        lambda url, directory: [__file__, "raw-consumer", url, str(directory / "raw.sqlite"), pull],
        Path("raw.sqlite"),
        "SELECT position FROM tracking",
    )


def views_read_everything(directory: Path, timeout: float = 600) -> float:
    """When the hub's views had read every stored event (polled; perf_counter time)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with contextlib.suppress(sqlite3.Error):
            with sqlite3.connect(f"file:{directory / 'events.sqlite'}?mode=ro", uri=True) as db:
                (stored,) = db.execute("SELECT MAX(rowid) FROM stored_events").fetchone()
            with sqlite3.connect(f"file:{directory / 'views.sqlite'}?mode=ro", uri=True) as db:
                (read,) = db.execute("SELECT MIN(position) FROM mes_view_tracking").fetchone()
            if stored and read is not None and read >= stored:
                return time.perf_counter()
        time.sleep(0.05)
    raise RuntimeError(f"the views did not read everything within {timeout} s")


async def run_hub(
    items: list[tuple[str, bytes, str]], workdir: Path, rate: float | None = None
) -> Result:
    return await measure(
        "hub",
        items,
        workdir,
        rate,
        lambda url, directory: [
            "-m",
            "hub",
            "serve",
            "--port",
            "0",
            "--nats-url",
            url,
            "--data-dir",
            str(directory),
        ],
        Path("events.sqlite"),  # under --data-dir
        f"SELECT notification_id FROM tracking WHERE application_name='{tracking_name(0, 1)}'",
        views_read_everything,
    )


async def raw_consumer(nats_url: str, db_path: str, pull: str) -> None:
    """The baseline: fetch a batch, insert the raw bytes in one transaction, ack."""
    from nats.js.api import AckPolicy, ConsumerConfig

    from hub.pull import PullConsumer

    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=20000")  # the same setting as the hub's store
    db.execute("CREATE TABLE IF NOT EXISTS raw (seq INTEGER PRIMARY KEY, subject TEXT, data BLOB)")
    db.execute("CREATE TABLE IF NOT EXISTS tracking (position INTEGER)")
    db.execute("INSERT INTO tracking VALUES (0)")
    db.commit()
    client = await connect(nats_url)
    js = client.jetstream()
    await js.add_consumer(
        "MES",
        ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.ALL, max_ack_pending=4000),
    )
    if pull == "stock":
        subscription = await js.pull_subscribe_bind("raw", stream="MES")
    else:
        consumer = PullConsumer(client, "MES", "raw", 1000)
        await consumer.start()

    async def fetch() -> list[tuple[int, str, bytes, Any]]:
        if pull != "stock":
            batch = await consumer.fetch(timeout=0.25)
            return [(d.stream_seq, d.message.subject, d.message.data, d.message) for d in batch]
        try:
            messages = await subscription.fetch(1000, timeout=0.25)
        except TimeoutError:
            return []
        return [(m.metadata.sequence.stream, m.subject, m.data, m) for m in messages]

    while True:
        got = await fetch()
        if not got:  # (the stock client can return an empty batch instead of timing out)
            continue
        with db:
            db.executemany("INSERT OR IGNORE INTO raw VALUES (?, ?, ?)", [g[:3] for g in got])
            db.execute("UPDATE tracking SET position = ?", (max(g[0] for g in got),))
        await got[-1][3].ack()  # ack-all, as the hub does


def print_results(title: str, raw: Result, raw_pull: Result, hub: Result) -> None:
    print(f"\n{title}")
    header = ("run", "events", "seconds", "events/s", "p50 ms", "p99 ms", "peak RSS MB")
    print(f"{header[0]:<9}" + "".join(f"{h:>12}" for h in header[1:]))
    for r in (raw, raw_pull, hub):
        print(
            f"{r.name:<9}{r.events:>12}{r.seconds:>12.2f}{r.rate:>12.0f}"
            f"{r.p50_ms:>12.1f}{r.p99_ms:>12.1f}{r.peak_rss_mb:>12.1f}"
        )
    print(f"ratio hub/raw (events/s): {hub.rate / raw.rate:.2f}")
    print(f"ratio hub/raw-pull (events/s): {hub.rate / raw_pull.rate:.2f}")
    if hub.views_lag_s is not None:
        print(f"hub views: every stored event read {hub.views_lag_s:.1f} s after the last stored")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000, help="burst run size")
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--paced-rate", type=float, default=2000, help="events/s, 0: skip")
    parser.add_argument("--paced-events", type=int, default=30_000)
    args = parser.parse_args()
    started = time.perf_counter()
    items = workload(args.machines, args.events)
    print(
        f"workload: {len(items)} events from {args.machines} simulated machines "
        f"(generated in {time.perf_counter() - started:.1f} s); {os.cpu_count()} CPUs; SQLite"
    )
    with tempfile.TemporaryDirectory(prefix="mes-hub-bench-") as tmp:
        workdir = Path(tmp)
        raw = await run_raw(items, workdir)
        raw_pull = await run_raw(items, workdir, pull="hub")
        hub = await run_hub(items, workdir)
        title = "Burst: everything published flat out (latency is mostly queueing)"
        print_results(title, raw, raw_pull, hub)
        if args.paced_rate:
            paced = items[: args.paced_events]
            raw_paced = await run_raw(paced, workdir, args.paced_rate)
            raw_pull_paced = await run_raw(paced, workdir, args.paced_rate, pull="hub")
            hub_paced = await run_hub(paced, workdir, args.paced_rate)
            print_results(
                f"Paced: {len(paced)} events at {args.paced_rate:.0f} events/s",
                raw_paced,
                raw_pull_paced,
                hub_paced,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw-consumer":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(raw_consumer(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        asyncio.run(main())
