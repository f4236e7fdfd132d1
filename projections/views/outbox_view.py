"""The delivery outbox, as a view of the store: what the hub owes to destinations outside it
(an ERP's production confirmations; later, partners' webhooks) and how each delivery went.

Fed like every view: a message is the stored event that decided it
(``mes.hub.order.confirmation_due.v1``), and each delivery's state is the last stored attempt
(``mes.hub.delivery.attempted.v1``), both recorded with the view's position in the same
transaction. So a crash loses no decision to send and repeats none, and a rebuild from the
store gives the same outbox. The senders (``hub.outbox``) read it and publish attempts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from hub.domain import Order, machine_aggregate_id
from hub.outbox import OutboxMessage
from projections.rules.keys import idempotency_key, message_key
from projections.views.database import TRACKING_TABLE, Cursor, ViewDatabase
from projections.views.facts_view import TABLE as FACTS
from projections.views.facts_view import MachineFactsView, to_micros
from projections.views.orders_view import STATES_TABLE, OrderStatesView

MESSAGES = "mes_outbox_messages_v1"
DELIVERIES = "mes_outbox_deliveries_v1"
# The destinations a message is addressed to; a message with none goes to every destination
# of its kind (an ERP confirmation), one with some only to them (a partner's webhook).
TARGETS = "mes_outbox_targets_v1"
CONFIRMATION = "erp.confirmation"  # the kind of message (adapters.erp.outbox)
WEBHOOK = "webhook"  # a partner event for chosen endpoints (adapters.webhooks)
__all__ = ["idempotency_key", "message_key"]  # (their home: projections.rules.keys)


class OutboxView:
    name = "outbox_v1"
    # (made by the library from the @event decorators, out of mypy's sight)
    event_classes: tuple[type, ...] = (
        getattr(Order, "ConfirmationDue"),  # noqa: B009
        getattr(Order, "DeliveryAttempted"),  # noqa: B009
        getattr(Order, "WebhookDue"),  # noqa: B009
    )

    def create(self, cursor: Cursor, dialect: str) -> None:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {MESSAGES} (key TEXT PRIMARY KEY, kind TEXT NOT NULL, "
            "site TEXT NOT NULL, ordering_key TEXT NOT NULL, sequence INTEGER NOT NULL, "
            "payload TEXT NOT NULL, decided_at TEXT NOT NULL, position BIGINT NOT NULL)"
        )
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {DELIVERIES} (key TEXT NOT NULL, "
            "destination TEXT NOT NULL, attempts INTEGER NOT NULL, outcome TEXT NOT NULL, "
            "status_code INTEGER, reason TEXT NOT NULL, excerpt TEXT NOT NULL, "
            "next_attempt_at TEXT, attempted_at TEXT NOT NULL, position BIGINT NOT NULL, "
            "requeued_at INTEGER NOT NULL, PRIMARY KEY (key, destination))"
        )
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TARGETS} (key TEXT NOT NULL, destination TEXT NOT NULL, "
            "PRIMARY KEY (key, destination))"
        )

    def create_indexes(self, cursor: Cursor) -> None:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {MESSAGES}_by_order ON {MESSAGES} "
            "(site, ordering_key, sequence)"
        )
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {MESSAGES}_by_position ON {MESSAGES} (position)"
        )
        # A destination reads its kind only (the ERPs' confirmations among many webhooks).
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {MESSAGES}_by_kind ON {MESSAGES} (kind, position)"
        )
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {MESSAGES}_by_time ON {MESSAGES} (site, decided_at)"
        )
        # The ERP desk's "what failed": found without reading every message ever sent.
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {DELIVERIES}_by_outcome ON {DELIVERIES} (outcome, key)"
        )
        # An endpoint's deliveries (the partners' API): its messages without reading all.
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {TARGETS}_by_destination ON {TARGETS} (destination, key)"
        )

    def drop(self, cursor: Cursor) -> None:
        cursor.execute(f"DROP TABLE IF EXISTS {MESSAGES}")
        cursor.execute(f"DROP TABLE IF EXISTS {DELIVERIES}")
        cursor.execute(f"DROP TABLE IF EXISTS {TARGETS}")

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        messages: list[tuple[Any, ...]] = []
        deliveries: list[tuple[Any, ...]] = []
        targets: list[tuple[str, str]] = []
        for position, event in events:
            if type(event).__name__ == "WebhookDue":
                due = event.webhook
                key = message_key(event.source, event.event_id)
                told = {f: due[f] for f in ("event_id", "event_type", "event_time", "data")}
                messages.append(
                    (key, WEBHOOK, str(due["site"]), str(due["order_id"]), int(due["sequence"]),
                     json.dumps({**told, "order_id": due["order_id"]}),
                     _utc(event.event_time), position)
                )  # fmt: skip
                targets.extend((key, str(endpoint)) for endpoint in due["endpoints"])
            elif type(event).__name__ == "ConfirmationDue":
                due = event.confirmation
                messages.append(
                    (message_key(event.source, event.event_id), CONFIRMATION, _site(event),
                     _order_id(event), int(due["sequence"]), json.dumps(due),
                     _utc(event.event_time), position)
                )  # fmt: skip
            else:
                tried = event.attempt
                attempts = int(tried["attempt"])
                requeued = attempts if tried["outcome"] == "requeued" else 0
                deliveries.append(
                    (tried["message_id"], tried["destination"], attempts,
                     tried["outcome"], tried.get("status_code"), tried.get("reason") or "",
                     tried.get("excerpt") or "", tried.get("next_attempt_at"),
                     event.event_time.isoformat(), position, requeued)
                )  # fmt: skip
        if messages:
            cursor.executemany(
                f"INSERT INTO {MESSAGES} (key, kind, site, ordering_key, sequence, payload, "
                "decided_at, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                messages,
            )
        if targets:
            cursor.executemany(
                f"INSERT INTO {TARGETS} (key, destination) VALUES (?, ?) "
                "ON CONFLICT (key, destination) DO NOTHING",
                targets,
            )
        if deliveries:
            # The last attempt wins; an older one (a rebuild racing the live worker) never
            # overwrites a newer.
            # A requeue is remembered until the next one: attempts count again from it.
            columns = ("attempts", "outcome", "status_code", "reason", "excerpt",
                       "next_attempt_at", "attempted_at", "position")  # fmt: skip
            cursor.executemany(
                f"INSERT INTO {DELIVERIES} (key, destination, {', '.join(columns)}, requeued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, destination) DO UPDATE "
                f"SET {', '.join(f'{c} = excluded.{c}' for c in columns)}, requeued_at = "
                f"CASE WHEN excluded.requeued_at > 0 THEN excluded.requeued_at "
                f"ELSE {DELIVERIES}.requeued_at END "
                f"WHERE excluded.position > {DELIVERIES}.position",
                deliveries,
            )


def _utc(time: datetime) -> str:
    """A moment as the view keeps it: in UTC, so that text compares in time order."""
    return time.astimezone(UTC).isoformat()


def _order_id(event: Any) -> str:
    return str(event.confirmation["order_id"])


def _site(event: Any) -> str:
    return str(event.confirmation["site"])


class OutboxReader:
    def __init__(self, db: ViewDatabase) -> None:
        self._db = db

    def undelivered(
        self, destination: str, kinds: Sequence[str], after: int = 0, limit: int = 64
    ) -> tuple[int, list[OutboxMessage]]:
        """What ``destination`` may be sent now: the first message not taken (by sequence) of
        each ordering key decided after position ``after``, unless it is dead (a dead message
        holds its key back until it is requeued) — at most ``limit``, in the order decided.
        Also the position below which every message was taken (ask from there next time)."""
        marks = ", ".join("?" * len(kinds))
        # One pass over what is still open for the destination (not taken; dead included: it
        # holds its key back): per key the first by sequence (``head``), and the first open
        # position of all (below it, everything was taken).
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT {_COLUMNS}, first_open FROM (SELECT {_WITH_STATE_COLUMNS}, "
                "ROW_NUMBER() OVER (PARTITION BY m.site, m.ordering_key, m.kind "
                "ORDER BY m.sequence, m.position) AS head, MIN(m.position) OVER () AS first_open "
                f"FROM {_JOINED} WHERE m.position > ? AND m.kind IN ({marks}) "
                "AND (d.outcome IS NULL OR d.outcome IN ('failed', 'dead', 'requeued')) "
                f"AND {_addressed('m')}) o "
                "WHERE o.head = 1 AND (o.outcome IS NULL OR o.outcome IN ('failed', 'requeued')) "
                "ORDER BY o.position LIMIT ?",
                [destination, after, *kinds, destination, limit],
            )
            rows = cursor.fetchall()
            if rows:
                return int(rows[0][-1]) - 1, [_message(row[:-1]) for row in rows]
            # Nothing to send: every key's first is dead, or nothing is open at all.
            cursor.execute(
                f"SELECT MIN(m.position) FROM {_JOINED} WHERE m.position > ? "
                f"AND m.kind IN ({marks}) "
                "AND (d.outcome IS NULL OR d.outcome IN ('failed', 'dead', 'requeued')) "
                f"AND {_addressed('m')}",
                [destination, after, *kinds, destination],
            )
            (first,) = cursor.fetchone()
            if first is not None:
                return int(first) - 1, []
            cursor.execute(f"SELECT MAX(position) FROM {MESSAGES}")
            (last,) = cursor.fetchone()
            return max(after, int(last or 0)), []

    def messages(
        self,
        site: str,
        ordering_key: str | None = None,
        limit: int = 100,
        after: str = "",
        key: str | None = None,
        outcomes: Sequence[str] = (),
        kind: str | None = None,
    ) -> list[tuple[OutboxMessage, dict[str, OutboxMessage]]]:
        """Messages of ``site`` (of one ordering key, or the one ``key``, if given) by key,
        after the message key ``after``, each with its state per destination tried.
        ``outcomes``: only messages whose last attempt for some destination had one of them."""
        where, params = ["m.site = ?", "m.key > ?"], [site, after]
        if kind is not None:
            where.append("m.kind = ?")
            params.append(kind)
        if outcomes:
            where.append(
                f"m.key IN (SELECT key FROM {DELIVERIES} "
                f"WHERE outcome IN ({', '.join('?' * len(outcomes))}))"
            )
            params.extend(outcomes)
        if ordering_key is not None:
            where.append("m.ordering_key = ?")
            params.append(ordering_key)
        if key is not None:
            where.append("m.key = ?")
            params.append(key)
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT m.key, m.kind, m.site, m.ordering_key, m.sequence, m.payload, "
                f"m.decided_at, m.position FROM {MESSAGES} m WHERE {' AND '.join(where)} "
                "ORDER BY m.key LIMIT ?",
                [*params, limit],
            )
            found = [_message((*row, None, None, None, None, None, 0)) for row in cursor.fetchall()]
            states: dict[str, dict[str, OutboxMessage]] = {m.key: {} for m in found}
            keys = list(states)
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                cursor.execute(
                    f"SELECT key, destination, attempts, outcome, next_attempt_at, status_code, "
                    f"reason, requeued_at FROM {DELIVERIES} "
                    f"WHERE key IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                by_key = {m.key: m for m in found}
                for key, destination, *state in cursor.fetchall():
                    message = by_key[key]
                    states[key][destination] = _message(
                        (message.key, message.kind, message.site, message.ordering_key,
                         message.sequence, json.dumps(message.payload),
                         message.decided_at.isoformat(), message.position, *state)
                    )  # fmt: skip
        return [(m, states[m.key]) for m in found]

    def addressed(
        self,
        destination: str,
        *,
        before: int | None = None,
        after: int | None = None,
        since: datetime | None = None,
        outcomes: Sequence[str] = (),
        key: str | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[OutboxMessage]:
        """The messages addressed to ``destination`` (a partner's endpoint), each with its
        state there: decided before store position ``before``, at or after ``since``, whose
        last outcome there is one of ``outcomes`` (``pending``: never tried), or the one
        ``key``; newest first, or oldest first (after store position ``after``)."""
        where = [f"EXISTS (SELECT 1 FROM {TARGETS} t WHERE t.key = m.key AND t.destination = ?)"]
        params: list[Any] = [destination]
        if before is not None:
            where.append("m.position < ?")
            params.append(before)
        if after is not None:
            where.append("m.position > ?")
            params.append(after)
        if since is not None:
            where.append("m.decided_at >= ?")  # (both in UTC: as text, in time order)
            params.append(since.astimezone(UTC).isoformat())
        if key is not None:
            where.append("m.key = ?")
            params.append(key)
        if outcomes:
            chosen = [o for o in outcomes if o != "pending"]
            either = [f"d.outcome IN ({', '.join('?' * len(chosen))})"] if chosen else []
            if "pending" in outcomes:
                either.append("d.outcome IS NULL")
            where.append(f"({' OR '.join(either)})")
            params.extend(chosen)
        order = "DESC" if newest_first else "ASC"
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT {_WITH_STATE} "
                f"WHERE {' AND '.join(where)} ORDER BY m.position {order} LIMIT ?",
                [destination, *params, limit],
            )
            return [_message(row) for row in cursor.fetchall()]

    def last_position(self) -> int:
        """The position of the last message decided (0: none)."""
        with self._db.transaction(write=False) as cursor:
            cursor.execute(f"SELECT MAX(position) FROM {MESSAGES}")
            (position,) = cursor.fetchone()
        return int(position or 0)


# A message with its delivery state for one destination (the next parameter): ``_message``'s row.
_COLUMNS = (
    "key, kind, site, ordering_key, sequence, payload, decided_at, position, "
    "attempts, outcome, next_attempt_at, status_code, reason, requeued_at"
)
_WITH_STATE_COLUMNS = (
    "m.key, m.kind, m.site, m.ordering_key, m.sequence, m.payload, m.decided_at, m.position, "
    "d.attempts, d.outcome, d.next_attempt_at, d.status_code, d.reason, d.requeued_at"
)
_JOINED = f"{MESSAGES} m LEFT JOIN {DELIVERIES} d ON d.key = m.key AND d.destination = ?"
_WITH_STATE = f"{_WITH_STATE_COLUMNS} FROM {_JOINED}"


def _addressed(alias: str) -> str:
    """SQL: the message ``alias`` is for the destination given as the next parameter (it is
    addressed to it, or to no one in particular)."""
    return (
        f"(NOT EXISTS (SELECT 1 FROM {TARGETS} t WHERE t.key = {alias}.key) OR EXISTS "
        f"(SELECT 1 FROM {TARGETS} t WHERE t.key = {alias}.key AND t.destination = ?))"
    )


def _message(row: Sequence[Any]) -> OutboxMessage:
    (key, kind, site, ordering_key, sequence, payload, decided_at, position,
     attempts, outcome, next_attempt_at, status_code, reason, requeued_at) = row  # fmt: skip
    return OutboxMessage(
        key=key,
        kind=kind,
        site=site,
        ordering_key=ordering_key,
        sequence=int(sequence),
        payload=json.loads(payload),
        decided_at=datetime.fromisoformat(decided_at),
        position=int(position),
        attempts=int(attempts or 0),
        outcome=outcome,
        next_attempt_at=datetime.fromisoformat(next_attempt_at) if next_attempt_at else None,
        status_code=status_code,
        reason=reason or "",
        requeued_at=int(requeued_at or 0),
    )


@dataclass(frozen=True)
class Candidates:
    """What the views took in after a position, as the confirmation watch asks for it."""

    changed: list[UUID]  # orders whose state changed (a run ended) while running or ended
    earliest: dict[str, int]  # per machine (aggregate id hex): the earliest count or scrap time
    named: set[str]  # order ids that scrap newly named
    upto: int  # the position both views have read to (ask again from there)


def confirmation_candidates(db: ViewDatabase, site: str, after: int) -> Candidates:
    """What may make an order of ``site`` owed a confirmation, among what the views took in
    after position ``after``: an order whose state changed (a run ended) while it runs or has
    ended; and, for the orders confirmed before, late facts — scrap naming one, a part count or
    scrap on a machine dated before one's last run there ended (the watch keeps those ends)."""
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT MIN(position) FROM {TRACKING_TABLE} WHERE view IN (?, ?)",
            (MachineFactsView.name, OrderStatesView.name),
        )
        (upto,) = cursor.fetchone()
        upto = int(upto or 0)
        if upto <= after:
            return Candidates([], {}, set(), after)
        cursor.execute(
            f"SELECT aggregate_id FROM {STATES_TABLE} WHERE site = ? AND position > ? "
            "AND position <= ? AND status IN ('running', 'ended')",
            (site, after, upto),
        )
        changed = sorted((UUID(row[0]) for row in cursor.fetchall()), key=str)
        cursor.execute(
            f"SELECT machine, MIN(time) FROM {FACTS} WHERE position > ? AND position <= ? "
            "AND kind IN ('reading_all', 'reading_bad', 'scrap') GROUP BY machine",
            (after, upto),
        )
        earliest = {str(machine): int(time) for machine, time in cursor.fetchall()}
        cursor.execute(
            f"SELECT DISTINCT order_id FROM {FACTS} WHERE position > ? AND position <= ? "
            "AND kind = 'scrap' AND order_id IS NOT NULL",
            (after, upto),
        )
        named = {str(row[0]) for row in cursor.fetchall()}
    return Candidates(changed, earliest, named, upto)


