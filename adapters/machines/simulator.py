"""A simulated factory: N machines and an ERP, seeded and deterministic.

Each machine runs the orders the simulated ERP releases to it: a cycle time per part with jitter,
micro-stops (a performance loss), long stops with an alarm and an operator's reason (sometimes
given late), UNAVAILABLE spells (lost connection), the odd counter reset and some bad parts.
Event times are simulated time from ``start``; ``speed`` maps it to wall time (0 = as fast as
possible). The same seed and start give the same events with the same ids, so repeating a run
publishes nothing new; a run with another start is a new stretch of production.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts import CloudEvent
from hub.ports import EventPublisher

REASONS = ("mechanical/spindle", "material/waiting", "tooling/change", "quality/inspection")
ALARMS = (("1010", "SPINDLE OVERLOAD"), ("2043", "COOLANT LOW"), ("3001", "DOOR INTERLOCK"))


@dataclass(frozen=True)
class SimulatorConfig:
    machines: int = 10
    seed: int = 1
    start: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    site: str = "default"
    micro_stop_rate: float = 0.04
    long_stop_rate: float = 0.008
    unavailable_rate: float = 0.002
    bad_part_rate: float = 0.03
    counter_reset_rate: float = 0.001
    late_reason_rate: float = 0.3


def machine_name(index: int) -> str:
    return f"M{index + 1:04d}"


class _MachineScript:
    """One machine's events in time order (plus the ERP releases of its orders)."""

    def __init__(self, config: SimulatorConfig, index: int) -> None:
        self.config = config
        self.machine_id = machine_name(index)
        self.rng = random.Random(f"{config.seed}/{self.machine_id}")
        self.cycle_s = self.rng.uniform(20, 90)
        self._seq = itertools.count(1)
        self._held: list[tuple[datetime, int, CloudEvent]] = []  # late events, e.g. reasons
        self._orders = itertools.count(1)
        # The same seed and start give the same events; another start (the default is now) is
        # another run, whose events and orders must not pass for repeats of this one's.
        self.run_tag = config.start.strftime("%y%m%d%H%M%S")

    def _event(
        self, at: datetime, type_: str, data: dict[str, Any], subject: str | None = None
    ) -> CloudEvent:
        n = next(self._seq)
        return CloudEvent(
            specversion="1.0",
            id=f"sim-{self.config.seed}-{self.run_tag}-{self.machine_id}-{n}",
            source=f"urn:mes-hub:simulator:{self.config.seed}/{self.machine_id}",
            type=type_,
            time=at,
            subject=subject or self.machine_id,
            data=data,
        )

    def _flush_until(self, now: datetime) -> Iterator[CloudEvent]:
        while self._held and self._held[0][0] <= now:
            yield heapq.heappop(self._held)[2]

    def events(self) -> Iterator[CloudEvent]:
        rng, cfg = self.rng, self.config
        t = cfg.start + timedelta(seconds=rng.uniform(0, 5))
        counter_all = rng.randint(0, 50_000)
        counter_bad = rng.randint(0, 500)
        yield self._event(t, "mes.machine.availability.v1", {"availability": "AVAILABLE"})
        yield self._event(
            t, "mes.machine.execution.v1", {"execution": "READY", "mode": "AUTOMATIC"}
        )
        yield self._event(t, "mes.machine.partcount.v1", {"count": counter_all, "kind": "all"})
        yield self._event(t, "mes.machine.partcount.v1", {"count": counter_bad, "kind": "bad"})
        while True:
            order_id = f"SO-{self.run_tag}-{self.machine_id}-{next(self._orders):03d}"
            quantity = rng.choice((20, 50, 100, 200))
            ideal = round(self.cycle_s * rng.uniform(0.85, 0.95), 1)
            due = t + timedelta(seconds=quantity * self.cycle_s * rng.uniform(1.1, 1.6))
            yield self._event(
                t,
                "mes.erp.order.released.v1",
                {
                    "order_id": order_id,
                    "part_number": f"P-{rng.randint(100, 999)}",
                    "quantity": quantity,
                    "due": due.isoformat(),
                    "customer": rng.choice(("ACME", "Globex", "Initech", None)),
                    "machine_id": self.machine_id,
                    "ideal_cycle_time_s": ideal,
                },
                subject=order_id,
            )
            yield self._event(t, "mes.operator.order_started.v1", {"order_id": order_id})
            program = f"O{rng.randint(1000, 9999)}"
            yield self._event(
                t, "mes.machine.execution.v1", {"execution": "ACTIVE", "program": program}
            )
            for _ in range(quantity):
                t += timedelta(seconds=max(1.0, rng.gauss(self.cycle_s, self.cycle_s * 0.05)))
                yield from self._flush_until(t)
                if rng.random() < cfg.counter_reset_rate:
                    counter_all = 0  # an operator cleared the counter; this part counts from 0
                counter_all += 1
                yield self._event(
                    t, "mes.machine.partcount.v1", {"count": counter_all, "kind": "all"}
                )
                if rng.random() < cfg.bad_part_rate:
                    counter_bad += 1
                    yield self._event(
                        t, "mes.machine.partcount.v1", {"count": counter_bad, "kind": "bad"}
                    )
                roll = rng.random()
                if roll < cfg.micro_stop_rate:
                    t = yield from self._stop(t, rng.uniform(10, 100), "INTERRUPTED", program)
                elif roll < cfg.micro_stop_rate + cfg.long_stop_rate:
                    t = yield from self._long_stop(t, program)
                elif roll < cfg.micro_stop_rate + cfg.long_stop_rate + cfg.unavailable_rate:
                    t = yield from self._unavailable(t, program)
            yield self._event(
                t,
                "mes.machine.execution.v1",
                {"execution": "PROGRAM_COMPLETED", "program": program},
            )
            yield self._event(t, "mes.operator.order_ended.v1", {"order_id": order_id})
            t += timedelta(seconds=rng.uniform(120, 600))  # changeover
            yield from self._flush_until(t)

    def _stop(
        self, t: datetime, seconds: float, execution: str, program: str
    ) -> Generator[CloudEvent, None, datetime]:
        yield self._event(t, "mes.machine.execution.v1", {"execution": execution})
        t += timedelta(seconds=seconds)
        yield from self._flush_until(t)
        yield self._event(
            t, "mes.machine.execution.v1", {"execution": "ACTIVE", "program": program}
        )
        return t

    def _long_stop(self, t: datetime, program: str) -> Generator[CloudEvent, None, datetime]:
        rng = self.rng
        code, text = rng.choice(ALARMS)
        start = t
        yield self._event(
            t, "mes.machine.condition.v1", {"level": "fault", "native_code": code, "message": text}
        )
        t = yield from self._stop(t, rng.uniform(300, 2700), "STOPPED", program)
        yield self._event(t, "mes.machine.condition.v1", {"level": "normal", "native_code": code})
        reason = {
            "reason": rng.choice(REASONS),
            "start": start.isoformat(),
            "end": t.isoformat(),
            "operator": f"op{rng.randint(1, 9)}",
        }
        if rng.random() < self.config.late_reason_rate:
            # The operator gives the reason later: it must re-label the stop it covers.
            given = t + timedelta(seconds=rng.uniform(600, 3600))
            event = self._event(given, "mes.operator.downtime_reason.v1", reason)
            heapq.heappush(self._held, (given, next(self._seq), event))
        else:
            yield self._event(t, "mes.operator.downtime_reason.v1", reason)
        return t

    def _unavailable(self, t: datetime, program: str) -> Generator[CloudEvent, None, datetime]:
        # Losing the machine, an adapter reports every data item UNAVAILABLE, execution too.
        yield self._event(t, "mes.machine.availability.v1", {"availability": "UNAVAILABLE"})
        yield self._event(t, "mes.machine.execution.v1", {"execution": "UNAVAILABLE"})
        t += timedelta(seconds=self.rng.uniform(120, 1200))
        yield from self._flush_until(t)
        yield self._event(t, "mes.machine.availability.v1", {"availability": "AVAILABLE"})
        yield self._event(
            t, "mes.machine.execution.v1", {"execution": "ACTIVE", "program": program}
        )
        return t


