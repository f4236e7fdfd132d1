"""The API's reads, in a bounded pool of their own, so that no number of readers slows ingest.

A read (machine states, orders, timelines, OEE) is a module-level function called as
``work(sources, *args)`` that returns the answer's JSON bytes: building and serialising an
answer is the CPU-heavy part, so both are done where the read runs, not on the event loop that
ingest shares.

- ``ReadPool.in_processes`` (``serve`` and the demo) runs reads in worker processes at a lower
  CPU priority than ingest (Linux's idle class, else nice +10), each with its own connections
  to the store and the views: they share neither the interpreter lock nor the event loop with
  ingest, and when the CPUs are short the OS gives them to ingest first. Measured in
  ``bench/api_load.py``.
- ``ReadPool.in_threads`` runs them in threads of this process over its own store and views
  (the tests' API). The bound and the answers are the same.

At most ``workers`` reads run and ``queue`` more wait; one more is answered ``429`` with a
``Retry-After`` at once, rather than queued without bound. A read whose client has gone while
it waits is dropped; one already handed to a worker runs to its end (a thread or a worker
cannot be stopped halfway, and a read is bounded by its window and page size; a process pool
hands each worker its next read ahead, so up to ``workers + 1`` reads are past dropping)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from hub.api.problems import Problem
from hub.settings import Settings
from hub.store import EventStore
from projections.views.audit_view import AuditLogReader
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader
from projections.views.outbox_view import OutboxReader

log = logging.getLogger(__name__)
T = TypeVar("T")

# Nice increment of the read workers: below ingest (0), above nothing else of ours.
WORKER_NICENESS = 10
MAX_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class ReadSources:
    """What a read reads: the store and the views."""

    store: EventStore
    facts: FactsReader
    orders: OrdersReader
    outbox: OutboxReader
    audit: AuditLogReader


class JsonAnswer(Response):
    """An answer a read serialised already (its route declares the model for OpenAPI)."""

    media_type = "application/json"


# --- in a worker process -----------------------------------------------------------------------

_open: Callable[[], ReadSources] | None = None  # how the worker opens its store and views
_sources: ReadSources | None = None  # opened by the first read (or the warm-up)


def _start_worker(
    hub: int, open_sources: Callable[[Settings], ReadSources], settings: Settings
) -> None:
    global _open
    _below_ingest()
    # Ctrl-C reaches the whole process group; the hub stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with(hub)
    # Opened by the first read, not here: an initializer that fails breaks the whole pool (and
    # prints a traceback), where a read that fails is answered 503 and the next one tries again.
    _open = functools.partial(open_sources, settings)


def _below_ingest() -> None:
    """Run only on CPU time nothing else of the hub wants: Linux's idle scheduling class where
    there is one (a process may always lower its own class), else nice +10."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(WORKER_NICENESS)


def _opened() -> ReadSources:
    global _sources
    if _sources is None:
        assert _open is not None, "a read worker is given its sources when it starts"
        _sources = _open()
    return _sources


def _exit_with(hub: int) -> None:
    """End this worker when its hub (process id ``hub``, its parent) is gone, even killed: no
    pipe tells a pool's worker so (its siblings hold the other end). The id comes from the hub,
    which may be gone before this worker has started."""

    def watch() -> None:
        while os.getppid() == hub:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _in_worker(work: Callable[..., T], args: tuple[Any, ...]) -> T:
    return work(_opened(), *args)


def _warm_up() -> None:
    """Submitted once per worker at start, so workers are up before the first read."""
    with contextlib.suppress(Exception):  # the first read tries again, and says why
        _opened()


# --- in the hub --------------------------------------------------------------------------------


