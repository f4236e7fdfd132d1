"""The delivery outbox: what the hub owes to the world outside — production confirmations to
ERPs, and (next) partners' webhooks — delivered exactly once per destination and key.

What is owed is a view of the store (``projections.views.outbox_view``): each message is the
stored event that decided it, each delivery's state the last stored attempt. A ``Sender`` per
destination reads what that destination has not taken yet and delivers it:

- **In order per key, in parallel across keys**: an order's confirmations go one after another
  (a message waits until the one before it was taken); different orders go at once, up to
  ``RetryPolicy.parallel``.
- **Retried with backoff and jitter**: 1 s, 2 s, 4 s, … up to ``max_delay_s`` (1 h), each
  ±20 %, so that a destination coming back is not hit by every message at the same instant —
  or by a fixed ``schedule`` (partners' webhooks: ``standard_webhooks_retry``, 5 s to 24 h);
  a destination that says when to come back (``DeliveryFailed.retry_after_s``, from an HTTP
  ``Retry-After``) is left alone at least that long — that message and every other — up to
  ``max_retry_after_s`` (1 h);
  after ``max_attempts`` (30: some 18 hours) or a refusal that no retry can fix
  (``DeliveryFailed(permanent=True)``) the message is dead — it and the messages after it for
  its key wait for someone (API: retry).
- **A circuit per destination**: after ``circuit_failures`` failures in a row it opens, and the
  destination is left alone for ``circuit_open_s``; then one message probes it (half-open): taken,
  the circuit closes; refused, it opens again. A slow or dead destination has its own sender:
  it never delays another.
- **A rate limit per destination**, if it declares one (``rate_per_s``; None: unlimited): the
  sender starts at most that many deliveries a second, averaged over all its slots, with a
  burst of at most ``max(1, rate_per_s)`` (``RateLimit``, a token bucket). A message held back
  by it is not an attempt: it goes in a later round, and the sender wakes up for it when the
  next start is allowed.
- **The same key every time**: a message's idempotency key derives from the stored event and the
  destination (``projections.views.outbox_view.idempotency_key``), so every retry, a redelivery
  after a crash, a replay, carries the same one, and the destination can drop repeats.
- **Every attempt is stored** as ``mes.hub.delivery.attempted.v1`` (published by the hub, through
  ingest like any event: what was sent, when, the outcome, the status, the start of the
  answer, how long the destination took: ``duration_ms``), so an auditor sees what each ERP
  was told and what it said — and the view learns the outcome. Until it has, the sender
  remembers it; a hub killed between the destination's answer and the stored attempt sends the
  message again after its restart, with the same key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from contracts import CloudEvent
from hub.ports import Asker, EventPublisher
from hub.tasks import wake_or_stop

log = logging.getLogger(__name__)
EXCERPT_CHARS = 512  # of a destination's answer, kept with each attempt
ATTEMPT_TYPE = "mes.hub.delivery.attempted.v1"
PAGE = 64  # messages read per round (the first of each key): a few per sender slot
READ_TRUSTED_S = 5.0  # a read of the outbox is worked through for this long at most
FOLLOW_UP_S = 0.1  # how soon to look again while the view has not caught up with the sender


@dataclass(frozen=True)
class OutboxMessage:
    """A message owed to one destination, with how its delivery went so far (per the view)."""

    key: str  # the message's key (the same for every destination)
    kind: str  # what it is: "erp.confirmation"
    site: str
    ordering_key: str  # delivered in sequence within it (the order id)
    sequence: int
    payload: dict[str, Any]
    decided_at: datetime
    position: int  # of the event that decided it
    attempts: int = 0
    outcome: str | None = None  # None: never tried; failed, dead, delivered, duplicate
    next_attempt_at: datetime | None = None
    status_code: int | None = None
    reason: str = ""
    requeued_at: int = 0  # the attempt count when it was last requeued (attempts count from it)


@dataclass(frozen=True)
class Delivered:
    """The destination took the message (or had it already: a repeated key is delivered)."""

    status: int | None
    excerpt: str = ""  # the start of its answer, capped at EXCERPT_CHARS
    duplicate: bool = False


class DeliveryFailed(Exception):
    """The destination did not take the message. ``permanent``: sending the same message again
    cannot help (it refused the content); else it may (down, timeout, 5xx, 429, a login that is
    refused until someone fixes it). ``retry_after_s``: the destination asked not to be called
    again before that many seconds (an HTTP ``Retry-After``): the next attempt waits at least
    that long (up to ``RetryPolicy.max_retry_after_s``)."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        excerpt: str = "",
        permanent: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason, self.status, self.excerpt, self.permanent = reason, status, excerpt, permanent
        self.retry_after_s = retry_after_s


