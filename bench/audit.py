"""Audit benchmark: the Merkle sealer, verify and proofs over a store of N events (SQLite).

Sections, in one run over the same store (each prints its figures, none asserts):
- store:    N events written fast (many machines per ``EventStore.commit``), or reused;
- seal:     sealing rate alone (events/s added to the tree, leaves and nodes stored, checkpoints
            signed), over the first half of the log;
- ingest:   the ingest rate without the sealer, then with the sealer running in the same process
            (as ``serve`` runs it) on the rest of the log, and the sealing rate meanwhile;
- verify:   ``audit verify`` (records read, leaves recomputed and compared, checkpoints checked)
            against a raw read of the log (``select_notifications`` only): events/s and ratio;
- proofs:   inclusion proofs (generation from stored subtrees, the whole evidence bundle,
            verification) and consistency proofs per second, and their sizes;
- queries:  the auditors' questions on one machine with a year of history (a store of its
            own): p50/p99 of a state as of a moment and of an OEE diff, against their plain
            counterparts (``bench/audit_queries.py``).

Tessera (Trillian's successor) publishes about 2,900 integrated writes/s on one node; the
sealing rates are compared with that.

    .venv/bin/python bench/audit.py [--events 1000000] [--data-dir DIR]

To add a section: a function ``(bench: Bench) -> None`` that prints its figures, appended to
``SECTIONS``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eventsourcing.persistence import Tracking  # noqa: E402

from audit.bundle import check_bundle  # noqa: E402
from audit.merkle import (  # noqa: E402
    consistency_proof_from,
    inclusion_proof_from,
    verify_consistency,
    verify_inclusion,
)
from audit.note import NoteVerifier  # noqa: E402
from hub.domain import Machine, Origin  # noqa: E402
from hub.sealer import AuditLog, Sealer, audit_verifier, sealer_of  # noqa: E402
from hub.settings import Settings, load_settings  # noqa: E402
from hub.store import EventStore  # noqa: E402

TESSERA_PER_S = 2_900
MACHINES = 1_000  # aggregates per commit: how the project fills stores fast
START = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Bench:
    settings: Settings
    store: EventStore
    events: int
    ingest_events: int
    proofs: int
    sealer: Sealer | None = None
    figures: dict[str, float] = field(default_factory=dict)

    def audit_log(self) -> AuditLog:
        return AuditLog(self.store)

    def verifier(self) -> NoteVerifier:
        found = audit_verifier(self.settings)
        assert found is not None
        return found


def rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "n/a"


class Writer:
    """Commits availability reports of ``MACHINES`` machines, a commit each round."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.fleet = [
            store.machine("default", f"B{n}") or Machine(site="default", machine_id=f"B{n}")
            for n in range(MACHINES)
        ]
        self.seq = store.tracking_position("bench:audit")
        self.count = store.last_position()

    def write(self, events: int) -> int:
        written = 0
        while written < events:
            touched = self.fleet[: min(MACHINES, events - written)]
            for machine in touched:
                self.count += 1
                at = START + timedelta(seconds=self.count)
                origin = Origin(f"b{self.count}", "urn:bench", at)
                machine.report_availability(
                    origin, "AVAILABLE" if self.count % 7 else "UNAVAILABLE"
                )
            self.seq += 1
            self.store.commit(touched, Tracking("bench:audit", self.seq), [], [])
            written += len(touched)
        return written


# --- sections ------------------------------------------------------------------------------------


def build_store(bench: Bench) -> None:
    stored = bench.store.last_position()
    if stored >= bench.events:
        print(f"store: reusing {stored:,} stored events in {bench.settings.data_dir}")
        return
    writer = Writer(bench.store)
    started = time.perf_counter()
    while (left := bench.events - bench.store.last_position()) > 0:
        writer.write(min(left, 100_000))
        print(f"  stored {bench.store.last_position():,}", flush=True)
    seconds = time.perf_counter() - started
    print(f"store: {bench.store.last_position():,} events in {seconds:.0f} s")


