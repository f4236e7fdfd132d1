"""SAP S/4HANA (``dialect = "sap"``): production confirmations out through the OData V2 service
``API_PROD_ORDER_CONFIRMATION_2_SRV`` (entity set ``ProdnOrdConf2``), and orders in from
``API_PRODUCTION_ORDER_2_SRV`` (entity set ``A_ProductionOrder_2``). docs/erp.md ("SAP")
describes the keys, the properties sent and where the service metadata defines them.

```toml
[[erp]]
name = "s4"
dialect = "sap"
url = "https://s4.plant1.example:44300"
user = "MES_HUB"                      # a communication user with the two services' roles
secret = { file = "/run/secrets/s4" } # its password (basic auth)
client = "100"                        # sap-client, if the system has several
plant = "1010"                        # orders in: ProductionPlant (absent: every plant)
operation = "0010"                    # OrderOperation when a confirmation names none
timezone = "Europe/Berlin"            # SAP dates and times are the plant's local ones
```

Confirmations: every send first looks ``ProdnOrdConf2`` up by ``ExternalSystemConfirmation`` (a
GUID derived from ``confirmation.key``): SAP does not refuse a second confirmation with the same
external key, it books it again, so a message that may have been posted before (an answer lost,
a hub restarted between the POST and its answer) is found and reported delivered
(``duplicate=True``) instead of being posted twice. The lookup's ``GET`` also fetches the CSRF
token (``x-csrf-token: Fetch``) that the ``POST`` needs, with the session cookies that go with
it; a ``403`` answered ``x-csrf-token: Required`` fetches a new token once.

``ConfirmationText`` (40 characters) carries the hub's audit checkpoint as far as it can: the
tree size and a prefix of the root, after the machine and sequence (``confirmation_text``).

Corrections: SAP posts no negative quantity, so a confirmation whose yield or scrap is negative
(a correction that lowers what was confirmed) is made by reversal and re-post: the operation's
active confirmations the hub posted are cancelled (function import ``CancelProdnOrdConf``), and
one confirmation with the order's totals as the hub tells them (``yield_total``,
``scrap_total``) is posted with this message's external key; totals of 0 post nothing. The hub's
postings are told by their ``ExternalSystemConfirmation``: the GUID of one of the keys the order's
earlier confirmations were sent with (``confirmation.earlier_keys``); another system's (another
external key) or an operator's (none) is neither cancelled nor counted. A retry after a stop
anywhere in between finds the re-post by its key (a duplicate) or cancels what is still active
and posts the totals. Once something is cancelled, a refusal is retryable, not permanent: SAP
holds less than the hub confirmed until the correction is finished.

Errors::

    adapters.erp.rest.OrdersUnavailable   the orders could not be read this time
    hub.outbox.DeliveryFailed             a confirmation not taken: permanent for what SAP
                                          refuses (400: its message in the reason) or cannot
                                          take (OrderID, OrderOperation too long); retryable
                                          for 401, 403, 408, 429, 5xx, time-outs and no
                                          connection, and for any refusal in a correction
                                          once something has been cancelled
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import httpx
from pydantic import Field, SecretStr

from adapters.erp.base import (
    Confirmation,
    Delivered,
    DeliveryFailed,
    ErpEntryBase,
    SecretRef,
    ZoneName,
)
from adapters.erp.rest import (
    URL_PATH,
    FieldMapping,
    OrderBook,
    OrdersUnavailable,
    RecordMapper,
    join_url,
    one_line,
    order_source_urn,
    polled_changes,
    read_secret,
    retry_after,
    rfc3339,
    scrubbed,
    state_file,
    transport_failure,
)
from contracts import CloudEvent
from hub.outbound import OutboundRefused, outbound_client
from hub.outbox import EXCERPT_CHARS

CONFIRMATION_SERVICE = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
ORDER_SERVICE = "/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV"
CONFIRMATIONS = "ProdnOrdConf2"  # EntitySet of ProdnOrdConf2Type
CANCEL = "CancelProdnOrdConf"  # FunctionImport (POST) that reverses one ProdnOrdConf2
ORDERS = "A_ProductionOrder_2"  # EntitySet of A_ProductionOrder_2Type
# ExternalSystemConfirmation is an Edm.Guid (no MaxLength): a name-based (version 5) UUID of the
# confirmation's key in this namespace, uuid5(NAMESPACE_URL,
# "urn:mes-hub:erp:sap:ExternalSystemConfirmation"), so the same key always gives the same GUID.
EXTERNAL_KEY_NAMESPACE = uuid.UUID("c0f618c2-53de-5486-acfa-c3771975b726")
# MaxLength of the ProdnOrdConf2Type properties sent as text (the service's $metadata).
MAX_LENGTH = {"OrderID": 12, "OrderOperation": 4, "ConfirmationText": 40}
# The fewest characters of the checkpoint's base64 root worth putting in ConfirmationText
# (48 bits: a prefix a forger would have to match).
SAP_ROOT_PREFIX_MIN = 8
# ProdnOrdConf2Type properties read back: the keys, whether a record still counts, whose it is,
# and what a correction carries over into the confirmation that replaces the cancelled ones.
RECORD_PROPERTIES = (
    "ConfirmationGroup",
    "ConfirmationCount",
    "OrderID",
    "OrderOperation",
    "IsReversed",
    "IsReversal",
    "ExternalSystemConfirmation",
    "ConfirmationYieldQuantity",
    "ConfirmationScrapQuantity",
    "ConfirmedExecutionStartDate",
    "ConfirmedExecutionStartTime",
    "ConfirmedExecutionEndDate",
    "ConfirmedExecutionEndTime",
)
# An Edm.Guid that ABAP holds empty may come back as null or as its initial value, all zeros.
NO_GUID = "00000000-0000-0000-0000-000000000000"


class Entry(ErpEntryBase):
    """A ``[[erp]]`` entry of the SAP S/4HANA dialect."""

    dialect: Literal["sap"]
    user: str = Field(min_length=1, max_length=12, description="The SAP user (basic auth)")
    secret: SecretRef = Field(description="The SAP user's password")
    client: str | None = Field(default=None, pattern=r"^[0-9]{3}$", description="sap-client")
    confirmation_service: str = Field(default=CONFIRMATION_SERVICE, pattern=URL_PATH)
    order_service: str = Field(default=ORDER_SERVICE, pattern=URL_PATH)
    plant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,4}$")
    operation: str = Field(default="0010", pattern=r"^[A-Za-z0-9]{1,4}$")
    timezone: ZoneName = Field(default="UTC", description="The plant's time zone (IANA name)")
    page_size: int = Field(default=500, ge=1, le=5000, description="Orders read per poll")
    state_dir: Path | None = Field(
        default=None, description="Where the orders' last state is kept (see order_source)"
    )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def order_source(entry: ErpEntryBase, state_dir: Path | None = None) -> SapOrderSource | None:
    """Orders in from ``A_ProductionOrder_2``, or None (``poll_interval_s = 0``). The orders'
    state is kept as by the REST dialect (``adapters.erp.rest.order_source``): in the entry's
    ``state_dir``, else in ``state_dir``."""
    assert isinstance(entry, Entry)
    if entry.poll_interval_s == 0:
        return None
    return SapOrderSource(entry, entry.state_dir or state_dir)


def confirmation_sender(entry: ErpEntryBase) -> SapConfirmationSender | None:
    assert isinstance(entry, Entry)
    return SapConfirmationSender(entry) if entry.confirm else None


# --- OData V2 JSON values ----------------------------------------------------------------------


def edm_date(day: date) -> str:
    """An ``Edm.DateTime`` with ``sap:display-format="Date"``: midnight UTC of that day, in
    OData V2 JSON (``/Date(<ms since 1970>)/``)."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return f"/Date({int(midnight.timestamp()) * 1000})/"


