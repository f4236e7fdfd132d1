from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime

from adapters.machines.simulator import SimulatorConfig, factory_events, run_simulator
from hub.ports import InMemoryPublisher

START = datetime(2026, 3, 2, tzinfo=UTC)


def test_same_seed_same_events_and_ids() -> None:
    config = SimulatorConfig(machines=4, seed=7, start=START)
    first = list(itertools.islice(factory_events(config), 3000))
    again = list(itertools.islice(factory_events(config), 3000))
    assert first == again
    assert len({e.id for e in first}) == len(first)


def test_another_start_is_another_run_with_its_own_ids() -> None:
    first = list(itertools.islice(factory_events(SimulatorConfig(machines=2, start=START)), 50))
    later = START.replace(hour=8)
    second = list(itertools.islice(factory_events(SimulatorConfig(machines=2, start=later)), 50))
    assert not {e.id for e in first} & {e.id for e in second}
    orders = [e.subject for e in first + second if e.type == "mes.erp.order.released.v1"]
    assert len(orders) == len(set(orders))


def test_events_come_in_event_time_order_and_show_real_behaviour() -> None:
    config = SimulatorConfig(machines=20, seed=1, start=START)
    events = list(itertools.islice(factory_events(config), 40_000))
    assert [e.time for e in events] == sorted(e.time for e in events)
    types = Counter(e.type for e in events)
    for expected in (
        "mes.machine.partcount.v1",
        "mes.machine.execution.v1",
        "mes.machine.condition.v1",
        "mes.machine.availability.v1",
        "mes.operator.downtime_reason.v1",
        "mes.erp.order.released.v1",
        "mes.operator.order_started.v1",
    ):
        assert types[expected] > 0, expected
    executions = Counter(e.data["execution"] for e in events if e.type.endswith("execution.v1"))
    assert executions["INTERRUPTED"] > 0 and executions["STOPPED"] > 0
    bad_counts = [e for e in events if e.type.endswith("partcount.v1") and e.data["kind"] == "bad"]
    assert bad_counts
    availability = Counter(e.data["availability"] for e in events if "availability" in e.type)
    assert availability["UNAVAILABLE"] > 0
    # An offline spell shows in execution too, as an adapter that lost the machine reports it.
    assert executions["UNAVAILABLE"] == availability["UNAVAILABLE"]


def test_a_counter_reset_shows_as_a_decrease() -> None:
    config = SimulatorConfig(machines=5, seed=2, start=START, counter_reset_rate=0.02)
    last: dict[str, int] = {}
    decreases = 0
    for event in itertools.islice(factory_events(config), 20_000):
        if event.type.endswith("partcount.v1") and event.data["kind"] == "all":
            if event.subject in last and event.data["count"] < last[event.subject]:
                decreases += 1
            last[event.subject] = event.data["count"]
    assert decreases > 0


async def test_run_publishes_through_the_port_and_stops_at_max_events() -> None:
    publisher = InMemoryPublisher()
    run = await run_simulator(
        SimulatorConfig(machines=3, seed=1, start=START), publisher, speed=0, max_events=250
    )
    assert run.published == 250 == len(publisher.published)
    again = await run_simulator(
        SimulatorConfig(machines=3, seed=1, start=START), publisher, speed=0, max_events=250
    )
    assert again.duplicates == 250 and again.published == 0
