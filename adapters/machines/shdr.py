"""SHDR: the line protocol of MTConnect adapters (TCP 7878), the usual route for older controls
and RS-232 machines behind a serial-to-TCP gateway.

We connect to the adapter as an MTConnect agent would: send ``* PING`` and expect
``* PONG <ms>`` (the adapter's heartbeat period), then read lines such as::

    2022-08-08T13:51:34.7167146Z|avail|AVAILABLE|pexecution|READY|ppartcount|0
    2022-08-08T13:51:34.7167146Z|system|FAULT|1010|HIGH||SPINDLE OVERLOAD
    2022-08-08T13:51:34.7167146Z|OKUMA:pprogram|O1234

Keys are mapped to meanings through the device's ``Devices.xml`` (DataItem ``name`` or ``id``
and its ``type``) or the config's ``keys``. Conditions and messages take the rest of their line.
Assets (``@ASSET@``, including ``--multiline--`` bodies) and other items are skipped, never
choked on. Event times come from the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from adapters.machines.base import MachineEvents, config_file
from adapters.machines.observations import MachineObserver, Meaning, data_item_meaning
from contracts import CloudEvent, Token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)


class ShdrConfig(BaseModel):
    """One SHDR adapter (one TCP peer): one machine, or several with ``dev:key`` lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(default=7878, ge=1, le=65535)
    machine_id: Token | None = None  # the machine of lines without a ``dev:`` prefix
    devices: dict[str, Token] = {}  # SHDR device name (``dev:key``) -> machine id
    devices_xml: Path | None = None  # maps keys (DataItem name or id) to what they mean
    device: str | None = None  # which device of Devices.xml (name or uuid); default: the first
    keys: dict[str, Meaning] = {}  # key -> meaning; wins over Devices.xml
    heartbeat_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("devices_xml")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return config_file(value, info)

    def source(self) -> str:
        return f"shdr://{self.host}:{self.port}"


# --- Devices.xml -----------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def devices_xml_meanings(path: Path, device: str | None = None) -> dict[str, Meaning]:
    """Key (DataItem name and id) -> meaning, for one device of an MTConnectDevices document."""
    root = ET.parse(path).getroot()  # noqa: S314 - a file the plant's own engineer configured
    devices = [e for e in root.iter() if _local(e.tag) == "Device"]
    if device is not None:
        devices = [d for d in devices if device in (d.get("name"), d.get("uuid"), d.get("id"))]
        if not devices:
            raise ValueError(f"{path}: no device named {device!r}")
    meanings: dict[str, Meaning] = {}
    for item in (e for d in devices[:1] for e in d.iter() if _local(e.tag) == "DataItem"):
        meaning = data_item_meaning(
            item.get("type", ""), item.get("subType"), item.get("category", "")
        )
        if meaning is None:
            continue
        for key in (item.get("name"), item.get("id")):
            if key:
                meanings.setdefault(key, meaning)
    return meanings


# --- lines -----------------------------------------------------------------------------------


def split_fields(line: str) -> list[str]:
    """Split on ``|``; a backslash escapes the next character, and a field in double quotes
    may hold pipes (the agent's tokenizer rules)."""
    fields: list[str] = []
    current: list[str] = []
    i, quoted, n = 0, False, len(line)
    while i < n:
        char = line[i]
        if char == "\\" and i + 1 < n:
            current.append(line[i + 1])
            i += 2
            continue
        if char == '"' and (quoted or not current):
            quoted = not quoted
        elif char == "|" and not quoted:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    fields.append("".join(current))
    return fields


MAX_LINE = 1 << 20  # a peer that never ends its line (a gateway at the wrong baud rate)
_MULTILINE = re.compile(r"^--multiline--(\w+)$")


