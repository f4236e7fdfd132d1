"""The partners' webhook endpoints at work (``projections.processes.webhook_endpoints``): the
registry's cache, when an endpoint's health says it is to be disabled, and the senders started,
stopped and restarted as the registry changes (store, outbox and endpoints faked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hub.domain import Origin, Webhooks, webhooks_aggregate_id
from hub.outbox import (
    Delivered,
    DeliveryFailed,
    Destination,
    InMemoryDestination,
    OutboxMessage,
    Sender,
)
from hub.ports import InMemoryPublisher
from projections.processes.webhook_endpoints import (
    EndpointHealth,
    EndpointSenders,
    EndpointSpec,
    RegistryCache,
)

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
FIVE_DAYS_S = 432000.0


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- RegistryCache ------------------------------------------------------------------------


def webhooks_with(*partner_ids: str) -> Webhooks:
    """The site's Webhooks aggregate with these partners saved."""
    aggregate = Webhooks(site="default")
    for n, partner_id in enumerate(partner_ids):
        aggregate.change(
            Origin(f"change-{n}", "urn:test", T0),
            {"action": "partner_saved", "partner_id": partner_id, "by": "admin"},
        )
    return aggregate


class Store:
    """``EventStore.load`` faked: the aggregate as it is now, and the ids it was asked for."""

    def __init__(self, aggregate: Any) -> None:
        self.aggregate = aggregate
        self.loads: list[Any] = []
        self.while_loading: Callable[[], None] | None = None

    def load(self, aggregate_id: Any) -> Any:
        self.loads.append(aggregate_id)
        found = self.aggregate
        if self.while_loading is not None:
            self.while_loading()
        return found


def test_the_cache_loads_the_sites_aggregate_and_keeps_it_for_ttl() -> None:
    # ttl 0.5 s: read at 0, asked again at 0.4 → the same registry, no load; at 0.5 → loaded.
    store, clock = Store(webhooks_with("acme")), Clock(0.0)
    cache = RegistryCache("default", store.load, ttl_s=0.5, clock=clock)
    first = cache()
    assert store.loads == [webhooks_aggregate_id("default")]
    assert first.partner("acme") is not None
    store.aggregate = webhooks_with("acme", "globex")
    clock.now = 0.4
    assert cache() is first
    assert len(store.loads) == 1
    clock.now = 0.5
    assert cache().partner("globex") is not None
    assert len(store.loads) == 2


def test_a_site_without_a_webhooks_aggregate_reads_as_an_empty_registry() -> None:
    cache = RegistryCache("default", Store(None).load, clock=Clock())
    assert cache().partners == {}
    assert cache().endpoints == {}


def test_fresh_always_loads_and_what_it_read_is_then_cached() -> None:
    # Within the ttl, fresh() still loads (and sees globex); the next call gets that read.
    store, clock = Store(webhooks_with("acme")), Clock(0.0)
    cache = RegistryCache("default", store.load, ttl_s=10, clock=clock)
    cache()
    store.aggregate = webhooks_with("acme", "globex")
    clock.now = 1.0
    fresh = cache.fresh()
    assert fresh.partner("globex") is not None
    assert len(store.loads) == 2
    assert cache() is fresh
    assert len(store.loads) == 2


def test_after_invalidate_the_next_call_loads() -> None:
    store, clock = Store(webhooks_with("acme")), Clock(0.0)
    cache = RegistryCache("default", store.load, ttl_s=10, clock=clock)
    cache()
    store.aggregate = webhooks_with("acme", "globex")
    cache.invalidate()
    assert cache().partner("globex") is not None
    assert len(store.loads) == 2


