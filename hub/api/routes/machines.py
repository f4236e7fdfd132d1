from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from hub.api.deps import Context, Reader
from hub.api.problems import Problem
from hub.domain import Machine

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

    @classmethod
    def of(cls, machine: Machine) -> MachineView:
        conditions: list[dict[str, Any]] = list(machine.conditions.values())
        return cls(
            site=machine.site,
            machine_id=machine.machine_id,
            availability=machine.availability,
            execution=machine.execution,
            mode=machine.mode,
            program=machine.program,
            state_since=machine.state_since,
            parts_produced=machine.parts_produced,
            parts_bad=machine.parts_bad,
            parts_scrapped=machine.parts_scrapped,
            counter_resets=machine.counter_resets,
            order_id=machine.order_id,
            conditions=[ConditionView.model_validate(c) for c in conditions],
            last_event_time=machine.last_event_time,
            version=machine.version,
        )


@router.get("", summary="Every machine the hub has heard of, with its current state")
async def list_machines(context: Context, _: Reader) -> list[MachineView]:
    machines = await asyncio.to_thread(context.store.machines, context.site)
    return [MachineView.of(m) for m in machines]


@router.get("/{machine_id}", summary="One machine's current state")
async def get_machine(machine_id: str, context: Context, _: Reader) -> MachineView:
    machine = await asyncio.to_thread(context.store.machine, context.site, machine_id)
    if machine is None:
        raise Problem(404, f"no machine {machine_id!r} at site {context.site!r}")
    return MachineView.of(machine)