def edm_time(moment: time) -> str:
    """An ``Edm.Time`` (``Precision="0"``) in OData V2 JSON: an ISO 8601 duration."""
    return f"PT{moment.hour:02d}H{moment.minute:02d}M{moment.second:02d}S"


_EDM_DATETIME = re.compile(r"^/Date\((-?[0-9]+)([+-][0-9]{4})?\)/$")
_EDM_TIME = re.compile(r"^PT([0-9]{1,2})H([0-9]{1,2})M([0-9]{1,2})S$")


def parse_edm_date(value: object) -> date | None:
    found = _EDM_DATETIME.match(value) if isinstance(value, str) else None
    if found is None:
        return None
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(found[1]))).date()


def parse_edm_time(value: object) -> time | None:
    found = _EDM_TIME.match(value) if isinstance(value, str) else None
    if found is None or int(found[1]) > 23 or int(found[2]) > 59 or int(found[3]) > 59:
        return None
    return time(int(found[1]), int(found[2]), int(found[3]))


def external_key(key: str) -> uuid.UUID:
    """``ExternalSystemConfirmation`` for a confirmation's idempotency key."""
    return uuid.uuid5(EXTERNAL_KEY_NAMESPACE, key)


def confirmation_entity(confirmation: Confirmation, entry: Entry) -> dict[str, Any]:
    """The ``ProdnOrdConf2`` entity to create; ``DeliveryFailed`` (permanent) for what SAP
    cannot take. Property names, types and formats as in the service's $metadata. (A negative
    quantity is never posted: ``SapConfirmationSender`` makes such a correction by reversal.)"""
    c = confirmation
    operation = c.operation or entry.operation
    for name, value in (("OrderID", c.order_id), ("OrderOperation", operation)):
        if len(value) > MAX_LENGTH[name]:
            raise DeliveryFailed(
                f"{entry.name}: {name} {value!r} is longer than SAP takes "
                f"({MAX_LENGTH[name]} characters)",
                permanent=True,
            )
    zone = entry.zone
    entity: dict[str, Any] = {
        "OrderID": c.order_id,
        "OrderOperation": operation,
        "ConfirmationText": confirmation_text(c),
        "ConfirmationYieldQuantity": str(c.yield_quantity),  # Edm.Decimal: a string in V2
        "ConfirmationScrapQuantity": str(c.scrap_quantity),
        "IsFinalConfirmation": c.final,
        "PostingDate": edm_date(c.posted_at.astimezone(zone).date()),
        "ExternalSystemConfirmation": str(external_key(c.key)),
    }
    for moment, prefix in ((c.start, "ConfirmedExecutionStart"), (c.end, "ConfirmedExecutionEnd")):
        if moment is not None:
            local = moment.astimezone(zone)
            entity[f"{prefix}Date"] = edm_date(local.date())
            entity[f"{prefix}Time"] = edm_time(local.time())
    return entity


