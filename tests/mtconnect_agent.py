"""An MTConnect agent stand-in for tests and benchmarks: real HTTP on loopback, the fixture
Devices.xml as ``probe``, and ``current``/``sample`` (polled or streamed as multipart) built from
SHDR lines fed to it, e.g. the real Okuma capture. ``restart()`` gives it a new instanceId;
a small ``buffer_size`` makes old sequences fall out of range, as in a real agent.

It is written independently of the adapter under test: its own SHDR splitting (plain ``|``,
which the capture needs) and its own XML writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from hub.server import ApiServer

NS = "urn:mtconnect.org:MTConnectStreams:2.0"
_instances = itertools.count(int(time.time()))


@dataclass(frozen=True)
class _Item:
    id: str
    element: str  # Availability, PartCount, … (the type in CamelCase)
    category: str
    type: str
    device: str
    uuid: str


@dataclass(frozen=True)
class _Observation:
    sequence: int
    item: _Item
    timestamp: str
    value: str
    level: str | None = None  # conditions: Normal, Warning, Fault, Unavailable
    native_code: str | None = None


def _camel(type_: str) -> str:
    return "".join(part.capitalize() for part in type_.split("_"))


class AgentStandIn:
    def __init__(self, devices_xml: Path, buffer_size: int = 131_072) -> None:
        self.devices_xml = devices_xml.read_bytes()
        self.buffer_size = buffer_size
        self.items: dict[str, _Item] = {}
        root = ET.fromstring(self.devices_xml)
        for device in (e for e in root.iter() if e.tag.endswith("}Device")):
            for item in (e for e in device.iter() if e.tag.endswith("}DataItem")):
                entry = _Item(
                    item.get("id", ""),
                    _camel(item.get("type", "")),
                    item.get("category", ""),
                    item.get("type", ""),
                    device.get("name", ""),
                    device.get("uuid", ""),
                )
                for key in (item.get("name"), item.get("id")):
                    if key:
                        self.items.setdefault(key, entry)
        self.restart()
        self.server: ApiServer | None = None
        self.requests: list[str] = []
        self.fail_with: tuple[int, bytes] | None = None  # make every request answer this
        self.multipart = True  # False: an agent that answers sample?interval= with one document

    def restart(self) -> None:
        """As if the agent process restarted: a new instanceId, sequences from 1 again."""
        self.instance_id = str(next(_instances))
        self.buffer: list[_Observation] = []
        self.next_sequence = 1
        self.latest: dict[str, _Observation] = {}
        self._changed = asyncio.Event()

    @property
    def first_sequence(self) -> int:
        return self.buffer[0].sequence if self.buffer else self.next_sequence

    # --- feeding ---------------------------------------------------------------------------

    def feed_shdr(self, lines: Iterable[str]) -> int:
        """Add the observations of SHDR lines; returns how many were added."""
        added, skip_until = 0, None
        for line in lines:
            if skip_until is not None:
                skip_until = None if line == skip_until else skip_until
                continue
            fields = line.rstrip("\r\n").split("|")
            if len(fields) < 3 or line.startswith("*"):
                continue
            if fields[1].startswith("@"):
                if fields[-1].startswith("--multiline--"):
                    skip_until = fields[-1]
                continue
            stamp, rest = fields[0], fields[1:]
            index = 0
            while index < len(rest) - 1:
                item = self.items.get(rest[index].rpartition(":")[2])
                if item is not None and item.category == "CONDITION":
                    level = rest[index + 1].capitalize()
                    code = rest[index + 2] if len(rest) > index + 2 else ""
                    text = rest[index + 5] if len(rest) > index + 5 else ""
                    self._add(item, stamp, text, level, code or None)
                    added += 1
                    break
                if item is not None:
                    self._add(item, stamp, rest[index + 1])
                    added += 1
                index += 2
        self._changed.set()
        return added

    def _add(
        self, item: _Item, stamp: str, value: str, level: str | None = None,
        native_code: str | None = None,
    ) -> None:  # fmt: skip
        observation = _Observation(self.next_sequence, item, stamp, value, level, native_code)
        self.next_sequence += 1
        self.buffer.append(observation)
        if len(self.buffer) > self.buffer_size:
            del self.buffer[: len(self.buffer) - self.buffer_size]
        self.latest[item.id] = observation

    # --- documents ---------------------------------------------------------------------------

    def _header(self, last: int | None = None) -> str:
        return (
            f'<Header creationTime="2026-03-02T06:00:00Z" sender="stand-in" '
            f'instanceId="{self.instance_id}" version="2.0.0" bufferSize="{self.buffer_size}" '
            f'nextSequence="{last if last is not None else self.next_sequence}" '
            f'firstSequence="{self.first_sequence}" lastSequence="{self.next_sequence - 1}"/>'
        )

    def streams(self, observations: list[_Observation], next_sequence: int | None = None) -> bytes:
        by_device: dict[tuple[str, str], list[_Observation]] = {}
        for o in observations:
            by_device.setdefault((o.item.device, o.item.uuid), []).append(o)
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<MTConnectStreams xmlns="{NS}">',
                 self._header(next_sequence), "<Streams>"]  # fmt: skip
        for (device, uuid), found in by_device.items():
            parts.append(f"<DeviceStream name={quoteattr(device)} uuid={quoteattr(uuid)}>")
            parts.append(f'<ComponentStream component="Device" name={quoteattr(device)}>')
            for section, condition in (("Events", False), ("Condition", True)):
                chosen = [o for o in found if (o.item.category == "CONDITION") == condition]
                if not chosen:
                    continue
                parts.append(f"<{section}>")
                for o in chosen:
                    tag = o.level or o.item.element
                    code = f" nativeCode={quoteattr(o.native_code)}" if o.native_code else ""
                    parts.append(
                        f'<{tag} dataItemId="{o.item.id}" sequence="{o.sequence}" '
                        f'timestamp="{o.timestamp}" type="{o.item.type}"{code}>'
                        f"{escape(o.value)}</{tag}>"
                    )
                parts.append(f"</{section}>")
            parts.append("</ComponentStream></DeviceStream>")
        parts.append("</Streams></MTConnectStreams>")
        return "\n".join(parts).encode()

    def error(self, code: str, text: str) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<MTConnectError xmlns="urn:mtconnect.org:'
            f'MTConnectError:2.0">{self._header()}<Errors><Error errorCode="{code}">'
            f"{escape(text)}</Error></Errors></MTConnectError>"
        ).encode()

    def sample(self, start: int, count: int) -> tuple[bytes, int]:
        if start < self.first_sequence or start > self.next_sequence:
            text = f"'from' must be between {self.first_sequence} and {self.next_sequence}"
            return self.error("OUT_OF_RANGE", text), start
        chosen = [o for o in self.buffer if start <= o.sequence < start + count]
        following = chosen[-1].sequence + 1 if chosen else start
        return self.streams(chosen, following), following

    # --- HTTP --------------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()
        xml = "application/xml"

        @app.middleware("http")
        async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
            self.requests.append(f"{request.url.path}?{request.url.query}")
            if self.fail_with is not None:
                return Response(self.fail_with[1], status_code=self.fail_with[0], media_type=xml)
            return await call_next(request)

        @app.get("/probe")
        async def probe() -> Response:
            return Response(self.devices_xml, media_type=xml)

        @app.get("/current")
        async def current() -> Response:
            latest = sorted(self.latest.values(), key=lambda o: o.sequence)
            return Response(self.streams(latest), media_type=xml)

        @app.get("/sample")
        async def sample(request: Request) -> Response:
            query = request.query_params
            start = int(query.get("from", self.first_sequence))
            count = int(query.get("count", 100))
            if "interval" not in query or not self.multipart:
                body, _ = self.sample(start, count)
                return Response(body, media_type=xml)
            first, following = self.sample(start, count)
            if b"MTConnectError" in first:
                return Response(first, status_code=400, media_type=xml)
            interval = int(query["interval"]) / 1000
            return StreamingResponse(
                self._stream(first, following, count, interval),
                media_type="multipart/x-mixed-replace;boundary=STANDIN",
            )

        return app

    async def _stream(
        self, first: bytes, cursor: int, count: int, interval: float
    ) -> AsyncIterator[bytes]:
        instance = self.instance_id
        body = first
        while True:
            yield _part(body)
            self._changed.clear()
            if cursor >= self.next_sequence:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(interval, 0.05) * 5)
            await asyncio.sleep(interval)
            if self.instance_id != instance:
                # A restarted agent's new documents carry the new instanceId; the old stream
                # ends after telling so.
                yield _part(self.streams([]))
                return
            body, cursor = self.sample(cursor, count)
            if b"MTConnectError" in body:
                yield _part(body)
                return

    async def start(self, port: int = 0) -> str:
        self.server = ApiServer(self.app(), "127.0.0.1", port)
        self.server.start()
        await asyncio.sleep(0.1)
        return self.server.url

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


def _part(body: bytes) -> bytes:
    return b"--STANDIN\r\nContent-type: text/xml\r\nContent-length: %d\r\n\r\n%s\r\n" % (
        len(body), body,
    )  # fmt: skip


def okuma_lines(fixtures: Path) -> list[str]:
    return (fixtures / "mtconnect" / "demo_agent_okuma_shdr.txt").read_text().splitlines()
