"""ERPNext (v14/v15, Frappe REST API v1) manufacturing: orders in from ``Work Order``,
production confirmations out as submitted ``Stock Entry`` documents of purpose Manufacture.
Field names and types as in ERPNext's DocType definitions (``work_order.json``,
``stock_entry.json``, ``stock_entry_detail.json``; docs/erp.md, section ERPNext).

```toml
[[erp]]
name = "erpnext"
dialect = "erpnext"
url = "https://erp.plant1.example"
user = "0a1b2c3d4e5f6a7"                   # the API user's API Key
secret = { env = "ERPNEXT_API_SECRET" }     # its API Secret: Authorization: token key:secret
timezone = "Europe/Berlin"                  # System Settings > Time Zone (Frappe's datetimes)
key_field = "mes_hub_key"                   # Custom Field on Stock Entry: Data, Unique
state_dir = "/var/lib/mes-hub/erp"
```

Orders in: submitted Work Orders (``docstatus`` 1) read by ``modified`` with a look-back window;
a cancelled one (``docstatus`` 2, status Cancelled) is an order cancelled; Completed, Stopped and
Closed ones are no longer followed. The order id is the Work Order's ``name`` as a token
(``MFG-WO-2026-00012`` stays as it is).

Confirmations out: ``make_stock_entry`` (ERPNext's own, as the Work Order's Finish button) for
the good plus the scrapped quantity, the finished item's row set to the good quantity (the rest
is the entry's ``process_loss_qty``), submitted in one insert with the idempotency key in a
unique Custom Field; a repeated key is found before the insert, or refused by the database's
unique index (``UniqueValidationError``) and counted as delivered. The entry's ``remarks``
(Stock Entry's Text field "Remarks", no length limit) says what it confirms and ends with the
hub's audit checkpoint when the confirmation was decided (``audit checkpoint <origin> <size>
<base64 root>``).

Corrections that take parts back: a Manufacture entry cannot be negative, so the Work Order's
submitted entries that the hub posted (their key is one of the keys the order's earlier
confirmations went with) are cancelled (``frappe.client.cancel``, which lowers the Work Order's
``produced_qty``), then one entry with the hub's totals for the order is submitted in their place,
with the correction's key. Nothing is saved before the cancels: ERPNext checks every save of a
Manufacture entry, a draft's too, against the order's other entries that are not cancelled
(``check_duplicate_entry_for_work_order``, ``check_if_operations_completed``). A retry after any
step finishes the same correction: what is cancelled stays so, and the totals come with the
message (docs/erp/odoo-erpnext.md, section ERPNext).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
from pydantic import Field, ValidationError

from adapters.erp._http import (
    MAX_PAGES,
    PAGE,
    TRANSPORT_ERRORS,
    Cursor,
    ErpUnavailable,
    OrderBook,
    OrderEvents,
    Snapshot,
    describe_transport,
    failure,
    forget_closed,
    like_pattern,
    order_token,
    state_file,
    transport_failure,
    unseen,
)
from adapters.erp.base import Confirmation, ErpEntryBase, SecretRef, ZoneName
from contracts import CloudEvent, OrderReleasedV1
from hub.outbound import outbound_client
from hub.outbox import Delivered, DeliveryFailed

log = logging.getLogger(__name__)

WORK_ORDER, STOCK_ENTRY = "Work Order", "Stock Entry"
MAKE_STOCK_ENTRY = "erpnext.manufacturing.doctype.work_order.work_order.make_stock_entry"
CANCEL = "frappe.client.cancel"
# What a Manufacture entry made: ERPNext keeps fg_completed_qty = the finished row's qty + the
# process loss (StockEntry.validate_fg_completed_qty) and sums produced_qty the same way.
TOTALS = ["fg_completed_qty", "process_loss_qty"]
ORDER_FIELDS = [
    "name",
    "modified",
    "docstatus",
    "status",
    "production_item",
    "qty",
    "expected_delivery_date",
    "planned_start_date",
    "planned_end_date",
]
NOT_FOLLOWED = ("Completed", "Stopped", "Closed")
NOTE = "mes-hub confirmation"
# Frappe exceptions (frappe/exceptions.py) that the same request may pass later.
_PASSING = {"TimestampMismatchError", "QueryDeadlockError", "QueryTimeoutError"}
_DUPLICATE = {"DuplicateEntryError", "UniqueValidationError"}


class Entry(ErpEntryBase):
    """An ``[[erp]]`` entry for ERPNext."""

    dialect: Literal["erpnext"]
    user: str = Field(min_length=1, max_length=256, description="The API user's API Key")
    secret: SecretRef = Field(description="The API user's API Secret")
    timezone: ZoneName = Field(default="UTC", description="ERPNext's System Settings time zone")
    key_field: str = Field(
        default="mes_hub_key",
        pattern=r"^[a-z][a-z0-9_]{0,61}$",
        description="A unique Data Custom Field on Stock Entry that keeps the idempotency key",
    )
    stock_entry_type: str = Field(default="Manufacture", min_length=1, max_length=140)
    state_dir: Path | None = None
    lookback_s: float = Field(default=300.0, ge=0, le=86_400)

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> ErpnextOrders | None:
    """Orders in, or None when ``poll_interval_s`` is 0. ``state_dir`` (else the entry's)."""
    assert isinstance(entry, Entry)
    if entry.poll_interval_s == 0:
        return None
    return ErpnextOrders(entry, OrderBook(state_file(state_dir or entry.state_dir, entry.name)))


def confirmation_sender(entry: ErpEntryBase) -> ErpnextConfirmations | None:
    assert isinstance(entry, Entry)
    return ErpnextConfirmations(entry) if entry.confirm else None


# --- the wire ------------------------------------------------------------------------------


class FrappeFault(Exception):
    """Frappe answered with an error: its status, exception type and message."""

    def __init__(self, status: int | None, exc_type: str, message: str) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.status, self.exc_type, self.message = status, exc_type, message


class Frappe:
    """The REST API v1: ``/api/resource/<DocType>`` and ``/api/method/<dotted.path>``."""

    def __init__(self, entry: Entry, client: httpx.AsyncClient) -> None:
        self.entry, self.client = entry, client
        self.base = entry.url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        try:
            secret = self.entry.secret.read().get_secret_value()
        except ValueError as exc:  # where it was looked for, never the value
            raise FrappeFault(None, "SecretUnavailable", str(exc)) from None
        return {"Authorization": f"token {self.entry.user}:{secret}", "Accept": "application/json"}

    async def list(
        self,
        doctype: str,
        fields: list[str],
        filters: list[list[Any]],
        order_by: str = "modified asc, name asc",
        start: int = 0,
        limit: int = PAGE,
    ) -> list[dict[str, Any]]:
        params = {
            "fields": json.dumps(fields),
            "filters": json.dumps(filters),
            "order_by": order_by,
            "limit_start": str(start),
            "limit_page_length": str(limit),
        }
        answer = await self.client.get(
            f"{self.base}/api/resource/{quote(doctype)}", params=params, headers=self._headers()
        )
        data = _checked(answer).get("data")
        return list(data) if isinstance(data, list) else []

    async def insert(self, doctype: str, doc: dict[str, Any]) -> dict[str, Any]:
        answer = await self.client.post(
            f"{self.base}/api/resource/{quote(doctype)}", json=doc, headers=self._headers()
        )
        data = _checked(answer).get("data")
        return dict(data) if isinstance(data, dict) else {}

    async def save(self, doctype: str, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """``PUT`` a document's changes: Frappe's ``doc.update`` and ``doc.save`` (a draft put to
        ``docstatus`` 1 is submitted)."""
        answer = await self.client.put(
            f"{self.base}/api/resource/{quote(doctype)}/{quote(name, safe='')}",
            json=changes,
            headers=self._headers(),
        )
        data = _checked(answer).get("data")
        return dict(data) if isinstance(data, dict) else {}

    async def method(self, path: str, **args: Any) -> Any:
        answer = await self.client.post(
            f"{self.base}/api/method/{path}", json=args, headers=self._headers()
        )
        return _checked(answer).get("message")


def _checked(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if 200 <= answer.status_code < 300 and isinstance(body, dict):
        return body
    if not isinstance(body, dict):  # a proxy's page, say: worth another try later
        status = None if 200 <= answer.status_code < 300 else answer.status_code
        raise FrappeFault(status, f"HTTP {answer.status_code}", answer.text[:2000])
    exc_type = str(body.get("exc_type") or f"HTTP {answer.status_code}")
    return _raise(answer.status_code, exc_type, body)


def _raise(status: int, exc_type: str, body: dict[str, Any]) -> dict[str, Any]:
    messages: list[str] = []
    raw = body.get("_server_messages")
    if isinstance(raw, str):
        try:
            for item in json.loads(raw):
                message = json.loads(item) if isinstance(item, str) else item
                text = message.get("message") if isinstance(message, dict) else message
                messages.append(re.sub(r"<[^>]+>", "", str(text)))
        except (ValueError, TypeError):
            messages.append(raw)
    exception = str(body.get("exception") or body.get("message") or "")
    raise FrappeFault(status, exc_type, "; ".join(messages) or exception)


def delivery_failure(entry: Entry, what: str, fault: FrappeFault) -> DeliveryFailed:
    answer = f"{fault.exc_type}: {fault.message}"
    first = fault.message.strip().splitlines()[0] if fault.message.strip() else ""
    if fault.status == 401 or fault.exc_type == "AuthenticationError":
        reason = (
            f"ERPNext refused the API key of erp {entry.name!r} ({fault.exc_type}): check its "
            "user (API Key) and secret (API Secret)"
        )
        return failure(reason, fault.status, answer, permanent=False)
    if fault.status == 403:
        reason = f"ERPNext {what}: the API user may not do this ({fault.exc_type}: {first})"
        return failure(reason, fault.status, answer, permanent=False)
    permanent = None if fault.exc_type not in _PASSING else False
    return failure(
        f"ERPNext {what}: {fault.exc_type}: {first}", fault.status, answer, permanent=permanent
    )


def frappe_time(value: str, zone: ZoneInfo) -> datetime:
    """A Frappe Datetime (``YYYY-MM-DD HH:MM:SS[.ffffff]``, in the site's time zone)."""
    return datetime.fromisoformat(value).replace(tzinfo=zone)


def frappe_text(value: datetime, zone: ZoneInfo) -> str:
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S.%f")


# --- orders in -----------------------------------------------------------------------------


class ErpnextOrders:
    """``Work Order`` as ``mes.erp.order.*`` events (see the module)."""

    def __init__(self, entry: Entry, book: OrderBook) -> None:
        self.entry, self.book = entry, book
        self._events = OrderEvents(entry.name, WORK_ORDER)

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        zone, position = self.entry.zone(), Cursor.parse(cursor)
        seen = await self.book.records_for(position)
        lookback = timedelta(seconds=self.entry.lookback_s)
        if position is None:  # the first read: the open orders only
            filters: list[list[Any]] = [
                ["docstatus", "=", 1],
                ["status", "not in", [*NOT_FOLLOWED, "Cancelled"]],
            ]
        else:
            since = frappe_time(position.stamp, zone) - lookback
            filters = [["docstatus", "in", [1, 2]], ["modified", ">=", frappe_text(since, zone)]]
        async with outbound_client(self.entry.allowlist(), self.entry.timeout_s) as client:
            api = Frappe(self.entry, client)
            records: list[dict[str, Any]] = []
            try:
                for page in range(MAX_PAGES):
                    rows = await api.list(WORK_ORDER, ORDER_FIELDS, filters, start=page * PAGE)
                    records.extend(rows)
                    if len(rows) < PAGE:
                        break
            except FrappeFault as fault:
                raise ErpUnavailable(delivery_failure(self.entry, "orders", fault).reason) from None
            except TRANSPORT_ERRORS as exc:
                raise ErpUnavailable(describe_transport("ERPNext", self.entry.url, exc)) from None
        before = dict(seen)
        snapshots = [
            self._snapshot(r, zone)
            for r in records
            if unseen(seen, str(r["name"]), frappe_time(str(r["modified"]), zone))
        ]
        events = self._events.events(snapshots, seen, first_read=position is None)
        if not records or (not events and seen == before):
            return events, cursor
        newest = str(records[-1]["modified"]), str(records[-1]["name"])
        if position is not None and frappe_time(position.stamp, zone) > frappe_time(
            newest[0], zone
        ):
            newest = position.stamp, position.key
        moved = Cursor(newest[0], newest[1], 1 if position is None else position.batch + 1)
        forget_closed(seen, frappe_time(moved.stamp, zone) - lookback)
        await self.book.keep(moved, seen)
        return events, moved.text()

    def _snapshot(self, record: dict[str, Any], zone: ZoneInfo) -> Snapshot:
        name, stamp = str(record["name"]), str(record["modified"])
        at, order_id = frappe_time(stamp, zone).astimezone(UTC), order_token(name)
        if record.get("docstatus") == 2 or record.get("status") == "Cancelled":
            reason = f"cancelled in ERPNext ({WORK_ORDER} {name})"
            return Snapshot(name, stamp, at, order_id, "cancelled", None, reason)
        if record.get("status") in NOT_FOLLOWED:
            return Snapshot(name, stamp, at, order_id, "closed", None)
        return Snapshot(name, stamp, at, order_id, "open", self._order(record, zone))

    def _order(self, record: dict[str, Any], zone: ZoneInfo) -> dict[str, Any] | None:
        name, quantity = record["name"], record.get("qty")
        if not isinstance(quantity, int | float) or not float(quantity).is_integer():
            log.warning(
                "ERPNext %s %s skipped: qty %r is not a whole number of parts",
                WORK_ORDER,
                name,
                quantity,
            )
            return None
        due: datetime | None = None
        if record.get("expected_delivery_date"):
            # A date: due by the end of that day, in the site's time zone.
            day = date.fromisoformat(str(record["expected_delivery_date"]))
            due = datetime.combine(day, time(23, 59, 59), zone)
        else:
            planned = record.get("planned_end_date") or record.get("planned_start_date")
            due = frappe_time(str(planned), zone) if planned else None
        data = {
            "order_id": order_token(str(name)),
            "part_number": record.get("production_item"),
            "quantity": int(quantity),
            "due": None if due is None else due.astimezone(UTC),
        }
        try:
            order = OrderReleasedV1.model_validate(data)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in problem["loc"])
            log.warning("ERPNext %s %s skipped: %s: %s", WORK_ORDER, name, where, problem["msg"])
            return None
        return order.model_dump(mode="json", exclude_none=True)


# --- confirmations out ---------------------------------------------------------------------


def entry_key(key: str) -> str:
    """The key as kept in the Data field (140 characters at most)."""
    return key if len(key) <= 140 else "sha256-" + hashlib.sha256(key.encode()).hexdigest()


class ErpnextConfirmations:
    """Confirmations as Manufacture Stock Entries (see the module and docs/erp.md)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: httpx.AsyncClient | None = None
        self._api: Frappe | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client, self._api = None, None

    def _connection(self) -> Frappe:
        if self._api is None:
            self._client = outbound_client(self.entry.allowlist(), self.entry.timeout_s)
            self._api = Frappe(self.entry, self._client)
        return self._api

    async def send(self, confirmation: Confirmation) -> Delivered:
        step = f"confirming {confirmation.order_id}"
        try:
            return await self._send(self._connection(), confirmation)
        except FrappeFault as fault:
            raise delivery_failure(self.entry, step, fault) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_failure("ERPNext", self.entry.url, exc) from None

    async def _send(self, api: Frappe, c: Confirmation) -> Delivered:
        key, field = entry_key(c.key), self.entry.key_field
        had = await api.list(
            STOCK_ENTRY, ["name", "docstatus", *TOTALS], [[field, "=", key]], limit=1
        )
        takes_back = c.yield_quantity < 0 or c.scrap_quantity < 0
        # A draft with the key: a correction that a hub of an earlier version (which kept the
        # totals in a draft before cancelling) stopped between its steps; it is finished in it.
        draft = had[0] if had and takes_back and had[0].get("docstatus") == 0 else None
        if had and draft is None:
            return Delivered(200, f"{STOCK_ENTRY} {had[0]['name']} has {key}", duplicate=True)
        if takes_back:
            return await self._correct(api, c, key, draft)
        if c.yield_quantity == 0:
            return Delivered(
                None, f"nothing posted: no good parts ({c.scrap_quantity} scrap, kept in the hub)"
            )
        order = await self._work_order(api, c.order_id)
        doc = await self._entry(api, order, c, key, c.yield_quantity, c.scrap_quantity)
        try:
            made = await api.insert(STOCK_ENTRY, doc)
        except FrappeFault as fault:
            if (repeated := _repeated(fault)) is not None:
                return repeated
            raise
        return Delivered(
            200,
            f"{STOCK_ENTRY} {made.get('name')} submitted for {order}: good {c.yield_quantity}, "
            f"process loss {c.scrap_quantity}",
        )

    async def _correct(
        self, api: Frappe, c: Confirmation, key: str, draft: dict[str, Any] | None
    ) -> Delivered:
        """Takes parts back: cancels the Work Order's submitted entries that the hub posted, then
        submits one with the hub's totals in their place (cancelled first: ERPNext refuses
        another Manufacture entry, even a draft, beside entries that cover the order's
        quantity, and one that would make more than it). Every step can be repeated: an entry
        cancelled by an earlier attempt is cancelled (docstatus 2) and left as it is, and the
        totals come with the message, not from the entries."""
        order = await self._work_order(api, c.order_id)
        if not c.earlier_keys:
            raise DeliveryFailed(
                f"ERPNext correction of {order} not sent: the keys of the order's earlier "
                "confirmations are not known, so the hub's entries cannot be told from others'",
                permanent=True,
            )
        ours = await self._posted(api, order, {entry_key(k) for k in c.earlier_keys})
        submitted = [e for e in ours if e.get("docstatus") == 1]
        already = [str(e["name"]) for e in ours if e.get("docstatus") == 2]
        posted = sum(_made(e)[0] for e in submitted)
        if c.yield_total is not None and c.scrap_total is not None:
            good, scrap = float(c.yield_total), float(c.scrap_total)
            # The hub's submitted entries hold less than the good parts confirmed before this
            # correction: an earlier attempt of it (or a person) cancelled some already.
            short = posted < c.yield_total - c.yield_quantity
        elif draft is not None:  # the totals the earlier version kept in it
            good, scrap = _made(draft)
            short = bool(already)
        else:
            # Decided by a hub from before confirmations carried their totals: what the hub's
            # entries still submitted posted, plus this correction's difference. (A retry of
            # such a correction stopped after its cancels finds less submitted, and posts less.)
            good = max(0.0, posted + c.yield_quantity)
            scrap = max(0.0, sum(_made(e)[1] for e in submitted) + c.scrap_quantity)
            short = bool(already)
        cancelled: list[str] = []
        for entry in submitted:
            name = str(entry["name"])
            try:
                await api.method(CANCEL, doctype=STOCK_ENTRY, name=name)
            except FrappeFault as fault:
                what = f"cancelling {STOCK_ENTRY} {name} of {order}"
                gone = [*(already if short else []), *cancelled]
                raise self._refused(what, fault, gone) from None
            cancelled.append(name)
        if cancelled:
            done = f"cancelled for {order}: {', '.join(cancelled)}"
        else:
            done = f"nothing to cancel for {order}"
        if already:
            done += f"; already cancelled: {', '.join(already)}"
        if good <= 0:
            return Delivered(
                None,
                f"{done}; nothing posted: the corrected good total is 0, and ERPNext has no "
                f"Manufacture {STOCK_ENTRY} of 0 parts ({scrap:g} scrap, kept in the hub)",
            )
        # From here the ERP lacks what the hub's cancelled entries posted until the totals are
        # posted: a refusal is not final (someone may fix its cause; the retry posts them).
        gone = [*already, *cancelled]
        what = f"posting {order}'s corrected totals (good {good:g}, process loss {scrap:g})"
        try:
            # Built now that the old entries are cancelled: when ERPNext backflushes what was
            # transferred (not the BOM), it reckons the components with what they gave back.
            doc = await self._entry(api, order, c, key, good, scrap)
            if draft is None:
                made = await api.insert(STOCK_ENTRY, doc)
            else:
                made = await api.save(STOCK_ENTRY, str(draft["name"]), _changes(doc))
        except FrappeFault as fault:
            # A "duplicate" here is this message only if an entry with its key is in ERPNext
            # (another unique clash, with the hub's entries cancelled, would leave it short).
            if _repeated(fault) is not None:
                field = self.entry.key_field
                had = await api.list(STOCK_ENTRY, ["name"], [[field, "=", key]], limit=1)
                if had:
                    answer = f"{STOCK_ENTRY} {had[0]['name']} has {key}"
                    return Delivered(200, answer, duplicate=True)
            raise self._refused(what, fault, gone) from None
        except DeliveryFailed as failed:
            if not gone:
                raise
            raise DeliveryFailed(
                _after(failed.reason, gone), status=failed.status, excerpt=failed.excerpt
            ) from None
        return Delivered(
            200,
            f"{STOCK_ENTRY} {made.get('name')} submitted for {order} with the corrected totals, "
            f"good {good:g}, process loss {scrap:g}; {done}",
        )

    def _refused(self, what: str, fault: FrappeFault, gone: list[str]) -> DeliveryFailed:
        """ERPNext's refusal of a correction's step. ``gone``: the hub's entries already
        cancelled, which leave the ERP short of their parts until the totals are posted: then it
        is retried, whatever the refusal, and its reason names them."""
        failed = delivery_failure(self.entry, what, fault)
        if gone:
            failed.reason = _after(failed.reason, gone)
            failed.permanent = False
        return failed

    async def _posted(self, api: Frappe, order: str, keys: set[str]) -> list[dict[str, Any]]:
        """The order's submitted and cancelled Manufacture entries that the hub posted: their key
        is one of ``keys`` (in the field's form). Any other entry, with no key or another, is
        someone else's. The keys are matched here, not in the filter, whose URL they could make
        too long."""
        filters: list[list[Any]] = [
            ["work_order", "=", order],
            ["purpose", "=", "Manufacture"],
            ["docstatus", "in", [1, 2]],
            [self.entry.key_field, "is", "set"],
        ]
        fields = ["name", "docstatus", self.entry.key_field, *TOTALS]
        entries: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            rows = await api.list(
                STOCK_ENTRY, fields, filters, order_by="name asc", start=page * PAGE
            )
            entries.extend(r for r in rows if r.get(self.entry.key_field) in keys)
            if len(rows) < PAGE:
                return entries
        raise DeliveryFailed(
            f"ERPNext has more than {MAX_PAGES * PAGE} keyed entries for {order}: not corrected",
            permanent=True,
        )

    async def _entry(
        self,
        api: Frappe,
        order: str,
        c: Confirmation,
        key: str,
        good: float,
        scrap: float,
    ) -> dict[str, Any]:
        """A Manufacture entry of ``good`` parts and ``scrap`` process loss, as ERPNext's own
        ``make_stock_entry`` builds it for good + scrap."""
        built = await api.method(
            MAKE_STOCK_ENTRY, work_order_id=order, purpose="Manufacture", qty=good + scrap
        )
        return self._stock_entry(built, c, key, good, scrap)

    async def _work_order(self, api: Frappe, order_id: str) -> str:
        rows = await api.list(
            WORK_ORDER, ["name", "docstatus", "status"], [["name", "like", like_pattern(order_id)]]
        )
        exact = [r for r in rows if order_token(str(r["name"])) == order_id]
        if len(exact) != 1:
            what = "no Work Order" if not exact else f"{len(exact)} Work Orders"
            raise DeliveryFailed(f"ERPNext has {what} named like {order_id}", permanent=True)
        if exact[0].get("docstatus") == 2:
            raise DeliveryFailed(
                f"ERPNext {WORK_ORDER} {exact[0]['name']} is cancelled: nothing is posted",
                permanent=True,
            )
        return str(exact[0]["name"])

    def _stock_entry(
        self, built: Any, c: Confirmation, key: str, good: float, scrap: float
    ) -> dict[str, Any]:
        if not isinstance(built, dict) or not isinstance(built.get("items"), list):
            raise DeliveryFailed(f"ERPNext {MAKE_STOCK_ENTRY} answered no items", permanent=True)
        doc = {k: v for k, v in built.items() if not (k == "name" and not v)}
        finished = [row for row in doc["items"] if row.get("is_finished_item")]
        if not finished:
            raise DeliveryFailed(
                f"ERPNext's {STOCK_ENTRY} for {c.order_id} has no finished item row",
                permanent=True,
            )
        row = finished[0]
        row["qty"] = float(good)
        row["transfer_qty"] = float(good) * float(row.get("conversion_factor") or 1)
        when = (c.end or c.posted_at).astimezone(self.entry.zone())
        doc.update(
            {
                "stock_entry_type": doc.get("stock_entry_type") or self.entry.stock_entry_type,
                "process_loss_qty": float(scrap),
                "set_posting_time": 1,
                "posting_date": when.date().isoformat(),
                "posting_time": when.strftime("%H:%M:%S"),
                "remarks": _remarks(key, c, good, scrap),
                self.entry.key_field: key,
                "docstatus": 1,
            }
        )
        return doc


def _repeated(fault: FrappeFault) -> Delivered | None:
    """An insert refused for its key (a send of the same message raced this one past the
    pre-check): delivered, duplicate."""
    if fault.exc_type in _DUPLICATE and fault.status in (409, 417):
        answer = f"{fault.exc_type}: {fault.message}"
        return Delivered(fault.status, answer[:500], duplicate=True)
    return None


def _after(reason: str, gone: list[str]) -> str:
    """A reason, saying first what the correction already cancelled (the reason is cut at 300
    characters)."""
    head = f"ERPNext correction, already cancelled: {', '.join(gone)} (retried);"
    return " ".join(f"{head} {reason.removeprefix('ERPNext ')}".split())[:300]


def _made(entry: dict[str, Any]) -> tuple[float, float]:
    """Good parts and scrap of a Manufacture entry as the hub posts it (see ``TOTALS``)."""
    made, loss = (float(entry.get(f) or 0) for f in TOTALS)
    return made - loss, loss


def _changes(doc: dict[str, Any]) -> dict[str, Any]:
    """A built entry as changes to a draft (see ``_send``): never its name, nor Frappe's
    ``__islocal`` (with which ``save`` would insert a new document)."""
    return {k: v for k, v in doc.items() if k != "name" and not k.startswith("__")}


def _remarks(key: str, c: Confirmation, good: float, scrap: float) -> str:
    parts = [f"{NOTE} {key}: sequence {c.sequence}, good {c.yield_quantity}"]
    parts.append(f"scrap {c.scrap_quantity}")
    if c.final:
        parts.append("final")
    if c.correction_of is not None:
        parts.append(f"correction of {c.correction_of}")
    if (good, scrap) != (c.yield_quantity, c.scrap_quantity):
        parts.append(f"in place of the cancelled entries: good {good:g}, scrap {scrap:g}")
    if c.machine_id:
        parts.append(f"machine {c.machine_id}")
    if c.operation:
        parts.append(f"operation {c.operation}")
    if c.start and c.end:
        parts.append(f"{c.start.isoformat()} to {c.end.isoformat()}")
    if c.checkpoint is not None:
        parts.append(f"audit checkpoint {c.checkpoint}")
    return ", ".join(parts)


__all__ = [
    "Entry",
    "ErpnextConfirmations",
    "ErpnextOrders",
    "Frappe",
    "FrappeFault",
    "confirmation_sender",
    "delivery_failure",
    "order_source",
]
