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
import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import ValidationInfo

from contracts import CloudEvent
from hub.ports import EventPublisher

BAD_INPUT_CODE = "ADAPTER_INPUT"
CONNECTION_CODE = "ADAPTER_CONNECTION"


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
