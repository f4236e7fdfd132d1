"""The plant's configuration for OEE: time zone, shifts, holidays, planned stops, the reason
catalog and the micro-stop threshold, from the ``[plant]`` table of ``mes-hub.toml``.

```toml
[plant]
time_zone = "Europe/Berlin"
micro_stop_threshold_s = 120
forecast_eta_tolerance_s = 1800   # publish a forecast change when the ETA moves more than this
max_parts_per_reading = 10000   # a counter step above this is implausible: kept, not counted
effective_from = "2026-03-01T00:00:00+01:00"   # optional: applies from then (default: from start)
reason_prompt_after_s = 300     # the operator station asks why after a stop this long
holidays = ["2026-12-25"]

[[plant.shifts]]
name = "early"
start = "06:00"
end = "14:00"
days = ["mon", "tue", "wed", "thu", "fri"]
breaks = [["10:00", "10:30"]]

[[plant.planned_stops]]
start = "2026-03-07T06:00:00+01:00"
end = "2026-03-07T14:00:00+01:00"
reason = "planned/maintenance"

[plant.ideal_cycle_times]       # PRI when the order gives none (the order's value wins)
part_numbers = { "P-100" = 42.0 }
programs = { "O1234" = 40.0 }

[plant.machines.LATHE-3]        # per machine: all optional
commissioned = "2026-03-01T06:00:00+01:00"   # it exists from then, not from its first report
max_parts_per_reading = 50
ideal_cycle_time_s = 45.0       # the last fallback for this machine's parts

[plant.reasons]            # the catalog: a tree whose leaves say planned or unplanned
mechanical = { spindle = "unplanned", coolant = "unplanned" }
material = { waiting = "unplanned" }
planned = { changeover = "planned", maintenance = "planned", break = "planned" }

[plant.stations.LATHE-3]        # the reasons its operator station offers (codes or branches)
reasons = ["mechanical", "material/waiting", "planned/changeover"]
```

With no shifts configured the plant runs one 24-hour shift a day, no breaks (docs/oee.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from projections.rules.calendar import WEEKDAYS, Calendar, Interval, PlannedStop, ShiftPattern

DEFAULT_REASONS: dict[str, Any] = {
    "planned": {"break": "planned", "changeover": "planned", "maintenance": "planned"},
}


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShiftConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    start: time
    end: time
    days: list[Weekday] = Field(default_factory=lambda: list(ALL_DAYS))
    breaks: list[tuple[time, time]] = []


class PlannedStopConfig(_Strict):
    start: AwareDatetime
    end: AwareDatetime
    reason: str = "planned/maintenance"


class MachinePlantConfig(_Strict):
    """What the plant says of one machine (``[plant.machines.<id>]``)."""

    # The machine exists from then; without it, from its first report.
    commissioned: AwareDatetime | None = None
    max_parts_per_reading: int | None = Field(default=None, ge=1)
    ideal_cycle_time_s: float | None = Field(default=None, gt=0)


class IdealCycleTimesConfig(_Strict):
    """PRI fallbacks for parts whose order gives none: by part number, then by program."""

    part_numbers: dict[str, float] = {}
    programs: dict[str, float] = {}

    @field_validator("part_numbers", "programs")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, seconds in value.items():
            if not seconds > 0:
                raise ValueError(f"{name!r}: an ideal cycle time must be more than 0 s")
        return value


@dataclass(frozen=True)
class MachineRules:
    """The plant's rules for one machine's figures, resolved from ``[plant]``."""

    commissioned: datetime | None = None
    max_parts_per_reading: int = 10_000
    ideal_cycle_time_s: float | None = None
    part_number_cycle_times: Mapping[str, float] = field(default_factory=dict)
    program_cycle_times: Mapping[str, float] = field(default_factory=dict)


class StationConfig(_Strict):
    """What one machine's operator station offers (``[plant.stations.<id>]``)."""

    # Codes or whole branches of the catalog (``mechanical``, ``material/waiting``): plants
    # keep six to nine per machine; none listed: the whole catalog.
    reasons: list[str] = []


