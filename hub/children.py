"""Processes the hub runs beside itself: started with it, watched, restarted, stopped with it.

The views run in a process of their own (``mes-hub projections follow``): their inserts and
their reading of the log would otherwise take the ingest process' one interpreter lock for
about a third of its time under load. They need no more than the store and their own tables,
and they record their position with their rows, so a child killed anywhere resumes where its
last transaction left it; here it is only started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

FIRST_RESTART_S = 0.5
LAST_RESTART_S = 30.0
STOP_GRACE_S = 15.0


def die_with_parent() -> None:
    """In a child before it runs (Linux): if the hub is killed, the child gets SIGTERM, so
    nothing is left holding a port or writing a store. (Not the parent's thread: its process.
    Children are started from the event loop's thread, which lives as long as the hub.)"""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildProcess:
    """A command run as a child until ``stop`` is set, started again whenever it exits (after
    a back-off that doubles up to ``LAST_RESTART_S``, reset once it has run a minute). ``stdin``
    is written to it and closed: how a child gets settings that hold secrets (never argv, which
    any local user can read, nor the environment)."""

    def __init__(
        self, name: str, argv: Sequence[str], stdin: bytes = b"", *, nice: int = 0
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._stdin = stdin
        self._nice = nice
        self.starts = 0
        self.pid: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        backoff = FIRST_RESTART_S
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            code = await self._run_once(stop)
            if stop.is_set():
                return
            if loop.time() - started > 60:
                backoff = FIRST_RESTART_S
            log.error(
                "%s exited with %s; starting it again in %.1f s", self.name, _how(code), backoff
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, LAST_RESTART_S)

    async def _run_once(self, stop: asyncio.Event) -> int:
        process = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            preexec_fn=self._before_exec,
        )
        self.starts += 1
        self.pid = process.pid
        log.info("%s started (pid %d)", self.name, process.pid)
        try:
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):  # it died at once: its exit code says
                process.stdin.write(self._stdin)
                await process.stdin.drain()
                process.stdin.close()
            exited = asyncio.ensure_future(process.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait((exited, stopped), return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            return await exited if exited.done() else await self._terminate(process)
        except BaseException:
            await asyncio.shield(self._terminate(process))
            raise

    def _before_exec(self) -> None:
        if sys.platform == "linux":
            die_with_parent()
        if self._nice:
            os.nice(self._nice)

    async def _terminate(self, process: asyncio.subprocess.Process) -> int:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("%s did not stop within %.0f s: killed", self.name, STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return process.returncode if process.returncode is not None else 0


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
