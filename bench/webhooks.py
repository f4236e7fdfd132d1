"""Partner webhooks benchmark: signed webhooks through the hub's outbox to loopback endpoints, one
of them hanging, against bare httpx POSTs of the same bodies to the same endpoints, in one run.

- baseline: one POST per (endpoint, event) with httpx, 64 at a time, to the healthy endpoints;
- hub:      ``mes-hub serve`` (SQLite, its views process) with ``--endpoints`` ``[[webhook]]``
  entries (every customer), one of which never answers (its 15 s timeout runs out); orders
  started at once, each a ``mes.order.started.v1`` owed to every endpoint.

Figures: deliveries/s to the healthy endpoints (from the first order started to the last
delivery they took), the ratio hub/baseline, and the delay from an order's start (published and
acked by NATS) to each healthy endpoint taking its webhook, p50/p99 — in the burst (queueing),
and then with ``--paced-orders`` started one by one at ``--paced-rate`` a second (the delay a
partner sees in a plant's normal day). The issue's full size is ``--endpoints 100 --orders
1000`` (100,000 deliveries); the default is a tenth of it.

    .venv/bin/python bench/webhooks.py [--endpoints 20] [--orders 500] [--paced-orders 60]
        [--paced-rate 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from erp import START, event, free_port, publish, wait_taken_in  # noqa: E402

from adapters.webhooks.signing import new_secret  # noqa: E402
from hub.bootstrap import PARTNERS_AT, PARTNERS_SINCE  # noqa: E402
from hub.nats import EmbeddedNatsServer, connect, ensure_streams  # noqa: E402
from hub.settings import load_settings  # noqa: E402
from projections.rules.partner_events import STARTED, partner_event_id  # noqa: E402

HANGING = "hanging"


def receiver(port: int, log_path: str) -> None:
    """Every endpoint on one server: ``/hook/<name>`` takes a webhook (204) and logs when it
    first took each id; ``/hook/hanging`` never answers."""
    import uvicorn

    app = FastAPI()
    seen: set[tuple[str, str]] = set()
    log = Path(log_path).open("a", buffering=1)  # noqa: SIM115 (open while it runs)

    @app.post("/hook/{name}")
    async def hook(name: str, request: Request) -> Response:
        if name == HANGING:
            await asyncio.sleep(3600)
        await request.body()
        key = (name, request.headers.get("webhook-id", ""))
        if key not in seen:
            seen.add(key)
            log.write(f"{time.time()} {name} {key[1]}\n")
        return Response(status_code=204)

    # (the hanging endpoint's requests never end: shut down without waiting for them)
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="critical", access_log=False,
        timeout_graceful_shutdown=1,
    )  # fmt: skip


def start_receiver(workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port, log_path = free_port(), workdir / "taken.log"
    log_path.write_text("")
    process = subprocess.Popen(
        [sys.executable, __file__, "receiver", str(port), str(log_path)], cwd=ROOT
    )
    import socket

    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return process, f"http://127.0.0.1:{port}", log_path
        time.sleep(0.05)
    raise RuntimeError("the receiver did not start")


def taken(log_path: Path) -> list[tuple[float, str, str]]:
    """When each endpoint first took each of the hub's webhooks (not the baseline's POSTs)."""
    found = []
    for line in log_path.read_text().splitlines():
        at, name, event_id = line.split()
        if not event_id.startswith("baseline-"):
            found.append((float(at), name, event_id))
    return found


def orders(count: int) -> tuple[list[Any], list[tuple[str, Any]]]:
    """Each order's release, and (apart) its start on one of 50 machines."""
    releases, starts = [], []
    for k in range(count):
        order_id = f"SO-{k}"
        data = {"order_id": order_id, "part_number": "P-1", "quantity": 5, "customer": "C-1",
                "due": (START + timedelta(days=30)).isoformat()}  # fmt: skip
        releases.append(event("mes.erp.order.released.v1", order_id, data, START, 2 * k))
        start = event("mes.operator.order_started.v1", f"M{k % 50}", {"order_id": order_id},
                      START + timedelta(minutes=k), 2 * k + 1)  # fmt: skip
        starts.append((order_id, start))
    return releases, starts


