"""Store-and-forward, for every adapter (machine or ERP): while NATS cannot be reached, an
adapter's events wait in a bounded queue on disk and go out in their original order once it is
back.

- Nothing is lost: an event is removed from the queue only after JetStream acknowledged it;
  the queue is a SQLite file, so it survives the adapter being restarted.
- Nothing is duplicated: an event published twice (its ack was lost in the outage) carries the
  same CloudEvent id, which JetStream's duplicate window and the hub's store both drop.
- Order: while anything waits, new events queue behind it instead of overtaking it.
- Only what the contract accepts: an event the contract refuses is never queued (it could
  never go out and would block every event behind it); ``publish_many`` and ``store`` raise
  ``ContractViolation`` to the caller instead, before anything is published or queued.
- Bounded: at ``max_events`` the OLDEST waiting events are dropped to make room (the newest
  state of a machine matters more than its oldest history), and every drop is logged as an
  error with the running total. An adapter whose events are never superseded by later ones
  (an ERP adapter's orders) needs a ``max_events`` that the queue does not reach.
- Off the event loop: the SQLite file is opened, written, read and closed by one worker thread
  of the queue's own; the loop hands it the work and awaits the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from contracts import CloudEvent, ContractViolation, nats_subject_for, validate_envelope
from hub.ports import EventPublisher, PublishReceipt

log = logging.getLogger(__name__)
FLUSH_BATCH = 500
T = TypeVar("T")


class _Queue:
    """The on-disk FIFO: a SQLite file whose one connection belongs to one worker thread.

    The synchronous methods run in that thread only, handed to it by ``run`` (the connection
    keeps sqlite3's same-thread check, so a call from any other thread fails loudly), one at a
    time in the order they were handed over: opening first, closing last. ``size`` counts the
    waiting events, so reading it touches neither the disk nor the worker.
    """

    def __init__(self, path: Path) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-and-forward")
        self._closed = False
        self.size = 0  # events waiting; written by the worker only
        # Not opened here, where the event loop would wait for the disk: the worker opens the
        # file before anything else it is given.
        self.opened: Future[None] = self._worker.submit(self._open, path)

    async def run(self, method: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._worker.submit(method, *args))

    async def count(self) -> int:
        if not self.opened.done():
            # Queued behind the open (awaiting ``opened`` itself would cancel the open when
            # the awaiting task is cancelled).
            await self.run(lambda: None)
        self.opened.result()  # raises if the file could not be opened
        return self.size

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS waiting (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "event TEXT NOT NULL)"
        )
        # Queued events the contract refuses, kept with the reason (a dead letter on disk).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused (seq INTEGER PRIMARY KEY, event TEXT NOT NULL, "
            "reason TEXT NOT NULL)"
        )
        self.size = self._count()

    def append(self, events: list[CloudEvent], max_events: int) -> int:
        """Queue ``events``; returns how many of the oldest were dropped to stay in bounds."""
        self.opened.result()  # the open's own error, if it failed
        with self._transaction():
            self._db.executemany(
                "INSERT INTO waiting (event) VALUES (?)", [(e.model_dump_json(),) for e in events]
            )
            excess = self._count() - max_events
            if excess > 0:
                self._db.execute(
                    "DELETE FROM waiting WHERE seq IN "
                    "(SELECT seq FROM waiting ORDER BY seq LIMIT ?)",
                    (excess,),
                )
        self.size = self._count()
        return max(0, excess)

    def oldest(self, limit: int) -> list[tuple[int, CloudEvent]]:
        self.opened.result()
        rows = self._db.execute(
            "SELECT seq, event FROM waiting ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [(seq, CloudEvent.model_validate_json(text)) for seq, text in rows]

    def set_aside(self, refused: list[tuple[int, str]]) -> None:
        """Move waiting events the contract refuses to ``refused``, with the reason, in one
        transaction: kept on disk, no longer in the way of what waits behind them."""
        self.opened.result()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO refused (seq, event, reason) "
                "SELECT seq, event, ? FROM waiting WHERE seq = ?",
                [(reason, seq) for seq, reason in refused],
            )
            self._db.executemany("DELETE FROM waiting WHERE seq = ?", [(s,) for s, _ in refused])
        self.size = self._count()

    def remove_through(self, seq: int) -> None:
        self.opened.result()
        self.size -= self._db.execute("DELETE FROM waiting WHERE seq <= ?", (seq,)).rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed whole, or rolled back whole."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM waiting").fetchone()[0])

    def _close(self) -> None:
        if self.opened.exception() is None:
            self._db.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.run(self._close)
        finally:
            self._worker.shutdown(wait=False)


def _refused(batch: list[tuple[int, CloudEvent]]) -> list[tuple[int, str]]:
    """The queued events the contract refuses (queued by an older version that did not check),
    with the reason, each logged as an error: they are set aside in the buffer's ``refused``
    table, since waiting behind them forever would hold back every event after them."""
    refused = []
    for seq, event in batch:
        try:
            validate_envelope(event)
        except ContractViolation as exc:
            log.error("store-and-forward: set aside waiting event %s (%s) in the buffer's "
                      "'refused' table: the contract refuses it: %s", event.id, event.type,
                      exc.reason)  # fmt: skip
            refused.append((seq, exc.reason))
    return refused


class BufferInUse(RuntimeError):
    """Another running process owns this buffer: two writers would interleave and reorder."""


def _claim(directory: Path) -> int:
    """Take ``directory``'s buffer for this process (an advisory lock the system drops when
    the process ends, however it ends); a second adapter on the same folder is refused."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "buffer.lock"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise BufferInUse(
            f"{directory} is the buffer of another running adapter (pid {owner}): give each "
            "adapter its own ([adapters.buffer] directory, or run them from one command)"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor


