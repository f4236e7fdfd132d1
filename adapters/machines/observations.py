"""What a machine reported, item by item, turned into contract events: only changes, with
execution, controller mode and program carried together, and conditions tracked per item.
Shared by the protocols that report named data items (SHDR, MTConnect)."""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

from adapters.machines.base import CONNECTION_CODE, MachineEvents, Published, report_bad_input
from contracts import CloudEvent

Meaning = Literal[
    "availability", "execution", "controller_mode", "program", "part_count", "bad_part_count",
    "condition", "message", "ignore",
]  # fmt: skip

EXECUTIONS = frozenset(
    {
        "ACTIVE", "READY", "INTERRUPTED", "FEED_HOLD", "STOPPED", "OPTIONAL_STOP",
        "PROGRAM_STOPPED", "PROGRAM_COMPLETED", "WAIT", "UNAVAILABLE",
    }
)  # fmt: skip
MODES = frozenset({"AUTOMATIC", "MANUAL", "MANUAL_DATA_INPUT", "SEMI_AUTOMATIC", "EDIT"})
MAX_COUNT = 2**63 - 1  # what a 64-bit counter (and the store) can hold
CONDITION_LEVELS = {"NORMAL": "normal", "WARNING": "warning", "FAULT": "fault",
                    "UNAVAILABLE": "unavailable"}  # fmt: skip


_TYPE_MEANINGS: dict[str, Meaning] = {
    "AVAILABILITY": "availability",
    "EXECUTION": "execution",
    "CONTROLLER_MODE": "controller_mode",
    "PROGRAM": "program",
}


def data_item_meaning(type_: str, sub_type: str | None, category: str) -> Meaning | None:
    if category == "CONDITION":
        return "condition"
    if type_ == "PART_COUNT":
        return "bad_part_count" if (sub_type or "").upper() in ("BAD", "REJECT") else "part_count"
    if type_ == "MESSAGE":
        return "message"
    return _TYPE_MEANINGS.get(type_)


_GROUP: dict[Meaning, str] = {
    "execution": "execution",
    "controller_mode": "mode",
    "program": "program",
}
MAX_CONDITION_ITEMS = 4096  # (item, code) pairs whose history is kept per machine
MAX_WAITING = 64  # moments whose mode or program waits for their execution


