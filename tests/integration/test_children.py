"""The hub's child processes (hub/children.py): settings on their input, stopped by closing it,
started again when they exit or cannot start."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from hub import children
from hub.children import ChildProcess
from tests.conftest import eventually

# A child that writes its settings line to a file, then waits for its input to end.
ECHO_THEN_WAIT = (
    "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.readline()); "
    "sys.stdin.buffer.read()"
)


async def test_a_child_gets_its_settings_and_stops_when_the_hub_closes_its_input(
    tmp_path: Path,
) -> None:
    got = tmp_path / "settings"
    child = ChildProcess(
        "echo", [sys.executable, "-c", ECHO_THEN_WAIT, str(got)], b'{"site":"x"}', nice=5
    )
    stop = asyncio.Event()
    running = asyncio.create_task(child.run(stop))
    await eventually(lambda: got.exists() and got.read_bytes() != b"", timeout=20)
    assert got.read_bytes() == b'{"site":"x"}\n'
    stop.set()
    await asyncio.wait_for(running, 10)  # ended by its input closing, not by a signal
    assert child.starts == 1


async def test_a_child_that_exits_or_cannot_start_is_started_again_without_stopping_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(children, "FIRST_RESTART_S", 0.05)
    exits = ChildProcess("exits", [sys.executable, "-c", "raise SystemExit(3)"], b"{}")
    missing = ChildProcess("missing", [str(tmp_path / "no-such-program")], b"{}")
    stop = asyncio.Event()
    running = [asyncio.create_task(c.run(stop)) for c in (exits, missing)]
    await eventually(lambda: exits.starts >= 3, timeout=20)
    assert missing.starts == 0 and not any(task.done() for task in running)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*running), 10)


async def test_a_cancelled_child_service_does_not_leave_its_child_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psutil

    monkeypatch.setattr(children, "STOP_GRACE_S", 0.5)  # it ignores its input: then SIGTERM
    child = ChildProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], b"{}")
    running = asyncio.create_task(child.run(asyncio.Event()))
    await eventually(lambda: child.pid is not None, timeout=20)
    assert child.pid is not None
    process = psutil.Process(child.pid)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
