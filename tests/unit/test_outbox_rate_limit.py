"""The outbox's per-destination rate limit (``hub.outbox.RateLimit``, a token bucket, and the
``Sender`` that obeys it) and each attempt's measured duration (``duration_ms``); the view and
NATS faked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import DeliveryAttemptedV1
from hub.outbox import (
    Circuit,
    Delivered,
    InMemoryDestination,
    OutboxMessage,
    RateLimit,
    RetryPolicy,
    Sender,
)
from hub.ports import InMemoryPublisher
from hub.tasks import cancel_task
from tests.conftest import eventually

KINDS = ("erp.confirmation",)


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Owed:
    """The ``Outbox`` port over a fixed list of messages; like the view, it learns from the
    attempts published which of them a destination took."""

    def __init__(self, messages: list[OutboxMessage], publisher: InMemoryPublisher) -> None:
        self.messages, self.publisher = messages, publisher

    def undelivered(
        self, destination: str, kinds: Sequence[str], after: int = 0, limit: int = 64
    ) -> tuple[int, list[OutboxMessage]]:
        taken = {
            e.data.message_id
            for _, e in self.publisher.published
            if isinstance(e.data, DeliveryAttemptedV1)
            and e.data.destination == destination
            and e.data.outcome in ("delivered", "duplicate")
        }
        owed = [m for m in self.messages if m.kind in kinds and m.key not in taken]
        return 0, [m for m in owed if m.position > after][:limit]


class Timed:
    """Wraps a destination: notes when each delivery started (monotonic), and of what; each
    takes ``pause_s``."""

    def __init__(self, inner: InMemoryDestination, pause_s: float = 0.0) -> None:
        self.inner, self.pause_s = inner, pause_s
        self.name, self.kinds, self.rate_per_s = inner.name, inner.kinds, inner.rate_per_s
        self.starts: list[tuple[float, str, int]] = []  # (when, ordering key, sequence)

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        self.starts.append((time.monotonic(), message.ordering_key, message.sequence))
        await asyncio.sleep(self.pause_s)
        return await self.inner.deliver(message, key)

    async def close(self) -> None:
        await self.inner.close()


def messages(count: int, orders: int = 4) -> list[OutboxMessage]:
    """``count`` confirmations over ``orders`` orders, decided interleaved: SO-1 #1, SO-2 #1, …"""
    return [
        OutboxMessage(
            key=f"msg-{i}",
            kind=KINDS[0],
            site="default",
            ordering_key=f"SO-{i % orders + 1}",
            sequence=i // orders + 1,
            payload={"n": i},
            decided_at=datetime.now(UTC),
            position=i + 1,
        )
        for i in range(count)
    ]


def sender(destination: Any, owed: list[OutboxMessage], **options: Any) -> Sender:
    publisher = InMemoryPublisher()
    return Sender(
        destination, Owed(owed, publisher), publisher, "default",
        lambda key, dest: f"{dest}:{key}", RetryPolicy(jitter=0), **options,
    )  # fmt: skip


def attempts(s: Sender) -> list[DeliveryAttemptedV1]:
    publisher = s._publisher
    assert isinstance(publisher, InMemoryPublisher)
    found = [e.data for _, e in publisher.published]
    assert all(isinstance(d, DeliveryAttemptedV1) for d in found)
    return found  # type: ignore[return-value]


# --- the bucket --------------------------------------------------------------------------------


def test_the_bucket_allows_its_burst_then_one_start_per_token_as_it_refills() -> None:
    clock = FakeClock()
    limit = RateLimit(2.0, clock=clock)  # 2 a second: a burst of 2, then one every 0.5 s
    assert limit.capacity == 2
    assert limit.take() and limit.take()  # two at once
    assert not limit.ready() and not limit.take()  # the third: not yet
    assert limit.wait_s() == pytest.approx(0.5)
    clock.now += 0.25
    assert not limit.take() and limit.wait_s() == pytest.approx(0.25)
    clock.now += 0.25  # 0.5 s after the burst: one token back
    assert limit.wait_s() == 0 and limit.take()
    assert not limit.take()
    # Idle for long, the bucket holds no more than its capacity: again only 2 at once.
    clock.now += 60
    assert limit.take() and limit.take() and not limit.take()


def test_a_rate_under_one_a_second_allows_one_at_a_time() -> None:
    clock = FakeClock()
    limit = RateLimit(0.5, clock=clock)  # one every 2 s, never a burst of more than 1
    assert limit.capacity == 1
    assert limit.take() and not limit.take()
    assert limit.wait_s() == pytest.approx(2.0)
    clock.now += 1.999
    assert not limit.take()
    clock.now += 0.001
    assert limit.take()


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_a_rate_that_is_not_a_positive_number_is_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        RateLimit(rate)


# --- the sender obeys it -----------------------------------------------------------------------


