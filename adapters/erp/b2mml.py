"""ISA-95 B2MML: production orders in as schedules, production confirmations out as operations
performance (docs/erp/b2mml-soap.md).

```toml
[[erp]]
name = "mes-b2mml"
dialect = "b2mml"
folder = "/srv/b2mml/in"             # schedules dropped here are imported (optional)
url = "https://esb.plant1.example/b2mml/performance"   # confirmations POSTed here, or …
# outbox_folder = "/srv/b2mml/out"   # … written here as files
timezone = "Europe/Paris"           # for times a sender writes without an offset (optional)
due_if_missing_days = 7             # a request without an end time is due this long after it
```

Orders in: ``parse_schedule`` (pure; the API route and the watched folder use it) reads
``{Sync,Process,Change,Show,Cancel}ProductionSchedule`` (V0401, V0500, V0600),
``{…}OperationsSchedule`` (V0700, V0701) or a bare ``ProductionSchedule`` /
``OperationsSchedule``, and gives one ``mes.erp.order.released.v1`` per request, or
``mes.erp.order.cancelled.v1`` when the message says so (a ``Cancel`` verb, a ``Sync`` whose
action is ``Delete``, a request state ``Cancelled``/``Aborted``). Senders are not strict, so
neither is the parser (a missing ``releaseID`` is logged and accepted), but what it cannot map
(no request id, no produced material, no whole quantity, a time without offset) refuses the
whole document, naming the element and its line.

Confirmations out: ``operations_performance`` writes one V0701 ``SyncOperationsPerformance``
per confirmation (``BODID`` = the confirmation's key), POSTed to ``url`` or written to
``outbox_folder/<key>.xml`` (temp file and rename: a retry overwrites the same file). The hub's
audit checkpoint when it was decided is one more ``SegmentData`` (``AuditCheckpoint``, a
string), and the POST's ``Mes-Hub-Checkpoint`` header.

Exceptions::

    B2mmlError (ValueError)     ``reason``, ``element`` (a path of local names), ``line``
     ├── NotWellFormed          the bytes are not XML (or carry a DOCTYPE)
     ├── NotASchedule           XML, but no B2MML schedule the hub takes
     └── Unmappable             a request the hub cannot turn into an order event
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import httpx
from lxml import etree
from pydantic import BaseModel, Field, ValidationError, model_validator

from adapters.erp.base import Confirmation, ErpEntryBase, ZoneName
from contracts import CloudEvent, OrderCancelledV1, OrderReleasedV1
from hub.outbound import OutboundRefused, outbound_client
from hub.outbox import EXCERPT_CHARS, Delivered, DeliveryFailed

log = logging.getLogger(__name__)

V0701 = "http://www.mesa.org/xml/B2MML"
NAMESPACES = {  # the schedules' namespaces the hub knows; another one is read the same way
    "http://www.wbf.org/xml/B2MML-V0401": "V0401",
    "http://www.mesa.org/xml/B2MML-V0500": "V0500",
    "http://www.mesa.org/xml/B2MML-V0600": "V0600",
    V0701: "V0700/V0701",
}
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
RELEASE_ID = "V0701"

_ROOT = re.compile(
    r"^(?P<verb>Sync|Process|Change|Show|Cancel|Get|Acknowledge|Respond)?"
    r"(?P<noun>Production|Operations)Schedule$"
)
_RELEASING_VERBS = {None, "Sync", "Process", "Change", "Show"}
_CANCELLED_STATES = {"cancelled", "canceled", "aborted"}
_PRODUCED = {"produced", "yield produced", "material produced"}


# --- errors ------------------------------------------------------------------------------------


class B2mmlError(ValueError):
    """A document the hub does not take: why, and where (the element's path and its line)."""

    def __init__(self, reason: str, *, element: str | None = None, line: int | None = None):
        self.reason, self.element, self.line = reason, element, line
        where = ", ".join(part for part in (f"line {line}" if line else "", element or "") if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class NotWellFormed(B2mmlError):
    """The bytes are not well-formed XML (or declare a DOCTYPE, which B2MML never needs)."""


class NotASchedule(B2mmlError):
    """Well-formed XML, but not a B2MML production or operations schedule."""


class Unmappable(B2mmlError):
    """A request the hub cannot map: no id, no produced material, no whole quantity, …"""


# --- ids and times -----------------------------------------------------------------------------

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")


def order_token(raw: str) -> str:
    """An ERP's identifier as a hub token (``[A-Za-z0-9_-]{1,128}``): unchanged when it is one;
    else every run of other characters becomes ``_`` and ``-`` plus 8 hex digits of the
    original's SHA-256 are appended, so ``PO 4711/10`` and ``PO 4711.10`` stay two orders
    (``PO_4711_10-cca8edb9``, ``PO_4711_10-357a8156``). Blank is refused."""
    value = raw.strip()
    if not value:
        raise ValueError("an identifier is blank")
    if _TOKEN.match(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    readable = _NOT_TOKEN.sub("_", value).strip("_")[:118] or "id"
    return f"{readable}-{digest}"


_XS_DATETIME = re.compile(
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})"
    r"T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]+))?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?$"
)


def xs_datetime(text: str) -> tuple[datetime, bool]:
    """An ``xs:dateTime`` as a datetime, and whether it had an offset (naive if not); a
    ``ValueError`` if it is none (24:00:00 is the next midnight, as XML Schema says)."""
    match = _XS_DATETIME.match(text.strip())
    if match is None:
        raise ValueError(f"{text.strip()!r} is not an xs:dateTime (2026-03-02T14:00:00+01:00)")
    parts = match.groupdict()
    hour, extra = int(parts["h"]), timedelta(0)
    if hour == 24 and (parts["mi"], parts["s"], (parts["f"] or "").strip("0")) == ("00", "00", ""):
        hour, extra = 0, timedelta(days=1)
    micro = int((parts["f"] or "0")[:6].ljust(6, "0"))
    zone: tzinfo | None = None
    try:
        if parts["tz"] == "Z":
            zone = UTC
        elif parts["tz"]:
            sign = 1 if parts["tz"][0] == "+" else -1
            hours, minutes = int(parts["tz"][1:3]), int(parts["tz"][4:6])
            zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
        year, month, day = int(parts["y"]), int(parts["mo"]), int(parts["d"])
        value = datetime(year, month, day, hour, int(parts["mi"]), int(parts["s"]), micro, zone)
    except ValueError as exc:  # month 13, 25 o'clock, an offset of a day or more, …
        raise ValueError(f"{text.strip()!r} is not a valid xs:dateTime: {exc}") from None
    return value + extra, zone is not None


# --- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseOptions:
    """How to read what senders leave out: ``timezone`` for times without an offset (refused
    without one), and how long after the message a request without an end time is due."""

    timezone: str | None = None
    due_if_missing: timedelta = timedelta(days=7)


def _local(element: etree._Element) -> str:
    return etree.QName(element).localname


def _path(element: etree._Element) -> str:
    """Where ``element`` is: its local name and its ancestors', from the root."""
    names = []
    node: etree._Element | None = element
    while node is not None:
        names.append(_local(node))
        node = node.getparent()
    return "/".join(reversed(names))


def parse_xml(document: bytes) -> etree._Element:
    """The document's root element; ``NotWellFormed`` naming the line and the innermost open
    element where the parser stopped. No DTD, no entities, no network."""
    if len(document) > MAX_DOCUMENT_BYTES:
        raise NotWellFormed(f"the document has {len(document)} bytes, over {MAX_DOCUMENT_BYTES}")
    if not document.strip():
        raise NotWellFormed("the document is empty", line=1)
    open_elements: list[str] = []
    root: etree._Element | None = None
    try:
        for event, element in etree.iterparse(
            io.BytesIO(document),
            events=("start", "end"),
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
        ):
            if event == "start":
                open_elements.append(_local(element))
                if root is None:
                    root = element
            else:
                open_elements.pop()
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or (exc.position[0] if exc.position else None)
        element_path = "/".join(open_elements) or None
        raise NotWellFormed(
            f"not well-formed XML: {exc.msg}", element=element_path, line=line
        ) from None
    if root is None:
        raise NotWellFormed("the document is empty")
    if root.getroottree().docinfo.doctype:
        raise NotWellFormed("a DOCTYPE is not accepted (B2MML documents have none)", line=1)
    return root


class _Reader:
    """Looks up a document's elements in its own namespace."""

    def __init__(self, root: etree._Element) -> None:
        self.root = root
        self.ns = etree.QName(root).namespace

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}" if self.ns else name

    def child(self, element: etree._Element, name: str) -> etree._Element | None:
        return element.find(self.q(name))

    def children(self, element: etree._Element, name: str) -> list[etree._Element]:
        return element.findall(self.q(name))

    def text(self, element: etree._Element, name: str) -> str | None:
        found = self.child(element, name)
        if found is None or found.text is None or not found.text.strip():
            return None
        return found.text.strip()