def test_a_read_begun_before_an_invalidate_is_not_kept() -> None:
    # The load reads the old registry (acme only); meanwhile globex is stored and the cache
    # invalidated. The read is returned to its caller, but the next call loads again (globex).
    store, clock = Store(webhooks_with("acme")), Clock(0.0)
    cache = RegistryCache("default", store.load, ttl_s=10, clock=clock)

    def a_change_lands() -> None:
        store.aggregate = webhooks_with("acme", "globex")
        cache.invalidate()

    store.while_loading = a_change_lands
    stale = cache()
    assert stale.partner("globex") is None
    store.while_loading = None
    after = cache()
    assert len(store.loads) == 2
    assert after.partner("globex") is not None
    assert cache() is after  # (that read, begun after the invalidate, is kept)
    assert len(store.loads) == 2


def test_a_fresh_read_begun_before_an_invalidate_is_not_kept() -> None:
    store, clock = Store(webhooks_with("acme")), Clock(0.0)
    cache = RegistryCache("default", store.load, ttl_s=10, clock=clock)

    def a_change_lands() -> None:
        store.aggregate = webhooks_with("acme", "globex")
        cache.invalidate()

    store.while_loading = a_change_lands
    assert cache.fresh().partner("globex") is None
    store.while_loading = None
    assert cache().partner("globex") is not None
    assert len(store.loads) == 2


# --- EndpointHealth -----------------------------------------------------------------------


def retryable() -> DeliveryFailed:
    return DeliveryFailed("connection refused")


def test_410_gone_is_a_reason_to_disable_at_once(tmp_path: Path) -> None:
    health = EndpointHealth(tmp_path, FIVE_DAYS_S, Clock(0.0))
    reason = health.failed("ep-1", DeliveryFailed("gone", status=410, permanent=True))
    assert reason is not None and "410" in reason
    # (410 whether or not the destination called it permanent)
    assert "410" in (health.failed("ep-2", DeliveryFailed("gone", status=410)) or "")


def test_a_refused_message_is_no_failure_of_the_endpoint(tmp_path: Path) -> None:
    # 400 (permanent: the content refused) at 0, then a retryable failure at 432000 s:
    # the clock starts at 432000, not at 0 → no reason yet.
    clock = Clock(0.0)
    health = EndpointHealth(tmp_path, FIVE_DAYS_S, clock)
    assert health.failed("ep-1", DeliveryFailed("bad", status=400, permanent=True)) is None
    assert health.failing_since("ep-1") is None
    assert not (tmp_path / "ep-1.failing").exists()
    clock.now = FIVE_DAYS_S
    assert health.failed("ep-1", retryable()) is None
    assert health.failing_since("ep-1") == FIVE_DAYS_S


def test_failing_for_disable_after_s_is_a_reason_to_disable(tmp_path: Path) -> None:
    # Failures at 0, 100, 431999 s: none yet (the clock started at 0, kept in ep-1.failing);
    # at 432000 s (5 days): "failed for 5.0 days".
    clock = Clock(0.0)
    health = EndpointHealth(tmp_path, FIVE_DAYS_S, clock)
    assert health.failed("ep-1", retryable()) is None
    assert (tmp_path / "ep-1.failing").exists()
    assert health.failing_since("ep-1") == 0.0
    for now in (100.0, FIVE_DAYS_S - 1):
        clock.now = now
        assert health.failed("ep-1", retryable()) is None, now
    clock.now = FIVE_DAYS_S
    reason = health.failed("ep-1", retryable())
    assert reason is not None and "5.0 days" in reason
    assert health.failing_since("ep-2") is None  # (another endpoint's count is its own)


def test_a_success_in_between_restarts_the_count(tmp_path: Path) -> None:
    # Failed at 0, succeeded at 100, failed at 432000: counting from 432000 → none;
    # at 864000 (5 days after that): the reason.
    clock = Clock(0.0)
    health = EndpointHealth(tmp_path, FIVE_DAYS_S, clock)
    health.failed("ep-1", retryable())
    clock.now = 100.0
    health.succeeded("ep-1")
    assert not (tmp_path / "ep-1.failing").exists()
    clock.now = FIVE_DAYS_S
    assert health.failed("ep-1", retryable()) is None
    clock.now = 2 * FIVE_DAYS_S
    assert "5.0 days" in (health.failed("ep-1", retryable()) or "")