async def run_hub(
    endpoints: int, count: int, workdir: Path, url: str, log_path: Path,
    paced: int = 0, rate: float = 1.0,
) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
    """The burst (``count`` orders at once), then ``paced`` orders started ``rate`` a second."""
    secret = new_secret()
    data_dir = workdir / "hub"
    data_dir.mkdir()
    # Tell partners what happened from before the workload's time (not history).
    before = (START - timedelta(days=1)).isoformat()
    (data_dir / PARTNERS_SINCE).write_text(before)
    (data_dir / PARTNERS_AT).write_text("0")
    (data_dir / "webhooks").mkdir()
    names = [HANGING, *(f"p{n}" for n in range(endpoints - 1))]
    config = workdir / "mes-hub.toml"
    entries = []
    for name in names:
        (data_dir / "webhooks" / f"{name}.since").write_text(before)
        entries.append(
            f'[[webhook]]\nname = "{name}"\nurl = "{url}/hook/{name}"\n'
            'secret = { env = "BENCH_WEBHOOK_SECRET" }\nall_customers = true\n'
            'allow = ["127.0.0.1"]\n'
        )
    config.write_text("\n".join(entries))
    releases, all_starts = orders(count + paced)
    starts, paced_starts = all_starts[:count], all_starts[count:]
    with EmbeddedNatsServer(workdir / "nats") as nats_server:
        client = await connect(nats_server.url)
        await ensure_streams(client.jetstream(), load_settings())
        hub = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--port", "0", "--config", str(config),
             "--nats-url", nats_server.url, "--data-dir", str(data_dir)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(workdir / "hub.log").open("w"),
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")},
                 "BENCH_WEBHOOK_SECRET": secret,
                 "MES_HUB_API_KEYS": "admin:bench-0123456789abcdef"},
        )  # fmt: skip
        try:
            await asyncio.sleep(4.0)
            js = client.jetstream(publish_async_max_pending=8000)
            await publish(js, releases)
            await asyncio.to_thread(wait_taken_in, data_dir, len(releases))
            first = time.time()
            await publish(js, [e for _, e in starts])
            started_at = time.time()  # (all acked: the delays count from here, a bound)
            healthy = (endpoints - 1) * count
            deadline = time.time() + 1800
            while len(done := [t for t in taken(log_path) if t[1] != HANGING]) < healthy:
                if time.time() > deadline:
                    raise RuntimeError(f"{len(done)} of {healthy} webhooks taken")
                await asyncio.sleep(0.5)
            steady = await run_paced(js, paced_starts, rate, endpoints, log_path)
        finally:
            hub.terminate()
            hub.wait(60)
            await client.close()
    delays = sorted(at - started_at for at, _, _ in done)
    quantiles = statistics.quantiles(delays, n=100)
    burst = {
        "name": "hub", "count": len(done), "seconds": max(at for at, _, _ in done) - first,
        "p50_ms": quantiles[49] * 1000, "p99_ms": quantiles[98] * 1000,
    }  # fmt: skip
    return burst, steady


