"""Orders in: each ERP with orders is asked for its changes every ``poll_interval_s``, and
what it says is published as ``mes.erp.order.*`` events. The cursor (how far the ERP was read)
is kept in a file and moved on only once the events are published: a hub stopped or killed in
between asks again from the old cursor, and the events' ids (the ERP's record id and
modification stamp) make the repeats harmless."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from adapters.erp.base import OrderSource
from hub.files import write_whole
from hub.ports import EventPublisher

log = logging.getLogger(__name__)


class OrderPoller:
    def __init__(
        self,
        name: str,
        source: OrderSource,
        publisher: EventPublisher,
        cursor_file: Path,
        interval_s: float,
    ) -> None:
        self.name, self._source, self._publisher = name, source, publisher
        self._cursor_file, self._interval_s = cursor_file, interval_s
        self._said = ""  # the last failure logged (the same one again is no news)
        self.published = 0

    def _cursor(self) -> str | None:
        try:
            return self._cursor_file.read_text() or None
        except FileNotFoundError:
            return None

    def _keep(self, cursor: str | None) -> None:
        write_whole(self._cursor_file, cursor or "")

    async def poll(self) -> int:
        """One read of the ERP; returns how many events were published."""
        cursor = await asyncio.to_thread(self._cursor)
        events, following = await self._source.changes(cursor)
        if events:
            await self._publisher.publish_many(events)
            self.published += len(events)
        if following != cursor:
            await asyncio.to_thread(self._keep, following)
        return len(events)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                published = await self.poll()
                if published:
                    log.info("ERP %s: %d order changes", self.name, published)
                if self._said:
                    log.info("ERP %s: orders read again", self.name)
                    self._said = ""
            except Exception as exc:  # one line per new failure, no traceback (no secret)
                said = f"{type(exc).__name__}: {exc}"
                if said != self._said:
                    log.warning("ERP %s: reading orders failed (%s); trying again", self.name, said)
                    self._said = said
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
