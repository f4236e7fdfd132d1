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

    def ideal_cycle_times(
        self,
        site: str,
        order_ids: Collection[str],
        by_part_number: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """The PRI of each of ``order_ids`` that has one: its own, else the one of its part
        number in ``by_part_number`` (the plant's fallback)."""
        by_part_number = by_part_number or {}
        by_key = {order_aggregate_id(site, o).hex: o for o in order_ids}
        found: dict[str, float] = {}
        keys = list(by_key)
        with self._db.transaction(write=False) as cursor:
            for start in range(0, len(keys), 500):  # SQLite caps bound parameters
                chunk = keys[start : start + 500]
                cursor.execute(
                    f"SELECT aggregate_id, ideal_cycle_time_s, part_number FROM {TABLE} "
                    f"WHERE aggregate_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for key, seconds, part_number in cursor.fetchall():
                    if seconds is None:
                        seconds = by_part_number.get(part_number or "")
                    if seconds is not None:
                        found[by_key[key]] = float(seconds)
        return found


# v2 keeps each order's taps and whether a run is open by event time (v1 counted starts and ends,
# which a start tapped twice or a stray end would throw off); a new name, so a hub upgraded from
# v1 builds it from the store.
STATES_TABLE = "mes_view_order_states_v2"


class OrderStatesView(_KeyedTable):
    """Which orders are still in play for delivery forecasts, so a forecast round loads those
    and not every order the plant ever had: not cancelled, and not ended (no run open, by event
    time, as the order itself folds its taps) after a final (done or late) forecast was
    announced."""

    name = "order_states_v2"
    table = STATES_TABLE
    # (made by the library from the @event decorators, out of mypy's sight)
    event_classes: tuple[type, ...] = tuple(
        getattr(Order, name)
        for name in ("Released", "Cancelled", "Started", "Ended", "DeliveryForecastChanged")
    )

    def create(self, cursor: Cursor, dialect: str) -> None:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {STATES_TABLE} (aggregate_id TEXT PRIMARY KEY, "
            "cancelled INTEGER NOT NULL, moves TEXT NOT NULL, ran INTEGER NOT NULL, "
            "running INTEGER NOT NULL, announced TEXT, position BIGINT NOT NULL)"
        )

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        keys = sorted({event.originator_id.hex for _, event in events})
        rows: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters
            chunk = keys[start : start + 500]
            cursor.execute(
                f"SELECT aggregate_id, cancelled, moves, announced, position FROM {STATES_TABLE} "
                f"WHERE aggregate_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for key, cancelled, moves, announced, position in cursor.fetchall():
                rows[key] = {"cancelled": cancelled, "moves": json.loads(moves),
                             "announced": announced, "position": position}  # fmt: skip
        changed: set[str] = set()
        for position, event in events:
            key = event.originator_id.hex
            row = rows.setdefault(
                key, {"cancelled": 0, "moves": [], "announced": None, "position": 0}
            )
            if position <= row["position"]:
                continue  # already applied (a rebuild racing the live worker)
            kind = type(event).__name__
            if kind == "Cancelled":
                row["cancelled"] = 1
            elif kind in ("Started", "Ended"):
                row["moves"].append({"machine_id": event.machine_id,
                                     "time": event.event_time.isoformat(),
                                     "started": kind == "Started"})  # fmt: skip
            elif kind == "DeliveryForecastChanged":
                row["announced"] = event.forecast.get("status") or row["announced"]
            row["position"] = position
            changed.add(key)
        if changed:
            values = []
            for key in sorted(changed):
                row = rows[key]
                runs = order_runs(row["moves"])
                running = any(run["end"] is None for run in runs)
                values.append((key, row["cancelled"], json.dumps(row["moves"]), int(bool(runs)),
                               int(running), row["announced"], row["position"]))  # fmt: skip
            cursor.executemany(
                f"INSERT INTO {STATES_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (aggregate_id) DO UPDATE SET cancelled = excluded.cancelled, "
                "moves = excluded.moves, ran = excluded.ran, running = excluded.running, "
                "announced = excluded.announced, position = excluded.position",
                values,
            )


def orders_in_play(db: ViewDatabase) -> list[UUID]:
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT aggregate_id FROM {STATES_TABLE} WHERE cancelled = 0 AND NOT "
            "(announced IN ('done', 'late') AND ran = 1 AND running = 0)"
        )
        return [UUID(row[0]) for row in cursor.fetchall()]
