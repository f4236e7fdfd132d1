"""SOAP: an ERP or ESB that implements the WSDL mes-hub ships (``mes-hub-erp.wsdl`` beside this
module; docs/erp/b2mml-soap.md), called with zeep.

```toml
[[erp]]
name = "esb"
dialect = "soap"
url = "https://esb.plant1.example/mes-hub/v1"   # the service's endpoint address
user = "mes-hub"
secret = { env = "ESB_PASSWORD" }               # HTTP basic auth
timezone = "Europe/Paris"                       # for times sent without an offset (optional)
```

Orders in: ``GetReleasedOrders(since)`` with the cursor, the largest ``modified`` seen (the
service returns the orders modified at or after it, so orders stamped in the same instant are
not missed; those read again give the same event ids and publish nothing new). A ``released``
order becomes ``mes.erp.order.released.v1`` with its current state, a ``cancelled`` one
``mes.erp.order.cancelled.v1``; the event id is the order's id, status and ``modified``.

Confirmations out: ``ConfirmOperation(confirmation)``: ``accepted`` is delivered, ``duplicate``
(the service had the key) delivered as a duplicate. A SOAP fault whose code is ``Client`` or
``Sender`` (``Client.*``) fails for good (the content is refused); a ``Server`` fault, an HTTP
error (401 included), a timeout or no connection is retried. The hub's audit checkpoint when the
confirmation was decided goes in the HTTP header ``Mes-Hub-Checkpoint``: the WSDL's
``Confirmation`` has no element for it, and a service that validates against it refuses one.

How zeep calls out: zeep's ``AsyncTransport`` is given the hub's own client,
``hub.outbound.outbound_client`` (httpx), so every connection is checked against the entry's
allowlist and goes to the very address checked; the WSDL is read from the package, never
fetched, and zeep may load nothing else (no remote schema, no DTD, no entities).

Exceptions::

    SoapCallFailed            a call that did not succeed: ``reason`` (never a secret),
                              ``status``, ``excerpt``, ``permanent``; the sender raises it as
                              ``hub.outbox.DeliveryFailed``
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx
from pydantic import Field, ValidationError
from zeep import AsyncClient, Settings
from zeep.exceptions import Error as ZeepError
from zeep.exceptions import Fault, TransportError
from zeep.exceptions import ValidationError as NotSendable
from zeep.helpers import serialize_object
from zeep.proxy import AsyncServiceProxy
from zeep.transports import AsyncTransport

from adapters.erp.b2mml import order_token
from adapters.erp.base import Confirmation, ErpEntryBase, ZoneName
from contracts import CloudEvent, OrderCancelledV1, OrderReleasedV1
from hub.outbound import OutboundRefused, outbound_client
from hub.outbox import EXCERPT_CHARS, Delivered, DeliveryFailed

log = logging.getLogger(__name__)

WSDL = Path(__file__).with_name("mes-hub-erp.wsdl")
NAMESPACE = "urn:mes-hub:erp:v1"
BINDING = f"{{{NAMESPACE}}}MesHubErpBinding"
# HTTP headers of the call being made (``SoapService.call``'s ``http_headers``), which zeep has no
# argument for: the transport adds them to the POST of the task that set them.
_CALL_HEADERS: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "soap_call_headers", default=()
)


class SoapCallFailed(Exception):
    """A SOAP call that did not succeed, and whether trying again can help."""

    def __init__(
        self, reason: str, *, status: int | None = None, excerpt: str = "", permanent: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason, self.status, self.excerpt, self.permanent = reason, status, excerpt, permanent


class Entry(ErpEntryBase):
    """An ERP or ESB implementing mes-hub's WSDL at ``url``."""

    dialect: Literal["soap"]
    timezone: ZoneName | None = Field(
        default=None,
        description="IANA zone for times the service sends without an offset (else refused), "
        "and for the posting date of confirmations (UTC without it)",
    )


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> SoapOrders | None:
    """``GetReleasedOrders`` polls (``state_dir`` unused: every order comes whole)."""
    assert isinstance(entry, Entry)
    return SoapOrders(entry) if entry.poll_interval_s > 0 else None


