"""OPC UA machine tools (OPC 40501-1 Machine Tools) through asyncua.

From the MachineTool object named by ``browse_path`` the adapter subscribes (one data change
subscription, ``publishing_interval_ms``) to:

- ``Monitoring/<channel>/ChannelState`` and ``ChannelMode`` (every object in Monitoring that has
  a ChannelState) and ``Monitoring/MachineTool/OperationMode``: execution and mode;
- ``Production/ActiveProgram/Name`` and ``State/CurrentState`` (with its ``Number``): the program,
  and the execution of a machine without channels;
- ``Production/Statistics/PartsProducedInLifetime``, else the running job's ``PartsCompleted`` in
  ``Production/ProductionPlan``; ``bad`` is that job's ``PartsCompleted - PartsGood``;
- the events of ``Notification/Messages`` (AlertType and NotificationEventType): conditions.

Event times are the values' SourceTimestamps (else ServerTimestamp, else now); event ids come
from the triggering node, its timestamp and value, so re-reading the same values gives the same
ids. Only changes are published; a value whose SourceTimestamp is earlier than what was
published for it (a server whose clock went back, a gateway forwarding old data) is published
even when it repeats. ``docs/adapters/opcua.md`` has the full mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.events import Event
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.machines.base import (
    BAD_INPUT_CODE,
    CONNECTION_CODE,
    MachineEvents,
    Published,
    config_file,
    report_bad_input,
)
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)
MAX_CONDITION_CODES = 4096  # condition codes whose history is kept


class OpcuaConfig(BaseModel):
    """One OPC 40501 MachineTool on an OPC UA server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host:4840/path")
    # The MachineTool object, as browse names from Objects, each "<namespace uri or index>:<name>"
    browse_path: list[str] = Field(min_length=1)
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path | None = None  # the client's certificate (DER or PEM)
    private_key: Path | None = None
    server_certificate: Path | None = None
    username: str | None = None
    password: SecretStr | None = None  # never shown in logs or reprs
    publishing_interval_ms: int = Field(default=500, ge=10, le=60_000)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    # Jobs come and go in the ProductionPlan; it is browsed again this often for new ones.
    plan_rebrowse_s: float = Field(default=30.0, ge=0.1, le=3600)

    @field_validator("certificate", "private_key", "server_certificate")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return config_file(value, info)

    @model_validator(mode="after")
    def _secure_needs_keys(self) -> OpcuaConfig:
        if self.security_policy != "None" and (
            self.certificate is None or self.private_key is None
        ):
            raise ValueError(
                f"security_policy {self.security_policy} needs certificate and private_key"
            )
        return self

    def source(self) -> str:
        """The CloudEvent source: the endpoint and the MachineTool's browse name."""
        name = self.browse_path[-1].rpartition(":")[2] or self.browse_path[-1]
        return f"{self.endpoint.rstrip('/')}/{name}"


MACHINE_TOOL_URI = "http://opcfoundation.org/UA/MachineTool/"
# Numeric ids of the event types in the MachineTool namespace (OPC 40501-1, 9.1 and 9.3).
ALERT_TYPE, NOTIFICATION_EVENT_TYPE = 39, 35

# ChannelState: Active, Interrupted, Reset (idle).
CHANNEL_STATES: dict[int, str | None] = {0: "ACTIVE", 1: "INTERRUPTED", 2: "READY"}
# ChannelMode: Automatic, MdaMdi, JogManual, JogIncrement, TeachingHandle, Remote, Reference,
# Other. Remote and Other say nothing about who drives the axes: no mode.
CHANNEL_MODES: dict[int, str | None] = {
    0: "AUTOMATIC", 1: "MANUAL_DATA_INPUT", 2: "MANUAL", 3: "MANUAL", 4: "MANUAL", 5: None,
    6: "MANUAL", 7: None,
}  # fmt: skip
# MachineOperationMode: Manual, Automatic, Setup, AutoWithManualIntervention, Service, Other.
OPERATION_MODES: dict[int, str | None] = {
    0: "MANUAL", 1: "AUTOMATIC", 2: "MANUAL", 3: "SEMI_AUTOMATIC", 4: None, 5: None,
}  # fmt: skip
# The production state machines (program, job): StateNumber -> state, state -> execution.
STATE_NUMBERS = {0: "initializing", 1: "running", 2: "ended", 3: "interrupted", 4: "aborted"}
PROGRAM_EXECUTION = {
    "initializing": "READY", "running": "ACTIVE", "ended": "PROGRAM_COMPLETED",
    "interrupted": "INTERRUPTED", "aborted": "STOPPED",
}  # fmt: skip
# With several channels the machine is as busy as its busiest one.
_CHANNEL_RANK = {"ACTIVE": 0, "INTERRUPTED": 1, "READY": 2}