class Destination(Protocol):
    """Where messages go: an ERP (``adapters.erp``), a partner's webhook. ``deliver`` returns
    ``Delivered`` or raises ``DeliveryFailed``; it must be idempotent by the message's key."""

    name: str
    kinds: tuple[str, ...]  # the kinds of message it takes

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered: ...

    async def close(self) -> None: ...


class Outbox(Protocol):
    """The view of what is owed (``projections.views.outbox_view.OutboxReader``)."""

    def undelivered(
        self, destination: str, kinds: Sequence[str], after: int = 0, limit: int = 64
    ) -> tuple[int, list[OutboxMessage]]: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How a destination's failed messages are tried again: after failed attempt n, wait
    ``first_delay_s`` doubling up to ``max_delay_s`` — or, with a ``schedule``, its n-th delay
    (its last one repeated; ``max_delay_s`` does not apply) — each ± ``jitter``; then dead after
    ``max_attempts`` (by default 30, or one more than the schedule's delays: the first attempt
    and one after each)."""

    first_delay_s: float = 1.0
    max_delay_s: float = 3600.0
    jitter: float = 0.2  # each delay ± this fraction
    # Then the message is dead: 30 attempts take about 18 hours (1 s doubling to 1 h), so an
    # ERP down for a night, or a password wrong until morning, loses nothing. 0: the default
    # (30, or ``len(schedule) + 1``); always a count once made.
    max_attempts: int = 0
    circuit_failures: int = 5  # failures in a row that open the circuit
    circuit_open_s: float = 30.0
    parallel: int = 8  # keys delivered at once
    schedule: tuple[float, ...] | None = None  # the delay after failed attempt 1, 2, …
    max_retry_after_s: float = 3600.0  # a destination's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if not self.schedule or any(delay < 0 for delay in self.schedule):
                raise ValueError("a retry schedule needs at least one delay, none negative")
            object.__setattr__(self, "schedule", tuple(float(d) for d in self.schedule))
        if self.max_attempts <= 0:
            default = 30 if self.schedule is None else len(self.schedule) + 1
            object.__setattr__(self, "max_attempts", default)

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt number ``attempt`` (1, 2, …)."""
        if self.schedule is not None:
            base = self.schedule[min(max(attempt, 1), len(self.schedule)) - 1]
        else:
            base = min(self.max_delay_s, self.first_delay_s * 2.0 ** (attempt - 1))
        return base * (1 + rng.uniform(-self.jitter, self.jitter))

    def next_delay_s(
        self, attempt: int, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        """The wait after failed attempt ``attempt``: the policy's, or longer if the destination
        asked for longer (``retry_after_s``, honoured up to ``max_retry_after_s``)."""
        delay = self.delay_s(attempt, rng)
        if retry_after_s is None or retry_after_s != retry_after_s:  # (None or NaN: not said)
            return delay
        return max(delay, min(max(retry_after_s, 0.0), self.max_retry_after_s))


# The Standard Webhooks spec's example schedule ("Retry schedule"): immediately, then 5 s,
# 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h — ten attempts over some three days.
STANDARD_WEBHOOKS_SCHEDULE: tuple[float, ...] = (
    5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0,
)  # fmt: skip


def standard_webhooks_retry(scale: float = 1.0, **options: Any) -> RetryPolicy:
    """The retry policy of partners' webhooks: the Standard Webhooks schedule (each delay
    ± 20 %), dead after its tenth attempt. ``scale``: every delay times this (short in tests);
    ``options``: any other ``RetryPolicy`` field (``jitter``, ``parallel``, …)."""
    if scale <= 0:
        raise ValueError("scale must be positive")
    schedule = tuple(delay * scale for delay in STANDARD_WEBHOOKS_SCHEDULE)
    return RetryPolicy(schedule=schedule, **options)


@dataclass
class Circuit:
    """Closed: deliver. Open: leave the destination alone until ``until``. Then half-open: one
    probe at a time; its outcome closes or opens the circuit again."""

    failures_to_open: int
    open_s: float
    failures: int = 0
    until: float | None = None  # monotonic time the open circuit half-opens at
    probing: bool = False

    @property
    def state(self) -> str:
        if self.until is None:
            return "closed"
        return "open" if time.monotonic() < self.until else "half-open"

    def allows(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures, self.until, self.probing = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        self.probing = False
        if self.until is not None or self.failures >= self.failures_to_open:
            self.until = time.monotonic() + self.open_s

    def hold(self, seconds: float) -> None:
        """Open for at least ``seconds``: the destination said when to come back (an HTTP
        ``Retry-After``), for every message, not only the one it answered."""
        self.until = max(self.until or 0.0, time.monotonic() + seconds)
        self.probing = False


class RateLimit:
    """At most ``rate_per_s`` starts a second, averaged: a token bucket of ``max(1, rate_per_s)``
    tokens (the burst allowed), full at first, refilled continuously by ``clock`` (monotonic
    seconds); each start takes one token."""

    _EPSILON = 1e-9  # of a token: what float arithmetic may lose in a refill

    def __init__(self, rate_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < rate_per_s < float("inf"):  # (NaN fails too)
            raise ValueError(f"a rate limit must be a positive number per second: {rate_per_s}")
        self.rate_per_s = float(rate_per_s)
        self.capacity = max(1.0, self.rate_per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now

    def ready(self) -> bool:
        """Whether a start is allowed now (takes nothing)."""
        self._refill()
        return self._tokens >= 1 - self._EPSILON

    def take(self) -> bool:
        """Take a start if one is allowed now; whether it was."""
        if not self.ready():
            return False
        self._tokens = max(0.0, self._tokens - 1)
        return True

    def wait_s(self) -> float:
        """Seconds until the next start is allowed (0: now)."""
        self._refill()
        return max(0.0, (1 - self._EPSILON - self._tokens) / self.rate_per_s)


def attempt_event(
    site: str, event_id: str, message: OutboxMessage, now: datetime, data: dict[str, Any]
) -> CloudEvent:
    """A ``mes.hub.delivery.attempted.v1`` event about ``message``, on its order."""
    return CloudEvent(
        specversion="1.0",
        id=event_id,
        source=f"urn:mes-hub:{site}:outbox",
        type=ATTEMPT_TYPE,
        time=now,
        subject=message.ordering_key,
        datacontenttype="application/json",
        data=data,
    )


def excerpt(text: str) -> str:
    """The start of an answer, as kept with an attempt: control characters (NUL, which no event
    may carry, among them) become spaces."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class _Known:
    """What the sender did that the view may not show yet."""

    attempts: int
    outcome: str
    next_attempt_at: datetime | None
    requeued_at: int = 0
    position: int = 0  # of the message


@dataclass
class SenderStats:
    delivered: int = 0
    duplicates: int = 0
    failed: int = 0
    dead: int = 0
    # decided → taken, the last ones (for the bench)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


class Sender:
    """Delivers what one destination is owed (see the module)."""

    def __init__(
        self,
        destination: Destination,
        outbox: Outbox,
        publisher: EventPublisher,
        site: str,
        key_for: Callable[[str, str], str],
        policy: RetryPolicy | None = None,
        *,
        after: int = 0,
        poll_s: float = 0.1,
        rng: random.Random | None = None,
        kill_after_delivery: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.destination = destination
        self._clock = clock  # the hub's: the attempts' events are stamped with it
        self._outbox, self._publisher, self._site = outbox, publisher, site
        self._key_for = key_for  # (message key, destination) -> the idempotency key
        self.policy = policy or RetryPolicy()
        self.circuit = Circuit(self.policy.circuit_failures, self.policy.circuit_open_s)
        self._after, self._poll_s = after, poll_s
        self.owed_after = after  # it is owed what was decided after this store position
        self._floor_held_until = 0.0  # (monotonic) see ``rewind``
        self._read: list[OutboxMessage] = []  # what the last read of the outbox found
        self._read_at = 0.0  # (monotonic) when that read began
        self._rewinds = 0  # how many rewinds so far (a read begun before one is not kept)
        self._rng = rng or random.Random()
        self._known: dict[str, _Known] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}  # ordering key -> its delivery
        self._wake = asyncio.Event()
        self._kill_after = kill_after_delivery  # failpoint for crash tests
        self.stats = SenderStats()
        rate_per_s = getattr(destination, "rate_per_s", None)
        self.rate_limit = RateLimit(rate_per_s) if rate_per_s is not None else None
        self._rate_held = False  # the last round left a due message for want of a token

    @property
    def name(self) -> str:
        return self.destination.name

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.clear()  # (before the round: a nudge during it is not lost)
                try:
                    await self.round()
                except Exception:
                    log.exception("outbox %s: a round failed; trying again", self.name)
                wait = self._poll_s
                if self._known or time.monotonic() < self._floor_held_until:
                    # What it did, or a requeue asked for, is not in the view yet: the next
                    # message of an order, or the requeued one, shows up there shortly.
                    wait = min(wait, FOLLOW_UP_S)
                if self._rate_held and self.rate_limit is not None:
                    wait = min(wait, self.rate_limit.wait_s())  # up when the next token is
                await wake_or_stop(self._wake, stop, wait)
        finally:
            busy = list(self._busy.values())
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)

    async def round(self) -> int:
        """Start the deliveries that are due now; returns how many were started."""
        now = datetime.now(UTC)  # (retries are timed by the wall clock, see ``_deliver``)
        # What the last read found is worked through before the outbox is read again: a
        # read costs as much as what is open, and a burst to a hundred endpoints would read
        # once per delivery. (What this sender did since, it knows: ``_state``.)
        # Trusted for a few seconds at most: an order's next message, or one requeued, is not
        # kept waiting behind a whole page at a slow destination.
        fresh = time.monotonic() - self._read_at < READ_TRUSTED_S
        due = self._due(self._read, now) if fresh else []
        if not due:
            generation, started_at = self._rewinds, time.monotonic()
            floor, found = await asyncio.to_thread(
                self._outbox.undelivered, self.name, self.destination.kinds, self._after, PAGE
            )
            if generation == self._rewinds:  # (a rewind meanwhile: this read is too old)
                self._read, self._read_at = found, started_at
                # Everything decided before ``floor`` was taken: ask from there on (else
                # every round would read past all that was ever delivered).
                if time.monotonic() >= self._floor_held_until:
                    self._after = max(self._after, floor)
            due = self._due(found, now)
        started = 0
        self._rate_held = False
        for message in due:
            if len(self._busy) >= self.policy.parallel:
                break
            # Asked before the circuit: a half-open circuit's probe, once allowed, must go.
            if self.rate_limit is not None and not self.rate_limit.ready():
                self._rate_held = True  # not an attempt: a later round sends it
                break
            if not self.circuit.allows():
                break
            if self.rate_limit is not None:
                self.rate_limit.take()
            task = asyncio.create_task(self._deliver(message))
            self._busy[message.ordering_key] = task
            task.add_done_callback(functools.partial(self._done, message.ordering_key))
            started += 1
        return started

    def nudge(self) -> None:
        """Look at the outbox now (something was decided: ``poll_s`` may be long)."""
        self._wake.set()

    def attempts_made(self, key: str) -> int:
        """How many attempts this sender knows were made to deliver message ``key`` (the view
        may not show the last ones yet)."""
        known = self._known.get(key)
        return known.attempts if known is not None else 0

    def rewind(self, position: int, hold_s: float = 60.0) -> None:
        """Look again at what was decided after ``position`` (messages requeued there: a
        replay, a redelivery), for at least ``hold_s``: the requeues reach the view a moment
        after they were asked for, and until then the view shows those messages as taken."""
        self._after = max(self.owed_after, min(self._after, position))
        self._floor_held_until = time.monotonic() + hold_s
        self._read, self._rewinds = [], self._rewinds + 1
        self._wake.set()

    def _done(self, ordering_key: str, _: asyncio.Task[None]) -> None:
        self._busy.pop(ordering_key, None)
        self._wake.set()

    def _due(self, messages: list[OutboxMessage], now: datetime) -> list[OutboxMessage]:
        """The first message of each key not taken yet, if it may be tried now."""
        heads: list[OutboxMessage] = []
        blocked: set[str] = set(self._busy)
        for message in messages:  # the first not taken of each key, as decided
            if message.ordering_key in blocked:
                continue
            state = self._state(message)
            if state.outcome in ("delivered", "duplicate"):
                continue  # taken; the view has not caught up yet
            blocked.add(message.ordering_key)  # later messages of this key wait for this one
            if state.outcome == "dead":
                continue
            if state.next_attempt_at is not None and state.next_attempt_at > now:
                continue
            heads.append(message)
        # Forget what the view shows now, and what lies before the first message not taken.
        shown = {m.key: m.attempts for m in messages}
        self._known = {
            k: v
            for k, v in self._known.items()
            if v.position > self._after and (k not in shown or shown[k] < v.attempts)
        }
        return heads

    def _state(self, message: OutboxMessage) -> _Known:
        known = self._known.get(message.key)
        if known is not None and known.attempts > message.attempts:
            return known
        return _Known(
            message.attempts,
            message.outcome or "",
            message.next_attempt_at,
            message.requeued_at,
            message.position,
        )

    async def _deliver(self, message: OutboxMessage) -> None:
        state = self._state(message)
        attempt = state.attempts + 1
        since_requeue = attempt - state.requeued_at  # attempts count afresh from a requeue
        key = self._key_for(message.key, self.name)
        next_at: datetime | None = None
        status: int | None = None
        reason = answer = ""
        began = time.monotonic()
        try:
            try:
                delivered = await self.destination.deliver(message, key)
            finally:
                duration_ms = max(0, round((time.monotonic() - began) * 1000))
        except DeliveryFailed as failed:
            # Retries are timed from the answer, by the wall clock (a hub's clock given for
            # its events' time may stand still in a test, or jump).
            now = datetime.now(UTC)
            status, reason, answer = failed.status, failed.reason, failed.excerpt
            dead = failed.permanent or since_requeue >= self.policy.max_attempts
            outcome = "dead" if dead else "failed"
            if failed.permanent:
                self.circuit.succeeded()  # a refusal of the content: the destination is up
            else:
                self.circuit.failed()
                asked = failed.retry_after_s
                if asked is not None and asked == asked and asked > 0:  # (not NaN)
                    self.circuit.hold(min(asked, self.policy.max_retry_after_s))
            if not dead:
                wait = self.policy.next_delay_s(since_requeue, self._rng, failed.retry_after_s)
                next_at = now + timedelta(seconds=wait)
        except Exception as exc:  # a dialect's bug: retried like an outage, and said
            now = datetime.now(UTC)
            log.exception("outbox %s: delivering %s failed", self.name, message.key)
            outcome, reason = "failed", f"{type(exc).__name__}: {exc}"
            self.circuit.failed()
            next_at = now + timedelta(seconds=self.policy.delay_s(since_requeue, self._rng))
        else:
            self.circuit.succeeded()
            outcome = "duplicate" if delivered.duplicate else "delivered"
            status, answer = delivered.status, delivered.excerpt
            self.stats.latencies_s.append((self._clock() - message.decided_at).total_seconds())
            self._kill_point()
        self._count(outcome)
        self._known[message.key] = _Known(
            attempt, outcome, next_at, message.requeued_at, message.position
        )
        if outcome in ("failed", "dead"):
            log.warning(
                "outbox %s: %s of order %s, attempt %d: %s%s",
                self.name, outcome, message.ordering_key, attempt, reason,
                f" (next at {next_at:%H:%M:%S})" if next_at else "",
            )  # fmt: skip
        stamped = self._clock()  # the attempt's event time: the hub's clock
        await self._record(
            message, attempt, outcome, status, reason, answer, next_at, stamped, duration_ms
        )

    def _count(self, outcome: str) -> None:
        if outcome == "delivered":
            self.stats.delivered += 1
        elif outcome == "duplicate":
            self.stats.duplicates += 1
        elif outcome == "failed":
            self.stats.failed += 1
        else:
            self.stats.dead += 1

    def _kill_point(self) -> None:
        if self._kill_after is None:
            return
        self._kill_after -= 1
        if self._kill_after <= 0:
            # Between the destination's "taken" and the stored attempt: the crash test's point.
            log.warning("failpoint: killing the process after a delivery, before its record")
            os.kill(os.getpid(), signal.SIGKILL)

    async def _record(
        self,
        message: OutboxMessage,
        attempt: int,
        outcome: str,
        status: int | None,
        reason: str,
        answer: str,
        next_at: datetime | None,
        now: datetime,
        duration_ms: int,
    ) -> None:
        data = {
            "order_id": message.ordering_key,
            "message_id": message.key,
            "destination": self.name,
            "attempt": attempt,
            "outcome": outcome,
            "status_code": status if status is not None and 100 <= status <= 599 else None,
            "reason": excerpt(reason),
            "excerpt": excerpt(answer),
            "next_attempt_at": next_at.isoformat() if next_at else None,
            "duration_ms": duration_ms,  # how long the destination took (monotonic)
        }
        # Each attempt is a fact of its own: its id is never another's, even when its number
        # is (a requeue counted from a view that had not seen the last attempts yet).
        event_id = f"attempt-{message.key}-{self.name}-{attempt}-{uuid.uuid4().hex[:12]}"
        event = attempt_event(self._site, event_id, message, now, data)
        try:
            await self._publisher.publish(event)
        except Exception as exc:
            # Not stored: the outcome is remembered here; after a restart the message goes
            # again with the same key, which the destination drops as a repeat.
            log.warning("outbox %s: the attempt could not be recorded (%s)", self.name, exc)

    async def close(self) -> None:
        await self.destination.close()


@dataclass
class InMemoryDestination:
    """A ``Destination`` in memory — the tests' fake, and the demo's simulated ERP: takes
    messages and keeps them by key (a repeated key is a duplicate, as a real ERP with
    idempotency keys answers), or fails as told."""

    name: str = "fake-erp"
    kinds: tuple[str, ...] = ("erp.confirmation",)
    taken: dict[str, OutboxMessage] = field(default_factory=dict)  # by idempotency key
    calls: int = 0
    down: bool = False  # fail, retryably
    refuse: bool = False  # fail for good
    rate_per_s: float | None = None  # the sender's rate limit for it (None: unlimited)

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        self.calls += 1
        if self.down:
            raise DeliveryFailed("connection refused")
        if self.refuse:
            raise DeliveryFailed("refused: quantity not allowed", status=400, permanent=True)
        if key in self.taken:
            return Delivered(200, "already taken", duplicate=True)
        self.taken[key] = message
        return Delivered(201, '{"ok": true}')

    async def close(self) -> None:
        pass


class Requeue:
    """Asks for a dead (or failed) message to be tried again now, for one destination: stored
    as a ``requeued`` attempt record, from which its attempts count again (the API's retry)."""

    def __init__(
        self,
        publisher: EventPublisher,
        site: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._publisher, self._site, self._clock = publisher, site, clock

    async def __call__(self, message: OutboxMessage, destination: str, asker: Asker) -> None:
        now = self._clock()
        by = asker.by
        data = {
            "order_id": message.ordering_key,
            "message_id": message.key,
            "destination": destination,
            "attempt": max(message.attempts, 1),
            "outcome": "requeued",
            "status_code": None,
            "reason": excerpt(f"requeued by {by}"),
            "excerpt": "",
            # (the senders time retries by the wall clock, whatever the hub's clock says)
            "next_attempt_at": datetime.now(UTC).isoformat(),
        }
        # Once per state: asking again before it was tried is the same request (the same id).
        event_id = f"requeue-{message.key}-{destination}-{message.attempts}"
        event = attempt_event(self._site, event_id, message, now, data)
        # Named as the asker's doing (its API key), not the outbox's.
        await self._publisher.publish(event.model_copy(update=asker.attributes()))
