"""The order view: what the OEE and forecast need of each order the ERP released (its ideal
cycle time, ISO 22400 PRI, and its part number for the plant's PRI fallback), without loading
the order's aggregate."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from uuid import UUID

from hub.domain import Order, order_aggregate_id, order_runs
from projections.views.database import Cursor, ViewDatabase

# v2 adds the part number; a new name, so a hub upgraded from v1 builds it from the store.
TABLE = "mes_view_orders_v2"


def rows_by_key(cursor: Cursor, select: str, keys: Collection[str]) -> list[tuple[Any, ...]]:
    """``select … WHERE aggregate_id IN keys``, a chunk at a time (SQLite caps bound
    parameters)."""
    keys = list(keys)
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        cursor.execute(f"{select} WHERE aggregate_id IN ({', '.join('?' * len(chunk))})", chunk)
        rows.extend(cursor.fetchall())
    return rows


class _KeyedTable:
    """A view of one table whose primary key is its only index."""

    table: str

    def create_indexes(self, cursor: Cursor) -> None:
        pass

    def drop(self, cursor: Cursor) -> None:
        cursor.execute(f"DROP TABLE IF EXISTS {self.table}")


class OrdersView(_KeyedTable):
    table = TABLE
    name = "orders_v2"
    # The library makes these classes from the @event decorators, out of mypy's sight.
    event_classes: tuple[type, ...] = (
        getattr(Order, "Released"),  # noqa: B009
        getattr(Order, "Changed"),  # noqa: B009
    )

    def create(self, cursor: Cursor, dialect: str) -> None:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            "aggregate_id TEXT PRIMARY KEY, ideal_cycle_time_s DOUBLE PRECISION, "
            "part_number TEXT, position BIGINT NOT NULL)"
        )

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        rows = []
        for position, event in events:
            pri, part_number = (event.fields.get(n) for n in ("ideal_cycle_time_s", "part_number"))
            if pri is not None or part_number is not None:
                pri = float(pri) if pri is not None else None
                rows.append((event.originator_id.hex, pri, part_number, position))
        if rows:
            # A change names only what changed: the later value of each field wins;
            # re-applying an older position (a rebuild racing the live worker) never
            # overwrites a newer one.
            cursor.executemany(
                f"INSERT INTO {TABLE} (aggregate_id, ideal_cycle_time_s, part_number, position) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (aggregate_id) DO UPDATE SET "
                f"ideal_cycle_time_s = COALESCE(excluded.ideal_cycle_time_s, "
                f"{TABLE}.ideal_cycle_time_s), "
                f"part_number = COALESCE(excluded.part_number, {TABLE}.part_number), "
                f"position = excluded.position WHERE excluded.position > {TABLE}.position",
                rows,
            )


class OrdersReader:
    def __init__(self, db: ViewDatabase) -> None:
        self._db = db

    def order_cycle_facts(
        self, site: str, order_ids: Collection[str]
    ) -> dict[str, tuple[float | None, str | None]]:
        """What each of ``order_ids`` the view knows says of its PRI: (its own ideal cycle
        time, its part number). The plant's fallbacks are the rules' (``PlantConfig``)."""
        by_key = {order_aggregate_id(site, o).hex: o for o in order_ids}
        with self._db.transaction(write=False) as cursor:
            rows = rows_by_key(
                cursor, f"SELECT aggregate_id, ideal_cycle_time_s, part_number FROM {TABLE}", by_key
            )
        return {
            by_key[key]: (float(seconds) if seconds is not None else None, part_number)
            for key, seconds, part_number in rows
        }

    def page(
        self,
        site: str,
        *,
        status: str | None = None,
        customer: str | None = None,
        machine: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[tuple[str, UUID]]:
        """One page of ``site``'s orders (order id and aggregate id), by order id: up to
        ``limit`` after the order id ``after``, with the ``status`` and ``customer`` asked and
        ``machine`` either the one the ERP named or one the order ran on."""
        where, params = ["site = ?"], [site]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if customer is not None:
            where.append("customer = ?")
            params.append(customer)
        if after is not None:
            where.append("order_id > ?")
            params.append(after)
        if machine is not None:
            where.append(
                f"(machine_id = ? OR aggregate_id IN "
                f"(SELECT aggregate_id FROM {MACHINES_TABLE} WHERE machine_id = ?))"
            )
            params += [machine, machine]
        with self._db.transaction(write=False) as cursor:
            cursor.execute(
                f"SELECT order_id, aggregate_id FROM {STATES_TABLE} "
                f"WHERE {' AND '.join(where)} ORDER BY order_id LIMIT ?",
                [*params, limit],
            )
            return [(str(order_id), UUID(key)) for order_id, key in cursor.fetchall()]


# v3 adds what the order list filters and pages by (site, order id, status, customer, the machine
# the ERP named and those the order ran on); v2 kept each order's taps and whether a run is open
# by event time (v1 counted starts and ends, which a start tapped twice or a stray end would
# throw off). A new name each time, so an upgraded hub builds it from the store.
STATES_TABLE = "mes_view_order_states_v3"
MACHINES_TABLE = "mes_view_order_machines_v3"  # (machine, order) for each machine an order ran on
_STATE_COLUMNS = ("site", "order_id", "status", "customer", "machine_id", "released", "cancelled",
                  "followed", "moves", "ran", "running", "announced", "position")  # fmt: skip
_LIST_FIELDS = ("customer", "machine_id")  # from the release and the changes that name them


class OrderStatesView(_KeyedTable):
    """Each order's state, without loading its aggregate:

    - which orders are still in play for delivery forecasts, so a forecast round loads those and
      not every order the plant ever had: not cancelled, and not ended (no run open, by event
      time, as the order itself folds its taps) after a final (done or late) forecast was
      announced. An order only registered or changed (a change ahead of its release) is not
      followed yet;
    - what the order list filters by (``OrdersReader.page``): site, order id, status (as
      ``Order`` decides it), customer, the machine the ERP named and those it ran on.
    """

    name = "order_states_v3"
    table = STATES_TABLE
    # (made by the library from the @event decorators, out of mypy's sight)
    event_classes: tuple[type, ...] = tuple(
        getattr(Order, name)
        for name in (
            "Registered", "Released", "Changed", "Cancelled", "Started", "Ended",
            "DeliveryForecastChanged",
        )
    )  # fmt: skip

    def create(self, cursor: Cursor, dialect: str) -> None:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {STATES_TABLE} (aggregate_id TEXT PRIMARY KEY, "
            "site TEXT, order_id TEXT, status TEXT NOT NULL, customer TEXT, machine_id TEXT, "
            "released INTEGER NOT NULL, cancelled INTEGER NOT NULL, followed INTEGER NOT NULL, "
            "moves TEXT NOT NULL, ran INTEGER NOT NULL, running INTEGER NOT NULL, announced TEXT, "
            "position BIGINT NOT NULL)"
        )
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {MACHINES_TABLE} (machine_id TEXT, aggregate_id TEXT, "
            "PRIMARY KEY (machine_id, aggregate_id))"
        )

    def create_indexes(self, cursor: Cursor) -> None:
        # The list's pages: by order id within a site, filtered or not.
        for name, columns in (
            ("by_id", "site, order_id"),
            ("by_status", "site, status, order_id"),
            ("by_customer", "site, customer, order_id"),
            ("by_machine", "site, machine_id"),
        ):
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {STATES_TABLE}_{name} ON {STATES_TABLE} ({columns})"
            )

    def drop(self, cursor: Cursor) -> None:
        super().drop(cursor)
        cursor.execute(f"DROP TABLE IF EXISTS {MACHINES_TABLE}")

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        keys = sorted({event.originator_id.hex for _, event in events})
        rows: dict[str, dict[str, Any]] = {}
        select = f"SELECT aggregate_id, {', '.join(_STATE_COLUMNS)} FROM {STATES_TABLE}"
        for key, *columns in rows_by_key(cursor, select, keys):
            rows[key] = dict(zip(_STATE_COLUMNS, columns, strict=True))
            rows[key]["moves"] = json.loads(rows[key]["moves"])
        changed: set[str] = set()
        for position, event in events:
            key = event.originator_id.hex
            row = rows.setdefault(
                key,
                {"site": None, "order_id": None, "customer": None, "machine_id": None,
                 "released": 0, "cancelled": 0, "followed": 0, "moves": [], "announced": None,
                 "position": 0},
            )  # fmt: skip
            if position <= row["position"]:
                continue  # already applied (a rebuild racing the live worker)
            kind = type(event).__name__
            if kind == "Registered":
                row["site"], row["order_id"] = event.site, event.order_id
            elif kind in ("Released", "Changed"):
                row.update((f, event.fields[f]) for f in _LIST_FIELDS if f in event.fields)
            elif kind == "Cancelled":
                row["cancelled"] = 1
            elif kind in ("Started", "Ended"):
                row["moves"].append({"machine_id": event.machine_id,
                                     "time": event.event_time.isoformat(),
                                     "started": kind == "Started"})  # fmt: skip
            elif kind == "DeliveryForecastChanged":
                row["announced"] = event.forecast.get("status") or row["announced"]
            if kind == "Released":
                row["released"] = 1
            if kind not in ("Registered", "Changed"):
                row["followed"] = 1
            row["position"] = position
            changed.add(key)
        if not changed:
            return
        values: list[tuple[Any, ...]] = []
        ran_on: list[tuple[str, str]] = []
        for key in sorted(changed):
            row = rows[key]
            runs = order_runs(row["moves"])
            row["ran"], row["running"] = int(bool(runs)), int(any(r["end"] is None for r in runs))
            row["status"] = _status(row)
            stored = {**row, "moves": json.dumps(row["moves"])}
            values.append((key, *(stored[c] for c in _STATE_COLUMNS)))
            ran_on.extend((machine, key) for machine in sorted({r["machine_id"] for r in runs}))
        cursor.executemany(
            f"INSERT INTO {STATES_TABLE} (aggregate_id, {', '.join(_STATE_COLUMNS)}) "
            f"VALUES (?, {', '.join('?' * len(_STATE_COLUMNS))}) ON CONFLICT (aggregate_id) "
            f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _STATE_COLUMNS)}",
            values,
        )
        if ran_on:
            cursor.executemany(
                f"INSERT INTO {MACHINES_TABLE} (machine_id, aggregate_id) VALUES (?, ?) "
                "ON CONFLICT (machine_id, aggregate_id) DO NOTHING",
                ran_on,
            )


def _status(row: Mapping[str, Any]) -> str:
    """The order's status, as ``Order`` keeps it: cancelled for good; else running while a run
    is open, ended once it ran, released once the ERP released it, unreleased before."""
    if row["cancelled"]:
        return "cancelled"
    if row["running"]:
        return "running"
    if row["ran"]:
        return "ended"
    return "released" if row["released"] else "unreleased"


def orders_in_play(db: ViewDatabase) -> list[UUID]:
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT aggregate_id FROM {STATES_TABLE} WHERE followed = 1 AND cancelled = 0 AND "
            # (COALESCE: with nothing announced yet, NULL IN (…) is NULL, and NOT NULL would
            # drop an order that ended before its first forecast.)
            "NOT (COALESCE(announced, '') IN ('done', 'late') AND ran = 1 AND running = 0)"
        )
        return [UUID(row[0]) for row in cursor.fetchall()]
