"""ERP confirmations benchmark: production confirmations through the hub's outbox to a loopback
REST ERP, against bare HTTP POSTs to the same ERP, in one run.

- baseline: 10,000 confirmation bodies POSTed with httpx straight to the stand-in, 8 at a time
  (as many as the outbox sends at once);
- hub:      ``mes-hub serve`` (SQLite, its views process) with one ``[[erp]]`` entry of the
  ``rest`` dialect; 10,000 orders released, started, counted and ended on 100 machines, flat
  out. Each ended order is a confirmation the hub decides, stores, delivers and records.
- paced:    the same at 100 orders ending per second.

Figures: confirmations/s (from the first order ended, once the hub has taken in the orders'
releases, starts and counts, to the last confirmation the ERP took),
the ratio hub/baseline, and the delay from an order's end (its ``order_ended`` event published
and acked by NATS) to the ERP taking its confirmation, p50/p99.

    .venv/bin/python bench/erp.py [--orders 10000] [--paced-orders 3000] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts import (  # noqa: E402
    CloudEvent,
    dedupe_key,
    encode_event,
    nats_subject_for,
    validate_envelope,
)
from hub.bootstrap import CONFIRMATIONS_SINCE, open_views, view_positions  # noqa: E402
from hub.nats import MSG_ID_HEADER, EmbeddedNatsServer, connect, ensure_streams  # noqa: E402
from hub.settings import load_settings  # noqa: E402
from hub.store import EventStore  # noqa: E402

MACHINES = 100
TOKEN = "bench-erp-token-0123456789"
START = datetime(2026, 1, 5, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the ERP stand-in (its own process) ---------------------------------------------------------


def standin(port: int, log_path: str) -> None:
    """A REST ERP taking confirmations: 201, or 409 for a key it has; logs when it took each."""
    import uvicorn

    app = FastAPI()
    seen: set[str] = set()
    log = Path(log_path).open("a", buffering=1)  # noqa: SIM115 (open while the stand-in runs)

    @app.post("/confirmations")
    async def confirm(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return Response(status_code=401)
        key = request.headers.get("idempotency-key", "")
        body = await request.json()
        if key in seen:  # as an API with idempotency keys answers a repeat: naming the key
            return Response(status_code=409, headers={"Idempotency-Key": key})
        seen.add(key)
        log.write(f"{time.time()} {body.get('order_id')} {key}\n")
        return Response('{"ok": true}', status_code=201, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_standin(workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port, log_path = free_port(), workdir / "erp-took.log"
    process = subprocess.Popen(
        [sys.executable, __file__, "standin", str(port), str(log_path)], cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return process, url, log_path
        time.sleep(0.05)
    raise RuntimeError("the ERP stand-in did not start")


def took(log_path: Path) -> dict[str, float]:
    """When the stand-in took each order's first confirmation (wall clock)."""
    found: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        at, order_id, _ = line.split()
        found.setdefault(order_id, float(at))
    return found


# --- the workload ---------------------------------------------------------------------------------


def event(type_: str, subject: str, data: dict[str, Any], at: datetime, n: int) -> CloudEvent:
    return CloudEvent(
        specversion="1.0", id=f"bench-{n}", source="urn:bench", type=type_, time=at,
        subject=subject, data=data,
    )  # fmt: skip


def orders(count: int, first: int = 0) -> list[tuple[str, list[CloudEvent], CloudEvent]]:
    """Per order: its release, start and count, and (apart) its end. Each machine runs its
    orders one after another, a minute each."""
    made = []
    for k in range(first, first + count):
        machine, slot = f"M{k % MACHINES}", k // MACHINES
        start = START + timedelta(minutes=2 * slot)
        order_id = f"SO-{k}"
        release = {"order_id": order_id, "part_number": "P-1", "quantity": 5,
                   "due": (START + timedelta(days=30)).isoformat()}  # fmt: skip
        n = 5 * k
        before = [
            event("mes.erp.order.released.v1", order_id, release, start - timedelta(hours=1), n),
            event("mes.operator.order_started.v1", machine, {"order_id": order_id}, start, n + 1),
            event("mes.machine.partcount.v1", machine, {"count": 5 * slot, "kind": "all"},
                  start, n + 2),
            event("mes.machine.partcount.v1", machine, {"count": 5 * (slot + 1), "kind": "all"},
                  start + timedelta(seconds=50), n + 3),
        ]  # fmt: skip
        end = event(
            "mes.operator.order_ended.v1", machine, {"order_id": order_id},
            start + timedelta(minutes=1), n + 4,
        )  # fmt: skip
        made.append((order_id, before, end))
    return made


async def publish(js: Any, events: list[CloudEvent]) -> None:
    futures = []
    for e in events:
        subject = nats_subject_for("default", validate_envelope(e))
        futures.append(
            await js.publish_async(subject, encode_event(e), headers={MSG_ID_HEADER: dedupe_key(e)})
        )
    await asyncio.gather(*futures)