def confirmation_text(c: Confirmation) -> str:
    """``ConfirmationText`` (Edm.String, MaxLength 40, the only text ProdnOrdConf2Type has):
    ``mes-hub <machine> #<sequence>`` (`` corrects #<sequence>``), cut at 40, then, in what is
    left, the hub's audit checkpoint as `` @<size>:<root prefix>``: the tree size and as much of
    the base64 root as fits — the whole reference (origin, size, 44 characters of root) never
    does. Left out when fewer than ``SAP_ROOT_PREFIX_MIN`` characters of the root would fit."""
    limit = MAX_LENGTH["ConfirmationText"]
    text = f"mes-hub {c.machine_id or ''} #{c.sequence}".replace("  ", " ")
    if c.correction_of is not None:
        text += f" corrects #{c.correction_of}"
    text = text[:limit]
    parts = (c.checkpoint or "").rsplit(" ", 2)  # origin, size, root
    if len(parts) == 3:
        mark = f" @{parts[1]}:"
        room = limit - len(text) - len(mark)
        if room >= SAP_ROOT_PREFIX_MIN:
            text += mark + parts[2][:room]
    return text


def uri_literal(text: str) -> str:
    """An ``Edm.String`` as an OData V2 URI literal (in a ``$filter``, a function import's
    parameter)."""
    return "'" + text.replace("'", "''") + "'"


def cancel_parameters(
    record: Mapping[str, Any], entity: Mapping[str, Any], day: date
) -> dict[str, str]:
    """``CancelProdnOrdConf``'s parameters for cancelling ``record`` on behalf of the correction
    whose entity is ``entity``, posted on ``day``. The reversal carries the correction's
    ``ExternalSystemConfirmation`` where SAP keeps it (what it cancelled is then named in a
    retry's excerpt, and counted by a correction without the hub's totals); nothing else rests
    on it."""
    return {
        "ConfirmationGroup": uri_literal(str(record.get("ConfirmationGroup"))),
        "ConfirmationCount": uri_literal(str(record.get("ConfirmationCount"))),
        "PostingDate": f"datetime'{day.isoformat()}T00:00'",
        "ConfirmationText": uri_literal(entity["ConfirmationText"]),
        "ExternalSystemConfirmation": f"guid'{entity['ExternalSystemConfirmation']}'",
    }


def decimal_text(value: Decimal) -> str:
    """An ``Edm.Decimal`` in OData V2 JSON: a string, without SAP's trailing zeros."""
    return format(value.normalize(), "f")


def _named(record: Mapping[str, Any]) -> str:
    return (
        f"ConfirmationGroup {record.get('ConfirmationGroup')} "
        f"ConfirmationCount {record.get('ConfirmationCount')}"
    )


