"""CloudEvents over HTTP (structured, batched and binary mode), published to NATS.

The API never writes the store: it publishes, and ingest applies (one way in). Besides the
contract, it refuses what ingest would have to keep but the sender can still put right: an
event dated too far ahead of the hub's clock (400, as ingest does), an operator event for a
machine the hub does not know (404), a downtime reason that is not in the catalog (400), and a
downtime reason that covers time the machine was running, by its own reports as the hub knows
them when asked (409: ``_check_reasons_cover_stops``). A batch is checked whole before any of it
is published. Over NATS (adapters, gateways) the last three are not checked: what comes is kept.

What the route accepts (it reads the body itself) is told to the OpenAPI document by
``openapi_extra`` and ``openapi_schemas``: the three content types, the ``ce-*`` headers, and
one CloudEvent schema per type that may be sent here."""

from __future__ import annotations

import asyncio
import copy
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

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
    Plant,
    Publisher,
    Site,
    Store,
)
from hub.api.policy import SENDS, may_send
from hub.api.problems import Problem, problems
from hub.domain import machine_aggregate_id
from hub.store import EventStore
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig
from projections.rules.timeline import RunningStretch, running_stretches
from projections.views.facts_view import FactsReader

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


# How far past its start a reason with no end is read, to say until when the machine ran; and
# the window that says whether it ran at that start.
_OPEN_REASON_LOOK = timedelta(days=1)
_MOMENT = timedelta(microseconds=1)


def _running_stretches(
    facts: FactsReader,
    site: str,
    plant: PlantConfig,
    machine_id: str,
    reason: DowntimeReasonV1,
    now: datetime,
) -> list[RunningStretch]:
    """When the machine was running, by its own availability and execution reports as the hub
    knows them now (``running_stretches``: a micro-stop counts as running, and so does running
    in a planned break, outside the shifts or before its commissioning, which its timeline
    shows otherwise), in the time ``reason`` covers: [start, end), or for one with no end, the
    running stretch going on at its start, if any. Only what is known counts: the time after
    ``now`` is not, and a machine with no reports never ran. Reads the machine's state reports
    over that time only; for a reason with no end, those around its start, and only if it was
    running then, those of the day after (until when it ran)."""
    machine = machine_aggregate_id(site, machine_id)
    margin = timedelta(seconds=plant.micro_stop_threshold_s)
    start = reason.start.astimezone(UTC)

    def running(until: datetime) -> list[RunningStretch]:
        window = Interval(start, min(until, now))
        if window.end <= window.start:
            return []
        # The threshold's margin on each side, so a stop cut by the window is judged whole.
        reports = facts.states(machine, Interval(window.start - margin, window.end + margin))
        return running_stretches([r for r in reports if r.time <= now], window, margin)

    if reason.end is not None:
        return running(reason.end.astimezone(UTC))
    at_start = running(start + _MOMENT)
    if not at_start or at_start[0].start != start:
        return []
    return running(start + _OPEN_REASON_LOOK)[:1]


def _zone_name(time: datetime, zone: ZoneInfo) -> str:
    """The plant's time zone at ``time`` as a station shows it: its abbreviation (CET, CEST),
    or its offset from UTC where it has none (UTC-03)."""
    name = time.astimezone(zone).tzname() or ""
    return f"UTC{name}" if not name or name[0] in "+-" else name


def _clock(time: datetime, day: date, zone: ZoneInfo) -> str:
    """A time an operator reads on a tablet, in the plant's time zone: the time of day, with
    the date when it is not ``day`` (the reason's start, there)."""
    local = time.astimezone(zone)
    return local.strftime("%H:%M:%S" if local.date() == day else "%Y-%m-%d %H:%M:%S")


def _span(stretch: RunningStretch, day: date, zone: ZoneInfo) -> str:
    start, end = _zone_name(stretch.start, zone), _zone_name(stretch.end, zone)
    since, until = _clock(stretch.start, day, zone), _clock(stretch.end, day, zone)
    if start == end:
        return f"from {since} to {until} {end}"
    return f"from {since} {start} to {until} {end}"  # across a change of clocks


def _iso(time: datetime) -> str:
    return time.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _reasons_over_running_time(
    facts: FactsReader,
    site: str,
    plant: PlantConfig,
    events: list[tuple[int, ValidatedEvent]],
    now: datetime,
    batch: bool,
) -> Problem | None:
    """The refusal of the first of ``events`` (index, downtime reason) that covers time its
    machine was running; None: each covers stops only."""
    zone = ZoneInfo(plant.time_zone)
    micro = (
        f"a stop shorter than the micro-stop threshold ({plant.micro_stop_threshold_s:g} s) "
        "counts as running"
    )
    for index, event in events:
        reason = event.data
        assert isinstance(reason, DowntimeReasonV1)
        machine_id = event.envelope.subject
        running = _running_stretches(facts, site, plant, machine_id, reason, now)
        if not running:
            continue
        where = f"event {index}: " if batch else ""
        start = reason.start.astimezone(UTC)
        day = start.astimezone(zone).date()
        first = running[0]
        if reason.end is None:
            short = any(stop.start <= start < stop.end for stop in first.micro_stops)
            noted = f" ({micro})" if short else ""
            detail = (
                f"{machine_id} was running at {_clock(start, day, zone)} "
                f"{_zone_name(start, zone)}{noted}: a downtime reason without an end may only "
                "start while the machine is stopped"
            )
        else:
            more = len(running) - 1
            notes = [f"and {more} more time{'s' if more > 1 else ''}"] if more else []
            if any(stretch.micro_stops for stretch in running):
                notes.append(micro)
            noted = f" ({'; '.join(notes)})" if notes else ""
            detail = (
                f"{machine_id} was running {_span(first, day, zone)}{noted}: a downtime reason "
                "may only cover time the machine was stopped"
            )
        return Problem(
            409,
            where + detail,
            extensions={
                "machine_id": machine_id,
                # The first ones (a reason over a year could name thousands), and how many.
                "running": [
                    {"from": _iso(r.start), "to": _iso(r.end)} for r in running[:MAX_LISTED]
                ],
                "running_count": len(running),
            },
        )
    return None


