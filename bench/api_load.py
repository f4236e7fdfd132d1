"""API load benchmark: does ingest keep its pace while 200 clients read the API?

Two fresh hubs (``mes-hub serve`` on SQLite, embedded nats-server), the same workload each:
a preload of simulated machine events, then a measured burst published flat out.
- idle:   nobody reads the API while the burst is ingested (the baseline);
- loaded: 200 concurrent clients read ``GET /api/v1/machines`` and the site's OEE for the day
          in a loop while the same burst is ingested. A client that gets ``429`` waits the
          ``Retry-After`` it was given, as a well-behaved client does.

Figures: burst events/s in each run and their ratio (loaded / idle); the readers' answers by
status and the p50/p99 latency of those answered 200; and how long the hub's read workers kept
working after the clients went away.

    .venv/bin/python bench/api_load.py [--events 20000] [--preload 10000] [--readers 200]
                                       [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import PositionProbe, drive, workload  # noqa: E402

from hub.ingest import tracking_name  # noqa: E402
from hub.nats import EmbeddedNatsServer, connect, ensure_streams  # noqa: E402
from hub.settings import load_settings  # noqa: E402

KEY = "bench-reader-0123456789abcdef"


@dataclass
class Run:
    name: str
    events: int
    seconds: float
    readers: dict[str, Any] = field(default_factory=dict)
    busy_after_s: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the burst

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_hub(
    name: str, items: list[Any], preload: int, readers: int, workdir: Path, day: dict[str, str]
) -> Run:
    workdir = Path(tempfile.mkdtemp(dir=workdir))
    with EmbeddedNatsServer(workdir / "nats") as nats_server:
        client = await connect(nats_server.url)
        await ensure_streams(client.jetstream(), load_settings())
        await client.close()
        port = free_port()
        serve = ["serve", "--port", str(port), "--nats-url", nats_server.url]
        hub = subprocess.Popen(
            [sys.executable, "-m", "hub", *serve, "--data-dir", str(workdir)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "hub.log").open("w"),
            env={**_clean_env(), "MES_HUB_API_KEYS": f"admin:{KEY}"},
        )
        reader_process: subprocess.Popen[str] | None = None
        try:
            url = f"http://127.0.0.1:{port}"
            await _until_up(url)
            query = (
                "SELECT notification_id FROM tracking "
                f"WHERE application_name='{tracking_name(0, 1)}'"
            )
            probe = PositionProbe(workdir / "events.sqlite", query, psutil.Process(hub.pid))
            probe.start()
            try:
                await drive(f"{name}-preload", nats_server.url, items[:preload], probe)
                if readers:
                    reader_process = subprocess.Popen(
                        [sys.executable, __file__, "readers", url, str(readers), json.dumps(day)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    await asyncio.sleep(3.0)  # every client connected and reading
                family = _family(hub, reader_process)
                before = _cpu(family)
                burst = await drive(name, nats_server.url, items[preload:], probe)
                used = {k: v - before.get(k, 0.0) for k, v in _cpu(family).items()}
            finally:
                probe.stop()
            run = Run(name, burst.events, burst.seconds, cpu_s=used)
            if reader_process is not None:
                workers = _read_workers(psutil.Process(hub.pid))
                stdout, _ = reader_process.communicate("stop\n", timeout=120)
                run.readers = json.loads(stdout)
                run.busy_after_s = _busy_for(workers)
            return run
        finally:
            if reader_process is not None and reader_process.poll() is None:
                reader_process.kill()
            hub.terminate()
            hub.wait(60)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}


async def _until_up(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    await asyncio.sleep(1.0)  # the read workers start with the API
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the hub did not come up")


def _read_workers(hub: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in hub.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found


def _family(
    hub: subprocess.Popen[Any], readers: subprocess.Popen[str] | None
) -> dict[str, list[psutil.Process]]:
    """The processes whose CPU the run counts, by role."""
    main = psutil.Process(hub.pid)
    roles: dict[str, list[psutil.Process]] = {"hub (ingest, API)": [main]}
    for child in main.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(child.cmdline())
            role = (
                "read workers" if "spawn_main" in line
                else "views" if "projections" in line
                else "nats-server" if "nats-server" in line
                else "other"
            )  # fmt: skip
            roles.setdefault(role, []).append(child)
    if readers is not None:
        roles["readers (clients)"] = [psutil.Process(readers.pid)]
    roles["bench (publisher)"] = [psutil.Process()]
    return roles


def _cpu(family: dict[str, list[psutil.Process]]) -> dict[str, float]:
    used: dict[str, float] = {}
    for role, processes in family.items():
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                used[role] = used.get(role, 0.0) + times.user + times.system
    return used


def _busy_for(workers: list[psutil.Process], limit: float = 300) -> float:
    """Seconds until the read workers are idle (under 5 % of a CPU over 0.5 s), from now."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        try:
            before = sum(w.cpu_times().user + w.cpu_times().system for w in workers)
            time.sleep(0.5)
            after = sum(w.cpu_times().user + w.cpu_times().system for w in workers)
        except psutil.Error:
            break
        if after - before < 0.025:
            return time.perf_counter() - began - 0.5
    return time.perf_counter() - began


