"""The order view: what the OEE and forecast need of each order the ERP released (its ideal
cycle time, ISO 22400 PRI, and its part number for the plant's PRI fallback), without loading
the order's aggregate."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any
from uuid import UUID

from hub.domain import Order, order_aggregate_id
from projections.database import Cursor, ViewDatabase

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


STATES_TABLE = "mes_view_order_states"


class OrderStatesView(_KeyedTable):
    """Which orders are still in play for delivery forecasts, so a forecast round loads those
    and not every order the plant ever had: not cancelled, and not ended after a final (done or
    late) forecast was announced."""

    name = "order_states"
    table = STATES_TABLE
    # (made by the library from the @event decorators, out of mypy's sight)
    event_classes: tuple[type, ...] = tuple(
        getattr(Order, name)
        for name in ("Released", "Cancelled", "Started", "Ended", "DeliveryForecastChanged")
    )

    def create(self, cursor: Cursor, dialect: str) -> None:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {STATES_TABLE} (aggregate_id TEXT PRIMARY KEY, "
            "cancelled INTEGER NOT NULL, starts INTEGER NOT NULL, ends INTEGER NOT NULL, "
            "announced TEXT, position BIGINT NOT NULL)"
        )

    def apply(self, cursor: Cursor, events: Sequence[tuple[int, Any]]) -> None:
        rows = []
        for position, event in events:
            kind = type(event).__name__
            announced = event.forecast.get("status") if kind == "DeliveryForecastChanged" else None
            rows.append((
                event.originator_id.hex, int(kind == "Cancelled"), int(kind == "Started"),
                int(kind == "Ended"), announced, position,
            ))  # fmt: skip
        if rows:
            # Counts add up event by event; the position guard makes a batch applied twice (a
            # rebuild racing the live worker) count once.
            cursor.executemany(
                f"INSERT INTO {STATES_TABLE} VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (aggregate_id) DO UPDATE SET "
                f"cancelled = {STATES_TABLE}.cancelled + excluded.cancelled, "
                f"starts = {STATES_TABLE}.starts + excluded.starts, "
                f"ends = {STATES_TABLE}.ends + excluded.ends, "
                f"announced = COALESCE(excluded.announced, {STATES_TABLE}.announced), "
                "position = excluded.position "
                f"WHERE excluded.position > {STATES_TABLE}.position",
                rows,
            )


def orders_in_play(db: ViewDatabase) -> list[UUID]:
    with db.transaction(write=False) as cursor:
        cursor.execute(
            f"SELECT aggregate_id FROM {STATES_TABLE} WHERE cancelled = 0 AND NOT "
            "(announced IN ('done', 'late') AND starts > 0 AND ends >= starts)"
        )
        return [UUID(row[0]) for row in cursor.fetchall()]
