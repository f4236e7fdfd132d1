"""An ERPNext stand-in: Frappe's REST API v1 (``/api/resource/<DocType>``, ``/api/method/...``,
``Authorization: token <api key>:<api secret>``) with Work Orders to read and Stock Entries to
insert, save (``PUT /api/resource/Stock Entry/<name>``: a draft put to ``docstatus`` 1 is
submitted) and cancel (``frappe.client.cancel``), every document checked against the DocType
definitions read at start from ``../shared/fixtures/erp/erpnext`` (field names, fieldtypes,
``reqd``, Select ``options``, ``non_negative``) plus the Custom Fields the test declares (the
``unique`` key field). Submitting or cancelling a Manufacture entry sets its Work Order's
``produced_qty``, ``process_loss_qty`` and status as ERPNext does, and a submit that would make
more than the Work Order's ``qty`` is refused (``StockOverProductionError``).

Every save of a Manufacture entry linked to a Work Order, a draft's too (an insert, a ``PUT`` of a
draft, its submit; not a cancel, which runs no ``validate``), runs ``StockEntry.validate`` →
``validate_work_order`` as ERPNext does (``erpnext/stock/doctype/stock_entry/stock_entry.py``):
``check_if_operations_completed`` (for each of the Work Order's ``operations`` rows: this entry's
``fg_completed_qty`` + the order's ``produced_qty`` may not exceed the row's ``completed_qty`` +
``process_loss_qty`` (+ the over-production allowance, 0 % here), else
``OperationsNotCompleteError``, or a plain ValidationError when no Job Card has the row as its
``operation_id``), then ``check_duplicate_entry_for_work_order`` (the finished item's
``transfer_qty``, rows without a source warehouse, over the order's other Manufacture entries that
are not cancelled, drafts included: once it reaches the order's ``qty``,
``DuplicateEntryForWorkOrderError`` "Stock Entries already created for Work Order ..."). The sum
is taken over all of them, as the query-builder version of the check does (the strictest; as
read in the source, v14/v15 write the ``parent in (...)`` list of their raw SQL as ``%s%s…``,
which MariaDB reads as one quoted string once there are two or more other entries, so there the
check bites only with one).

Its answers have Frappe's shape: ``{"data": ...}`` / ``{"message": ...}``, errors as
``{"exc_type", "exception", "_server_messages"}`` with the exception's status (417 for a
ValidationError and its kind: MandatoryError, LinkValidationError, UniqueValidationError,
DocstatusTransitionError; 404 DoesNotExistError; 401 AuthenticationError). A field the DocType
does not have is refused here (417 ValidationError), where Frappe would drop it without a word:
a misspelt field must not pass.

Trouble on demand (``app.state.erp``): ``down`` (503), ``error`` (500), ``slow_s``,
``api_secret`` (change it: the client's is wrong), ``lose_answer`` (an insert is done, then its
answer is lost as a 504, once), ``stale_lists`` (lists of Stock Entries come back empty: the
race in which the key is not seen before the insert), ``fail_submit`` (the next submit, an insert
with ``docstatus`` 1 or a draft put to 1, is answered 503 and not done, once: the hub stopped
between its steps).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

DOCTYPE_FILES = {
    "Work Order": "work_order.json",
    "Job Card": "job_card.json",
    "Job Card Time Log": "job_card_time_log.json",
    "Stock Entry": "stock_entry.json",
    "Stock Entry Detail": "stock_entry_detail.json",
}
STANDARD = {
    "name": "Data",
    "owner": "Data",
    "creation": "Datetime",
    "modified": "Datetime",
    "modified_by": "Data",
    "docstatus": "Int",
    "idx": "Int",
    "doctype": "Data",
    "parent": "Data",
    "parentfield": "Data",
    "parenttype": "Data",
}
TEXT = {
    "Data",
    "Link",
    "Select",
    "Small Text",
    "Text",
    "Text Editor",
    "Long Text",
    "Read Only",
    "Barcode",
    "Attach",
    "Attach Image",
    "Image",
    "Dynamic Link",
    "Code",
    "HTML Editor",
    "Markdown Editor",
    "Phone",
    "Autocomplete",
    "Color",
    "Duration",
    "Password",
}
NUMBER = {"Float", "Currency", "Percent"}
NO_VALUE = {"Button", "HTML", "Section Break", "Column Break", "Tab Break", "Heading", "Fold"}
ENTRY_TYPES = {
    "Manufacture",
    "Material Transfer for Manufacture",
    "Material Receipt",
    "Material Issue",
    "Material Transfer",
    "Repack",
}
MAKE_STOCK_ENTRY = "erpnext.manufacturing.doctype.work_order.work_order.make_stock_entry"
# Manufacturing Settings' overproduction_percentage_for_work_order, at its default
OVERPRODUCTION_PERCENTAGE = 0.0


def doctypes(fixtures: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every DocType in the fixtures: fieldname -> its DocField."""
    found = {}
    for name, file in DOCTYPE_FILES.items():
        definition = json.loads((fixtures / file).read_text())
        found[name] = {f["fieldname"]: f for f in definition["fields"]}
    return found