async def test_a_message_held_back_by_the_limit_is_not_an_attempt_and_goes_in_a_later_round() -> (
    None
):
    erp = InMemoryDestination("erp-1", rate_per_s=1.0)
    s = sender(erp, messages(3, orders=3))  # three orders: all three are due at once
    assert s.rate_limit is not None and s.rate_limit.rate_per_s == 1.0
    clock = FakeClock()
    s.rate_limit = RateLimit(1.0, clock=clock)
    assert await s.round() == 1  # the bucket's one token
    await eventually(lambda: len(attempts(s)) == 1)
    assert await s.round() == 0  # the others wait: nothing tried, nothing recorded
    assert erp.calls == 1 and len(attempts(s)) == 1 and s.stats.failed == 0
    assert set(s._known) == {"msg-0"}
    clock.now += 1.0
    assert await s.round() == 1
    await eventually(lambda: erp.calls == 2)
    clock.now += 1.0
    assert await s.round() == 1
    await eventually(lambda: len(erp.taken) == 3)
    assert [a.attempt for a in attempts(s)] == [1, 1, 1]  # each went once, at the first try


async def test_a_half_open_circuit_s_probe_is_not_spent_while_the_limit_holds_it_back() -> None:
    s = sender(InMemoryDestination("erp-1", rate_per_s=1.0), messages(2, orders=2))
    clock = FakeClock()
    s.rate_limit = RateLimit(1.0, clock=clock)
    assert s.rate_limit.take()  # the token is gone
    s.circuit = Circuit(1, 0.0, failures=1, until=time.monotonic() - 1)  # half-open
    assert await s.round() == 0
    assert s.circuit.state == "half-open" and not s.circuit.probing
    clock.now += 1.0
    assert await s.round() == 1  # the token back: the probe goes
    assert s.circuit.probing


async def test_a_rate_limited_destination_gets_all_in_order_never_faster_than_its_bucket() -> None:
    inner = InMemoryDestination("erp-1", rate_per_s=5.0)
    erp = Timed(inner, pause_s=0.01)
    owed = messages(20, orders=4)
    # Polling once a minute: only waking up when the next token is due gets it all done soon.
    s = sender(erp, owed, poll_s=60.0)
    task = asyncio.create_task(s.run(asyncio.Event()))
    try:
        await eventually(lambda: len(inner.taken) == 20, timeout=15)
    finally:
        # (cancelled again should the sender's wait_for swallow it, as Python 3.11's can)
        await cancel_task(task)
    assert inner.calls == 20 and s.stats.delivered == 20  # each once
    for order in ("SO-1", "SO-2", "SO-3", "SO-4"):
        assert [seq for _, key, seq in erp.starts if key == order] == [1, 2, 3, 4, 5]
    # The bucket: in any stretch of d seconds, at most capacity + rate * d starts (a little
    # slack on d for the time from a token taken to the delivery's first line).
    times = sorted(when for when, _, _ in erp.starts)
    for i in range(len(times)):
        for j in range(i, len(times)):
            allowed = 5.0 + 5.0 * (times[j] - times[i] + 0.05)
            assert j - i + 1 <= allowed, (i, j, times[j] - times[i])


# --- each attempt's duration -------------------------------------------------------------------


async def test_each_attempt_carries_how_long_the_destination_took() -> None:
    inner = InMemoryDestination("erp-1")
    erp = Timed(inner, pause_s=0.05)
    s = sender(erp, messages(1))
    assert s.rate_limit is None  # no rate said: unlimited
    assert await s.round() == 1
    await eventually(lambda: len(attempts(s)) == 1)
    inner.down = True  # a failed attempt is timed too
    s2 = sender(erp, messages(1))
    assert await s2.round() == 1
    await eventually(lambda: len(attempts(s2)) == 1)
    for attempt, outcome in ((attempts(s)[0], "delivered"), (attempts(s2)[0], "failed")):
        assert attempt.outcome == outcome
        assert isinstance(attempt.duration_ms, int) and attempt.duration_ms >= 40  # ≥ 50 ms slept
        # The published data is what the contract takes, as it was given.
        assert DeliveryAttemptedV1.model_validate(attempt.model_dump()).duration_ms == (
            attempt.duration_ms
        )


def test_the_contract_takes_a_non_negative_duration_or_none() -> None:
    data = {
        "order_id": "SO-1", "message_id": "msg-1", "destination": "erp-1", "attempt": 1,
        "outcome": "delivered",
    }  # fmt: skip
    assert DeliveryAttemptedV1.model_validate(data).duration_ms is None  # older attempts
    assert DeliveryAttemptedV1.model_validate({**data, "duration_ms": 0}).duration_ms == 0
    for wrong in (-1, 1.5, "12"):
        with pytest.raises(ValidationError):
            DeliveryAttemptedV1.model_validate({**data, "duration_ms": wrong})
