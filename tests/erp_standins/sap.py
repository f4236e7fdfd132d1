"""An SAP S/4HANA stand-in: the OData V2 services ``API_PROD_ORDER_CONFIRMATION_2_SRV`` and
``API_PRODUCTION_ORDER_2_SRV`` as far as the hub uses them, checked against their real
``$metadata`` (``../shared/fixtures/erp/sap``, read when the app is made).

What it does like SAP:

- basic auth (401 with ``WWW-Authenticate: Basic``);
- the CSRF dance: a ``GET`` with ``x-csrf-token: Fetch`` gets a token bound to the session
  cookie it sets; a modifying request without the session's token is answered ``403`` with
  ``x-csrf-token: Required``;
- every ``POST``ed ``ProdnOrdConf2`` entity is validated against ``ProdnOrdConf2Type`` from
  the metadata: an unknown property, a value of the wrong JSON type or format for its Edm type
  (``Edm.Decimal`` as a string, ``Edm.DateTime`` as ``/Date(ms)/``, ``Edm.Time`` as
  ``PT..H..M..S``, ``Edm.Guid``…), a ``MaxLength``, ``Precision`` or ``Scale`` exceeded →
  ``400`` with SAP's error JSON ``{"error": {"code", "message": {"lang", "value"}}}``;
- it does **not** refuse a second confirmation with the same ``ExternalSystemConfirmation``:
  it books another one, as SAP does, and counts them (``app.state.by_external_key``);
- it numbers confirmations as SAP does: one ``ConfirmationGroup`` per order operation, each
  confirmation (and reversal) of it the next ``ConfirmationCount``;
- ``POST CancelProdnOrdConf`` is the function import of the metadata: its parameters are read
  from there (``ConfirmationGroup``, ``ConfirmationCount`` required; ``PostingDate``,
  ``ConfirmationText``, ``ExternalSystemConfirmation`` optional), given as OData V2 URI literals
  (``'0000000001'``, ``datetime'2026-03-03T00:00'``, ``guid'…'``) and checked like properties;
  it books the reversal (``IsReversal`` true, the original's quantities, the parameters' posting
  date, text and external key, unless told to drop the key: below), marks the original
  ``IsReversed`` and answers ``200`` with the reversal; an unknown confirmation, a reversal, or
  one reversed already is refused ``400``;
- ``GET ProdnOrdConf2`` and ``GET A_ProductionOrder_2`` take ``$filter`` (``eq ne gt ge lt le``
  joined by ``and``; ``'text'``, ``guid'…'``, ``true``/``false``), ``$select``, ``$orderby``,
  ``$top``, ``$skip``, and answer ``{"d": {"results": [...]}}``.

On demand (``app.state``): ``down`` → 503, ``error`` → 500, ``slow`` → sleeps that many
seconds, ``reject_login`` → 401, ``lose_answers`` = n → the next n confirmations are booked and
then answered 500 (the answer is lost), ``fail_posts`` = n → the next n confirmations are
answered 500 and not booked, ``refuse_posts`` = n → the next n confirmations are refused
``400`` (a closed posting period) and not booked, ``lose_cancel_answers`` = n → the next n
cancellations are booked and then answered 500, ``refuse_cancel_of`` = {(ConfirmationGroup,
ConfirmationCount), …} → cancelling those is refused ``400`` (a closed posting period) while
they are in it, ``reversals_keep_external_key = False`` → a reversal is booked without the
``ExternalSystemConfirmation`` its cancel was given (the parameter is taken and dropped: whether
SAP keeps it is not documented), ``expire_sessions()`` → every CSRF token is forgotten.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

CONFIRMATION_SERVICE = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
ORDER_SERVICE = "/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV"
CONFIRMATION_METADATA = "API_PROD_ORDER_CONFIRMATION_2_SRV.metadata.xml"
ORDER_METADATA = "API_PRODUCTION_ORDER_2_SRV.edmx"
SESSION_COOKIE = "SAP_SESSIONID_S4H_100"
EDM = "{http://schemas.microsoft.com/ado/2008/09/edm}"
SAP = "{http://www.sap.com/Protocols/SAPData}"
M = "{http://schemas.microsoft.com/ado/2007/08/dataservices/metadata}"


# --- the metadata ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Property:
    name: str
    type: str  # Edm.String, Edm.Decimal, ...
    nullable: bool
    max_length: int | None
    precision: int | None
    scale: int | None
    display_format: str | None


@dataclass(frozen=True)
class EntityType:
    name: str
    keys: tuple[str, ...]
    properties: dict[str, Property]
    navigation: frozenset[str]


def load_metadata(path: Path) -> dict[str, EntityType]:
    """Every EntityType of an EDMX (OData V2 ``$metadata``), by name."""
    found: dict[str, EntityType] = {}
    for node in ET.parse(path).getroot().iter(f"{EDM}EntityType"):

        def number(value: str | None) -> int | None:
            return None if value is None else int(value)

        properties = {
            p.get("Name", ""): Property(
                name=p.get("Name", ""),
                type=p.get("Type", ""),
                nullable=p.get("Nullable", "true") != "false",
                max_length=number(p.get("MaxLength")),
                precision=number(p.get("Precision")),
                scale=number(p.get("Scale")),
                display_format=p.get(f"{SAP}display-format"),
            )
            for p in node.findall(f"{EDM}Property")
        }
        keys = tuple(ref.get("Name", "") for ref in node.iter(f"{EDM}PropertyRef"))
        navigation = frozenset(n.get("Name", "") for n in node.findall(f"{EDM}NavigationProperty"))
        name = node.get("Name", "")
        found[name] = EntityType(name, keys, properties, navigation)
    return found


@dataclass(frozen=True)
class FunctionImport:
    name: str
    http_method: str
    parameters: dict[str, Property]


def load_function_imports(path: Path) -> dict[str, FunctionImport]:
    """Every FunctionImport of an EDMX, by name. A parameter is optional only where the metadata
    says ``Nullable="true"`` (SAP writes it on each optional one; the API hub's OpenAPI marks the
    others required)."""
    found: dict[str, FunctionImport] = {}
    for node in ET.parse(path).getroot().iter(f"{EDM}FunctionImport"):

        def number(value: str | None) -> int | None:
            return None if value is None else int(value)

        parameters = {
            p.get("Name", ""): Property(
                name=p.get("Name", ""),
                type=p.get("Type", ""),
                nullable=p.get("Nullable") == "true",
                max_length=number(p.get("MaxLength")),
                precision=number(p.get("Precision")),
                scale=number(p.get("Scale")),
                display_format=None,
            )
            for p in node.findall(f"{EDM}Parameter")
        }
        name = node.get("Name", "")
        found[name] = FunctionImport(name, node.get(f"{M}HttpMethod", "GET"), parameters)
    return found


_DECIMAL = re.compile(r"^[+-]?([0-9]+)(?:\.([0-9]+))?$")
_DATETIME = re.compile(r"^/Date\((-?[0-9]+)\)/$")
_DATETIMEOFFSET = re.compile(r"^/Date\((-?[0-9]+)([+-][0-9]{4})\)/$")
_TIME = re.compile(r"^PT([0-9]{1,2})H([0-9]{1,2})M([0-9]{1,2})(?:\.[0-9]+)?S$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_INT_RANGE = {
    "Edm.Byte": (0, 255),
    "Edm.Int16": (-(2**15), 2**15 - 1),
    "Edm.Int32": (-(2**31), 2**31 - 1),
}


def value_problem(prop: Property, value: Any) -> str | None:
    """Why ``value`` is not a valid OData V2 JSON value of ``prop`` (None: it is)."""
    kind = prop.type
    if value is None:
        return None if prop.nullable else "must not be null"
    if kind == "Edm.String":
        if not isinstance(value, str):
            return "Edm.String must be a JSON string"
        if prop.max_length is not None and len(value) > prop.max_length:
            return f"is longer than MaxLength {prop.max_length}"
        return None
    if kind == "Edm.Boolean":
        return None if isinstance(value, bool) else "Edm.Boolean must be true or false"
    if kind in _INT_RANGE:
        low, high = _INT_RANGE[kind]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"{kind} must be a JSON integer from {low} to {high}"
        return None
    if kind == "Edm.Decimal":
        if not isinstance(value, str):
            return 'Edm.Decimal must be a JSON string in OData V2 (e.g. "12.5")'
        found = _DECIMAL.match(value)
        if found is None:
            return "is not a decimal number"
        scale, precision = prop.scale or 0, prop.precision
        if len(found[2] or "") > scale:
            return f"has more than Scale {scale} decimal places"
        if precision is not None and len(found[1].lstrip("0")) > precision - scale:
            return f"has more digits than Precision {precision} allows"
        return None
    if kind == "Edm.Double":
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        return None if ok else "Edm.Double must be a number"
    if kind == "Edm.DateTime":
        found = _DATETIME.match(value) if isinstance(value, str) else None
        if found is None:
            return 'Edm.DateTime must be "/Date(<milliseconds since 1970>)/" in OData V2 JSON'
        ms = int(found[1])
        if prop.precision == 0 and ms % 1000:
            return "has fractional seconds, but Precision is 0"
        if prop.display_format == "Date" and ms % 86_400_000:
            return "is a date (sap:display-format Date): the time must be 00:00:00 UTC"
        return None
    if kind == "Edm.DateTimeOffset":
        ok = isinstance(value, str) and _DATETIMEOFFSET.match(value) is not None
        return None if ok else 'Edm.DateTimeOffset must be "/Date(<ms>+hhmm)/"'
    if kind == "Edm.Time":
        found = _TIME.match(value) if isinstance(value, str) else None
        if found is None:
            return 'Edm.Time must be an ISO 8601 duration like "PT14H30M00S"'
        if int(found[1]) > 23 or int(found[2]) > 59 or int(found[3]) > 59:
            return "is not a time of day"
        return None
    if kind == "Edm.Guid":
        ok = isinstance(value, str) and _GUID.match(value) is not None
        return (
            None if ok else 'Edm.Guid must be a string like "01234567-89ab-cdef-0123-456789abcdef"'
        )
    return f"has type {kind}, which this stand-in does not check"


def entity_problem(entity_type: EntityType, entity: Any) -> str | None:
    """Why ``entity`` is not a valid ``entity_type`` in OData V2 JSON (None: it is)."""
    if not isinstance(entity, dict):
        return "The request body must be a JSON object"
    for name, value in entity.items():
        if name == "__metadata":
            continue
        if name in entity_type.navigation:
            return f"Deep insert of '{name}' is not supported by this stand-in"
        prop = entity_type.properties.get(name)
        if prop is None:
            return f"Property '{name}' is invalid: not in type '{entity_type.name}'"
        problem = value_problem(prop, value)
        if problem is not None:
            return f"Property '{name}' has invalid value {_short(value)}: {problem}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def sap_error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """An OData V2 error in SAP's JSON shape."""
    body = {
        "error": {
            "code": code,
            "message": {"lang": "en", "value": message},
            "innererror": {"transactionid": secrets.token_hex(16).upper()},
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# --- $filter, $select, $orderby ----------------------------------------------------------------

_CONDITION = re.compile(
    r"^\s*(?P<prop>[A-Za-z0-9_]+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
    r"(?P<literal>guid'[^']*'|'(?:[^']|'')*'|true|false|-?[0-9]+(?:\.[0-9]+)?)\s*$"
)
_COMPARE = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and a > b,
    "ge": lambda a, b: a is not None and a >= b,
    "lt": lambda a, b: a is not None and a < b,
    "le": lambda a, b: a is not None and a <= b,
}


class QueryError(ValueError):
    pass


_URI_DATETIME = re.compile(
    r"^datetime'([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?)'$"
)


def parameter_value(prop: Property, literal: str) -> Any:
    """A function import parameter's OData V2 URI literal as the JSON value of its type (then
    checked like a property); ``QueryError`` for a literal that is not of its type."""
    if prop.type == "Edm.String" and len(literal) >= 2 and literal[0] == literal[-1] == "'":
        return literal[1:-1].replace("''", "'")
    if prop.type == "Edm.Guid" and literal.startswith("guid'") and literal.endswith("'"):
        return literal[5:-1]
    found = _URI_DATETIME.match(literal) if prop.type == "Edm.DateTime" else None
    if found is not None:
        moment = datetime.fromisoformat(found[1]).replace(tzinfo=UTC)
        return f"/Date({round(moment.timestamp() * 1000)})/"
    raise QueryError(f"Parameter '{prop.name}' has invalid value {literal}: not an {prop.type}")


def call_parameters(function: FunctionImport, given: dict[str, str]) -> dict[str, Any]:
    """A function import's parameters from the query string, by name, as JSON values."""
    unknown = [name for name in given if name not in function.parameters]
    if unknown:
        raise QueryError(f"Parameter '{unknown[0]}' is not defined for '{function.name}'")
    found: dict[str, Any] = {}
    for name, prop in function.parameters.items():
        if name not in given:
            if not prop.nullable:
                raise QueryError(f"Parameter '{name}' of '{function.name}' is missing")
            continue
        value = parameter_value(prop, given[name])
        problem = value_problem(prop, value)
        if problem is not None:
            raise QueryError(f"Parameter '{name}' has invalid value {_short(value)}: {problem}")
        found[name] = value
    return found


def _literal(text: str) -> Any:
    if text.startswith("guid'"):
        if not _GUID.match(text[5:-1]):
            raise QueryError(f"Invalid guid literal {text}")
        return text[5:-1].lower()
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text in ("true", "false"):
        return text == "true"
    return text


def select(
    entity_type: EntityType, entities: list[dict[str, Any]], query: dict[str, str]
) -> list[dict[str, Any]]:
    """``entities`` after ``$filter``, ``$orderby``, ``$skip``, ``$top`` and ``$select``."""
    found = list(entities)
    if query.get("$filter"):
        for part in re.split(r"\s+and\s+", query["$filter"]):
            match = _CONDITION.match(part)
            if match is None:
                raise QueryError(f"Invalid filter expression '{part}'")
            name = match["prop"]
            if name not in entity_type.properties:
                raise QueryError(f"Property '{name}' not found in type '{entity_type.name}'")
            wanted, compare = _literal(match["literal"]), _COMPARE[match["op"]]
            guid = entity_type.properties[name].type == "Edm.Guid"

            def value(entity: dict[str, Any], name: str = name, guid: bool = guid) -> Any:
                got = entity.get(name)
                return got.lower() if guid and isinstance(got, str) else got

            found = [e for e in found if compare(value(e), wanted)]
    if query.get("$orderby"):
        name, _, direction = query["$orderby"].partition(" ")
        if name not in entity_type.properties:
            raise QueryError(f"Property '{name}' not found in type '{entity_type.name}'")
        found.sort(
            key=lambda e: (e.get(name) is not None, e.get(name) or ""), reverse=direction == "desc"
        )
    found = found[int(query.get("$skip", "0")) :]
    if "$top" in query:
        found = found[: int(query["$top"])]
    if query.get("$select"):
        names = query["$select"].split(",")
        unknown = [n for n in names if n not in entity_type.properties]
        if unknown:
            raise QueryError(f"Property '{unknown[0]}' not found in type '{entity_type.name}'")
        found = [{"__metadata": e.get("__metadata"), **{n: e.get(n) for n in names}} for e in found]
    return found


# --- the app -----------------------------------------------------------------------------------


def sap_erp(
    fixtures: Path, *, user: str = "MES_HUB", password: str = "s4-password-0123"
) -> FastAPI:
    """The stand-in, its metadata read from ``fixtures`` (``tests.erp_standins.erp_fixtures``)."""
    confirmation_types = load_metadata(fixtures / CONFIRMATION_METADATA)
    order_types = load_metadata(fixtures / ORDER_METADATA)
    confirmation_type = confirmation_types["ProdnOrdConf2Type"]
    order_type = order_types["A_ProductionOrder_2Type"]
    cancel_import = load_function_imports(fixtures / CONFIRMATION_METADATA)["CancelProdnOrdConf"]

    app = FastAPI()
    state = app.state
    state.confirmation_type, state.order_type = confirmation_type, order_type
    state.orders = set()  # OrderIDs that exist: others are refused (empty: any order)
    state.production_orders = []  # A_ProductionOrder_2 entities (add_production_order)
    state.confirmations = []  # every ProdnOrdConf2 booked, duplicates and reversals included
    state.by_external_key = Counter()  # ExternalSystemConfirmation -> confirmations posted
    state.posts = []  # every POST that reached the CSRF check: its x-csrf-token header
    state.cancels = []  # the parameters of every CancelProdnOrdConf that passed the CSRF check
    state.lookups = []  # the $filter of every GET ProdnOrdConf2
    state.token_fetches = 0
    state.tokens = {}  # session -> CSRF token
    state.down = False
    state.error = False
    state.slow = 0.0
    state.reject_login = False
    state.lose_answers = 0
    state.fail_posts = 0
    state.refuse_posts = 0
    state.lose_cancel_answers = 0
    state.refuse_cancel_of = set()
    state.reversals_keep_external_key = True
    state.expire_sessions = state.tokens.clear
    state.order_queries = []

    async def trouble(request: Request) -> Response | None:
        if state.slow:
            await asyncio.sleep(state.slow)
        if state.down:
            return Response("Service unavailable", status_code=503, headers={"Retry-After": "60"})
        if state.reject_login or not _authorized(request, user, password):
            return Response(
                "<html><body>Logon failed</body></html>",
                status_code=401,
                media_type="text/html",
                headers={
                    "WWW-Authenticate": 'Basic realm="SAP NetWeaver Application Server [S4H/100]"'
                },
            )
        if state.error:
            return sap_error(500, "/IWBEP/CM_MGW_RT/000", "Runtime Error: internal error")
        return None

    def with_token(request: Request, response: Response) -> Response:
        if request.headers.get("x-csrf-token", "").lower() == "fetch":
            state.token_fetches += 1
            session = request.cookies.get(SESSION_COOKIE)
            if session is None or session not in state.tokens:
                session = secrets.token_urlsafe(16)
                response.set_cookie(SESSION_COOKIE, session, path="/", httponly=True)
            state.tokens.setdefault(session, secrets.token_urlsafe(18))
            response.headers["x-csrf-token"] = state.tokens[session]
        return response

    def query(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.query_params.items() if k not in ("sap-client", "$format")}

    def collection(
        entity_type: EntityType, entities: list[dict[str, Any]], request: Request
    ) -> Response:
        try:
            found = select(entity_type, entities, query(request))
        except (QueryError, ValueError) as exc:
            return sap_error(400, "/IWBEP/CM_MGW_RT/004", str(exc))
        return with_token(request, JSONResponse({"d": {"results": found}}))

    @app.get(CONFIRMATION_SERVICE + "/")
    async def service_document(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        document = {"d": {"EntitySets": ["ProdnOrdConfMatlDocItm", "ProdnOrdConf2"]}}
        return with_token(request, JSONResponse(document))

    @app.get(CONFIRMATION_SERVICE + "/$metadata")
    async def confirmation_metadata(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        text = (fixtures / CONFIRMATION_METADATA).read_bytes()
        return with_token(request, Response(text, media_type="application/xml"))

    @app.get(CONFIRMATION_SERVICE + "/ProdnOrdConf2")
    async def confirmations(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        state.lookups.append(request.query_params.get("$filter"))
        return collection(confirmation_type, state.confirmations, request)

    def csrf_refused(request: Request) -> Response | None:
        token = request.headers.get("x-csrf-token")
        state.posts.append(token)
        session = request.cookies.get(SESSION_COOKIE)
        if token is None or session is None or state.tokens.get(session) != token:
            return Response(
                "CSRF token validation failed",
                status_code=403,
                media_type="text/plain",
                headers={"x-csrf-token": "Required"},
            )
        return None

    @app.post(CONFIRMATION_SERVICE + "/ProdnOrdConf2")
    async def confirm(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        if (refused := csrf_refused(request)) is not None:
            return refused
        try:
            entity = await request.json()
        except ValueError:
            return sap_error(400, "/IWBEP/CM_MGW_RT/021", "The request body is not valid JSON")
        problem = entity_problem(confirmation_type, entity)
        if problem is not None:
            return sap_error(400, "/IWBEP/CM_MGW_RT/022", problem)
        order = entity.get("OrderID")
        if not order:
            return sap_error(400, "RU/100", "Enter an order number")
        if state.orders and order not in state.orders:
            return sap_error(400, "CO/004", f"Order {order} does not exist")
        if state.fail_posts:
            state.fail_posts -= 1
            return sap_error(500, "/IWBEP/CM_MGW_RT/000", "Runtime Error: the posting failed")
        if state.refuse_posts:
            state.refuse_posts -= 1
            return sap_error(400, "F5/201", "Posting period 003 2026 is not open")
        group, count = _next_keys(state.confirmations, order, entity.get("OrderOperation"))
        booked = _book(confirmation_type, entity, group, count)
        state.confirmations.append(booked)
        if booked.get("ExternalSystemConfirmation"):
            state.by_external_key[booked["ExternalSystemConfirmation"].lower()] += 1
        if state.lose_answers:
            state.lose_answers -= 1
            return sap_error(500, "/IWBEP/CM_MGW_RT/000", "Connection to the backend was lost")
        return JSONResponse({"d": booked}, status_code=201)

    @app.api_route(
        CONFIRMATION_SERVICE + "/" + cancel_import.name, methods=[cancel_import.http_method]
    )
    async def cancel(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        if (refused := csrf_refused(request)) is not None:
            return refused
        try:
            given = call_parameters(cancel_import, query(request))
        except QueryError as exc:
            return sap_error(400, "/IWBEP/CM_MGW_RT/020", str(exc))
        state.cancels.append(given)
        keys = (given["ConfirmationGroup"], given["ConfirmationCount"])
        named = "Confirmation {}/{}".format(*keys)
        original = next(
            (
                c
                for c in state.confirmations
                if (c["ConfirmationGroup"], c["ConfirmationCount"]) == keys
            ),
            None,
        )
        # SAP's message texts; the message numbers are the stand-in's own.
        if original is None:
            return sap_error(400, "RU/102", f"{named} does not exist")
        if original["IsReversal"]:
            return sap_error(400, "RU/504", f"{named} is a cancellation; it cannot be cancelled")
        if original["IsReversed"]:
            return sap_error(400, "RU/505", f"{named} has already been cancelled")
        if keys in state.refuse_cancel_of:
            return sap_error(400, "F5/201", "Posting period 003 2026 is not open")
        group, count = _next_keys(
            state.confirmations, original["OrderID"], original["OrderOperation"]
        )
        reversal = _book(confirmation_type, original, group, count)
        reversal.update(
            IsReversal=True,
            PostingDate=given.get("PostingDate", original["PostingDate"]),
            ConfirmationText=given.get("ConfirmationText", original["ConfirmationText"]),
            ExternalSystemConfirmation=(
                given.get("ExternalSystemConfirmation")
                if state.reversals_keep_external_key
                else None
            ),
        )
        original["IsReversed"] = True
        state.confirmations.append(reversal)
        if state.lose_cancel_answers:
            state.lose_cancel_answers -= 1
            return sap_error(500, "/IWBEP/CM_MGW_RT/000", "Connection to the backend was lost")
        return JSONResponse({"d": reversal})  # a function import answers 200

    @app.get(ORDER_SERVICE + "/A_ProductionOrder_2")
    async def production_orders(request: Request) -> Response:
        if (refused := await trouble(request)) is not None:
            return refused
        state.order_queries.append(query(request))
        return collection(order_type, state.production_orders, request)

    return app


def _authorized(request: Request, user: str, password: str) -> bool:
    given = request.headers.get("authorization", "")
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return secrets.compare_digest(given.encode(), f"Basic {pair}".encode())


def _next_keys(confirmations: list[dict[str, Any]], order: Any, operation: Any) -> tuple[str, str]:
    """The keys SAP gives the next confirmation of an order operation: the operation's
    ``ConfirmationGroup`` (its confirmation number; a new one for its first) and the next
    ``ConfirmationCount`` in it."""
    same = [c for c in confirmations if (c["OrderID"], c["OrderOperation"]) == (order, operation)]
    if not same:
        groups = {c["ConfirmationGroup"] for c in confirmations}
        return f"{len(groups) + 1:010d}", "00000001"
    return same[0]["ConfirmationGroup"], f"{len(same) + 1:08d}"


def _book(
    entity_type: EntityType, entity: dict[str, Any], group: str, count: str
) -> dict[str, Any]:
    """The confirmation as SAP keeps it: every property, the keys assigned."""
    booked: dict[str, Any] = {name: None for name in entity_type.properties}
    booked.update({k: v for k, v in entity.items() if k != "__metadata"})
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    booked.update(
        ConfirmationGroup=group,
        ConfirmationCount=count,
        ConfirmationEntryDate=f"/Date({int(today.timestamp()) * 1000})/",
        EnteredByUser="MES_HUB",
        IsReversed=False,
        IsReversal=False,
    )
    uri = f"ProdnOrdConf2(ConfirmationGroup='{group}',ConfirmationCount='{count}')"
    booked["__metadata"] = {
        "id": uri,
        "uri": uri,
        "type": "API_PROD_ORDER_CONFIRMATION_2_SRV.ProdnOrdConf2Type",
    }
    return booked


def add_production_order(app: FastAPI, **properties: Any) -> dict[str, Any]:
    """Serve one ``A_ProductionOrder_2`` entity (checked against its metadata first)."""
    order_type: EntityType = app.state.order_type
    problem = entity_problem(order_type, properties)
    if problem is not None:
        raise ValueError(f"not a valid A_ProductionOrder_2Type: {problem}")
    entity: dict[str, Any] = {name: None for name in order_type.properties}
    entity.update(properties)
    uri = f"A_ProductionOrder_2('{properties['ManufacturingOrder']}')"
    entity["__metadata"] = {
        "id": uri,
        "uri": uri,
        "type": "API_PRODUCTION_ORDER_2_SRV.A_ProductionOrder_2Type",
    }
    app.state.production_orders.append(entity)
    return entity