def _after(done: list[str]) -> str:
    """Says, in a failure's reason, what was cancelled already (its retry finishes the
    correction)."""
    return f" (after {'; '.join(done)})" if done else ""


def _guid_of(record: Mapping[str, Any]) -> str | None:
    """A record's ``ExternalSystemConfirmation``, lower case (None: it has none: typed in at
    SAP)."""
    key = record.get("ExternalSystemConfirmation")
    if not isinstance(key, str) or key.strip().lower() in ("", NO_GUID):
        return None
    return key.strip().lower()


def _quantity(record: Mapping[str, Any], name: str) -> Decimal | None:
    """An ``Edm.Decimal`` property of a record read back (None: not a decimal)."""
    value = record.get(name)
    try:
        quantity = Decimal(str(value if value is not None else 0))
    except InvalidOperation:
        return None
    return quantity if quantity.is_finite() else None


def _executed(record: Mapping[str, Any], prefix: str, zone: ZoneInfo) -> datetime | None:
    """``ConfirmedExecutionStart``/``End`` (``prefix``) of a record read back, plant time."""
    day = parse_edm_date(record.get(f"{prefix}Date"))
    if day is None:
        return None
    return datetime.combine(day, parse_edm_time(record.get(f"{prefix}Time")) or time(0), zone)


# --- talking to SAP ----------------------------------------------------------------------------


def basic_auth(entry: Entry, secret: SecretStr) -> dict[str, str]:
    pair = f"{entry.user}:{secret.get_secret_value()}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def sap_message(response: httpx.Response, secret: SecretStr | None = None) -> str:
    """SAP's own words from an OData error body (``error.message.value`` and ``error.code``),
    with the secret blanked as in the excerpt (``scrubbed``) should SAP echo it."""
    try:
        error = response.json()["error"]
        value, code = error["message"]["value"], error.get("code")
    except (ValueError, KeyError, TypeError):
        return ""
    if not isinstance(value, str):
        return ""
    said = one_line(scrubbed(value, secret, len(value)), 200)
    if code:
        code_text = str(code)
        said += f" [{one_line(scrubbed(code_text, secret, len(code_text)), 60)}]"
    return said


def sap_failure(
    entry: Entry, response: httpx.Response, secret: SecretStr | None, what: str
) -> DeliveryFailed:
    """A refusal as ``DeliveryFailed``: permanent for a 4xx resending cannot change (not 401,
    403, 408, 429), with SAP's message in the reason; retryable otherwise."""
    status = response.status_code
    permanent = 400 <= status < 500 and status not in (401, 403, 408, 429)
    excerpt = scrubbed(response.text, secret)
    detail = sap_message(response, secret) or one_line(excerpt, 160)
    reason = f"{entry.name}: {what}: HTTP {status} {response.reason_phrase}{retry_after(response)}"
    if detail:
        reason += f": {detail}"
    return DeliveryFailed(reason, status=status, excerpt=excerpt, permanent=permanent)


def _csrf_required(response: httpx.Response) -> bool:
    return (
        response.status_code == 403
        and response.headers.get("x-csrf-token", "").lower() == "required"
    )


def _results(response: httpx.Response) -> list[Any] | None:
    """The ``d.results`` of an OData V2 collection answer (None: not one)."""
    try:
        found = response.json()["d"]["results"]
    except (ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, list) else None


