"""The generic REST dialect (``dialect = "rest"``): orders in from a JSON endpoint polled with an
incremental cursor, production confirmations out as a JSON ``POST`` with an ``Idempotency-Key``.
docs/erp.md ("Generic REST") describes the keys, the wire shapes and an example.

```toml
[[erp]]
name = "plant-erp"
dialect = "rest"
url = "https://erp.plant1.example"
auth = "bearer"                       # or "basic": user + secret
secret = { env = "PLANT_ERP_TOKEN" }
orders_path = "/api/v1/production-orders"
items = "data"                        # the list's key in an object answer (absent: a list)
cursor = "modified"                   # ?modified_since=<stamp>; or "id": ?after_id=<id>
confirm_path = "/api/v1/confirmations"

[erp.mapping]                         # dotted paths into each record
order_id = "number"
part_number = "product.code"
cancelled_when = ["cancelled"]
```

Orders in: every poll asks for the records after the cursor, maps each one (a record that does
not map is skipped with one log line naming it and the field), and compares it with what this
ERP's orders looked like before (``OrderBook``, a small JSON file per ERP): a new order is
released, a changed one publishes only what changed, a cancelled one is cancelled. Event ids
derive from the record's id and modification stamp, so the same state read again gives the same
ids (dropped downstream as duplicates).

Errors::

    OrdersUnavailable           the orders could not be read this time (one line, no secret)
    hub.outbox.DeliveryFailed   a confirmation not taken; ``permanent`` when resending the same
                                message cannot help (the ERP refused its content)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.erp.base import Confirmation, Delivered, DeliveryFailed, ErpEntryBase, SecretRef
from contracts import CloudEvent, OrderCancelledV1, OrderChangedV1, OrderReleasedV1, is_token
from hub.outbound import OutboundRefused, outbound_client
from hub.outbox import EXCERPT_CHARS

log = logging.getLogger(__name__)

# A dotted path into a JSON record: ``number``, ``product.code``, ``lines.0.qty`` (a number picks
# a list's item). Segments hold no dot and no white space.
DOTTED_PATH = r"^[^.\s]+(\.[^.\s]+)*$"
DottedPath = Annotated[str, Field(pattern=DOTTED_PATH, max_length=256)]
URL_PATH = r"^/[^\s#]*$"  # below the entry's url: "/api/orders", may carry a query
RELEASE_FIELDS = (
    "part_number",
    "quantity",
    "due",
    "customer",
    "machine_id",
    "ideal_cycle_time_s",
)
RETRYABLE_4XX = frozenset({401, 403, 408, 429})  # a 4xx that may pass later (login, rate)


class OrdersUnavailable(Exception):
    """The ERP's orders could not be read this poll (down, refused the login, answered with
    something that is not a list of records): the reason in one line, never a secret. Nothing
    was consumed; the next poll asks again with the same cursor."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- configuration -----------------------------------------------------------------------------


def _none_if_empty(value: object) -> object:
    return None if value == "" else value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


OptionalPath = Annotated[DottedPath | None, BeforeValidator(_none_if_empty)]
StatusValues = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=128)]], BeforeValidator(_as_list)
]