def parse_schedule(
    document: bytes,
    *,
    source: str,
    received_at: datetime,
    options: ParseOptions | None = None,
) -> list[CloudEvent]:
    """A B2MML schedule's requests as ``mes.erp.order.released|cancelled.v1`` events from
    ``source`` (a URI naming the ERP: ``urn:mes-hub:erp:<name>``), or a ``B2mmlError``.
    ``received_at``: when the hub got it (the event time when the message has no
    ``CreationDateTime``). The same document gives the same event ids."""
    options = options or ParseOptions()
    root = parse_xml(document)
    reader = _Reader(root)
    name = _local(root)
    match = _ROOT.match(name)
    if match is None:
        raise NotASchedule(
            f"the root element is {name}, not a B2MML production or operations schedule "
            "(SyncProductionSchedule, ProcessOperationsSchedule, …)",
            element=name,
            line=root.sourceline,
        )
    verb, noun = match["verb"], match["noun"]
    if verb is not None and verb not in _RELEASING_VERBS | {"Cancel"}:
        raise NotASchedule(
            f"{name} is a {verb} message: it releases no orders (send Sync or Process)",
            element=name,
            line=root.sourceline,
        )
    created, bod_id, schedules, deleting = _message(reader, verb, noun, received_at, options)
    if reader.ns not in NAMESPACES:
        log.warning(
            "B2MML %s in namespace %r, which the hub does not know: read like the others",
            name,
            reader.ns,
        )
    message = _Message(reader, noun, verb, deleting, created, bod_id, source, options)
    events: list[CloudEvent] = []
    for schedule in schedules:
        requests = reader.children(schedule, f"{noun}Request")
        if not requests:
            log.warning(
                "B2MML %s (line %s) holds no %sRequest: nothing to release",
                _local(schedule),
                schedule.sourceline,
                noun,
            )
        for request in requests:
            event = message.event(schedule, request)
            if event is not None:
                events.append(event)
    return events


