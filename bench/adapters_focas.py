"""FOCAS adapter benchmark: polls per second against the loopback FOCAS peer.

1. Baseline: a bare loop on a raw asyncio stream, none of the adapter's client code: the open
   frame, then the adapter's request bytes (statinfo, program numbers, macro #3901, alarm
   messages) written again and again, each answer read as its header announces (10 bytes, then
   the length); nothing decoded, no events.
2. The real ``FocasAdapter`` polling as fast as it can (``poll_s`` of a microsecond), deciding
   what changed and publishing into a counting publisher that validates like the real one.

Meanwhile the peer changes the machine every 5 ms (cycle start and reset in turn, a part
counted), so events are published. Both loops are one request at a time on loopback: the figure
is the client's and the peer's Python cost per round trip, not a control's (a real control
answers in milliseconds; ``poll_s`` is 1 s by default).

    .venv/bin/python bench/adapters_focas.py [--seconds 3]
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

from adapters.machines.focas import FocasAdapter, FocasConfig, encode_request  # noqa: E402
from bench.adapters import Counting  # noqa: E402
from tests.focas_peer import FocasPeer, PeerAlarm  # noqa: E402


async def _changing(peer: FocasPeer) -> None:
    """The machine at work: start, count a part, reset, every 5 ms one step."""
    count = 0
    while True:
        await asyncio.sleep(0.005)
        if peer.run == 3:
            count += 1
            peer.set_count(count)
            peer.run = 0
        else:
            peer.run = 3


OPEN = b"\xa0\xa0\xa0\xa0\x00\x01\x01\x01\x00\x02\x00\x02"  # session open, as the notes show it


async def _answer(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(10)
    return await reader.readexactly(int.from_bytes(header[8:10], "big"))


async def _bare_loop(port: int, request: bytes, seconds: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(OPEN)
    await writer.drain()
    await _answer(reader)
    polls = 0
    ends = time.perf_counter() + seconds
    try:
        while time.perf_counter() < ends:
            writer.write(request)
            await writer.drain()
            await _answer(reader)
            polls += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return polls


async def measure(seconds: float) -> dict[str, object]:
    peer = FocasPeer()
    peer.alarms = [PeerAlarm(1010, 2, 0, "SPINDLE OVERLOAD")]
    await peer.start()
    changing = asyncio.create_task(_changing(peer))
    config = FocasConfig(
        machine_id="BENCH-1", host="127.0.0.1", port=peer.port, poll_s=1e-6, timeout_s=5
    )
    adapter = FocasAdapter(config)
    try:
        request = encode_request(adapter.calls)  # the bytes only: the loop is its own
        baseline = await _bare_loop(peer.port, request, seconds) / seconds

        publisher = Counting()
        stop = asyncio.Event()
        before = peer.requests
        task = asyncio.create_task(adapter.run(publisher, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 10)
        polls = peer.requests - before
    finally:
        changing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await changing
        await peer.stop()
    return {
        "protocol": "focas",
        "unit": "polls",
        "baseline_per_s": baseline,
        "adapter_per_s": polls / seconds,
        "events": publisher.count,
        "events_per_s": publisher.count / seconds,
        "note": "one request of 4 calls per poll, one at a time, loopback peer in the same "
        "process; baseline: a raw stream writing the same request bytes and reading each answer "
        "by its announced length (no decoding); the peer changes run state and #3901 every 5 ms",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    print(asyncio.run(measure(parser.parse_args().seconds)))