async def _check_reasons_cover_stops(
    facts: FactsReader,
    site: str,
    plant: PlantConfig,
    events: list[ValidatedEvent],
    passed: set[str],
    now: datetime,
    batch: bool,
) -> None:
    """A downtime reason sent to the API may only cover time its machine was stopped, by the
    machine's own reports as the hub knows them now (not counting the batch's own machine
    events); one with no end (for the stop going on at its start) may not start while it was
    running. A reason in ``passed`` (applied already, or accepted here lately: a retry) is
    answered as a duplicate, not checked again."""
    reasons = [
        (index, event)
        for index, event in enumerate(events)
        if isinstance(event.data, DowntimeReasonV1) and dedupe_key(event.envelope) not in passed
    ]
    if not reasons:
        return
    refusal = await asyncio.to_thread(
        _reasons_over_running_time, facts, site, plant, reasons, now, batch
    )
    if refusal is not None:
        raise refusal


# The downtime reasons accepted here lately, remembered for a while (and no more than so many),
# so that a retry of one not yet applied is not checked again (``_accepted_reasons``).
_REMEMBER_FOR = timedelta(hours=1)
# A refusal lists at most this many of the stretches the machine ran.
MAX_LISTED = 100
_REMEMBER_AT_MOST = 10_000


class _AcceptedReasons:
    """The dedupe keys of the downtime reasons the API published lately, with when. A reason
    accepted but not yet applied may be retried (a tablet that never heard the answer) after a
    machine event landed that the check would now refuse it for: it is the same event, so it
    is published again unchecked, and NATS' duplicate window (or the store, after it) answers
    it as a duplicate."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, datetime] = OrderedDict()

    def of(self, keys: Sequence[str], now: datetime) -> set[str]:
        while self._keys and next(iter(self._keys.values())) < now - _REMEMBER_FOR:
            self._keys.popitem(last=False)
        return {key for key in keys if key in self._keys}

    def add(self, keys: Sequence[str], now: datetime) -> None:
        for key in keys:
            self._keys[key] = now
            self._keys.move_to_end(key)
        while len(self._keys) > _REMEMBER_AT_MOST:
            self._keys.popitem(last=False)


def _accepted_reasons(request: Request) -> _AcceptedReasons:
    """The app's memory of the reasons it accepted (one per app, made on first use)."""
    state = request.app.state
    accepted = getattr(state, "accepted_reasons", None)
    if not isinstance(accepted, _AcceptedReasons):
        accepted = state.accepted_reasons = _AcceptedReasons()
    return accepted


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
    "machine was stopped, by the machine's own reports as the hub knows them when asked (a "
    "micro-stop counts as running, and so does running in a break, outside the shifts or "
    "before commissioning); one with no end is for the stop going on at its start and may not "
    "start while the machine runs. One that covers running time is refused with 409 "
    "Conflict, naming the machine (`machine_id`) and when it ran (`running`: `from`, `to`; "
    "the `detail` tells the times on the plant's clock): the event itself is valid (not 400 "
    "or 422), it conflicts with the machine's history as the hub holds it, which late machine "
    "events may still change, so the same reason may be accepted later. A retry of a reason "
    "already accepted is answered as a duplicate, not checked again. Reasons that come over "
    "NATS (adapters, gateways) are not checked: they are kept.",
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
    # A reason accepted here lately but not applied yet is published again, unchecked: NATS'
    # duplicate window answers it as a duplicate (or the store drops it, after the window).
    accepted_reasons = _accepted_reasons(request)
    reason_keys = [dedupe_key(e.envelope) for e in events if isinstance(e.data, DowntimeReasonV1)]
    passed = applied | accepted_reasons.of(reason_keys, now)
    await _check_reasons_cover_stops(facts, site, plant, events, passed, now, content_type == BATCH)
    fresh = [e for e in envelopes if dedupe_key(e) not in applied]
    try:
        receipts = iter(await publisher.publish_many(fresh) if fresh else [])
    except Exception as exc:
        raise Problem(503, f"could not publish to NATS: {type(exc).__name__}") from None
    accepted_reasons.add([key for key in reason_keys if key not in applied], now)
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