def confirmed_orders(
    db: ViewDatabase, site: str, since: datetime
) -> list[tuple[UUID, str, list[dict[str, Any]]]]:
    """The orders of ``site`` confirmed from ``since`` on, with their starts and ends (the
    watch learns from them, when it starts, which late facts can change what was told)."""
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT DISTINCT s.aggregate_id, s.order_id, s.moves FROM {MESSAGES} m "
            f"JOIN {STATES_TABLE} s ON s.site = m.site AND s.order_id = m.ordering_key "
            "WHERE m.site = ? AND m.kind = ? AND m.decided_at >= ?",
            (site, CONFIRMATION, since.astimezone(UTC).isoformat()),
        )
        return [(UUID(key), str(order_id), json.loads(moves)) for key, order_id, moves in cursor]


def last_ends(site: str, moves: list[dict[str, Any]]) -> dict[str, int]:
    """Per machine (aggregate id hex) the order's last end there, in microseconds."""
    ends: dict[str, int] = {}
    for move in moves:
        if not move["started"]:
            machine = machine_aggregate_id(site, move["machine_id"]).hex
            at = to_micros(datetime.fromisoformat(move["time"]))
            ends[machine] = max(at, ends.get(machine, at))
    return ends


def order_moves(db: ViewDatabase, keys: Sequence[UUID]) -> dict[UUID, list[dict[str, Any]]]:
    """The starts and ends of these orders as the order states view has them: read after the
    candidates, never behind the facts view (both are written in one transaction), so a run's
    end is never newer than the parts counted for it."""
    found: dict[UUID, list[dict[str, Any]]] = {}
    with db.transaction(write=False) as cursor:
        for start in range(0, len(keys), 500):
            chunk = [k.hex for k in keys[start : start + 500]]
            cursor.execute(
                f"SELECT aggregate_id, moves FROM {STATES_TABLE} "
                f"WHERE aggregate_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update((UUID(key), json.loads(moves)) for key, moves in cursor.fetchall())
    return found


def running_orders(db: ViewDatabase, site: str) -> list[UUID]:
    """The orders of ``site`` running now (on at least one machine)."""
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT aggregate_id FROM {STATES_TABLE} WHERE site = ? AND status = 'running'",
            (site,),
        )
        return sorted((UUID(row[0]) for row in cursor.fetchall()), key=str)