def test_the_count_survives_a_restart(tmp_path: Path) -> None:
    # Failed at 0 with one EndpointHealth; a new one on the same directory (the hub
    # restarted) sees the failure at 432000 as 5 days of failing.
    EndpointHealth(tmp_path, FIVE_DAYS_S, Clock(0.0)).failed("ep-1", retryable())
    again = EndpointHealth(tmp_path, FIVE_DAYS_S, Clock(FIVE_DAYS_S))
    assert again.failing_since("ep-1") == 0.0
    assert "5.0 days" in (again.failed("ep-1", retryable()) or "")


def test_forget_starts_the_count_afresh(tmp_path: Path) -> None:
    # Failed at 0; forgotten (resumed); failed at 432000 → counting from 432000, no reason,
    # and a restart sees 432000 too.
    clock = Clock(0.0)
    health = EndpointHealth(tmp_path, FIVE_DAYS_S, clock)
    health.failed("ep-1", retryable())
    health.forget("ep-1")
    assert health.failing_since("ep-1") is None
    assert not (tmp_path / "ep-1.failing").exists()
    clock.now = FIVE_DAYS_S
    assert health.failed("ep-1", retryable()) is None
    assert EndpointHealth(tmp_path, FIVE_DAYS_S, clock).failing_since("ep-1") == FIVE_DAYS_S


# --- EndpointSenders ----------------------------------------------------------------------


def message(position: int = 1) -> OutboxMessage:
    return OutboxMessage(
        key=f"m-{position}", kind="webhook.order", site="default", ordering_key="order-1",
        sequence=position, payload={}, decided_at=T0, position=position,
    )  # fmt: skip


class Outbox:
    """The outbox view faked: nothing owed, unless a message is given (taken once)."""

    def __init__(self) -> None:
        self.owed: dict[str, list[OutboxMessage]] = {}

    def give(self, destination: str, owed: OutboxMessage) -> None:
        self.owed.setdefault(destination, []).append(owed)

    def undelivered(
        self, destination: str, kinds: Sequence[str], after: int = 0, limit: int = 64
    ) -> tuple[int, list[OutboxMessage]]:
        return after, self.owed.pop(destination, [])


@dataclass
class Gone:
    """A partner's endpoint that answers ``410 Gone``."""

    name: str
    kinds: tuple[str, ...] = ("webhook.order",)
    calls: int = 0

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        self.calls += 1
        raise DeliveryFailed("gone", status=410, permanent=True)

    async def close(self) -> None:
        pass


class SpySender(Sender):
    """A sender that notes the rewinds asked of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rewinds: list[int] = []

    def rewind(self, position: int, hold_s: float = 60.0) -> None:
        self.rewinds.append(position)
        super().rewind(position, hold_s)


@dataclass
class Hub:
    """The registry's specs, the senders made and the disables stored, faked."""

    tmp_path: Path
    specs: list[EndpointSpec] = field(default_factory=list)
    outbox: Outbox = field(default_factory=Outbox)
    publisher: InMemoryPublisher = field(default_factory=InMemoryPublisher)
    made: list[tuple[str, SpySender]] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # endpoints whose sender cannot be made
    gone: dict[str, Gone] = field(default_factory=dict)  # endpoints answering 410
    disabled: list[tuple[str, str]] = field(default_factory=list)
    while_reading: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.senders = EndpointSenders(
            self.read_specs, self.make, self.disable, EndpointHealth(self.tmp_path / "health")
        )

    def have(self, *specs: EndpointSpec) -> None:
        self.specs = list(specs)

    def read_specs(self) -> list[EndpointSpec]:
        if self.while_reading is not None:
            self.while_reading()
        return list(self.specs)

    def make(self, endpoint_id: str, wrap: Callable[[Destination], Destination]) -> Sender:
        if endpoint_id in self.broken:
            raise OSError(f"{endpoint_id}: its key file is unreadable")
        inner: Destination = self.gone.get(endpoint_id) or InMemoryDestination(
            endpoint_id, ("webhook.order",)
        )
        sender = SpySender(
            wrap(inner), self.outbox, self.publisher, "default", lambda k, d: f"{k}/{d}",
            poll_s=0.01,
        )  # fmt: skip
        self.made.append((endpoint_id, sender))
        return sender

    async def disable(self, endpoint_id: str, reason: str) -> None:
        # As the hub's: stored, so the registry then shows the endpoint disabled.
        self.disabled.append((endpoint_id, reason))
        self.specs = [
            EndpointSpec(s.endpoint_id, "disabled", s.definition)
            if s.endpoint_id == endpoint_id
            else s
            for s in self.specs
        ]

    def made_for(self, endpoint_id: str) -> list[SpySender]:
        return [s for e, s in self.made if e == endpoint_id]

    def running(self) -> set[str]:
        return set(self.senders.running)

    async def stop_all(self) -> None:
        stop = asyncio.Event()
        stop.set()
        await self.senders.run(stop)  # (stopped at once: stops every sender it runs)