async def run_paced(
    js: Any, starts: list[tuple[str, Any]], rate: float, endpoints: int, log_path: Path
) -> dict[str, Any] | None:
    """Orders started one by one, ``rate`` a second, after the burst: the delay from each
    start (acked by NATS) to each healthy endpoint taking its webhook."""
    if not starts:
        return None
    published: dict[str, float] = {}  # webhook-id -> when its order's start was acked
    began = time.time()
    for n, (order_id, start) in enumerate(starts):
        await asyncio.sleep(max(0.0, began + n / rate - time.time()))
        await publish(js, [start])
        published[partner_event_id("default", order_id, STARTED)] = time.time()
    want = (endpoints - 1) * len(starts)
    deadline = time.time() + 600
    while True:
        done = [(at, eid) for at, name, eid in taken(log_path)
                if eid in published and name != HANGING]  # fmt: skip
        if len(done) >= want:
            break
        if time.time() > deadline:
            raise RuntimeError(f"paced: {len(done)} of {want} webhooks taken")
        await asyncio.sleep(0.2)
    delays = sorted(at - published[eid] for at, eid in done)
    quantiles = statistics.quantiles(delays, n=100)
    return {
        "name": "paced", "count": len(done), "seconds": max(at for at, _ in done) - began,
        "p50_ms": quantiles[49] * 1000, "p99_ms": quantiles[98] * 1000, "rate": rate,
    }  # fmt: skip


async def run_baseline(endpoints: int, count: int, url: str) -> dict[str, Any]:
    """The same number of POSTs to the healthy endpoints, 64 at a time, bodies of the size the
    hub sends (a CloudEvent of a started order)."""
    body = (
        b'{"data":{"customer":"C-1","due":"2026-02-04T00:00:00Z","machine_id":"M1",'
        b'"order_id":"SO-1","part_number":"P-1","quantity":5,"started_at":'
        b'"2026-01-05T00:00:00Z"},"datacontenttype":"application/json","id":'
        b'"4d09f838a0edf9365e88c2554f54cad3","source":"urn:mes-hub:default","specversion":'
        b'"1.0","subject":"SO-1","time":"2026-01-05T00:00:00Z","type":"mes.order.started.v1"}'
    )
    jobs = [(f"p{n}", k) for k in range(count) for n in range(endpoints - 1)]
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            name, k = queue.get_nowait()
            headers = {"webhook-id": f"baseline-{k}", "content-type": "application/json"}
            (await http.post(f"/hook/{name}", content=body, headers=headers)).raise_for_status()

    first = time.time()
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=64)) as http:
        await asyncio.gather(*(worker(http) for _ in range(64)))
    return {"name": "baseline", "count": len(jobs), "seconds": time.time() - first}


def show(run: dict[str, Any]) -> str:
    rate = run["count"] / run["seconds"]
    delay = (
        f", delay from order start to endpoint p50 {run['p50_ms']:.0f} ms, "
        f"p99 {run['p99_ms']:.0f} ms"
        if "p50_ms" in run
        else ""
    )
    return f"{run['name']:<9}{run['count']:>7} in {run['seconds']:6.2f} s = {rate:7.0f}/s{delay}"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--endpoints", type=int, default=20, help="one of them hanging")
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--paced-orders", type=int, default=60, help="then started one by one")
    parser.add_argument("--paced-rate", type=float, default=1.0, help="orders a second")
    args = parser.parse_args()
    print(f"{args.orders} orders started x {args.endpoints} endpoints (1 hanging); "
          f"{os.cpu_count()} CPUs; SQLite")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mes-hub-bench-webhooks-") as tmp:
        workdir = Path(tmp)
        process, url, log_path = start_receiver(workdir)
        try:
            baseline = await run_baseline(args.endpoints, args.orders, url)
            hub, steady = await run_hub(
                args.endpoints, args.orders, workdir, url, log_path,
                args.paced_orders, args.paced_rate,
            )  # fmt: skip
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    print(show(baseline))
    print(show(hub) + " (healthy endpoints)")
    ratio = (hub["count"] / hub["seconds"]) / (baseline["count"] / baseline["seconds"])
    print(f"ratio hub/baseline (deliveries/s): {ratio:.2f}")
    if steady is not None:
        print(
            f"paced: {args.paced_orders} orders at {args.paced_rate:g}/s after the burst, "
            f"{steady['count']} webhooks to the healthy endpoints: delay from order start to "
            f"endpoint p50 {steady['p50_ms']:.0f} ms, p99 {steady['p99_ms']:.0f} ms"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "receiver":
        receiver(int(sys.argv[2]), sys.argv[3])
    else:
        asyncio.run(main())