def _message(
    reader: _Reader,
    verb: str | None,
    noun: str,
    received_at: datetime,
    options: ParseOptions,
) -> tuple[datetime, str | None, list[etree._Element], bool]:
    """The envelope: creation time, BODID, the schedules, and whether a Sync deletes them."""
    root = reader.root
    if verb is None:  # a bare ProductionSchedule / OperationsSchedule
        return received_at, None, [root], False
    if not (root.get("releaseID") or "").strip():
        log.warning(
            "B2MML %s (line %s) has no releaseID, which B2MML requires: accepted",
            _local(root),
            root.sourceline,
        )
    created, bod_id = received_at, None
    area = reader.child(root, "ApplicationArea")
    if area is not None:
        bod_id = reader.text(area, "BODID")
        stamp = reader.child(area, "CreationDateTime")
        if stamp is not None and stamp.text and stamp.text.strip():
            try:  # the envelope's time is not mapped: one the hub cannot read is replaced
                when = _time(stamp, options, _path(stamp), required_offset=False)
            except Unmappable as exc:
                log.warning("B2MML %s: the time of receipt is used instead", exc)
                when = None
            if when is not None:
                created = min(when, received_at)  # a sender's clock ahead is not the future
    data = reader.child(root, "DataArea")
    if data is None:
        raise NotASchedule(
            f"{_local(root)} has no DataArea", element=_local(root), line=root.sourceline
        )
    schedules = reader.children(data, f"{noun}Schedule")
    if not schedules:
        raise NotASchedule(
            f"DataArea holds no {noun}Schedule", element=_path(data), line=data.sourceline
        )
    deleting = False
    sync = reader.child(data, "Sync")
    if verb == "Sync" and sync is not None:
        deleting = any(
            (expression.get("actionCode") or "").strip().lower() == "delete"
            for expression in sync.iter(reader.q("ActionExpression"))
        )
    return created, bod_id, schedules, deleting