def seal_alone(bench: Bench) -> None:
    sealer = sealer_of(bench.settings, bench.store)
    sealer.prepare()
    bench.sealer = sealer
    target = bench.store.last_position() // 2
    before = sealer.size
    started = time.perf_counter()
    while sealer.position < target and sealer.seal_batch():
        pass
    seconds = time.perf_counter() - started
    sealed = sealer.size - before
    bench.figures["seal_alone"] = sealed / seconds if seconds else 0.0
    print(
        f"seal alone: {sealed:,} events in {seconds:.1f} s = {rate(sealed, seconds)} "
        f"({bench.figures['seal_alone'] / TESSERA_PER_S:.1f}x Tessera's {TESSERA_PER_S:,}/s)"
    )


class SealerThread:
    """``Sealer.run`` as ``serve`` runs it (its pacing included), on an event loop in a thread of
    the writer's process."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="sealer")

    def _run(self) -> None:
        self._loop.run_until_complete(self.sealer.run(self._stop))

    def __enter__(self) -> SealerThread:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._loop.close()


def ingest_with_and_without_sealer(bench: Bench) -> None:
    assert bench.sealer is not None
    sealer, writer, count = bench.sealer, Writer(bench.store), bench.ingest_events

    def timed_write() -> float:
        started = time.perf_counter()
        writer.write(count)
        return time.perf_counter() - started

    alone = [timed_write()]

    # 1. The sealer catching up a backlog (half the log) while ingest writes.
    sealed_before = sealer.size
    with SealerThread(sealer):
        backlog = timed_write()
        sealed_during = bench.audit_log().sealed_size() - sealed_before
    bench.figures["seal_with_ingest"] = sealed_during / backlog
    caught_up = sealer.catch_up()

    # 2. The sealer following the log (nothing left to catch up) while ingest writes.
    with SealerThread(sealer):
        following = timed_write()
        behind = bench.store.last_position() - bench.audit_log().sealed_size()
        started = time.perf_counter()
        while bench.audit_log().sealed_size() < bench.store.last_position():
            time.sleep(0.01)
        lag = time.perf_counter() - started
    alone.append(timed_write())
    sealer.catch_up()

    without = statistics.mean(alone)
    print(f"ingest without the sealer: {count:,} events = {rate(count, without)} (mean of 2)")
    print(
        f"ingest while the sealer catches up a backlog: {rate(count, backlog)} "
        f"({without / backlog:.2f} of the rate without); sealing meanwhile "
        f"{sealed_during:,} events = {rate(sealed_during, backlog)} "
        f"({sealed_during / backlog / TESSERA_PER_S:.1f}x Tessera's {TESSERA_PER_S:,}/s); "
        f"{caught_up:,} left after"
    )
    print(
        f"ingest while the sealer follows the log: {rate(count, following)} "
        f"({without / following:.2f} of the rate without); the sealer was {behind:,} events "
        f"behind at the end, sealed {lag:.2f} s later"
    )


def verify_against_raw_read(bench: Bench) -> None:
    recorder = bench.store.application.recorder
    started, after, read = time.perf_counter(), 0, 0
    while batch := recorder.select_notifications(after, 5_000, inclusive_of_start=False):
        read += len(batch)
        after = batch[-1].id
    raw = time.perf_counter() - started
    print(f"raw read of the log: {read:,} events = {rate(read, raw)}")
    started = time.perf_counter()
    report = bench.audit_log().verify(bench.verifier())
    checked = time.perf_counter() - started
    assert report.ok, report.problems  # (a wrong figure would be worse than none)
    print(
        f"audit verify: {report.records:,} events, {report.checkpoints} checkpoints = "
        f"{rate(report.records, checked)} (ratio to the raw read {raw / checked:.2f})"
    )


def proofs(bench: Bench) -> None:
    audit_log, verifier = bench.audit_log(), bench.verifier()
    latest = audit_log.checkpoint()
    size = latest.size
    rng = random.Random(9162)
    indexes = [rng.randrange(size) for _ in range(bench.proofs)]

    started = time.perf_counter()
    made = [
        audit_log._proof(lambda source, i=i: inclusion_proof_from(source, i, size)) for i in indexes
    ]
    generation = time.perf_counter() - started
    stored = audit_log._stored_leaves  # the leaf hashes, to verify against
    leaves = {i: stored(i, i + 1)[i][1] for i in indexes[:200]}
    started = time.perf_counter()
    repeats = max(1, bench.proofs // len(leaves))
    for _ in range(repeats):
        for i, proof in zip(indexes, made, strict=False):
            if i in leaves:
                verify_inclusion(leaves[i], i, size, proof, latest.root)
    verification = time.perf_counter() - started
    sizes = [32 * len(p) for p in made]
    print(
        f"inclusion proofs at size {size:,}: generation {rate(len(made), generation)}, "
        f"verification {rate(repeats * len(leaves), verification)}, "
        f"{statistics.mean(sizes):.0f} bytes on average ({max(sizes)} at most)"
    )

    positions = [stored(i, i + 1)[i][0] for i in indexes[:200]]
    key = verifier.key_string()
    started = time.perf_counter()
    bundles = [audit_log.evidence(p, key) for p in positions]
    evidence = time.perf_counter() - started
    started = time.perf_counter()
    for bundle in bundles:
        check_bundle(bundle, verifier)
    checking = time.perf_counter() - started
    size_json = statistics.mean(len(json.dumps(b)) for b in bundles)
    print(
        f"evidence bundles (record read, proof made and checked): {rate(len(bundles), evidence)}; "
        f"checked offline (signature, leaf, proof): {rate(len(bundles), checking)}; "
        f"{size_json:,.0f} bytes of JSON on average"
    )

    sizes_signed = [c.size for c in audit_log.all_checkpoints()]
    pairs = [tuple(sorted(rng.sample(sizes_signed, 2))) for _ in range(min(bench.proofs, 500))]
    started = time.perf_counter()
    consistency = [
        audit_log._proof(lambda source, a=a, b=b: consistency_proof_from(source, a, b))
        for a, b in pairs
    ]
    generation = time.perf_counter() - started
    roots = {c.size: c.root for c in audit_log.all_checkpoints()}
    started = time.perf_counter()
    for (a, b), proof in zip(pairs, consistency, strict=True):
        verify_consistency(a, b, proof, roots[a], roots[b])
    verification = time.perf_counter() - started
    print(
        f"consistency proofs between {len(sizes_signed)} checkpoints: generation "
        f"{rate(len(pairs), generation)}, verification {rate(len(pairs), verification)}, "
        f"{statistics.mean(32 * len(p) for p in consistency):.0f} bytes on average"
    )


def auditors_queries(bench: Bench) -> None:
    """The p99 of a state as of a moment and of an OEE diff, on one machine with a year of
    history in a store of its own (``bench/audit_queries.py``, kept beside this one's)."""
    import audit_queries

    settings = load_settings(data_dir=bench.settings.data_dir.parent / "one-machine-a-year")
    before, end = audit_queries.build(settings, 365)
    print(f"one machine, a year: {end:,} positions; late facts after position {before:,}")
    audit_queries.measure(settings, 365, before, 200)


Section = Callable[[Bench], None]
SECTIONS: list[tuple[str, Section]] = [
    ("store", build_store),
    ("seal", seal_alone),
    ("ingest", ingest_with_and_without_sealer),
    ("verify", verify_against_raw_read),
    ("proofs", proofs),
    ("queries", auditors_queries),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--ingest-events", type=int, default=None, help="default: events / 10")
    parser.add_argument("--proofs", type=int, default=2_000)
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a store here")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections: " + ", ".join(n for n, _ in SECTIONS),
    )
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="mes-hub-bench-audit-"))
    settings = load_settings(data_dir=data_dir)
    store = EventStore(settings)
    bench = Bench(
        settings, store, args.events, args.ingest_events or max(args.events // 10, 1), args.proofs
    )
    chosen = set(args.only.split(",")) if args.only else None
    try:
        for name, section in SECTIONS:
            # (The store is always built; the others need the tree the seal section starts.)
            if chosen is None or name in chosen or name in ("store", "seal"):
                section(bench)
    finally:
        store.close()
    print(f"(store in {data_dir})")


if __name__ == "__main__":
    main()