def factory_events(config: SimulatorConfig) -> Iterator[CloudEvent]:
    """Every machine's events merged in event-time order."""
    scripts = [_MachineScript(config, i).events() for i in range(config.machines)]
    return heapq.merge(*scripts, key=lambda e: e.time)


def past_start(speed: float, duration_s: float | None) -> datetime:
    """A simulated start that lets ``speed`` show: a run of ``duration_s`` wall seconds ends at
    about now; an endless one (or one flat out) replays the last day, then goes on in real time."""
    now = datetime.now(UTC).replace(microsecond=0)
    if speed > 0 and duration_s:
        return now - timedelta(seconds=speed * duration_s)
    return now - timedelta(days=1)


@dataclass
class SimulatorRun:
    published: int = 0
    duplicates: int = 0
    simulated_until: datetime | None = None


async def run_simulator(
    config: SimulatorConfig,
    publisher: EventPublisher,
    *,
    speed: float = 60.0,
    duration_s: float | None = None,
    max_events: int | None = None,
    batch: int = 500,
    progress: SimulatorRun | None = None,
) -> SimulatorRun:
    """Publish the factory's events. ``speed`` simulated seconds pass per wall second (0: no
    waiting), but never ahead of the wall clock; stops after ``duration_s`` wall seconds or
    ``max_events`` events, if given."""
    run = progress or SimulatorRun()
    wall_start = time.monotonic()
    pending: list[CloudEvent] = []

    async def flush() -> None:
        receipts = await publisher.publish_many(pending)
        run.published += sum(1 for r in receipts if not r.duplicate)
        run.duplicates += sum(1 for r in receipts if r.duplicate)
        pending.clear()

    for event in factory_events(config):
        if max_events is not None and run.published + run.duplicates + len(pending) >= max_events:
            break
        elapsed = time.monotonic() - wall_start
        if duration_s is not None and elapsed >= duration_s:
            break
        wait = 0.0
        if speed > 0:
            wait = (event.time - config.start).total_seconds() / speed - elapsed
        # A machine cannot report the future (the hub refuses it): a simulation that has caught
        # up with the present goes on in real time.
        wait = max(wait, (event.time - datetime.now(UTC)).total_seconds())
        if wait > 0:
            if pending:
                await flush()
            if duration_s is not None:
                wait = min(wait, duration_s - (time.monotonic() - wall_start))
            if wait > 0:
                await asyncio.sleep(wait)
            if duration_s is not None and time.monotonic() - wall_start >= duration_s:
                break
        pending.append(event)
        run.simulated_until = event.time
        if len(pending) >= batch:
            await flush()
    if pending:
        await flush()
    return run
