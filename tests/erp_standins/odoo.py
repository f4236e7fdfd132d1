"""An Odoo stand-in: JSON-2 (Odoo 19: ``POST /json/2/<model>/<method>``, ``Authorization:
bearer <key>``) and JSON-RPC (17/18: ``/jsonrpc``, ``common.authenticate`` then
``object.execute_kw``), serving ``mrp.production`` and ``mrp.workorder`` with the fields and
public methods read at start from the real model source (``../shared/fixtures/erp/odoo``, parsed
with ``ast``: every ``name = fields.X(...)`` of the class, and its ``def``s).

Like Odoo it refuses an unknown field or a wrong value with ``builtins.ValueError`` ("Invalid
field 'x' on model 'y'", "Wrong value for model.field: v": HTTP 500 on JSON-2, an error object
on JSON-RPC), a method the model does not have (404 / AttributeError), a private one (403
AccessError), a bad API key (401 "Invalid apikey" / AccessDenied). ``product.product`` and
``mail.message`` (not in the fixtures) have the few fields used here.

Trouble on demand (``app.state.erp``): ``down`` (503), ``error`` (500), ``slow_s`` (sleep before
answering), ``api_key`` (change it: the client's key is wrong), ``lose_answer`` (method names:
the call is done, then the answer is lost as a 504, once).
"""

from __future__ import annotations

import ast
import asyncio
import html
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

MODEL_FILES = {"mrp.production": "mrp_production.py", "mrp.workorder": "mrp_workorder.py"}
UID = 2


@dataclass(frozen=True)
class OdooField:
    name: str
    kind: str  # Char, Float, Many2one, Selection, ...
    selection: tuple[str, ...] | None = None


MAGIC = {
    "id": OdooField("id", "Integer"),
    "display_name": OdooField("display_name", "Char"),
    "create_date": OdooField("create_date", "Datetime"),
    "write_date": OdooField("write_date", "Datetime"),
    "create_uid": OdooField("create_uid", "Many2one"),
    "write_uid": OdooField("write_uid", "Many2one"),
}
NOT_IN_FIXTURES = {
    "product.product": {
        f.name: f
        for f in (
            OdooField("name", "Char"),
            OdooField("default_code", "Char"),
            OdooField("active", "Boolean"),
        )
    },
    "mail.message": {
        f.name: f
        for f in (
            OdooField("model", "Char"),
            OdooField("res_id", "Integer"),
            OdooField("body", "Html"),
            OdooField("message_type", "Char"),
        )
    },
}


@dataclass(frozen=True)
class OdooModel:
    name: str
    fields: dict[str, OdooField]
    methods: frozenset[str]
    inherits: tuple[str, ...] = ()


def read_model(source: Path, model: str) -> OdooModel:
    """``model``'s fields and methods as its Odoo source declares them."""
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        values = {
            t.id: s.value
            for s in node.body
            if isinstance(s, ast.Assign)
            for t in s.targets
            if isinstance(t, ast.Name)
        }
        name = values.get("_name")
        if not (isinstance(name, ast.Constant) and name.value == model):
            continue
        found = dict(MAGIC)
        for attribute, value in values.items():
            if (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Name)
                and value.func.value.id == "fields"
            ):
                found[attribute] = OdooField(attribute, value.func.attr, _selection(value))
        inherit = values.get("_inherit")
        inherits = ast.literal_eval(inherit) if inherit is not None else ()
        methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
        return OdooModel(model, found, frozenset(methods), tuple(inherits))
    raise KeyError(f"{model} is not in {source}")


def _selection(call: ast.Call) -> tuple[str, ...] | None:
    if call.args and isinstance(call.args[0], ast.List):
        try:
            return tuple(str(k) for k, _ in ast.literal_eval(call.args[0]))
        except ValueError:
            return None
    return None


class OdooError(Exception):
    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status, self.name, self.message = status, name, message


class Records(list[int]):
    """A method's answer that is a recordset: ids on JSON-2, one id on JSON-RPC (api.returns)."""


