"""The partners' webhook endpoints at work: a sender (``hub.outbox.Sender``) for each endpoint
that is active, started when one is registered or resumed, stopped when one is paused, disabled
or deleted, made anew when its URL or limits change — without a restart of the hub.

While an endpoint is paused or disabled, the partner watch still decides what it is owed: the
outbox keeps it, and it goes out, in order, once the endpoint is active again.

An endpoint is **disabled by the hub** (``mes.hub.webhooks.changed.v1``, ``endpoint_disabled``,
with the reason) when it answers ``410 Gone`` — the receiver says it wants no more — or when it
has failed for ``disable_after_s`` (5 days by default) without one success in between. When it
began failing is kept in the data dir, so a restart does not reset the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from contracts import dedupe_key
from hub.domain import Webhooks, webhooks_aggregate_id
from hub.files import write_whole
from hub.outbox import Delivered, DeliveryFailed, Destination, OutboxMessage, Sender
from hub.ports import Asker, EventPublisher
from hub.tasks import cancel_task, wake_or_stop
from hub.webhook_registry import Registry, empty
from projections.rules.hub_events import hub_event

log = logging.getLogger(__name__)
DISABLE_AFTER_S = 5 * 86400.0
CHANGED = "mes.hub.webhooks.changed.v1"


class RegistryCache:
    """The site's registry as the store has it, read again at most every ``ttl_s`` (the
    senders and every partner key's request ask for it), or at once after a change
    (``invalidate``) or when asked (``fresh``). ``load(aggregate id)``: ``EventStore.load``.
    Called from several threads: a read that began before an ``invalidate`` is not kept."""

    def __init__(
        self, site: str, load: Callable[[Any], Any], ttl_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._id, self._load, self._ttl_s, self._clock = (
            webhooks_aggregate_id(site), load, ttl_s, clock,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._generation = 0  # of invalidations: a read older than the last one is not kept
        self._read_at: float | None = None
        self._registry = Registry(empty())

    def __call__(self) -> Registry:
        with self._lock:
            now, generation = self._clock(), self._generation
            if self._read_at is not None and now - self._read_at < self._ttl_s:
                return self._registry
        return self._read(now, generation)

    def fresh(self) -> Registry:
        """What the store has now."""
        with self._lock:
            now, generation = self._clock(), self._generation
        return self._read(now, generation)

    def _read(self, now: float, generation: int) -> Registry:
        aggregate = self._load(self._id)
        registry = Registry(aggregate.registry if isinstance(aggregate, Webhooks) else empty())
        with self._lock:
            if generation == self._generation:
                self._registry, self._read_at = registry, now
        return registry

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._read_at = None


class WebhookChanges:
    """Stores a change of the registry (``mes.hub.webhooks.changed.v1``, published as the hub)
    and waits until it is stored, so what the API answers next already sees it.
    ``stored(keys)``: ``EventStore.received_already``."""

    def __init__(
        self, site: str, publisher: EventPublisher,
        stored: Callable[[Sequence[str]], set[str]], cache: RegistryCache,
        clock: Callable[[], Any], timeout_s: float = 15.0,
    ) -> None:  # fmt: skip
        self._site, self._publisher, self._stored, self._cache = site, publisher, stored, cache
        self._clock, self._timeout_s = clock, timeout_s
        self._lock = asyncio.Lock()  # one change at a time: each is checked against the last

    @property
    def lock(self) -> asyncio.Lock:
        return self._lock

    async def __call__(self, change: dict[str, Any], asker: Asker | None = None) -> None:
        event = hub_event(
            self._site, "webhooks", CHANGED, f"webhooks-{uuid4().hex}", self._site,
            self._clock(), change,
        )  # fmt: skip
        if asker is not None:  # named as the asker's doing (its API key), not the hub's
            event = event.model_copy(update=asker.attributes())
        await self._publisher.publish(event)
        key = dedupe_key(event)
        deadline = time.monotonic() + self._timeout_s
        while not await asyncio.to_thread(self._stored, [key]):
            if time.monotonic() > deadline:
                raise TimeoutError("the change was sent but is not stored yet")
            await asyncio.sleep(0.02)
        self._cache.invalidate()


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as the senders need it: its status, and what a sender is made from (a
    change of ``definition`` makes a new one)."""

    endpoint_id: str
    status: str  # active, paused, disabled
    definition: str = ""


