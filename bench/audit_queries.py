"""The auditors' queries on one machine with a year of history: p50/p99 of a state "as of" an
event time "as known at" a log position, and of an OEE diff ("as reported" against "as known
now", with the late events between), each against its plain counterpart in the same run.

1. Store: one simulated machine, 365 days (about 700,000 events: executions, part counts,
   conditions, orders, reasons), through the real ingest path minus NATS; then, recorded after
   it, late facts spread over the year (a reason and a buffered stop each week). Views (machine
   facts, audit log) caught up. Kept in --workdir and reused.
2. As of: the machine's state at a random moment of the year, as known at a random position
   before the late facts (``read_machine_as_of``: the record at that version, the timeline at
   that moment from the facts stored by then); baseline: the machine's plain timeline over the
   same day (``read_timeline``).
3. OEE diff: a random week by day, as known at a random position before the late facts
   (``read_oee_diff``); baseline: the plain OEE of that week by day (``read_oee``).

Latencies are of the read functions the API runs in its read pool (what a request costs the
hub), without HTTP.

    .venv/bin/python bench/audit_queries.py [--days 365] [--repeats 200]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.simulator import SimulatorConfig, factory_events  # noqa: E402
from contracts import CloudEvent, encode_event, nats_subject_for, validate_envelope  # noqa: E402
from hub.api.reads import ReadSources  # noqa: E402
from hub.api.routes.audit import read_machine_as_of, read_oee_diff  # noqa: E402
from hub.api.routes.oee import read_oee, read_timeline  # noqa: E402
from hub.bootstrap import open_views, projection_workers, read_sources  # noqa: E402
from hub.ingest import IncomingMessage, Ingestor  # noqa: E402
from hub.nats_auth import signature  # noqa: E402
from hub.settings import Settings, load_settings  # noqa: E402
from hub.store import EventStore  # noqa: E402
from projections.rules.calendar import Interval  # noqa: E402
from projections.rules.plant import PlantConfig  # noqa: E402

SITE, MACHINE = "default", "M0001"
START = datetime(2025, 9, 1, tzinfo=UTC)
KEY = bytes(range(32))  # signs the late facts' actor, as the hub's API would
LATE_MARK = "bench-late-facts"  # the meta row that says the late facts are stored


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


class Writer:
    """Stores events through the ingest path (no NATS), signed as the hub signs."""

    def __init__(self, store: EventStore) -> None:
        self.ingestor = Ingestor(store, "bench:audit", hub_key=KEY)
        self.seq = store.tracking_position("bench:audit")

    def store(self, events: list[CloudEvent]) -> int:
        messages = []
        for event in events:
            self.seq += 1
            body = encode_event(event)
            subject = nats_subject_for(SITE, validate_envelope(event))
            messages.append(IncomingMessage(subject, body, self.seq, signature(KEY, body)))
        batch = self.ingestor.prepare(messages)
        if batch.rejected:
            raise SystemExit(f"refused: {batch.rejected[0].reason}")
        self.ingestor.commit(batch)
        return len(messages)


def year(days: int) -> Iterator[CloudEvent]:
    config = SimulatorConfig(machines=1, seed=7, start=START, site=SITE)
    end = START + timedelta(days=days)
    # (The simulator's one machine is M0001.)
    return itertools.takewhile(lambda e: e.time < end, factory_events(config))


def late_facts(days: int) -> list[CloudEvent]:
    """Each week: a reason given for a stop a day later, and a stop the adapter had buffered."""
    found = []
    for week in range(days // 7):
        at = START + timedelta(days=7 * week + 3, hours=9)
        found.append(
            CloudEvent(
                specversion="1.0",
                id=f"late-reason-{week}",
                source="urn:bench:tablet",
                type="mes.operator.downtime_reason.v1",
                time=at + timedelta(days=1),
                subject=MACHINE,
                data={
                    "reason": "planned/maintenance",
                    "start": at.isoformat(),
                    "end": (at + timedelta(minutes=30)).isoformat(),
                    "operator": "op-1",
                },
                mesactorkind="key",
                mesactorid="key-0123456789abcdef",
                mesactorrole="operator",
            )
        )
        for n, (value, offset) in enumerate((("STOPPED", 0), ("ACTIVE", 20))):
            found.append(
                CloudEvent(
                    specversion="1.0",
                    id=f"late-exec-{week}-{n}",
                    source="urn:bench:adapter",
                    type="mes.machine.execution.v1",
                    time=at + timedelta(hours=3, minutes=offset),
                    subject=MACHINE,
                    data={"execution": value},
                )
            )
    return found


def build(settings: Settings, days: int) -> tuple[int, int]:
    """The store and its views; returns (the position before the late facts, the log's end)."""
    store = EventStore(settings)
    marker = settings.data_dir / LATE_MARK
    try:
        if marker.exists():
            before = int(marker.read_text())
            print(f"store: reusing {store.last_position():,} stored events in {settings.data_dir}")
        else:
            if store.last_position():
                raise SystemExit(f"{settings.data_dir} holds another store; remove it")
            writer, started, done = Writer(store), time.perf_counter(), 0
            batch: list[CloudEvent] = []
            for event in year(days):
                batch.append(event)
                if len(batch) == 2_000:
                    done += writer.store(batch)
                    batch.clear()
            done += writer.store(batch) if batch else 0
            before = store.last_position()
            late = late_facts(days)
            writer.store(late)
            marker.write_text(str(before))
            took = time.perf_counter() - started
            print(f"store: {done:,} events of one machine over {days} days, then {len(late)} "
                  f"late facts, stored in {took:.0f} s")  # fmt: skip
        views = open_views(settings)
        started = time.perf_counter()
        caught = 0
        for worker in projection_workers(settings, store, views):
            worker.prepare()
            caught += worker.catch_up()
        if caught:
            print(f"views: caught up ({caught:,} read) in {time.perf_counter() - started:.0f} s")
        views.close()
        return before, store.last_position()
    finally:
        store.close()


def timed(work: Callable[[], object], repeats: int) -> list[float]:
    spent = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        spent.append(time.perf_counter() - began)
    return spent


def show(label: str, spent: list[float], baseline: list[float], baseline_label: str) -> None:
    p50, p99 = statistics.median(spent), percentile(spent, 99)
    b50, b99 = statistics.median(baseline), percentile(baseline, 99)
    print(f"  {label}: p50 {ms(p50)}, p99 {ms(p99)}")
    print(f"  {baseline_label}: p50 {ms(b50)}, p99 {ms(b99)}")
    print(f"  ratio (p99): {p99 / b99:.1f}x the plain query")


def reported_at(settings: Settings, moment: datetime) -> int:
    """The log position when the facts up to ``moment`` had come in (this store was filled in
    event-time order, before its late facts): what the hub had reported of that moment."""
    views = open_views(settings)
    try:
        with views.transaction(write=False) as cursor:
            cursor.execute(
                "SELECT position FROM mes_view_audit_log WHERE event_time <= ? "
                "ORDER BY event_time DESC LIMIT 1",
                (int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6),),
            )
            row = cursor.fetchone()
        return int(row[0]) if row else 1
    finally:
        views.close()


