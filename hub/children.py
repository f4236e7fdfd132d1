"""Processes the hub runs beside itself: started with it, watched, restarted, stopped with it.

The views run in a process of their own (``mes-hub projections follow``): their inserts and
their reading of the log would otherwise take the ingest process' one interpreter lock for
about a third of its time under load. They need no more than the store and their own tables,
and they record their position with their rows, so a child killed anywhere resumes where its
last transaction left it; here it is only started again.

A child gets its settings as one line on its standard input, which the hub then keeps open:
the child stops when it closes — when the hub stops it, and when the hub dies, however it dies
(the kernel closes a dead process' pipes). It runs in a session of its own, so a Ctrl-C meant
for the hub does not reach it first, and without the hub's ``MES_HUB_*`` environment (its
settings, secrets among them, come from the hub, never from its environment or command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import BinaryIO

log = logging.getLogger(__name__)

FIRST_RESTART_S = 0.5
LAST_RESTART_S = 30.0
STOP_GRACE_S = 15.0
ENV_PREFIX = "MES_HUB_"


class ChildProcess:
    """A command run as a child until ``stop`` is set, started again whenever it exits or
    cannot be started (after a back-off that doubles up to ``LAST_RESTART_S``, reset once it
    has run a minute). ``settings`` is its first line of input. ``nice`` lowers its CPU
    priority below the hub's."""

    def __init__(self, name: str, argv: Sequence[str], settings: bytes, *, nice: int = 0) -> None:
        if b"\n" in settings:
            raise ValueError("the settings must be one line")
        self.name = name
        self._argv = list(argv)
        self._settings = settings
        self._nice = nice
        self.starts = 0
        self.pid: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        backoff = FIRST_RESTART_S
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                how = await self._run_once(stop)
            except (OSError, subprocess.SubprocessError) as exc:  # e.g. no memory to fork
                how = f"cannot start: {exc}"
            if stop.is_set():
                return
            if loop.time() - started > 60:
                backoff = FIRST_RESTART_S
            log.error("%s %s; starting it again in %.1f s", self.name, how, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, LAST_RESTART_S)

    async def _run_once(self, stop: asyncio.Event) -> str:
        """Run the child until it exits (how it did) or ``stop`` is set (then it is stopped)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        process = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True
        )
        self.starts += 1
        self.pid = process.pid
        if self._nice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, process.pid, self._nice)
        log.info("%s started (pid %d)", self.name, process.pid)
        exited = asyncio.ensure_future(process.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):  # it died at once: its exit says why
                process.stdin.write(self._settings + b"\n")
                await process.stdin.drain()
            await asyncio.wait((exited, stopped), return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                return f"exited with {_how(exited.result())}"
            await self._stop(process)
            return "stopped"
        finally:
            stopped.cancel()
            if not exited.done():  # cancelled: the child must not outlive this
                await asyncio.shield(self._stop(process))
            exited.cancel()

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """Close its input (the child stops at the end of it), then SIGTERM, then SIGKILL."""
        if process.stdin is not None:
            process.stdin.close()
        for sig, wait in ((None, STOP_GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            if process.returncode is not None:
                return
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), wait)
                return
            except TimeoutError:
                log.warning("%s did not stop within %.0f s", self.name, wait or 0)


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def read_settings_line(stream: BinaryIO = sys.stdin.buffer) -> bytes:
    """In a child: its settings, the first line of its input."""
    return stream.readline()


def stop_when_input_ends(stop: asyncio.Event, stream: BinaryIO = sys.stdin.buffer) -> None:
    """In a child: set ``stop`` when its input ends (the hub stopped it, or died)."""
    loop = asyncio.get_running_loop()

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while stream.read(4096):
                pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, name="watch the hub", daemon=True).start()
