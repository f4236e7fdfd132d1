"""The machine adapter port: configuration in, contract events out through a publisher.

Every protocol module (``mtconnect``, ``shdr``, ``opcua``, ``modbus``) provides an adapter class
that satisfies ``MachineAdapter``; ``adapters.machines.registry`` maps protocol names to them.
Adapters build their events with ``MachineEvents``, so ids, sources and types are uniform and a
re-read of the same machine data yields the same ids (dropped downstream as duplicates).

An adapter never crashes on what a peer sends: a malformed line, value or response is logged
with what was wrong and published as a ``warning`` condition with native code
``ADAPTER_INPUT`` (``report_bad_input``), and the adapter goes on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationInfo

from contracts import CloudEvent, ContractViolation, validate_envelope
from hub.ports import EventPublisher

BAD_INPUT_CODE = "ADAPTER_INPUT"
CONNECTION_CODE = "ADAPTER_CONNECTION"
V = TypeVar("V")
_UNKNOWN: Any = object()


class MachineAdapter(Protocol):
    """One adapter instance: one peer (agent, adapter, server or PLC), one or more machines."""

    protocol: ClassVar[str]

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        """Publish the machines' events until ``stop`` is set; reconnect on its own."""
        ...

    async def check(self) -> list[CloudEvent]:
        """Connect once and return what ``run`` would publish first (nothing is published)."""
        ...


class MachineEvents:
    """Builds one machine's contract events. ``source`` names the peer (e.g.
    ``mtconnect://agent:5000/OKUMA.123456``); ``key`` is what makes the fact unique at that peer
    (a sequence number, a line's timestamp and item, a node and its source timestamp), so the
    same fact read twice gets the same CloudEvent id."""

    def __init__(self, machine_id: str, source: str) -> None:
        self.machine_id = machine_id
        self.source = source

    def event(
        self, type_: str, data: dict[str, Any], time: datetime | None, key: str
    ) -> CloudEvent:
        digest = hashlib.sha256(f"{self.source}|{self.machine_id}|{type_}|{key}".encode())
        return CloudEvent(
            specversion="1.0",
            id=f"{self.machine_id}-{digest.hexdigest()[:32]}",
            source=self.source,
            type=type_,
            time=time or datetime.now(UTC),
            subject=self.machine_id,
            datacontenttype="application/json",
            data=data,
        )

    def availability(self, available: bool, time: datetime | None, key: str) -> CloudEvent:
        value = "AVAILABLE" if available else "UNAVAILABLE"
        return self.event("mes.machine.availability.v1", {"availability": value}, time, key)

    def execution(
        self,
        execution: str,
        time: datetime | None,
        key: str,
        mode: str | None = None,
        program: str | None = None,
    ) -> CloudEvent:
        data: dict[str, Any] = {"execution": execution}
        if mode is not None:
            data["mode"] = mode
        if program is not None:
            data["program"] = program
        return self.event("mes.machine.execution.v1", data, time, key)

    def part_count(self, count: int, kind: str, time: datetime | None, key: str) -> CloudEvent:
        data = {"count": count, "kind": kind}
        return self.event("mes.machine.partcount.v1", data, time, key)

    def condition(
        self,
        level: str,
        time: datetime | None,
        key: str,
        native_code: str | None = None,
        message: str | None = None,
    ) -> CloudEvent:
        data: dict[str, Any] = {"level": level}
        if native_code:
            data["native_code"] = native_code[:128]
        if message:
            data["message"] = message[:1024]
        return self.event("mes.machine.condition.v1", data, time, key)


