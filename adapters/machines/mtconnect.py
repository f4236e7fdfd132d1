"""MTConnect agent client (httpx): ``probe``, then ``current``, then ``sample`` from
``nextSequence``, streamed (multipart, with ``interval``) or, if the agent cannot, polled.

The agent's sequence numbers make the events' ids (with its ``instanceId``), so reading the same
observation twice publishes nothing new. When the agent restarts (a new ``instanceId``) or the
client fell behind its buffer (``OUT_OF_RANGE``: data lost), the client resynchronises from
``current`` and says so in the log and with a ``warning`` condition on each machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from adapters.machines.base import MachineEvents
from adapters.machines.observations import MachineObserver, Meaning, data_item_meaning
from contracts import CloudEvent, Token, is_token
from hub.ports import EventPublisher

log = logging.getLogger(__name__)
RESYNC_CODE = "MTCONNECT_RESYNC"


class MtconnectConfig(BaseModel):
    """One MTConnect agent and the devices to take from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://", description="the agent, e.g. http://agent:5000")
    devices: dict[str, Token] = {}  # device name or uuid -> machine id; empty: every device
    interval_ms: int = Field(default=1000, ge=0, le=60_000)
    heartbeat_ms: int = Field(default=10_000, ge=100, le=600_000)
    count: int = Field(default=1000, ge=1, le=100_000)
    streaming: bool = True  # multipart sample stream; False (or if the agent cannot): polling
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    timeout_s: float = Field(default=10.0, gt=0, le=600)