def measure(settings: Settings, days: int, before: int, repeats: int) -> None:
    sources: ReadSources = read_sources(settings)
    plant = PlantConfig()
    rng = random.Random(11)
    last_day = START + timedelta(days=days - 8)

    def moment() -> datetime:
        return START + timedelta(
            seconds=rng.randrange(86400, int((last_day - START).total_seconds()))
        )

    # An auditor's questions: "what was the machine doing at t, as we knew it a shift later"
    # and "what did we report for that week, the day after it ended, against now".
    asked = []
    for _ in range(repeats):
        at = moment()
        asked.append((at, str(min(before, reported_at(settings, at + timedelta(hours=8))))))
    questions = iter(asked)
    print(f"as of an event time, as known a shift later ({repeats} random moments):")
    as_of = timed(
        lambda: read_machine_as_of(sources, SITE, plant, MACHINE, *next(questions)), repeats
    )
    days_asked = iter(at for at, _ in asked)

    def plain_timeline() -> bytes:
        at = next(days_asked)
        return read_timeline(sources, SITE, plant, MACHINE, Interval(at - timedelta(days=1), at))

    show("as of + known at", as_of, timed(plain_timeline, repeats), "plain one-day timeline")

    weeks = []
    for at, _ in asked[: repeats // 4]:
        week = Interval(at, at + timedelta(days=7))
        weeks.append((week, str(min(before, reported_at(settings, week.end + timedelta(days=1))))))
    print(f"OEE diff of a week by day, as reported the day after it ({len(weeks)} random weeks):")
    diffs, plains = iter(weeks), iter(weeks)
    diff = timed(lambda: _diff(sources, plant, *next(diffs)), len(weeks))
    plain = timed(
        lambda: read_oee(sources, SITE, plant, MACHINE, next(plains)[0], "day"), len(weeks)
    )
    show("oee/diff", diff, plain, "plain OEE of the week by day")


def _diff(sources: ReadSources, plant: PlantConfig, week: Interval, known_at: str) -> bytes:
    return read_oee_diff(sources, SITE, plant, MACHINE, week, "day", known_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mes-hub-bench-audit-year"
    )
    args = parser.parse_args()
    settings = load_settings(data_dir=args.workdir / f"days-{args.days}")
    before, end = build(settings, args.days)
    print(f"log: {end:,} positions; late facts after position {before:,}")
    measure(settings, args.days, before, args.repeats)


if __name__ == "__main__":
    main()
