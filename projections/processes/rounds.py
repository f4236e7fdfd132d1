"""What the hub's watches share: publishing what a round decided, and running rounds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from contracts import CloudEvent
from hub.ports import EventPublisher

log = logging.getLogger(__name__)


async def publish_decided(publisher: EventPublisher, events: list[CloudEvent]) -> int:
    """Publish a round's decisions; how many were new (a repeat, decided again before the first
    was stored, has the same id and is dropped)."""
    if not events:
        return 0
    receipts = await publisher.publish_many(events)
    return sum(1 for receipt in receipts if not receipt.duplicate)


async def run_rounds(
    check: Callable[[], Awaitable[int]],
    stop: asyncio.Event,
    interval_s: float,
    what: str,
    behind: Callable[[], bool] = lambda: False,
) -> None:
    """``check`` every ``interval_s`` until ``stop``, or at once again while ``behind()`` (a
    round read as far as it may at once, and there is more: after a burst, what comes next
    must not wait for the backlog at one batch per interval); a failed round is logged, and
    the next one comes as usual."""
    while not stop.is_set():
        try:
            decided = await check()
            if decided:
                log.info("%s: %d decided", what, decided)
            if behind():
                continue
        except Exception:
            log.exception("%s: a round failed; next round in %.1f s", what, interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
