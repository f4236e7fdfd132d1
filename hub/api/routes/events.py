"""CloudEvents over HTTP (structured, batched and binary mode), published to NATS.

The API never writes the store: it publishes, and ingest applies (one way in). Besides the
contract, it refuses what ingest would have to keep but the sender can still put right: an
event dated too far ahead of the hub's clock (400, as ingest does), an operator event for a
machine the hub does not know (404), a downtime reason that is not in the catalog (400), and a
downtime reason that covers time the machine was running, by its timeline as the hub knows it
when asked (409: ``_check_reasons_cover_stops``). A batch is checked whole before any of it is
published. Over NATS (adapters, gateways) the last three are not checked: what comes is kept.

What the route accepts (it reads the body itself) is told to the OpenAPI document by
``openapi_extra`` and ``openapi_schemas``: the three content types, the ``ce-*`` headers, and
one CloudEvent schema per type that may be sent here."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from contracts import (
    ACTOR_EXTENSIONS,
    EVENT_TYPES,
    MAX_EXTENSIONS,
    CloudEvent,
    ContractViolation,
    DowntimeReasonV1,
    ValidatedEvent,
    check_event_time,
    dedupe_key,
    nats_subject_for,
    typed_events,
    validate_envelope,
)
from hub.api.deps import (
    Caller,
    EventWriter,
    Facts,
    MaxClockSkew,
    Orders,
    Plant,
    Publisher,
    Site,
    Store,
)
from hub.api.policy import SENDS, may_send
from hub.api.problems import Problem, problems
from hub.reports import Reports, UnknownMachine
from hub.store import EventStore
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.rules.timeline import RUNNING

router = APIRouter(prefix="/events", tags=["events"])

MAX_BODY_BYTES = 1024 * 1024
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
BINARY = "application/json"


class Accepted(BaseModel):
    """One event's receipt: its id, the NATS subject it travels on, and whether the hub had it
    already (then it was not published again)."""

    id: str
    subject: str
    duplicate: bool


async def limited_body(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` bytes: a larger one is refused (413) as soon as
    its Content-Length says so, or, sent in chunks, as soon as the limit is passed — never read
    whole into memory first."""
    too_large = Problem(413, f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _binary_mode(request: Request, content_type: str, body: bytes) -> dict[str, Any]:
    """CloudEvents HTTP binding, binary mode: attributes in ce-* headers, their values trimmed
    and percent-decoded (HTTP binding section 3.1.3.2), data in the body."""
    headers = {name: value for name, value in request.headers.items() if name.startswith("ce-")}
    if "ce-specversion" not in headers:
        raise Problem(
            415,
            f"send a CloudEvent: Content-Type {STRUCTURED} (structured mode), {BATCH}, "
            f"or ce-* headers with a JSON body (binary mode, Content-Type {BINARY})",
        )
    if content_type not in ("", BINARY):
        raise Problem(415, f"binary mode needs Content-Type {BINARY} for the data")
    attributes: dict[str, Any] = {}
    for name, value in headers.items():
        try:
            attributes[name[3:]] = unquote(value.strip(), errors="strict")
        except UnicodeDecodeError:
            rule = "percent-encoded bytes that are not UTF-8"
            raise Problem(400, f"{name}: {rule}", errors=[{"field": name, "rule": rule}]) from None
    attributes["datacontenttype"] = BINARY
    attributes["data"] = _json(body)
    return attributes


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(400, f"not JSON: {exc}") from None


def _check(
    raw: Any,
    caller: Caller,
    now: datetime,
    max_skew_s: float,
    plant: PlantConfig,
    index: int | None = None,
) -> ValidatedEvent:
    where = f"event {index}: " if index is not None else ""
    try:
        envelope = CloudEvent.model_validate(raw)
        validated = validate_envelope(envelope)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "rule": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
        detail = "; ".join(f"{e['field']}: {e['rule']}" for e in errors)
        raise Problem(400, f"{where}not a valid CloudEvent: {detail}", errors=errors) from None
    except ContractViolation as violation:
        errors = [{"field": violation.field or "(event)", "rule": violation.reason}]
        raise Problem(400, where + violation.reason, errors=errors) from None
    if not may_send(caller.role, validated.event_type.stream):
        raise Problem(
            403, f"{where}role {caller.role!r} may not send {validated.event_type.name!r} events"
        )
    try:
        check_event_time(envelope, now, max_skew_s)
    except ContractViolation as violation:
        errors = [{"field": "time", "rule": violation.reason}]
        raise Problem(400, where + violation.reason, errors=errors) from None
    if isinstance(validated.data, DowntimeReasonV1):
        _check_reason(validated.data.reason, plant, where)
    return _with_actor(validated, caller, where)


def _with_actor(event: ValidatedEvent, caller: Caller, where: str) -> ValidatedEvent:
    """The event as the hub publishes it: naming the caller's key as its actor. A client may
    not say who sent an event: the key it used says so."""
    claimed = sorted(set(event.envelope.model_extra or {}) & set(ACTOR_EXTENSIONS))
    if claimed:
        rule = "set by the hub from the API key used; a client may not send it"
        raise Problem(
            400,
            f"{where}{', '.join(claimed)}: {rule}",
            errors=[{"field": name, "rule": rule} for name in claimed],
        )
    room = MAX_EXTENSIONS - len(ACTOR_EXTENSIONS)
    if len(event.envelope.model_extra or {}) > room:
        # The hub adds the actor's three: ingest would refuse the event after a 202.
        rule = f"at most {room} extension attributes (the hub adds {len(ACTOR_EXTENSIONS)})"
        raise Problem(400, f"{where}{rule}", errors=[{"field": "(event)", "rule": rule}])
    return replace(event, envelope=event.envelope.model_copy(update=caller.actor_attributes()))


def _check_reason(reason: str, plant: PlantConfig, where: str) -> None:
    """Over NATS an unknown code is kept (and reported as unknown); a person at the API can
    still pick one of the catalog's codes."""
    codes = sorted(plant.planned_reasons())
    if reason in codes:
        return
    listed = ", ".join(codes) if codes else "none (the catalog [plant.reasons] is empty)"
    rule = f"unknown reason code {reason!r}; the reason catalog's codes are: {listed}"
    raise Problem(
        400,
        f"{where}data.reason: {rule}",
        errors=[{"field": "data.reason", "rule": rule}],
        extensions={"reason_codes": codes},
    )


def _never_reported(store: EventStore, site: str, machine_ids: Sequence[str]) -> list[str]:
    """Those of ``machine_ids`` the store has no report of (no machine, or only operator input)."""
    unknown = []
    for machine_id in machine_ids:
        machine = store.machine(site, machine_id)
        if machine is None or not machine.has_reported():
            unknown.append(machine_id)
    return unknown


async def _check_machines_known(
    store: EventStore, plant: PlantConfig, site: str, events: list[ValidatedEvent], batch: bool
) -> None:
    """An operator event needs a machine the hub knows: one that has reported (or does earlier
    in this very batch) or that ``[plant.machines]`` configures. Otherwise it would create a
    phantom machine, present in every site figure from then on."""
    reporting: set[str] = set()
    first_use: dict[str, int] = {}
    for index, event in enumerate(events):
        machine_id = event.envelope.subject
        if event.event_type.stream == "machine":
            reporting.add(machine_id)
        elif (
            event.event_type.stream == "operator"
            and machine_id not in reporting
            and machine_id not in plant.machines
        ):
            first_use.setdefault(machine_id, index)
    if not first_use:
        return
    unknown = await asyncio.to_thread(_never_reported, store, site, list(first_use))
    if unknown:
        machine_id = unknown[0]
        where = f"event {first_use[machine_id]}: " if batch else ""
        raise Problem(
            404,
            f"{where}no machine {machine_id!r} at site {site!r}: it has never reported "
            "and is not configured in [plant.machines]",
            extensions={"machine_id": machine_id},
        )


# How far past its start a reason with no end is read, to say until when the machine ran.
_OPEN_REASON_LOOK = timedelta(days=1)


def _running_stretches(
    reports: Reports, machine_id: str, reason: DowntimeReasonV1, now: datetime
) -> list[Interval]:
    """When the machine was running, by its timeline as the hub knows it now (a micro-stop
    counts as running), in the time ``reason`` covers: [start, end), or for one with no end,
    the running stretch going on at its start, if any. Only what is known counts: the time
    after ``now`` is not, and a machine with no timeline (``UnknownMachine``) never ran."""
    start = reason.start.astimezone(UTC)
    if reason.end is None:
        window = Interval(start, min(now, start + _OPEN_REASON_LOOK))
    else:
        window = Interval(start, min(reason.end.astimezone(UTC), now))
    if window.end <= window.start:
        return []
    try:
        intervals = reports.machine_timeline(machine_id, window, now)
    except UnknownMachine:
        return []
    stretches: list[Interval] = []
    for interval in intervals:
        if interval.state != RUNNING:
            continue
        if stretches and stretches[-1].end == interval.start:
            stretches[-1] = Interval(stretches[-1].start, interval.end)
        else:
            stretches.append(Interval(interval.start, interval.end))
    if reason.end is None:
        return stretches[:1] if stretches and stretches[0].start == start else []
    return stretches


def _clock(time: datetime, day: datetime) -> str:
    """A time an operator reads on a tablet: the time of day, with the date when it is not
    that of ``day`` (the reason's start)."""
    time = time.astimezone(UTC)
    return time.strftime("%H:%M:%S" if time.date() == day.date() else "%Y-%m-%d %H:%M:%S")


def _iso(time: datetime) -> str:
    return time.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _reasons_over_running_time(
    reports: Reports, events: list[tuple[int, ValidatedEvent]], now: datetime, batch: bool
) -> Problem | None:
    """The refusal of the first of ``events`` (index, downtime reason) that covers time its
    machine was running; None: each covers stops only."""
    for index, event in events:
        reason = event.data
        assert isinstance(reason, DowntimeReasonV1)
        machine_id = event.envelope.subject
        running = _running_stretches(reports, machine_id, reason, now)
        if not running:
            continue
        where = f"event {index}: " if batch else ""
        day = reason.start.astimezone(UTC)
        first = running[0]
        if reason.end is None:
            detail = (
                f"{machine_id} was running at {_clock(first.start, day)} UTC: a downtime reason "
                "without an end may only start while the machine is stopped"
            )
        else:
            more = len(running) - 1
            also = f" (and {more} more time{'s' if more > 1 else ''})" if more else ""
            detail = (
                f"{machine_id} was running from {_clock(first.start, day)} to "
                f"{_clock(first.end, day)} UTC{also}: a downtime reason may only cover time "
                "the machine was stopped"
            )
        return Problem(
            409,
            where + detail,
            extensions={
                "machine_id": machine_id,
                "running": [{"from": _iso(r.start), "to": _iso(r.end)} for r in running],
            },
        )
    return None


async def _check_reasons_cover_stops(
    reports: Reports, events: list[ValidatedEvent], applied: set[str], now: datetime, batch: bool
) -> None:
    """A downtime reason sent to the API may only cover time its machine was stopped, by the
    machine's timeline as the hub knows it now (not counting the batch's own machine events);
    one with no end (for the stop going on at its start) may not start while it was running.
    A reason already applied (a retry) is answered as a duplicate, not checked again."""
    reasons = [
        (index, event)
        for index, event in enumerate(events)
        if isinstance(event.data, DowntimeReasonV1) and dedupe_key(event.envelope) not in applied
    ]
    if not reasons:
        return
    refusal = await asyncio.to_thread(_reasons_over_running_time, reports, reasons, now, batch)
    if refusal is not None:
        raise refusal


# --- what the OpenAPI document says of POST /events ---------------------------------------------

# The types some role may send here (the hub's own types are refused: only the hub sends those).
SENDABLE = sorted(
    t.name for t in EVENT_TYPES.values() if any(t.stream in s for s in SENDS.values())
)
_EVENT = {"$ref": "#/components/schemas/CloudEvent"}
_WHO_SENDS_WHAT = "; ".join(
    f"{role}: {', '.join(sorted(streams))}" for role, streams in SENDS.items()
)


@cache
def _event_schemas() -> dict[str, Any]:
    # One envelope per type, its ``type`` a constant and its ``data`` that type's model, chosen
    # by ``type``; the models they refer to come along.
    schema = typed_events(tuple(SENDABLE)).json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = schema.pop("$defs")
    components["CloudEvent"] = {
        **schema,
        "title": "CloudEvent",
        "description": "A CloudEvent 1.0 of one of the types the API accepts; more members "
        "are extension attributes (1-20 lower-case letters or digits, at most 20 of them).",
    }
    return components


def openapi_schemas() -> dict[str, Any]:
    """The schemas POST /events refers to (``#/components/schemas/...``): ``CloudEvent`` and
    those it is made of. The app adds them to its OpenAPI document."""
    return copy.deepcopy(_event_schemas())


def _ce_header(attribute: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {
        "name": f"ce-{attribute}",
        "in": "header",
        "required": False,
        "description": f"Binary mode only, where it is required: {what}. Percent-encoded "
        "(CloudEvents HTTP binding).",
        "schema": schema,
    }


_DOCUMENTED: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"One CloudEvent in structured mode (`{STRUCTURED}`), a non-empty batch "
        f"(`{BATCH}`), or one in binary mode: its attributes in `ce-*` headers and its data, a "
        f"JSON object, as the body (`{BINARY}`, the default when no Content-Type is sent). At "
        f"most {MAX_BODY_BYTES} bytes (413); any other Content-Type is refused (415).",
        "content": {
            STRUCTURED: {"schema": _EVENT},
            BATCH: {"schema": {"type": "array", "minItems": 1, "items": _EVENT}},
            BINARY: {
                "schema": {
                    "type": "object",
                    "description": "Binary mode: the event's data, as its type defines it",
                }
            },
        },
    },
    "parameters": [
        _ce_header("specversion", {"type": "string", "enum": ["1.0"]}, "the CloudEvents version"),
        _ce_header("id", {"type": "string", "minLength": 1, "maxLength": 256}, "the event's id"),
        _ce_header(
            "source", {"type": "string", "minLength": 1, "maxLength": 1024}, "where it happened"
        ),
        _ce_header("type", {"type": "string", "enum": SENDABLE}, "its type"),
        _ce_header("time", {"type": "string", "format": "date-time"}, "when (RFC 3339)"),
        _ce_header(
            "subject",
            {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_-]+$"},
            "the machine id, or the order id of an ERP event",
        ),
    ],
}


