"""Which plant configuration applied when.

Every configuration the hub ran with is recorded on the site's ``Plant`` (a
``mes.hub.plant.configured.v1`` event, published when ``mes-hub serve`` starts with a changed
``[plant]`` table). A report cuts its window where the configuration changed and judges each
piece by the shifts and reason catalog in force then. Rule: at any instant the configuration
recorded last among those already in effect applies; the first one also covers everything
before it (there was no other).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from contracts import CloudEvent
from hub.domain import Plant
from projections.rules.calendar import Interval
from projections.rules.hub_events import hub_event
from projections.rules.plant import PlantConfig

CONFIGURED_TYPE = "mes.hub.plant.configured.v1"


def _as_recorded(plant: PlantConfig) -> dict[str, Any]:
    return plant.model_dump(mode="json", exclude={"effective_from"})


@dataclass(frozen=True)
class Configuration:
    applies_from: datetime | None  # None: from the beginning
    plant: PlantConfig


@dataclass(frozen=True)
class Unreadable:
    """A recorded configuration this version cannot read: which one, and why (one line)."""

    number: int  # 1 = the first recorded
    recorded_at: str
    reason: str


class PlantHistory:
    def __init__(
        self,
        configurations: list[Configuration],
        current: PlantConfig,
        unreadable: tuple[Unreadable, ...] = (),
    ) -> None:
        self._configurations = configurations  # in the order they were recorded
        self.current = current
        # Skipped: the configuration before each goes on applying. Said by whoever reports
        # (once: ``hub.reports``; counted by ``mes-hub projections status``).
        self.unreadable = unreadable

    @classmethod
    def of(cls, recorded: Plant | None, current: PlantConfig) -> PlantHistory:
        configurations: list[Configuration] = []
        unreadable: list[Unreadable] = []
        for index, entry in enumerate(recorded.configurations if recorded else []):
            start = entry["effective_from"] or entry["recorded_at"]
            try:
                plant = PlantConfig.model_validate(entry["config"])
            except ValidationError as exc:
                # A record this version cannot read must not take every report down with it:
                # the configuration before it goes on applying.
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(part) for part in first["loc"]) or "the record"
                reason = f"{exc.error_count()} error(s), first: {where}: {first['msg']}"
                unreadable.append(Unreadable(index + 1, str(entry["recorded_at"]), reason))
                continue
            applies_from = None if not configurations else datetime.fromisoformat(start)
            configurations.append(Configuration(applies_from, plant))
        return cls(configurations, current, tuple(unreadable))

    def at(self, time: datetime) -> PlantConfig:
        applying = [
            c for c in self._configurations if c.applies_from is None or c.applies_from <= time
        ]
        return applying[-1].plant if applying else self.current

    def segments(self, window: Interval) -> list[tuple[Interval, PlantConfig]]:
        """``window`` cut where the configuration in force changes."""
        cuts = sorted(
            {
                c.applies_from
                for c in self._configurations
                if c.applies_from is not None and window.start < c.applies_from < window.end
            }
        )
        edges = [window.start, *cuts, window.end]
        pieces: list[tuple[Interval, PlantConfig]] = []
        for start, end in itertools.pairwise(edges):
            plant = self.at(start)
            if pieces and pieces[-1][1] == plant:
                pieces[-1] = (Interval(pieces[-1][0].start, end), plant)
            else:
                pieces.append((Interval(start, end), plant))
        return pieces


def configuration_event(
    site: str, recorded: Plant | None, plant: PlantConfig, now: datetime
) -> CloudEvent | None:
    """The event recording ``plant``, or None when it is what was recorded last. Its id is the
    configuration's number, so a hub restarted before the event was stored repeats the id."""
    configurations = recorded.configurations if recorded else []
    if configurations:
        last = configurations[-1]
        effective = plant.effective_from.isoformat() if plant.effective_from else None
        if last["config"] == _as_recorded(plant) and last["effective_from"] == effective:
            return None
    return hub_event(
        site,
        "plant-config",
        CONFIGURED_TYPE,
        f"plant-{site}-{len(configurations) + 1}",
        site,
        now,
        {"plant": _as_recorded(plant), "effective_from": plant.effective_from},
    )
