"""What a machine's stored counter readings add up to, read from its whole stored history with
the projections' own rule (``projections.rules.counters``): for tests of ingest and adapters, which
check what reached the store, not how far the views have read."""

from __future__ import annotations

from typing import Any

from projections.rules.counters import CounterTotals, counter_totals
from projections.rules.history import machine_facts
from projections.rules.plant import PlantConfig


def stored_counters(store: Any, site: str, machine_id: str) -> CounterTotals:
    readings = machine_facts(store.machine_history(site, machine_id)).readings
    return counter_totals(readings, PlantConfig().max_parts_per_reading)


def stored_parts(store: Any, site: str, machine_id: str) -> int:
    return stored_counters(store, site, machine_id).produced