@pytest.fixture
async def hub(tmp_path: Path) -> Any:
    hub = Hub(tmp_path)
    yield hub
    await hub.stop_all()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.01)


def active(endpoint_id: str, definition: str = "v1") -> EndpointSpec:
    return EndpointSpec(endpoint_id, "active", definition)


async def test_a_sender_is_started_for_each_active_endpoint_only(hub: Hub) -> None:
    # a, b active, c paused, d disabled → senders for a and b, running.
    hub.have(
        active("a"), active("b"), EndpointSpec("c", "paused", "v1"),
        EndpointSpec("d", "disabled", "v1"),
    )  # fmt: skip
    await hub.senders.reconcile()
    assert hub.running() == {"a", "b"}
    assert [e for e, _ in hub.made] == ["a", "b"]
    assert not any(r.task.done() for r in hub.senders.running.values())
    await hub.senders.reconcile()  # (nothing changed: nothing made anew)
    assert len(hub.made) == 2


async def test_a_paused_endpoints_sender_is_stopped(hub: Hub) -> None:
    # a, b running; a paused → a's sender stopped (its task ended), b's untouched.
    hub.have(active("a"), active("b"))
    await hub.senders.reconcile()
    a, b = hub.senders.running["a"], hub.senders.running["b"]
    hub.have(EndpointSpec("a", "paused", "v1"), active("b"))
    await hub.senders.reconcile()
    assert hub.running() == {"b"}
    assert a.task.done()
    assert hub.senders.running["b"] is b and not b.task.done()


async def test_a_changed_definition_makes_a_new_sender(hub: Hub) -> None:
    # a's URL changes (definition v1 → v2): the v1 sender stopped, a new one running for v2.
    hub.have(active("a", "v1"))
    await hub.senders.reconcile()
    old = hub.senders.running["a"]
    hub.have(active("a", "v2"))
    await hub.senders.reconcile()
    new = hub.senders.running["a"]
    assert old.task.done()
    assert new.sender is not old.sender and not new.task.done()
    assert new.definition == "v2"
    assert len(hub.made_for("a")) == 2


async def test_an_endpoint_gone_from_the_registry_has_its_sender_stopped(hub: Hub) -> None:
    hub.have(active("a"), active("b"))
    await hub.senders.reconcile()
    a = hub.senders.running["a"]
    hub.have(active("b"))
    await hub.senders.reconcile()
    assert hub.running() == {"b"}
    assert a.task.done()


async def test_a_rewind_asked_while_stopped_is_applied_when_the_sender_starts(hub: Hub) -> None:
    # a paused; rewound to 5 (a replay), then to 7 (a redelivery): when a is resumed its new
    # sender is rewound to 5 (the earlier of the two), once; b, not rewound, is not.
    hub.have(EndpointSpec("a", "paused", "v1"), active("b"))
    await hub.senders.reconcile()
    hub.senders.rewind("a", 5)
    hub.senders.rewind("a", 7)
    hub.have(active("a"), active("b"))
    await hub.senders.reconcile()
    (sender,) = hub.made_for("a")
    assert sender.rewinds == [5]
    assert hub.made_for("b")[0].rewinds == []
    hub.have(active("a", "v2"), active("b"))  # (a sender made later owes no old rewind)
    await hub.senders.reconcile()
    assert hub.made_for("a")[1].rewinds == []


