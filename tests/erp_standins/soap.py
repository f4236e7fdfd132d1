"""A SOAP ERP stand-in: a spyne server implementing the operations of the WSDL mes-hub ships
(``adapters/erp/mes-hub-erp.wsdl``), on loopback, in a thread (spyne's WSGI application under
wsgiref). Spyne builds its own schema from the models below and validates every request against
it with lxml; its fields are ``nillable=False`` like the WSDL's, so a client that sends less
than the WSDL requires is refused, and zeep (which reads the shipped WSDL) refuses an answer
that does not match it.

It keeps orders and confirmations, counts repeated confirmation keys, asks HTTP basic auth, and
fails on demand (``fail``): ``down`` (503 and an HTML page), ``client_fault`` (a ``Client``
SOAP fault: the content is refused), ``server_fault`` (a ``Server`` SOAP fault), ``slow``
(answers after ``delay_s``).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from spyne import (
    Application,
    Boolean,
    ComplexModel,
    Date,
    DateTime,
    Double,
    Enum,
    Fault,
    Integer32,
    ServiceBase,
    Unicode,
    rpc,
)
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication

TNS = "urn:mes-hub:erp:v1"
USER, PASSWORD = "mes-hub", "s3cret-Passw0rd"

_TOKEN = r"[A-Za-z0-9_\-]+"

OrderStatus = Enum("released", "cancelled", type_name="OrderStatus")
ConfirmResult = Enum("accepted", "duplicate", type_name="ConfirmResult")


def _required(kind: Any, **more: Any) -> Any:
    return kind(min_occurs=1, nillable=False, **more)


def _optional(kind: Any, **more: Any) -> Any:
    return kind(min_occurs=0, nillable=False, **more)


class Order(ComplexModel):
    __namespace__ = TNS
    _type_info = [
        ("id", _required(Unicode, pattern=_TOKEN, max_len=128)),
        ("partNumber", _required(Unicode, min_len=1, max_len=128)),
        ("quantity", _required(Integer32, ge=1)),
        ("due", _required(DateTime)),
        ("customer", _optional(Unicode, min_len=1, max_len=256)),
        ("machine", _optional(Unicode, pattern=_TOKEN, max_len=128)),
        ("idealCycleTimeSeconds", _optional(Double)),
        ("modified", _required(DateTime)),
        ("status", OrderStatus.customize(min_occurs=1, nillable=False)),
        ("cancelReason", _optional(Unicode, min_len=1, max_len=256)),
    ]


class OrderList(ComplexModel):
    __namespace__ = TNS
    _type_info = [("order", Order.customize(min_occurs=0, max_occurs="unbounded", nillable=False))]


class Confirmation(ComplexModel):
    __namespace__ = TNS
    _type_info = [
        ("key", _required(Unicode, min_len=1, max_len=256)),
        ("orderId", _required(Unicode, pattern=_TOKEN, max_len=128)),
        ("sequence", _required(Integer32)),
        ("operation", _optional(Unicode, min_len=1, max_len=256)),
        ("machine", _optional(Unicode, pattern=_TOKEN, max_len=128)),
        ("yieldQuantity", _required(Integer32)),
        ("scrapQuantity", _required(Integer32)),
        ("start", _optional(DateTime)),
        ("end", _optional(DateTime)),
        ("final", _required(Boolean)),
        ("correctionOf", _optional(Integer32)),
        ("postingDate", _required(Date)),
    ]


@dataclass
class SoapErp:
    """What the stand-in holds and how it behaves; tests change it between calls."""

    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    confirmations: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeats: Counter[str] = field(default_factory=Counter)  # key -> times sent again
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (operation, argument)
    # The Mes-Hub-Checkpoint HTTP header of every request that passed the login (None: absent).
    checkpoint_headers: list[str | None] = field(default_factory=list)
    fail: str | None = None  # down | client_fault | server_fault | slow
    delay_s: float = 3.0
    user: str = USER
    password: str = PASSWORD
    url: str = ""

    def add_order(self, order_id: str, modified: datetime, **fields: Any) -> None:
        self.orders[order_id] = {
            "id": order_id,
            "partNumber": "P-100",
            "quantity": 10,
            "due": datetime(2026, 3, 9, 16, 0, tzinfo=UTC),
            "status": "released",
            "modified": modified,
            **fields,
        }

    def released_since(self, since: datetime | None) -> list[dict[str, Any]]:
        found = [o for o in self.orders.values() if since is None or o["modified"] >= since]
        return sorted(found, key=lambda o: o["modified"])

    def confirm(self, confirmation: dict[str, Any]) -> str:
        key = confirmation["key"]
        if key in self.confirmations:
            self.repeats[key] += 1
            return "duplicate"
        self.confirmations[key] = confirmation
        return "accepted"


def _service(erp: SoapErp) -> type[ServiceBase]:
    class MesHubErpService(ServiceBase):
        @rpc(
            _optional(DateTime),
            _in_variable_names={"since": "since"},
            _returns=OrderList.customize(min_occurs=1, nillable=False),
            _out_variable_name="orders",
            _body_style="wrapped",
        )
        def GetReleasedOrders(ctx: Any, since: datetime | None) -> OrderList:
            erp.calls.append(("GetReleasedOrders", since))
            _misbehave(erp)
            return OrderList(order=[Order(**o) for o in erp.released_since(since)])

        @rpc(
            Confirmation.customize(min_occurs=1, nillable=False),
            _in_variable_names={"confirmation": "confirmation"},
            _returns=ConfirmResult.customize(min_occurs=1, nillable=False),
            _out_variable_name="result",
            _body_style="wrapped",
        )
        def ConfirmOperation(ctx: Any, confirmation: Confirmation) -> str:
            fields = confirmation.as_dict()
            erp.calls.append(("ConfirmOperation", fields))
            _misbehave(erp)
            return erp.confirm(fields)

    return MesHubErpService


def _misbehave(erp: SoapErp) -> None:
    if erp.fail == "client_fault":
        raise Fault("Client.UnknownOrder", "order is not known to this ERP")
    if erp.fail == "server_fault":
        raise Fault("Server", "the ERP's database is locked; try again later")


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _guarded(erp: SoapErp, app: WsgiApp) -> WsgiApp:
    """HTTP basic auth, ``down`` and ``slow`` in front of spyne."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if erp.fail == "slow":
            time.sleep(erp.delay_s)
        if erp.fail == "down":
            start_response("503 Service Unavailable", [("Content-Type", "text/html")])
            return [b"<html><body><h1>503 Service Unavailable</h1></body></html>"]
        expected = base64.b64encode(f"{erp.user}:{erp.password}".encode()).decode()
        if environ.get("HTTP_AUTHORIZATION") != f"Basic {expected}":
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Basic realm="erp"')],
            )
            return [b"login refused"]
        erp.checkpoint_headers.append(environ.get("HTTP_MES_HUB_CHECKPOINT"))
        return app(environ, start_response)

    return guarded


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def served_soap(erp: SoapErp | None = None) -> Iterator[SoapErp]:
    """The stand-in on a free loopback port; ``erp.url`` is its endpoint address."""
    erp = erp or SoapErp()
    application = Application(
        [_service(erp)],
        tns=TNS,
        name="MesHubErp",
        in_protocol=Soap11(validator="lxml"),
        out_protocol=Soap11(),
    )
    wsgi = _guarded(erp, WsgiApplication(application))
    server = make_server(
        "127.0.0.1", 0, wsgi, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="soap-erp", daemon=True
    )
    thread.start()
    erp.url = f"http://127.0.0.1:{server.server_port}/mes-hub/v1"
    spyne_log = logging.getLogger("spyne")
    level = spyne_log.level
    spyne_log.setLevel(logging.CRITICAL)  # the faults asked for are not errors of the test
    try:
        yield erp
    finally:
        spyne_log.setLevel(level)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
