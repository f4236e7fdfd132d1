"""Projection benchmark: rebuild the views from a store of 1,000,000 events, against a raw read.

1. Store: 1,000 simulated machines, plus one machine with 30 days of history (for the 30-day
   query), through the real ingest path minus NATS (validation, aggregates, event store).
   The store is kept in --workdir and reused by later runs with the same size.
2. Rebuild: every view from zero (``ProjectionWorker.rebuild``), and in the same run the raw
   read-and-decode of the same notification log (select + the library's mapper): events/s of
   both and the ratio.
3. Query: 30-day OEE for one machine grouped by shift (three shifts a day) from the view:
   p50/p99 over repeated queries; and, as the baseline, the same report from the machine's whole
   stored history (what the API did before the view).
4. Live: events stored at --live-rate events/s while the view follows the store (poll every
   --poll seconds, as ``mes-hub serve`` does): the delay from an event's commit in the store to
   its commit in the view, p50/p99/max.

    .venv/bin/python bench/projections.py [--events 1000000] [--machines 1000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.simulator import SimulatorConfig, factory_events, past_start  # noqa: E402
from contracts import CloudEvent, encode_event, nats_subject_for, validate_envelope  # noqa: E402
from hub.bootstrap import all_views, open_views, projection_workers  # noqa: E402
from hub.domain import machine_aggregate_id  # noqa: E402
from hub.ingest import IncomingMessage, Ingestor  # noqa: E402
from hub.settings import Settings, load_settings  # noqa: E402
from hub.store import EventStore  # noqa: E402
from projections.rules.calendar import Interval  # noqa: E402
from projections.rules.counters import counter_totals  # noqa: E402
from projections.rules.history import machine_facts  # noqa: E402
from projections.rules.plant import PlantConfig, ShiftConfig  # noqa: E402
from projections.rules.report import facts_window, report_from_facts, report_from_history  # noqa: E402
from projections.views.database import SQLiteViews  # noqa: E402
from projections.views.facts_view import FactsReader, MachineFactsView  # noqa: E402
from projections.views.orders_view import OrdersReader  # noqa: E402
from projections.views.runner import ProjectionWorker  # noqa: E402

START = datetime(2026, 9, 1, tzinfo=UTC)
LONG_SITE, LONG_MACHINE = "longrun", "M0001"
PLANT = PlantConfig(
    shifts=[
        ShiftConfig(
            name="early", start=clock(6), end=clock(14), breaks=[(clock(10), clock(10, 30))]
        ),
        ShiftConfig(name="late", start=clock(14), end=clock(22)),
        ShiftConfig(name="night", start=clock(22), end=clock(6)),
    ]
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


class Writer:
    """Stores simulated events through the ingest path (no NATS): validate, apply, commit."""

    def __init__(self, store: EventStore) -> None:
        self.ingestor = Ingestor(store, "bench:writer")
        self.seq = store.tracking_position("bench:writer")

    def store(self, events: list[tuple[str, CloudEvent]]) -> int:
        messages = []
        for site, event in events:
            self.seq += 1
            subject = nats_subject_for(site, validate_envelope(event))
            messages.append(IncomingMessage(subject, encode_event(event), self.seq))
        self.ingestor.commit(self.ingestor.prepare(messages))
        return len(messages)


def workload(machines: int, events: int) -> Iterator[tuple[str, CloudEvent]]:
    """``events`` (site, event) in all: one machine with 30 days at site ``longrun``, the rest
    from ``machines`` machines of the default site over the same stretch."""
    long_run = SimulatorConfig(machines=1, seed=5, start=START, site=LONG_SITE)
    end = START + timedelta(days=30)
    long_events = [
        (LONG_SITE, e)
        for e in itertools.takewhile(lambda e: e.time < end, factory_events(long_run))
    ]
    fleet = SimulatorConfig(machines=machines, seed=42, start=START)
    rest = itertools.islice(factory_events(fleet), max(0, events - len(long_events)))
    return itertools.chain(long_events, (("default", e) for e in rest))


def build_store(settings: Settings, machines: int, events: int) -> None:
    store = EventStore(settings)
    stored = store.last_position()
    if stored >= events:
        print(f"store: reusing {stored:,} stored events in {settings.data_dir}")
        store.close()
        return
    if stored:
        raise SystemExit(f"{settings.data_dir} holds a smaller store; remove it or pick another")
    writer = Writer(store)
    started, done = time.perf_counter(), 0
    batch: list[tuple[str, CloudEvent]] = []
    for event in workload(machines, events):
        batch.append(event)
        if len(batch) == 2_000:
            done += writer.store(batch)
            batch.clear()
            if done % 100_000 == 0:
                print(f"  stored {done:,} ({done / (time.perf_counter() - started):,.0f}/s)")
    if batch:
        done += writer.store(batch)
    print(
        f"store: {done:,} events stored in {time.perf_counter() - started:.0f} s "
        f"({store.last_position():,} notifications)"
    )
    store.close()


def raw_read(store: EventStore, batch: int) -> tuple[int, float]:
    """The baseline: read the whole notification log and decode every event, nothing else."""
    recorder, decode = store.application.recorder, store.application.mapper.to_domain_event
    position, count, started = 0, 0, time.perf_counter()
    while True:
        notifications = recorder.select_notifications(position, batch, inclusive_of_start=False)
        if not notifications:
            break
        for notification in notifications:
            decode(notification)
        count += len(notifications)
        position = notifications[-1].id
    return count, time.perf_counter() - started


def rebuild(settings: Settings, store: EventStore) -> tuple[int, float]:
    views = open_views(settings)
    started, read = time.perf_counter(), 0
    for worker in projection_workers(settings, store, views):
        read = max(read, worker.rebuild())
    seconds = time.perf_counter() - started
    views.close()
    return read, seconds


def query_latency(settings: Settings, store: EventStore, repeats: int) -> None:
    views = open_views(settings)
    reader = FactsReader(views)
    machine = machine_aggregate_id(LONG_SITE, LONG_MACHINE)
    window = Interval(START, START + timedelta(days=30))
    now = START + timedelta(days=31)
    from_orders_view = partial(OrdersReader(views).order_cycle_facts, LONG_SITE)
    from_aggregates = partial(store.order_cycle_facts, LONG_SITE)

    def from_view() -> int:
        facts = reader.window(machine, facts_window(window, PLANT))
        facts = facts.settle(PLANT.machine_rules(LONG_MACHINE))
        return len(report_from_facts(facts, from_orders_view, window, "shift", PLANT, now))

    def from_history() -> int:
        history = store.machine_history(LONG_SITE, LONG_MACHINE)
        return len(
            report_from_history(history, LONG_MACHINE, from_aggregates, window, "shift", PLANT, now)
        )

    history_events = len(store.machine_history(LONG_SITE, LONG_MACHINE))
    print(
        f"\n30-day OEE by shift for one machine ({history_events:,} stored events, "
        f"{from_view()} shift buckets)"
    )
    for name, query, runs in (("view", from_view, repeats), ("whole history", from_history, 5)):
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            query()
            timings.append(time.perf_counter() - started)
        print(
            f"  {name:<14} runs {runs:>3}  p50 {ms(percentile(timings, 50)):>10}  "
            f"p99 {ms(percentile(timings, 99)):>10}  max {ms(max(timings)):>10}"
        )
    # The machine's counters (GET /api/v1/machines/{id}): a fresh reader folds every reading;
    # a reader that has read them folds only what came since (here: nothing), the baseline
    # being the whole-history fold on reading objects.
    limit = PLANT.max_parts_per_reading
    cold = FactsReader(views)
    started = time.perf_counter()
    totals = cold.counter_totals(machine, limit)
    first = time.perf_counter() - started
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        cold.counter_totals(machine, limit)
        warm.append(time.perf_counter() - started)
    started = time.perf_counter()
    readings = machine_facts(store.machine_history(LONG_SITE, LONG_MACHINE)).readings
    assert counter_totals(readings, limit).produced == totals.produced
    baseline = time.perf_counter() - started
    print(
        f"machine counters ({len(readings):,} readings, {totals.produced:,} parts): first read "
        f"{ms(first)}, then p50 {ms(percentile(warm, 50))}; from the whole history {ms(baseline)}"
    )
    views.close()


def live_delay(settings: Settings, rate: float, seconds: float, poll: float) -> None:
    """Store events at ``rate``/s in batches every 50 ms while a worker follows the store."""
    store = EventStore(settings)
    views = SQLiteViews(settings.data_dir / "live-views.sqlite")
    worker = ProjectionWorker([MachineFactsView()], store, views, settings.projection_batch)
    worker.prepare()
    worker.catch_up()
    seen: list[tuple[int, float]] = []  # (position, time the view committed it)
    stop = threading.Event()

    def follow() -> None:
        while not stop.is_set():
            if worker.step():
                seen.append((worker.position, time.perf_counter()))
            else:
                time.sleep(poll)

    follower = threading.Thread(target=follow)
    follower.start()
    writer = Writer(store)
    # A new stretch of production each run (another start), so nothing is a duplicate.
    later = SimulatorConfig(machines=200, seed=9, start=past_start(0, None))  # never the future
    events = factory_events(later)
    committed: list[tuple[int, float, int]] = []  # (last position, commit time, events)
    tick, started = 0.05, time.perf_counter()
    per_tick = max(1, round(rate * tick))
    while time.perf_counter() - started < seconds:
        batch = [("default", e) for e in itertools.islice(events, per_tick)]
        writer.store(batch)
        committed.append((store.last_position(), time.perf_counter(), len(batch)))
        time.sleep(max(0.0, started + len(committed) * tick - time.perf_counter()))
    deadline = time.perf_counter() + 30
    while worker.position < committed[-1][0] and time.perf_counter() < deadline:
        time.sleep(0.01)
    stop.set()
    follower.join()
    delays = []
    for position, stored_at, count in committed:
        shown_at = next(t for p, t in seen if p >= position)
        delays.extend([shown_at - stored_at] * count)
    achieved = sum(c for _, _, c in committed) / (committed[-1][1] - started)
    print(
        f"\nLive: {achieved:,.0f} events/s stored for {seconds:.0f} s, view polling every "
        f"{poll * 1000:.0f} ms: store -> view delay p50 {ms(percentile(delays, 50))}, "
        f"p99 {ms(percentile(delays, 99))}, max {ms(max(delays))}"
    )
    views.close()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--queries", type=int, default=100, help="30-day queries to time")
    parser.add_argument("--live-rate", type=float, default=1000.0)
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--poll", type=float, default=0.1, help="view poll interval, seconds")
    parser.add_argument("--only-live", action="store_true", help="skip rebuild and queries")
    args = parser.parse_args()
    data_dir = args.workdir / f"mes-hub-bench-projections-{args.events}"
    settings = load_settings(data_dir=data_dir)
    print(f"{os.cpu_count()} CPUs; SQLite; data in {data_dir}")
    build_store(settings, args.machines, args.events)

    if args.only_live:
        live_delay(settings, args.live_rate, args.live_seconds, args.poll)
        return
    store = EventStore(settings)
    count, raw_seconds = raw_read(store, settings.projection_batch)
    read, rebuild_seconds = rebuild(settings, store)
    raw_rate, rebuild_rate = count / raw_seconds, read / rebuild_seconds
    print(f"\nFull rebuild of {', '.join(v.name for v in all_views())} vs raw read-and-decode")
    row = "  {:<16}{:>10,} events {:>7.1f} s {:>10,.0f} events/s"
    print(row.format("raw read+decode", count, raw_seconds, raw_rate))
    print(row.format("rebuild", read, rebuild_seconds, rebuild_rate))
    print(f"  ratio rebuild/raw: {rebuild_rate / raw_rate:.2f}; peak RSS {peak_rss_mb():.0f} MB")
    query_latency(settings, store, args.queries)
    store.close()
    live_delay(settings, args.live_rate, args.live_seconds, args.poll)


if __name__ == "__main__":
    main()