Role = Literal[
    "channel_state", "channel_mode", "operation_mode", "program_name", "program_state",
    "program_state_number", "lifetime", "job_completed", "job_good", "job_state",
    "job_state_number",
]  # fmt: skip
# Which published values an input feeds (a job's state decides which job is counted).
_OUTPUTS: dict[Role, tuple[str, ...]] = {
    "channel_state": ("execution",), "channel_mode": ("execution",),
    "operation_mode": ("execution",), "program_name": ("execution",),
    "program_state": ("execution",), "program_state_number": ("execution",),
    "lifetime": ("all",), "job_completed": ("all", "bad"), "job_good": ("bad",),
    "job_state": ("all", "bad"), "job_state_number": ("all", "bad"),
}  # fmt: skip


class BrowseError(Exception):
    """The configured MachineTool is not where the browse path says, or is not OPC 40501."""


@dataclass(frozen=True)
class _Input:
    role: Role
    path: str  # below the MachineTool, for log lines and condition messages
    owner: str = ""  # the channel's or job's node id; "" for the machine's own nodes


@dataclass(frozen=True)
class _Reading:
    value: Any
    time: datetime
    key: str


@dataclass
class Layout:
    """What was found under the MachineTool object: the nodes the adapter maps."""

    machine: ua.NodeId
    mt_ns: int
    inputs: dict[ua.NodeId, _Input] = field(default_factory=dict)
    channels: list[str] = field(default_factory=list)  # in browse order
    jobs: dict[str, int] = field(default_factory=dict)  # job -> its place in the plan
    plan: ua.NodeId | None = None
    messages: ua.NodeId | None = None
    _by_role: dict[tuple[Role, str], ua.NodeId] = field(default_factory=dict)

    def add(self, node_id: ua.NodeId, role: Role, path: str, owner: str = "") -> None:
        self.inputs[node_id] = _Input(role, path, owner)
        self._by_role[(role, owner)] = node_id

    def remove(self, node_id: ua.NodeId) -> None:
        spec = self.inputs.pop(node_id)
        self._by_role.pop((spec.role, spec.owner), None)

    def node(self, role: Role, owner: str = "") -> ua.NodeId | None:
        return self._by_role.get((role, owner))

    def has_execution(self) -> bool:
        return bool(self.channels) or self.node("program_state") is not None

    def has_counts(self) -> bool:
        return self.node("lifetime") is not None or bool(self.jobs)


class _BadValue(ValueError):
    pass