class ShdrParser:
    """Turns SHDR lines into contract events, publishing changes only."""

    def __init__(self, config: ShdrConfig) -> None:
        self.config = config
        self.keys: dict[str, Meaning] = {}
        if config.devices_xml is not None:
            self.keys.update(devices_xml_meanings(config.devices_xml, config.device))
        self.keys.update(config.keys)
        self._machines: dict[str, MachineObserver] = {}
        self._multiline_end: str | None = None
        self.lines = 0
        self._stamp = ""
        self._seen: dict[str, int] = {}

    def machine(self, machine_id: str) -> MachineObserver:
        state = self._machines.get(machine_id)
        if state is None:
            state = MachineObserver(MachineEvents(machine_id, self.config.source()), log)
            self._machines[machine_id] = state
        return state

    def machines(self) -> list[MachineObserver]:
        return list(self._machines.values())

    def feed(self, line: str) -> list[CloudEvent]:
        """The events of one line; whatever is wrong with it becomes a bad-input condition."""
        try:
            return self._feed(line)
        except Exception as exc:
            return self._bad(None, f"line not understood ({type(exc).__name__}: {exc})", line)

    def _uid(self, stamp: str, key: str) -> str:
        """What makes an item's value unique: its line's timestamp and, when one timestamp
        carries the same item more than once, which occurrence it is (so ACTIVE, READY, ACTIVE
        under one coarse timestamp are three facts). Without a timestamp: when it arrived."""
        if not stamp:
            return f"{time.time_ns()}|{key}"
        if stamp != self._stamp:
            self._stamp, self._seen = stamp, {}
        n = self._seen[key] = self._seen.get(key, 0) + 1
        return f"{stamp}|{key}" if n == 1 else f"{stamp}|{key}|{n}"

    def _feed(self, line: str) -> list[CloudEvent]:
        self.lines += 1
        line = line.rstrip("\r\n")
        if self._multiline_end is not None:
            if line == self._multiline_end:
                self._multiline_end = None
            return []
        if not line or line.startswith("*"):
            return []  # heartbeats and adapter commands (* shdrVersion, * uuid, …)
        fields = split_fields(line)
        if len(fields) < 2:
            return self._bad(None, "a line needs a timestamp and at least one item", line)
        stamp, items = fields[0], fields[1:]
        try:
            at = _parse_time(stamp)
        except ValueError:
            return self._bad(None, f"timestamp {stamp!r} is not ISO 8601", line)
        if items[0].startswith("@"):
            # Assets: a multiline body runs until its terminator; either way, not our concern.
            if items[0] in ("@ASSET@", "@UPDATE_ASSET@") and _MULTILINE.match(items[-1]):
                self._multiline_end = items[-1]
            return []
        events: list[CloudEvent] = []
        index = 0
        while index < len(items):
            device, _, key = items[index].rpartition(":")
            machine_id = self.config.devices.get(device) if device else self.config.machine_id
            meaning = self.keys.get(key) or self.keys.get(items[index])
            if meaning in ("condition", "message"):
                # These take the rest of the line.
                if machine_id is not None:
                    events += self._apply_rest(machine_id, meaning, key, items[index + 1 :], at,
                                               stamp)  # fmt: skip
                break
            if index + 1 >= len(items):
                events += self._bad(machine_id, f"item {key!r} has no value", line)
                break
            value = items[index + 1]
            index += 2
            if machine_id is None or meaning is None or meaning == "ignore":
                continue
            events += self._apply(machine_id, meaning, key, value, at, self._uid(stamp, key))
        return events

    def bad_line(self, what: str, raw: bytes) -> list[CloudEvent]:
        return self._bad(None, what, raw[:200].decode("utf-8", errors="replace"))

    def _bad(self, machine_id: str | None, what: str, raw: str) -> list[CloudEvent]:
        machine = (
            machine_id or self.config.machine_id or next(iter(self.config.devices.values()), None)
        )
        if machine is None:
            log.warning("%s: %s; got %r", self.config.source(), what, raw[:200])
            return []
        return self.machine(machine).bad(what, raw)

    def _apply(
        self, machine_id: str, meaning: Meaning, key: str, value: str, at: datetime, uid: str
    ) -> list[CloudEvent]:
        return self.machine(machine_id).value(meaning, key, value, at, f"{uid}|{value}")

    def _apply_rest(
        self,
        machine_id: str,
        meaning: Meaning,
        key: str,
        rest: list[str],
        at: datetime,
        stamp: str,
    ) -> list[CloudEvent]:
        if meaning == "message":
            return []  # contract v1 has no message type; parsed so the line does not derail
        if not rest:
            return self._bad(machine_id, f"condition {key!r} has no level", key)
        # level|native code|native severity|qualifier|text
        code = rest[1] if len(rest) > 1 and rest[1] else None
        text = rest[4] if len(rest) > 4 and rest[4] else None
        uid = f"{self._uid(stamp, key)}|{'|'.join(rest)}"
        return self.machine(machine_id).condition(key, rest[0], code, text, at, uid)


def _parse_time(stamp: str) -> datetime:
    if not stamp:
        return datetime.now(UTC)
    # Agents write up to 7 fractional digits; Python takes 6.
    text = stamp.replace("Z", "+00:00")
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- the adapter -----------------------------------------------------------------------------


