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

Births define aliases; DATA messages may name metrics by alias only. Event time is the metric's
timestamp, else the payload's. Ids derive from group/node/device, metric, timestamp and value, so a
message delivered twice, or a rebirth repeating values, publishes nothing new.

Session rules (Sparkplug 3.0): ``seq`` runs 0..255 per edge node across its births and DATA; a
gap, or DATA before any birth, makes the adapter distrust the node, request a rebirth (an NCMD
``Node Control/Rebirth``, unless ``request_rebirth = false``) and ignore its values until the next
NBIRTH. An NDEATH is honoured when its ``bdSeq`` is the current NBIRTH's, or numbered after it
(pysparkplug 0.6 numbers a clean disconnect's NDEATH like the next session); one numbered before
it is a stale death of an earlier session and is ignored. A valid NDEATH makes every machine of
the node ``UNAVAILABLE`` once, with an ``unavailable`` condition ``ADAPTER_CONNECTION``; a DDEATH
its device's machine. The next birth publishes ``AVAILABLE`` and the birth's values.

Losing the broker (refused, closed, or no answer to a ping) does the same for every machine and
the adapter reconnects with backoff, resubscribes and requests rebirths. A payload that is not
Sparkplug B, or a metric of the wrong type for its mapping, is logged and published as an
``ADAPTER_INPUT`` warning; the adapter goes on. With ``host_id`` the adapter also publishes the
Sparkplug 3.0 host ``STATE`` (retained, with a will saying offline). See
``docs/adapters/sparkplug.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

from adapters.machines.base import MachineEvents, config_file, report_bad_input
from adapters.machines.observations import EXECUTIONS, MODES, MachineObserver, Meaning
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

    host: str
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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --- what the messages mean --------------------------------------------------------------------


def _when(milliseconds: int | None, fallback: datetime) -> datetime:
    if milliseconds is None:
        return fallback
    try:
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return fallback


def _text(value: Value) -> str:
    """A metric value as a table key: ``true``/``false``, a number, or the string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


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

    def bad(self, what: str, raw: object, uid: str | None = None) -> list[CloudEvent]:
        """An ``ADAPTER_INPUT`` warning. With ``uid`` (what was read: metric, timestamp,
        value) its id is stable, so a rebirth repeating the same bad value adds nothing."""
        what = f"{self.config.scope()}: {what}"
        if uid is None:
            return self.observer.bad(what, raw)
        return [report_bad_input(log, self.events, what, raw, f"{uid}|{what}")]

    def observe(self, name: str, value: Value, at: datetime, uid: str) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        for role in self.roles.get(name, ()):
            if isinstance(role, ConditionMetric):
                events += self._condition(role, value, at, uid)
            elif role == "execution":
                events += self._state("execution", name, value, at, uid)
            elif role == "mode":
                events += self._state("controller_mode", name, value, at, uid)
            elif role == "program":
                if isinstance(value, bytes | bool):
                    what = f"metric {name!r}: a program name, got {value!r}"
                    events += self.bad(what, value, uid)
                else:
                    events += self.observer.value("program", name, _text(value), at, uid)
            else:
                count = _whole(value)
                if count is None:
                    events += self.bad(f"metric {name!r}: a count, got {value!r}", value, uid)
                else:
                    meaning: Meaning = "bad_part_count" if role == "bad_count" else "part_count"
                    events += self.observer.value(meaning, name, str(count), at, uid)
        return events

    def _state(
        self,
        meaning: Literal["execution", "controller_mode"],
        name: str,
        value: Value,
        at: datetime,
        uid: str,
    ) -> list[CloudEvent]:
        mapped = self.config.execution if meaning == "execution" else self.config.mode
        assert mapped is not None
        table: dict[str, str] = dict(mapped.values)
        if not table and meaning == "execution" and isinstance(value, bool):
            table = {"true": "ACTIVE", "false": "STOPPED"}
        key = _text(value)
        names = EXECUTIONS if meaning == "execution" else MODES
        state = table.get(key) if table else (key.upper() if isinstance(value, str) else None)
        if state is None or state not in names:
            what = "an execution" if meaning == "execution" else "a controller mode"
            return self.bad(f"metric {name!r}: {key!r} is not {what} in its table", value, uid)
        return self.observer.value(meaning, name, state, at, uid)

    def _condition(
        self, condition: ConditionMetric, value: Value, at: datetime, uid: str
    ) -> list[CloudEvent]:
        name = condition.metric
        level = condition.level.upper()
        if condition.native_code is not None:
            if not isinstance(value, bool | int | float):
                return self.bad(f"metric {name!r}: a flag, got {value!r}", value, uid)
            active = bool(value)
            message = condition.message or (name if active else None)
            return self.observer.condition(
                name, level if active else "NORMAL", condition.native_code, message, at, uid
            )
        if isinstance(value, bytes | bool) or (isinstance(value, float) and _whole(value) is None):
            return self.bad(f"metric {name!r}: an alarm code, got {value!r}", value, uid)
        code = _text(value).strip()
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


@dataclass
class _Node:
    """One edge node's Sparkplug session as this host sees it."""

    name: str
    machines: dict[str | None, _Machine] = field(default_factory=dict)  # device (None: node)
    bd_seq: int | None = None  # the bdSeq of the NBIRTH the current session began with
    born: bool = False  # values trusted: an NBIRTH came and no seq was missed since
    seq: int | None = None  # the last seq read
    devices_born: set[str] = field(default_factory=set)
    aliases: dict[str | None, dict[int, str]] = field(default_factory=dict)
    datatypes: dict[str | None, dict[str, int]] = field(default_factory=dict)
    rebirth_wanted: bool = False  # a rebirth request is to be sent
    rebirth_asked_at: float | None = None  # monotonic time of the last rebirth request

    def all_machines(self) -> list[_Machine]:
        return list(self.machines.values())


class SparkplugHost:
    """The host application's rules, without I/O: ``receive`` turns one MQTT message into
    events; ``take_rebirths`` names the edge nodes to ask for a rebirth."""

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
        message = f"MQTT broker {self.config.broker()} unreachable: {why}"
        return [e for machine in self.machines() for e in machine.observer.lost(message)]

    def connected(self) -> None:
        """A new MQTT session: what happened meanwhile is unknown until the next births."""
        for node in self.nodes.values():
            node.born = False
            node.seq = None
            self.ask_rebirth(node, "the host (re)connected", force=True)

    def ask_rebirth(self, node: _Node, why: str, force: bool = False) -> None:
        """Note that ``node`` must be born again; ``take_rebirths`` says when to ask it."""
        if not self.config.request_rebirth:
            log.info("%s/%s: %s; waiting for its next birth", self.config.group_id, node.name, why)
            return
        if not node.rebirth_wanted:
            log.info("%s/%s: %s; requesting a rebirth", self.config.group_id, node.name, why)
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
        try:
            payload = decode_payload(data)
        except PayloadError as exc:
            return self._bad_payload(node, device, f"{kind} {topic}: {exc}", data)
        if kind == "NDEATH":
            return self._node_death(node, payload)
        if kind == "NBIRTH":
            return self._node_birth(node, payload, now)
        if not node.born:
            self.ask_rebirth(node, f"{kind} before its NBIRTH (or after a missed message)")
            return []
        if payload.seq is None or payload.seq == node.seq:
            if payload.seq is None:
                node.born = False
                self.ask_rebirth(node, f"{kind} without seq")
            return []  # the same message again (an MQTT QoS 1 duplicate)
        expected = ((node.seq or 0) + 1) % SEQ_MODULUS
        if payload.seq != expected:
            node.born = False
            self.ask_rebirth(node, f"{kind} seq {payload.seq}, expected {expected}: missed")
            return []
        node.seq = payload.seq
        if kind == "NDATA":
            return self._apply(node, None, payload, now)
        assert device is not None
        if kind == "DBIRTH":
            return self._device_birth(node, device, payload, now)
        if kind == "DDEATH":
            return self._device_death(node, device)
        if device not in node.devices_born:
            self.ask_rebirth(node, f"DDATA of device {device} before its DBIRTH")
            return []
        return self._apply(node, device, payload, now)

    def _bad_payload(
        self, node: _Node, device: str | None, what: str, data: bytes
    ) -> list[CloudEvent]:
        machine = node.machines.get(device)
        if machine is not None:
            return machine.bad(what, data)
        if device is None and node.machines:
            return [e for m in node.all_machines() for e in m.bad(what, data)]
        log.warning("%s: %s", self.config.group_id, what)
        return []

    def _node_birth(self, node: _Node, payload: Payload, now: datetime) -> list[CloudEvent]:
        bd_seq = payload.metric("bdSeq")
        value = bd_seq.value() if bd_seq is not None else None
        node.bd_seq = _whole(value) if value is not None else None
        node.born = True
        node.seq = payload.seq
        node.devices_born.clear()
        node.aliases.clear()
        node.datatypes.clear()
        events: list[CloudEvent] = []
        machine = node.machines.get(None)
        if machine is not None:
            at = _when(payload.timestamp, now)
            uid = f"NBIRTH|{node.bd_seq}|{payload.timestamp}"
            events += machine.observer.value("availability", "NBIRTH", "AVAILABLE", at, uid)
        return events + self._apply(node, None, payload, now, birth=True)

    def _device_birth(
        self, node: _Node, device: str, payload: Payload, now: datetime
    ) -> list[CloudEvent]:
        node.devices_born.add(device)
        node.aliases.pop(device, None)
        node.datatypes.pop(device, None)
        events: list[CloudEvent] = []
        machine = node.machines.get(device)
        if machine is not None:
            at = _when(payload.timestamp, now)
            uid = f"DBIRTH|{node.bd_seq}|{payload.timestamp}"
            events += machine.observer.value("availability", "DBIRTH", "AVAILABLE", at, uid)
        return events + self._apply(node, device, payload, now, birth=True)

    def _node_death(self, node: _Node, payload: Payload) -> list[CloudEvent]:
        metric = payload.metric("bdSeq")
        raw = metric.value() if metric is not None else None
        bd_seq = _whole(raw) if raw is not None else None
        where = f"{self.config.group_id}/{node.name}"
        current = node.bd_seq
        if bd_seq is not None and current is not None and bd_seq != current:
            ahead = (bd_seq - current) % SEQ_MODULUS
            if ahead >= SEQ_MODULUS // 2:
                # Numbered before the current session: the will of an earlier connection,
                # delivered late (a session taken over). The node is alive.
                log.info("%s: stale NDEATH bdSeq %d ignored (current NBIRTH bdSeq %d)",
                         where, bd_seq, current)  # fmt: skip
                return []
            # Numbered after the current session: no earlier session can have sent it. Some
            # edge nodes (pysparkplug 0.6) number a clean disconnect's NDEATH like the next
            # session; the node is gone all the same.
            log.warning("%s: NDEATH bdSeq %d follows NBIRTH bdSeq %d; honoured as this "
                        "session's death", where, bd_seq, current)  # fmt: skip
        node.born = False
        node.seq = None
        node.devices_born.clear()
        why = f"Sparkplug edge node {where} is offline (NDEATH bdSeq {bd_seq})"
        return [e for m in node.all_machines() for e in m.observer.lost(why)]

    def _device_death(self, node: _Node, device: str) -> list[CloudEvent]:
        node.devices_born.discard(device)
        machine = node.machines.get(device)
        if machine is None:
            return []
        why = f"Sparkplug device {self.config.group_id}/{node.name}/{device} is offline (DDEATH)"
        return machine.observer.lost(why)

    def _apply(
        self,
        node: _Node,
        device: str | None,
        payload: Payload,
        now: datetime,
        birth: bool = False,
    ) -> list[CloudEvent]:
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
                    what = f"alias {metric.alias} was not defined by the birth"
                    events += machine.bad(what, metric.alias)
                    continue
            if machine is not None and name is not None and name in machine.roles:
                mapped.append((name, metric))
        if machine is None:
            return events
        # Mode and program first: read before the execution of the same message, they travel
        # in its event (one event, not an execution without them followed by one with them).
        mapped.sort(key=lambda item: not {"mode", "program"} & set(machine.roles[item[0]]))
        for name, metric in mapped:
            events += self._metric(machine, name, metric, datatypes.get(name), payload, now)
        return events

    @staticmethod
    def _metric(
        machine: _Machine,
        name: str,
        metric: Metric,
        birth_datatype: int | None,
        payload: Payload,
        now: datetime,
    ) -> list[CloudEvent]:
        try:
            value = metric.value(metric.datatype or birth_datatype)
        except PayloadError as exc:
            stamp = metric.timestamp if metric.timestamp is not None else payload.timestamp
            return machine.bad(str(exc), metric.raw, f"{name}|{stamp}|{metric.raw!r}")
        if value is None:
            return []  # a null metric: its value is not known, nothing to tell
        stamp = metric.timestamp if metric.timestamp is not None else payload.timestamp
        uid = f"{name}|{stamp}|{_text(value)}"
        return machine.observe(name, value, _when(stamp, now), uid)


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


class SparkplugAdapter:
    """Reads one broker's Sparkplug group for the configured machines (see the docstring)."""

    protocol: ClassVar[str] = "sparkplug"

    def __init__(self, config: SparkplugConfig) -> None:
        self.config = config
        self.host = SparkplugHost(config)

    def machine_ids(self) -> list[str]:
        return [m.machine_id for m in self.config.machines]

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        first = min(RECONNECT_MIN_S, self.config.reconnect_max_s)
        backoff = first
        while not stop.is_set():
            heard = False
            try:
                client = await self._connect()
            except BrokerLost as exc:
                log.warning("%s: %s; retrying in %.2f s", self.config.broker(), exc, backoff)
                await self._publish(publisher, self.host.broker_lost(str(exc)), stop)
            else:
                try:
                    heard = await self._session(client, publisher, stop)
                except BrokerLost as exc:
                    log.warning("%s: %s", self.config.broker(), exc)
                    await self._publish(publisher, self.host.broker_lost(str(exc)), stop)
                except Exception as exc:
                    # Whatever else went wrong, the adapter must live on: reconnect.
                    log.exception("%s: session failed", self.config.broker())
                    why = f"session failed ({type(exc).__name__})"
                    await self._publish(publisher, self.host.broker_lost(why), stop)
                finally:
                    await self._close(client, clean=stop.is_set())
            if stop.is_set():
                return
            # Only a session that brought messages resets the backoff.
            backoff = first if heard else min(backoff * 2, self.config.reconnect_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)

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
                if message is not None:
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
        if config.host_id is not None:
            # Sparkplug 3.0: the broker says the host is offline when it loses us.
            options["will"] = {
                "topic": self._state_topic(),
                "message": json.dumps({"online": False, "timestamp": _ms()}),
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

    def _state_topic(self) -> str:
        return f"{NAMESPACE}/STATE/{self.config.host_id}"

    async def _subscribe(self, client: MQTTClient) -> None:
        topic = f"{NAMESPACE}/{self.config.group_id}/#"
        try:
            codes = await asyncio.wait_for(client.subscribe([(topic, 1)]), self.config.timeout_s)
        except Exception as exc:
            raise BrokerLost(f"subscribing to {topic} failed: {_reason(exc)}") from None
        if any(code == 0x80 for code in codes):
            raise BrokerLost(f"the broker refused the subscription to {topic}")
        log.info("%s: subscribed to %s", self.config.broker(), topic)
        if self.config.host_id is not None:
            state = json.dumps({"online": True, "timestamp": _ms()}).encode()
            await self._publish_mqtt(client, self._state_topic(), state, qos=1, retain=True)
        self.host.connected()

    async def _session(
        self, client: MQTTClient, publisher: EventPublisher, stop: asyncio.Event
    ) -> bool:
        """Read until the broker is lost or ``stop``; whether any message came."""
        await self._subscribe(client)
        heard = False
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while not stop.is_set():
            await self._send_rebirths(client)
            message = await self._receive(client, RECEIVE_WAIT_S)
            if message is None:
                if loop.time() - quiet_since >= self.config.keepalive_s / 2:
                    await self._ping(client)
                    quiet_since = loop.time()
                continue
            heard = True
            quiet_since = loop.time()
            events = self.host.receive(message.topic, message.data)
            if events:
                await self._publish(publisher, events, stop)
        return heard

    async def _receive(self, client: MQTTClient, wait_s: float) -> _Received | None:
        """The next message, or ``None`` after ``wait_s`` without one. Raises ``BrokerLost``."""
        if not client.session.transitions.is_connected():
            raise BrokerLost("the broker closed the connection")
        try:
            message = await client.deliver_message(timeout_duration=wait_s)
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # amqtt cancels its waiting readers when the connection closes.
            raise BrokerLost("the broker closed the connection") from None
        except Exception as exc:
            raise BrokerLost(f"connection lost: {_reason(exc)}") from None
        if message is None:
            return None
        return _Received(str(message.topic), bytes(message.data or b""))

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
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(wait * 2, self.config.reconnect_max_s)

    async def _close(self, client: MQTTClient, clean: bool) -> None:
        """Disconnect (saying offline first when the host STATE is kept); never raises."""
        with contextlib.suppress(Exception):
            connected = client.session is not None and client.session.transitions.is_connected()
            if connected and clean and self.config.host_id is not None:
                offline = json.dumps({"online": False, "timestamp": _ms()}).encode()
                await asyncio.wait_for(
                    client.publish(self._state_topic(), offline, qos=1, retain=True),
                    self.config.timeout_s,
                )
            if connected:
                await asyncio.wait_for(client.disconnect(), self.config.timeout_s)
            else:
                await client.cancel_tasks()
                if client._handler is not None:
                    await asyncio.wait_for(client._handler.stop(), self.config.timeout_s)


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _reason(exc: BaseException) -> str:
    """An exception as a short reason (amqtt wraps the OS error in ``ConnectError``)."""
    cause = exc.__cause__ or exc.__context__
    inner = f" ({cause})" if cause is not None and str(cause) else ""
    return f"{type(exc).__name__}: {exc}{inner}" if str(exc) else f"{type(exc).__name__}{inner}"