class FieldMapping(BaseModel):
    """Where each release field is in a record (``[erp.mapping]``): dotted paths. The defaults
    are the contract's own names; an optional field mapped to ``""`` is not read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: OptionalPath = Field(default=None, description="The record's id (default: order_id)")
    order_id: DottedPath = "order_id"
    part_number: DottedPath = "part_number"
    quantity: DottedPath = "quantity"
    due: DottedPath = "due"
    customer: OptionalPath = "customer"
    machine_id: OptionalPath = "machine_id"
    ideal_cycle_time_s: OptionalPath = "ideal_cycle_time_s"
    status: OptionalPath = "status"
    modified: OptionalPath = "modified"
    cancelled_when: StatusValues = Field(
        default_factory=lambda: ["cancelled"],
        description="Status values that mean the order is cancelled",
    )
    released_when: StatusValues = Field(
        default_factory=list,
        description="Status values that release an order; empty: every status not cancelled",
    )

    @model_validator(mode="after")
    def _statuses(self) -> FieldMapping:
        if self.status is None and (self.released_when or self.cancelled_when):
            raise ValueError(
                'status = "" reads no status: cancelled_when and released_when must be []'
            )
        both = sorted(set(self.cancelled_when) & set(self.released_when))
        if both:
            raise ValueError(f"status {both[0]!r} is in both cancelled_when and released_when")
        return self

    @property
    def record_id(self) -> str:
        return self.id or self.order_id


class Entry(ErpEntryBase):
    """A ``[[erp]]`` entry of the generic REST dialect."""

    dialect: Literal["rest"]
    secret: SecretRef = Field(description="The bearer token, or the password with basic auth")
    auth: Literal["bearer", "basic"] = "bearer"
    orders_path: str | None = Field(
        default=None, pattern=URL_PATH, max_length=2048, validate_default=True
    )
    items: DottedPath | None = Field(
        default=None, description="Where the list is in an object answer; absent: a list"
    )
    mapping: FieldMapping = Field(default_factory=FieldMapping)
    cursor: Literal["modified", "id"] = "modified"
    cursor_param: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\[\]-]{1,64}$")
    confirm_path: str | None = Field(
        default=None, pattern=URL_PATH, max_length=2048, validate_default=True
    )
    state_dir: Path | None = Field(
        default=None, description="Where the orders' last state is kept (see order_source)"
    )

    @field_validator("auth")
    @classmethod
    def _basic_needs_user(cls, value: str, info: ValidationInfo) -> str:
        if value == "basic" and not info.data.get("user"):
            raise ValueError('auth = "basic" needs user (and the password as the secret)')
        return value

    @field_validator("orders_path")
    @classmethod
    def _orders_path_when_polled(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("poll_interval_s", 0) > 0:
            raise ValueError(
                "needed to read orders; set poll_interval_s = 0 if this ERP sends none"
            )
        return value

    @field_validator("confirm_path")
    @classmethod
    def _confirm_path_when_confirming(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("confirm"):
            raise ValueError("needed to send confirmations; set confirm = false if it takes none")
        return value

    @model_validator(mode="after")
    def _cursor_field(self) -> Entry:
        if self.cursor == "modified" and self.mapping.modified is None and self.orders_path:
            raise ValueError('cursor = "modified" needs mapping.modified (or cursor = "id")')
        return self

    @property
    def cursor_name(self) -> str:
        return self.cursor_param or ("modified_since" if self.cursor == "modified" else "after_id")


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> RestOrderSource | None:
    """The entry's orders in, or None (``poll_interval_s = 0``). The orders' last state is
    kept in ``<dir>/<name>.orders.json``, ``dir`` the entry's ``state_dir`` else ``state_dir``
    (the composition root passes ``<data_dir>/erp``); with neither, in memory only (a restart
    then compares with nothing: every order read again is released again)."""
    assert isinstance(entry, Entry)
    if entry.poll_interval_s == 0 or entry.orders_path is None:
        return None
    return RestOrderSource(entry, entry.state_dir or state_dir)


def confirmation_sender(entry: ErpEntryBase) -> RestConfirmationSender | None:
    """The entry's confirmations out, or None (``confirm = false``)."""
    assert isinstance(entry, Entry)
    if not entry.confirm or entry.confirm_path is None:
        return None
    return RestConfirmationSender(entry)


# --- shared by the HTTP dialects ---------------------------------------------------------------


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + path


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line (white space runs collapsed), cut at ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def scrubbed(text: str, secret: SecretStr | None, limit: int = EXCERPT_CHARS) -> str:
    """The start of an answer, with the secret blanked should the peer echo it."""
    text = text[: limit * 4]
    if secret is not None and secret.get_secret_value():
        text = text.replace(secret.get_secret_value(), "***")
    return text[:limit]


def retry_after(response: httpx.Response) -> str:
    value = response.headers.get("retry-after")
    return f", Retry-After: {one_line(value, 64)}" if value else ""


def transport_failure(name: str, exc: Exception, timeout_s: float) -> str:
    """A one-line reason for a call that got no answer."""
    if isinstance(exc, httpx.TimeoutException):
        return f"{name}: no answer within {timeout_s:g} s ({type(exc).__name__})"
    if isinstance(exc, OutboundRefused):
        return f"{name}: {exc}"
    detail = one_line(str(exc), 160)
    return f"{name}: cannot reach the ERP: {type(exc).__name__}" + (f": {detail}" if detail else "")


