"""Haas MDC adapter benchmark: polls per second against the loopback control (tests/haas_peer.py).

1. Baseline: a bare loop on a raw asyncio stream, none of the adapter's code: the poll's three
   queries (``?Q600 3901``, ``?Q500``, ``?Q104``) one at a time, each answer read up to its ETB
   and split on commas; no matching, no events.
2. The real ``HaasAdapter`` polling as fast as it can (``poll_s`` of a microsecond): matching
   replies, deciding what changed and publishing into a counting publisher that validates like
   the real one.

Meanwhile the control changes every 5 ms (cycle start, then back to IDLE with a part counted in
#3901), so events are published. Both loops ask one query at a time on loopback with the peer in
the same process: the figure is the Python cost per round trip, not a control's (a real control
answers in milliseconds; ``poll_s`` is 1 s by default).

    .venv/bin/python bench/adapters_haas.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.haas import HaasAdapter, HaasConfig  # noqa: E402
from bench.adapters import Counting  # noqa: E402
from tests.haas_peer import HaasPeer  # noqa: E402

QUERIES = (b"?Q600 3901\r\n", b"?Q500\r\n", b"?Q104\r\n")


async def _changing(peer: HaasPeer) -> None:
    """The machine at work: a cycle starts, then ends with a part counted; a step every 5 ms."""
    while True:
        await asyncio.sleep(0.005)
        if peer.status == "BUSY":
            peer.macro(3901, peer.macros.get(3901, 0) + 1)
            peer.set(status="IDLE")
        else:
            peer.set(status="BUSY")


async def _bare_loop(port: int, seconds: float) -> int:
    """Polls of the three queries, each answer read to its ETB and split; no events."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    polls = 0
    ends = time.monotonic() + seconds
    try:
        while time.monotonic() < ends:
            for query in QUERIES:
                writer.write(query)
                await writer.drain()
                frame = await reader.readuntil(b"\x17")
                frame[frame.index(b"\x02") + 1 : -1].decode("ascii").split(",")
            polls += 1
    finally:
        writer.close()
    return polls


async def measure(seconds: float) -> dict[str, object]:
    peer = HaasPeer(macros={3901: 0})
    await peer.start()
    changing = asyncio.create_task(_changing(peer))
    config = HaasConfig(
        machine_id="BENCH-1", host="127.0.0.1", port=peer.port, poll_s=1e-6, timeout_s=5
    )
    try:
        baseline = await _bare_loop(peer.port, seconds) / seconds
        publisher = Counting()
        stop = asyncio.Event()
        before = peer.queries.count("?Q500")
        task = asyncio.create_task(HaasAdapter(config).run(publisher, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 10)
        polls = peer.queries.count("?Q500") - before
    finally:
        changing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await changing
        await peer.stop()
    return {
        "protocol": "haas",
        "unit": "polls",
        "baseline_per_s": baseline,
        "adapter_per_s": polls / seconds,
        "events": publisher.count,
        "events_per_s": publisher.count / seconds,
        "note": "three queries per poll (?Q600 3901, ?Q500, ?Q104), one at a time, loopback peer "
        "in the same process; baseline: a raw stream writing the same queries and reading each "
        "reply to its ETB and splitting it (no matching, no events); the peer starts a cycle or "
        "ends it with a part counted every 5 ms",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    print(asyncio.run(measure(parser.parse_args().seconds)))