async def test_a_rewind_of_a_running_sender_goes_to_it_at_once(hub: Hub) -> None:
    hub.have(active("a"))
    await hub.senders.reconcile()
    hub.senders.rewind("a", 5)
    assert hub.made_for("a")[0].rewinds == [5]


async def test_a_sender_that_cannot_be_made_does_not_keep_the_others_from_starting(
    hub: Hub,
) -> None:
    # a's key file is unreadable: b and c start all the same; a is tried again next round.
    hub.broken = {"a"}
    hub.have(active("b"), active("a"), active("c"))
    await hub.senders.reconcile()
    assert hub.running() == {"b", "c"}
    hub.broken = set()
    await hub.senders.reconcile()
    assert hub.running() == {"a", "b", "c"}


async def test_410_from_an_endpoint_disables_it_once_and_stops_its_sender(hub: Hub) -> None:
    # gone answers 410 to what its sender delivers: the next round stores the disable (once,
    # with the reason) and stops its sender; ok's sender keeps running.
    hub.gone["gone"] = Gone("gone")
    hub.have(active("gone"), active("ok"))
    await hub.senders.reconcile()
    gone, ok = hub.senders.running["gone"], hub.senders.running["ok"]
    hub.outbox.give("gone", message())
    await until(lambda: hub.gone["gone"].calls == 1)
    assert hub.disabled == []  # (asked, not stored yet: that is the round's)
    await hub.senders.reconcile()
    assert [e for e, _ in hub.disabled] == ["gone"]
    assert "410" in hub.disabled[0][1]
    assert gone.task.done()
    assert hub.running() == {"ok"}
    assert hub.senders.running["ok"] is ok
    await hub.senders.reconcile()
    assert len(hub.disabled) == 1
    assert len(hub.made_for("gone")) == 1


async def test_a_disable_asked_by_a_sender_since_restarted_is_not_sent(hub: Hub) -> None:
    # gone answers 410 while a round reads the registry, which by then has gone's new URL
    # (v2): that round makes a new sender for v2; the next round does not disable gone.
    hub.gone["gone"] = Gone("gone")
    hub.have(active("gone", "v1"))
    await hub.senders.reconcile()
    v1 = hub.senders.running["gone"]

    def the_old_url_answers_410_and_a_new_url_is_stored() -> None:  # (in the round's thread)
        hub.while_reading = None
        hub.outbox.give("gone", message())
        deadline = time.monotonic() + 5
        while hub.gone["gone"].calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        hub.have(active("gone", "v2"))

    hub.while_reading = the_old_url_answers_410_and_a_new_url_is_stored
    await hub.senders.reconcile()
    assert hub.gone["gone"].calls == 1
    assert v1.task.done()
    assert hub.senders.running["gone"].definition == "v2"
    await hub.senders.reconcile()
    assert hub.disabled == []
    assert hub.running() == {"gone"}


async def test_a_disable_asked_before_the_endpoint_was_redefined_is_not_sent(hub: Hub) -> None:
    # gone's URL (v1) answers 410; before the next round its URL is changed (v2): the 410
    # was the old URL's, so the next round makes a sender for v2 and disables nothing.
    hub.gone["gone"] = Gone("gone")
    hub.have(active("gone", "v1"))
    await hub.senders.reconcile()
    hub.outbox.give("gone", message())
    await until(lambda: hub.gone["gone"].calls == 1)
    hub.have(active("gone", "v2"))
    await hub.senders.reconcile()
    assert hub.disabled == []
    assert hub.senders.running["gone"].definition == "v2"
