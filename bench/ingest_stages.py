"""Where ingest's CPU goes, per event and per stage, while ``mes-hub serve`` takes a burst.

A burst of simulated events is published to a fresh nats-server first; then ``mes-hub serve``
(from ``--repo``, so an older checkout can be measured the same way) ingests it. For 8 s of
that, py-spy samples the ingest process while its CPU time and its stored position are read:
CPU per event is measured, and split between the stages in proportion to py-spy's samples
(threads waiting are left out). The views process, when there is one, is measured as a whole.

    .venv/bin/python bench/ingest_stages.py [--repo DIR] [--events 200000]

Needs py-spy (in the dev extra) and permission to trace a child process (ptrace).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import workload  # noqa: E402
from hub.nats import MSG_ID_HEADER, EmbeddedNatsServer, connect, ensure_streams  # noqa: E402
from hub.settings import load_settings  # noqa: E402

# A sample belongs to the first stage one of whose frames it passes through.
STAGES = [
    ("pull: NATS client, fetch", ("Client._read_loop", "Subscription._wait_for_msgs",
                                  "PullSubscription.fetch", "IngestPartition._consume",
                                  "IngestPartition.run", "Client._flusher")),
    ("validate: decode, subject, time", ("decode_event", "check_subject", "check_event_time",
                                         "targets (", "dedupe_key")),
    ("dedupe: received lookup", ("received_events",)),
    ("apply: aggregates", ("Ingestor._apply", "Ingestor._aggregate", "_find_new_aggregates")),
    ("encode: events to rows", ("to_stored_event", "EventStore.seal")),
    ("write: SQL insert, commit", ("insert_events", "SQLiteDatastore.transaction")),
    ("views, in the ingest process", ("ProjectionWorker",)),
]  # fmt: skip
WAITING = {"_do_waitpid (unix_events.py)", "select (selectors.py)", "wait (threading.py)",
           "_worker (thread.py)", "sleep (tasks.py)"}  # fmt: skip


def _short(frame: str) -> str:
    """``name (path/file.py:12)`` as ``name (file.py)``; a method's class is dropped."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name = match.group(1).rsplit(".", 1)[-1]
    return f"{name} ({match.group(2).rsplit('/', 1)[-1]})"


def split(profile: Path, cpu_us: float) -> dict[str, float]:
    samples: collections.Counter[str] = collections.Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if _short(frames[-1]) in WAITING:
            continue
        stage = next((name for name, keys in STAGES if any(k in stack for k in keys)), "other")
        samples[stage] += int(count)
    total = sum(samples.values()) or 1
    names = [name for name, _ in STAGES] + ["other"]
    return {name: samples[name] / total * cpu_us for name in names}


def stored_position(data_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{data_dir / 'events.sqlite'}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT notification_id FROM tracking WHERE application_name LIKE "
                "'nats:MES:ingest%'"
            ).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


async def publish(url: str, events: int) -> None:
    client = await connect(url)
    js = client.jetstream(publish_async_max_pending=8000)
    await ensure_streams(js, load_settings())
    futures = [
        await js.publish_async(subject, body, headers={MSG_ID_HEADER: key})
        for subject, body, key in workload(1000, events)
    ]
    await asyncio.gather(*futures)
    await client.close()


def measure(repo: Path, events: int, seconds: float, py_spy: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mes-hub-stages-"))
    with EmbeddedNatsServer(workdir / "nats") as nats_server:
        asyncio.run(publish(nats_server.url, events))
        hub = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--port", "0", "--nats-url",
             nats_server.url, "--data-dir", str(workdir)],
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "hub.log").open("w"),
            env={**os.environ, "PYTHONPATH": str(repo),
                 "MES_HUB_API_KEYS": "admin:bench-0123456789abcdef"},
        )  # fmt: skip
        try:
            process = psutil.Process(hub.pid)
            while stored_position(workdir) < 5_000:  # past start-up
                time.sleep(0.1)

            def cpu(p: psutil.Process) -> float:
                return sum(p.cpu_times()[:2])

            first, cpu_first = stored_position(workdir), cpu(process)
            children_first = {c.pid: cpu(c) for c in process.children()}
            started = time.perf_counter()
            profile = workdir / "ingest.prof"
            subprocess.run(
                [py_spy, "record", "-p", str(hub.pid), "-d", str(int(seconds)), "-f", "raw",
                 "-o", str(profile), "-r", "250"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            stored = stored_position(workdir) - first
            elapsed = time.perf_counter() - started
            ingest_us = (cpu(process) - cpu_first) / stored * 1e6
            children = process.children()
            views_us = sum(cpu(c) - children_first.get(c.pid, 0) for c in children) / stored * 1e6
        finally:
            hub.terminate()
            hub.wait(30)
    print(f"{repo}: {stored:,} events stored in {elapsed:.1f} s ({stored / elapsed:,.0f}/s)")
    print(f"  ingest process CPU: {ingest_us:6.1f} us/event")
    for stage, us in split(profile, ingest_us).items():
        print(f"    {stage:<32} {us:6.1f}")
    print(f"  views process CPU:  {views_us:6.1f} us/event")
    shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose hub is measured")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: install the dev extra (pip install -e '.[dev]')")
    measure(args.repo.resolve(), args.events, args.seconds, py_spy)


if __name__ == "__main__":
    main()
