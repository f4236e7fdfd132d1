"""Sparkplug B edge nodes over MQTT, read as a Sparkplug host application.

One ``SparkplugConfig`` is one MQTT broker and one Sparkplug group. The adapter subscribes to
``spBv1.0/<group_id>/#`` (through amqtt, the optional extra ``mes-hub[sparkplug]``) and decodes
NBIRTH, DBIRTH, NDATA, DDATA, NDEATH and DDEATH payloads (``sparkplug_payload``). Each machine
of the config is an edge node, or one device of an edge node; its metrics are named in the config:

- ``execution``: a metric whose value maps to an execution (a Boolean ``Running``: true is
  ``ACTIVE``, false ``STOPPED``; an integer or string state through a table), ``mode`` likewise;
- ``program``: the program's name (a string or a number);
- ``part_count`` / ``bad_count``: the controller's cumulative counters, partcount ``all``/``bad``;
- ``conditions``: a flag metric (true or non-zero: a fault with the configured native code) or an
  alarm-code metric (non-zero: a fault with that code; 0 clears it).

Births define aliases; DATA messages may name metrics by alias only. Execution, mode and program
of one message with one time make one execution event. Event time is the metric's timestamp,
else the payload's; a message without any (Sparkplug requires them), or a time the hub would
refuse (more than 300 s ahead) or that cannot be true (before 2000), gets its arrival time and an
``ADAPTER_INPUT`` warning once while it lasts. Ids derive from group/node/device, metric,
timestamp and value (for arrival times: the birth's bdSeq, the seq and the arrival), so a
message delivered twice, or a rebirth repeating values, publishes nothing new.

Session rules (Sparkplug 3.0): ``seq`` runs 0..255 per edge node across its births and DATA; a
gap, DATA before any birth, or a message that cannot be read, makes the adapter distrust the
node, request a rebirth (an NCMD ``Node Control/Rebirth``, unless ``request_rebirth = false``)
and ignore its values until the next NBIRTH. An NDEATH is honoured when its ``bdSeq`` is the
current NBIRTH's, or exactly one after it (pysparkplug 0.6 numbers a clean disconnect's NDEATH
like the next session); any other is another session's, ignored, and a rebirth is requested to
check the node lives. A valid NDEATH makes every machine of the node ``UNAVAILABLE`` once, with
an ``unavailable`` condition ``ADAPTER_CONNECTION``; a DDEATH its device's machine, and so does
an NBIRTH whose DBIRTHs (over at the node's next other message, or after ``BIRTHS_WAIT_S``) leave
the device out. The next birth publishes ``AVAILABLE`` and the birth's values. A machine's first
birth of a run, and its first after a loss, first publishes a ``normal`` condition without a
code: a birth shows every condition, so the hub's active ones (an earlier run's included) are
cleared and the birth's active ones raised again.

Losing the broker (refused, closed, or no answer to a ping) does the same for every machine and
the adapter reconnects with backoff, resubscribes and requests rebirths. A payload that is not
Sparkplug B (or over 1 MiB), or a metric of the wrong type for its mapping, is logged and
published as an ``ADAPTER_INPUT`` warning; the adapter goes on. With ``host_id`` the adapter
also publishes the Sparkplug 3.0 host ``STATE`` (retained, with a will saying offline, one
timestamp per connection). See ``docs/adapters/sparkplug.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.machines.base import (
    MachineEvents,
    config_file,
    report_bad_input,
    stopped,
    url_host,
)
from adapters.machines.observations import (
    EXECUTIONS,
    MAX_COUNT,
    MODES,
    MachineObserver,
    Meaning,
)
from adapters.machines.sparkplug_payload import (
    Metric,
    Payload,
    PayloadError,
    Value,
    decode_payload,
    encode_rebirth_request,
)
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

if TYPE_CHECKING:
    from amqtt.client import MQTTClient  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
SEQ_MODULUS = 256  # seq and bdSeq run 0..255 and wrap
RECONNECT_MIN_S = 0.25
RECEIVE_WAIT_S = 0.5  # how often the receive loop looks at ``stop``
BIRTHS_WAIT_S = 2.0  # after an NBIRTH, how long its DBIRTHs may take at the most
MAX_PAYLOAD_BYTES = 1 << 20  # a larger payload is reported, not decoded
MAX_AHEAD = timedelta(seconds=300)  # the hub refuses events further ahead (max_clock_skew_s)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)  # a time before this is a clock never set
INSTALL_HINT = "the Sparkplug adapter needs amqtt: install mes-hub[sparkplug]"

# A Sparkplug id (group, edge node, device): a topic level, so no '/', '+' or '#'.
SparkplugId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^/+#]+$")]
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Execution = Literal[
    "ACTIVE", "READY", "INTERRUPTED", "FEED_HOLD", "STOPPED", "OPTIONAL_STOP", "PROGRAM_STOPPED",
    "PROGRAM_COMPLETED", "WAIT", "UNAVAILABLE",
]  # fmt: skip
Mode = Literal["AUTOMATIC", "MANUAL", "MANUAL_DATA_INPUT", "SEMI_AUTOMATIC", "EDIT"]


class ExecutionMetric(BaseModel):
    """A metric and the execution each of its values means. Keys are the value as text:
    ``true``/``false`` for a Boolean, the number for an integer, the string itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    values: dict[str, Execution] = {}  # empty: true ACTIVE, false STOPPED, or the value's name