class AgentError(Exception):
    """An MTConnectError document (e.g. OUT_OF_RANGE) or a response that is not MTConnect."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class DataItem:
    device: str  # the device's name
    meaning: Meaning
    machine_id: str = ""


@dataclass(frozen=True)
class Observation:
    item_id: str
    sequence: int
    time: datetime
    tag: str  # Availability, Execution, … or a condition level: Normal, Warning, Fault
    value: str
    native_code: str | None = None


@dataclass
class Streams:
    instance_id: str
    next_sequence: int
    first_sequence: int
    observations: list[Observation] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (data item id, what was wrong)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _time(text: str) -> datetime:
    # Agents write up to 7 fractional digits, and older ones no zone: MTConnect times are UTC.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _declare_unbound_prefixes(body: bytes) -> bytes:
    """Some agents (1.4 with extension items) write ``<x:Motion>`` without declaring ``x``;
    declare each such prefix on the root element so the rest of the document can be read."""
    used = set(re.findall(rb"<(\w+):\w", body))
    declared = set(re.findall(rb"xmlns:(\w+)=", body))
    missing = used - declared - {b"xml"}
    if not missing:
        return body
    extra = b"".join(b' xmlns:%s="urn:mes-hub:undeclared:%s"' % (p, p) for p in sorted(missing))
    root = re.search(rb"<(?!\?)(?!!)[\w:]+", body)
    return body if root is None else body[: root.end()] + extra + body[root.end() :]


def _parse(body: bytes) -> ET.Element:
    try:
        root = ET.fromstring(body)  # noqa: S314 - the plant's own agent, not the internet
    except ET.ParseError:
        try:
            root = ET.fromstring(_declare_unbound_prefixes(body))  # noqa: S314
        except ET.ParseError as exc:
            raise AgentError("INVALID_XML", f"the agent's answer is not XML ({exc})") from None
    if _local(root.tag) == "MTConnectError":
        error = next((e for e in root.iter() if _local(e.tag) == "Error"), None)
        code = error.get("errorCode", "UNKNOWN") if error is not None else "UNKNOWN"
        text = (error.text or "").strip() if error is not None else ""
        raise AgentError(code, text)
    return root


def parse_probe(body: bytes) -> dict[str, DataItem]:
    """dataItemId -> (device, meaning), for the data items we map."""
    items: dict[str, DataItem] = {}
    for device in (e for e in _parse(body).iter() if _local(e.tag) == "Device"):
        name = device.get("name") or device.get("uuid") or device.get("id") or "device"
        for item in (e for e in device.iter() if _local(e.tag) == "DataItem"):
            meaning = data_item_meaning(
                item.get("type", ""), item.get("subType"), item.get("category", "")
            )
            if meaning is not None and item.get("id"):
                items[item.get("id", "")] = DataItem(name, meaning)
    return items


def device_uuids(body: bytes) -> dict[str, str]:
    return {
        d.get("name", ""): d.get("uuid", "")
        for d in _parse(body).iter()
        if _local(d.tag) == "Device"
    }


def parse_streams(body: bytes) -> Streams:
    root = _parse(body)
    if _local(root.tag) != "MTConnectStreams":
        raise AgentError("NOT_STREAMS", f"expected MTConnectStreams, got {_local(root.tag)}")
    header = next((e for e in root.iter() if _local(e.tag) == "Header"), None)
    try:
        assert header is not None
        streams = Streams(
            header.get("instanceId", ""),
            int(header.get("nextSequence", "")),
            int(header.get("firstSequence", "0")),
        )
    except (AssertionError, ValueError):
        raise AgentError("BAD_HEADER", "the answer has no usable Header") from None
    for element in root.iter():
        item_id, sequence = element.get("dataItemId"), element.get("sequence")
        if item_id is None or sequence is None:
            continue
        try:
            observation = Observation(
                item_id,
                int(sequence),
                _time(element.get("timestamp", "")),
                _local(element.tag),
                (element.text or "").strip(),
                element.get("nativeCode"),
            )
        except ValueError as exc:  # a sequence or timestamp that is not one
            streams.bad.append((item_id, f"observation of {item_id!r} not understood ({exc})"))
            continue
        streams.observations.append(observation)
    streams.observations.sort(key=lambda o: o.sequence)
    return streams


class MtconnectAdapter:
    protocol: ClassVar[str] = "mtconnect"

    def __init__(
        self, config: MtconnectConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self._transport = transport
        # Shown and stored (the events' source): never with a user name or password.
        self.safe_url = _without_credentials(config.url)
        self.items: dict[str, DataItem] = {}
        self.machines: dict[str, MachineObserver] = {}  # by machine id
        for device, machine_id in config.devices.items():
            # Known before the first probe, so an agent down at start is reported.
            self._observer(machine_id, device)
        self.instance_id: str | None = None
        self.next_sequence = 0
        self.resyncs = 0
        self._sampled = False  # this session got as far as samples

    # --- mapping ---------------------------------------------------------------------------

    def _observer(self, machine_id: str, device: str) -> MachineObserver:
        if machine_id not in self.machines:
            source = f"mtconnect+{self.safe_url}/{device}"
            self.machines[machine_id] = MachineObserver(MachineEvents(machine_id, source), log)
        return self.machines[machine_id]

    def _machine_id(self, device: str, uuid: str) -> str | None:
        chosen = self.config.devices
        if chosen:
            return chosen.get(device) or chosen.get(uuid)
        return device if is_token(device) else re.sub(r"[^A-Za-z0-9_-]", "-", device)

    def _learn(self, probe: bytes) -> None:
        uuids = device_uuids(probe)
        self.items = {}
        for item_id, item in parse_probe(probe).items():
            machine_id = self._machine_id(item.device, uuids.get(item.device, ""))
            if machine_id is None:
                continue
            self.items[item_id] = DataItem(item.device, item.meaning, machine_id)
            self._observer(machine_id, item.device)
        if not self.items:
            raise AgentError("NO_DEVICES", f"none of {sorted(self.config.devices)} in the probe")

    def apply(self, streams: Streams) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        for item_id, what in streams.bad:
            item = self.items.get(item_id)
            if item is not None:
                events += self.machines[item.machine_id].bad(what, item_id)
        for observation in streams.observations:
            item = self.items.get(observation.item_id)
            if item is None:
                continue
            machine = self.machines[item.machine_id]
            uid = f"{streams.instance_id}|{observation.sequence}|{observation.item_id}"
            if item.meaning == "condition":
                text = observation.value or None
                events += machine.condition(observation.item_id, observation.tag,
                                            observation.native_code, text, observation.time,
                                            uid)  # fmt: skip
            elif item.meaning not in ("message", "ignore"):
                events += machine.value(
                    item.meaning, observation.item_id, observation.value, observation.time, uid
                )
        return events

    def _resync_events(self, why: str) -> list[CloudEvent]:
        self.resyncs += 1
        key = f"resync|{time.time_ns()}|{why}"
        log.warning("%s: %s; resynchronising from current", self.safe_url, why)
        return [
            m.events.condition("warning", None, key, RESYNC_CODE, why)
            for m in self.machines.values()
        ]

    # --- HTTP ------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.config.url.rstrip("/"),
            timeout=httpx.Timeout(self.config.timeout_s, read=self.config.timeout_s
                                  + self.config.heartbeat_ms / 1000),
            transport=self._transport,
        )  # fmt: skip

    async def _get(self, client: httpx.AsyncClient, path: str, **params: int) -> bytes:
        response = await client.get(path, params=params or None)
        if response.status_code >= 400 and b"MTConnectError" not in response.content[:500]:
            raise AgentError(f"HTTP_{response.status_code}", response.text[:200])
        return response.content

    async def _current(self, client: httpx.AsyncClient) -> list[CloudEvent]:
        streams = parse_streams(await self._get(client, "/current"))
        self.instance_id = streams.instance_id
        self.next_sequence = streams.next_sequence
        return self.apply(streams)

    async def check(self) -> list[CloudEvent]:
        async with self._client() as client:
            self._learn(await self._get(client, "/probe"))
            return await self._current(client)

    async def run(self, publisher: EventPublisher, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            self._sampled = False
            try:
                async with self._client() as client:
                    self._learn(await self._get(client, "/probe"))
                    await publisher.publish_many(await self._current(client))
                    await self._follow(client, publisher, stop)
            except (httpx.HTTPError, OSError, AgentError) as exc:
                why = str(exc) or type(exc).__name__
                log.warning("%s: %s; reconnecting in %.1f s", self.safe_url, why, backoff)
            except Exception as exc:
                # Whatever else went wrong, the client must live on: reconnect.
                why = f"{type(exc).__name__}: {exc}"
                log.exception("%s: session failed; reconnecting in %.1f s", self.safe_url, backoff)
            else:
                continue  # stopped
            with contextlib.suppress(Exception):
                await publisher.publish_many(self._lost(why))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            # Only a session that got as far as samples resets the backoff: an agent that
            # answers probe and current but refuses samples is retried ever more slowly.
            backoff = 0.5 if self._sampled else min(backoff * 2, self.config.reconnect_max_s)

    def _lost(self, why: str) -> list[CloudEvent]:
        return [e for m in self.machines.values() for e in m.lost(f"MTConnect agent: {why}")]

    async def _follow(
        self, client: httpx.AsyncClient, publisher: EventPublisher, stop: asyncio.Event
    ) -> None:
        """Samples from ``next_sequence`` on, until stopped; resyncs on restart or data loss."""
        streaming = self.config.streaming and self.config.interval_ms > 0
        while not stop.is_set():
            try:
                if streaming:
                    async for streams, multipart in self._stream(client, stop):
                        await publisher.publish_many(self._after_sample(streams))
                        if not multipart and not stop.is_set():
                            # One plain answer to a streaming request: the agent cannot stream.
                            log.info("%s: the agent does not stream; polling", self.safe_url)
                            streaming = False
                else:
                    streams = parse_streams(
                        await self._get(client, "/sample", **{"from": self.next_sequence,
                                                               "count": self.config.count})
                    )  # fmt: skip
                    await publisher.publish_many(self._after_sample(streams))
                    if not streams.observations:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(
                                stop.wait(), max(self.config.interval_ms, 100) / 1000
                            )
            except AgentError as error:
                if error.code not in ("OUT_OF_RANGE", "AGENT_RESTARTED"):
                    raise
                why = (
                    "the agent restarted (new instanceId)"
                    if error.code == "AGENT_RESTARTED"
                    else f"data lost: sequence {self.next_sequence} is out of the agent's buffer"
                )
                events = self._resync_events(why)
                if error.code == "AGENT_RESTARTED":
                    self._learn(await self._get(client, "/probe"))  # its devices may have changed
                events += await self._current(client)
                await publisher.publish_many(events)

    def _after_sample(self, streams: Streams) -> list[CloudEvent]:
        if self.instance_id is not None and streams.instance_id != self.instance_id:
            raise AgentError("AGENT_RESTARTED", streams.instance_id)
        events = self.apply(streams)
        self.next_sequence = max(self.next_sequence, streams.next_sequence)
        self._sampled = True
        return events

    async def _stream(
        self, client: httpx.AsyncClient, stop: asyncio.Event
    ) -> AsyncIterator[tuple[Streams, bool]]:
        """Each document of a sample stream, and whether it came as a multipart stream."""
        params = {
            "from": self.next_sequence,
            "count": self.config.count,
            "interval": self.config.interval_ms,
            "heartbeat": self.config.heartbeat_ms,
        }
        async with client.stream("GET", "/sample", params=params) as response:
            kind = response.headers.get("content-type", "")
            if "multipart" not in kind:
                body = await response.aread()
                yield parse_streams(body), False  # an error document, or one plain answer
                return
            boundary = re.search(r'boundary="?([^";]+)"?', kind)
            if boundary is None:
                raise AgentError("BAD_STREAM", f"multipart without boundary: {kind}")
            async for part in multipart_parts(response.aiter_bytes(), boundary.group(1)):
                yield parse_streams(part), True
                if stop.is_set():
                    return


async def multipart_parts(chunks: AsyncIterator[bytes], boundary: str) -> AsyncIterator[bytes]:
    """The bodies of a ``multipart/x-mixed-replace`` stream, as each one completes (parts
    carry a Content-length; without one, a part ends at the next boundary)."""
    marker = b"--" + boundary.encode()
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            start = buffer.find(marker)
            if start < 0:
                break
            headers_end = buffer.find(b"\r\n\r\n", start)
            if headers_end < 0:
                break
            headers = buffer[start + len(marker) : headers_end].decode("latin-1").lower()
            length = re.search(r"content-length:\s*(\d+)", headers)
            body_start = headers_end + 4
            if length is not None:
                body_end = body_start + int(length.group(1))
                if len(buffer) < body_end:
                    break
            else:
                body_end = buffer.find(marker, body_start)
                if body_end < 0:
                    break
            body = buffer[body_start:body_end].strip()
            buffer = buffer[body_end:]
            if body:
                yield body