def read_secret(name: str, ref: SecretRef) -> SecretStr:
    """The entry's secret, or a (retryable) ``DeliveryFailed`` saying where it was looked for."""
    try:
        return ref.read()
    except ValueError as exc:
        raise DeliveryFailed(f"{name}: secret: {exc}", permanent=False) from None


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(value: object) -> datetime | None:
    """An RFC 3339 date-time with its offset, else None (no offset, a number, a date)."""
    if not isinstance(value, str) or _RFC3339.match(value) is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


# --- orders in: mapping ------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedOrder:
    """One ERP record as the hub reads it: which order, its release fields (JSON-ready, None
    where the ERP gives none), its status, and the stamp that makes this state unique."""

    record_id: str
    order_id: str
    stamp: str
    time: datetime | None  # when the ERP changed it (the event time), if it says
    fields: dict[str, Any]
    status: str | None
    cancelled: bool
    released: bool


class Unmappable(ValueError):
    """A record that cannot become an order event: names the field and why."""


_MISSING: Any = object()


def dig(record: Any, path: str) -> Any:
    """The value at a dotted path (``_MISSING`` if any step is absent)."""
    value = record
    for step in path.split("."):
        if isinstance(value, Mapping) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return _MISSING
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def whole_number(value: Any) -> int | None:
    """An integer quantity from a JSON number or a numeric string (``"100.000"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        if number.is_finite() and number == number.to_integral_value():
            return int(number)
    return None


def positive_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


class RecordMapper:
    """Turns one JSON record into a ``MappedOrder`` following ``[erp.mapping]``."""

    def __init__(self, mapping: FieldMapping, modified_required: bool) -> None:
        self.mapping = mapping
        self.modified_required = modified_required

    def label(self, record: Any, number: int) -> str:
        """How a log line names a record: its id, else its order id, else its place."""
        for path in (self.mapping.record_id, self.mapping.order_id):
            text = _text(dig(record, path))
            if text:
                return repr(one_line(text, 80))
        return f"#{number} of the answer"

    def map(self, record: Any) -> MappedOrder:
        m = self.mapping
        if not isinstance(record, Mapping):
            raise Unmappable(f"is not a JSON object but {type(record).__name__}")

        def need(name: str, path: str) -> Any:
            value = dig(record, path)
            if value is _MISSING or value is None:
                raise Unmappable(f"field {name} ({path!r}): missing")
            return value

        def bad(name: str, path: str, value: Any, why: str) -> Unmappable:
            return Unmappable(f"field {name} ({path!r}): {why}, got {_short(value)}")

        raw = need("order_id", m.order_id)
        order_id = _text(raw)
        if order_id is None or not is_token(order_id) or len(order_id) > 128:
            raise bad("order_id", m.order_id, raw, "must be 1-128 of A-Z a-z 0-9 _ -")
        record_id = order_id
        if m.id is not None:
            raw = need("id", m.id)
            record_id = _text(raw) or ""
            if not record_id:
                raise bad("id", m.id, raw, "must be a string or an integer")

        raw = need("part_number", m.part_number)
        part_number = _text(raw)
        if not part_number or len(part_number) > 128:
            raise bad("part_number", m.part_number, raw, "must be 1-128 characters")

        raw = need("quantity", m.quantity)
        quantity = whole_number(raw)
        if quantity is None or quantity <= 0:
            raise bad("quantity", m.quantity, raw, "must be a whole number > 0")

        raw = need("due", m.due)
        due = parse_rfc3339(raw)
        if due is None:
            raise bad("due", m.due, raw, "must be an RFC 3339 date-time with its offset")

        fields: dict[str, Any] = {
            "order_id": order_id,
            "part_number": part_number,
            "quantity": quantity,
            "due": rfc3339(due),
            "customer": None,
            "machine_id": None,
            "ideal_cycle_time_s": None,
        }
        if m.customer is not None and (raw := dig(record, m.customer)) not in (_MISSING, None):
            customer = _text(raw)
            if customer is None or len(customer) > 256:
                raise bad("customer", m.customer, raw, "must be text of at most 256 characters")
            fields["customer"] = customer or None
        if m.machine_id is not None and (raw := dig(record, m.machine_id)) not in (_MISSING, None):
            machine_id = _text(raw)
            if machine_id == "":
                machine_id = None
            elif machine_id is None or not is_token(machine_id) or len(machine_id) > 128:
                raise bad("machine_id", m.machine_id, raw, "must be 1-128 of A-Z a-z 0-9 _ -")
            fields["machine_id"] = machine_id
        if m.ideal_cycle_time_s is not None and (raw := dig(record, m.ideal_cycle_time_s)) not in (
            _MISSING,
            None,
        ):
            cycle = positive_float(raw)
            if cycle is None:
                raise bad("ideal_cycle_time_s", m.ideal_cycle_time_s, raw, "must be a number > 0")
            fields["ideal_cycle_time_s"] = cycle

        status: str | None = None
        if m.status is not None:
            raw = dig(record, m.status)
            if raw not in (_MISSING, None):
                status = _text(raw)
                if status is None:
                    raise bad("status", m.status, raw, "must be a string or an integer")

        stamp, time = self._stamp(record, fields, status)
        try:
            OrderReleasedV1.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:  # a safety net: the checks above should hold
            err = exc.errors(include_url=False)[0]
            name = ".".join(str(part) for part in err["loc"])
            raise Unmappable(f"field {name}: {err['msg']}") from None
        cancelled = status is not None and status in m.cancelled_when
        released = not cancelled and (not m.released_when or status in m.released_when)
        return MappedOrder(record_id, order_id, stamp, time, fields, status, cancelled, released)

    def _stamp(
        self, record: Mapping[str, Any], fields: Mapping[str, Any], status: str | None
    ) -> tuple[str, datetime | None]:
        path = self.mapping.modified
        raw = _MISSING if path is None else dig(record, path)
        if raw in (_MISSING, None):
            if self.modified_required:
                raise Unmappable(f"field modified ({path!r}): missing")
            # No stamp from the ERP: the state itself is the stamp (same state, same id).
            canonical = json.dumps([fields, status], sort_keys=True, separators=(",", ":"))
            return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:32], None
        time = parse_rfc3339(raw)
        if time is None and self.modified_required:
            raise Unmappable(
                f"field modified ({path!r}): must be an RFC 3339 date-time with its offset, "
                f"got {_short(raw)}"
            )
        stamp = _text(raw)
        if stamp is None:
            raise Unmappable(f"field modified ({path!r}): must be a string, got {_short(raw)}")
        return stamp, time


# --- orders in: what the ERP's orders looked like ----------------------------------------------

_CURSOR = re.compile(r"^(?P<erp>.*)#(?P<generation>[0-9]{1,18})$", re.DOTALL)


def split_cursor(cursor: str | None) -> tuple[str | None, int | None]:
    """``"<ERP cursor>#<generation>"`` into its parts; a cursor without ``#n`` (written by
    hand) is the ERP's alone."""
    if cursor is None:
        return None, None
    found = _CURSOR.match(cursor)
    if found is None:
        return cursor or None, None
    return found["erp"] or None, int(found["generation"])