class Published(Generic[V]):
    """What an adapter published for one item, by event time: which value was in effect at the
    hub when (as far as this adapter told it).

    The rule every adapter follows: a reading repeats what was published, and is suppressed,
    only when its value is the last one published for the item *and* that value is already in
    effect at the reading's time (a published reading at or before it, none of another value in
    between). A reading earlier than what was published for the item (a new recording of a
    capture whose timestamps jump backwards, a replayed buffer, a gateway forwarding old data)
    is published: nothing an adapter reads is silently dropped. About the ``limit`` latest
    readings by event time are kept; a reading older than all of them is published (its id is
    the same as when it was first read, so a re-read is still dropped downstream)."""

    __slots__ = ("_limit", "_times", "_values", "last")

    def __init__(self, limit: int = 1024) -> None:
        self._times: list[datetime] = []
        self._values: list[V] = []
        self._limit = limit
        self.last: V | None = None  # the value published most recently (whatever its time)

    def __bool__(self) -> bool:
        return bool(self._times)

    def at(self, when: datetime, default: Any = _UNKNOWN) -> V:
        """The value in effect at ``when``; ``default`` (or KeyError) before the first."""
        times = self._times
        if times and when >= times[-1]:
            return self._values[-1]  # the usual case: time goes forward
        index = bisect.bisect_right(times, when)
        if index:
            return self._values[index - 1]
        if default is _UNKNOWN:
            raise KeyError(when)
        return default  # type: ignore[no-any-return]

    def known_at(self, when: datetime) -> bool:
        return bool(self._times) and self._times[0] <= when

    def repeats(self, value: V, when: datetime) -> bool:
        """Whether publishing ``value`` at ``when`` would tell the hub nothing new."""
        return self.last == value and self.known_at(when) and self.at(when) == value

    def add(self, value: V, when: datetime) -> None:
        times = self._times
        if not times or when >= times[-1]:
            times.append(when)
            self._values.append(value)
        else:
            index = bisect.bisect_right(times, when)
            times.insert(index, when)
            self._values.insert(index, value)
        self.last = value
        if len(times) > self._limit + self._limit // 4:
            # Forget the oldest by event time, a quarter at a time.
            drop = len(times) - self._limit
            del times[:drop], self._values[:drop]


def url_host(host: str) -> str:
    """A host as it goes in a URL or a source: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


async def stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; whether it is (a polled adapter's pause)."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


S = TypeVar("S")


async def publish_or_keep(
    publisher: EventPublisher, events: list[CloudEvent], old: S, new: S, log: logging.Logger
) -> S:
    """A polled adapter's state after a poll: ``new`` once its events are published, ``old``
    if publishing failed, so the next poll finds the same changes again (nothing waits in
    memory; the store-and-forward buffer behind the publisher is what keeps events while NATS
    is away, so a failure here is that buffer failing)."""
    if not events:
        return new
    try:
        await publisher.publish_many(events)
    except ContractViolation:
        # An event this adapter made wrongly: retrying would refuse it for ever and the
        # machine would stand still. It is logged whole; the others go out.
        accepted = []
        for event in events:
            try:
                validate_envelope(event)
            except ContractViolation as exc:
                log.error("%s %s: the contract refuses an event, not published: %s; the event: "
                          "%s", event.source, event.subject, exc.reason,
                          event.model_dump_json())  # fmt: skip
            else:
                accepted.append(event)
        return await publish_or_keep(publisher, accepted, old, new, log)
    except Exception:
        first = events[0]
        log.exception(
            "%s %s: publishing %d events failed; the next poll publishes the changes again",
            first.source,
            first.subject,
            len(events),
        )
        return old
    return new


def config_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """A file named in the config: relative to the config file's folder, and it must exist
    (a pydantic validator body; ``load_adapters`` passes the folder as context)."""
    base = (info.context or {}).get("base")
    if value is not None and not value.is_absolute() and base is not None:
        value = base / value
    if value is not None and not value.is_file():
        raise ValueError(f"no such file: {value}")
    return value


def report_bad_input(
    log: logging.Logger, events: MachineEvents, what: str, raw: object, key: str
) -> CloudEvent:
    """Log a peer's malformed input and make the condition event that tells the hub."""
    shown = repr(raw)
    shown = shown if len(shown) <= 200 else shown[:200] + "…"
    log.warning("%s %s: %s; got %s", events.source, events.machine_id, what, shown)
    return events.condition("warning", None, f"bad-input|{key}", BAD_INPUT_CODE, what)


def problem_changes(
    log: logging.Logger,
    events: MachineEvents,
    reported: Mapping[str, str],
    problems: Iterable[tuple[str, str, object]],
    at: datetime,
) -> tuple[list[CloudEvent], dict[str, str]]:
    """A polled control's wrong answers, as conditions: each ``(item, what, raw)`` of this poll
    reported once while it lasts (``reported`` is what was reported, item by item), and one
    ``normal`` ``ADAPTER_INPUT`` once none is left. Returns the events and what is reported now;
    the caller keeps that with the rest of its state, so a failed publish reports it again."""
    found: list[CloudEvent] = []
    now: dict[str, str] = {}
    for item, what, raw in problems:
        now[item] = what
        if reported.get(item) == what:
            continue  # reported already: an answer stuck wrong is reported once
        key = f"{item}|{at.isoformat()}|{what}"
        event = report_bad_input(log, events, what, raw, key)
        # The id does not depend on the time; the event belongs to the poll that saw it.
        found.append(event.model_copy(update={"time": at}))
    if reported and not now:
        key = f"bad-input-cleared|{at.isoformat()}"
        found.append(events.condition("normal", at, key, native_code=BAD_INPUT_CODE))
    return found, now
