"""Part counters by event time: how many parts each reading of a cumulative counter adds.

A machine's counter readings are taken in event-time order (ties: the lower count first),
whatever order they arrived in. Each reading adds what it moved on from the one before it:

- the first reading is the baseline and adds nothing;
- an increase adds the difference; a decrease is a reset and adds the new value (the parts made
  since the reset);
- a step that would add more than ``max_per_reading`` is implausible: it adds nothing, and is
  kept and flagged. If the next reading follows on from the one before the implausible one, that
  one was a glitch and the next counts from before it (0, 10, 2^63-1, 15 adds 10 then 5); if the
  next follows on from the implausible one, the counter was re-based there and counting goes on
  from it (100, 1,000,000, 1,000,001 adds 1).

So a reading's share depends only on the two readings before it: a late reading that falls
between two known ones takes its share and changes what the next two add, and a window's
figures need only the two readings before it. Worked examples are in ``docs/oee.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter

BASELINE, COUNTED, RESET, IMPLAUSIBLE = "baseline", "counted", "reset", "implausible"
CONTEXT = 2  # readings before a window that decide what the window's readings add


@dataclass(frozen=True)
class CounterReading:
    time: datetime
    kind: str  # "all" or "bad"
    count: int


@dataclass(frozen=True)
class CounterStep:
    """One reading and what it adds."""

    reading: CounterReading
    increment: int
    status: str  # baseline, counted, reset or implausible
    previous: int | None  # the count it was compared with


def _step(before: int, count: int, limit: int) -> tuple[int, str]:
    """What ``count`` adds after ``before``, judged on the two alone."""
    added, status = (count - before, COUNTED) if count >= before else (count, RESET)
    return (0, IMPLAUSIBLE) if added > limit else (added, status)


def reading_order(reading: CounterReading) -> tuple[datetime, int]:
    return reading.time, reading.count


def fold_counts(counts: Sequence[int], limit: int) -> Iterator[tuple[int, str, int | None]]:
    """(increment, status, count compared with) of each count, in the order given (event-time
    order): the rule of the module doc, on plain integers."""
    # Whether the step from the reading before last to the last one was implausible on its
    # own (before any glitch reading): decides whether the next reading may skip it.
    last_implausible = False
    for i, count in enumerate(counts):
        if i == 0:
            yield 0, BASELINE, None
            continue
        before = counts[i - 1]
        added, status = _step(before, count, limit)
        raw_implausible = status == IMPLAUSIBLE
        if last_implausible:
            # The reading before was implausible: a glitch if this one follows on from the
            # one before it.
            earlier = counts[i - 2]
            glitch_added, glitch_status = _step(earlier, count, limit)
            if glitch_status != IMPLAUSIBLE:
                added, status, before = glitch_added, glitch_status, earlier
        last_implausible = raw_implausible
        yield added, status, before


def counter_steps(readings: Iterable[CounterReading], max_per_reading: int) -> list[CounterStep]:
    """The steps of one counter kind's readings, in event-time order. The first two readings
    have no (or too little) history: give every reading of a window plus the ``CONTEXT`` before
    it, and read only the window's steps."""
    ordered = sorted(readings, key=reading_order)
    folded = fold_counts([r.count for r in ordered], max_per_reading)
    return [
        CounterStep(reading, added, status, before)
        for reading, (added, status, before) in zip(ordered, folded, strict=True)
    ]


def by_kind(readings: Iterable[CounterReading]) -> dict[str, list[CounterReading]]:
    """Each counter's readings in event-time order (``reading_order``), kinds in name order."""
    kinds: dict[str, list[CounterReading]] = {}
    for reading in sorted(readings, key=attrgetter("time", "count")):  # as reading_order
        kinds.setdefault(reading.kind, []).append(reading)
    return dict(sorted(kinds.items()))


@dataclass
class CounterTotals:
    """A machine's counters over its whole history."""

    produced: int = 0
    bad: int = 0
    resets: int = 0
    implausible: int = 0
    last_implausible: CounterStep | None = None

    def count_many(self, kind: str, added: int, resets: int, implausible: int) -> None:
        if kind == "bad":
            self.bad += added
        else:
            self.produced += added
        self.resets += resets
        self.implausible += implausible

    def count(self, kind: str, increment: int, status: str) -> None:
        if kind == "bad":
            self.bad += increment
        else:
            self.produced += increment
        if status == RESET:
            self.resets += 1
        elif status == IMPLAUSIBLE:
            self.implausible += 1


def counter_totals(readings: Sequence[CounterReading], max_per_reading: int) -> CounterTotals:
    totals = CounterTotals()
    for kind, ordered in by_kind(readings).items():
        folded = fold_counts([reading.count for reading in ordered], max_per_reading)
        for reading, (added, status, before) in zip(ordered, folded, strict=True):
            totals.count(kind, added, status)
            last = totals.last_implausible
            if status == IMPLAUSIBLE and (
                last is None or reading_order(reading) > reading_order(last.reading)
            ):
                totals.last_implausible = CounterStep(reading, 0, status, before)
    return totals