def confirmation_sender(entry: ErpEntryBase) -> SoapSender | None:
    assert isinstance(entry, Entry)
    return SoapSender(entry) if entry.confirm else None


# --- the service -------------------------------------------------------------------------------


class _CheckedTransport(AsyncTransport):
    """zeep's httpx transport on the hub's checked client; nothing is loaded from outside."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        refusing = httpx.Client(transport=httpx.MockTransport(_refuse_load), trust_env=False)
        super().__init__(client=client, wsdl_client=refusing)  # type: ignore[no-untyped-call]
        self._refusing = refusing

    def _load_remote_data(self, url: str) -> bytes:
        raise OutboundRefused(f"{url}: the hub loads no WSDL or schema from the network")

    async def post_xml(self, address: str, envelope: Any, headers: Any) -> Any:
        """An HTTP error without a SOAP envelope (a proxy's 502 page, a 401, a 503) as the
        ``TransportError`` with its status that it is, not as zeep's status-less "unknown
        fault" (zeep reads any well-formed answer to a failed call as a fault)."""
        headers = {**headers, **dict(_CALL_HEADERS.get())}
        response = await super().post_xml(address, envelope, headers)  # type: ignore[no-untyped-call]
        status = int(response.status_code)
        if not 200 <= status < 300 and b"Envelope" not in bytes(response.content[:1024]):
            raise TransportError(  # type: ignore[no-untyped-call]
                f"HTTP {status}", status_code=status, content=response.content
            )
        return response

    async def aclose(self) -> None:
        self._refusing.close()
        await self.client.aclose()


def _refuse_load(request: httpx.Request) -> httpx.Response:
    raise OutboundRefused(f"{request.url.host}: the hub loads no WSDL or schema from the network")


class SoapService:
    """The entry's service, bound to its ``url`` on first use (the WSDL is parsed then, not at
    import); ``call`` maps every failure to ``SoapCallFailed``."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: AsyncClient | None = None
        self._proxy: Any = None
        self._binding = asyncio.Lock()

    async def _ready(self) -> Any:
        async with self._binding:  # one client, however many calls come first
            if self._proxy is None:
                await asyncio.to_thread(self._bind)
        return self._proxy

    def _bind(self) -> Any:
        """The proxy (the secret read and the WSDL parsed here: off the event loop)."""
        if self._proxy is None:
            auth: httpx.Auth | None = None
            if self.entry.secret is not None:
                secret = self.entry.secret.read().get_secret_value()
                auth = httpx.BasicAuth(self.entry.user or "", secret)
            http = outbound_client(self.entry.allowlist(), self.entry.timeout_s, auth=auth)
            settings = Settings(
                strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True
            )
            transport = _CheckedTransport(http)
            # zeep's constructors carry no annotations.
            client = AsyncClient(str(WSDL), transport=transport, settings=settings)  # type: ignore[no-untyped-call]
            binding = client.wsdl.bindings[BINDING]
            self._proxy = AsyncServiceProxy(client, binding, address=self.entry.url)  # type: ignore[no-untyped-call]
            self._client = client
        return self._proxy

    async def call(
        self, operation: str, http_headers: dict[str, str] | None = None, **arguments: Any
    ) -> Any:
        """``operation`` with ``arguments``; ``http_headers``: added to its HTTP POST."""
        token = _CALL_HEADERS.set(tuple((http_headers or {}).items()))
        try:
            proxy = await self._ready()
            return await getattr(proxy, operation)(**arguments)
        except Fault as fault:
            raise _fault(operation, fault) from None
        except TransportError as exc:
            status = exc.status_code or None
            excerpt = _text(exc.content)[:EXCERPT_CHARS]
            if status in (401, 403):
                who = f" (user {self.entry.user})" if self.entry.user else ""
                reason = f"{operation}: HTTP {status}: the service refused the login{who}"
            else:
                reason = f"{operation}: HTTP {status}"
            raise SoapCallFailed(reason, status=status, excerpt=excerpt) from None
        except httpx.TimeoutException:
            reason = f"{operation}: no answer within {self.entry.timeout_s:g} s"
            raise SoapCallFailed(reason) from None
        except httpx.HTTPError as exc:
            raise SoapCallFailed(f"{operation}: {type(exc).__name__}: {exc}") from None
        except (OutboundRefused, ValueError) as exc:  # a refused address, an unreadable secret
            raise SoapCallFailed(f"{operation}: {exc}") from None
        except ZeepError as exc:  # what zeep will not send, or cannot read back
            reason = f"{operation}: {type(exc).__name__}: {exc}"
            # Not sendable as it is: the message is at fault. An answer zeep cannot read
            # (XMLSyntaxError, XMLParseError) may have been booked: retrying is safe (keys).
            permanent = isinstance(exc, NotSendable)
            raise SoapCallFailed(reason, permanent=permanent) from None
        finally:
            _CALL_HEADERS.reset(token)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.transport.aclose()
            self._client, self._proxy = None, None


def _fault(operation: str, fault: Fault) -> SoapCallFailed:
    """A SOAP fault: ``Client``/``Sender`` (``Client.*``) codes refuse the content for good,
    except an authentication fault (``Client.Authentication``…), which a fixed login cures."""
    code = str(fault.code or "")
    local = code.rsplit(":", 1)[-1].rsplit("}", 1)[-1]
    head = local.split(".", 1)[0]
    login = "auth" in local.lower() or "security" in local.lower()
    permanent = head in ("Client", "Sender") and not login
    message = str(fault.message or "").strip()
    return SoapCallFailed(
        f"{operation}: SOAP fault {local or '(no code)'}: {message}"[:1024],
        excerpt=message[:EXCERPT_CHARS],
        permanent=permanent,
    )


def _text(content: Any) -> str:
    if isinstance(content, bytes):
        return content.decode("utf-8", "replace")
    return str(content or "")


# --- orders in ---------------------------------------------------------------------------------


class SoapOrders:
    """``GetReleasedOrders`` from the cursor on (see the module)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.service = SoapService(entry)
        self.source = f"urn:mes-hub:erp:{entry.name}"
        self.zone = ZoneInfo(entry.timezone) if entry.timezone else None

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        try:
            since = datetime.fromisoformat(cursor) if cursor else None
        except ValueError:
            raise SoapCallFailed(f"GetReleasedOrders: cursor {cursor!r} is not a time") from None
        answer = await self.service.call("GetReleasedOrders", since=since)
        orders = _orders(serialize_object(answer, dict))  # type: ignore[no-untyped-call]
        events: list[CloudEvent] = []
        latest = since
        for order in orders:
            modified = self._aware(order.get("modified"))
            if modified is not None:
                latest = modified if latest is None else max(latest, modified)
            event = self._event(order, modified)
            if event is not None:
                events.append(event)
        return events, _stamp(latest) if latest is not None else cursor

    def _aware(self, value: Any) -> datetime | None:
        if not isinstance(value, datetime):
            return None
        if value.tzinfo is not None:
            return value
        return value.replace(tzinfo=self.zone) if self.zone else None

    def _event(self, order: dict[str, Any], modified: datetime | None) -> CloudEvent | None:
        raw_id = str(order.get("id") or "").strip()
        if not raw_id:
            log.warning("SOAP %s: an order without id: skipped", self.entry.name)
            return None
        if modified is None:
            log.warning(
                "SOAP %s: order %s: modified %r is missing or has no UTC offset (give the "
                "entry a timezone): skipped",
                self.entry.name,
                raw_id,
                order.get("modified"),
            )
            return None
        order_id = order_token(raw_id)
        status = str(order.get("status") or "")
        try:
            if status == "cancelled":
                reason = order.get("cancelReason") or f"cancelled in {self.entry.name}"
                data = OrderCancelledV1(order_id=order_id, reason=str(reason)).model_dump(
                    mode="json"
                )
            elif status == "released":
                due = self._aware(order.get("due"))
                if due is None:
                    raise ValueError(f"due {order.get('due')!r} has no UTC offset")
                machine = order.get("machine")
                cycle = order.get("idealCycleTimeSeconds")
                data = OrderReleasedV1(
                    order_id=order_id,
                    part_number=str(order.get("partNumber") or ""),
                    quantity=order.get("quantity"),
                    due=due,
                    customer=order.get("customer"),
                    machine_id=order_token(str(machine)) if machine else None,
                    ideal_cycle_time_s=float(cycle) if cycle is not None else None,
                ).model_dump(mode="json", exclude_none=True)
            else:
                raise ValueError(f"status {status!r} is neither released nor cancelled")
        except (ValidationError, ValueError) as exc:
            log.warning(
                "SOAP %s: order %s (modified %s) skipped: %s",
                self.entry.name,
                raw_id,
                modified.isoformat(),
                _problem(exc),
            )
            return None
        extensions = {} if raw_id == order_id else {"erpid": raw_id[:1024]}
        return CloudEvent(
            specversion="1.0",
            id=f"{order_id}.{status}.{modified.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}",
            source=self.source,
            type=f"mes.erp.order.{status}.v1",
            time=modified,
            subject=order_id,
            data=data,
            **extensions,
        )

    async def close(self) -> None:
        await self.service.close()


def _orders(answer: Any) -> list[dict[str, Any]]:
    """The orders of a ``GetReleasedOrdersResponse``, however zeep unwrapped it."""
    if answer is None:
        return []
    if isinstance(answer, dict):
        answer = answer.get("order", answer.get("orders")) or []
        return _orders(answer) if isinstance(answer, dict) else list(answer)
    return [o for o in answer if isinstance(o, dict)]


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- confirmations out -------------------------------------------------------------------------


class SoapSender:
    """``ConfirmOperation`` per confirmation (see the module)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.service = SoapService(entry)
        self.zone = ZoneInfo(entry.timezone) if entry.timezone else UTC

    def message(self, confirmation: Confirmation) -> dict[str, Any]:
        """The ``Confirmation`` element's fields (None: left out)."""
        return {
            "key": confirmation.key,
            "orderId": confirmation.order_id,
            "sequence": confirmation.sequence,
            "operation": confirmation.operation,
            "machine": confirmation.machine_id,
            "yieldQuantity": confirmation.yield_quantity,
            "scrapQuantity": confirmation.scrap_quantity,
            "start": _utc(confirmation.start),
            "end": _utc(confirmation.end),
            "final": confirmation.final,
            "correctionOf": confirmation.correction_of,
            "postingDate": self.posting_date(confirmation.posted_at),
        }

    def posting_date(self, posted_at: datetime) -> date:
        return posted_at.astimezone(self.zone).date()

    async def send(self, confirmation: Confirmation) -> Delivered:
        try:
            result = await self.service.call(
                "ConfirmOperation",
                http_headers=confirmation.checkpoint_header(),
                confirmation=self.message(confirmation),
            )
        except SoapCallFailed as exc:
            raise DeliveryFailed(
                exc.reason, status=exc.status, excerpt=exc.excerpt, permanent=exc.permanent
            ) from None
        answer = str(result)
        if answer == "duplicate":
            return Delivered(status=200, excerpt=answer, duplicate=True)
        if answer == "accepted":
            return Delivered(status=200, excerpt=answer)
        raise DeliveryFailed(f"ConfirmOperation answered {answer[:100]!r}", excerpt=answer[:512])

    async def close(self) -> None:
        await self.service.close()


__all__ = [
    "BINDING",
    "NAMESPACE",
    "WSDL",
    "Entry",
    "SoapCallFailed",
    "SoapOrders",
    "SoapSender",
    "SoapService",
    "confirmation_sender",
    "order_source",
]