def _time(
    element: etree._Element, options: ParseOptions, where: str, *, required_offset: bool = True
) -> datetime | None:
    """An element's xs:dateTime, aware: a time without an offset is read in
    ``options.timezone``; without one it is refused (``required_offset``) or ignored."""
    try:
        value, has_offset = xs_datetime(element.text or "")
    except ValueError as exc:
        raise Unmappable(str(exc), element=where, line=element.sourceline) from None
    if has_offset:
        return value
    if options.timezone:
        return value.replace(tzinfo=ZoneInfo(options.timezone))
    if not required_offset:
        return None
    raise Unmappable(
        f"{value.isoformat()} has no UTC offset: write one (2026-03-02T14:00:00+01:00) or give "
        "the [[erp]] entry a timezone",
        element=where,
        line=element.sourceline,
    )


@dataclass(frozen=True)
class _Message:
    reader: _Reader
    noun: str
    verb: str | None
    deleting: bool
    created: datetime
    bod_id: str | None
    source: str
    options: ParseOptions

    def event(self, schedule: etree._Element, request: etree._Element) -> CloudEvent | None:
        reader = self.reader
        raw_id = reader.text(request, "ID")
        if raw_id is None:
            raise Unmappable(
                f"{self.noun}Request has no ID: the hub needs the order's id",
                element=_path(request),
                line=request.sourceline,
            )
        order_id = order_token(raw_id)
        state = self._state(request) or self._state(schedule)
        data: BaseModel
        why = None
        if (state or "").lower() in _CANCELLED_STATES:
            why = f"B2MML request state {state}"
        elif self.verb == "Cancel":
            why = f"B2MML {_local(reader.root)}"
        elif self.deleting:
            why = f"B2MML {_local(reader.root)} with actionCode Delete"
        if why is not None:
            data = OrderCancelledV1(order_id=order_id, reason=why)
            kind = "cancelled"
        elif (state or "").lower() == "forecast":
            log.info(
                "B2MML %sRequest %s (line %s) is a forecast: not released",
                self.noun,
                raw_id,
                request.sourceline,
            )
            return None
        else:
            data = self._released(schedule, request, order_id)
            kind = "released"
        payload = data.model_dump(mode="json", exclude_none=True)
        text = json.dumps([self.bod_id, self.created.isoformat(), kind, payload], sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        extensions = {} if raw_id == order_id else {"erpid": raw_id[:1024]}
        return CloudEvent(
            specversion="1.0",
            id=f"b2mml.{order_id}.{kind}.{digest}",
            source=self.source,
            type=f"mes.erp.order.{kind}.v1",
            time=self.created,
            subject=order_id,
            data=payload,
            **extensions,
        )

    def _state(self, element: etree._Element) -> str | None:
        for name in ("RequestState", "ScheduleState"):
            found = self.reader.child(element, name)
            if found is not None and found.text and found.text.strip():
                value = found.text.strip()
                if value.lower() == "other" and (found.get("OtherValue") or "").strip():
                    return (found.get("OtherValue") or "").strip()
                return value
        return None

    def _released(
        self, schedule: etree._Element, request: etree._Element, order_id: str
    ) -> OrderReleasedV1:
        material = self._produced(request)
        if material is None:
            raise Unmappable(
                f"{self.noun}Request {order_id} has no MaterialRequirement with MaterialUse "
                "Produced: no part number and no quantity to release",
                element=_path(request),
                line=request.sourceline,
            )
        part = self.reader.text(material, "MaterialDefinitionID")
        if part is None:
            raise Unmappable(
                "the produced material has no MaterialDefinitionID: no part number",
                element=_path(material),
                line=material.sourceline,
            )
        quantity = self._quantity(material, request)
        due = self._due(schedule, request)
        machine = self._machine(request)
        try:
            return OrderReleasedV1(
                order_id=order_id,
                part_number=part,
                quantity=quantity,
                due=due,
                machine_id=order_token(machine) if machine else None,
            )
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in problem["loc"])
            raise Unmappable(
                f"{field}: {problem['msg']}", element=_path(request), line=request.sourceline
            ) from None

    def _produced(self, request: etree._Element) -> etree._Element | None:
        """The shallowest material the request produces (first in the document at that depth):
        a MaterialRequirement whose MaterialUse is Produced (Yield/Material Produced), or a
        V0401 MaterialProducedRequirement."""
        reader, best, best_depth = self.reader, None, 1 << 30
        for element in request.iter(
            reader.q("MaterialRequirement"), reader.q("MaterialProducedRequirement")
        ):
            use = (reader.text(element, "MaterialUse") or "").lower()
            if _local(element) == "MaterialRequirement" and use not in _PRODUCED:
                continue
            depth = sum(1 for _ in _ancestors(element, request))
            if depth < best_depth:
                best, best_depth = element, depth
        return best

    def _quantity(self, material: etree._Element, request: etree._Element) -> int:
        reader = self.reader
        quantities = reader.children(material, "Quantity")
        found = next((q for q in quantities if reader.text(q, "QuantityString")), None)
        if found is None:
            raise Unmappable(
                "the produced material has no Quantity/QuantityString: no quantity to release",
                element=_path(material),
                line=material.sourceline,
            )
        text = reader.text(found, "QuantityString") or ""
        where = _path(found) + "/QuantityString"
        unit = reader.text(found, "UnitOfMeasure")
        line = next(iter(reader.children(found, "QuantityString")), found).sourceline
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise Unmappable(f"{text!r} is not a number", element=where, line=line) from None
        if not value.is_finite() or value != value.to_integral_value():
            raise Unmappable(
                f"{text} is not a whole number of parts (the hub counts parts"
                + (f"; unit {unit})" if unit else ")"),
                element=where,
                line=line,
            )
        if value <= 0:
            raise Unmappable(f"quantity {text} is not above 0", element=where, line=line)
        return int(value)

    def _due(self, schedule: etree._Element, request: etree._Element) -> datetime:
        """The request's EndTime; else the latest LatestEndTime of its segments; else the
        schedule's EndTime; else ``options.due_if_missing`` after the message."""
        reader = self.reader
        end = reader.child(request, "EndTime")
        if end is not None and (end.text or "").strip():
            return self._required_time(end)
        latest: datetime | None = None
        for segment in reader.children(request, "SegmentRequirement"):
            element = reader.child(segment, "LatestEndTime")
            if element is not None and (element.text or "").strip():
                value = self._required_time(element)
                latest = value if latest is None else max(latest, value)
        if latest is not None:
            return latest
        end = reader.child(schedule, "EndTime")
        if end is not None and (end.text or "").strip():
            return self._required_time(end)
        due = self.created + self.options.due_if_missing
        log.info(
            "B2MML %s (line %s) has no EndTime: due %s, %g days after the message",
            _path(request),
            request.sourceline,
            due.isoformat(),
            self.options.due_if_missing / timedelta(days=1),
        )
        return due

    def _required_time(self, element: etree._Element) -> datetime:
        value = _time(element, self.options, _path(element))
        assert value is not None
        return value

    def _machine(self, request: etree._Element) -> str | None:
        """The first EquipmentID of the shallowest EquipmentRequirement, if any."""
        reader, best, best_depth = self.reader, None, 1 << 30
        for requirement in request.iter(reader.q("EquipmentRequirement")):
            equipment = reader.text(requirement, "EquipmentID")
            depth = sum(1 for _ in _ancestors(requirement, request))
            if equipment and depth < best_depth:
                best, best_depth = equipment, depth
        return best


