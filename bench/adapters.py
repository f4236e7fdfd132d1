"""Adapter benchmark: the whole Okuma SHDR capture through the SHDR adapter and through the
MTConnect client, as fast as they go, against merely reading and splitting the same lines.

1. Baseline: read the capture over TCP from a loopback peer and split each line on ``|``.
2. SHDR adapter: the same peer, the real adapter (parse, map, change detection, events),
   publishing to an in-memory publisher that validates like the real one (so NATS is not
   measured).
3. MTConnect client: an agent stand-in (tests/mtconnect_agent.py) holding the capture's
   observations; the client reads probe, current and every sample (polled, ``count`` per
   request) and publishes the same way.

Prints lines/s and events/s for each, and the ratio to the baseline.

4. The rest of the fleet (issue 15): Haas MDC, Heidenhain LSV2, RS-232 status lines, Sparkplug B
   and FANUC FOCAS, each against its loopback peer from ``tests/`` (``bench/adapters_<protocol>.py``
   measures one): polls, messages or lines per second through the real adapter, and events
   published, against a bare client loop reading the same peer the same way in the same run.

    .venv/bin/python bench/adapters.py [--repeat 5] [--seconds 3] [--only haas,lsv2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.mtconnect import MtconnectAdapter, MtconnectConfig  # noqa: E402
from adapters.machines.shdr import ShdrAdapter, ShdrConfig  # noqa: E402
from contracts import CloudEvent, nats_subject_for, validate_envelope  # noqa: E402
from hub.ports import PublishReceipt  # noqa: E402
from tests.mtconnect_agent import AgentStandIn  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "mtconnect"


class Counting:
    """Validates each event and makes its subject, as the NATS publisher does; keeps a count."""

    def __init__(self) -> None:
        self.count = 0

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        (receipt,) = await self.publish_many([event])
        return receipt

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        self.count += len(events)
        return [
            PublishReceipt(e.id, nats_subject_for("default", validate_envelope(e)), None)
            for e in events
        ]


async def serve(lines: list[str]) -> tuple[asyncio.Server, int]:
    payload = ("\n".join(lines) + "\n").encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        # Stay until the client hangs up (closing with its PING unread would reset the line).
        while await reader.read(1024):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def baseline(port: int, expected: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = 0
    while lines < expected and (raw := await reader.readline()):
        raw.decode().split("|")
        lines += 1
    writer.close()
    assert lines == expected, (lines, expected)
    return time.perf_counter() - started


async def shdr(port: int, expected: int) -> tuple[float, int]:
    config = ShdrConfig(
        host="127.0.0.1", port=port, machine_id="OKUMA-1",
        devices_xml=FIXTURES / "demo_agent_Devices.xml", device="OKUMA",
    )  # fmt: skip
    adapter, publisher, stop = ShdrAdapter(config), Counting(), asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(adapter.run(publisher, stop))
    while adapter.parser.lines < expected:
        await asyncio.sleep(0.001)
    seconds = time.perf_counter() - started
    stop.set()
    await task
    return seconds, publisher.count


async def mtconnect(lines: list[str], count: int) -> tuple[float, int, int]:
    stand_in = AgentStandIn(FIXTURES / "demo_agent_Devices.xml")
    observations = stand_in.feed_shdr(lines)
    url = await stand_in.start()
    config = MtconnectConfig(url=url, streaming=False, count=count, interval_ms=10)
    adapter, publisher, stop = MtconnectAdapter(config), Counting(), asyncio.Event()
    stand_in.restart()  # start empty, then feed: every observation goes through sample
    task = asyncio.create_task(adapter.run(publisher, stop))
    while not any(r.startswith("/sample") for r in stand_in.requests):
        await asyncio.sleep(0.001)
    fed_at = time.perf_counter()
    stand_in.feed_shdr(lines)
    while adapter.next_sequence < stand_in.next_sequence:
        await asyncio.sleep(0.001)
    seconds = time.perf_counter() - fed_at
    stop.set()
    await task
    await stand_in.stop()
    return seconds, observations, publisher.count


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best is shown")
    parser.add_argument("--count", type=int, default=1000, help="MTConnect sample count")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="how long each of the fleet's runs lasts"
    )
    parser.add_argument(
        "--only", default="", help=f"only these of the fleet's protocols: {','.join(FLEET)}"
    )
    args = parser.parse_args()
    only = [p for p in args.only.split(",") if p]
    if only:
        await fleet(only, args.seconds)
        return
    lines = (FIXTURES / "demo_agent_okuma_shdr.txt").read_text().splitlines()
    await report(lines, "Okuma capture", args.repeat, args.count)
    # The capture is mostly axis positions, which map to nothing; this one changes a part count
    # and the execution state on every line, to show what publishing costs.
    dense = [
        f"2026-03-02T06:{n // 600 % 60:02d}:{n // 10 % 60:02d}.{n % 10}Z|ppartcount|{n}|"
        f"pexecution|{'ACTIVE' if n % 2 else 'READY'}"
        for n in range(20_000)
    ]
    await report(dense, "Synthetic, two changes a line", args.repeat, args.count)
    await fleet(list(FLEET), args.seconds)


# The rest of the fleet: one module per protocol beside this file, each with
# ``async def measure(seconds) -> dict`` (protocol, unit, baseline_per_s, adapter_per_s, events,
# events_per_s, note).
FLEET = ("haas", "lsv2", "serial", "sparkplug", "focas")


async def fleet(protocols: list[str], seconds: float) -> None:
    print(f"\nThe rest of the fleet: each peer on loopback, {seconds:g} s per run")
    row = "  {:<11}{:<10}{:>14}{:>14}{:>8}{:>10}{:>11}"
    print(row.format("protocol", "unit", "bare loop/s", "adapter/s", "ratio", "events", "events/s"))
    notes = []
    for protocol in protocols:
        path = Path(__file__).with_name(f"adapters_{protocol}.py")
        spec = importlib.util.spec_from_file_location(f"bench_adapters_{protocol}", path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        figures = await module.measure(seconds)
        base, adapter = figures["baseline_per_s"], figures["adapter_per_s"]
        print(row.format(
            protocol, figures["unit"], f"{base:,.0f}", f"{adapter:,.0f}",
            f"{adapter / base:.2f}" if base else "—", f"{figures['events']:,}",
            f"{figures['events_per_s']:,.0f}",
        ))  # fmt: skip
        if figures.get("note"):
            notes.append(f"  {protocol}: {figures['note']}")
    print("\n".join(notes))


async def report(lines: list[str], name: str, repeat: int, count: int) -> None:
    server, port = await serve(lines)
    base = min([await baseline(port, len(lines)) for _ in range(repeat)])
    runs = [await shdr(port, len(lines)) for _ in range(repeat)]
    shdr_seconds, shdr_events = min(runs)
    server.close()
    mt_runs = [await mtconnect(lines, count) for _ in range(repeat)]
    mt_seconds, observations, mt_events = min(mt_runs)

    print(f"\n{name}: {len(lines):,} lines, {observations:,} MTConnect observations; "
          f"best of {repeat}")  # fmt: skip
    row = "  {:<44}{:>8.3f} s{:>12,.0f} lines/s{:>10,.0f} events/s  x{:>5}"
    print(row.format("read + split over TCP (baseline)", base, len(lines) / base, 0, "1.00"))
    print(row.format("SHDR adapter", shdr_seconds, len(lines) / shdr_seconds,
                     shdr_events / shdr_seconds, f"{base / shdr_seconds:.2f}"))  # fmt: skip
    print(row.format(f"MTConnect client (polling, count={count})", mt_seconds,
                     len(lines) / mt_seconds, mt_events / mt_seconds,
                     f"{base / mt_seconds:.2f}"))  # fmt: skip
    print(
        f"  events published: SHDR {shdr_events}, MTConnect {mt_events} "
        f"(changes of the mapped items only); MTConnect observations/s "
        f"{observations / mt_seconds:,.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
