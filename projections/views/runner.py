"""The projection machinery: follow the store's notification log, many events per transaction,
each view's rows and its tracking position committed together.

The store is polled (the SQLite recorder has no subscribe; polling every ``poll_interval`` is
also what runs on PostgreSQL, so both behave alike). A restart resumes from the recorded
position; a rebuild drops a view and reads the log again from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eventsourcing.utils import get_topic

from projections.views.database import (
    TRACKING_TABLE,
    Cursor,
    ViewDatabase,
    ensure_tracking,
    lock_tracking,
    position_of,
    record_position,
)

log = logging.getLogger(__name__)


class EventLog(Protocol):
    """The store's notification log, as the projections read it."""

    def read(
        self, after: int, limit: int, topics: Collection[str]
    ) -> tuple[int, list[tuple[int, Any]]]:
        """Up to ``limit`` notifications after position ``after``: the last position read (or
        ``after`` when there is nothing new), and the events whose topic is in ``topics``,
        decoded, with their positions."""
        ...

    def last_position(self) -> int: ...


class View(Protocol):
    name: str

    @property
    def event_classes(self) -> tuple[type, ...]:
        """The stored event classes it reads (a class attribute, or found when asked)."""
        ...

    def create(self, cursor: Cursor, dialect: str) -> None:
        """Create the view's tables if they do not exist (without their indexes)."""
        ...

    def create_indexes(self, cursor: Cursor) -> None: ...
    def drop(self, cursor: Cursor) -> None: ...
    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None: ...


@dataclass
class Progress:
    view: str
    position: int
    last: int  # the end of the log when the run began


class ProjectionWorker:
    """Keeps views that have read equally far up to date with the log: one read of the log
    feeds them all, and each view's rows and position are committed together."""

    def __init__(
        self,
        views: Sequence[View],
        log: EventLog,
        db: ViewDatabase,
        batch_size: int = 5_000,
        kill_after_batches: int | None = None,
    ) -> None:
        self.views = list(views)
        self.name = "+".join(view.name for view in self.views)
        self._kill_after_batches = kill_after_batches  # failpoint for crash tests
        self._batches = 0
        self._log = log
        self._db = db
        self._batch_size = batch_size
        self._classes = {view.name: frozenset(view.event_classes) for view in self.views}
        self._all_topics = frozenset().union(*(_topics(view) for view in self.views))
        self.position = 0

    def prepare(self) -> None:
        ensure_tracking(self._db)
        with self._db.transaction() as cursor:
            lock_tracking(cursor, self._db.dialect)
            for view in self.views:
                view.create(cursor, self._db.dialect)
                view.create_indexes(cursor)
            self.position = min(self._positions(cursor).values())

    def _positions(self, cursor: Cursor) -> dict[str, int]:
        return {view.name: position_of(cursor, view.name) for view in self.views}

    def step(self) -> int:
        """Apply the next batch; returns how many notifications were read."""
        last, events = self._log.read(self.position, self._batch_size, self._all_topics)
        if last == self.position:
            return 0
        with self._db.transaction() as cursor:
            lock_tracking(cursor, self._db.dialect)
            positions = self._positions(cursor)
            if min(positions.values()) != self.position:
                # Someone else (a rebuild) moved a view: read again from the one furthest back.
                self.position = min(positions.values())
                return 0
            # Each view gets the events of its classes (the class test once per event).
            by_class: dict[type, list[tuple[int, Any]]] = {}
            for event in events:
                by_class.setdefault(type(event[1]), []).append(event)
            for view in self.views:
                # A view ahead of the others (rebuilt alone) skips what it already has.
                since = positions[view.name]
                if since >= last:
                    continue
                if len(self.views) == 1 and since == self.position:
                    mine = events
                else:
                    classes = self._classes[view.name]
                    mine = sorted(
                        (e for cls, found in by_class.items() if cls in classes for e in found),
                        key=lambda e: e[0],
                    )
                    mine = [e for e in mine if e[0] > since]
                view.apply(cursor, mine)
                record_position(cursor, view.name, last)
        self._batches += 1
        if self._kill_after_batches is not None and self._batches >= self._kill_after_batches:
            log.warning("failpoint: killing the process after batch %d", self._batches)
            os.kill(os.getpid(), signal.SIGKILL)
        read = last - self.position
        self.position = last
        return read

    def catch_up(self, on_progress: Callable[[Progress], None] | None = None) -> int:
        """Apply everything stored so far; returns the number of notifications read."""
        end = self._log.last_position()
        total = 0
        while self.position < end:
            read = self.step()
            if read == 0:
                break
            total += read
            if on_progress is not None:
                on_progress(Progress(self.name, self.position, end))
        return total

    def rebuild(self, on_progress: Callable[[Progress], None] | None = None) -> int:
        """Drop the views and build them again from the first stored event. Indexes are made
        at the end: building an index once is much cheaper than keeping it up row by row."""
        ensure_tracking(self._db)
        with self._db.transaction() as cursor:
            lock_tracking(cursor, self._db.dialect)
            for view in self.views:
                view.drop(cursor)
                cursor.execute(f"DELETE FROM {TRACKING_TABLE} WHERE view = ?", (view.name,))
                view.create(cursor, self._db.dialect)
        self.position = 0
        read = self.catch_up(on_progress)
        with self._db.transaction() as cursor:
            for view in self.views:
                view.create_indexes(cursor)
        return read

    async def run(self, stop: asyncio.Event, poll_interval: float = 0.1) -> None:
        """Follow the log until ``stop`` is set; a failing batch is logged and retried."""
        prepared = False
        while not stop.is_set():
            try:
                if not prepared:
                    await asyncio.to_thread(self.prepare)
                    prepared = True
                read = await asyncio.to_thread(self.step)
            except Exception:
                log.exception("views %s: batch after position %d failed", self.name,
                              self.position)  # fmt: skip
                read = 0
                await _wait(stop, 1.0)
            if read == 0:
                await _wait(stop, poll_interval)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _topics(view: View) -> frozenset[str]:
    return frozenset(get_topic(cls) for cls in view.event_classes)


def group_by_position(db: ViewDatabase, views: Sequence[View]) -> list[list[View]]:
    """Views that have read equally far, together (normally all of them: one read of the log)."""
    ensure_tracking(db)
    with db.transaction(write=False) as cursor:
        groups: dict[int, list[View]] = {}
        for view in views:
            groups.setdefault(position_of(cursor, view.name), []).append(view)
    return list(groups.values())


def positions(db: ViewDatabase, *, prepared: bool = False) -> dict[str, int]:
    """How far each view has read. ``prepared``: the tracking table is known to exist, so only
    read (a writer's lock would wait on, and hold up, the views being written)."""
    if not prepared:
        ensure_tracking(db)
    with db.transaction(write=False) as cursor:
        cursor.execute(f"SELECT view, position FROM {TRACKING_TABLE}")
        return {str(view): int(position) for view, position in cursor.fetchall()}