class FrappeError(Exception):
    """``shown``: raised by ``frappe.throw``, which also shows the message (``_server_messages``);
    an exception raised as such has only ``exc_type`` and ``exception``."""

    def __init__(
        self, status: int, exc_type: str, message: str, detail: str = "", shown: bool = True
    ) -> None:
        super().__init__(message)
        self.status, self.exc_type, self.message, self.detail = status, exc_type, message, detail
        self.shown = shown

    def response(self) -> JSONResponse:
        body = {
            "exc_type": self.exc_type,
            "exception": f"frappe.exceptions.{self.exc_type}: {self.detail or self.message}",
        }
        if self.shown:
            shown = {
                "message": self.message,
                "title": "Message",
                "indicator": "red",
                "raise_exception": 1,
            }
            body["_server_messages"] = json.dumps([json.dumps(shown)])
        return JSONResponse(body, status_code=self.status)


def _invalid(
    message: str, exc_type: str = "ValidationError", detail: str = "", shown: bool = True
) -> FrappeError:
    return FrappeError(417, exc_type, message, detail, shown)


@dataclass
class ErpnextStandIn:
    fixtures: Path
    api_key: str
    api_secret: str
    custom_fields: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    down: bool = False
    error: bool = False
    slow_s: float = 0.0
    lose_answer: bool = False
    stale_lists: bool = False
    fail_submit: bool = False
    now: datetime = datetime(2026, 3, 2, 7, 0, 0)
    meta: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    docs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)  # Stock Entries per key value
    _series: int = 0

    def __post_init__(self) -> None:
        self.meta = doctypes(self.fixtures)
        for doctype, fields in self.custom_fields.items():
            self.meta[doctype].update({f["fieldname"]: f for f in fields})
        self.docs = {"Work Order": {}, "Stock Entry": {}, "Job Card": {}}

    def tick(self) -> str:
        self.now += timedelta(seconds=1)
        return self.now.strftime("%Y-%m-%d %H:%M:%S.%f")

    # --- the test's side ------------------------------------------------------------------

    def work_order(self, name: str, item: str, qty: float, **fields: Any) -> dict[str, Any]:
        doc = {
            "name": name,
            "naming_series": "MFG-WO-.YYYY.-",
            "status": "Not Started",
            "docstatus": 1,
            "production_item": item,
            "bom_no": f"BOM-{item}-001",
            "company": "Plant 1",
            "qty": qty,
            "produced_qty": 0.0,
            "planned_start_date": "2026-03-02 06:00:00",
            "wip_warehouse": "WIP - P1",
            "fg_warehouse": "Finished Goods - P1",
            "stock_uom": "Nos",
            "use_multi_level_bom": 1,
            **fields,
        }
        self.validate("Work Order", doc)
        doc["modified"] = doc["creation"] = self.tick()
        self.docs["Work Order"][name] = doc
        return doc

    def job_card(self, name: str, work_order: str, operation_id: str, **fields: Any) -> None:
        """A Job Card for a Work Order's operation row (the row's ``name`` is its
        ``operation_id``)."""
        order = self.docs["Work Order"][work_order]
        doc = {
            "name": name,
            "naming_series": "PO-JOB.#####",
            "docstatus": 1,
            "status": "Completed",
            "work_order": work_order,
            "operation_id": operation_id,
            "company": order["company"],
            "production_item": order["production_item"],
            **fields,
        }
        self.validate("Job Card", doc)
        doc["modified"] = doc["creation"] = self.tick()
        self.docs["Job Card"][name] = doc

    def change(self, name: str, **fields: Any) -> None:
        doc = {**self.docs["Work Order"][name], **fields}
        self.validate("Work Order", doc)
        doc["modified"] = self.tick()
        self.docs["Work Order"][name] = doc

    def cancel(self, name: str) -> None:
        self.change(name, docstatus=2, status="Cancelled")

    # --- what Frappe checks on save -------------------------------------------------------

    def validate(self, doctype: str, doc: dict[str, Any], row: int | None = None) -> None:
        fields = self.meta[doctype]
        where = doctype if row is None else f"{doctype} Row #{row}"
        for name, value in doc.items():
            if name in STANDARD or name.startswith("__"):
                continue
            df = fields.get(name)
            if df is None:
                raise _invalid(f"{where}: there is no field {name!r} in DocType {doctype}")
            if value is None:
                continue
            kind, label = df["fieldtype"], df.get("label") or name
            if kind in ("Table", "Table MultiSelect"):
                if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
                    raise _invalid(f"{where}: {label} must be a list of rows")
                for n, child in enumerate(value, start=1):
                    if df["options"] in self.meta:
                        self.validate(df["options"], child, n)
                continue
            if not _conforms(kind, value):
                raise _invalid(f"{where}: {label} ({name}) must be a {kind}, not {value!r}")
            if kind == "Select" and df.get("options") and name != "naming_series":
                options = df["options"].split("\n")
                if value not in options:
                    shown = ", ".join(f'"{o}"' for o in options if o)
                    raise _invalid(f'{label} cannot be "{value}". It should be one of {shown}')
            if df.get("non_negative") and kind in NUMBER | {"Int"} and value < 0:
                raise _invalid(f"{where}: {label} cannot be negative")
        missing = [
            f.get("label") or n
            for n, f in fields.items()
            if f.get("reqd")
            and f.get("default") is None
            and n != "naming_series"
            and doc.get(n) in (None, "", [])
        ]
        if missing:
            raise _invalid(f"Error: Value missing for {where}: {missing[0]}", "MandatoryError")

    def insert_stock_entry(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.validate("Stock Entry", doc)
        entry_type = doc.get("stock_entry_type")
        if entry_type not in ENTRY_TYPES:
            raise _invalid(f"Could not find Stock Entry Type: {entry_type}", "LinkValidationError")
        order = self.docs["Work Order"].get(doc.get("work_order") or "")
        if doc.get("work_order") and order is None:
            raise _invalid(f"Could not find Work Order: {doc['work_order']}", "LinkValidationError")
        if order is not None and order["docstatus"] != 1:
            raise _invalid(f"Work Order {order['name']} must be submitted")
        self._validate_work_order(doc, "new-stock-entry-1")
        self._check_unique(doc, "new-stock-entry-1")
        if doc.get("docstatus") == 1:
            self._check_overproduction(doc)
        self._series += 1
        name = f"MAT-STE-{self.now.year}-{self._series:05d}"
        stamp = self.tick()
        saved = {**doc, "name": name, "creation": stamp, "modified": stamp, "owner": "mes-hub"}
        for n, child in enumerate(saved.get("items") or [], start=1):
            child.update(parent=name, parentfield="items", parenttype="Stock Entry", idx=n)
        self.docs["Stock Entry"][name] = saved
        for df_name, df in self.meta["Stock Entry"].items():
            if df.get("unique") and saved.get(df_name) is not None:
                self.received[saved[df_name]] += 1
        if saved.get("docstatus") == 1:
            self._update_work_order(saved)
        return saved

    def save_stock_entry(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """``PUT /api/resource/Stock Entry/<name>``: Frappe's ``update_doc`` (``doc.update``,
        ``doc.save``), with ``Document.check_docstatus_transition``: a draft may be saved or
        submitted (``docstatus`` 1), a submitted one cancelled (2) but no field changed (none
        of Stock Entry's is ``allow_on_submit`` but the print heading), a cancelled one not at
        all."""
        stored = self.docs["Stock Entry"].get(name)
        if stored is None:
            raise FrappeError(404, "DoesNotExistError", f"Stock Entry {name} not found")
        changes = {k: v for k, v in changes.items() if k not in ("name", "flags")}
        doc = {**stored, **changes}
        before, after = stored.get("docstatus") or 0, doc.get("docstatus") or 0
        if before == 2:
            raise _invalid("Cannot edit cancelled document", shown=False)
        if before == 1 and after == 0:
            raise _invalid(
                "Cannot change docstatus from 1 (Submitted) to 0 (Draft)",
                "DocstatusTransitionError",
                shown=False,
            )
        if after == 2:  # saving a submitted document as 2 cancels it; a draft, never
            return self.cancel_document("Stock Entry", name)
        if before == 1:
            for field_name, value in changes.items():
                if field_name != "docstatus" and value != stored.get(field_name):
                    label = self.meta["Stock Entry"].get(field_name, {}).get("label") or field_name
                    message = f"Not allowed to change {label} after submission"
                    raise _invalid(message, "UpdateAfterSubmitError")
            return stored
        self.validate("Stock Entry", doc)
        self._validate_work_order(doc, name)
        self._check_unique(doc, name)
        submitting = after == 1
        if submitting:
            self._check_overproduction(doc)
        doc["modified"] = self.tick()
        for n, child in enumerate(doc.get("items") or [], start=1):
            child.update(parent=name, parentfield="items", parenttype="Stock Entry", idx=n)
        self.docs["Stock Entry"][name] = doc
        if submitting:
            self._update_work_order(doc)
        return doc

    def cancel_document(self, doctype: str, name: str) -> dict[str, Any]:
        """``frappe.client.cancel``: ``frappe.get_doc(doctype, name).cancel()``, which sets
        ``docstatus`` 2 and saves; only a submitted document passes
        ``check_docstatus_transition``."""
        if doctype != "Stock Entry":
            raise FrappeError(403, "PermissionError", f"Not permitted to cancel {doctype}")
        doc = self.docs["Stock Entry"].get(name)
        if doc is None:
            raise FrappeError(404, "DoesNotExistError", f"Stock Entry {name} not found")
        if doc.get("docstatus") == 2:
            raise _invalid("Cannot edit cancelled document", shown=False)
        if doc.get("docstatus") != 1:
            raise _invalid(
                "Cannot change docstatus from 0 (Draft) to 2 (Cancelled)",
                "DocstatusTransitionError",
                shown=False,
            )
        doc.update(docstatus=2, modified=self.tick())
        self._update_work_order(doc)
        return doc

    def _check_unique(self, doc: dict[str, Any], name: str) -> None:
        """A ``unique`` field is a unique index in the database: over every other row, the
        cancelled ones too (a cancelled entry keeps its values)."""
        for field_name, df in self.meta["Stock Entry"].items():
            value = doc.get(field_name)
            if not df.get("unique") or value is None:
                continue
            others = (e for n, e in self.docs["Stock Entry"].items() if n != name)
            if any(e.get(field_name) == value for e in others):
                duplicate = f"Duplicate entry '{value}' for key '{field_name}'"
                detail = f"('Stock Entry', '{name}', IntegrityError(1062, \"{duplicate}\"))"
                label = df.get("label") or field_name
                raise _invalid(f"{label} must be unique", "UniqueValidationError", detail)

    def _validate_work_order(self, doc: dict[str, Any], name: str) -> None:
        """``StockEntry.validate_work_order``, run by ``validate`` on every save and submit (a
        draft's too): for a Manufacture or Material Consumption entry of a Work Order, the For
        Quantity is mandatory, then ``check_if_operations_completed`` and
        ``check_duplicate_entry_for_work_order``. ``name``: the entry's own, left out of the
        others."""
        order = self.docs["Work Order"].get(doc.get("work_order") or "")
        purposes = ("Manufacture", "Material Consumption for Manufacture")
        if order is None or doc.get("purpose") not in purposes:
            return
        if not doc.get("fg_completed_qty"):
            raise _invalid("For Quantity (Manufactured Qty) is mandatory")
        self._check_if_operations_completed(doc, order)
        self._check_duplicate_entry_for_work_order(doc, order, name)

    def _check_if_operations_completed(self, doc: dict[str, Any], order: dict[str, Any]) -> None:
        total = float(doc.get("fg_completed_qty") or 0) + float(order.get("produced_qty") or 0)
        for row in order.get("operations") or []:
            done = float(row.get("completed_qty") or 0)
            allowed = done + float(row.get("process_loss_qty") or 0)
            allowed += OVERPRODUCTION_PERCENTAGE / 100 * done
            if total <= allowed:
                continue
            cards = [
                c for c in self.docs["Job Card"].values() if c.get("operation_id") == row["name"]
            ]
            if not cards:
                raise _invalid(
                    f"Work Order {order['name']}: Job Card not found for the operation "
                    f"{row.get('operation')}"
                )
            raise _invalid(
                f"Row #{row.get('idx')}: Operation {row.get('operation')} is not completed for "
                f"{total} qty of finished goods in Work Order {order['name']}. Please update "
                f"operation status via Job Card {cards[0]['name']}.",
                "OperationsNotCompleteError",
            )

    def _check_duplicate_entry_for_work_order(
        self, doc: dict[str, Any], order: dict[str, Any], name: str
    ) -> None:
        others = [
            e
            for n, e in self.docs["Stock Entry"].items()
            if n != name
            and e.get("work_order") == order["name"]
            and e.get("purpose") == doc.get("purpose")
            and e.get("docstatus") != 2
        ]
        entered = sum(
            float(row.get("transfer_qty") or 0)
            for e in others
            for row in e.get("items") or []
            if row.get("item_code") == order["production_item"] and not row.get("s_warehouse")
        )
        if entered and entered >= order["qty"]:
            names = ", ".join(str(e["name"]) for e in others)
            raise _invalid(
                f"Stock Entries already created for Work Order {order['name']}: {names}",
                "DuplicateEntryForWorkOrderError",
            )

    def _manufactured(self, order: str) -> tuple[float, float]:
        """ERPNext's ``WorkOrder.get_transferred_or_manufactured_qty``: over the order's
        submitted Manufacture entries, the sum of ``fg_completed_qty`` less the process loss;
        and that loss (``set_process_loss_qty``)."""
        entries = [
            e
            for e in self.docs["Stock Entry"].values()
            if e.get("work_order") == order
            and e.get("docstatus") == 1
            and e.get("purpose") == "Manufacture"
        ]
        loss = sum(e.get("process_loss_qty") or 0.0 for e in entries)
        return sum(e.get("fg_completed_qty") or 0.0 for e in entries) - loss, loss

    def _check_overproduction(self, doc: dict[str, Any]) -> None:
        """``update_work_order_qty`` on submit, with Manufacturing Settings' over-production
        allowance at its default of 0 %."""
        order = self.docs["Work Order"].get(doc.get("work_order") or "")
        if order is None or doc.get("purpose") != "Manufacture":
            return
        produced, _ = self._manufactured(order["name"])
        produced += (doc.get("fg_completed_qty") or 0.0) - (doc.get("process_loss_qty") or 0.0)
        if produced > order["qty"]:
            raise _invalid(
                f"Manufactured Qty ({produced}) cannot be greater than planned quantity "
                f"({order['qty']}) in Work Order {order['name']}",
                "StockOverProductionError",
            )

    def _update_work_order(self, entry: dict[str, Any]) -> None:
        """What a submitted or cancelled Manufacture entry does to its Work Order:
        ``update_work_order_qty`` and ``get_status`` (Completed once made plus lost reaches
        ``qty``; In Process here as soon as anything is made, as with Skip Material
        Transfer)."""
        order = self.docs["Work Order"].get(entry.get("work_order") or "")
        if order is None or entry.get("purpose") != "Manufacture":
            return
        produced, loss = self._manufactured(order["name"])
        if produced + loss >= order["qty"]:
            status = "Completed"
        else:
            status = "In Process" if produced + loss > 0 else "Not Started"
        order.update(produced_qty=produced, process_loss_qty=loss, status=status)
        order["modified"] = self.tick()

    def make_stock_entry(self, work_order_id: str, purpose: str, qty: float) -> dict[str, Any]:
        order = self.docs["Work Order"].get(work_order_id)
        if order is None:
            raise FrappeError(404, "DoesNotExistError", f"Work Order {work_order_id} not found")
        rows = [
            {
                "doctype": "Stock Entry Detail",
                "item_code": f"RM-{order['production_item']}",
                "qty": float(qty),
                "s_warehouse": order["wip_warehouse"],
                "uom": "Nos",
                "stock_uom": "Nos",
                "conversion_factor": 1.0,
                "transfer_qty": float(qty),
            },
            {
                "doctype": "Stock Entry Detail",
                "item_code": order["production_item"],
                "qty": float(qty),
                "t_warehouse": order["fg_warehouse"],
                "uom": order["stock_uom"],
                "stock_uom": order["stock_uom"],
                "conversion_factor": 1.0,
                "transfer_qty": float(qty),
                "is_finished_item": 1,
                "bom_no": order["bom_no"],
            },
        ]
        return {
            "doctype": "Stock Entry",
            "docstatus": 0,
            "idx": 0,
            "naming_series": "MAT-STE-.YYYY.-",
            "stock_entry_type": purpose,
            "purpose": purpose,
            "company": order["company"],
            "work_order": work_order_id,
            "from_bom": 1,
            "bom_no": order["bom_no"],
            "use_multi_level_bom": order["use_multi_level_bom"],
            "fg_completed_qty": float(qty),
            "inspection_required": 0,
            "from_warehouse": order["wip_warehouse"],
            "to_warehouse": order["fg_warehouse"],
            "items": rows,
        }

    def listing(self, doctype: str, params: dict[str, str]) -> list[dict[str, Any]]:
        if doctype not in self.docs:
            raise FrappeError(403, "PermissionError", f"Not permitted to read {doctype}")
        fields = json.loads(params.get("fields") or '["name"]')
        filters = json.loads(params.get("filters") or "[]")
        if isinstance(filters, dict):
            filters = [[k, *(v if isinstance(v, list) else ["=", v])] for k, v in filters.items()]
        for name in [*fields, *(f[-3] for f in filters)]:
            if name not in STANDARD and name not in self.meta[doctype]:
                raise _invalid(f"Field not permitted in query: {name}", "DataError")
        if doctype == "Stock Entry" and self.stale_lists:
            return []
        rows = [d for d in self.docs[doctype].values() if all(_test(d, f[-3:]) for f in filters)]
        for part in reversed([p.split() for p in params.get("order_by", "").split(",") if p]):
            rows.sort(
                key=lambda d, n=part[0]: _sortable(d.get(n)),
                reverse=len(part) > 1 and part[1].lower() == "desc",
            )
        start = int(params.get("limit_start") or 0)
        rows = rows[start : start + int(params.get("limit_page_length") or 20)]
        return [{n: d.get(n) for n in fields} for d in rows]


def _conforms(kind: str, value: Any) -> bool:
    if kind in TEXT:
        return isinstance(value, str)
    if kind in NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("Int", "Check"):
        return isinstance(value, int) and (kind == "Check" or not isinstance(value, bool))
    patterns = {
        "Date": r"\d{4}-\d\d-\d\d",
        "Datetime": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?",
        "Time": r"\d\d?:\d\d:\d\d(\.\d{1,6})?",
    }
    if kind in patterns:
        return isinstance(value, str) and re.fullmatch(patterns[kind], value) is not None
    return kind not in NO_VALUE


def _comparable(value: Any) -> Any:
    if isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\d", value):
        return datetime.fromisoformat(value)
    return value


def _test(doc: dict[str, Any], condition: list[Any]) -> bool:
    name, op, value = condition
    have = doc.get(name)
    if op in ("like", "not like"):
        pattern = "".join(
            ".*" if c == "%" else "." if c == "_" else re.escape(c) for c in str(value)
        )
        found = re.fullmatch(pattern, str(have or ""), re.IGNORECASE) is not None
        return found if op == "like" else not found
    if op == "is":  # Frappe's "set" / "not set": a value other than null and ""
        return (have not in (None, "")) == (value == "set")
    if op == "in":
        return have in value
    if op == "not in":
        return have not in value
    a, b = _comparable(have), _comparable(value)
    if a is None:
        return op == "!=" and b is not None
    checks = {"=": a == b, "!=": a != b, ">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}
    return checks[op]


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, "") if value is None else (1, _comparable(value))


# --- the app ---------------------------------------------------------------------------


def erpnext_app(fixtures: Path, api_key: str, api_secret: str, **options: Any) -> FastAPI:
    """The stand-in; its state (documents, trouble switches) is ``app.state.erp``."""
    erp = ErpnextStandIn(fixtures, api_key, api_secret, **options)
    app = FastAPI()
    app.state.erp = erp

    async def checked(request: Request) -> Response | None:
        if erp.slow_s:
            await asyncio.sleep(erp.slow_s)
        if erp.down:
            return PlainTextResponse("Service Unavailable", status_code=503)
        if erp.error:
            return FrappeError(500, "Exception", "the stand-in was told to fail").response()
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "token" or credentials != f"{erp.api_key}:{erp.api_secret}":
            body = {
                "exc_type": "AuthenticationError",
                "exception": "frappe.exceptions.AuthenticationError",
            }
            return JSONResponse(body, status_code=401)
        return None

    @app.get("/api/resource/{doctype}")
    async def list_documents(doctype: str, request: Request) -> Response:
        if (refused := await checked(request)) is not None:
            return refused
        try:
            return JSONResponse({"data": erp.listing(doctype, dict(request.query_params))})
        except FrappeError as exc:
            return exc.response()

    @app.post("/api/resource/{doctype}")
    async def insert(doctype: str, request: Request) -> Response:
        if (refused := await checked(request)) is not None:
            return refused
        body = await request.json()
        doc = json.loads(body["data"]) if isinstance(body.get("data"), str) else body
        try:
            if doctype != "Stock Entry":
                raise FrappeError(403, "PermissionError", f"Not permitted to create {doctype}")
            if erp.fail_submit and doc.get("docstatus") == 1:
                erp.fail_submit = False
                return PlainTextResponse("Service Unavailable", status_code=503)
            saved = erp.insert_stock_entry(doc)
        except FrappeError as exc:
            return exc.response()
        if erp.lose_answer:
            erp.lose_answer = False
            return PlainTextResponse("Gateway Timeout", status_code=504)
        return JSONResponse({"data": saved})

    @app.put("/api/resource/{doctype}/{name}")
    async def save(doctype: str, name: str, request: Request) -> Response:
        if (refused := await checked(request)) is not None:
            return refused
        body = await request.json()
        changes = json.loads(body["data"]) if isinstance(body.get("data"), str) else body
        try:
            if doctype != "Stock Entry":
                raise FrappeError(403, "PermissionError", f"Not permitted to write {doctype}")
            stored = erp.docs["Stock Entry"].get(name) or {}
            if erp.fail_submit and stored.get("docstatus") == 0 and changes.get("docstatus") == 1:
                erp.fail_submit = False
                return PlainTextResponse("Service Unavailable", status_code=503)
            saved = erp.save_stock_entry(name, changes)
        except FrappeError as exc:
            return exc.response()
        return JSONResponse({"data": saved})

    @app.post("/api/method/frappe.client.cancel")
    async def cancel(request: Request) -> Response:
        if (refused := await checked(request)) is not None:
            return refused
        args = await request.json()
        try:
            cancelled = erp.cancel_document(args["doctype"], args["name"])
        except FrappeError as exc:
            return exc.response()
        return JSONResponse({"message": cancelled})

    @app.post(f"/api/method/{MAKE_STOCK_ENTRY}")
    async def make_stock_entry(request: Request) -> Response:
        if (refused := await checked(request)) is not None:
            return refused
        args = await request.json()
        try:
            made = erp.make_stock_entry(args["work_order_id"], args["purpose"], args["qty"])
        except FrappeError as exc:
            return exc.response()
        return JSONResponse({"message": made})

    return app