class ShdrAdapter:
    """Reads one SHDR adapter over TCP; reconnects with backoff; publishes in batches."""

    protocol: ClassVar[str] = "shdr"

    def __init__(self, config: ShdrConfig) -> None:
        self.config = config
        self.parser = ShdrParser(config)

    def machine_ids(self) -> list[str]:
        ids = list(self.config.devices.values())
        return [self.config.machine_id, *ids] if self.config.machine_id else ids

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            heard = False
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.config.host, self.config.port), 10
                )
            except (OSError, TimeoutError) as exc:
                log.warning("%s: cannot connect (%s); retrying in %.1f s",
                            self.config.source(), exc, backoff)  # fmt: skip
            else:
                log.info("%s: connected", self.config.source())
                try:
                    heard = await self._session(reader, writer, publisher, stop)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    log.warning("%s: connection lost (%s)", self.config.source(), exc)
                except Exception:
                    # Whatever else went wrong, the adapter must live on: reconnect.
                    log.exception("%s: session failed", self.config.source())
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            if stop.is_set():
                break
            # Only a session that brought data resets the backoff: a gateway that accepts and
            # hangs up at once is retried ever more slowly, not twice a second.
            backoff = 0.5 if heard else min(backoff * 2, self.config.reconnect_max_s)
            with contextlib.suppress(Exception):
                await publisher.publish_many(self._lost())
            await _sleep(stop, backoff)

    def _lost(self) -> list[CloudEvent]:
        why = f"SHDR adapter {self.config.source()} unreachable"
        return [e for m in self.machine_ids() for e in self.parser.machine(m).lost(why)]

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        publisher: EventPublisher,
        stop: asyncio.Event,
    ) -> bool:
        """Read until the connection ends; returns whether any data came."""
        writer.write(b"* PING\n")
        await writer.drain()
        # An adapter that answers PONG promises to be heard from within its period; one that
        # does not (older ones) may stay silent as long as nothing changes.
        heartbeat: float | None = None
        last_ping = last_heard = time.monotonic()
        buffer = b""
        heard = False
        while not stop.is_set():
            now = time.monotonic()
            if heartbeat is not None and now - last_heard > heartbeat:
                raise TimeoutError(f"no heartbeat for {heartbeat:.1f} s")
            if now - last_ping > (heartbeat or self.config.heartbeat_timeout_s) / 2:
                # On a schedule, busy or not: an adapter may hold us to the heartbeat too.
                writer.write(b"* PING\n")
                await writer.drain()
                last_ping = now
            try:
                # Read what has arrived (many lines at a time), not line by line.
                chunk = await asyncio.wait_for(reader.read(1 << 16), 0.5)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionResetError("the adapter closed the connection")
            heard = True
            *lines, buffer = (buffer + chunk).split(b"\n")
            events: list[CloudEvent] = []
            if len(buffer) > MAX_LINE:
                events += self.parser.bad_line(f"a line longer than {MAX_LINE} bytes", buffer)
                buffer = b""
            for raw in lines:
                line = raw.decode("utf-8", errors="replace")
                if line.startswith("* PONG"):
                    heartbeat = _pong_period(line, self.config.heartbeat_timeout_s)
                else:
                    events += self.parser.feed(line)
            if events:
                await publisher.publish_many(events)
            # Time spent publishing (NATS slow or down) is not the adapter's silence.
            last_heard = time.monotonic()
        return heard

    async def check(self, deadline_s: float = 5.0) -> list[CloudEvent]:
        """Connect, read what the adapter sends first (its snapshot: until a second of silence,
        at most ``deadline_s``), and return the events."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.config.host, self.config.port), 10
        )
        events: list[CloudEvent] = []
        buffer = b""
        ends = time.monotonic() + deadline_s
        try:
            writer.write(b"* PING\n")
            await writer.drain()
            while (left := ends - time.monotonic()) > 0:
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 16), min(1.0, left))
                except TimeoutError:
                    break
                if not chunk:
                    break
                *lines, buffer = (buffer + chunk).split(b"\n")
                for raw in lines:
                    if not raw.startswith(b"* PONG"):
                        events += self.parser.feed(raw.decode("utf-8", errors="replace"))
        finally:
            writer.close()
        return events


def _pong_period(line: str, current: float) -> float:
    """``* PONG <ms>``: the adapter promises a heartbeat every <ms>; allow twice that."""
    parts = line.split()
    try:
        return max(0.2, 2 * int(parts[2]) / 1000)
    except (IndexError, ValueError):
        return current


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def replay_lines(config: ShdrConfig, lines: Iterable[str]) -> list[CloudEvent]:
    """Parse a capture offline (``adapter check`` of a file, benchmarks)."""
    parser = ShdrParser(config)
    return [event for line in lines for event in parser.feed(line)]