class ModeMetric(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    values: dict[str, Mode] = {}  # empty: the value is the mode's name


class ConditionMetric(BaseModel):
    """With ``native_code``: a flag, true or non-zero while the condition is active. Without:
    an alarm-code metric, its value the active code, 0 (or empty) for none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    native_code: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    level: Literal["fault", "warning"] = "fault"
    message: Annotated[str, StringConstraints(max_length=1024)] | None = None


class SparkplugMachine(BaseModel):
    """One machine: an edge node, or one device of it, and which metrics mean what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_id: Token
    edge_node: SparkplugId
    device: SparkplugId | None = None
    execution: ExecutionMetric | None = None
    mode: ModeMetric | None = None
    program: MetricName | None = None
    part_count: MetricName | None = None
    bad_count: MetricName | None = None
    conditions: list[ConditionMetric] = []

    @model_validator(mode="after")
    def _maps_something(self) -> SparkplugMachine:
        if (self.mode or self.program) and not self.execution:
            # Mode and program travel with an execution event (contract v1).
            raise ValueError("mode and program need an execution metric")
        metrics = [condition.metric for condition in self.conditions]
        if len(set(metrics)) != len(metrics):
            # One metric, one condition: two would share its id and item (one NORMAL for both).
            raise ValueError("a metric is given to more than one condition")
        mapped = (self.execution, self.part_count, self.bad_count, self.conditions)
        if not any(mapped):
            raise ValueError(
                "map at least one metric: execution, part_count, bad_count or conditions"
            )
        return self

    def scope(self) -> str:
        return self.edge_node if self.device is None else f"{self.edge_node}/{self.device}"


class SparkplugConfig(BaseModel):
    """One MQTT broker and one Sparkplug group, with the machines read from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    port: int = Field(default=1883, ge=1, le=65535)  # 8883 when left out with TLS
    group_id: SparkplugId
    machines: list[SparkplugMachine] = Field(min_length=1)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None  # the broker's CA (PEM); default: the system's
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    host_id: SparkplugId | None = None  # publish the Sparkplug 3.0 host STATE under this id
    request_rebirth: bool = True
    rebirth_interval_s: float = Field(default=5.0, gt=0, le=3600)
    keepalive_s: int = Field(default=30, ge=2, le=3600)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    check_wait_s: float = Field(default=5.0, gt=0, le=60)

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        # MQTT over TLS listens on 8883 (IANA), plain MQTT on 1883.
        if isinstance(data, dict) and "port" not in data and data.get("tls") is True:
            return {**data, "port": 8883}
        return data

    @field_validator("ca_file")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return config_file(value, info)

    @field_validator("machines")
    @classmethod
    def _one_entry_each(cls, value: list[SparkplugMachine]) -> list[SparkplugMachine]:
        ids: set[str] = set()
        scopes: set[str] = set()
        for machine in value:
            if machine.machine_id in ids:
                raise ValueError(f"machine_id {machine.machine_id!r} is given twice")
            if machine.scope() in scopes:
                raise ValueError(f"{machine.scope()!r} is mapped to more than one machine")
            ids.add(machine.machine_id)
            scopes.add(machine.scope())
        return value

    @model_validator(mode="after")
    def _tls_settings(self) -> SparkplugConfig:
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file is for TLS: set tls = true")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")
        return self

    def broker(self) -> str:
        return f"{url_host(self.host)}:{self.port}"


# --- what the messages mean --------------------------------------------------------------------


def _text(value: Value) -> str:
    """A metric value as a table key: ``true``/``false``, a number, or the string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _shown(value: object) -> str:
    """A value as a message shows it: its repr, cut (a condition message has a length limit)."""
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "…"


def _key(value: object) -> str:
    """A value as part of an id key: as it is when short, else its digest."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= 128:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def _whole(value: Value) -> int | None:
    """An integer or an integral float; ``None`` for anything else (Booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


class _Machine:
    """One configured machine: what its metrics mean, and what was published for it."""

    def __init__(self, config: SparkplugMachine, group: str) -> None:
        self.config = config
        source = f"sparkplug://{group}/{config.scope()}"
        self.events = MachineEvents(config.machine_id, source)
        self.observer = MachineObserver(self.events, log)
        self.roles: dict[str, list[str | ConditionMetric]] = {}
        for role, metric in (
            ("execution", config.execution.metric if config.execution else None),
            ("mode", config.mode.metric if config.mode else None),
            ("program", config.program),
            ("part_count", config.part_count),
            ("bad_count", config.bad_count),
        ):
            if metric is not None:
                self.roles.setdefault(metric, []).append(role)
        for condition in config.conditions:
            self.roles.setdefault(condition.metric, []).append(condition)

    def bad(self, what: str, raw: object, key: str) -> list[CloudEvent]:
        """An ``ADAPTER_INPUT`` warning. ``key`` (what was read: metric, time, value; or the
        problem and the session) makes its id stable, so reading it again adds nothing."""
        what = f"{self.config.scope()}: {what}"
        return [report_bad_input(log, self.events, what, raw, f"{key}|{what}")]

    def observe(
        self, role: str | ConditionMetric, name: str, value: Value, at: datetime, uid: str
    ) -> list[CloudEvent]:
        """A count or condition metric's value (execution, mode and program go by ``state``)."""
        if isinstance(role, ConditionMetric):
            return self._condition(role, value, at, uid)
        count = _whole(value)
        if count is None or not 0 <= count <= MAX_COUNT:
            return self.bad(f"metric {name!r}: a count, got {_shown(value)}", value, uid)
        meaning: Meaning = "bad_part_count" if role == "bad_count" else "part_count"
        return self.observer.value(meaning, name, str(count), at, uid)

    def reading(
        self, role: str, name: str, value: Value, uid: str
    ) -> tuple[str | None, list[CloudEvent]]:
        """An execution, mode or program metric's value as the contract's, or ``None`` and a
        warning when it means none."""
        if role == "program":
            if isinstance(value, bytes | bool):
                what = f"metric {name!r}: a program name, got {_shown(value)}"
                return None, self.bad(what, value, uid)
            return _text(value)[:256] or None, []
        mapped = self.config.execution if role == "execution" else self.config.mode
        assert mapped is not None
        table: dict[str, str] = dict(mapped.values)
        if not table and role == "execution" and isinstance(value, bool):
            table = {"true": "ACTIVE", "false": "STOPPED"}
        key = _text(value)
        names = EXECUTIONS if role == "execution" else MODES
        state = table.get(key) if table else (key.upper() if isinstance(value, str) else None)
        if state is None or state not in names:
            what = "an execution" if role == "execution" else "a controller mode"
            problem = f"metric {name!r}: {_shown(key)} is not {what} in its table"
            return None, self.bad(problem, value, uid)
        return state, []

    def state(self, read: dict[str, str | None], at: datetime) -> list[CloudEvent]:
        """Execution, mode and program read in one message at one time: one execution event
        (never one per metric, which would tell of combinations the machine never was in)."""
        execution, mode, program = read.get("execution"), read.get("mode"), read.get("program")
        if execution is None and mode is None and program is None:
            return []
        observer = self.observer
        if execution is None and observer.execution is None:
            # No execution known yet: mode and program wait for the first one, which carries them.
            observer.mode = mode or observer.mode
            observer.program = program if program is not None else observer.program
            return []
        return observer.polled(execution, mode, program, at)

    def _condition(
        self, condition: ConditionMetric, value: Value, at: datetime, uid: str
    ) -> list[CloudEvent]:
        name = condition.metric
        level = condition.level.upper()
        if condition.native_code is not None:
            if not isinstance(value, bool | int | float):
                return self.bad(f"metric {name!r}: a flag, got {_shown(value)}", value, uid)
            active = bool(value)
            message = condition.message or (name if active else None)
            return self.observer.condition(
                name, level if active else "NORMAL", condition.native_code, message, at, uid
            )
        if isinstance(value, bytes | bool) or (isinstance(value, float) and _whole(value) is None):
            return self.bad(f"metric {name!r}: an alarm code, got {_shown(value)}", value, uid)
        code = _text(value).strip()[:128]
        if code in ("", "0"):
            return self.observer.condition(name, "NORMAL", None, None, at, uid)
        events = [
            event
            for old in sorted(self.observer.active_codes.get(name, {}))
            if old != code
            for event in self.observer.condition(name, "NORMAL", old, None, at, f"{uid}|{old}")
        ]
        message = condition.message or f"alarm {code} ({name})"
        return events + self.observer.condition(name, level, code, message, at, uid)

    def reset_conditions(self, at: datetime, key: str) -> CloudEvent:
        """A ``normal`` without a code, for a birth that follows no birth of this run, or a
        loss: the hub clears every condition of the machine it holds (what an earlier run, or
        the time out of reach, left), and the birth raises again those it shows active. The
        observer forgets which codes it published active, so that it publishes them again."""
        return self.observer.reset_conditions(at, key)


@dataclass
class _Node:
    """One edge node's Sparkplug session as this host sees it."""

    name: str
    machines: dict[str | None, _Machine] = field(default_factory=dict)  # device (None: node)
    bd_seq: int | None = None  # the bdSeq of the NBIRTH the current session began with
    born: bool = False  # values trusted: an NBIRTH came and no seq was missed since
    seq: int | None = None  # the last seq read
    devices_born: set[str] = field(default_factory=set)
    births_end: float | None = None  # after an NBIRTH: when its DBIRTHs are over at the latest
    aliases: dict[str | None, dict[int, str]] = field(default_factory=dict)
    datatypes: dict[str | None, dict[str, int]] = field(default_factory=dict)
    rebirth_wanted: bool = False  # a rebirth request is to be sent
    rebirth_asked_at: float | None = None  # monotonic time of the last rebirth request
    waiting_told: bool = False  # "waiting for its next birth" logged (request_rebirth false)
    reported: set[str] = field(default_factory=set)  # problems reported, once while they last
    last_arrival: datetime | None = None  # arrival times are kept distinct, message by message

    def all_machines(self) -> list[_Machine]:
        return list(self.machines.values())

    def arrival(self, now: datetime) -> datetime:
        """``now`` as this message's arrival time, later than the previous message's: a time
        that stands in for a missing timestamp must tell two messages apart."""
        last = self.last_arrival
        if last is not None and now <= last:
            now = last + timedelta(microseconds=1)
        self.last_arrival = now
        return now


@dataclass
class _Message:
    """What one DATA or BIRTH message says, and when it arrived."""

    kind: str
    device: str | None
    payload: Payload
    arrival: datetime


class SparkplugHost:
    """The host application's rules, without I/O: ``receive`` turns one MQTT message into
    events; ``take_rebirths`` names the edge nodes to ask for a rebirth; ``tick`` gives the
    events that time makes (the DBIRTHs of an NBIRTH are over)."""

    def __init__(self, config: SparkplugConfig) -> None:
        self.config = config
        self.nodes: dict[str, _Node] = {}
        for machine in config.machines:
            node = self.nodes.setdefault(machine.edge_node, _Node(machine.edge_node))
            node.machines[machine.device] = _Machine(machine, config.group_id)

    def machines(self) -> list[_Machine]:
        return [m for node in self.nodes.values() for m in node.all_machines()]

    def broker_lost(self, why: str) -> list[CloudEvent]:
        """The broker is out of reach: nothing is known of any machine any more."""
        for node in self.nodes.values():
            node.born = False
            node.seq = None
            node.births_end = None
        message = f"MQTT broker {self.config.broker()} unreachable: {why}"
        return [e for machine in self.machines() for e in machine.observer.lost(message)]

    def connected(self) -> None:
        """A new MQTT session: what happened meanwhile is unknown until the next births."""
        for node in self.nodes.values():
            node.born = False
            node.seq = None
            node.births_end = None
            self.ask_rebirth(node, "the host (re)connected", force=True)

    def ask_rebirth(self, node: _Node, why: str, force: bool = False) -> None:
        """Note that ``node`` must be born again; ``take_rebirths`` says when to ask it."""
        where = f"{self.config.group_id}/{node.name}"
        if not self.config.request_rebirth:
            if not node.waiting_told:  # once until its next birth, not on every message
                log.info("%s: %s; waiting for its next birth", where, why)
                node.waiting_told = True
            return
        if not node.rebirth_wanted:
            log.info("%s: %s; requesting a rebirth", where, why)
        node.rebirth_wanted = True
        if force:
            node.rebirth_asked_at = None

    def take_rebirths(self) -> list[str]:
        """The edge nodes to send a rebirth request now: wanted, and not asked within
        ``rebirth_interval_s`` (a node slow to answer is not flooded with requests)."""
        now = time.monotonic()
        due = []
        for node in self.nodes.values():
            last = node.rebirth_asked_at
            if node.rebirth_wanted and (
                last is None or now - last >= self.config.rebirth_interval_s
            ):
                node.rebirth_wanted = False
                node.rebirth_asked_at = now
                due.append(node.name)
        return due

    def tick(self, now: float | None = None) -> list[CloudEvent]:
        """The events time makes: an NBIRTH's DBIRTHs over ``BIRTHS_WAIT_S`` after it."""
        now = time.monotonic() if now is None else now
        events: list[CloudEvent] = []
        for node in self.nodes.values():
            if node.births_end is not None and now >= node.births_end:
                events += self._births_over(node)
        return events

    def receive(self, topic: str, data: bytes, now: datetime | None = None) -> list[CloudEvent]:
        """The events one message makes (none for topics of other groups or nodes)."""
        now = now or datetime.now(UTC)
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[1] != self.config.group_id:
            return []
        kind, node_name = parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else None
        node = self.nodes.get(node_name)
        if node is None or kind not in (
            "NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA",
        ):  # fmt: skip
            return []  # another node, or a command (NCMD, DCMD)
        if (device is None) != kind.startswith("N"):
            return []  # not a Sparkplug topic (a device message needs a device, a node none)
        # Sparkplug sends an NBIRTH's DBIRTHs before anything else of the node: any other
        # message ends them.
        events = self._births_over(node) if kind != "DBIRTH" else []
        if len(data) > MAX_PAYLOAD_BYTES:
            what = f"{kind} {topic}: {len(data)} bytes, more than {MAX_PAYLOAD_BYTES} read"
            return events + self._unreadable(node, kind, device, what, data)
        try:
            payload = decode_payload(data)
        except PayloadError as exc:
            return events + self._unreadable(node, kind, device, f"{kind} {topic}: {exc}", data)
        if kind == "NDEATH":
            return events + self._node_death(node, payload)
        message = _Message(kind, device, payload, node.arrival(now))
        if kind == "NBIRTH":
            return events + self._node_birth(node, message)
        if not node.born:
            self.ask_rebirth(node, f"{kind} before its NBIRTH (or after a missed message)")
            return events
        if payload.seq is None or payload.seq == node.seq:
            if payload.seq is None:
                node.born = False
                self.ask_rebirth(node, f"{kind} without seq")
            return events  # the same message again (an MQTT QoS 1 duplicate)
        expected = ((node.seq or 0) + 1) % SEQ_MODULUS
        if payload.seq != expected:
            node.born = False
            self.ask_rebirth(node, f"{kind} seq {payload.seq}, expected {expected}: missed")
            return events
        node.seq = payload.seq
        if kind == "NDATA":
            return events + self._apply(node, message)
        assert device is not None
        if kind == "DBIRTH":
            return events + self._device_birth(node, message)
        if kind == "DDEATH":
            return events + self._device_death(node, device, "DDEATH")
        if device not in node.devices_born:
            self.ask_rebirth(node, f"DDATA of device {device} before its DBIRTH")
            return events
        return events + self._apply(node, message)

    def _report(
        self, node: _Node, device: str | None, problem: str, what: str, raw: object
    ) -> list[CloudEvent]:
        """``what`` as an ``ADAPTER_INPUT`` warning of the device's machine (a node's message:
        of every machine of the node), once while ``problem`` lasts (until the next NBIRTH, or
        until the caller forgets it). Its id depends on the problem and the session only."""
        if problem in node.reported:
            return []
        node.reported.add(problem)
        machine = node.machines.get(device)
        machines = [machine] if machine is not None else []
        if device is None and machine is None:
            machines = node.all_machines()
        if not machines:
            log.warning("%s/%s: %s", self.config.group_id, node.name, what)
        key = f"{problem}|bdSeq {node.bd_seq}"
        return [e for m in machines for e in m.bad(what, raw, key)]

    def _unreadable(
        self, node: _Node, kind: str, device: str | None, what: str, data: bytes
    ) -> list[CloudEvent]:
        """A message that cannot be read: reported once until the next NBIRTH. What it said is
        lost, so the node's values are not trusted before its next birth (a rebirth is asked);
        an unreadable NDEATH is honoured when no birth is known, else checked by a rebirth."""
        events = self._report(node, device, f"unreadable|{kind}|{device}", what, data[:64])
        if kind == "NDEATH" and node.bd_seq is None:
            return events + self._death(node, "NDEATH unreadable")
        node.born = False
        self.ask_rebirth(node, f"an unreadable {kind}", force=kind == "NDEATH")
        return events

    def _time(
        self, node: _Node, message: _Message, stamp: int | None
    ) -> tuple[datetime, str | None, list[CloudEvent]]:
        """When a metric (``stamp``: its timestamp, else the payload's) happened, its time as
        part of an id key (``None``: the message had none, the time is its arrival), and the
        warnings its time gives: none, or a time the hub would refuse (later than the
        adapter's clock allows) or that cannot be true (before 2000), replaced by arrival."""
        if stamp is None:
            what = "messages without timestamps: times are arrival times"
            problem = f"no-timestamps|{message.device}"
            return message.arrival, None, self._report(node, message.device, problem, what, None)
        try:
            at = datetime.fromtimestamp(stamp / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            at = None
        if at is not None and EARLIEST <= at <= message.arrival + MAX_AHEAD:
            node.reported.discard(f"clock|{message.device}")  # the node's clock is right (again)
            return at, str(stamp), []
        what = (
            f"{message.kind} timestamp {stamp} ms is not a time the hub can take "
            f"(before 2000 or more than {MAX_AHEAD.seconds} s ahead): arrival time used"
        )
        problem = f"clock|{message.device}"
        return message.arrival, None, self._report(node, message.device, problem, what, stamp)

    def _node_birth(self, node: _Node, message: _Message) -> list[CloudEvent]:
        payload = message.payload
        node.bd_seq = _bd_seq(payload)
        node.born = True
        node.waiting_told = False
        node.reported.clear()
        node.seq = payload.seq
        node.devices_born.clear()
        if any(d is not None for d in node.machines):
            node.births_end = time.monotonic() + BIRTHS_WAIT_S
        node.aliases.clear()
        node.datatypes.clear()
        events, reset = self._born(node, None, message)
        return events + self._apply(node, message, birth=True, reset=reset)

    def _device_birth(self, node: _Node, message: _Message) -> list[CloudEvent]:
        device = message.device
        assert device is not None
        node.devices_born.add(device)
        node.aliases.pop(device, None)
        node.datatypes.pop(device, None)
        events, reset = self._born(node, device, message)
        return events + self._apply(node, message, birth=True, reset=reset)

    def _born(
        self, node: _Node, device: str | None, message: _Message
    ) -> tuple[list[CloudEvent], tuple[str, datetime] | None]:
        """AVAILABLE at the birth's time, after the conditions' reset when the machine was not
        available before it (its first birth in this run, or the first after a loss); with
        the reset's key and time (``None``: no reset), which the birth's conditions take."""
        machine = node.machines.get(device)
        if machine is None:
            return [], None
        at, stamp, warnings = self._time(node, message, message.payload.timestamp)
        stamp = stamp or f"arrival {message.arrival.isoformat()}"
        uid = f"{message.kind}|{node.bd_seq}|{stamp}"
        events: list[CloudEvent] = []
        reset = None
        if machine.observer.available is not True:
            # A birth lists every metric: the machine's conditions are exactly those it shows.
            # A fault that cleared while this run was not listening would stay active in the
            # hub (the observer, not knowing it was active, would drop its NORMAL): clear all
            # first, before anything else of the machine (warnings included), then the birth
            # raises what is active. The key is the birth's and the loss's (a birth after a
            # loss may repeat an earlier one's time), so a re-read adds nothing.
            key = f"{uid}|conditions reset|{machine.observer.lost_at}"
            events.append(machine.reset_conditions(at, key))
            reset = (key, at)
        events += warnings
        events += machine.observer.value("availability", message.kind, "AVAILABLE", at, uid)
        return events, reset

    def _births_over(self, node: _Node) -> list[CloudEvent]:
        """After an NBIRTH, its DBIRTHs are over: a configured device not born again is not
        known to be there (its DDEATH may have come while the node was not trusted)."""
        if node.births_end is None:
            return []
        node.births_end = None
        events: list[CloudEvent] = []
        for device in node.machines:
            if device is not None and device not in node.devices_born:
                why = f"no DBIRTH after the NBIRTH bdSeq {node.bd_seq}"
                events += self._device_death(node, device, why)
        return events

    def _node_death(self, node: _Node, payload: Payload) -> list[CloudEvent]:
        bd_seq = _bd_seq(payload)
        where = f"{self.config.group_id}/{node.name}"
        current = node.bd_seq
        if current is None:
            return self._death(node, f"NDEATH bdSeq {bd_seq}")  # no birth to check it against
        if bd_seq is None:
            # It may be this session's or an old one: a rebirth (or its absence) tells.
            self.ask_rebirth(node, "an NDEATH without bdSeq", force=True)
            return []
        if bd_seq == current:
            return self._death(node, f"NDEATH bdSeq {bd_seq}")
        if bd_seq == (current + 1) % SEQ_MODULUS:
            # pysparkplug 0.6 sets up the next session's will right after its births, and its
            # clean disconnect publishes that NDEATH: numbered one after its NBIRTH.
            log.warning("%s: NDEATH bdSeq %d follows NBIRTH bdSeq %d; honoured as this "
                        "session's death (a clean disconnect numbered one ahead)",
                        where, bd_seq, current)  # fmt: skip
            return self._death(node, f"NDEATH bdSeq {bd_seq}")
        # Another session's death (a late will, a node that numbers its sessions anew after a
        # restart): ignored, as Sparkplug says. A rebirth request checks that the node lives.
        log.info("%s: NDEATH bdSeq %d ignored (current NBIRTH bdSeq %d)", where, bd_seq, current)
        self.ask_rebirth(node, f"a stale NDEATH bdSeq {bd_seq}", force=True)
        return []

    def _death(self, node: _Node, why: str) -> list[CloudEvent]:
        node.born = False
        node.seq = None
        node.births_end = None
        node.devices_born.clear()
        where = f"{self.config.group_id}/{node.name}"
        reason = f"Sparkplug edge node {where} is offline ({why})"
        return [e for m in node.all_machines() for e in m.observer.lost(reason)]

    def _device_death(self, node: _Node, device: str, why: str) -> list[CloudEvent]:
        node.devices_born.discard(device)
        machine = node.machines.get(device)
        if machine is None:
            return []
        where = f"{self.config.group_id}/{node.name}/{device}"
        return machine.observer.lost(f"Sparkplug device {where} is offline ({why})")

    def _apply(
        self,
        node: _Node,
        message: _Message,
        birth: bool = False,
        reset: tuple[str, datetime] | None = None,
    ) -> list[CloudEvent]:
        """The events of a DATA or birth message's mapped metrics. After a conditions' reset
        (``reset``: its key and time), a condition is stamped no earlier than the reset and its
        id carries the reset's key: the same fault read before the reset (same metric, time and
        value) must reach the hub again, and after the reset by event time too."""
        device, payload = message.device, message.payload
        machine = node.machines.get(device)
        aliases = node.aliases.setdefault(device, {})
        datatypes = node.datatypes.setdefault(device, {})
        events: list[CloudEvent] = []
        mapped: list[tuple[str, Metric]] = []
        for metric in payload.metrics:
            name = metric.name
            if birth and name is not None:
                if metric.alias is not None:
                    aliases[metric.alias] = name
                if metric.datatype is not None:
                    datatypes[name] = metric.datatype
            if name is None and metric.alias is not None:
                name = aliases.get(metric.alias)
                if name is None and machine is not None:
                    # Its birth was missed or is wrong: reported once, and a rebirth asked.
                    what = f"alias {metric.alias} was not defined by the birth"
                    problem = f"alias|{device}|{metric.alias}"
                    events += self._report(node, device, problem, what, metric.alias)
                    self.ask_rebirth(node, f"{message.kind} with an undefined alias")
                    continue
            if machine is not None and name is not None and name in machine.roles:
                mapped.append((name, metric))
        if machine is None:
            return events
        states: dict[datetime, dict[str, str | None]] = {}
        others: list[CloudEvent] = []  # counts and conditions, after the state of their message
        for name, metric in mapped:
            stamp = metric.timestamp if metric.timestamp is not None else payload.timestamp
            at, stamp_key, warnings = self._time(node, message, stamp)
            events += warnings
            if stamp_key is None:  # arrival time: unique to this message
                stamp_key = f"arrival|{node.bd_seq}|{payload.seq}|{_ns(message.arrival)}"
            try:
                value = metric.value(metric.datatype or datatypes.get(name))
            except PayloadError as exc:
                key = f"{name}|{stamp_key}|{_key(metric.raw)}"
                events += machine.bad(str(exc), metric.raw, key)
                continue
            if value is None:
                continue  # a null metric: its value is not known, nothing to tell
            uid = f"{name}|{stamp_key}|{_key(_text(value))}"
            for role in machine.roles[name]:
                if isinstance(role, str) and role in ("execution", "mode", "program"):
                    read, warnings = machine.reading(role, name, value, uid)
                    events += warnings
                    if read is not None:
                        states.setdefault(at, {})[role] = read
                elif isinstance(role, ConditionMetric) and reset is not None:
                    # Active at the birth, after the reset: never stamped before it (read by
                    # event time, a fault from before the reset would be cleared by it).
                    key, reset_at = reset
                    at = max(at, reset_at)
                    others += machine.observe(role, name, value, at, f"{uid}|{key}")
                else:
                    others += machine.observe(role, name, value, at, uid)
        for at in sorted(states):
            events += machine.state(states[at], at)
        return events + others


def _bd_seq(payload: Payload) -> int | None:
    """The ``bdSeq`` metric of an NBIRTH or NDEATH; ``None`` when missing or not a number."""
    metric = payload.metric("bdSeq")
    try:
        value = metric.value() if metric is not None else None
    except PayloadError:
        return None
    return _whole(value) if value is not None else None


def _ns(at: datetime) -> int:
    return int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000


# --- MQTT ----------------------------------------------------------------------------------------


class BrokerLost(ConnectionError):
    """The MQTT broker cannot be reached, closed the connection or stopped answering."""


def _amqtt() -> Any:
    try:
        # The optional extra, needed at run time only (config.py imports this module).
        import amqtt.client  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return amqtt.client


@dataclass
class _Received:
    topic: str
    data: bytes


def _received(message: Any) -> _Received:
    return _Received(str(message.topic), bytes(message.data or b""))


class SparkplugAdapter:
    """Reads one broker's Sparkplug group for the configured machines (see the docstring)."""

    protocol: ClassVar[str] = "sparkplug"

    def __init__(self, config: SparkplugConfig) -> None:
        self.config = config
        self.host = SparkplugHost(config)
        self._heard = False  # the current MQTT session brought a message
        self._state_ms = 0  # the host STATE timestamp of the current MQTT session

    def machine_ids(self) -> list[str]:
        return [m.machine_id for m in self.config.machines]

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        first = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first
        while not stop.is_set():
            self._heard = False
            why = "the session ended"
            try:
                client = await self._connect()
            except BrokerLost as exc:
                why = str(exc)
            else:
                try:
                    await self._session(client, publisher, stop)
                except BrokerLost as exc:
                    why = str(exc)
                except Exception as exc:
                    # Whatever else went wrong, the adapter must live on: reconnect.
                    log.exception("%s: session failed", self.config.broker())
                    why = f"session failed ({type(exc).__name__})"
                finally:
                    await self._close(client, clean=stop.is_set())
            if stop.is_set():
                return
            if self._heard:
                backoff = first  # the broker was working: a new failure starts the backoff again
            log.warning("%s: %s; reconnecting in %.2f s", self.config.broker(), why, backoff)
            await self._publish(publisher, self.host.broker_lost(why), stop)
            if await stopped(stop, backoff):
                return
            backoff = min(backoff * 2, self.config.reconnect_max_s)

    async def check(self) -> list[CloudEvent]:
        """Connect, subscribe, request rebirths (if allowed) and return the events of what comes
        within ``check_wait_s``, or until every machine was born and nothing came for half a
        second (DATA right after a birth is read too). Nothing is published.
        A broker that cannot be reached raises ``BrokerLost`` (a ``ConnectionError``)."""
        client = await self._connect()
        events: list[CloudEvent] = []
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.config.check_wait_s
        try:
            await self._subscribe(client)
            while (left := ends - loop.time()) > 0:
                message = await self._receive(client, min(left, RECEIVE_WAIT_S))
                if message is None and self._all_born():
                    break  # every machine born, and then a moment of quiet
                if message is not None and message.topic != self._state_topic():
                    events += self.host.receive(message.topic, message.data)
                await self._send_rebirths(client)
        finally:
            await self._close(client, clean=True)
        return events

    def _all_born(self) -> bool:
        return all(
            node.born and all(d is None or d in node.devices_born for d in node.machines)
            for node in self.host.nodes.values()
        )

    async def _connect(self) -> MQTTClient:
        amqtt_client = _amqtt()
        config = self.config
        options: dict[str, Any] = {
            "keep_alive": config.keepalive_s,
            "ping_delay": 0,
            "auto_reconnect": False,  # the adapter reconnects itself, with its own backoff
            "default_qos": 0,
            "plugins": {},
            "connection": {"uri": self._uri()},
        }
        # Sparkplug 3.0: one timestamp for this connection's will, online and offline STATE.
        self._state_ms = _ms()
        if config.host_id is not None:
            options["will"] = {
                "topic": self._state_topic(),
                "message": self._state(online=False).decode(),
                "qos": 1,
                "retain": True,
            }
        client = amqtt_client.MQTTClient(client_id=config.client_id, config=options)
        # Credentials go into the session, never into the URI (which amqtt logs).
        cafile = str(config.ca_file) if config.ca_file is not None else None
        session = client._init_session(self._uri(), cafile=cafile)
        session.username = config.username
        session.password = config.password.get_secret_value() if config.password else None
        client.session = session
        try:
            await asyncio.wait_for(client._do_connect(), config.timeout_s)
        except TimeoutError:
            await self._close(client, clean=False)
            raise BrokerLost(f"no CONNACK within {config.timeout_s} s") from None
        except Exception as exc:
            await self._close(client, clean=False)
            code = getattr(exc, "return_code", None)
            reason = f"connection refused (CONNACK {code})" if code else _reason(exc)
            raise BrokerLost(f"cannot connect: {reason}") from None
        log.info("%s: connected", config.broker())
        return client

    def _uri(self) -> str:
        return f"{'mqtts' if self.config.tls else 'mqtt'}://{self.config.broker()}"

    def _state_topic(self) -> str | None:
        if self.config.host_id is None:
            return None
        return f"{NAMESPACE}/STATE/{self.config.host_id}"

    def _state(self, online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": self._state_ms}).encode()

    async def _subscribe(self, client: MQTTClient) -> None:
        topics = [f"{NAMESPACE}/{self.config.group_id}/#"]
        state_topic = self._state_topic()
        if state_topic is not None:
            topics.append(state_topic)  # to say online again if told offline (Sparkplug 3.0)
        for topic in topics:
            try:
                codes = await asyncio.wait_for(
                    client.subscribe([(topic, 1)]), self.config.timeout_s
                )
            except Exception as exc:
                raise BrokerLost(f"subscribing to {topic} failed: {_reason(exc)}") from None
            if any(code == 0x80 for code in codes):
                raise BrokerLost(f"the broker refused the subscription to {topic}")
        log.info("%s: subscribed to %s", self.config.broker(), topics[0])
        if state_topic is not None:
            await self._publish_mqtt(client, state_topic, self._state(True), qos=1, retain=True)
        self.host.connected()

    async def _session(
        self, client: MQTTClient, publisher: EventPublisher, stop: asyncio.Event
    ) -> None:
        """Read until the broker is lost (``BrokerLost``) or ``stop``."""
        await self._subscribe(client)
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while not stop.is_set():
            await self._send_rebirths(client)
            events = self.host.tick()
            message = await self._receive(client, RECEIVE_WAIT_S)
            if message is None:
                if loop.time() - quiet_since >= self.config.keepalive_s / 2:
                    await self._ping(client)
                    quiet_since = loop.time()
            else:
                self._heard = True
                quiet_since = loop.time()
                if message.topic == self._state_topic():
                    await self._state_read(client, message.data)
                else:
                    events += self.host.receive(message.topic, message.data)
            if events:
                await self._publish(publisher, events, stop)

    async def _state_read(self, client: MQTTClient, data: bytes) -> None:
        """Our own STATE as the broker has it: said offline for this connection (or an older
        one), a stale will or another's message, we say online again (Sparkplug 3.0)."""
        try:
            state = json.loads(data)
            offline = state.get("online") is False
            older = int(state.get("timestamp", 0)) <= self._state_ms
        except (ValueError, TypeError, AttributeError):
            offline, older = True, True  # not a STATE message: ours must be there
        state_topic = self._state_topic()
        if offline and older and state_topic is not None:
            log.info("%s: host STATE read offline; saying online again", self.config.broker())
            await self._publish_mqtt(client, state_topic, self._state(True), qos=1, retain=True)

    async def _receive(self, client: MQTTClient, wait_s: float) -> _Received | None:
        """The next message, or ``None`` after ``wait_s`` without one. Raises ``BrokerLost``
        once the connection is closed and every message received before is read."""
        if not client.session.transitions.is_connected():
            return self._left_over(client, "the broker closed the connection")
        try:
            message = await client.deliver_message(timeout_duration=wait_s)
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # amqtt cancels its waiting readers when the connection closes.
            return self._left_over(client, "the broker closed the connection")
        except Exception as exc:
            return self._left_over(client, f"connection lost: {_reason(exc)}")
        if message is None:
            return None
        return _received(message)

    @staticmethod
    def _left_over(client: MQTTClient, why: str) -> _Received:
        """A message received before the connection closed, still to be read; else
        ``BrokerLost``."""
        try:
            return _received(client.session.delivered_message_queue.get_nowait())
        except asyncio.QueueEmpty:
            raise BrokerLost(why) from None

    async def _ping(self, client: MQTTClient) -> None:
        try:
            await asyncio.wait_for(client.ping(), self.config.timeout_s)
        except TimeoutError:
            raise BrokerLost(f"no answer to a ping within {self.config.timeout_s} s") from None
        except Exception as exc:
            raise BrokerLost(f"ping failed: {_reason(exc)}") from None
        if not client.session.transitions.is_connected():
            raise BrokerLost("the broker closed the connection")

    async def _send_rebirths(self, client: MQTTClient) -> None:
        for node in self.host.take_rebirths():
            topic = f"{NAMESPACE}/{self.config.group_id}/NCMD/{node}"
            await self._publish_mqtt(client, topic, encode_rebirth_request(_ms()), qos=0)

    async def _publish_mqtt(
        self, client: MQTTClient, topic: str, data: bytes, qos: int, retain: bool = False
    ) -> None:
        try:
            await asyncio.wait_for(
                client.publish(topic, data, qos=qos, retain=retain), self.config.timeout_s
            )
        except Exception as exc:
            raise BrokerLost(f"publishing to {topic} failed: {_reason(exc)}") from None

    async def _publish(
        self, publisher: EventPublisher, events: list[CloudEvent], stop: asyncio.Event
    ) -> None:
        """Publish, retrying until it succeeds (or ``stop``): the observers already count these
        events as published, so giving up would lose them."""
        wait = RECONNECT_MIN_S
        while events:
            try:
                await publisher.publish_many(events)
                return
            except Exception:
                log.exception("%s: publishing %d events failed; retrying in %.2f s",
                              self.config.broker(), len(events), wait)  # fmt: skip
            if await stopped(stop, wait):
                return
            wait = min(wait * 2, self.config.reconnect_max_s)

    async def _close(self, client: MQTTClient, clean: bool) -> None:
        """End the connection; never raises. ``clean`` (the adapter stops): say offline and
        DISCONNECT. Otherwise (the session failed) drop the socket without a DISCONNECT, so
        that the broker publishes the will: the host STATE offline."""
        with contextlib.suppress(Exception):
            connected = client.session is not None and client.session.transitions.is_connected()
            state_topic = self._state_topic()
            if connected and clean:
                if state_topic is not None:
                    await asyncio.wait_for(
                        client.publish(state_topic, self._state(False), qos=1, retain=True),
                        self.config.timeout_s,
                    )
                await asyncio.wait_for(client.disconnect(), self.config.timeout_s)
                return
            handler = client._handler
            # amqtt's StreamWriterAdapter keeps the asyncio StreamWriter as ``_writer``.
            writer = getattr(getattr(handler, "writer", None), "_writer", None)
            if writer is not None:
                writer.transport.abort()
            await client.cancel_tasks()
            if handler is not None:
                await asyncio.wait_for(handler.stop(), self.config.timeout_s)


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _reason(exc: BaseException) -> str:
    """An exception as a short reason (amqtt wraps the OS error in ``ConnectError``)."""
    cause = exc.__cause__ or exc.__context__
    inner = f" ({cause})" if cause is not None and str(cause) else ""
    return f"{type(exc).__name__}: {exc}{inner}" if str(exc) else f"{type(exc).__name__}{inner}"