async def run_hub(
    name: str, workload: list[Any], workdir: Path, erp_url: str, log_path: Path, rate: float
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(dir=workdir))
    log_path.write_text("")
    config = workdir / "mes-hub.toml"
    config.write_text(
        '[[erp]]\nname = "bench-erp"\ndialect = "rest"\n'
        f'url = "{erp_url}"\nsecret = {{ env = "BENCH_ERP_TOKEN" }}\nallow = ["127.0.0.1"]\n'
        'poll_interval_s = 0\nconfirm_path = "/confirmations"\n'
    )
    data_dir = workdir / "hub"
    data_dir.mkdir()
    # Confirm the runs of the workload, dated before this hub first ran.
    (data_dir / CONFIRMATIONS_SINCE).write_text((START - timedelta(days=1)).isoformat())
    with EmbeddedNatsServer(workdir / "nats") as nats_server:
        client = await connect(nats_server.url)
        await ensure_streams(client.jetstream(), load_settings())
        hub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hub",
                "serve",
                "--port",
                "0",
                "--config",
                str(config),
                "--nats-url",
                nats_server.url,
                "--data-dir",
                str(data_dir),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "hub.log").open("w"),
            env={
                **_clean_env(),
                "BENCH_ERP_TOKEN": TOKEN,
                "MES_HUB_API_KEYS": "admin:bench-0123456789abcdef",
            },
        )
        try:
            await asyncio.sleep(4.0)  # up, its views process too
            js = client.jetstream(publish_async_max_pending=8000)
            before = [e for _, before, _ in workload for e in before]
            await publish(js, before)
            # The orders were released, started and counted before they end: the clock starts
            # once the hub has stored and projected all that (it measures confirmations, not
            # the ingest of the orders' lives, which bench/ingest.py measures).
            await asyncio.to_thread(wait_taken_in, data_dir, len(before))
            ended_at: dict[str, float] = {}
            first = time.time()
            for n, (order_id, _, end) in enumerate(workload):
                if rate:
                    wait = first + n / rate - time.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await publish(js, [end])
                ended_at[order_id] = time.time()
            deadline = time.time() + 900
            while len(taken := took(log_path)) < len(workload):
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: {len(taken)} of {len(workload)} confirmed")
                await asyncio.sleep(0.2)
        finally:
            hub.terminate()
            hub.wait(60)
            await client.close()
    delays = sorted(taken[o] - ended_at[o] for o in ended_at)
    quantiles = statistics.quantiles(delays, n=100)
    return {
        "name": name,
        "count": len(workload),
        "seconds": max(taken.values()) - first,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
    }


def wait_taken_in(data_dir: Path, events: int, timeout: float = 300.0) -> None:
    """Until the hub in ``data_dir`` has stored ``events`` and its views have read them all."""
    settings = load_settings(data_dir=data_dir)
    store, views = EventStore(settings), open_views(settings)
    try:
        deadline = time.time() + timeout
        while (end := store.last_position()) < events or min(view_positions(views).values()) < end:
            if time.time() > deadline:
                raise RuntimeError(f"the hub took in {end} of {events} events")
            time.sleep(0.1)
    finally:
        views.close()
        store.close()


async def run_baseline(
    count: int, erp_url: str, log_path: Path, parallel: int = 8
) -> dict[str, Any]:
    log_path.write_text("")
    bodies = [
        {
            "order_id": f"SO-{k}",
            "sequence": 1,
            "yield_quantity": 5,
            "scrap_quantity": 0,
            "final": True,
            "machine_id": f"M{k % MACHINES}",
        }
        for k in range(count)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(count):
        queue.put_nowait(k)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            k = queue.get_nowait()
            key = f"baseline-{k}"
            answer = await http.post(
                "/confirmations", json=bodies[k], headers={**headers, "Idempotency-Key": key}
            )
            answer.raise_for_status()

    first = time.time()
    async with httpx.AsyncClient(base_url=erp_url) as http:
        await asyncio.gather(*(worker(http) for _ in range(parallel)))
    return {"name": "baseline", "count": count, "seconds": time.time() - first}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}


def show(run: dict[str, Any]) -> str:
    rate = run["count"] / run["seconds"]
    delay = (
        f", delay from order end to ERP p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms"
        if "p50_ms" in run
        else ""
    )
    return f"{run['name']:<9}{run['count']:>7} in {run['seconds']:6.2f} s = {rate:7.0f}/s{delay}"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--paced-orders", type=int, default=3_000)
    parser.add_argument("--rate", type=float, default=100.0, help="paced: orders ending per s")
    args = parser.parse_args()
    print(f"{args.orders} confirmations, {MACHINES} machines; {os.cpu_count()} CPUs; SQLite")
    with tempfile.TemporaryDirectory(prefix="mes-hub-bench-erp-") as tmp:
        workdir = Path(tmp)
        process, url, log_path = start_standin(workdir)
        try:
            baseline = await run_baseline(args.orders, url, log_path)
            burst = await run_hub("hub", orders(args.orders), workdir, url, log_path, 0)
            paced_orders = orders(args.paced_orders, first=args.orders)  # orders of their own
            paced = await run_hub("paced", paced_orders, workdir, url, log_path, args.rate)
        finally:
            process.terminate()
            process.wait(10)
    print(show(baseline))
    print(show(burst))
    ratio = (burst["count"] / burst["seconds"]) / (baseline["count"] / baseline["seconds"])
    print(f"ratio hub/baseline (confirmations/s): {ratio:.2f}")
    print(show(paced) + f" (paced at {args.rate:.0f} orders/s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "standin":
        standin(int(sys.argv[2]), sys.argv[3])
    else:
        asyncio.run(main())
