"""What the Odoo and ERPNext dialects share (both read orders by modification stamp over HTTP
and post confirmations over HTTP): order ids from document names, the order events and the small
state behind ``OrderChangedV1``, the cursor, and how an HTTP answer becomes a delivery outcome.

Errors::

    ErpUnavailable           orders could not be read this time (one line, never a secret)
    hub.outbox.DeliveryFailed  a confirmation was not taken (``failure`` and ``transport_failure``)

State: ``OrderBook`` keeps, per ERP, the last published form of every open order in
``<state_dir>/<name>.orders.json`` (written whole, synced, then renamed), in two generations:
the one the caller confirmed by coming back with its cursor, and the one of the cursor it was
last given. A batch whose events were never published (the caller crashed, or asks again with
its old cursor) is computed again from the confirmed generation, so no change is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from contracts import CloudEvent, OrderCancelledV1, OrderChangedV1
from hub.outbound import OutboundRefused
from hub.outbox import EXCERPT_CHARS, DeliveryFailed

log = logging.getLogger(__name__)

RELEASED, CHANGED, CANCELLED = (
    "mes.erp.order.released.v1",
    "mes.erp.order.changed.v1",
    "mes.erp.order.cancelled.v1",
)
ORDER_FIELDS = ("part_number", "quantity", "due", "customer", "machine_id", "ideal_cycle_time_s")
PAGE = 200  # records per request
MAX_PAGES = 50  # per poll; the rest comes with the next one
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


class ErpUnavailable(RuntimeError):
    """Orders could not be read this time: the ERP is down, refused the login, or answered
    what the dialect cannot read. One line, never a secret; the next poll tries again."""


# --- order ids -----------------------------------------------------------------------------


def order_token(name: str) -> str:
    """An ERP document name as a hub order id (a NATS-safe token): every character other than
    ``A-Z a-z 0-9 _ -`` becomes ``-`` (``WH/MO/00012`` → ``WH-MO-00012``), at most 128."""
    return _NOT_TOKEN.sub("-", name.strip())[:128] or "-"


def like_pattern(order_id: str) -> str:
    """A SQL ``LIKE`` pattern that matches every name ``order_token`` maps to ``order_id``
    (``-`` may have been any one character); the caller keeps the exact matches."""
    pattern = order_id.replace("-", "_")
    return pattern + "%" if len(order_id) >= 128 else pattern


# --- delivery outcomes ---------------------------------------------------------------------


def excerpt(text: str) -> str:
    return " ".join(text.split())[:EXCERPT_CHARS]


def permanent_status(status: int | None) -> bool:
    """A refusal that sending the same message again cannot change: 4xx except a login (401,
    403: someone fixes the credential), a timeout (408), too early or too many (425, 429)."""
    if status is None:
        return False
    return 400 <= status < 500 and status not in (401, 403, 408, 425, 429)


def failure(
    reason: str, status: int | None, answer: str, *, permanent: bool | None = None
) -> DeliveryFailed:
    return DeliveryFailed(
        " ".join(reason.split())[:300],
        status=status,
        excerpt=excerpt(answer),
        permanent=permanent_status(status) if permanent is None else permanent,
    )


def transport_failure(system: str, url: str, exc: Exception) -> DeliveryFailed:
    """A call that got no answer (refused address, no connection, timeout): never permanent."""
    return DeliveryFailed(describe_transport(system, url, exc), permanent=False)


def describe_transport(system: str, url: str, exc: Exception) -> str:
    where = urlsplit(url).netloc or url
    if isinstance(exc, OutboundRefused):
        return f"{system}: the hub does not call {where}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{system} at {where} did not answer in time ({type(exc).__name__})"
    detail = str(exc) or type(exc).__name__
    return f"cannot reach {system} at {where}: {detail}"


TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.TransportError, OutboundRefused)


# --- orders in: what was seen, the cursor, the events --------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where an ERP's orders were read up to: the newest modification stamp (the ERP's own text)
    and record id, and a batch number (so that every batch has its own cursor, see the module).
    As a string: ``<stamp>|<id>|<batch>``."""

    stamp: str
    key: str
    batch: int

    def text(self) -> str:
        return f"{self.stamp}|{self.key}|{self.batch}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        if text is None:
            return None
        stamp, sep, rest = text.partition("|")
        key, sep2, batch = rest.rpartition("|")
        if not (sep and sep2 and batch.isdigit()):
            raise ValueError(f"not an ERP order cursor: {text[:80]!r}")
        return cls(stamp, key, int(batch))


@dataclass(frozen=True)
class Seen:
    """One ERP record as last read: its stamp's time, and the order as last published (None:
    not published, or closed)."""

    time: datetime
    order: dict[str, Any] | None
    closed: bool = False

    def json(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(), "order": self.order, "closed": self.closed}

    @classmethod
    def of(cls, value: Mapping[str, Any]) -> Seen:
        return cls(datetime.fromisoformat(value["time"]), value["order"], bool(value["closed"]))


