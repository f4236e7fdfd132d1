"""What a machine reported, item by item, turned into contract events: only changes, with
execution, controller mode and program carried together, and conditions tracked per item.
Shared by the protocols that report named data items (SHDR, MTConnect)."""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import Literal

from adapters.machines.base import CONNECTION_CODE, MachineEvents, report_bad_input
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


class MachineObserver:
    """One machine's last reported state; ``value`` and ``condition`` return the events a new
    observation makes (none when nothing changed)."""

    def __init__(self, events: MachineEvents, log: logging.Logger) -> None:
        self.events = events
        self._log = log
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

    def lost(self, why: str) -> list[CloudEvent]:
        """The peer is out of reach: UNAVAILABLE and a connection condition, once per loss."""
        if self.available is False:
            return []
        self.available = False
        self.connection_down = True
        self.lost_at = datetime.now(UTC)
        # Keyed by the moment of the loss: unique across restarts of the adapter, unlike a count.
        self._loss_key = f"lost|{time.time_ns()}"
        return [
            self.events.availability(False, self.lost_at, self._loss_key),
            self.events.condition(
                "unavailable", self.lost_at, self._loss_key, CONNECTION_CODE, why[:1024]
            ),
        ]

    def bad(self, what: str, raw: object) -> list[CloudEvent]:
        key = f"{time.time_ns()}|{raw!r:.200}"
        return [report_bad_input(self._log, self.events, what, raw, key)]

    def value(
        self, meaning: Meaning, key: str, value: str, at: datetime, uid: str
    ) -> list[CloudEvent]:
        if meaning == "availability":
            if value not in ("AVAILABLE", "UNAVAILABLE"):
                return self.bad(f"{key}: availability {value!r} is not valid", value)
            available = value == "AVAILABLE"
            if available == self.available:
                return []
            self.available = available
            if self.lost_at is not None and at < self.lost_at:
                # Re-read after a loss (a snapshot repeats the old observation): the machine is
                # back now, not when that value was first reported, which the hub would place
                # before the loss and ignore.
                at = datetime.now(UTC)
            # After a loss the same observation read again must not pass for a duplicate of the
            # one before the loss: its key carries the loss it ends.
            events = [self.events.availability(available, at, f"{uid}|{self._loss_key}")]
            if available and self.connection_down:
                self.connection_down = False
                events.append(
                    self.events.condition("normal", at, f"back|{self._loss_key}", CONNECTION_CODE)
                )
            return events
        if meaning in ("part_count", "bad_part_count"):
            return self._count(meaning, key, value, at, uid)
        if meaning == "execution":
            if value not in EXECUTIONS:
                return self.bad(f"{key}: execution {value!r} is not valid", value)
            if value == self.execution:
                return []
            self.execution = value
        elif meaning == "controller_mode":
            if value not in MODES and value != "UNAVAILABLE":
                return self.bad(f"{key}: controller mode {value!r} is not valid", value)
            mode = value if value in MODES else None
            if mode == self.mode:
                return []
            self.mode = mode
        elif meaning == "program":
            program = None if value in ("", "UNAVAILABLE") else value[:256]
            if program == self.program:
                return []
            self.program = program
        else:
            return []
        if self.execution is None:
            return []  # mode or program before any execution: carried by the first execution
        return [self.events.execution(self.execution, at, uid, self.mode, self.program)]

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
        if self.counts.get(kind) == count:
            return []
        self.counts[kind] = count
        return [self.events.part_count(count, kind, at, uid)]

    def condition(
        self, key: str, level: str, code: str | None, text: str | None, at: datetime, uid: str
    ) -> list[CloudEvent]:
        normalized = CONDITION_LEVELS.get(level.upper())
        if normalized is None:
            return self.bad(f"condition {key!r}: level {level!r} is not valid", level)
        active = self.active_codes.setdefault(key, {})
        if normalized == "normal":
            # NORMAL without a code clears this item's conditions, not the whole machine's.
            cleared = sorted(active) if code is None else [code] if code in active else []
            for cleared_code in cleared:
                del active[cleared_code]
            return [self.events.condition("normal", at, f"{uid}|{c}", c) for c in cleared]
        native = code or key
        if active.get(native) == normalized and normalized != "unavailable":
            return []
        active[native] = normalized  # new, or the same code escalating or easing
        return [self.events.condition(normalized, at, uid, native, text)]