class ReadPool:
    """Runs reads, at most ``workers`` at once and ``queue`` waiting (see the module)."""

    def __init__(
        self,
        executor: Callable[[], Executor],
        submit: Callable[[Executor, Callable[..., Any], tuple[Any, ...]], Future[Any]],
        workers: int,
        queue: int,
    ) -> None:
        self._new_executor = executor
        self._submit = submit
        self.workers, self.queue = workers, queue
        self._executor: Executor | None = None
        self._lock = threading.Lock()  # guards the counters: futures finish in other threads
        self._in_flight = 0  # submitted and not finished (waiting or running)
        self._seconds = 0.0  # a moving average of how long a read takes, queueing included
        self._closed = False
        self.refused = 0  # answered 429
        self.dropped = 0  # the client went before its read started

    @classmethod
    def in_threads(cls, sources: ReadSources, workers: int = 2, queue: int = 16) -> ReadPool:
        def submit(
            executor: Executor, work: Callable[..., Any], args: tuple[Any, ...]
        ) -> Future[Any]:
            return executor.submit(work, sources, *args)

        executor = functools.partial(ThreadPoolExecutor, workers, thread_name_prefix="api-read")
        return cls(executor, submit, workers, queue)

    @classmethod
    def in_processes(
        cls,
        settings: Settings,
        open_sources: Callable[[Settings], ReadSources],
        workers: int = 2,
        queue: int = 16,
    ) -> ReadPool:
        """``open_sources`` (a module-level function: it is sent to the workers) opens a
        worker's store and views from ``settings``."""

        def submit(
            executor: Executor, work: Callable[..., Any], args: tuple[Any, ...]
        ) -> Future[Any]:
            return executor.submit(_in_worker, work, args)

        def executor() -> Executor:
            pool = ProcessPoolExecutor(
                workers,
                # Not fork: the hub has threads and open connections a child must not inherit.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(), open_sources, settings),
            )
            for _ in range(workers):
                pool.submit(_warm_up)
            return pool

        return cls(executor, submit, workers, queue)

    def start(self) -> None:
        """Start the workers now rather than at the first read (a process takes a while)."""
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, request: Request | None, work: Callable[..., T], *args: Any) -> T:
        """``work(sources, *args)`` in the pool; 429 when the pool is full; 503 when a worker
        died under it (the pool is replaced) or the pool is closed. ``request``: whose client
        going away drops it."""
        with self._lock:
            if self._closed:
                raise Problem(503, "the hub is stopping", headers={"Retry-After": "5"})
            if self._in_flight >= self.workers + self.queue:
                self.refused += 1
                retry_after = min(MAX_RETRY_AFTER_S, max(1, math.ceil(self._seconds)))
                raise Problem(
                    429,
                    f"the hub is answering {self._in_flight} reads, as many as it takes at once; "
                    f"ask again in {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
            self._in_flight += 1
        began = time.monotonic()
        try:
            executor, done = self._submitted(work, args)
        except BaseException:
            self._finished(began)
            raise
        done.add_done_callback(lambda _: self._finished(began))
        try:
            return await self._answer(request, done)
        except BrokenProcessPool:
            self._replace(executor)
            raise _worker_stopped() from None

    def _submitted(
        self, work: Callable[..., Any], args: tuple[Any, ...]
    ) -> tuple[Executor, Future[Any]]:
        """``work`` handed to the pool, and the pool it went to. A pool whose worker died
        refuses it at once (the worker may have died idle): then it goes to a new pool."""
        for attempt in (1, 2):
            with self._lock:
                if self._executor is None:
                    self._executor = self._new_executor()
                executor = self._executor
            try:
                return executor, self._submit(executor, work, args)
            except BrokenProcessPool:
                self._replace(executor)
                if attempt == 2:
                    raise _worker_stopped() from None
        raise AssertionError("unreachable")

    async def _answer(self, request: Request | None, done: Future[T]) -> T:
        answer = asyncio.wrap_future(done)
        if request is None:
            return await answer
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            either: set[asyncio.Future[Any]] = {answer, gone}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and gone.exception() is not None:
                # Cannot tell whether the client is there: answer it all the same.
                return await answer
        finally:
            gone.cancel()
        if answer.done():
            return answer.result()
        # The client went first: a read not handed to a worker yet is dropped.
        if done.cancel():
            with self._lock:
                self.dropped += 1
        answer.cancel()
        raise ClientGone

    def _finished(self, began: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - began)

    def _replace(self, broken: Executor) -> None:
        with self._lock:
            if self._executor is not broken:
                return  # another read replaced it already
            self._executor = None
        log.error("an API read worker stopped; starting the read pool again")
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Drop the reads not begun, wait for those running (they use the store, which is
        closed next), and stop the workers; a read asked for after this is answered 503."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _worker_stopped() -> Problem:
    return Problem(
        503,
        "a read worker stopped; the hub has started another: ask again",
        headers={"Retry-After": "1"},
    )


class ClientGone(Problem):
    """The client of a read went away before its answer was ready. Nobody reads the answer;
    499 is what the hub's access log shows (nginx's "client closed request")."""

    def __init__(self) -> None:
        super().__init__(499, "the client went away before its answer was ready")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