def join_cursor(erp_cursor: str | None, generation: int) -> str:
    return f"{erp_cursor or ''}#{generation}"


class OrderBook:
    """What one ERP's orders looked like, so a poll can say what changed — kept in
    ``<state_dir>/<erp>.orders.json`` (in memory without a state dir).

    A poll reads records and publishes events; the caller then stores the cursor it got. Should
    it die in between, the records are read again with the old cursor and must give the same
    events again. So the book keeps two states: *committed*, what the orders looked like as of
    the cursor the caller stored, and *pending*, the orders this poll changed, named by a
    generation number that is part of the cursor handed out (``…#7``). A poll with that cursor
    commits the pending changes; a poll with an older one forgets them and compares with the
    committed state again. A poll from the start (cursor None) compares with nothing."""

    FORMAT = 1

    def __init__(self, erp: str, source: str, path: Path | None) -> None:
        self.erp, self.source, self.path = erp, source, path
        self._state: dict[str, Any] | None = None
        self._baseline: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, dict[str, Any]] = {}
        self._from_start = False
        self._dirty = False

    async def begin(self, cursor: str | None) -> str | None:
        """Start a poll with the caller's cursor; returns the ERP's part of it."""
        if self._state is None:
            self._state = await asyncio.to_thread(self._load)
        state = self._state
        erp_cursor, generation = split_cursor(cursor)
        pending = state.get("pending")
        if pending is not None and generation == pending["generation"]:
            orders = {} if pending["from_start"] else state["committed"]["orders"]
            orders.update(pending["orders"])
            state["committed"] = {"generation": generation, "orders": orders}
            self._dirty = True
        elif generation is not None and generation != state["committed"]["generation"]:
            log.warning(
                "%s: cursor generation %d is not in %s (replaced or lost?): comparing with the "
                "last state it holds",
                self.erp,
                generation,
                self.path or "memory",
            )
        if pending is not None:
            state["pending"] = None
            self._dirty = True
        self._from_start = cursor is None
        self._baseline = {} if self._from_start else state["committed"]["orders"]
        self._changed = {}
        return erp_cursor

    def events(self, orders: Iterable[MappedOrder]) -> list[CloudEvent]:
        """The events that take the orders from what they were to these records (in order)."""
        found: list[CloudEvent] = []
        for order in orders:
            before = self._changed.get(order.order_id) or self._baseline.get(order.order_id)
            event = self._event(order, before)
            if event is not None:
                found.append(event)
            if event is not None or (before is not None and before["stamp"] != order.stamp):
                self._changed[order.order_id] = {
                    "record": order.record_id,
                    "stamp": order.stamp,
                    "fields": order.fields,
                    "status": order.status,
                    "cancelled": order.cancelled or bool(before and before["cancelled"]),
                }
        return found

    async def finish(self, erp_cursor: str | None, cursor: str | None) -> str | None:
        """Keep this poll's changes as pending; the cursor that commits them (or the caller's
        own, when nothing changed)."""
        state = self._state
        assert state is not None
        if self._changed or self._from_start:
            state["last_generation"] += 1
            generation = state["last_generation"]
            state["pending"] = {
                "generation": generation,
                "from_start": self._from_start,
                "orders": self._changed,
            }
            self._dirty = True
            next_cursor: str | None = join_cursor(erp_cursor, generation)
        elif split_cursor(cursor)[0] == erp_cursor:
            next_cursor = cursor
        else:
            next_cursor = join_cursor(erp_cursor, state["committed"]["generation"])
        if self._dirty:
            await asyncio.to_thread(self._save)
            self._dirty = False
        return next_cursor

    def _event(self, order: MappedOrder, before: Mapping[str, Any] | None) -> CloudEvent | None:
        if order.cancelled:
            if before is not None and before["cancelled"]:
                return None
            reason = f"status {order.status!r} in {self.erp}"
            data = OrderCancelledV1(order_id=order.order_id, reason=reason).model_dump()
            return self._cloud_event("mes.erp.order.cancelled.v1", order, data)
        if not order.released:
            return None  # not released yet (a draft): nothing for the floor
        if before is None:
            released = {k: v for k, v in order.fields.items() if v is not None}
            data = OrderReleasedV1.model_validate(released).model_dump(mode="json")
            return self._cloud_event("mes.erp.order.released.v1", order, _without_none(data))
        if before["cancelled"]:
            if before["stamp"] != order.stamp:
                log.warning(
                    "%s: order %s was cancelled and is %s again: the hub keeps it cancelled",
                    self.erp,
                    order.order_id,
                    order.status or "released",
                )
            return None
        changed = {
            k: order.fields[k] for k in RELEASE_FIELDS if order.fields[k] != before["fields"][k]
        }
        if not changed:
            return None
        model = OrderChangedV1.model_validate({"order_id": order.order_id, **changed})
        data = {"order_id": order.order_id, **model.model_dump(mode="json", include=set(changed))}
        return self._cloud_event("mes.erp.order.changed.v1", order, data)

    def _cloud_event(self, type_: str, order: MappedOrder, data: dict[str, Any]) -> CloudEvent:
        key = f"{self.source}|{order.record_id}|{type_}|{order.stamp}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return CloudEvent(
            specversion="1.0",
            id=f"{order.order_id}-{digest}",
            source=self.source,
            type=type_,
            time=order.time or datetime.now(UTC),
            subject=order.order_id,
            datacontenttype="application/json",
            data=data,
        )

    def _empty(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "erp": self.erp,
            "last_generation": 0,
            "committed": {"generation": 0, "orders": {}},
            "pending": None,
        }

    def _load(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return self._empty()
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("format") != self.FORMAT:
                raise ValueError(f"not a format {self.FORMAT} order state")
            if not isinstance(state["committed"]["orders"], dict):
                raise ValueError("committed orders are not an object")
            return state
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "%s: order state %s is unreadable (%s): moved to %s; starting from no state",
                self.erp,
                self.path,
                one_line(str(exc), 120),
                aside.name,
            )
            return self._empty()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._state, separators=(",", ":"), sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def order_source_urn(erp: str) -> str:
    """The CloudEvent ``source`` of an ERP's order events: its name, which stays when its URL
    moves (a new URL must not make old orders new)."""
    return f"urn:mes-hub:erp:{erp}"


