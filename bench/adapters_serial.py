"""RS-232 benchmark: status lines per second through the serial adapter, and the drip feed's
bytes per second, on a pseudo-terminal pair (``tests/serial_peer.py``).

1. Baseline: a bare read loop on the same pty, the same way: pyserial ``read`` of what has
   arrived, split into lines; no patterns, no events.
2. The real ``SerialLineAdapter`` reading the same machine, matching its patterns and publishing
   into a counting publisher that validates like the real one.

Meanwhile a writer thread prints the machine's lines as fast as the pty takes them: cycle start,
a part counted (a new count every line), feed hold, in turn, so nearly every line is an event.
Both loops read as fast as they can: the figure is the adapter's cost per line, far beyond any
real serial line (9600 baud carries about 20 short lines a second).

3. Drip feed: ``DripFeed`` sending a program to the fake control at 115,200 baud, the control
   executing faster than the line so that it never pauses: bytes per second against the line's
   own rate (the sender paces itself at it), and a bare unpaced write loop to the same pty.

    .venv/bin/python bench/adapters_serial.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import select
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.machines.dnc import DripFeed, NcProgram, open_port  # noqa: E402
from adapters.machines.serial_line import SerialConfig, SerialLineAdapter  # noqa: E402
from tests.serial_peer import FakeControl, SerialMachine  # noqa: E402

PATTERNS = [
    {"match": r"^CYCLE START$", "meaning": "execution", "value": "ACTIVE"},
    {"match": r"^FEED HOLD$", "meaning": "execution", "value": "FEED_HOLD"},
    {"match": r"^PART COMPLETE (?P<count>\d+)$", "meaning": "part_count"},
]
DRIP_BAUD = 115_200


def _counting_publisher() -> Any:
    """``Counting`` of ``bench/adapters.py`` (by path: ``adapters`` is the package's name)."""
    path = Path(__file__).with_name("adapters.py")
    spec = importlib.util.spec_from_file_location("bench_adapters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Counting()


class _Printer:
    """Prints the machine's lines on the pty master as fast as it takes them, in a thread."""

    def __init__(self, machine: SerialMachine) -> None:
        self.master = machine.master
        os.set_blocking(self.master, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        count = 0
        pending = b""
        while not self._stop.is_set():
            if not pending:
                block = []
                for _ in range(64):
                    count += 1
                    block += [b"CYCLE START", b"PART COMPLETE %d" % count, b"FEED HOLD"]
                pending = b"\r\n".join(block) + b"\r\n"
            try:
                pending = pending[os.write(self.master, pending) :]
            except BlockingIOError:
                select.select([], [self.master], [], 0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def _bare_loop(config: SerialConfig, seconds: float) -> int:
    port = open_port(config)
    loop = asyncio.get_running_loop()
    lines, buffer = 0, b""
    try:
        ends = loop.time() + seconds
        while loop.time() < ends:
            ready: asyncio.Future[None] = loop.create_future()

            def readable(future: asyncio.Future[None] = ready) -> None:
                if not future.done():
                    future.set_result(None)

            loop.add_reader(port.fileno(), readable)
            try:
                await asyncio.wait_for(ready, 0.2)
            except TimeoutError:
                continue
            finally:
                loop.remove_reader(port.fileno())
            *found, buffer = (buffer + port.read(1 << 16)).split(b"\n")
            lines += sum(1 for line in found if line.strip(b"\r"))
    finally:
        port.close()
    return lines


async def _adapter(config: SerialConfig, seconds: float) -> tuple[int, int]:
    adapter = SerialLineAdapter(config)
    publisher = _counting_publisher()
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 10)
    return adapter.parser.read, publisher.count


def _drip(link: Path, seconds: float) -> tuple[float, float, int]:
    """(drip feed bytes/s, bare write loop bytes/s, overruns) on a fast control."""
    control = FakeControl(link, capacity=1 << 20, high_water=1 << 19, consume_per_s=1e9)
    try:
        config = SerialConfig(machine_id="BENCH", port=str(link), baudrate=DRIP_BAUD)
        body = b"".join(b"N%d G01 X%d.000 Y%d.000 F500\r\n" % (n, n % 500, n % 300)
                        for n in range(1, 200_000))  # fmt: skip
        program = NcProgram("bench.nc", "O1", b"%\r\n" + body + b"%\r\n", "0" * 64)
        port = open_port(config)
        try:
            feed = DripFeed(port, config, program)
            timer = threading.Timer(seconds, feed.cancel)
            timer.start()
            result = feed.send()
            timer.cancel()
            drip = result.sent_bytes / (result.ended_at - result.started_at).total_seconds()
            overruns = control.overruns
            # Bare: write the same bytes as fast as the pty takes them, no pacing, no flow
            # control, as the sender writes (non-blocking, from a memoryview: no copies).
            view, fd = memoryview(program.data), port.fileno()
            sent, started = 0, time.monotonic()
            while time.monotonic() - started < min(seconds, 1.0):
                offset = sent % len(view)
                try:
                    sent += os.write(fd, view[offset : offset + 4096])
                except BlockingIOError:
                    select.select([], [fd], [], 0.01)
            bare = sent / (time.monotonic() - started)
        finally:
            port.close()
        return drip, bare, overruns
    finally:
        control.close()


async def measure(seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="mes-hub-bench-serial-") as folder:
        link = Path(folder) / "ttyBENCH"
        machine = SerialMachine(link)
        config = SerialConfig.model_validate(
            {"machine_id": "BENCH", "port": str(link), "patterns": PATTERNS}
        )
        printer = _Printer(machine)
        try:
            baseline = await _bare_loop(config, seconds)
            lines, events = await _adapter(config, seconds)
        finally:
            printer.stop()
            machine.close()
        drip, bare, overruns = await asyncio.to_thread(_drip, Path(folder) / "ttyDNC", seconds)
    line_rate = DRIP_BAUD / 10
    return {
        "protocol": "serial",
        "unit": "lines",
        "baseline_per_s": baseline / seconds,
        "adapter_per_s": lines / seconds,
        "events": events,
        "events_per_s": events / seconds,
        "drip_feed_bytes_per_s": drip,
        "bare_write_bytes_per_s": bare,
        "note": (
            f"drip feed at {DRIP_BAUD:,} baud 8N1: {drip:,.0f} bytes/s of the line's "
            f"{line_rate:,.0f} ({drip / line_rate:.0%}; the sender paces itself at 95 % of "
            f"the line rate and reads XOFF before every chunk), {overruns} overruns; a bare "
            f"unpaced write loop to the same pty: {bare:,.0f} bytes/s"
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    print(asyncio.run(measure(parser.parse_args().seconds)))
