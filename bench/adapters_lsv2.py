"""LSV2 adapter benchmark: polls per second of the HEIDENHAIN adapter against a bare pyLSV2 loop.

Both read the LSV2 server of ``tests/lsv2_peer.py`` on loopback (a control as pyLSV2 sees it),
which changes its program status and its parts counter every 10 ms so that polls find changes:

1. Baseline: one pyLSV2 client, logged in as DNC and PLCDEBUG, reading what the adapter reads
   (execution mode, program status, program stack, error messages, one PLC double word as its
   two words) in a loop, no events. Only the loop is timed (not connecting or logging in).
   The adapter's figure is timed from its first poll the same way.
2. Adapter: ``Lsv2Adapter`` with a poll interval of ~0 (as fast as it goes), publishing into a
   counting publisher that validates each event as the NATS publisher does (``Counting``).

A poll is the same 5 telegrams in both; the unit is polls answered by the control.

    .venv/bin/python bench/adapters_lsv2.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.lsv2 import Lsv2Adapter, Lsv2Config  # noqa: E402
from bench.adapters import Counting  # noqa: E402
from tests.lsv2_peer import Lsv2Peer  # noqa: E402

COUNTER = "D1200"


async def _machine_at_work(peer: Lsv2Peer, stop: asyncio.Event) -> None:
    """A machine running short cycles: the program starts and ends, the counter goes up."""
    parts = 0
    while not stop.is_set():
        peer.program_state = 2 if peer.program_state == 0 else 0
        if peer.program_state == 2:
            parts += 1
            peer.set_plc(COUNTER, parts)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)


def _bare_loop(port: int, seconds: float) -> tuple[int, float]:
    """The baseline: what the adapter asks the control, with pyLSV2 alone. Polls made and the
    seconds they took (the connection's set-up and logout not counted)."""
    import pyLSV2

    client = pyLSV2.LSV2("127.0.0.1", port=port, timeout=5.0, safe_mode=False)
    client.connect()
    client.login(pyLSV2.Login.DNC)
    client.login(pyLSV2.Login.PLCDEBUG)
    polls, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        client.execution_state()
        client.program_status()
        client.program_stack()
        client.get_error_messages()
        client.read_plc_memory(int(COUNTER[1:]) // 2, pyLSV2.MemoryType.WORD, 2)
        polls += 1
    elapsed = time.perf_counter() - started
    client.disconnect()
    return polls, elapsed


async def measure(seconds: float) -> dict[str, object]:
    peer = Lsv2Peer()
    await peer.start()
    stop_machine = asyncio.Event()
    machine = asyncio.create_task(_machine_at_work(peer, stop_machine))
    try:
        baseline_polls, baseline_s = await asyncio.to_thread(_bare_loop, peer.port, seconds)

        config = Lsv2Config(
            machine_id="DMU-50",
            host="127.0.0.1",
            port=peer.port,
            poll_s=1e-6,
            timeout_s=5.0,
            part_count=COUNTER,
        )
        publisher, stop = Counting(), asyncio.Event()
        task = asyncio.create_task(Lsv2Adapter(config).run(publisher, stop))
        while peer.polls() == 0:  # connected and polling
            await asyncio.sleep(0.001)
        polls_before, events_before = peer.polls(), publisher.count
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        adapter_s = time.perf_counter() - started
        adapter_polls = peer.polls() - polls_before
        events = publisher.count - events_before
        stop.set()
        await task
    finally:
        stop_machine.set()
        await machine
        await peer.stop()
    return {
        "protocol": "lsv2",
        "unit": "polls",
        "baseline_per_s": round(baseline_polls / baseline_s, 1),
        "adapter_per_s": round(adapter_polls / adapter_s, 1),
        "events": events,
        "events_per_s": round(events / adapter_s, 1),
        "note": (
            "polls of a fake LSV2 control on loopback (tests/lsv2_peer.py), 5 telegrams each; "
            "baseline: the same pyLSV2 calls in a bare loop; adapter: Lsv2Adapter at poll_s≈0 "
            "publishing into a counting publisher; both timed from the first poll (connect "
            "and logins excluded); the control changes state every 10 ms"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.seconds)), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