class PlantConfig(_Strict):
    time_zone: str = "UTC"
    micro_stop_threshold_s: float = Field(default=120.0, ge=0, le=3600)
    # A delivery forecast's ETA moving by more than this is news (a status change always is).
    forecast_eta_tolerance_s: float = Field(default=1800.0, gt=0)
    shifts: list[ShiftConfig] = []
    holidays: list[date] = []
    planned_stops: list[PlannedStopConfig] = []
    reasons: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_REASONS))
    # A counter reading that adds more than this is implausible: kept, counts nothing, warned.
    max_parts_per_reading: int = Field(default=10_000, ge=1)
    ideal_cycle_times: IdealCycleTimesConfig = Field(default_factory=IdealCycleTimesConfig)
    machines: dict[str, MachinePlantConfig] = {}
    # The operator station asks why a machine stopped once the stop has lasted this long.
    reason_prompt_after_s: float = Field(default=300.0, ge=0, le=86_400)
    stations: dict[str, StationConfig] = {}
    # When this configuration starts to apply; none: from when the hub first runs with it.
    effective_from: AwareDatetime | None = None

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value

    @field_validator("shifts")
    @classmethod
    def _shifts_apart(cls, value: list[ShiftConfig]) -> list[ShiftConfig]:
        # Overlapping shifts would count the same hour of planned busy time twice.
        week = 7 * 1440
        spans: list[tuple[int, int, str]] = []
        for shift in value:
            start = shift.start.hour * 60 + shift.start.minute
            length = (shift.end.hour * 60 + shift.end.minute - start) % 1440 or 1440
            for day in shift.days:
                begin = WEEKDAYS.index(day) * 1440 + start
                spans.append((begin, begin + length, shift.name))
        spans.sort()
        # A shift past Sunday midnight wraps onto Monday: compare against the first span too.
        for (_, end, name), (begin, _, other) in zip(
            spans, [*spans[1:], (spans[0][0] + week, 0, spans[0][2])] if spans else [], strict=False
        ):
            if end > begin:
                raise ValueError(f"shifts {name!r} and {other!r} overlap")
        return value

    @field_validator("machines")
    @classmethod
    def _machine_ids(cls, value: dict[str, MachinePlantConfig]) -> dict[str, MachinePlantConfig]:
        for machine_id in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", machine_id):
                raise ValueError(f"machine id {machine_id!r} must be letters, digits, _ or -")
        return value

    @field_validator("reasons")
    @classmethod
    def _catalog_leaves(cls, value: dict[str, Any]) -> dict[str, Any]:
        leaf_kinds(value)
        return value

    @field_validator("stations")
    @classmethod
    def _station_reasons_in_catalog(
        cls, value: dict[str, StationConfig], info: ValidationInfo
    ) -> dict[str, StationConfig]:
        codes = leaf_kinds(info.data.get("reasons") or {})
        for machine_id, station in value.items():
            for listed in station.reasons:
                if not _in_tree(codes, listed):
                    raise ValueError(
                        f"{machine_id}.reasons: {listed!r} is neither a reason code nor a "
                        "branch of [plant.reasons]"
                    )
        return value

    def calendar(self) -> Calendar:
        zone = ZoneInfo(self.time_zone)
        patterns = tuple(
            ShiftPattern(
                s.name,
                s.start,
                s.end,
                frozenset(WEEKDAYS.index(d) for d in s.days),
                tuple(s.breaks),
            )
            for s in self.shifts
        )
        stops = tuple(PlannedStop(Interval(p.start, p.end), p.reason) for p in self.planned_stops)
        if not patterns:
            return Calendar(time_zone=zone, holidays=frozenset(self.holidays), planned_stops=stops)
        return Calendar(zone, patterns, frozenset(self.holidays), stops)

    def order_ideal_cycle_time(self, own: float | None, part_number: str | None) -> float | None:
        """An order's PRI: its own, else the plant's for its part number (then, per part, the
        program's and the machine's: ``MachineRules``)."""
        return own or self.ideal_cycle_times.part_numbers.get(part_number or "")

    def machine_rules(self, machine_id: str) -> MachineRules:
        machine = self.machines.get(machine_id, MachinePlantConfig())
        return MachineRules(
            commissioned=machine.commissioned,
            max_parts_per_reading=machine.max_parts_per_reading or self.max_parts_per_reading,
            ideal_cycle_time_s=machine.ideal_cycle_time_s,
            part_number_cycle_times=self.ideal_cycle_times.part_numbers,
            program_cycle_times=self.ideal_cycle_times.programs,
        )

    def reason_codes(self) -> list[str]:
        """The catalog's leaf codes, the only ones an operator may give."""
        return sorted(leaf_kinds(self.reasons))

    def planned_reasons(self) -> dict[str, bool]:
        """Reason code (``a/b``) -> whether it is a planned stop."""
        return {code: kind == "planned" for code, kind in leaf_kinds(self.reasons).items()}

    def station_reasons(self, machine_id: str) -> dict[str, str]:
        """The reason codes (``a/b`` -> planned or unplanned) machine ``machine_id``'s operator
        station offers: those ``[plant.stations]`` lists for it, else the whole catalog."""
        codes = leaf_kinds(self.reasons)
        station = self.stations.get(machine_id)
        if station is None or not station.reasons:
            return codes
        return {
            code: kind
            for code, kind in codes.items()
            if any(_in_tree({code: kind}, listed) for listed in station.reasons)
        }


def _in_tree(codes: Mapping[str, str], listed: str) -> bool:
    """Whether ``listed`` is one of ``codes`` or a branch above one of them."""
    return listed in codes or any(code.startswith(listed.rstrip("/") + "/") for code in codes)


def leaf_kinds(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    leaves: dict[str, str] = {}
    for name, value in tree.items():
        code = f"{prefix}{name}"
        if isinstance(value, dict):
            leaves |= leaf_kinds(value, code + "/")
        elif value in ("planned", "unplanned"):
            leaves[code] = value
        else:
            raise ValueError(f'reason {code!r}: a leaf must be "planned" or "unplanned"')
    return leaves