class MachineObserver:
    """One machine's last reported state; ``value`` and ``condition`` return the events a new
    observation makes (none when it repeats what was published).

    A reading is suppressed only when it repeats the value last published for its item and
    that value is already in effect at the reading's time (``Published``): a reading from
    before what was published (a capture's next recording, a replayed buffer) is published.
    Its id differs from the first reading of the same value, as ids carry the reading's time
    (SHDR) or sequence (MTConnect)."""

    def __init__(self, events: MachineEvents, log: logging.Logger) -> None:
        self.events = events
        self._log = log
        # The latest value read for each item (published or, before any execution, waiting).
        self.execution: str | None = None
        self.mode: str | None = None
        self.program: str | None = None
        self.counts: dict[str, int] = {}
        self.available: bool | None = None
        # condition item -> {active native code: level}
        self.active_codes: dict[str, dict[str, str]] = {}
        self.connection_down = False  # the ADAPTER_CONNECTION condition is active
        self.lost_at: datetime | None = None  # when the peer was last lost
        self._loss_key = "never"
        # What was published, item by item, by event time.
        self._published: dict[str, Published[Any]] = {
            item: Published()
            for item in ("availability", "execution", "mode", "program", "count:all", "count:bad")
        }
        self._conditions: dict[tuple[str, str], Published[str]] = {}
        # Mode or program read at a time before any execution published (a new recording's
        # first line), held for the execution of the same moment:
        # time -> (key of the first such reading, {item: value})
        self._waiting: dict[datetime, tuple[str, dict[str, Any]]] = {}

    def published(self, item: str) -> Published[Any]:
        """What was published for ``availability``, ``execution``, ``mode``, ``program``,
        ``count:all`` or ``count:bad``."""
        return self._published[item]

    def lost(self, why: str) -> list[CloudEvent]:
        """The peer is out of reach: UNAVAILABLE and a connection condition, once per loss."""
        if self.available is False:
            return []
        self.available = False
        self.connection_down = True
        self.lost_at = datetime.now(UTC)
        # Keyed by the moment of the loss: unique across restarts of the adapter, unlike a count.
        self._loss_key = f"lost|{time.time_ns()}"
        self.published("availability").add(False, self.lost_at)
        return [
            self.events.availability(False, self.lost_at, self._loss_key),
            self.events.condition(
                "unavailable", self.lost_at, self._loss_key, CONNECTION_CODE, why[:1024]
            ),
        ]

    def reset_conditions(self, at: datetime, key: str) -> CloudEvent:
        """A ``normal`` without a code, for an adapter that sees all of a machine's conditions
        at once (a poll, a birth): the hub clears every condition of the machine it holds
        (what an earlier run, or the time out of reach, left), and what the adapter reads
        next raises again those still active. This observer forgets which codes it published
        active, so that it publishes them again."""
        for codes in self.active_codes.values():
            codes.clear()
        return self.events.condition("normal", at, key)

    def bad(self, what: str, raw: object) -> list[CloudEvent]:
        key = f"{time.time_ns()}|{raw!r:.200}"
        return [report_bad_input(self._log, self.events, what, raw, key)]

    def value(
        self, meaning: Meaning, key: str, value: str, at: datetime, uid: str
    ) -> list[CloudEvent]:
        if meaning == "availability":
            if value not in ("AVAILABLE", "UNAVAILABLE"):
                return self.bad(f"{key}: availability {value!r} is not valid", value)
            return self._availability(value == "AVAILABLE", at, uid)
        if meaning in ("part_count", "bad_part_count"):
            return self._count(meaning, key, value, at, uid)
        item = _GROUP.get(meaning)
        if item is None:
            return []
        new: str | None
        if meaning == "execution":
            if value not in EXECUTIONS:
                return self.bad(f"{key}: execution {value!r} is not valid", value)
            new = value
        elif meaning == "controller_mode":
            if value not in MODES and value != "UNAVAILABLE":
                return self.bad(f"{key}: controller mode {value!r} is not valid", value)
            new = value if value in MODES else None
        else:
            new = None if value in ("", "UNAVAILABLE") else value[:256]
        waits = item == "execution" and bool(self._waiting) and at in self._waiting
        if self._published[item].repeats(new, at) and not waits:
            return []
        setattr(self, item, new)
        if item != "execution":
            if self.execution is None:
                return []  # mode or program before any execution: carried by the first one
            if not self._published["execution"].known_at(at):
                # Earlier than any execution published (a new recording's first line): it goes
                # with this moment's execution, as a first mode goes with the first execution,
                # never with an execution from later on (which would be a made-up fact).
                if at not in self._waiting and len(self._waiting) >= MAX_WAITING:
                    del self._waiting[min(self._waiting)]
                self._waiting.setdefault(at, (uid, {}))[1][item] = new
                return []
        read = {item: new}
        if waits or (self._waiting and at in self._waiting):
            read = {**self._waiting.pop(at)[1], item: new}
        return [self._execution_event(at, uid, read)]

    def polled(
        self,
        execution: str | None,
        mode: str | None,
        program: str | None,
        at: datetime,
        *,
        program_read: bool = False,
    ) -> list[CloudEvent]:
        """A polled control's execution, mode and program as read in one poll: one execution
        event when any of them changed, never one per item (which would tell the hub of
        combinations the machine never was in). ``None`` is "not read this poll" (a program
        hidden while the control is busy, a mode it did not answer): it stays as last
        published, never a made-up change; with ``program_read``, a ``None`` program was read
        and is none (a control in MDI). The values must be the contract's already."""
        read = {
            "execution": execution or self.execution,
            "mode": mode or self.mode,
            "program": program if program is not None or program_read else self.program,
        }
        if all(self._published[item].repeats(value, at) for item, value in read.items()):
            return []
        for item, value in read.items():
            self._published[item].add(value, at)
            setattr(self, item, value)
        uid = f"execution|{at.isoformat()}|{read['execution']}|{read['mode']}|{read['program']}"
        return [
            self.events.execution(
                read["execution"] or "UNAVAILABLE", at, uid, read["mode"], read["program"]
            )
        ]

    def _execution_event(self, at: datetime, uid: str, read: dict[str, Any]) -> CloudEvent:
        """One execution event at ``at``: the items ``read`` then, the others as in effect at
        that time (as published), else as last read."""
        values = []
        for item in ("execution", "mode", "program"):
            history = self._published[item]
            value = read[item] if item in read else history.at(at, getattr(self, item))
            history.add(value, at)
            values.append(value)
        return self.events.execution(values[0], at, uid, values[1], values[2])

    def _availability(self, available: bool, at: datetime, uid: str) -> list[CloudEvent]:
        history = self.published("availability")
        changed = available != self.available
        if not changed and history.repeats(available, at):
            return []
        self.available = available
        events: list[CloudEvent] = []
        key = f"{uid}|never"  # "never": no loss (the key of the first session)
        if changed and self.connection_down and self.lost_at is not None and at < self.lost_at:
            # Re-read after a loss (a snapshot repeats the old observation): the machine is
            # back now, not when that value was first reported, which the hub would place
            # before the loss and ignore. The reading itself is kept too, unless the hub has
            # it already.
            if history.at(at, None) != available:
                history.add(available, at)
                events.append(self.events.availability(available, at, key))
            at = datetime.now(UTC)
            # The same observation read again after another loss must not pass for a
            # duplicate of this one: its key carries the loss it ends.
            key = f"{uid}|{self._loss_key}"
        history.add(available, at)
        events.append(self.events.availability(available, at, key))
        if available and self.connection_down:
            self.connection_down = False
            events.append(
                self.events.condition("normal", at, f"back|{self._loss_key}", CONNECTION_CODE)
            )
        return events

    def _count(
        self, meaning: Meaning, key: str, value: str, at: datetime, uid: str
    ) -> list[CloudEvent]:
        if value == "UNAVAILABLE":
            return []
        try:
            number = float(value)
        except ValueError:
            return self.bad(f"{key}: part count {value!r} is not a number", value)
        if not math.isfinite(number) or number < 0 or number != int(number):
            return self.bad(f"{key}: part count {value!r} is not a whole number ≥ 0", value)
        if number > MAX_COUNT:
            return self.bad(f"{key}: part count {value!r} is beyond any counter", value)
        kind = "bad" if meaning == "bad_part_count" else "all"
        count = int(number)
        history = self._published["count:bad" if kind == "bad" else "count:all"]
        if history.repeats(count, at):
            return []
        self.counts[kind] = count
        history.add(count, at)
        return [self.events.part_count(count, kind, at, uid)]

    def _condition_history(self, key: str, code: str) -> Published[str]:
        history = self._conditions.get((key, code))
        if history is None:
            if len(self._conditions) >= MAX_CONDITION_ITEMS:
                # Forget the oldest: its next reading is published again (dropped downstream
                # when it is the same fact), never suppressed wrongly.
                del self._conditions[next(iter(self._conditions))]
            history = self._conditions[(key, code)] = Published()
        return history

    def condition(
        self, key: str, level: str, code: str | None, text: str | None, at: datetime, uid: str
    ) -> list[CloudEvent]:
        normalized = CONDITION_LEVELS.get(level.upper())
        if normalized is None:
            return self.bad(f"condition {key!r}: level {level!r} is not valid", level)
        active = self.active_codes.setdefault(key, {})
        if normalized == "normal":
            # NORMAL without a code clears this item's conditions, not the whole machine's:
            # those active now, and those that were active at its time (a reading from before
            # what was published).
            if code is None:
                at_then = {c for (k, c), h in self._conditions.items()
                           if k == key and h.at(at, "normal") != "normal"}  # fmt: skip
                cleared = sorted(set(active) | at_then)
            else:
                history = self._conditions.get((key, code))
                was = history.at(at, "normal") if history is not None else "normal"
                cleared = [code] if code in active or was != "normal" else []
            events = []
            for cleared_code in cleared:
                active.pop(cleared_code, None)
                self._condition_history(key, cleared_code).add("normal", at)
                events.append(self.events.condition("normal", at, f"{uid}|{cleared_code}",
                                                    cleared_code))  # fmt: skip
            return events
        native = code or key
        history = self._condition_history(key, native)
        if (
            active.get(native) == normalized
            and normalized != "unavailable"
            and history.repeats(normalized, at)
        ):
            return []
        active[native] = normalized  # new, or the same code escalating or easing
        history.add(normalized, at)
        return [self.events.condition(normalized, at, uid, native, text)]