def _ancestors(element: etree._Element, stop: etree._Element) -> Iterator[etree._Element]:
    node = element.getparent()
    while node is not None and node is not stop:
        yield node
        node = node.getparent()


# --- confirmations out -------------------------------------------------------------------------


def operations_performance(
    confirmation: Confirmation,
    *,
    receiver: str | None = None,
    sender: str = "mes-hub",
    timezone: str | None = None,
) -> bytes:
    """One confirmation as a B2MML V0701 ``SyncOperationsPerformance`` (UTF-8), from ``sender``
    to ``receiver`` (the ``[[erp]]`` entry's name) in its ``ApplicationArea``: ``BODID`` and
    the performance's ``ID`` are the confirmation's key; one ``OperationsResponse`` for the
    order (``OperationsRequestID``) with one ``SegmentResponse``: the operation, the actual
    start and end, the machine (``EquipmentActual``), the good quantity (``MaterialActual``
    ``Produced``) and the scrap (``MaterialActual`` ``Other``/``Scrap``), the sequence and what
    it corrects (``SegmentData``). Times in UTC, or in ``timezone`` with its offset."""
    zone = ZoneInfo(timezone) if timezone else UTC

    def stamp(value: datetime) -> str:
        text = value.astimezone(zone).isoformat()
        return text.replace("+00:00", "Z") if zone is UTC else text

    ns = V0701
    e = _Maker(ns)
    state = "Completed" if confirmation.final else "Running"
    root = e("SyncOperationsPerformance", releaseID=RELEASE_ID)
    area = e.sub(root, "ApplicationArea")
    e.sub(e.sub(area, "Sender"), "LogicalID", sender)
    if receiver:
        e.sub(e.sub(area, "Receiver"), "LogicalID", receiver)
    e.sub(area, "CreationDateTime", stamp(confirmation.posted_at))
    e.sub(area, "BODID", confirmation.key)
    data = e.sub(root, "DataArea")
    e.sub(data, "Sync")
    performance = e.sub(data, "OperationsPerformance")
    e.sub(performance, "ID", confirmation.key)
    e.sub(performance, "PublishedDate", stamp(confirmation.posted_at))
    e.sub(performance, "OperationsType", "Production")
    response = e.sub(performance, "OperationsResponse")
    e.sub(response, "ID", f"{confirmation.order_id}-{confirmation.sequence}")
    if confirmation.start is not None:
        e.sub(response, "StartTime", stamp(confirmation.start))
    if confirmation.end is not None:
        e.sub(response, "EndTime", stamp(confirmation.end))
    e.sub(response, "OperationsType", "Production")
    e.sub(response, "OperationsRequestID", confirmation.order_id)
    e.sub(response, "ResponseState", state)
    segment = e.sub(response, "SegmentResponse")
    e.sub(segment, "ID", confirmation.operation or str(confirmation.sequence))
    e.sub(segment, "PostingDate", stamp(confirmation.posted_at))
    if confirmation.start is not None:
        e.sub(segment, "ActualStartTime", stamp(confirmation.start))
    if confirmation.end is not None:
        e.sub(segment, "ActualEndTime", stamp(confirmation.end))
    e.sub(segment, "OperationsType", "Production")
    if confirmation.operation:
        e.sub(segment, "ProcessSegmentID", confirmation.operation)
    e.sub(segment, "OperationsRequestID", confirmation.order_id)
    e.sub(segment, "SegmentState", state)
    facts: list[tuple[str, int | bool | str]] = [
        ("Sequence", confirmation.sequence),
        ("Final", confirmation.final),
    ]
    if confirmation.correction_of is not None:
        facts.append(("CorrectionOf", confirmation.correction_of))
    if confirmation.checkpoint is not None:  # the hub's audit checkpoint when it was decided
        facts.append(("AuditCheckpoint", confirmation.checkpoint))
    for name, fact in facts:
        item = e.sub(segment, "SegmentData")
        e.sub(item, "ID", name)
        value = e.sub(item, "Value")
        is_bool = isinstance(fact, bool)
        e.sub(value, "ValueString", str(fact).lower() if is_bool else str(fact))
        kind = "boolean" if is_bool else "string" if isinstance(fact, str) else "integer"
        e.sub(value, "DataType", kind)
    if confirmation.machine_id:
        equipment = e.sub(segment, "EquipmentActual")
        e.sub(equipment, "ID", confirmation.machine_id)
        e.sub(equipment, "EquipmentID", confirmation.machine_id)
        e.sub(equipment, "EquipmentUse", "Production")
    for ident, use, other, count in (
        ("good", "Produced", None, confirmation.yield_quantity),
        ("scrap", "Other", "Scrap", confirmation.scrap_quantity),
    ):
        material = e.sub(segment, "MaterialActual")
        e.sub(material, "ID", ident)
        use_element = e.sub(material, "MaterialUse", use)
        if other:
            use_element.set("OtherValue", other)
        quantity = e.sub(material, "Quantity")
        e.sub(quantity, "QuantityString", str(count))
        e.sub(quantity, "DataType", "integer")
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