def state_file(state_dir: Path | None, erp: str) -> Path | None:
    return None if state_dir is None else state_dir / f"{erp}.orders.json"


def polled_changes(
    book: OrderBook,
    mapper: RecordMapper,
    records: Sequence[Any],
    cursor_of: Callable[[Any], tuple[Any, str] | None],
) -> tuple[list[CloudEvent], tuple[Any, str] | None]:
    """Map ``records`` (skipping, with one log line each, those that do not map), in cursor
    order, into events; and the greatest cursor among them (``(sort key, ERP text)``)."""
    keyed = [(cursor_of(record), n, record) for n, record in enumerate(records)]
    keyed.sort(key=lambda item: (item[0] is not None, item[0][0] if item[0] else 0, item[1]))
    mapped: list[MappedOrder] = []
    for _, number, record in keyed:
        try:
            mapped.append(mapper.map(record))
        except Unmappable as exc:
            log.warning(
                "%s: record %s skipped: %s", book.erp, mapper.label(record, number + 1), exc
            )
    last = max((key for key, _, _ in keyed if key is not None), default=None, key=lambda k: k[0])
    return book.events(mapped), last


# --- orders in: the REST endpoint --------------------------------------------------------------


class RestOrderSource:
    """Polls ``orders_path`` (see the module) for the records after a cursor."""

    def __init__(self, entry: Entry, state_dir: Path | None) -> None:
        self.entry = entry
        self.book = OrderBook(
            entry.name, order_source_urn(entry.name), state_file(state_dir, entry.name)
        )
        self.mapper = RecordMapper(entry.mapping, modified_required=entry.cursor == "modified")

    def __repr__(self) -> str:
        return f"RestOrderSource({self.entry.name!r})"

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        erp_cursor = await self.book.begin(cursor)
        records = await self._read(erp_cursor)
        events, last = polled_changes(self.book, self.mapper, records, self._cursor_of)
        next_erp = erp_cursor if last is None else last[1]
        return events, await self.book.finish(next_erp, cursor)

    def _cursor_of(self, record: Any) -> tuple[Any, str] | None:
        if self.entry.cursor == "modified":
            path = self.entry.mapping.modified
            raw = _MISSING if path is None else dig(record, path)
            when = parse_rfc3339(raw)
            return None if when is None else (when.timestamp(), str(raw))
        raw = dig(record, self.entry.mapping.record_id)
        text = _text(raw)
        if text is None:
            return None
        # Numeric ids compare as numbers (9 < 10), others as text; mixed ids are the ERP's
        # business, but a number sorts before any text here.
        return ((0, int(text), "") if text.isdigit() else (1, 0, text)), text

    async def _read(self, erp_cursor: str | None) -> list[Any]:
        entry = self.entry
        assert entry.orders_path is not None
        try:
            secret = entry.secret.read()
        except ValueError as exc:
            raise OrdersUnavailable(f"{entry.name}: secret: {exc}") from None
        url = httpx.URL(join_url(entry.url, entry.orders_path))
        if erp_cursor is not None:  # merged with a query the path may carry
            url = url.copy_merge_params({entry.cursor_name: erp_cursor})
        try:
            async with outbound_client(entry.allowlist(), entry.timeout_s) as client:
                response = await client.get(
                    url,
                    headers={"Accept": "application/json", **authorization(entry, secret)},
                )
        except (httpx.HTTPError, OutboundRefused) as exc:
            raise OrdersUnavailable(transport_failure(entry.name, exc, entry.timeout_s)) from None
        if not response.is_success:
            body = one_line(scrubbed(response.text, secret), 160)
            raise OrdersUnavailable(
                f"{entry.name}: orders: HTTP {response.status_code} {response.reason_phrase}"
                f"{retry_after(response)}" + (f": {body}" if body else "")
            )
        try:
            answer = response.json()
        except ValueError:
            raise OrdersUnavailable(f"{entry.name}: orders: the answer is not JSON") from None
        records = answer if entry.items is None else dig(answer, entry.items)
        if not isinstance(records, list):
            where = "the answer" if entry.items is None else f"items ({entry.items!r})"
            raise OrdersUnavailable(f"{entry.name}: orders: {where} is not a JSON array")
        return records