@router.post(
    "",
    status_code=202,
    summary="Accept CloudEvents and publish them to the hub",
    description="One event (structured or binary mode) is answered with one receipt, a batch "
    "with one receipt per event, in its order; one bad event refuses the batch before any of "
    f"it is published. The event families each role may send: {_WHO_SENDS_WHAT} (403 "
    "otherwise). An event that breaks the contract, is dated too far ahead of the hub's clock "
    "or names a downtime reason missing from the catalog is refused (400); an operator event "
    "for a machine the hub does not know is 404. A downtime reason may only cover time its "
    "machine was stopped, by the machine's timeline as the hub knows it when asked (a "
    "micro-stop counts as running); one with no end is for the stop going on at its start and "
    "may not start while the machine runs. One that covers running time is refused with 409 "
    "Conflict, naming the machine (`machine_id`) and when it ran (`running`: `from`, `to`): "
    "the event itself is valid (not 400 or 422), it conflicts with the machine's history as "
    "the hub holds it, which late machine events may still change, so the same reason may be "
    "accepted later. Reasons that come over NATS (adapters, gateways) are not checked: they "
    "are kept.",
    responses={
        202: {"description": "Published; ingest applies it shortly"},
        **problems(400, 404, 409, 413, 415, 503),
    },
    openapi_extra=_DOCUMENTED,
)
async def post_events(
    request: Request,
    store: Store,
    publisher: Publisher,
    plant: Plant,
    site: Site,
    max_skew_s: MaxClockSkew,
    caller: EventWriter,
    facts: Facts,
    orders: Orders,
) -> Accepted | list[Accepted]:
    body = await limited_body(request, MAX_BODY_BYTES)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    now = datetime.now(UTC)
    if content_type == BATCH:
        raw_events = _json(body)
        if not isinstance(raw_events, list) or not raw_events:
            raise Problem(400, "a batch must be a non-empty JSON array of CloudEvents")
        events = [
            _check(raw, caller, now, max_skew_s, plant, i) for i, raw in enumerate(raw_events)
        ]
    elif content_type == STRUCTURED:
        events = [_check(_json(body), caller, now, max_skew_s, plant)]
    else:
        attributes = _binary_mode(request, content_type, body)
        events = [_check(attributes, caller, now, max_skew_s, plant)]
    await _check_machines_known(store, plant, site, events, content_type == BATCH)
    # Already applied (same source and id), however long ago: answered as a duplicate and not
    # published again. A repeat still in NATS' duplicate window is answered so by NATS.
    envelopes = [e.envelope for e in events]
    applied = await asyncio.to_thread(store.received_events, envelopes, max_skew_s)
    reports = Reports(store, facts, orders, site, plant)
    await _check_reasons_cover_stops(reports, events, applied, now, content_type == BATCH)
    fresh = [e for e in envelopes if dedupe_key(e) not in applied]
    try:
        receipts = iter(await publisher.publish_many(fresh) if fresh else [])
    except Exception as exc:
        raise Problem(503, f"could not publish to NATS: {type(exc).__name__}") from None
    accepted = []
    for event in events:
        if dedupe_key(event.envelope) in applied:
            subject = nats_subject_for(site, event)
            accepted.append(Accepted(id=event.id, subject=subject, duplicate=True))
        else:
            receipt = next(receipts)
            accepted.append(
                Accepted(id=receipt.event_id, subject=receipt.subject, duplicate=receipt.duplicate)
            )
    return accepted if content_type == BATCH else accepted[0]