class _Maker:
    def __init__(self, ns: str) -> None:
        self.ns = ns

    def __call__(self, name: str, **attributes: str) -> etree._Element:
        return etree.Element(f"{{{self.ns}}}{name}", attributes, nsmap={None: self.ns})

    def sub(self, parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
        element = etree.SubElement(parent, f"{{{self.ns}}}{name}")
        if text is not None:
            element.text = text
        return element


# --- the dialect -------------------------------------------------------------------------------


class Entry(ErpEntryBase):
    """A B2MML exchange: schedules from ``folder`` (and the API), confirmations to ``url`` or
    ``outbox_folder``."""

    dialect: Literal["b2mml"]
    url: str | None = Field(  # type: ignore[assignment]  # optional here: files need none
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="Where confirmations are POSTed (application/xml); else outbox_folder",
    )
    folder: Path | None = Field(default=None, description="Schedules dropped here are imported")
    outbox_folder: Path | None = Field(
        default=None, description="Confirmations are written here, one file per key"
    )
    timezone: ZoneName | None = Field(
        default=None, description="IANA zone for times a sender writes without an offset"
    )
    due_if_missing_days: float = Field(default=7.0, gt=0, le=366)
    settle_s: float = Field(
        default=2.0, ge=0, le=3600, description="A file younger than this is left for later"
    )

    @model_validator(mode="after")
    def _destinations(self) -> Entry:
        if self.url and self.outbox_folder:
            raise ValueError("confirmations go to url or to outbox_folder, not both")
        if self.confirm and not (self.url or self.outbox_folder):
            raise ValueError(
                "confirm = true needs url (HTTP POST) or outbox_folder (files); "
                "or set confirm = false"
            )
        return self

    def options(self) -> ParseOptions:
        return ParseOptions(self.timezone, timedelta(days=self.due_if_missing_days))


def source_uri(entry: ErpEntryBase) -> str:
    return f"urn:mes-hub:erp:{entry.name}"


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> FolderOrders | None:
    """The watched folder (``state_dir`` unused: files are consumed, nothing else is kept)."""
    assert isinstance(entry, Entry)
    if entry.folder is None or entry.poll_interval_s == 0:
        return None
    return FolderOrders(entry)


def confirmation_sender(entry: ErpEntryBase) -> B2mmlSender | None:
    assert isinstance(entry, Entry)
    return B2mmlSender(entry) if entry.confirm else None


class FolderOrders:
    """A watched folder: each ``*.xml`` file in it is parsed. A file that fails is moved to
    ``error/`` at once with ``<name>.error`` beside it saying why. A file that parses stays
    until the next call, whose cursor says its events were published, and is then moved to
    ``done/`` (so a crash between reading and publishing loses nothing: the file is read again
    and gives the same event ids). Files younger than ``settle_s`` are left for later (a sender
    still writing); senders should write ``name.tmp`` and rename it to ``name.xml``."""

    def __init__(self, entry: Entry) -> None:
        assert entry.folder is not None
        self.folder = entry.folder
        self.source = source_uri(entry)
        self.parse_options = entry.options()
        self.settle_s = entry.settle_s

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        return await asyncio.to_thread(self._changes, cursor, datetime.now(UTC))

    def _changes(self, cursor: str | None, now: datetime) -> tuple[list[CloudEvent], str | None]:
        for name, digest in _pending(cursor):
            path = self.folder / name
            with contextlib.suppress(FileNotFoundError):
                if _digest(path.read_bytes()) == digest:
                    _move(path, self.folder / "done")
        events: list[CloudEvent] = []
        pending: list[tuple[str, str]] = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() != ".xml" or not path.is_file():
                continue
            try:
                stat = path.stat()
                if now.timestamp() - stat.st_mtime < self.settle_s:
                    continue
                document = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                found = parse_schedule(
                    document, source=self.source, received_at=now, options=self.parse_options
                )
            except B2mmlError as exc:
                self._refuse(path, str(exc), now)
                continue
            log.info("B2MML %s: %d order event(s)", path.name, len(found))
            events.extend(found)
            pending.append((path.name, _digest(document)))
        return events, json.dumps({"pending": pending}) if pending else None

    def _refuse(self, path: Path, reason: str, now: datetime) -> None:
        log.warning("B2MML %s refused, moved to error/: %s", path.name, reason)
        moved = _move(path, self.folder / "error")
        note = moved.with_name(moved.name + ".error")
        note.write_text(f"{reason}\nfile: {path.name}\nrefused at: {now.isoformat()}\n")


def _pending(cursor: str | None) -> list[tuple[str, str]]:
    if not cursor:
        return []
    try:
        found = json.loads(cursor)["pending"]
        return [(str(name), str(digest)) for name, digest in found if "/" not in str(name)]
    except (ValueError, KeyError, TypeError):
        log.warning("B2MML folder cursor %r not understood: ignored", cursor[:100])
        return []


def _digest(document: bytes) -> str:
    return hashlib.sha256(document).hexdigest()


def _move(path: Path, folder: Path) -> Path:
    """``path`` moved into ``folder`` under its name, or ``name.1``, ``name.2``… if taken."""
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 0
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.{n}{path.suffix}"
    os.replace(path, target)
    return target


class B2mmlSender:
    """Confirmations as ``SyncOperationsPerformance``: POSTed to ``url`` (2xx: delivered; 409:
    the receiver has the BODID already) or written to ``outbox_folder/<key>.xml``."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: httpx.AsyncClient | None = None

    async def send(self, confirmation: Confirmation) -> Delivered:
        document = operations_performance(
            confirmation, receiver=self.entry.name, timezone=self.entry.timezone
        )
        if self.entry.outbox_folder is not None:
            path = await asyncio.to_thread(
                _write_atomically, self.entry.outbox_folder, _file_name(confirmation.key), document
            )
            return Delivered(status=None, excerpt=f"written to {path.name}")
        return await self._post(document, confirmation.checkpoint_header())

    async def _post(self, document: bytes, extra: dict[str, str]) -> Delivered:
        assert self.entry.url is not None
        try:
            client = self._http()
            response = await client.post(
                self.entry.url,
                content=document,
                headers={"Content-Type": "application/xml; charset=utf-8", **extra},
            )
        except (OutboundRefused, ValueError) as exc:  # refused address, unreadable secret
            raise DeliveryFailed(str(exc)) from None
        except httpx.TimeoutException:
            raise DeliveryFailed(f"no answer within {self.entry.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
        return http_outcome(response)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers: dict[str, str] = {}
            auth: httpx.Auth | None = None
            if self.entry.secret is not None:
                secret = self.entry.secret.read().get_secret_value()
                if self.entry.user:
                    auth = httpx.BasicAuth(self.entry.user, secret)
                else:
                    headers["Authorization"] = f"Bearer {secret}"
            self._client = outbound_client(
                self.entry.allowlist(), self.entry.timeout_s, auth=auth, headers=headers
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def http_outcome(response: httpx.Response) -> Delivered:
    """A receiver's HTTP answer: 2xx delivered, 409 delivered as a duplicate; 401/403, 408,
    429 and 5xx retried; any other 4xx refused for good (the content is at fault)."""
    status, excerpt = response.status_code, response.text[:EXCERPT_CHARS]
    if 200 <= status < 300:
        return Delivered(status=status, excerpt=excerpt)
    if status == 409:
        return Delivered(status=status, excerpt=excerpt, duplicate=True)
    if status in (401, 403):
        reason = f"HTTP {status}: the receiver refused the login"
        raise DeliveryFailed(reason, status=status, excerpt=excerpt)
    permanent = 400 <= status < 500 and status not in (408, 425, 429)
    raise DeliveryFailed(f"HTTP {status}", status=status, excerpt=excerpt, permanent=permanent)


def _file_name(key: str) -> str:
    return f"{order_token(key)}.xml"


def _write_atomically(folder: Path, name: str, document: bytes) -> Path:
    """``folder/name`` holding ``document``, or as before: a temp file beside it, flushed to
    disk, then renamed over it (readers never see half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(document)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable where the OS allows
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return target


__all__ = [
    "B2mmlError",
    "B2mmlSender",
    "Entry",
    "FolderOrders",
    "NotASchedule",
    "NotWellFormed",
    "ParseOptions",
    "Unmappable",
    "confirmation_sender",
    "operations_performance",
    "order_source",
    "order_token",
    "parse_schedule",
    "parse_xml",
]
