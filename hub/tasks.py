"""Small asyncio helpers the hub's parts share."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if it went on: on Python
    3.11 ``asyncio.wait_for`` (which nats-py's publishing uses) can swallow a cancellation that
    comes as what it waits for completes, and the task would run on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        task.result()  # (it ended on its own: its error, if it had one, as ``await`` would)


async def wake_or_stop(wake: asyncio.Event, stop: asyncio.Event, timeout: float) -> None:
    """Wait until ``wake`` or ``stop`` is set, or ``timeout`` seconds passed: a loop that
    sleeps between rounds ends at once when it is told to stop, not at its next round."""
    waiting = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiting:
            waiter.cancel()