@dataclass(frozen=True)
class Snapshot:
    """One ERP record as read now, in hub terms."""

    key: str  # the record's id at the ERP
    stamp: str  # its modification stamp, as the ERP wrote it
    time: datetime  # the same, aware
    order_id: str
    state: Literal["open", "cancelled", "closed"]
    order: dict[str, Any] | None  # OrderReleasedV1 data (JSON); None: not usable (logged)
    reason: str = ""  # why it was cancelled, in ERP terms


class OrderBook:
    """The last published form of an ERP's orders (see the module); in memory only when
    ``path`` is None (then a restart publishes the open orders again as released)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._loaded = False
        self._committed: dict[str, Any] = {"cursor": None, "records": {}}
        self._pending: dict[str, Any] | None = None

    async def records_for(self, cursor: Cursor | None) -> dict[str, Seen]:
        if not self._loaded:
            await asyncio.to_thread(self._load)
            self._loaded = True
        text = None if cursor is None else cursor.text()
        if cursor is None:
            chosen: Mapping[str, Any] = {}
        elif self._pending is not None and self._pending["cursor"] == text:
            self._committed, self._pending = self._pending, None
            chosen = self._committed["records"]
        else:
            if self._committed["cursor"] != text:
                log.warning(
                    "%s: the order state is for another cursor; orders changed since may be "
                    "published again as released",
                    self.path or "order state",
                )
            self._pending = None
            chosen = self._committed["records"]
        return {key: Seen.of(value) for key, value in chosen.items()}

    async def keep(self, cursor: Cursor, records: Mapping[str, Seen]) -> None:
        self._pending = {
            "cursor": cursor.text(),
            "records": {key: seen.json() for key, seen in records.items()},
        }
        if self.path is not None:
            await asyncio.to_thread(self._save)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            self._committed, self._pending = data["committed"], data["pending"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable order state (%s): starting empty", self.path, exc)

    def _save(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        body = {"version": 1, "committed": self._committed, "pending": self._pending}
        with temporary.open("w") as out:
            out.write(json.dumps(body, indent=1, sort_keys=True))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)


def state_file(state_dir: Path | None, name: str) -> Path | None:
    return None if state_dir is None else state_dir / f"{name}.orders.json"


class OrderEvents:
    """Turns snapshots into ``mes.erp.order.*`` CloudEvents. An event's id derives from the
    ERP, the record and its stamp, so reading the same state again gives the same ids."""

    def __init__(self, erp_name: str, model: str) -> None:
        self.source = f"urn:mes-hub:erp:{erp_name}"
        self.model = model

    def events(
        self, snapshots: Iterable[Snapshot], seen: dict[str, Seen], *, first_read: bool
    ) -> list[CloudEvent]:
        """The events for ``snapshots`` (oldest first); updates ``seen`` in place."""
        found: list[CloudEvent] = []
        for snap in snapshots:
            before = seen.get(snap.key)
            if before is not None and before.time >= snap.time:
                continue  # read already (the look-back window reads some records again)
            was_open = before is not None and before.order is not None and not before.closed
            if snap.state == "open":
                if snap.order is None:
                    kept = before.order if before is not None and not before.closed else None
                    seen[snap.key] = Seen(snap.time, kept)
                    continue
                if not was_open:
                    found.append(self._event(RELEASED, snap, snap.order))
                else:
                    assert before is not None and before.order is not None
                    changed = _changes(before.order, snap.order)
                    if changed:
                        change = OrderChangedV1(order_id=snap.order_id, **changed)
                        found.append(self._event(CHANGED, snap, _set_only(change)))
                seen[snap.key] = Seen(snap.time, snap.order)
            elif snap.state == "cancelled":
                if was_open or (before is None and not first_read):
                    cancel = OrderCancelledV1(order_id=snap.order_id, reason=snap.reason[:1024])
                    found.append(self._event(CANCELLED, snap, cancel.model_dump(mode="json")))
                seen[snap.key] = Seen(snap.time, None, closed=True)
            else:
                seen[snap.key] = Seen(snap.time, None, closed=True)
        return found

    def _event(self, type_: str, snap: Snapshot, data: dict[str, Any]) -> CloudEvent:
        digest = hashlib.sha256(f"{self.source}|{self.model}|{snap.key}|{snap.stamp}".encode())
        return CloudEvent(
            specversion="1.0",
            id=f"{snap.order_id}-{digest.hexdigest()[:32]}",
            source=self.source,
            type=type_,
            time=snap.time,
            subject=snap.order_id,
            datacontenttype="application/json",
            data=data,
        )


def unseen(seen: Mapping[str, Seen], key: str, time: datetime) -> bool:
    """Whether this version of a record is new (the look-back window reads some again)."""
    before = seen.get(key)
    return before is None or before.time < time


def forget_closed(seen: dict[str, Seen], before: datetime) -> None:
    """Drop closed records older than ``before``: the next read does not reach them."""
    for key in [k for k, s in seen.items() if s.closed and s.time < before]:
        del seen[key]


def _changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    return {f: now.get(f) for f in ORDER_FIELDS if before.get(f) != now.get(f)}


def _set_only(data: OrderChangedV1) -> dict[str, Any]:
    return data.model_dump(mode="json", exclude_unset=True)