class SapConfirmationSender:
    """Posts confirmations to ``ProdnOrdConf2`` (see the module): lookup, CSRF token, POST; a
    correction that lowers a quantity by reversal (``CancelProdnOrdConf``) and re-post."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._client: httpx.AsyncClient | None = None  # keeps SAP's session cookies
        self._token: str | None = None

    def __repr__(self) -> str:
        return f"SapConfirmationSender({self.entry.name!r})"

    def _url(self, path: str) -> str:
        return join_url(self.entry.url, self.entry.confirmation_service) + path

    def _params(self, **more: str) -> dict[str, str]:
        client = {} if self.entry.client is None else {"sap-client": self.entry.client}
        return {**client, **more}

    async def send(self, confirmation: Confirmation) -> Delivered:
        entry = self.entry
        entity = confirmation_entity(confirmation, entry)
        secret = read_secret(entry.name, entry.secret)
        auth = basic_auth(entry, secret)
        if self._client is None:
            self._client = outbound_client(entry.allowlist(), entry.timeout_s)
        client = self._client
        try:
            by_key = await self._records(
                client,
                auth,
                secret,
                f"ExternalSystemConfirmation eq guid'{entity['ExternalSystemConfirmation']}'",
                "lookup by ExternalSystemConfirmation",
            )
            posted = [record for record in by_key if not record.get("IsReversal")]
            if posted:
                return Delivered(200, f"already posted as {_named(posted[0])}", duplicate=True)
            if confirmation.yield_quantity < 0 or confirmation.scrap_quantity < 0:
                return await self._correct(client, auth, secret, confirmation, entity, by_key)
            response = await self._post(client, auth, secret, f"/{CONFIRMATIONS}", json=entity)
        except (httpx.HTTPError, OutboundRefused) as exc:
            reason = transport_failure(entry.name, exc, entry.timeout_s)
            raise DeliveryFailed(reason, permanent=False) from None
        if not response.is_success:
            raise sap_failure(entry, response, secret, "confirmation")
        return Delivered(response.status_code, self._created(response, secret))

    async def _correct(
        self,
        client: httpx.AsyncClient,
        auth: dict[str, str],
        secret: SecretStr,
        confirmation: Confirmation,
        entity: dict[str, Any],
        by_key: list[Mapping[str, Any]],
    ) -> Delivered:
        """A correction that lowers a quantity, by reversal and re-post (see the module).
        ``by_key``: what SAP holds with this message's external key, here only reversals."""
        entry, c = self.entry, confirmation
        operation = entity["OrderOperation"]
        if c.sequence > 1 and not c.earlier_keys:
            # Nothing would be recognised as the hub's: the totals would come on top of them.
            raise DeliveryFailed(
                f"{entry.name}: confirmation #{c.sequence} of order {c.order_id} lowers a "
                "quantity, but the keys of the order's earlier confirmations were not given: "
                "the hub's postings cannot be told from other systems'",
                permanent=True,
            )
        # Reversals with this key: made by an earlier attempt of this very message that stopped
        # before its re-post, where SAP keeps the cancel's external key on the reversal.
        cancelled_before = [record for record in by_key if record.get("IsReversal")]
        found = await self._records(
            client,
            auth,
            secret,
            f"OrderID eq {uri_literal(c.order_id)} and OrderOperation eq {uri_literal(operation)}"
            " and IsReversal eq false",
            f"confirmations of order {c.order_id} operation {operation}",
        )
        # The hub's postings on the operation, reversed or not: those whose external key is the
        # GUID of a key the order's earlier confirmations were sent with. Another system's (its
        # own external key) and an operator's (none) are neither cancelled nor counted.
        ours = {str(external_key(key)) for key in c.earlier_keys}
        hub = [record for record in found if _guid_of(record) in ours]
        active = [record for record in hub if not record.get("IsReversed")]
        if c.yield_total is not None and c.scrap_total is not None:
            # The order's totals as the hub tells them: right whatever an earlier attempt of this
            # message cancelled already, and whether or not SAP kept its key on the reversals.
            yield_total, scrap_total = Decimal(c.yield_total), Decimal(c.scrap_total)
        else:
            # Fallback, only for a confirmation decided by a hub from before the totals were told:
            # what SAP holds of the hub's plus the correction (never below 0). A retry after some
            # cancels counts them only where SAP keeps the cancel's external key on the reversal.
            # Every quantity is read before anything is cancelled: a bad one changes nothing.
            replaced = cancelled_before + active
            zero = Decimal(0)
            yield_total = max(
                self._total(replaced, "ConfirmationYieldQuantity") + c.yield_quantity, zero
            )
            scrap_total = max(
                self._total(replaced, "ConfirmationScrapQuantity") + c.scrap_quantity, zero
            )
        earlier = self._cancelled_earlier(c, hub, active, cancelled_before)

        day = c.posted_at.astimezone(entry.zone).date()
        cancelled: list[str] = []
        status = 200
        for record in active:
            response = await self._post(
                client, auth, secret, f"/{CANCEL}", params=cancel_parameters(record, entity, day)
            )
            if not response.is_success:
                what = f"cancelling {_named(record)}"
                raise self._refused(response, secret, what, earlier, cancelled)
            cancelled.append(_named(record))
            status = response.status_code
        notes = []
        if cancelled_before:
            notes.append(f"cancelled before: reversal {', '.join(map(_named, cancelled_before))}")
        if cancelled:
            notes.append(f"cancelled {', '.join(cancelled)}")
        if yield_total == 0 and scrap_total == 0:  # nothing left to confirm: only the cancels
            if not active and not cancelled_before:
                notes.append(
                    f"no active confirmation of the hub's for order {c.order_id} "
                    f"operation {operation}"
                )
            # All cancelled by an earlier attempt, nothing more to do now: this one is a repeat.
            repeat = bool(cancelled_before) and not active
            return Delivered(status, "; ".join(notes)[:EXCERPT_CHARS], duplicate=repeat)

        # The confirmation that replaces them: the totals, and the execution span of the hub's
        # postings on the operation, those cancelled by an earlier attempt too (SAP takes an
        # operation's actual dates from its confirmations).
        zone = entry.zone
        starts = [c.start, *(_executed(r, "ConfirmedExecutionStart", zone) for r in hub)]
        ends = [c.end, *(_executed(r, "ConfirmedExecutionEnd", zone) for r in hub)]
        corrected = replace(
            c,
            start=min((s for s in starts if s is not None), default=None),
            end=max((e for e in ends if e is not None), default=None),
        )
        repost = confirmation_entity(corrected, entry)  # IsFinalConfirmation: the message's
        repost["ConfirmationYieldQuantity"] = decimal_text(yield_total)
        repost["ConfirmationScrapQuantity"] = decimal_text(scrap_total)
        response = await self._post(client, auth, secret, f"/{CONFIRMATIONS}", json=repost)
        if not response.is_success:
            what = "confirmation with the corrected totals"
            raise self._refused(response, secret, what, earlier, cancelled)
        made = self._created(response, secret)
        posted = (
            f"posted {made} (yield {decimal_text(yield_total)}, scrap {decimal_text(scrap_total)})"
        )
        return Delivered(response.status_code, "; ".join([*notes, posted])[:EXCERPT_CHARS])

    def _cancelled_earlier(
        self,
        c: Confirmation,
        hub: Sequence[Mapping[str, Any]],
        active: Sequence[Mapping[str, Any]],
        cancelled_before: Sequence[Mapping[str, Any]],
    ) -> list[str]:
        """What an earlier attempt of this correction cancelled and nothing has replaced yet, as
        a failure's reason says it (empty: nothing). The reversals carrying this message's key;
        where SAP does not keep it on them, a shortfall: some of the hub's postings are reversed
        and the active ones hold less than the order had confirmed before this correction."""
        if cancelled_before:
            return [f"an earlier attempt's reversal {', '.join(map(_named, cancelled_before))}"]
        if c.yield_total is None or c.scrap_total is None:
            return []
        if not any(record.get("IsReversed") for record in hub):
            return []
        before = (c.yield_total - c.yield_quantity, c.scrap_total - c.scrap_quantity)
        names = ("ConfirmationYieldQuantity", "ConfirmationScrapQuantity")
        # (a quantity that is not a decimal counts 0: rather retried than dead)
        held = [
            sum((_quantity(r, name) or Decimal(0) for r in active), Decimal(0)) for name in names
        ]
        if held[0] >= before[0] and held[1] >= before[1]:
            return []
        return [
            f"an earlier attempt's cancels: the hub's active confirmations hold yield "
            f"{decimal_text(held[0])}, scrap {decimal_text(held[1])} of the {before[0]}, "
            f"{before[1]} confirmed before"
        ]

    def _refused(
        self,
        response: httpx.Response,
        secret: SecretStr,
        what: str,
        earlier: list[str],
        cancelled: list[str],
    ) -> DeliveryFailed:
        """A refusal in a correction: as any (``sap_failure``) while nothing is cancelled; once
        something is (by this attempt or an earlier one), retryable whatever SAP said, the reason
        naming what: SAP holds less than the hub confirmed until the correction is finished, and
        a dead message would leave it so."""
        done = [*earlier, *([f"cancelling {', '.join(cancelled)}"] if cancelled else [])]
        failure = sap_failure(self.entry, response, secret, what + _after(done))
        if done and failure.permanent:
            failure.permanent = False
        return failure

    def _total(self, records: Sequence[Mapping[str, Any]], name: str) -> Decimal:
        """The sum of an ``Edm.Decimal`` property over ``records``."""
        total = Decimal(0)
        for record in records:
            value = record.get(name)
            try:
                quantity = Decimal(str(value if value is not None else 0))
            except InvalidOperation:
                quantity = Decimal("NaN")
            if not quantity.is_finite():
                raise DeliveryFailed(
                    f"{self.entry.name}: {name} {value!r} of {_named(record)} is not a decimal"
                )
            total += quantity
        return total

    async def _records(
        self,
        client: httpx.AsyncClient,
        auth: dict[str, str],
        secret: SecretStr,
        condition: str,
        what: str,
    ) -> list[Mapping[str, Any]]:
        """The ``ProdnOrdConf2`` records that meet ``condition`` (a ``$filter``); fetches the
        CSRF token on the way when none is held (the POSTs that follow need it)."""
        params = self._params(
            **{
                "$filter": condition,
                "$select": ",".join(RECORD_PROPERTIES),
                "$format": "json",
            }
        )
        headers = {"Accept": "application/json", **auth}
        if self._token is None:
            headers["x-csrf-token"] = "Fetch"
        response = await client.get(self._url(f"/{CONFIRMATIONS}"), params=params, headers=headers)
        if not response.is_success:
            raise sap_failure(self.entry, response, secret, what)
        self._keep_token(response)
        found = _results(response)
        if found is None:
            raise DeliveryFailed(
                f"{self.entry.name}: {what}: the answer is not an OData V2 collection (d.results)",
                status=response.status_code,
                excerpt=scrubbed(response.text, secret),
            )
        return [record for record in found if isinstance(record, Mapping)]

    async def _fetch_token(
        self, client: httpx.AsyncClient, auth: dict[str, str], secret: SecretStr
    ) -> None:
        response = await client.get(
            self._url("/"),
            params=self._params(),
            headers={"Accept": "application/json", "x-csrf-token": "Fetch", **auth},
        )
        if not response.is_success:
            raise sap_failure(self.entry, response, secret, "CSRF token")
        self._keep_token(response)
        if self._token is None:
            raise DeliveryFailed(f"{self.entry.name}: CSRF token: SAP sent none")

    def _keep_token(self, response: httpx.Response) -> None:
        token = response.headers.get("x-csrf-token")
        if token and token.lower() != "required":
            self._token = token

    async def _post(
        self,
        client: httpx.AsyncClient,
        auth: dict[str, str],
        secret: SecretStr,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """A ``POST`` with the session's CSRF token; a ``403`` answered ``x-csrf-token:
        Required`` (the session or its token expired) fetches a new token and posts once more."""
        response = await self._post_once(client, auth, path, params, json)
        if _csrf_required(response):
            self._token = None
            await self._fetch_token(client, auth, secret)
            response = await self._post_once(client, auth, path, params, json)
        return response

    async def _post_once(
        self,
        client: httpx.AsyncClient,
        auth: dict[str, str],
        path: str,
        params: dict[str, str] | None,
        json: dict[str, Any] | None,
    ) -> httpx.Response:
        headers = {"Accept": "application/json", **auth}
        if self._token is not None:
            headers["x-csrf-token"] = self._token
        return await client.post(
            self._url(path), params=self._params(**(params or {})), json=json, headers=headers
        )

    def _created(self, response: httpx.Response, secret: SecretStr) -> str:
        try:
            made = response.json()["d"]
            return (
                f"ConfirmationGroup {made['ConfirmationGroup']} "
                f"ConfirmationCount {made['ConfirmationCount']}"
            )
        except (ValueError, KeyError, TypeError):
            return scrubbed(response.text, secret, EXCERPT_CHARS)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# --- orders in ---------------------------------------------------------------------------------

# A_ProductionOrder_2Type properties read (API_PRODUCTION_ORDER_2_SRV's $metadata).
ORDER_PROPERTIES = (
    "ManufacturingOrder",
    "Material",
    "TotalQuantity",
    "MfgOrderScheduledEndDate",
    "MfgOrderScheduledEndTime",
    "CustomerName",
    "OrderIsReleased",
    "OrderIsDeleted",
    "OrderIsMarkedForDeletion",
    "LastChangeDateTime",
)
# How the record made of an A_ProductionOrder_2 entity (``SapOrderSource._record``) maps.
ORDER_MAPPING = FieldMapping(
    order_id="ManufacturingOrder",
    part_number="Material",
    quantity="TotalQuantity",
    due="MfgOrderScheduledEndDate",
    customer="CustomerName",
    machine_id="",
    ideal_cycle_time_s="",
    status="status",
    modified="LastChangeDateTime",
    cancelled_when=["deleted"],
    released_when=["released"],
)
_SAP_STAMP = re.compile(r"^[0-9]{14}$")  # LastChangeDateTime: YYYYMMDDhhmmss, UTC


class SapOrderSource:
    """Reads ``A_ProductionOrder_2`` changed at or after the cursor (``LastChangeDateTime``,
    oldest first, ``page_size`` at a time): released orders (``OrderIsReleased``) are released,
    deleted or marked for deletion ones cancelled; the due time is the scheduled end
    (``MfgOrderScheduledEndDate`` + ``MfgOrderScheduledEndTime``, plant time)."""

    def __init__(self, entry: Entry, state_dir: Path | None) -> None:
        self.entry = entry
        self.book = OrderBook(
            entry.name, order_source_urn(entry.name), state_file(state_dir, entry.name)
        )
        self.mapper = RecordMapper(ORDER_MAPPING, modified_required=True)

    def __repr__(self) -> str:
        return f"SapOrderSource({self.entry.name!r})"

    async def changes(self, cursor: str | None) -> tuple[list[CloudEvent], str | None]:
        erp_cursor = await self.book.begin(cursor)
        entities = await self._read(erp_cursor)
        records = [self._record(entity) for entity in entities]
        events, last = polled_changes(self.book, self.mapper, records, _cursor_of)
        next_erp = erp_cursor if last is None else last[1]
        return events, await self.book.finish(next_erp, cursor)

    def _record(self, entity: Any) -> Any:
        if not isinstance(entity, Mapping):
            return entity
        record = {k: entity.get(k) for k in ("ManufacturingOrder", "Material", "TotalQuantity")}
        record["CustomerName"] = entity.get("CustomerName") or None
        day = parse_edm_date(entity.get("MfgOrderScheduledEndDate"))
        at = parse_edm_time(entity.get("MfgOrderScheduledEndTime")) or time(0, 0)
        if day is not None:
            due = datetime.combine(day, at, tzinfo=self.entry.zone)
            record["MfgOrderScheduledEndDate"] = rfc3339(due)
        elif entity.get("MfgOrderScheduledEndDate") is not None:
            record["MfgOrderScheduledEndDate"] = entity["MfgOrderScheduledEndDate"]
        deleted = "X" in (entity.get("OrderIsDeleted"), entity.get("OrderIsMarkedForDeletion"))
        released = entity.get("OrderIsReleased") == "X"
        record["status"] = "deleted" if deleted else "released" if released else "created"
        stamp = entity.get("LastChangeDateTime")
        if isinstance(stamp, str) and _SAP_STAMP.match(stamp):
            changed = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
            record["LastChangeDateTime"] = rfc3339(changed)
            record["_cursor"] = stamp
        else:
            record["LastChangeDateTime"] = stamp
        return record

    async def _read(self, erp_cursor: str | None) -> list[Any]:
        entry = self.entry
        try:
            secret = entry.secret.read()
        except ValueError as exc:
            raise OrdersUnavailable(f"{entry.name}: secret: {exc}") from None
        conditions = []
        if erp_cursor is not None:
            conditions.append(f"LastChangeDateTime ge '{erp_cursor}'")
        if entry.plant is not None:
            conditions.append(f"ProductionPlant eq '{entry.plant}'")
        params = {
            "$select": ",".join(ORDER_PROPERTIES),
            "$orderby": "LastChangeDateTime",
            "$top": str(entry.page_size),
            "$format": "json",
        }
        if conditions:
            params["$filter"] = " and ".join(conditions)
        if entry.client is not None:
            params["sap-client"] = entry.client
        url = join_url(entry.url, entry.order_service) + f"/{ORDERS}"
        try:
            async with outbound_client(entry.allowlist(), entry.timeout_s) as client:
                response = await client.get(
                    url,
                    params=params,
                    headers={"Accept": "application/json", **basic_auth(entry, secret)},
                )
        except (httpx.HTTPError, OutboundRefused) as exc:
            raise OrdersUnavailable(transport_failure(entry.name, exc, entry.timeout_s)) from None
        if not response.is_success:
            failure = sap_failure(entry, response, secret, "orders")
            raise OrdersUnavailable(failure.reason)
        found = _results(response)
        if found is None:
            raise OrdersUnavailable(
                f"{entry.name}: orders: the answer is not an OData V2 collection (d.results)"
            )
        return found


def _cursor_of(record: Any) -> tuple[Any, str] | None:
    stamp = record.get("_cursor") if isinstance(record, Mapping) else None
    return None if stamp is None else (stamp, stamp)


__all__ = [
    "Entry",
    "SapConfirmationSender",
    "SapOrderSource",
    "confirmation_entity",
    "confirmation_sender",
    "confirmation_text",
    "external_key",
    "order_source",
]