# Parameters of the methods served: (on records?, positional names); None: any keywords.
SIGNATURES: dict[str, tuple[bool, list[str] | None]] = {
    "search_read": (False, ["domain", "fields", "offset", "limit", "order"]),
    "search_count": (False, ["domain"]),
    "read": (True, ["fields"]),
    "write": (True, ["vals"]),
    "message_post": (True, None),
    "set_qty_producing": (True, []),
    "button_mark_done": (True, []),
    "button_finish": (True, []),
}
ORM = {"search_read", "search_count", "read", "write"}


@dataclass
class OdooStandIn:
    fixtures: Path
    api_key: str
    database: str = "plant"
    login: str = "mes-hub"
    down: bool = False
    error: bool = False
    slow_s: float = 0.0
    lose_answer: set[str] = field(default_factory=set)
    now: datetime = datetime(2026, 3, 2, 6, 0, 0)
    models: dict[str, OdooModel] = field(default_factory=dict)
    records: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    _next_id: int = 1

    def __post_init__(self) -> None:
        for model, file in MODEL_FILES.items():
            self.models[model] = read_model(self.fixtures / file, model)
        for model, fields in NOT_IN_FIXTURES.items():
            self.models[model] = OdooModel(model, {**MAGIC, **fields}, frozenset())
        self.records = {model: {} for model in self.models}

    # --- the test's side: data as a planner would enter it -----------------------------

    def tick(self) -> str:
        self.now += timedelta(seconds=1)
        return self.now.strftime("%Y-%m-%d %H:%M:%S")

    def create(self, model: str, vals: dict[str, Any]) -> int:
        self._check_vals(model, vals)
        rid, self._next_id = self._next_id, self._next_id + 1
        stamp = self.tick()
        record = {"id": rid, "create_date": stamp, "write_date": stamp, **vals}
        record.setdefault("display_name", vals.get("name", f"{model},{rid}"))
        self.records[model][rid] = record
        return rid

    def product(self, code: str | None, name: str) -> list[Any]:
        rid = self.create("product.product", {"name": name, "default_code": code or False})
        return [rid, f"[{code}] {name}" if code else name]

    def production(self, name: str, product: list[Any], qty: float, **vals: Any) -> int:
        defaults = {
            "state": "confirmed",
            "qty_producing": 0.0,
            "origin": False,
            "date_start": "2026-03-02 06:00:00",
            "date_finished": "2026-03-02 14:00:00",
            "date_deadline": False,
        }
        return self.create(
            "mrp.production",
            {**defaults, "name": name, "product_id": product, "product_qty": qty, **vals},
        )

    def workorder(self, production: int, operation: str, workcenter: str, seq: int) -> int:
        mo = self.records["mrp.production"][production]
        return self.create(
            "mrp.workorder",
            {
                "name": operation,
                "production_id": [production, mo["name"]],
                "workcenter_id": [100 + seq, workcenter],
                "sequence": seq,
                "state": "ready",
                "qty_produced": 0.0,
            },
        )

    def change(self, model: str, rid: int, **vals: Any) -> None:
        self._write(model, [rid], vals)

    def notes(self, production: int) -> list[str]:
        return [
            m["body"]
            for m in self.records["mail.message"].values()
            if m["model"] == "mrp.production" and m["res_id"] == production
        ]

    # --- the wire's side ----------------------------------------------------------------

    async def trouble(self) -> Response | None:
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
        if self.down:
            return PlainTextResponse("Service Unavailable", status_code=503)
        if self.error:
            raise OdooError(500, "builtins.RuntimeError", "the stand-in was told to fail")
        return None

    def call(self, model: str, method: str, ids: list[int] | None, kw: dict[str, Any]) -> Any:
        self.calls.append((model, method))
        if model not in self.models:
            raise OdooError(
                404, "werkzeug.exceptions.NotFound", f"the model {model!r} does not exist"
            )
        if method.startswith("_"):
            raise OdooError(
                403,
                "odoo.exceptions.AccessError",
                f"Private methods (such as '{model}.{method}') cannot be called remotely.",
            )
        known = self.models[model].methods
        if method not in SIGNATURES or (
            method not in ORM
            and method not in known
            and not (method == "message_post" and "mail.thread" in self.models[model].inherits)
        ):
            raise OdooError(
                404,
                "werkzeug.exceptions.NotFound",
                f"The method '{method}' does not exist on the model '{model}'",
            )
        _, names = SIGNATURES[method]
        if names is not None:
            extra = set(kw) - set(names) - {"context"}
            if extra:
                raise OdooError(
                    422,
                    "werkzeug.exceptions.UnprocessableEntity",
                    f"got an unexpected keyword argument '{sorted(extra)[0]}'",
                )
        context = kw.pop("context", None) or {}
        return getattr(self, f"_{method}")(model, ids or [], context=context, **kw)

    # --- the methods ----------------------------------------------------------------------

    def _search_read(
        self,
        model: str,
        _: list[int],
        *,
        context: dict[str, Any],
        domain: list[Any] | None = None,
        fields: list[str] | None = None,
        offset: int = 0,
        limit: int | None = None,
        order: str | None = None,
    ) -> list[dict[str, Any]]:
        rows = self._search(model, domain or [], order)
        rows = rows[offset : None if limit is None else offset + limit]
        return [self._read_one(model, r, fields) for r in rows]

    def _search_count(
        self, model: str, _: list[int], *, context: dict[str, Any], domain: list[Any] | None = None
    ) -> int:
        return len(self._search(model, domain or [], None))

    def _read(
        self,
        model: str,
        ids: list[int],
        *,
        context: dict[str, Any],
        fields: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        return [self._read_one(model, self._record(model, i), fields) for i in ids]

    def _write(self, model: str, ids: list[int], vals: dict[str, Any], **_: Any) -> bool:
        self._check_vals(model, vals)
        stamp = self.tick()
        for rid in ids:
            record = self._record(model, rid)
            record.update(vals, write_date=stamp)
            # _compute_state: a quantity producing puts a confirmed MO in progress.
            if vals.get("qty_producing") and record.get("state") == "confirmed":
                record["state"] = "progress"
        return True

    def _message_post(
        self,
        model: str,
        ids: list[int],
        *,
        context: dict[str, Any],
        body: str = "",
        message_type: str = "notification",
        **_: Any,
    ) -> Records:
        (rid,) = ids
        self._record(model, rid)
        message = self.create(
            "mail.message",
            {
                "model": model,
                "res_id": rid,
                "body": f"<p>{html.escape(body)}</p>",
                "message_type": message_type,
            },
        )
        return Records([message])

    def _set_qty_producing(self, model: str, ids: list[int], **_: Any) -> None:
        for rid in ids:
            self._record(model, rid)

    def _button_mark_done(self, model: str, ids: list[int], *, context: dict[str, Any]) -> Any:
        for rid in ids:
            mo = self._record(model, rid)
            if not mo["qty_producing"]:  # pre_button_mark_done -> _set_quantities: all of it
                mo["qty_producing"] = mo["product_qty"]
            if mo["qty_producing"] < mo["product_qty"] and not context.get("skip_backorder"):
                return {
                    "type": "ir.actions.act_window",
                    "res_model": "mrp.production.backorder",
                    "target": "new",
                    "context": {"default_mrp_production_ids": ids},
                }
        stamp = self.tick()
        for rid in ids:
            self._record(model, rid).update(state="done", write_date=stamp)
            for wo in self.records["mrp.workorder"].values():
                if wo["production_id"][0] == rid and wo["state"] not in ("done", "cancel"):
                    wo.update(state="done", write_date=stamp)
        return True

    def _button_finish(self, model: str, ids: list[int], **_: Any) -> bool:
        for rid in ids:
            self._record(model, rid).update(state="done", write_date=self.tick())
        return True

    # --- the ORM's checks -----------------------------------------------------------------

    def _record(self, model: str, rid: int) -> dict[str, Any]:
        try:
            return self.records[model][rid]
        except KeyError:
            raise OdooError(
                404,
                "odoo.exceptions.MissingError",
                f"Record does not exist or has been deleted.\n(Record: {model}({rid},))",
            ) from None

    def _field(self, model: str, name: str) -> OdooField:
        try:
            return self.models[model].fields[name]
        except KeyError:
            raise OdooError(
                500, "builtins.ValueError", f"Invalid field {name!r} on model {model!r}"
            ) from None

    def _check_vals(self, model: str, vals: dict[str, Any]) -> None:
        for name, value in vals.items():
            f = self._field(model, name)
            if value is False or value is None:
                continue
            if f.kind in ("Float", "Monetary") and isinstance(value, str):
                raise OdooError(
                    500, "builtins.ValueError", f"could not convert string to float: {value!r}"
                )
            if not _conforms(f, value):
                raise OdooError(
                    500, "builtins.ValueError", f"Wrong value for {model}.{name}: {value!r}"
                )

    def _read_one(
        self, model: str, record: dict[str, Any], fields: list[str] | None
    ) -> dict[str, Any]:
        names = fields or [n for n in record if n in self.models[model].fields]
        for name in names:
            self._field(model, name)
        return {"id": record["id"], **{n: record.get(n, False) for n in names}}

    def _search(self, model: str, domain: list[Any], order: str | None) -> list[dict[str, Any]]:
        rows = [r for r in self.records[model].values() if self._matches(model, domain, r)]
        for part in reversed([p.split() for p in (order or "id").split(",") if p.strip()]):
            name = part[0]
            self._field(model, name)
            rows.sort(
                key=lambda r, n=name: _sortable(r.get(n, False)),
                reverse=len(part) > 1 and part[1].lower() == "desc",
            )
        return rows

    def _matches(self, model: str, domain: list[Any], record: dict[str, Any]) -> bool:
        stack: list[bool] = []
        for item in reversed(domain):
            if item in ("&", "|"):
                a, b = stack.pop(), stack.pop()
                stack.append(a and b if item == "&" else a or b)
            elif item == "!":
                stack.append(not stack.pop())
            else:
                stack.append(self._leaf(model, item, record))
        return all(stack)

    def _leaf(self, model: str, leaf: list[Any], record: dict[str, Any]) -> bool:
        name, op, value = leaf
        if name not in self.models[model].fields:
            raise OdooError(
                500, "builtins.ValueError", f"Invalid field {model}.{name} in leaf {tuple(leaf)!r}"
            )
        have = record.get(name, False)
        have_id = have[0] if isinstance(have, list) else have
        if op in ("like", "ilike", "=like", "=ilike", "not ilike"):
            text = have[1] if isinstance(have, list) else str(have or "")
            pattern = value if op.startswith("=") else f"%{value}%"
            flags = re.IGNORECASE if "ilike" in op else 0
            found = re.fullmatch(_like(pattern), text, flags | re.DOTALL) is not None
            return not found if op == "not ilike" else found
        tests = {
            "=": lambda: have_id == value,
            "!=": lambda: have_id != value,
            "in": lambda: have_id in value,
            "not in": lambda: have_id not in value,
            ">": lambda: have_id is not False and have_id > value,
            ">=": lambda: have_id is not False and have_id >= value,
            "<": lambda: have_id is not False and have_id < value,
            "<=": lambda: have_id is not False and have_id <= value,
        }
        if op not in tests:
            raise OdooError(500, "builtins.ValueError", f"Invalid leaf {tuple(leaf)!r}")
        return bool(tests[op]())


def _like(pattern: str) -> str:
    return "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, list):
        value = value[0]
    return (0, 0) if value is False or value is None else (1, value)


def _conforms(f: OdooField, value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    checks = {
        "Boolean": isinstance(value, bool),
        "Integer": isinstance(value, int) and not isinstance(value, bool),
        "Float": number,
        "Monetary": number,
        "Char": isinstance(value, str),
        "Text": isinstance(value, str),
        "Html": isinstance(value, str),
        "Binary": isinstance(value, str),
        "Many2one": isinstance(value, int | list) and not isinstance(value, bool),
        "One2many": isinstance(value, list),
        "Many2many": isinstance(value, list),
        "Date": isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", value) is not None,
        "Datetime": isinstance(value, str)
        and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", value) is not None,
    }
    if f.kind == "Selection":
        return isinstance(value, str) and (f.selection is None or value in f.selection)
    return checks.get(f.kind, True)


# --- the app ---------------------------------------------------------------------------


def odoo_app(fixtures: Path, api_key: str, **options: Any) -> FastAPI:
    """The stand-in; its state (records, trouble switches) is ``app.state.erp``."""
    odoo = OdooStandIn(fixtures, api_key, **options)
    app = FastAPI()
    app.state.erp = odoo

    @app.post("/json/2/{model}/{method}")
    async def json2(model: str, method: str, request: Request) -> Response:
        try:
            if (trouble := await odoo.trouble()) is not None:
                return trouble
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or key != odoo.api_key:
                raise OdooError(401, "werkzeug.exceptions.Unauthorized", "Invalid apikey")
            body = await request.json()
            ids = body.pop("ids", None)
            result = odoo.call(model, method, ids, body)
        except OdooError as exc:
            return JSONResponse(
                {
                    "name": exc.name,
                    "message": exc.message,
                    "arguments": [exc.message],
                    "context": {},
                    "debug": f"Traceback (most recent call last):\n{exc.name}",
                },
                status_code=exc.status,
            )
        if method in odoo.lose_answer:
            odoo.lose_answer.discard(method)
            return PlainTextResponse("Gateway Timeout", status_code=504)
        return JSONResponse(list(result) if isinstance(result, Records) else result)

    @app.post("/jsonrpc")
    async def jsonrpc(request: Request) -> Response:
        message = await request.json()
        params, rid = message.get("params", {}), message.get("id")
        try:
            if (trouble := await odoo.trouble()) is not None:
                return trouble
            result = _dispatch(
                odoo, params.get("service"), params.get("method"), list(params.get("args", []))
            )
        except OdooError as exc:
            data = {
                "name": exc.name,
                "debug": "",
                "message": exc.message,
                "arguments": [exc.message],
                "context": {},
            }
            error = {"code": 200, "message": "Odoo Server Error", "data": data}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": error})
        method = (
            (params.get("args") or [None] * 5)[4] if params.get("service") == "object" else None
        )
        if method in odoo.lose_answer:
            odoo.lose_answer.discard(method)
            return PlainTextResponse("Gateway Timeout", status_code=504)
        if isinstance(result, Records):
            result = result[0] if len(result) == 1 else list(result)
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})

    return app


def _dispatch(odoo: OdooStandIn, service: str, method: str, args: list[Any]) -> Any:
    if service == "common" and method == "version":
        return {"server_version": "18.0", "server_version_info": [18, 0, 0, "final", 0, ""]}
    if service == "common" and method == "authenticate":
        db, login, password = args[:3]
        return UID if (db, login, password) == (odoo.database, odoo.login, odoo.api_key) else False
    if service == "object" and method == "execute_kw":
        db, uid, password, model, name, positional = args[:6]
        keywords = dict(args[6]) if len(args) > 6 else {}
        if (db, uid, password) != (odoo.database, UID, odoo.api_key):
            raise OdooError(401, "odoo.exceptions.AccessDenied", "Access Denied")
        on_records, names = SIGNATURES.get(name, (False, []))
        ids = positional.pop(0) if on_records and positional else None
        for pname, value in zip(names or [], positional, strict=False):
            keywords[pname] = value
        return odoo.call(model, name, ids, keywords)
    raise OdooError(404, "builtins.AttributeError", f"{service}.{method} is not served")
