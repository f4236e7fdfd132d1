"""The one way to ask for machine timelines and ISO 22400 OEE, whoever shows them — the API's
routes, the demo's live table — so they all answer with the same figures.

A report reads each machine's facts from the machine facts view, settles them with the
machine's rules, and cuts its window where the plant configuration changed: the configurations
recorded on the site's ``Plant``, else the one in force now (``[plant]``). The site's report adds
the machines' raw times and counts bucket by bucket (see ``projections.rules.report``).

An entry point's module: it reads the store and the views, and computes with the rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial

from hub.domain import Plant, machine_aggregate_id, plant_aggregate_id
from hub.store import EventStore
from projections.rules.calendar import Interval
from projections.rules.history import MachineFacts
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import PlantHistory
from projections.rules.report import (
    Bucket,
    FactsFor,
    GroupBy,
    facts_window,
    report_over_time,
    site_report,
    timeline_over_time,
)
from projections.rules.timeline import TimelineInterval
from projections.views.facts_view import FactsReader
from projections.views.orders_view import OrdersReader

log = logging.getLogger(__name__)
# Site and order ids -> each order's (ideal cycle time, part number), as the orders view says.
CycleFacts = Callable[[str, Collection[str]], dict[str, tuple[float | None, str | None]]]
# The unreadable plant configurations already said, by (site, number, recorded at).
_SAID: set[tuple[str, int, str]] = set()


class UnknownMachine(LookupError):
    """The site has no such machine: none stored, none configured."""

    def __init__(self, site: str, machine_id: str) -> None:
        super().__init__(f"no machine {machine_id!r} at site {site!r}")
        self.site = site
        self.machine_id = machine_id

    def __reduce__(self) -> tuple[type[UnknownMachine], tuple[str, str]]:
        # Raised in an API read worker and sent back to the hub: rebuilt from its fields.
        return (UnknownMachine, (self.site, self.machine_id))


@dataclass(frozen=True)
class Reports:
    """Timelines and OEE of one site's machines; ``plant`` is the configuration in force now.
    Blocking (it reads the store and the views): call it off the event loop. ``now`` is where
    what is known ends: nothing after it is reported, and a bucket still open then is
    provisional."""

    store: EventStore
    facts: FactsReader
    orders: OrdersReader
    site: str
    plant: PlantConfig
    # The site's ``Plant`` as it stood at this version (``as_known_at``); None: as it is now.
    plant_version: int | None = None
    # What the orders said of their ideal cycle times then (``as_known_at``); None: the view.
    cycle_facts: CycleFacts | None = None

    def as_known_at(self, position: int, plant_version: int, cycle_facts: CycleFacts) -> Reports:
        """These reports as the hub could have made them when its log ended at ``position``:
        the machine facts stored up to it, the plant configurations recorded up to it
        (``plant_version``, the site's ``Plant`` then; 0: none recorded yet), and the orders'
        ideal cycle times as they stood then (``cycle_facts``: site and order ids to
        ``OrdersReader.order_cycle_facts``' answer)."""
        return replace(
            self,
            facts=self.facts.as_known_at(position),
            plant_version=plant_version,
            cycle_facts=cycle_facts,
        )

    def machine_timeline(
        self, machine_id: str, window: Interval, now: datetime
    ) -> list[TimelineInterval]:
        """The machine's state intervals over ``window``, up to ``now``; raises
        ``UnknownMachine``."""
        plants = self._plants()
        facts_for = self._facts_for(machine_id, _configured(plants, window))
        return timeline_over_time(facts_for, window, plants, now)

    def machine_oee(
        self, machine_id: str, window: Interval, group_by: GroupBy | None, now: datetime
    ) -> list[Bucket]:
        """The machine's OEE over ``window``, one bucket or one per ``group_by``; raises
        ``UnknownMachine``."""
        return self.machines_oee([machine_id], window, group_by, now)[machine_id]

    def machines_oee(
        self,
        machine_ids: Collection[str],
        window: Interval,
        group_by: GroupBy | None,
        now: datetime,
    ) -> dict[str, list[Bucket]]:
        """``machine_oee`` of each of ``machine_ids``, under one reading of the plant history."""
        plants = self._plants()
        configured = _configured(plants, window)
        return {m: self._report(m, configured, window, group_by, plants, now) for m in machine_ids}

    def site_oee(self, window: Interval, group_by: GroupBy | None, now: datetime) -> list[Bucket]:
        """The site's OEE: every machine stored or configured, added up (never averaged)."""
        plants = self._plants()
        configured = _configured(plants, window)
        machines = sorted({*self.store.machine_ids(self.site), *configured})
        reports = [self._report(m, configured, window, group_by, plants, now) for m in machines]
        return site_report(reports, group_by)

    def _plants(self) -> PlantHistory:
        plants = PlantHistory.of(self._plant_record(), self.plant)
        for skipped in plants.unreadable:
            key = (self.site, skipped.number, skipped.recorded_at)
            if key not in _SAID:  # once per process, not on every report
                _SAID.add(key)
                log.error(
                    "plant configuration %d of site %s (recorded %s) cannot be read and is "
                    "skipped: %s (mes-hub projections status counts them)",
                    skipped.number, self.site, skipped.recorded_at, skipped.reason,
                )  # fmt: skip
        return plants

    def _plant_record(self) -> Plant | None:
        if self.plant_version is None:
            return self.store.plant(self.site)
        if self.plant_version == 0:
            return None
        found = self.store.aggregate_at(plant_aggregate_id(self.site), self.plant_version)
        return found if isinstance(found, Plant) else None

    def _report(
        self,
        machine_id: str,
        configured: Collection[str],
        window: Interval,
        group_by: GroupBy | None,
        plants: PlantHistory,
        now: datetime,
    ) -> list[Bucket]:
        return report_over_time(
            self._facts_for(machine_id, configured),
            partial(self.cycle_facts or self.orders.order_cycle_facts, self.site),
            window,
            group_by,
            plants,
            now,
        )

    def _facts_for(self, machine_id: str, configured: Collection[str]) -> FactsFor:
        known = machine_id in configured or machine_id in self.plant.machines
        if not known and not self.store.has_machine(self.site, machine_id):
            raise UnknownMachine(self.site, machine_id)
        machine = machine_aggregate_id(self.site, machine_id)

        def facts_for(window: Interval, plant: PlantConfig) -> MachineFacts:
            facts = self.facts.window(machine, facts_window(window, plant))
            return facts.settle(plant.machine_rules(machine_id))

        return facts_for


def _configured(plants: PlantHistory, window: Interval) -> set[str]:
    """The machines ``[plant.machines]`` names in any configuration in force over ``window``:
    they count before their first report (from their commissioning date, if they have one)."""
    return {m for _, plant in plants.segments(window) for m in plant.machines}