class StoreAndForward:
    """An ``EventPublisher`` in front of another: publishes straight through while it can,
    queues on disk while it cannot, and flushes the queue in order in the background. One
    process at a time owns a buffer folder (``BufferInUse`` for a second)."""

    def __init__(
        self,
        inner: EventPublisher,
        directory: Path,
        site: str,
        max_events: int = 100_000,
        retry_max_s: float = 5.0,
    ) -> None:
        self._inner = inner
        self._claim = _claim(directory)
        self._queue = _Queue(directory / "buffer.sqlite")
        self._site = site
        self.max_events = max_events
        self._retry_max_s = retry_max_s
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()  # one publisher at a time keeps the order
        self.buffered = 0  # events that went through the queue
        self.dropped = 0  # events dropped because the queue was full

    def waiting(self) -> int:
        """How many events wait in the queue: a counter, the disk is not read. Only right after
        the publisher was made can this wait, for the worker to finish opening the file."""
        self._queue.opened.result()
        return self._queue.size

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        (receipt,) = await self.publish_many([event])
        return receipt

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        """Publish through, or queue while NATS cannot be reached; ``ContractViolation`` (and
        nothing published or queued) if the contract refuses any of ``events``."""
        if not events:
            return []
        # The whole batch is checked before any of it goes out: a refused event in the middle
        # must not leave the ones before it published and the caller told that none were.
        subjects = [nats_subject_for(self._site, validate_envelope(e)) for e in events]
        async with self._lock:
            if await self._queue.count() == 0:
                try:
                    return await self._inner.publish_many(events)
                except ContractViolation:
                    raise  # refused, not unreachable: queueing it would block the queue
                except Exception as exc:
                    log.warning("NATS unreachable (%s): buffering on disk",
                                type(exc).__name__ or exc)  # fmt: skip
            await self._enqueue(events)
        self._start_flusher()
        # Not in the stream yet: no sequence number.
        receipts = zip(events, subjects, strict=True)
        return [PublishReceipt(e.id, subject, None) for e, subject in receipts]

    async def store(self, events: list[CloudEvent]) -> None:
        """Queue ``events`` on disk first, then send them in the background (``drain`` waits
        for that): for a record that must survive the process being stopped while NATS is
        slow to answer. ``ContractViolation`` (and nothing queued) if the contract refuses
        any of them."""
        if not events:
            return
        for event in events:
            validate_envelope(event)
        async with self._lock:
            await self._enqueue(events)
        self._start_flusher()

    async def _enqueue(self, events: list[CloudEvent]) -> None:
        dropped = await self._queue.run(self._queue.append, events, self.max_events)
        self.buffered += len(events)
        if dropped:
            self.dropped += dropped
            log.error(
                "store-and-forward buffer FULL (%d events): dropped the %d oldest waiting "
                "events to keep the newest (%d dropped since start); NATS still unreachable",
                self.max_events, dropped, self.dropped,
            )  # fmt: skip

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        backoff = 0.2
        while not self._closing:
            async with self._lock:
                batch = await self._queue.run(self._queue.oldest, FLUSH_BATCH)
                if not batch:
                    log.info("store-and-forward buffer empty: publishing directly again")
                    return
                refused = _refused(batch)
                if refused:
                    # Queued before the contract changed, or by an older version: it can never
                    # go out and must not hold back what waits behind it.
                    await self._queue.run(self._queue.set_aside, refused)
                    continue
                try:
                    await self._inner.publish_many([event for _, event in batch])
                except Exception as exc:
                    log.debug("flush failed (%s); %d waiting", exc, len(batch))
                else:
                    await self._queue.run(self._queue.remove_through, batch[-1][0])
                    backoff = 0.2
                    continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry_max_s)

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the queue to empty; True if it did."""
        if await self._queue.count():
            self._start_flusher()
        with contextlib.suppress(TimeoutError):
            if self._flusher is not None:
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout)
        return await self._queue.count() == 0

    async def close(self) -> None:
        self._closing = True
        if self._flusher is not None:
            # Cancelled until it ends: on Python 3.11 a ``wait_for`` inside the inner publisher
            # can swallow one cancel (its future done in the same turn), and the flusher would
            # go on retrying a NATS that is away, with ``close`` waiting on it for ever.
            while not self._flusher.done():
                self._flusher.cancel()
                await asyncio.wait({self._flusher}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._flusher.result()
        await self._queue.close()
        if self._claim >= 0:
            os.close(self._claim)  # the lock goes with it
            self._claim = -1
