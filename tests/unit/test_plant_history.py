"""Which plant configuration applies when: the rule reports rely on."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time

import pytest

from hub.domain import Origin, Plant
from projections.rules.calendar import Interval
from projections.rules.plant import PlantConfig, ShiftConfig
from projections.rules.plant_history import PlantHistory, configuration_event

ALL_DAY = PlantConfig()
EARLY_ONLY = PlantConfig(shifts=[ShiftConfig(name="early", start=time(6), end=time(14))])
TWO_SHIFTS = PlantConfig(
    shifts=[
        ShiftConfig(name="early", start=time(6), end=time(14)),
        ShiftConfig(name="late", start=time(14), end=time(22)),
    ]
)


def day(n: int, hour: int = 0) -> datetime:
    return datetime(2026, 3, n, hour, tzinfo=UTC)


def recorded(*configurations: tuple[PlantConfig, datetime]) -> Plant:
    plant = Plant(site="s")
    for config, at in configurations:
        event = configuration_event("s", plant, config, at)
        assert event is not None
        assert isinstance(event.data, dict)
        plant.configure(
            Origin(event.id, event.source, at), event.data["plant"], config.effective_from
        )
    return plant


def test_the_first_configuration_also_covers_the_time_before_it() -> None:
    history = PlantHistory.of(recorded((ALL_DAY, day(10))), current=TWO_SHIFTS)
    assert history.at(day(1)) == ALL_DAY
    assert history.segments(Interval(day(1), day(20))) == [(Interval(day(1), day(20)), ALL_DAY)]


def test_a_change_applies_from_when_it_was_recorded_unless_it_says_otherwise() -> None:
    back_dated = EARLY_ONLY.model_copy(update={"effective_from": day(5)})
    history = PlantHistory.of(
        recorded((ALL_DAY, day(1)), (TWO_SHIFTS, day(10)), (back_dated, day(12))), ALL_DAY
    )
    # The correction recorded on the 12th, effective from the 5th, wins from the 5th on.
    assert history.segments(Interval(day(2), day(14))) == [
        (Interval(day(2), day(5)), ALL_DAY),
        (Interval(day(5), day(14)), EARLY_ONLY.model_copy(update={"effective_from": None})),
    ]


def test_with_nothing_recorded_the_current_configuration_applies() -> None:
    history = PlantHistory.of(None, current=TWO_SHIFTS)
    assert history.segments(Interval(day(1), day(2))) == [(Interval(day(1), day(2)), TWO_SHIFTS)]


def test_an_unchanged_configuration_is_not_recorded_again_and_numbers_follow_the_record() -> None:
    plant = recorded((ALL_DAY, day(1)))
    assert configuration_event("s", plant, ALL_DAY, day(2)) is None
    change = configuration_event("s", plant, TWO_SHIFTS, day(2))
    assert change is not None and change.id == "plant-s-2"


def test_a_recorded_configuration_this_version_cannot_read_is_skipped() -> None:
    plant = recorded((ALL_DAY, day(1)), (TWO_SHIFTS, day(10)))
    plant.configurations[1]["config"]["shifts"] = "every other tuesday"  # unreadable record
    history = PlantHistory.of(plant, current=EARLY_ONLY)
    assert history.segments(Interval(day(1), day(20))) == [(Interval(day(1), day(20)), ALL_DAY)]


def test_an_unreadable_configuration_is_said_once_in_one_line_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from hub.reports import Reports

    plant = recorded((ALL_DAY, day(1)), (TWO_SHIFTS, day(10)))
    plant.configurations[1]["config"]["shifts"] = "every other tuesday"
    history = PlantHistory.of(plant, current=EARLY_ONLY)
    ((skipped,),) = [history.unreadable]
    assert skipped.number == 2 and "shifts" in skipped.reason and "\n" not in skipped.reason
    store = SimpleNamespace(plant=lambda site: plant)
    reports = Reports(cast(Any, store), cast(Any, None), cast(Any, None), "once", EARLY_ONLY)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # three OEE requests
            reports._plants()
    said = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0].getMessage()