def _timestamp(value: ua.DataValue) -> datetime:
    for stamp in (value.SourceTimestamp, value.ServerTimestamp):
        # 1601-01-01 is OPC UA's "no time"; some servers send it instead of leaving it out.
        if stamp is not None and stamp.year > 1970:
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _enum(value: Any, table: dict[int, str | None], name: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in table:
        allowed = ", ".join(str(k) for k in table)
        raise _BadValue(f"{value!r} is not a {name} ({allowed})")
    return table[value]


def _counter(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadValue(f"{value!r} is not a part count (an integer >= 0)")
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, ua.LocalizedText):
        value = value.Text
    return value if isinstance(value, str) else None


def _severity_level(severity: int, alarm_active: bool) -> str:
    # OPC UA severities: 1-200 low, 201-600 medium, 601-1000 high (Part 5, 6.4.2).
    if severity > 600:
        return "fault"
    if severity > 200 or alarm_active:
        return "warning"
    return "normal"


class MachineToolState:
    """Turns OPC 40501 values and events into contract events, publishing changes only.

    Inputs are the raw DataValues of the nodes in the ``Layout``; nothing here talks to a
    server, so ``run`` and ``check`` give the same events for the same values."""

    def __init__(self, events: MachineEvents, endpoint: str) -> None:
        self.events = events
        self.endpoint = endpoint
        self.layout: Layout | None = None
        self.readings: dict[ua.NodeId, _Reading] = {}
        self.available: bool | None = None
        self.connection_reported = False
        self.browse_reported: str | None = None
        self.execution: dict[str, Any] | None = None
        self.counts: dict[str, int] = {}
        self.conditions: dict[str, tuple[str, str | None]] = {}
        # What was published, by event time (a repeat is suppressed only when it is not
        # earlier than what the hub has: see ``Published``).
        self._executions: Published[dict[str, Any]] = Published()
        self._published_counts: dict[str, Published[int]] = {k: Published() for k in ("all", "bad")}
        self._conditions: dict[str, Published[tuple[str, str | None]]] = {}
        self.job: str | None = None
        self._inconsistent: tuple[str, int, int] | None = None  # reported once, not per recount

    def use(self, layout: Layout) -> None:
        self.layout = layout
        # A reconnect may find other nodes (a restarted server): keep what still applies.
        self.readings = {n: r for n, r in self.readings.items() if n in layout.inputs}

    # --- connection --------------------------------------------------------------------------

    def connected(self) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        key = f"connected|{time.time_ns()}"
        if self.available is not True:
            events.append(self.events.availability(True, None, key))
            self.available = True
        if self.connection_reported:
            events.append(self.events.condition("normal", None, key, CONNECTION_CODE))
            self.connection_reported = False
        if self.browse_reported is not None:
            # The browse path resolves now: the input problem reported for it is over.
            events.append(self.events.condition("normal", None, key, BAD_INPUT_CODE))
            self.browse_reported = None
        return events

    def lost(self, reason: str) -> list[CloudEvent]:
        """The server is out of reach: UNAVAILABLE and a connection condition, once per loss."""
        if self.available is False and self.connection_reported:
            return []
        key = f"lost|{time.time_ns()}"
        events = [] if self.available is False else [self.events.availability(False, None, key)]
        self.available = False
        self.connection_reported = True
        message = f"OPC UA server {self.endpoint} unreachable: {reason}"
        events.append(self.events.condition("unavailable", None, key, CONNECTION_CODE, message))
        return events

    def browse_failed(self, reason: str) -> list[CloudEvent]:
        """Connected, but the MachineTool is not there: UNAVAILABLE and an input condition."""
        events: list[CloudEvent] = []
        if self.available is not False:
            events.append(self.events.availability(False, None, f"lost|{time.time_ns()}"))
            self.available = False
        if self.browse_reported != reason:
            self.browse_reported = reason
            events.append(report_bad_input(log, self.events, reason, self.endpoint, reason))
        else:
            log.warning("%s %s: %s", self.events.source, self.events.machine_id, reason)
        return events

    # --- values ------------------------------------------------------------------------------

    def apply(self, changes: Iterable[tuple[ua.NodeId, ua.DataValue]]) -> list[CloudEvent]:
        """New values of layout nodes (one data change, or a whole snapshot read at once)."""
        layout = self.layout
        if layout is None:
            return []
        events: list[CloudEvent] = []
        triggers: dict[str, _Reading] = {}  # output -> newest changed input feeding it
        for node_id, data in changes:
            spec = layout.inputs.get(node_id)
            if spec is None:
                continue
            at = _timestamp(data)
            good = data.StatusCode is None or not data.StatusCode.is_bad()
            raw = data.Value.Value if good and data.Value is not None else None
            key = f"{node_id.to_string()}|{at.isoformat()}|{raw}"
            try:
                value = self._interpret(layout, spec, raw)
            except _BadValue as exc:
                events.append(report_bad_input(log, self.events, f"{spec.path}: {exc}", raw, key))
                continue
            previous = self.readings.get(node_id)
            if previous is not None and previous.value == value and at >= previous.time:
                continue
            reading = _Reading(value, at, key)
            self.readings[node_id] = reading
            for output in _OUTPUTS[spec.role]:
                current = triggers.get(output)
                if current is None or reading.time >= current.time:
                    triggers[output] = reading
        if "execution" in triggers:
            events += self._execution(layout, triggers["execution"])
        if "all" in triggers or "bad" in triggers:
            events += self._counts(layout, triggers)
        return events

    def _interpret(self, layout: Layout, spec: _Input, raw: Any) -> Any:
        """The value an input stands for; None when unknown (Null, or a Bad status)."""
        if raw is None:
            return None
        role = spec.role
        if role == "channel_state":
            return _enum(raw, CHANNEL_STATES, "ChannelState")
        if role == "channel_mode":
            return _enum(raw, CHANNEL_MODES, "ChannelMode")
        if role == "operation_mode":
            return _enum(raw, OPERATION_MODES, "MachineOperationMode")
        if role == "program_name":
            if not isinstance(raw, str):
                raise _BadValue(f"{raw!r} is not a program name (a String)")
            return raw.strip()[:256] or None
        if role in ("lifetime", "job_completed", "job_good"):
            return _counter(raw)
        # A state machine's CurrentState (text) and its Number: the Number wins when known, so a
        # text that is not English (or not a standard state) matters only without one.
        number_role: Role = "job_state_number" if role.startswith("job") else "program_state_number"
        text_role: Role = "job_state" if role.startswith("job") else "program_state"
        if role in ("program_state", "job_state"):
            text = _text(raw)
            if text is None:
                raise _BadValue(f"{raw!r} is not a state (a LocalizedText)")
            name = text.strip().lower()
            if name in PROGRAM_EXECUTION:
                return name
            if not name or layout.node(number_role, spec.owner) is not None:
                return None
            raise _BadValue(f"state {text!r} is not Initializing, Running, Ended, Interrupted "
                            "or Aborted")  # fmt: skip
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _BadValue(f"{raw!r} is not a state number (an integer)")
        if raw in STATE_NUMBERS:
            return STATE_NUMBERS[raw]
        if layout.node(text_role, spec.owner) is not None:
            return None
        raise _BadValue(f"state number {raw} is not one of 0-4 (Initializing .. Aborted)")

    def _value(self, layout: Layout, role: Role, owner: str = "") -> Any:
        node_id = layout.node(role, owner)
        reading = self.readings.get(node_id) if node_id is not None else None
        return reading.value if reading is not None else None

    def _state(self, layout: Layout, prefix: Literal["program", "job"], owner: str = "") -> Any:
        number_role: Role = "job_state_number" if prefix == "job" else "program_state_number"
        text_role: Role = "job_state" if prefix == "job" else "program_state"
        return self._value(layout, number_role, owner) or self._value(layout, text_role, owner)

    def derive_execution(self, layout: Layout) -> dict[str, Any] | None:
        program_state = self._state(layout, "program")
        program_execution = PROGRAM_EXECUTION.get(program_state) if program_state else None
        leading, execution = None, None
        for channel in layout.channels:
            value = self._value(layout, "channel_state", channel)
            if value is None:
                continue
            if execution is None or _CHANNEL_RANK[value] < _CHANNEL_RANK[execution]:
                leading, execution = channel, value
        if not layout.channels:
            execution = program_execution
        elif execution == "READY" and program_execution in ("PROGRAM_COMPLETED", "STOPPED"):
            # An idle channel after the program ended or was aborted: say which.
            execution = program_execution
        if execution is None:
            if not layout.has_execution():
                return None
            execution = "UNAVAILABLE"  # the nodes are there but say nothing (Null or Bad)
        data: dict[str, Any] = {"execution": execution}
        mode = self._value(layout, "channel_mode", leading) if leading is not None else None
        mode = mode or self._value(layout, "operation_mode")
        if mode:
            data["mode"] = mode
        program = self._value(layout, "program_name")
        if program:
            data["program"] = program
        return data

    def _execution(self, layout: Layout, trigger: _Reading) -> list[CloudEvent]:
        data = self.derive_execution(layout)
        if data is None or self._executions.repeats(data, trigger.time):
            return []
        self.execution = data
        self._executions.add(data, trigger.time)
        key = "|".join([trigger.key, *(f"{k}={v}" for k, v in data.items())])
        return [
            self.events.execution(
                data["execution"], trigger.time, key, data.get("mode"), data.get("program")
            )
        ]

    def _track_job(self, layout: Layout) -> None:
        """The job whose counters count: the running one, else the one counted so far."""
        running = [j for j in layout.jobs if self._state(layout, "job", j) == "running"]
        if running:
            self.job = min(running, key=lambda j: layout.jobs[j])
        elif self.job not in layout.jobs:
            self.job = min(layout.jobs, key=lambda j: layout.jobs[j]) if layout.jobs else None

    def _counts(self, layout: Layout, triggers: dict[str, _Reading]) -> list[CloudEvent]:
        self._track_job(layout)
        job = self.job or ""
        completed = self._value(layout, "job_completed", job) if self.job else None
        good = self._value(layout, "job_good", job) if self.job else None
        counts: dict[str, int | None] = {}
        # One source of truth for "all": the lifetime counter when the machine has one.
        if layout.node("lifetime") is not None:
            counts["all"] = self._value(layout, "lifetime")
        else:
            counts["all"] = completed
        counts["bad"] = None
        events: list[CloudEvent] = []
        if completed is not None and good is not None:
            if good > completed:
                if self._inconsistent != (job, completed, good):
                    self._inconsistent = (job, completed, good)
                    cause = triggers.get("bad") or next(iter(triggers.values()))
                    what = f"ProductionPlan job: PartsGood {good} > PartsCompleted {completed}"
                    events.append(report_bad_input(log, self.events, what, good, cause.key))
            else:
                counts["bad"] = completed - good
        for kind, count in counts.items():
            trigger = triggers.get(kind)
            if count is None or trigger is None:
                continue
            if self._published_counts[kind].repeats(count, trigger.time):
                continue
            self.counts[kind] = count
            self._published_counts[kind].add(count, trigger.time)
            key = f"{trigger.key}|{kind}={count}"
            events.append(self.events.part_count(count, kind, trigger.time, key))
        return events

    # --- notifications -----------------------------------------------------------------------

    def apply_event(self, fields: dict[str, Any], type_name: str, origin: str) -> list[CloudEvent]:
        """One event from Notification/Messages (an AlertType alarm or a message)."""
        stamp = fields.get("Time")
        at = stamp if isinstance(stamp, datetime) and stamp.year > 1970 else datetime.now(UTC)
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        event_id = fields.get("EventId")
        shown_id = event_id.hex() if isinstance(event_id, bytes) else str(event_id)
        key = f"{origin}|{at.isoformat()}|{shown_id}"
        severity = fields.get("Severity")
        if isinstance(severity, bool) or not isinstance(severity, int):
            what = f"Notification event {type_name}: Severity {severity!r} is not an integer"
            return [report_bad_input(log, self.events, what, fields, key)]
        code = next(
            (
                text.strip()
                for name in ("ErrorCode", "Identifier", "ConditionName")
                if (text := _text(fields.get(name))) and text.strip()
            ),
            type_name,
        )
        message = _text(fields.get("Message")) or None
        active = fields.get("ActiveState/Id")
        if isinstance(active, bool):
            level = _severity_level(severity, alarm_active=True) if active else "normal"
        elif fields.get("Retain") is False:
            level = "normal"  # a condition the server no longer keeps: it is over
        else:
            level = _severity_level(severity, alarm_active=False)
        published = self._conditions.get(code)
        if published is None:
            if len(self._conditions) >= MAX_CONDITION_CODES:
                del self._conditions[next(iter(self._conditions))]  # its next event is published
            published = self._conditions[code] = Published()
        if published.repeats((level, message), at):
            return []
        self.conditions[code] = (level, message)
        published.add((level, message), at)
        # EventId is optional in practice: code and level keep two such events apart.
        return [self.events.condition(level, at, f"{key}|{code}|{level}", code, message)]


# --- browsing ---------------------------------------------------------------------------------


def _plain(node_id: ua.NodeId) -> ua.NodeId:
    # Browse gives ExpandedNodeIds; data changes name plain NodeIds.
    return ua.NodeId(node_id.Identifier, node_id.NamespaceIndex, node_id.NodeIdType)


def parse_path_element(element: str, namespaces: list[str]) -> tuple[int | None, str]:
    """``"<index>:<name>"`` or ``"<namespace uri>:<name>"``; ``(None, name)`` if neither (any
    namespace). The URI is matched against the server's namespace array, so names may hold ':'."""
    head, sep, rest = element.partition(":")
    if sep and head.isdigit():
        return int(head), rest
    for index, uri in sorted(enumerate(namespaces), key=lambda item: -len(item[1])):
        if uri and element.startswith(uri + ":"):
            return index, element[len(uri) + 1 :]
    return None, element


class _Browser:
    """Browses children once per node and names them for error messages."""

    def __init__(self, client: Client, namespaces: list[str]) -> None:
        self.client = client
        self.namespaces = namespaces
        self._cache: dict[ua.NodeId, list[ua.ReferenceDescription]] = {}

    async def children(self, node_id: ua.NodeId) -> list[ua.ReferenceDescription]:
        if node_id not in self._cache:
            node = self.client.get_node(node_id)
            self._cache[node_id] = await node.get_children_descriptions(
                refs=ObjectIds.HierarchicalReferences
            )
        return self._cache[node_id]

    def name(self, qualified: ua.QualifiedName) -> str:
        index = qualified.NamespaceIndex
        uri = self.namespaces[index] if index < len(self.namespaces) else str(index)
        return f"{uri}:{qualified.Name}"

    async def child(self, node_id: ua.NodeId, ns: int | None, name: str) -> ua.NodeId | None:
        found = [
            _plain(ref.NodeId)
            for ref in await self.children(node_id)
            if ref.BrowseName.Name == name and ns in (None, ref.BrowseName.NamespaceIndex)
        ]
        if len(found) > 1 and ns is None:
            raise BrowseError(f"{name!r} is ambiguous: give its namespace")
        return found[0] if found else None

    async def resolve(self, path: list[str]) -> ua.NodeId:
        node_id = self.client.nodes.objects.nodeid
        walked = ["Objects"]
        for element in path:
            ns, name = parse_path_element(element, self.namespaces)
            found = await self.child(node_id, ns, name)
            if found is None:
                names = sorted(self.name(r.BrowseName) for r in await self.children(node_id))
                shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
                raise BrowseError(
                    f"browse path: no {element!r} under {'/'.join(walked)} (it has: {shown})"
                )
            node_id = found
            walked.append(name)
        return node_id

    async def objects(self, node_id: ua.NodeId) -> list[tuple[ua.NodeId, str]]:
        return [
            (_plain(ref.NodeId), ref.BrowseName.Name)
            for ref in await self.children(node_id)
            if ref.NodeClass == ua.NodeClass.Object
        ]


async def discover(client: Client, browse_path: list[str]) -> Layout:
    """Find the MachineTool and the nodes the adapter maps (any of them may be missing)."""
    namespaces = await client.get_namespace_array()
    if MACHINE_TOOL_URI not in namespaces:
        raise BrowseError(f"the server has no OPC 40501 namespace {MACHINE_TOOL_URI}")
    mt = namespaces.index(MACHINE_TOOL_URI)
    browser = _Browser(client, namespaces)
    layout = Layout(machine=await browser.resolve(browse_path), mt_ns=mt)

    monitoring = await browser.child(layout.machine, mt, "Monitoring")
    if monitoring is not None:
        for obj, name in await browser.objects(monitoring):
            state = await browser.child(obj, mt, "ChannelState")
            if state is None:
                continue
            owner = obj.to_string()
            layout.channels.append(owner)
            layout.add(state, "channel_state", f"Monitoring/{name}/ChannelState", owner)
            mode = await browser.child(obj, mt, "ChannelMode")
            if mode is not None:
                layout.add(mode, "channel_mode", f"Monitoring/{name}/ChannelMode", owner)
        machine_tool = await browser.child(monitoring, mt, "MachineTool")
        if machine_tool is not None:
            operation = await browser.child(machine_tool, mt, "OperationMode")
            if operation is not None:
                layout.add(operation, "operation_mode", "Monitoring/MachineTool/OperationMode")

    production = await browser.child(layout.machine, mt, "Production")
    if production is not None:
        program = await browser.child(production, mt, "ActiveProgram")
        if program is not None:
            name_node = await browser.child(program, mt, "Name")
            if name_node is not None:
                layout.add(name_node, "program_name", "Production/ActiveProgram/Name")
            await _add_state(browser, layout, program, "program", "Production/ActiveProgram", "")
        statistics = await browser.child(production, mt, "Statistics")
        if statistics is not None:
            lifetime = await browser.child(statistics, mt, "PartsProducedInLifetime")
            if lifetime is not None:
                path = "Production/Statistics/PartsProducedInLifetime"
                layout.add(lifetime, "lifetime", path)
        layout.plan = await browser.child(production, mt, "ProductionPlan")
        if layout.plan is not None:
            await discover_jobs(client, browser, layout)

    notification = await browser.child(layout.machine, mt, "Notification")
    if notification is not None:
        layout.messages = await browser.child(notification, mt, "Messages")

    if not (layout.has_execution() or layout.has_counts() or layout.messages):
        raise BrowseError(
            f"browse path {'/'.join(browse_path)}: no OPC 40501 Monitoring channel, "
            "ActiveProgram, part counter or Notification/Messages under it"
        )
    return layout


async def _add_state(
    browser: _Browser,
    layout: Layout,
    parent: ua.NodeId,
    prefix: Literal["program", "job"],
    path: str,
    owner: str,
) -> None:
    state = await browser.child(parent, layout.mt_ns, "State")
    current = await browser.child(state, 0, "CurrentState") if state is not None else None
    if current is None:
        return
    text_role: Role = "job_state" if prefix == "job" else "program_state"
    number_role: Role = "job_state_number" if prefix == "job" else "program_state_number"
    layout.add(current, text_role, f"{path}/State/CurrentState", owner)
    number = await browser.child(current, 0, "Number")
    if number is not None:
        layout.add(number, number_role, f"{path}/State/CurrentState/Number", owner)


async def discover_jobs(client: Client, browser: _Browser, layout: Layout) -> None:
    """The ProductionPlan's jobs (objects with PartsCompleted or PartsGood) and their order."""
    assert layout.plan is not None
    mt = layout.mt_ns
    for job, name in await browser.objects(layout.plan):
        completed = await browser.child(job, mt, "PartsCompleted")
        good = await browser.child(job, mt, "PartsGood")
        if completed is None and good is None:
            continue
        owner = job.to_string()
        path = f"Production/ProductionPlan/{name}"
        if completed is not None:
            layout.add(completed, "job_completed", f"{path}/PartsCompleted", owner)
        if good is not None:
            layout.add(good, "job_good", f"{path}/PartsGood", owner)
        await _add_state(browser, layout, job, "job", path, owner)
        number = await browser.child(job, 0, "NumberInList")
        place = None
        if number is not None:
            with contextlib.suppress(UaError):
                place = await client.get_node(number).read_value()
        # The plan is ordered by NumberInList; without one, browse order.
        layout.jobs[owner] = place if isinstance(place, int) else 65536 + len(layout.jobs)


# --- the adapter ------------------------------------------------------------------------------

_Item = (
    tuple[Literal["data"], ua.NodeId, ua.DataValue]
    | tuple[Literal["event"], Event]
    | tuple[Literal["lost"], str]
)
# What a lost or refused connection raises in asyncua (ConnectionError is an OSError).
_CONNECTION_ERRORS = (OSError, TimeoutError, UaError)


class _Handler:
    """asyncua's subscription callbacks: hand everything to the session loop, in order."""

    def __init__(self, queue: asyncio.Queue[_Item]) -> None:
        self.queue = queue

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        self.queue.put_nowait(("data", node.nodeid, data.monitored_item.Value))

    def event_notification(self, event: Event) -> None:
        self.queue.put_nowait(("event", event))

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        if status.Status.is_bad():
            self.queue.put_nowait(("lost", f"subscription status {status.Status.name}"))


class OpcuaAdapter:
    """One OPC 40501 MachineTool: subscribe, publish changes, reconnect with backoff."""

    protocol: ClassVar[str] = "opcua"

    def __init__(self, config: OpcuaConfig) -> None:
        self.config = config
        self.source = config.source()
        self.state = MachineToolState(
            MachineEvents(config.machine_id, self.source), config.endpoint
        )
        self._type_names: dict[ua.NodeId, str] = {}

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        first = min(0.5, self.config.reconnect_max_s)
        backoff = first
        while not stop.is_set():
            client: Client | None = None
            try:
                client = await self._connect()
                layout = await discover(client, self.config.browse_path)
                self.state.use(layout)
                backoff = first
                await self._session(client, layout, publisher, stop)
            except BrowseError as exc:
                await publisher.publish_many(self.state.browse_failed(str(exc)))
            except _CONNECTION_ERRORS as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("%s: connection lost or refused (%s); retrying in %.1f s",
                            self.config.endpoint, reason, backoff)  # fmt: skip
                await publisher.publish_many(self.state.lost(reason))
            except Exception as exc:
                # Whatever else a server's answers make asyncua raise: the adapter must outlive
                # it. Logged with the traceback, since it may be our bug as much as the peer's.
                log.exception("%s: unexpected error; reconnecting", self.config.endpoint)
                await publisher.publish_many(self.state.lost(f"{type(exc).__name__}: {exc}"))
            finally:
                if client is not None:
                    await _disconnect(client)
            if not stop.is_set():
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def check(self) -> list[CloudEvent]:
        """Connect, browse, read the current values and return the first events of ``run``.

        A server that cannot be reached raises (``OSError`` or ``asyncua.UaError``); a browse
        path that is not there gives the UNAVAILABLE and ``ADAPTER_INPUT`` events run would."""
        client = await self._connect()
        try:
            try:
                layout = await discover(client, self.config.browse_path)
            except BrowseError as exc:
                return self.state.browse_failed(str(exc))
            self.state.use(layout)
            snapshot = await _read(client, layout)
            return self.state.connected() + self.state.apply(snapshot)
        finally:
            await _disconnect(client)

    async def _connect(self) -> Client:
        config = self.config
        # No auto-reconnect: after a loss we browse again (a restarted server may have other
        # node ids) and report UNAVAILABLE ourselves.
        client = Client(config.endpoint, timeout=10)
        client.name = client.description = f"mes-hub OPC UA adapter ({config.machine_id})"
        client.application_uri = "urn:mes-hub:opcua-adapter"
        if config.username is not None:
            client.set_user(config.username)
        if config.password is not None:
            client.set_password(config.password.get_secret_value())
        if config.security_policy == "Basic256Sha256":
            assert config.certificate is not None and config.private_key is not None
            certificate = await uacrypto.load_certificate(config.certificate)
            # Servers check that our ApplicationUri is the one in our certificate.
            uris = _certificate_uris(certificate)
            if uris:
                client.application_uri = uris[0]
            await client.set_security(
                security_policies.SecurityPolicyBasic256Sha256,
                str(config.certificate),
                str(config.private_key),
                server_certificate=str(config.server_certificate)
                if config.server_certificate is not None
                else None,
                mode=getattr(ua.MessageSecurityMode, config.security_mode),
            )
        try:
            await asyncio.wait_for(client.connect(), 30)
        except BaseException:
            await _disconnect(client)
            raise
        log.info("%s: connected (%s)", config.endpoint, config.security_policy)
        return client

    async def _session(
        self, client: Client, layout: Layout, publisher: EventPublisher, stop: asyncio.Event
    ) -> None:
        queue: asyncio.Queue[_Item] = asyncio.Queue()

        async def on_lost(exc: Exception) -> None:
            queue.put_nowait(("lost", str(exc) or type(exc).__name__))

        client.connection_lost_callback = on_lost
        subscription = await client.create_subscription(
            self.config.publishing_interval_ms, _Handler(queue)
        )
        handles, refused = await self._subscribe(client, subscription, layout, list(layout.inputs))
        if layout.messages is not None:
            await self._subscribe_events(client, subscription, layout)
        # Read after subscribing, so nothing changes unseen in between; the subscription's own
        # first values then repeat the snapshot and publish nothing.
        snapshot = await _read(client, layout)
        await publisher.publish_many(self.state.connected() + refused + self.state.apply(snapshot))
        log.info("%s %s: subscribed to %d nodes%s", self.config.endpoint,
                 self.config.machine_id, len(handles),
                 " and Notification/Messages" if layout.messages is not None else "")  # fmt: skip
        next_browse = time.monotonic() + self.config.plan_rebrowse_s
        get = asyncio.ensure_future(queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {get, stopped}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                if stopped in done:
                    return
                if get not in done:
                    await client.check_connection()  # raises once asyncua has seen a loss
                    if layout.plan is not None and time.monotonic() >= next_browse:
                        events = await self._rebrowse_plan(client, subscription, layout, handles)
                        if events:
                            await publisher.publish_many(events)
                        next_browse = time.monotonic() + self.config.plan_rebrowse_s
                    continue
                items = [get.result()]
                get = asyncio.ensure_future(queue.get())
                while not queue.empty():
                    items.append(queue.get_nowait())
                changes: list[CloudEvent] = []
                for item in items:
                    changes += await self._handle(client, item)
                if changes:
                    await publisher.publish_many(changes)
        finally:
            get.cancel()
            stopped.cancel()
            client.connection_lost_callback = None

    async def _handle(self, client: Client, item: _Item) -> list[CloudEvent]:
        if item[0] == "data":
            return self.state.apply([(item[1], item[2])])
        if item[0] == "event":
            event = item[1]
            fields = {k: v.Value for k, v in event.get_event_props_as_fields_dict().items()}
            type_name = await self._type_name(client, fields.get("EventType"))
            messages = self.state.layout.messages if self.state.layout else None
            origin = messages.to_string() if messages is not None else ""
            return self.state.apply_event(fields, type_name, origin)
        raise ConnectionError(item[1])

    async def _subscribe(
        self,
        client: Client,
        subscription: Subscription,
        layout: Layout,
        node_ids: list[ua.NodeId],
    ) -> tuple[dict[ua.NodeId, int], list[CloudEvent]]:
        """Monitored items for the nodes; a node the server refuses is reported and dropped."""
        if not node_ids:
            return {}, []
        # Sampling 0: as fast as the server can (or on change); a queue keeps short states
        # (a brief INTERRUPTED) that fall between two publishes.
        results = await subscription.subscribe_data_change(
            [client.get_node(n) for n in node_ids], queuesize=16, sampling_interval=ua.Double(0)
        )
        handles: dict[ua.NodeId, int] = {}
        events: list[CloudEvent] = []
        for node_id, result in zip(node_ids, results, strict=True):
            if isinstance(result, ua.StatusCode):
                what = f"{layout.inputs[node_id].path}: cannot subscribe ({result.name})"
                events.append(report_bad_input(log, self.state.events, what, node_id, what))
                layout.remove(node_id)
            else:
                handles[node_id] = result
        return handles, events

    async def _subscribe_events(
        self, client: Client, subscription: Subscription, layout: Layout
    ) -> None:
        assert layout.messages is not None
        types = [
            ua.NodeId.from_string(f"ns={layout.mt_ns};i={ALERT_TYPE}"),
            ua.NodeId.from_string(f"ns={layout.mt_ns};i={NOTIFICATION_EVENT_TYPE}"),
        ]
        try:
            await subscription.subscribe_events(client.get_node(layout.messages), types)
        except (UaError, OSError) as exc:
            log.warning("%s: Notification/Messages: cannot subscribe to events (%s); no alerts",
                        self.config.endpoint, exc)  # fmt: skip
            layout.messages = None
            return
        # Alarms already active when we subscribed come with a ConditionRefresh, if supported.
        # (Called on the ConditionType object, Part 9 5.5.7; servers without alarms refuse it.)
        with contextlib.suppress(UaError, OSError):
            await client.get_node(f"i={ObjectIds.ConditionType}").call_method(
                f"i={ObjectIds.ConditionType_ConditionRefresh}",
                ua.Variant(subscription.subscription_id, ua.VariantType.UInt32),
            )

    async def _rebrowse_plan(
        self,
        client: Client,
        subscription: Subscription,
        layout: Layout,
        handles: dict[ua.NodeId, int],
    ) -> list[CloudEvent]:
        """Pick up jobs added to the ProductionPlan and forget removed ones; ``handles`` is
        updated. New jobs' values are read at once, so a new running job counts from now."""
        fresh = Layout(machine=layout.machine, mt_ns=layout.mt_ns, plan=layout.plan)
        namespaces = await client.get_namespace_array()
        await discover_jobs(client, _Browser(client, namespaces), fresh)
        gone = [
            n for n, s in layout.inputs.items() if s.owner in layout.jobs and n not in fresh.inputs
        ]
        added = [n for n in fresh.inputs if n not in layout.inputs]
        if gone:
            with contextlib.suppress(UaError):
                await subscription.unsubscribe([handles.pop(n) for n in gone if n in handles])
            for node_id in gone:
                layout.remove(node_id)
                self.state.readings.pop(node_id, None)
        layout.jobs = fresh.jobs
        for node_id in added:
            spec = fresh.inputs[node_id]
            layout.add(node_id, spec.role, spec.path, spec.owner)
        new, events = await self._subscribe(client, subscription, layout, added)
        handles.update(new)
        if gone or added:
            log.info("%s %s: ProductionPlan now has %d jobs", self.config.endpoint,
                     self.config.machine_id, len(layout.jobs))  # fmt: skip
            values = await client.read_attributes([client.get_node(n) for n in new])
            events += self.state.apply(zip(new, values, strict=True))
        return events

    async def _type_name(self, client: Client, type_id: Any) -> str:
        if not isinstance(type_id, ua.NodeId):
            return "Event"
        if type_id not in self._type_names:
            try:
                name = str((await client.get_node(type_id).read_browse_name()).Name)
            except (UaError, OSError):
                name = type_id.to_string()
            self._type_names[type_id] = name
        return self._type_names[type_id]


async def _read(client: Client, layout: Layout) -> list[tuple[ua.NodeId, ua.DataValue]]:
    node_ids = list(layout.inputs)
    if not node_ids:
        return []
    values = await client.read_attributes([client.get_node(n) for n in node_ids])
    return list(zip(node_ids, values, strict=True))


def _certificate_uris(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(names.value.get_values_for_type(x509.UniformResourceIdentifier))


async def _disconnect(client: Client) -> None:
    # The server may already be gone; a clean close is a courtesy, not a requirement.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 5)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
