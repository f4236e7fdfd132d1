"""Odoo (17, 18 and 19, Community) manufacturing: orders in from ``mrp.production``, production
confirmations out onto it. Names as in Odoo 18's ``addons/mrp/models/mrp_production.py`` and
``mrp_workorder.py`` (docs/erp.md, section Odoo, says which line of which file).

```toml
[[erp]]
name = "odoo-main"
dialect = "odoo"
url = "https://odoo.plant1.example"
api = "json2"                         # Odoo 19: POST /json/2/<model>/<method>, bearer API key
                                      # "jsonrpc": Odoo 17/18, /jsonrpc execute_kw (needs user)
database = "plant1"                   # X-Odoo-Database (json2, optional); the db (jsonrpc)
user = "mes-hub"                      # jsonrpc: the login the API key belongs to
secret = { env = "ODOO_API_KEY" }
machines = { "CNC Mill 1" = "CNC-1" } # work center name -> machine id (orders in)
state_dir = "/var/lib/mes-hub/erp"    # where the orders' last published form is kept
```

Orders in: ``mrp.production`` records in state confirmed, progress or to_close, read by
``write_date`` (UTC) with a look-back window (``lookback_s``: a transaction that started before
the last read but committed after it still has an older ``write_date``). Order id: the MO's
``name`` as a token (``WH/MO/00012`` → ``WH-MO-00012``).

Confirmations out: the good quantity goes to ``mrp.production.qty_producing`` (cumulative, then
``set_qty_producing`` updates the components), the final one ``button_mark_done``; each is first
written as an internal note in the MO's chatter (``message_post``) that carries the idempotency
key and the quantity it sets, so a retry after a lost answer sets the same quantity again
instead of adding twice. The note ends with the hub's audit checkpoint when the confirmation was
decided (``; audit checkpoint <origin> <size> <base64 root>``): the MO's chatter keeps it, and
``mail.message.body`` (Html) takes any length.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, ValidationError, model_validator

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
from adapters.erp.base import Confirmation, ErpEntryBase, SecretRef
from contracts import CloudEvent, OrderReleasedV1, Token
from hub.outbound import outbound_client
from hub.outbox import Delivered, DeliveryFailed

log = logging.getLogger(__name__)

PRODUCTION = "mrp.production"
WORKORDER = "mrp.workorder"
OPEN_STATES = ("confirmed", "progress", "to_close")
PRODUCTION_FIELDS = [
    "name",
    "state",
    "product_id",
    "product_qty",
    "date_deadline",
    "date_start",
    "date_finished",
    "origin",
    "write_date",
]
NOTE = "mes-hub confirmation"
_NOTE = re.compile(
    re.escape(NOTE) + r" (\S+): sequence (\d+), good ([+-]?\d+), scrap (-?\d+), "
    r"qty_producing (-?[0-9.eE+-]+)"
)
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
# What Odoo raises for a call that cannot succeed as sent (whatever the HTTP status says: an
# unknown field is a ValueError, a 500): the same call again gets the same answer.
_REFUSALS = {
    "builtins.ValueError",
    "builtins.TypeError",
    "builtins.KeyError",
    "builtins.AttributeError",
    "odoo.exceptions.UserError",
    "odoo.exceptions.ValidationError",
    "odoo.exceptions.MissingError",
    "odoo.exceptions.RedirectWarning",
    "werkzeug.exceptions.NotFound",
    "werkzeug.exceptions.BadRequest",
    "werkzeug.exceptions.UnprocessableEntity",
}
_LOGIN = {
    "odoo.exceptions.AccessDenied",
    "werkzeug.exceptions.Unauthorized",
    "odoo.http.SessionExpiredException",
}
# JSON-RPC answers every error with HTTP 200; the JSON-2 status of the same exception.
_STATUS_OF = {
    "odoo.exceptions.AccessDenied": 401,
    "odoo.http.SessionExpiredException": 401,
    "odoo.exceptions.AccessError": 403,
    "odoo.exceptions.MissingError": 404,
    "odoo.exceptions.UserError": 422,
    "odoo.exceptions.ValidationError": 422,
}


class Entry(ErpEntryBase):
    """An ``[[erp]]`` entry for Odoo."""

    dialect: Literal["odoo"]
    secret: SecretRef = Field(description="The user's Odoo API key")
    api: Literal["json2", "jsonrpc"] = Field(
        default="json2", description="json2: Odoo 19 /json/2; jsonrpc: Odoo 17/18 /jsonrpc"
    )
    database: str | None = Field(default=None, min_length=1, max_length=128)
    machines: dict[str, Token] = Field(
        default_factory=dict, description="Work center name -> machine id"
    )
    state_dir: Path | None = None
    lookback_s: float = Field(default=300.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _jsonrpc_needs_login(self) -> Entry:
        if self.api == "jsonrpc" and (self.database is None or self.user is None):
            raise ValueError('api = "jsonrpc" needs database and user (the login of the key)')
        return self


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> OdooOrders | None:
    """Orders in, or None when ``poll_interval_s`` is 0. ``state_dir`` (else the entry's)."""
    assert isinstance(entry, Entry)
    if entry.poll_interval_s == 0:
        return None
    return OdooOrders(entry, OrderBook(state_file(state_dir or entry.state_dir, entry.name)))


def confirmation_sender(entry: ErpEntryBase) -> OdooConfirmations | None:
    assert isinstance(entry, Entry)
    return OdooConfirmations(entry) if entry.confirm else None


# --- the wire ------------------------------------------------------------------------------


class OdooFault(Exception):
    """Odoo answered with an error: the exception's name and message (never a secret)."""

    def __init__(self, status: int | None, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.status, self.name, self.message = status, name, message


class Rpc:
    """Calls one Odoo model method, over JSON-2 (``POST /json/2/<model>/<method>``, named
    parameters, ``ids``) or JSON-RPC (``execute_kw`` with ``[ids]`` and the same as keywords)."""

    def __init__(self, entry: Entry, client: httpx.AsyncClient) -> None:
        self.entry, self.client = entry, client
        self.base = entry.url.rstrip("/")
        self._uid: int | None = None
        self._ids = itertools.count(1)

    async def call(self, model: str, method: str, ids: list[int] | None = None, **kw: Any) -> Any:
        if self.entry.api == "json2":
            return await self._json2(model, method, ids, kw)
        args: list[Any] = [] if ids is None else [ids]
        uid = await self._login()
        return await self._jsonrpc(
            "object", "execute_kw", [self.entry.database, uid, self._key(), model, method, args, kw]
        )

    def _key(self) -> str:
        try:
            return self.entry.secret.read().get_secret_value()
        except ValueError as exc:  # where it was looked for, never the value
            raise OdooFault(None, "mes-hub.SecretUnavailable", str(exc)) from None

    async def _json2(
        self, model: str, method: str, ids: list[int] | None, kw: dict[str, Any]
    ) -> Any:
        headers = {"Authorization": f"bearer {self._key()}", "User-Agent": "mes-hub"}
        if self.entry.database:
            headers["X-Odoo-Database"] = self.entry.database
        body = kw if ids is None else {"ids": ids, **kw}
        answer = await self.client.post(
            f"{self.base}/json/2/{model}/{method}", json=body, headers=headers
        )
        if answer.status_code == 200:
            return _json(answer)
        try:
            error = answer.json()
        except ValueError:
            error = None
        if isinstance(error, dict):
            name, message = str(error.get("name", "")), str(error.get("message", ""))
        else:
            name, message = "", answer.text[:2000]
        raise OdooFault(answer.status_code, name or f"HTTP {answer.status_code}", message)

    async def _login(self) -> int:
        if self._uid is None:
            assert self.entry.database is not None and self.entry.user is not None
            uid = await self._jsonrpc(
                "common", "authenticate", [self.entry.database, self.entry.user, self._key(), {}]
            )
            if not isinstance(uid, int) or isinstance(uid, bool):
                raise OdooFault(401, "odoo.exceptions.AccessDenied", "Access Denied")
            self._uid = uid
        return self._uid

    async def _jsonrpc(self, service: str, method: str, args: list[Any]) -> Any:
        request = {
            "jsonrpc": "2.0",
            "method": "call",
            "params": {"service": service, "method": method, "args": args},
            "id": next(self._ids),
        }
        answer = await self.client.post(f"{self.base}/jsonrpc", json=request)
        if answer.status_code != 200:
            raise OdooFault(answer.status_code, f"HTTP {answer.status_code}", answer.text)
        reply = _json(answer)
        error = reply.get("error") if isinstance(reply, dict) else None
        if error is None:
            return reply.get("result") if isinstance(reply, dict) else None
        data = error.get("data") or {}
        name = str(data.get("name") or error.get("message") or "Odoo Server Error")
        message = str(data.get("message") or error.get("message") or "")
        if error.get("code") == 100:  # Odoo's "Session Expired"
            name = "odoo.http.SessionExpiredException"
        if name in _LOGIN:
            self._uid = None
        raise OdooFault(_STATUS_OF.get(name, 500), name, message)


def _json(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:  # a proxy's page, say: worth another try later
        raise OdooFault(None, "mes-hub.NotJson", answer.text[:300]) from None


def delivery_failure(entry: Entry, what: str, fault: OdooFault) -> DeliveryFailed:
    """``fault`` as the outbox's outcome: a refused login or access is retried (someone fixes
    the key or the rights), a refused content is permanent, a server error is retried."""
    short = fault.name.rsplit(".", 1)[-1]
    first_line = fault.message.strip().splitlines()[0] if fault.message.strip() else ""
    answer = f"{fault.name}: {fault.message}"
    if fault.name in _LOGIN or fault.status == 401:
        reason = f"Odoo refused the API key of erp {entry.name!r} ({short}): check its secret"
        return failure(reason, fault.status, answer, permanent=False)
    if fault.name == "odoo.exceptions.AccessError" or fault.status == 403:
        reason = f"Odoo {what}: the API user may not do this ({short}: {first_line})"
        return failure(reason, fault.status, answer, permanent=False)
    permanent = fault.name in _REFUSALS or (fault.status is not None and 400 <= fault.status < 500)
    return failure(f"Odoo {what}: {short}: {first_line}", fault.status, answer, permanent=permanent)


def odoo_time(value: str) -> datetime:
    """An Odoo Datetime (``YYYY-MM-DD HH:MM:SS``, UTC without an offset) as an aware time."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def odoo_text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _many2one(value: Any) -> tuple[int, str] | None:
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]), str(value[1])
    return None


# --- orders in -----------------------------------------------------------------------------


class OdooOrders:
    """``mrp.production`` as ``mes.erp.order.*`` events (see the module)."""

    def __init__(self, entry: Entry, book: OrderBook) -> None:
        self.entry, self.book = entry, book
        self._events = OrderEvents(entry.name, PRODUCTION)

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        position = Cursor.parse(cursor)
        seen = await self.book.records_for(position)
        since = None
        if position is not None:
            since = odoo_time(position.stamp) - timedelta(seconds=self.entry.lookback_s)
        async with outbound_client(self.entry.allowlist(), self.entry.timeout_s) as client:
            rpc = Rpc(self.entry, client)
            try:
                records = await self._productions(rpc, since)
                products = await self._products(rpc, records)
                machines = await self._machines(rpc, records)
            except OdooFault as fault:
                reason = delivery_failure(self.entry, "orders", fault).reason
                raise ErpUnavailable(reason) from None
            except TRANSPORT_ERRORS as exc:
                raise ErpUnavailable(describe_transport("Odoo", self.entry.url, exc)) from None
        before = dict(seen)
        snapshots = [
            self._snapshot(r, products, machines)
            for r in records
            if unseen(seen, str(r["id"]), odoo_time(r["write_date"]))
        ]
        events = self._events.events(snapshots, seen, first_read=position is None)
        if not records or (not events and seen == before):
            return events, cursor
        last = records[-1]
        newest = last["write_date"], str(last["id"])
        if position is not None and odoo_time(position.stamp) > odoo_time(newest[0]):
            newest = position.stamp, position.key
        batch = 1 if position is None else position.batch + 1
        moved = Cursor(newest[0], newest[1], batch)
        forget_closed(seen, odoo_time(moved.stamp) - timedelta(seconds=self.entry.lookback_s))
        await self.book.keep(moved, seen)
        return events, moved.text()

    async def _productions(self, rpc: Rpc, since: datetime | None) -> list[dict[str, Any]]:
        # The first read takes the open orders only; later ones also the closed and cancelled.
        states = list(OPEN_STATES) if since is None else [*OPEN_STATES, "done", "cancel"]
        domain: list[Any] = [["state", "in", states]]
        if since is not None:
            domain.append(["write_date", ">=", odoo_text(since)])
        found: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            rows = await rpc.call(
                PRODUCTION,
                "search_read",
                domain=domain,
                fields=PRODUCTION_FIELDS,
                order="write_date asc, id asc",
                offset=page * PAGE,
                limit=PAGE,
            )
            found.extend(rows)
            if len(rows) < PAGE:
                break
        return found

    async def _products(self, rpc: Rpc, records: list[dict[str, Any]]) -> dict[int, str]:
        ids = sorted({p[0] for r in records if (p := _many2one(r.get("product_id")))})
        if not ids:
            return {}
        rows = await rpc.call(
            "product.product",
            "search_read",
            domain=[["id", "in", ids]],
            fields=["default_code", "name"],
            context={"active_test": False},
        )
        return {int(r["id"]): str(r.get("default_code") or r.get("name") or "") for r in rows}

    async def _machines(self, rpc: Rpc, records: list[dict[str, Any]]) -> dict[int, str]:
        """Production id -> machine id: the first work order (by sequence) whose work center
        ``machines`` names."""
        if not self.entry.machines or not records:
            return {}
        rows = await rpc.call(
            WORKORDER,
            "search_read",
            domain=[["production_id", "in", [r["id"] for r in records]]],
            fields=["production_id", "workcenter_id", "sequence"],
            order="sequence asc, id asc",
        )
        found: dict[int, str] = {}
        for row in rows:
            production, center = _many2one(row["production_id"]), _many2one(row["workcenter_id"])
            if production is None or center is None or production[0] in found:
                continue
            if center[1] in self.entry.machines:
                found[production[0]] = self.entry.machines[center[1]]
        return found

    def _snapshot(
        self, record: dict[str, Any], products: dict[int, str], machines: dict[int, str]
    ) -> Snapshot:
        name, state, stamp = str(record["name"]), record["state"], str(record["write_date"])
        key, at, order_id = str(record["id"]), odoo_time(stamp), order_token(name)
        if state == "cancel":
            reason = f"cancelled in Odoo ({PRODUCTION} {name})"
            return Snapshot(key, stamp, at, order_id, "cancelled", None, reason)
        if state not in OPEN_STATES:
            return Snapshot(key, stamp, at, order_id, "closed", None)
        order = self._order(record, products, machines)
        return Snapshot(key, stamp, at, order_id, "open", order)

    def _order(
        self, record: dict[str, Any], products: dict[int, str], machines: dict[int, str]
    ) -> dict[str, Any] | None:
        name, quantity = record["name"], record["product_qty"]
        product = _many2one(record.get("product_id"))
        part = products.get(product[0]) if product else None
        if not isinstance(quantity, int | float) or not float(quantity).is_integer():
            log.warning(
                "Odoo %s %s skipped: product_qty %r is not a whole number of parts",
                PRODUCTION,
                name,
                quantity,
            )
            return None
        due = record.get("date_deadline") or record.get("date_finished") or record["date_start"]
        data = {
            "order_id": order_token(name),
            "part_number": part or (product[1] if product else None),
            "quantity": int(quantity),
            "due": odoo_time(due),
            "customer": (record.get("origin") or None) and str(record["origin"])[:256],
            "machine_id": machines.get(int(record["id"])),
        }
        try:
            order = OrderReleasedV1.model_validate(data)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in problem["loc"])
            log.warning("Odoo %s %s skipped: %s: %s", PRODUCTION, name, where, problem["msg"])
            return None
        return order.model_dump(mode="json", exclude_none=True)


# --- confirmations out ---------------------------------------------------------------------


def note_key(key: str) -> str:
    """The key as written in the note: itself if it survives Odoo's HTML escaping and ``ilike``
    search unchanged, else its SHA-256."""
    if _SAFE_KEY.match(key):
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()


class OdooConfirmations:
    """Confirmations onto ``mrp.production`` (see the module and docs/erp.md)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: httpx.AsyncClient | None = None
        self._rpc: Rpc | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client, self._rpc = None, None

    def _connection(self) -> Rpc:
        if self._rpc is None:
            self._client = outbound_client(self.entry.allowlist(), self.entry.timeout_s)
            self._rpc = Rpc(self.entry, self._client)
        return self._rpc

    async def send(self, confirmation: Confirmation) -> Delivered:
        step = "reading the order"
        try:
            rpc = self._connection()
            production = await self._production(rpc, confirmation.order_id)
            step = f"confirming {production['name']}"
            return await self._confirm(rpc, production, confirmation)
        except OdooFault as fault:
            raise delivery_failure(self.entry, step, fault) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_failure("Odoo", self.entry.url, exc) from None

    async def _production(self, rpc: Rpc, order_id: str) -> dict[str, Any]:
        rows = await rpc.call(
            PRODUCTION,
            "search_read",
            domain=[["name", "=like", like_pattern(order_id)]],
            fields=["name", "state", "qty_producing", "product_qty"],
        )
        exact = [r for r in rows if order_token(str(r["name"])) == order_id]
        if len(exact) != 1:
            what = "no manufacturing order" if not exact else f"{len(exact)} manufacturing orders"
            raise DeliveryFailed(
                f"Odoo has {what} named like {order_id} ({PRODUCTION})",
                status=200,
                excerpt=", ".join(str(r["name"]) for r in exact),
                permanent=True,
            )
        return dict(exact[0])

    async def _confirm(self, rpc: Rpc, production: dict[str, Any], c: Confirmation) -> Delivered:
        pid, name, state = int(production["id"]), production["name"], production["state"]
        key = note_key(c.key)
        notes = await rpc.call(
            "mail.message",
            "search_read",
            domain=[["model", "=", PRODUCTION], ["res_id", "=", pid], ["body", "ilike", NOTE]],
            fields=["body"],
            order="id asc",
        )
        parsed = [(int(n["id"]), m) for n in notes if (m := _NOTE.search(str(n["body"])))]
        mine = next(((i, m) for i, m in parsed if m.group(1) == key), None)
        if mine is not None:
            target = float(mine[1].group(5))
            if any(i > mine[0] for i, _ in parsed):  # a later confirmation set its own total
                return Delivered(200, f"{name}: {key} was recorded before", duplicate=True)
        else:
            if state == "cancel":
                raise DeliveryFailed(
                    f"Odoo {PRODUCTION} {name} is cancelled: nothing is recorded on it",
                    status=200,
                    excerpt=f"{name}: state cancel",
                    permanent=True,
                )
            target = round(float(production["qty_producing"]) + c.yield_quantity, 6)
            if target < 0:
                raise DeliveryFailed(
                    f"Odoo {PRODUCTION} {name}: the correction would take qty_producing "
                    f"below zero ({production['qty_producing']} {c.yield_quantity:+d})",
                    status=200,
                    permanent=True,
                )
            await rpc.call(
                PRODUCTION,
                "message_post",
                [pid],
                body=_note(key, c, target),
                message_type="comment",
                subtype_xmlid="mail.mt_note",
            )
        if state != "cancel" and not math.isclose(float(production["qty_producing"]), target):
            await rpc.call(PRODUCTION, "write", [pid], vals={"qty_producing": target})
            if state != "done":
                await rpc.call(PRODUCTION, "set_qty_producing", [pid])
        if c.final and state not in ("done", "cancel"):
            await self._mark_done(rpc, pid, name)
        done = ", marked done" if c.final else ""
        return Delivered(200, f"{name}: qty_producing {target:g}{done}", duplicate=mine is not None)

    async def _mark_done(self, rpc: Rpc, pid: int, name: str) -> None:
        # skip_backorder: the hub says the order is finished, so no backorder for what is
        # missing (mrp_production.py _get_quantity_produced_issues); skip_redirection: answer
        # True, not the form to show next. A consumption or serial-number question remains.
        answer = await rpc.call(
            PRODUCTION,
            "button_mark_done",
            [pid],
            context={"skip_backorder": True, "skip_redirection": True},
        )
        if answer is True or (isinstance(answer, dict) and answer.get("tag") == "do_multi_print"):
            return
        wizard = answer.get("res_model") if isinstance(answer, dict) else None
        raise DeliveryFailed(
            f"Odoo {PRODUCTION} {name}: the quantity is recorded but Odoo asks a person to "
            f"finish it ({wizard or 'an action'}): mark it done in Odoo",
            status=200,
            excerpt=str(answer),
            permanent=True,
        )


def _note(key: str, c: Confirmation, target: float) -> str:
    text = (
        f"{NOTE} {key}: sequence {c.sequence}, good {c.yield_quantity:+d}, "
        f"scrap {c.scrap_quantity}, qty_producing {target!r}"
    )
    if c.final:
        text += ", final"
    if c.correction_of is not None:
        text += f", correction of {c.correction_of}"
    details = [
        f"machine {c.machine_id}" if c.machine_id else "",
        f"operation {c.operation}" if c.operation else "",
        f"from {c.start.isoformat()}" if c.start else "",
        f"to {c.end.isoformat()}" if c.end else "",
    ]
    if any(details):
        text += "; " + ", ".join(d for d in details if d)
    if c.checkpoint is not None:  # (last: the parts before it are what ``_NOTE`` reads back)
        text += f"; audit checkpoint {c.checkpoint}"
    return text


__all__ = [
    "Entry",
    "OdooConfirmations",
    "OdooFault",
    "OdooOrders",
    "Rpc",
    "confirmation_sender",
    "delivery_failure",
    "order_source",
]
