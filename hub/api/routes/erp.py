"""What the ERPs were told: production confirmations and every attempt to deliver them, and
a retry for one that an ERP refused (roles admin and erp)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, TypeAdapter

from contracts import ContractViolation, check_event_time
from hub.api.deps import (
    Destinations,
    ErpDesk,
    EventWriter,
    MaxClockSkew,
    Publisher,
    Reads,
    Requeuer,
    Site,
)
from hub.api.policy import may_send
from hub.api.problems import Problem, problems
from hub.api.reads import JsonAnswer, ReadSources
from hub.api.routes.events import MAX_BODY_BYTES, Accepted, limited_body
from hub.api.routes.orders import NO_NUL
from hub.outbox import OutboxMessage
from projections.views.outbox_view import CONFIRMATION

router = APIRouter(prefix="/erp", tags=["erp"])

Status = Literal["pending", "sent", "failed", "dead"]
MAX_PAGE = 500
# Read through the API's read pool: refused for a while when it is full (429), or when a
# worker died (503), both saying when to ask again.
POOLED = problems(429, 503, retry_after=(429, 503))


class DeliveryView(BaseModel):
    """How delivering a confirmation to one ERP went (its last attempt)."""

    destination: str
    attempts: int
    outcome: str  # delivered, duplicate, failed, dead, requeued
    status_code: int | None
    reason: str
    next_attempt_at: datetime | None


class ConfirmationView(BaseModel):
    id: str
    order_id: str
    sequence: int
    reason: str  # run_ended, shift_end or correction
    machine_id: str | None
    operation: str | None
    yield_quantity: int
    scrap_quantity: int
    start: datetime | None
    end: datetime | None
    final: bool
    correction_of: int | None
    decided_at: datetime
    status: Status
    deliveries: list[DeliveryView]


def status_of(
    message: OutboxMessage, states: dict[str, OutboxMessage], destinations: dict[str, int]
) -> Status:
    """Dead for some ERP: dead; failing for some: failed; taken by every ERP owed it: sent;
    else pending (not tried yet). An ERP added after it was decided is not owed it; one no
    longer configured does not count."""
    states = {d: s for d, s in states.items() if d in destinations}
    outcomes = {s.outcome for s in states.values()}
    if "dead" in outcomes:
        return "dead"
    if outcomes & {"failed", "requeued"}:
        return "failed"
    owed = {d for d, after in destinations.items() if message.position > after}
    taken = {d for d, s in states.items() if s.outcome in ("delivered", "duplicate")}
    return "sent" if owed <= taken and taken else "pending"


def _view(message: OutboxMessage, states: dict[str, OutboxMessage], status: Status) -> Any:
    due = message.payload
    return ConfirmationView(
        id=message.key,
        order_id=message.ordering_key,
        sequence=message.sequence,
        reason=due["reason"],
        machine_id=due.get("machine_id"),
        operation=due.get("operation"),
        yield_quantity=due["yield_quantity"],
        scrap_quantity=due["scrap_quantity"],
        start=due.get("start"),
        end=due.get("end"),
        final=due["final"],
        correction_of=due.get("correction_of"),
        decided_at=message.decided_at,
        status=status,
        deliveries=[
            DeliveryView(
                destination=destination,
                attempts=state.attempts,
                outcome=state.outcome or "",
                status_code=state.status_code,
                reason=state.reason,
                next_attempt_at=state.next_attempt_at,
            )
            for destination, state in sorted(states.items())
        ],
    )


_PAGE = TypeAdapter(list[ConfirmationView])


# The outcomes a confirmation of a status has for some ERP (those that can be found by them).
_OUTCOMES = {"dead": ("dead",), "failed": ("failed", "requeued")}


def read_confirmations(
    sources: ReadSources,
    site: str,
    destinations: dict[str, int],
    status: Status | None,
    order: str | None,
    limit: int,
    after: str,
) -> tuple[bytes, str | None]:
    """A page of confirmations as the answer's JSON (in the read pool), and the id the next
    page starts after, if there is one."""
    found: list[Any] = []
    cursor = after
    while len(found) <= limit:
        batch = sources.outbox.messages(
            site, order, limit=MAX_PAGE, after=cursor, outcomes=_OUTCOMES.get(status or "", ()),
            kind=CONFIRMATION,
        )  # fmt: skip
        for message, states in batch:
            cursor = message.key
            if message.kind != CONFIRMATION:
                continue
            current = status_of(message, states, destinations)
            if status is None or current == status:
                found.append(_view(message, states, current))
        if len(batch) < MAX_PAGE:
            break
    more = found[limit - 1].id if len(found) > limit else None
    return _PAGE.dump_json(found[:limit]), more


def read_confirmation(
    sources: ReadSources, site: str, destinations: dict[str, int], key: str
) -> tuple[OutboxMessage, dict[str, OutboxMessage], Status] | None:
    found = sources.outbox.messages(site, limit=1, key=key, kind=CONFIRMATION)
    if not found:
        return None
    message, states = found[0]
    return message, states, status_of(message, states, destinations)


@router.get(
    "/confirmations",
    summary="Production confirmations and how delivering them to each ERP went",
    description="By id, at most `limit` a page; the `Link` header gives the next page "
    '(`rel="next"`). `status`: pending (not taken by every ERP yet), sent (taken by every '
    "ERP), failed (an ERP refused it for now; it is retried), dead (an ERP refused it for good, "
    "or too many attempts: it and the order's next confirmations wait for a retry).",
    response_model=list[ConfirmationView],
    responses={
        **POOLED,
        200: {
            "headers": {
                "Link": {
                    "description": 'The next page, `<url>; rel="next"`, when there is one',
                    "schema": {"type": "string"},
                }
            }
        },
    },
)
async def list_confirmations(
    request: Request,
    reads: Reads,
    site: Site,
    destinations: Destinations,
    _: ErpDesk,
    status: Status | None = None,
    order: Annotated[str | None, Query(pattern=NO_NUL, max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str, Query(pattern=r"^[0-9a-f]{0,32}$")] = "",
) -> Response:
    page, more = await reads.run(
        request, read_confirmations, site, destinations, status, order, limit, after
    )
    answer = JsonAnswer(page)
    if more is not None:
        following = request.url.include_query_params(after=more)
        answer.headers["Link"] = f'<{following}>; rel="next"'
    return answer


class Requeued(BaseModel):
    id: str
    destination: str
    requeued: bool


@router.post(
    "/confirmations/{confirmation_id}/retry",
    status_code=202,
    summary="Try a failed or dead confirmation again now, for one ERP",
    description="The confirmation (and, behind it, the order's next ones) goes to the ERP "
    "again at once, its attempts counted afresh; the ERP gets the same idempotency key as "
    "before. A confirmation the ERP has taken is not sent again (409).",
    responses={**POOLED, **problems(404, 409)},
)
async def retry_confirmation(
    request: Request,
    confirmation_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
    reads: Reads,
    site: Site,
    destinations: Destinations,
    requeue: Requeuer,
    caller: ErpDesk,
    destination: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
) -> Requeued:
    if requeue is None or destination not in destinations:
        raise Problem(404, f"no ERP {destination!r} takes confirmations here")
    found = await reads.run(request, read_confirmation, site, destinations, confirmation_id)
    if found is None:
        raise Problem(404, f"no confirmation {confirmation_id!r}")
    _message, states, _status = found
    state = states.get(destination)
    if state is None or state.outcome not in ("failed", "dead", "requeued"):
        said = "taken" if state is not None else "not tried yet"
        raise Problem(409, f"{destination} has {said} confirmation {confirmation_id}")
    # The destination's own state: its attempts so far (the requeue's id and count build on it).
    await requeue(
        state, destination, caller.asking(f"API key {caller.key_id} of role {caller.role}")
    )
    return Requeued(id=confirmation_id, destination=destination, requeued=True)


# --- ISA-95 B2MML schedules in ----------------------------------------------------------------

XML_TYPES = ("application/xml", "text/xml")
B2MML_SOURCE = "urn:mes-hub:erp:b2mml-api"  # the CloudEvent source of schedules posted here


@router.post(
    "/b2mml",
    status_code=202,
    summary="Import an ISA-95 B2MML production or operations schedule",
    description="A ProductionSchedule (V0401, V0600) or OperationsSchedule (V0701), as "
    "`application/xml`: each request becomes a `mes.erp.order.released.v1` (or `cancelled`) "
    "event, published like any ERP event; one receipt per event. A document the hub cannot "
    "take is refused whole, naming the element and its line (400: not well-formed or not a "
    "schedule; 422: a request it cannot map). Roles that may send ERP events (admin, erp).",
    responses={202: {"description": "Published"}, **problems(400, 413, 415, 422, 503)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string"}} for t in XML_TYPES},
        }
    },
)
async def post_b2mml(
    request: Request,
    publisher: Publisher,
    caller: EventWriter,
    max_skew_s: MaxClockSkew,
) -> list[Accepted]:
    from adapters.erp.b2mml import B2mmlError, Unmappable, parse_schedule

    if not may_send(caller.role, "erp"):
        raise Problem(403, f"role {caller.role!r} may not send ERP events")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in XML_TYPES:
        raise Problem(415, f"send the schedule as {' or '.join(XML_TYPES)}")
    body = await limited_body(request, MAX_BODY_BYTES)
    now = datetime.now(UTC)
    try:
        events = await asyncio.to_thread(parse_schedule, body, source=B2MML_SOURCE, received_at=now)
    except B2mmlError as refused:
        where = refused.element or "(document)"
        raise Problem(
            422 if isinstance(refused, Unmappable) else 400,
            str(refused),
            errors=[{"field": where, "rule": refused.reason}],
            extensions={"element": refused.element, "line": refused.line},
        ) from None
    for event in events:
        try:
            check_event_time(event, now, max_skew_s)
        except ContractViolation as violation:
            raise Problem(400, f"order {event.subject}: {violation.reason}") from None
    vouched = [event.model_copy(update=caller.actor_attributes()) for event in events]
    receipts = await publisher.publish_many(vouched)
    return [Accepted(id=r.event_id, subject=r.subject, duplicate=r.duplicate) for r in receipts]