def authorization(entry: Entry, secret: SecretStr) -> dict[str, str]:
    """The ``Authorization`` header: the token as bearer, or user and secret as basic."""
    if entry.auth == "bearer":
        return {"Authorization": f"Bearer {secret.get_secret_value()}"}
    assert entry.user is not None
    pair = f"{entry.user}:{secret.get_secret_value()}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


# --- confirmations out -------------------------------------------------------------------------


def confirmation_json(confirmation: Confirmation) -> dict[str, Any]:
    """The body of a confirmation ``POST`` (docs/erp.md shows one)."""
    c = confirmation
    return {
        "key": c.key,
        "order_id": c.order_id,
        "sequence": c.sequence,
        "machine_id": c.machine_id,
        "operation": c.operation,
        "yield_quantity": c.yield_quantity,
        "scrap_quantity": c.scrap_quantity,
        "start": None if c.start is None else rfc3339(c.start),
        "end": None if c.end is None else rfc3339(c.end),
        "final": c.final,
        "correction_of": c.correction_of,
        "posted_at": rfc3339(c.posted_at),
        "yield_total": c.yield_total,
        "scrap_total": c.scrap_total,
        "checkpoint": c.checkpoint,
    }


def http_failure(
    name: str, response: httpx.Response, secret: SecretStr | None, detail: str = ""
) -> DeliveryFailed:
    """A refusal as ``DeliveryFailed``: permanent for a 4xx that resending cannot change (not
    401, 403, 408, 429); retryable for those and every 5xx. One line, no secret."""
    status = response.status_code
    permanent = 400 <= status < 500 and status not in RETRYABLE_4XX
    excerpt = scrubbed(response.text, secret)
    reason = f"{name}: HTTP {status} {response.reason_phrase}{retry_after(response)}"
    detail = detail or one_line(excerpt, 200)
    if detail:
        reason += f": {detail}"
    return DeliveryFailed(reason, status=status, excerpt=excerpt, permanent=permanent)