class EndpointHealth:
    """Says when an endpoint is to be disabled: ``410 Gone``, or failing for ``disable_after_s``
    since its first failure after a success (kept in ``directory``, ``<endpoint>.failing``)."""

    def __init__(
        self, directory: Path, disable_after_s: float = DISABLE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._directory, self.disable_after_s, self._clock = directory, disable_after_s, clock
        self._since: dict[str, float | None] = {}

    def _path(self, endpoint: str) -> Path:
        return self._directory / f"{endpoint}.failing"

    def failing_since(self, endpoint: str) -> float | None:
        if endpoint not in self._since:
            try:
                self._since[endpoint] = float(self._path(endpoint).read_text().strip())
            except (FileNotFoundError, ValueError):
                self._since[endpoint] = None
        return self._since[endpoint]

    def failed(self, endpoint: str, failure: DeliveryFailed) -> str | None:
        """Note a failure; the reason to disable the endpoint, if it is time."""
        if failure.status == 410:
            return "the endpoint answered 410 Gone: its receiver asks for no more webhooks"
        if failure.permanent:
            return None  # (a refusal of one message's content: the endpoint is up)
        now = self._clock()
        since = self.failing_since(endpoint)
        if since is None:
            self._since[endpoint] = now
            write_whole(self._path(endpoint), repr(now))
            return None
        if now - since >= self.disable_after_s:
            days = (now - since) / 86400
            return f"the endpoint has failed for {days:.1f} days without a success"
        return None

    def succeeded(self, endpoint: str) -> None:
        if self.failing_since(endpoint) is not None:
            self._since[endpoint] = None
            self._path(endpoint).unlink(missing_ok=True)

    def forget(self, endpoint: str) -> None:
        self._since.pop(endpoint, None)
        self._path(endpoint).unlink(missing_ok=True)


class _Watched:
    """A destination whose outcomes the health sees; ``disable(reason)`` asks, for the sender
    that wraps it, that the endpoint be disabled."""

    def __init__(
        self, inner: Destination, health: EndpointHealth, disable: Callable[[str], None]
    ) -> None:
        self.inner, self.name, self.kinds = inner, inner.name, inner.kinds
        self.rate_per_s = getattr(inner, "rate_per_s", None)
        self._health, self._disable = health, disable

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        try:
            delivered = await self.inner.deliver(message, key)
        except DeliveryFailed as failure:
            reason = self._health.failed(self.name, failure)
            if reason is not None:
                self._disable(reason)
            raise
        self._health.succeeded(self.name)
        return delivered

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class _Running:
    sender: Sender
    task: asyncio.Task[None]
    stop: asyncio.Event
    definition: str
    generation: int  # which start of the endpoint's sender (a disable asked by an older is moot)


@dataclass
class EndpointSenders:
    """See the module. ``specs()``: every endpoint and its status (read each round);
    ``make(endpoint_id, destination_wrapper)``: a sender for one, its destination wrapped so
    the health sees it; ``disable(endpoint_id, reason)``: stores that the hub disabled it."""

    specs: Callable[[], Sequence[EndpointSpec]]
    make: Callable[[str, Callable[[Destination], Destination]], Sender | None]
    disable: Callable[[str, str], Awaitable[None]]
    health: EndpointHealth
    refresh_s: float = 1.0
    # The outbox's last decided position (``OutboxReader.last_position``): watched every
    # ``bell_s``, and each sender nudged when it moves — a hundred endpoints' senders then
    # need not each poll the outbox often (their own ``poll_s`` is for retries coming due).
    last_position: Callable[[], int] | None = None
    bell_s: float = 0.05
    running: dict[str, _Running] = field(default_factory=dict)
    _disabling: dict[str, tuple[int, str]] = field(default_factory=dict)  # (generation, why)
    _rewinds: dict[str, int] = field(default_factory=dict)  # for senders not started yet
    _generation: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def refresh(self) -> None:
        """Look at the registry now (after the API changed it)."""
        self._wake.set()

    def rewind(self, endpoint_id: str, position: int) -> None:
        """The endpoint's sender looks again from ``position`` on (a replay, a redelivery); a
        sender not running yet (an endpoint being resumed) does when it starts."""
        running = self.running.get(endpoint_id)
        if running is not None:
            running.sender.rewind(position)
        else:
            self._rewinds[endpoint_id] = min(position, self._rewinds.get(endpoint_id, position))

    def attempts_made(self, endpoint_id: str, key: str) -> int:
        """How many attempts the endpoint's sender knows it made to deliver ``key``."""
        running = self.running.get(endpoint_id)
        return running.sender.attempts_made(key) if running is not None else 0

    def forget_failures(self, endpoint_id: str) -> None:
        """Count its failures afresh (resumed, or deleted)."""
        self.health.forget(endpoint_id)
        self._disabling.pop(endpoint_id, None)

    async def run(self, stop: asyncio.Event) -> None:
        bell = asyncio.create_task(self._ring(stop)) if self.last_position else None
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("webhook endpoints: a round failed; trying again")
                self._wake.clear()
                await wake_or_stop(self._wake, stop, self.refresh_s)
        finally:
            if bell is not None:
                with contextlib.suppress(Exception):  # (its trouble was logged: stop the rest)
                    await cancel_task(bell)
            for endpoint_id in list(self.running):
                await self._stop(endpoint_id)

    async def _ring(self, stop: asyncio.Event) -> None:
        assert self.last_position is not None
        seen = -1
        while not stop.is_set():
            try:
                now = await asyncio.to_thread(self.last_position)
            except Exception as exc:  # (the senders' own polls carry on meanwhile)
                log.warning("webhook endpoints: the outbox's position unreadable (%s)", exc)
                now = seen
            if now != seen:
                seen = now
                for running in list(self.running.values()):
                    running.sender.nudge()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.bell_s)

    async def reconcile(self) -> None:
        specs = {s.endpoint_id: s for s in await asyncio.to_thread(self.specs)}
        disabled_now: set[str] = set()  # (read as active above; not to be started again)
        for endpoint_id, (generation, reason) in list(self._disabling.items()):
            running, spec = self.running.get(endpoint_id), specs.get(endpoint_id)
            if (
                running is None or running.generation != generation or spec is None
                or spec.status != "active" or spec.definition != running.definition
            ):  # fmt: skip
                # Asked by a sender since stopped, or of an endpoint since paused, disabled or
                # redefined (a new URL is not disabled for what the old one answered): moot.
                del self._disabling[endpoint_id]
                continue
            try:
                await self.disable(endpoint_id, reason)
                log.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
                del self._disabling[endpoint_id]
                disabled_now.add(endpoint_id)
                await self._stop(endpoint_id)
            except Exception as exc:  # (stored next round)
                log.warning("webhook endpoint %s: disabling failed (%s)", endpoint_id, exc)
        for endpoint_id, running in list(self.running.items()):
            spec = specs.get(endpoint_id)
            if spec is None or spec.status != "active" or spec.definition != running.definition:
                await self._stop(endpoint_id)
        for endpoint_id, spec in specs.items():
            if spec.status == "active" and endpoint_id not in {*self.running, *disabled_now}:
                try:
                    await self._start(spec)
                except Exception:  # one endpoint's trouble (a key file unreadable): not all
                    log.exception("webhook endpoint %s: its sender did not start", endpoint_id)

    async def _start(self, spec: EndpointSpec) -> None:
        self._generation += 1
        generation = self._generation

        def ask_disable(reason: str) -> None:
            self._disabling.setdefault(spec.endpoint_id, (generation, reason))
            self._wake.set()

        def watched(destination: Destination) -> Destination:
            return _Watched(destination, self.health, ask_disable)

        sender = await asyncio.to_thread(self.make, spec.endpoint_id, watched)
        if sender is None:
            return
        if spec.endpoint_id in self._rewinds:
            sender.rewind(self._rewinds.pop(spec.endpoint_id))
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop), name=f"outbox:{spec.endpoint_id}")
        self.running[spec.endpoint_id] = _Running(sender, task, stop, spec.definition, generation)

    async def _stop(self, endpoint_id: str) -> None:
        running = self.running.pop(endpoint_id, None)
        if running is None:
            return
        running.stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(running.task, 20)
        with contextlib.suppress(Exception):
            await running.sender.close()


def describe(spec: dict[str, Any], fields: Sequence[str]) -> str:
    """The part of an endpoint's definition a sender is made from, as text to compare."""
    return repr([spec.get(f) for f in fields])
