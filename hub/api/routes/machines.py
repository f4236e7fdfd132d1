from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, TypeAdapter

from hub.api.deps import Plant, Reader, Reads, Site
from hub.api.problems import Problem, problems
from hub.api.reads import JsonAnswer, ReadSources
from hub.domain import COUNTER_JUMP, Machine
from projections.rules.counters import CounterTotals
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader

router = APIRouter(prefix="/machines", tags=["machines"])


class ConditionView(BaseModel):
    level: str
    native_code: str | None
    message: str | None
    since: datetime


class MachineView(BaseModel):
    site: str
    machine_id: str
    availability: str | None
    execution: str | None
    mode: str | None
    program: str | None
    state_since: datetime | None
    parts_produced: int
    parts_bad: int
    parts_scrapped: int
    counter_resets: int
    order_id: str | None
    conditions: list[ConditionView]
    last_event_time: datetime | None
    version: int

    implausible_readings: int

    @classmethod
    def of(cls, machine: Machine, counters: CounterTotals, order_id: str | None) -> MachineView:
        conditions: list[dict[str, Any]] = list(machine.conditions.values())
        jump = counters.last_implausible
        cleared = (machine.cleared_at or {}).get(COUNTER_JUMP)
        if jump is not None and (cleared is None or jump.reading.time > cleared):
            conditions.append(
                {
                    "level": "warning",
                    "native_code": COUNTER_JUMP,
                    "message": f"part counter {jump.reading.kind!r} went from {jump.previous} "
                    f"to {jump.reading.count}: implausible, not counted",
                    "since": jump.reading.time,
                }
            )
        return cls(
            site=machine.site,
            machine_id=machine.machine_id,
            availability=machine.availability,
            execution=machine.execution,
            mode=machine.mode,
            program=machine.program,
            state_since=machine.state_since,
            parts_produced=counters.produced,
            parts_bad=counters.bad,
            parts_scrapped=machine.parts_scrapped,
            counter_resets=counters.resets,
            order_id=order_id,
            conditions=[ConditionView.model_validate(c) for c in conditions],
            last_event_time=machine.last_event_time,
            version=machine.version,
            implausible_readings=counters.implausible,
        )


def _view(facts: FactsReader, plant: PlantConfig, machine: Machine) -> MachineView:
    """The machine's state, with its counters and current order as the views decide them (by
    event time, as its timeline and OEE)."""
    rules = plant.machine_rules(machine.machine_id)
    counters = facts.counter_totals(machine.id, rules.max_parts_per_reading)
    return MachineView.of(machine, counters, facts.current_order(machine.id))


_MACHINES = TypeAdapter(list[MachineView])


def read_machines(sources: ReadSources, site: str, plant: PlantConfig) -> bytes:
    """Every machine of ``site``, as the answer's JSON (in the read pool)."""
    views = [_view(sources.facts, plant, m) for m in sources.store.machines(site)]
    return _MACHINES.dump_json(views)


def read_machine(sources: ReadSources, site: str, plant: PlantConfig, machine_id: str) -> bytes:
    """One machine, as the answer's JSON, or nothing for a machine never heard of."""
    machine = sources.store.machine(site, machine_id)
    if machine is None:
        return b""
    return _view(sources.facts, plant, machine).model_dump_json().encode()


@router.get(
    "",
    summary="Every machine the hub has heard of, with its current state",
    response_model=list[MachineView],
)
async def list_machines(
    request: Request, reads: Reads, plant: Plant, site: Site, _: Reader
) -> Response:
    return JsonAnswer(await reads.run(request, read_machines, site, plant))


@router.get(
    "/{machine_id}",
    summary="One machine's current state",
    responses=problems(404),
    response_model=MachineView,
)
async def get_machine(
    request: Request, machine_id: str, reads: Reads, plant: Plant, site: Site, _: Reader
) -> Response:
    answer = await reads.run(request, read_machine, site, plant, machine_id)
    if not answer:
        raise Problem(404, f"no machine {machine_id!r} at site {site!r}")
    return JsonAnswer(answer)