class RestConfirmationSender:
    """POSTs each confirmation as JSON with ``Idempotency-Key: <confirmation.key>`` (and the
    hub's audit checkpoint in ``Mes-Hub-Checkpoint`` as in the body's ``checkpoint``). A 2xx is
    delivered; a 409 that names the key (``Idempotency-Key`` header echoed, or the key in the
    body), or a 2xx with ``Idempotent-Replayed: true``, is a duplicate the ERP had already."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"RestConfirmationSender({self.entry.name!r})"

    async def send(self, confirmation: Confirmation) -> Delivered:
        entry = self.entry
        assert entry.confirm_path is not None
        secret = read_secret(entry.name, entry.secret)
        if self._client is None:
            self._client = outbound_client(entry.allowlist(), entry.timeout_s)
        try:
            response = await self._client.post(
                join_url(entry.url, entry.confirm_path),
                json=confirmation_json(confirmation),
                headers={
                    "Accept": "application/json",
                    "Idempotency-Key": confirmation.key,
                    **confirmation.checkpoint_header(),
                    **authorization(entry, secret),
                },
            )
        except (httpx.HTTPError, OutboundRefused) as exc:
            reason = transport_failure(entry.name, exc, entry.timeout_s)
            raise DeliveryFailed(reason, permanent=False) from None
        excerpt = scrubbed(response.text, secret)
        if response.is_success:
            replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
            return Delivered(response.status_code, excerpt, duplicate=replayed)
        if response.status_code == 409:
            if (
                response.headers.get("idempotency-key") == confirmation.key
                or confirmation.key in response.text
            ):
                return Delivered(409, excerpt, duplicate=True)
            raise http_failure(
                entry.name, response, secret, "a conflict that is not about this Idempotency-Key"
            )
        raise http_failure(entry.name, response, secret)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


__all__ = [
    "Entry",
    "FieldMapping",
    "OrderBook",
    "OrdersUnavailable",
    "RecordMapper",
    "RestConfirmationSender",
    "RestOrderSource",
    "confirmation_json",
    "confirmation_sender",
    "order_source",
]