# --- the readers' process ----------------------------------------------------------------------


async def readers(url: str, count: int, day: dict[str, str]) -> dict[str, Any]:
    """``count`` clients reading in a loop until a line arrives on stdin."""
    stop = asyncio.Event()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}"}

    async def reader(n: int) -> None:
        # A client of its own, as 200 tablets and browsers would be (one shared pool of 200
        # connections costs httpx more CPU than the hub spends answering).
        # (verify=False: plain HTTP; loading the CA certificates 200 times costs seconds.)
        async with httpx.AsyncClient(base_url=url, timeout=60, verify=False) as http:
            await read(n, http)

    async def read(n: int, http: httpx.AsyncClient) -> None:
        path, params = ("/api/v1/machines", None) if n % 2 else ("/api/v1/oee", day)
        while not stop.is_set():
            began = time.perf_counter()
            try:
                answer = await http.get(path, params=params, headers=headers)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(1.0)
                continue
            statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - began)
            elif answer.status_code in (429, 503):
                with contextlib.suppress(asyncio.TimeoutError):
                    wait = float(answer.headers.get("retry-after", "1"))
                    await asyncio.wait_for(stop.wait(), wait)

    tasks = [asyncio.create_task(reader(n)) for n in range(count)]
    await asyncio.to_thread(sys.stdin.readline)
    stop.set()
    # Clients leave: what they were waiting for is abandoned, as when browsers close.
    for task in tasks:
        task.cancel()
    for ended in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(ended, Exception):  # a reader that failed must show in the figures
            statuses[type(ended).__name__] = statuses.get(type(ended).__name__, 0) + 1
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "statuses": statuses,
        "answered": len(latencies),
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
    }


def print_runs(idle: Run, loaded: Run, readers_count: int) -> None:
    print(f"\n{'run':<8}{'events':>10}{'seconds':>10}{'events/s':>10}")
    for run in (idle, loaded):
        print(f"{run.name:<8}{run.events:>10}{run.seconds:>10.2f}{run.rate:>10.0f}")
    print(f"ratio loaded/idle (events/s): {loaded.rate / idle.rate:.2f}")
    print("CPU seconds during the burst, by process:")
    for run in (idle, loaded):
        used = ", ".join(f"{role} {seconds:.2f}" for role, seconds in run.cpu_s.items())
        print(f"  {run.name}: {used}")
    r = loaded.readers
    print(
        f"{readers_count} readers: answers by status {r['statuses']}; answered 200: "
        f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms"
    )
    print(f"read workers busy after the clients left: {loaded.busy_after_s:.1f} s")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000, help="the measured burst")
    parser.add_argument("--preload", type=int, default=10_000)
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3, help="idle/loaded pairs (the median)")
    args = parser.parse_args()
    items = workload(args.machines, args.preload + args.events)
    first = json.loads(items[0][1])["time"][:10]
    day = {"from": f"{first}T00:00:00Z", "to": f"{first}T23:59:59Z"}
    print(
        f"workload: preload {args.preload} + burst {args.events} events from {args.machines} "
        f"simulated machines; {args.readers} readers; {os.cpu_count()} CPUs; SQLite"
    )
    ratios = []
    with tempfile.TemporaryDirectory(prefix="mes-hub-api-load-") as tmp:
        for pair in range(1, args.pairs + 1):
            idle = await run_hub("idle", items, args.preload, 0, Path(tmp), day)
            loaded = await run_hub("loaded", items, args.preload, args.readers, Path(tmp), day)
            print(f"\npair {pair} of {args.pairs}")
            print_runs(idle, loaded, args.readers)
            ratios.append(loaded.rate / idle.rate)
    # A 2-core machine shared by seven processes is noisy: each pair is printed, and the median.
    print(
        f"\nratio loaded/idle, {len(ratios)} pairs: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"; median {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "readers":
        figures = asyncio.run(readers(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
        print(json.dumps(figures))
    else:
        asyncio.run(main())
