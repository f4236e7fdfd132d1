"""CloudEvents over HTTP (structured, batched and binary mode), published to NATS.

The API never writes the store: it publishes, and ingest applies (one way in)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from contracts import CloudEvent, ContractViolation, validate_envelope
from hub.api.deps import Caller, Context, EventWriter
from hub.api.problems import Problem

router = APIRouter(prefix="/events", tags=["events"])

MAX_BODY_BYTES = 1024 * 1024
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
# Which event families each role may send: an operator tablet must not release ERP orders.
ALLOWED_STREAMS = {
    "admin": {"machine", "operator", "erp"},
    "operator": {"operator"},
    "erp": {"erp"},
}


class Accepted(BaseModel):
    id: str
    subject: str
    duplicate: bool


def _binary_mode(request: Request, body: bytes) -> dict[str, Any]:
    """CloudEvents HTTP binding, binary mode: attributes in ce-* headers, data in the body."""
    attributes: dict[str, Any] = {
        name[3:]: value for name, value in request.headers.items() if name.startswith("ce-")
    }
    if "specversion" not in attributes:
        raise Problem(
            415,
            f"send a CloudEvent: Content-Type {STRUCTURED} (structured mode), {BATCH}, "
            "or ce-* headers with a JSON body (binary mode)",
        )
    content_type = request.headers.get("content-type", "application/json").split(";")[0]
    if content_type != "application/json":
        raise Problem(415, "binary mode needs Content-Type application/json for the data")
    attributes["datacontenttype"] = "application/json"
    attributes["data"] = _json(body)
    return attributes


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(400, f"not JSON: {exc}") from None


def _check(raw: Any, caller: Caller, index: int | None = None) -> CloudEvent:
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
    if validated.event_type.stream not in ALLOWED_STREAMS.get(caller.role, set()):
        raise Problem(
            403, f"{where}role {caller.role!r} may not send {validated.event_type.name!r} events"
        )
    return envelope


@router.post(
    "",
    status_code=202,
    summary="Accept CloudEvents and publish them to the hub",
    responses={202: {"description": "Published; ingest applies it shortly"}},
)
async def post_events(request: Request, context: Context, caller: EventWriter) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise Problem(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == BATCH:
        raw_events = _json(body)
        if not isinstance(raw_events, list) or not raw_events:
            raise Problem(400, "a batch must be a non-empty JSON array of CloudEvents")
        events = [_check(raw, caller, i) for i, raw in enumerate(raw_events)]
    elif content_type == STRUCTURED:
        events = [_check(_json(body), caller)]
    else:
        events = [_check(_binary_mode(request, body), caller)]
    try:
        receipts = await context.publisher.publish_many(events)
    except Exception as exc:
        raise Problem(503, f"could not publish to NATS: {type(exc).__name__}") from None
    accepted = [Accepted(id=r.event_id, subject=r.subject, duplicate=r.duplicate) for r in receipts]
    payload: Any = (
        [a.model_dump() for a in accepted] if content_type == BATCH else accepted[0].model_dump()
    )
    return JSONResponse(payload, status_code=202)
