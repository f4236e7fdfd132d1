"""What the machine adapters' tests share: an adapter run as a task, and the facts it published
(kind and data, in publish order)."""

from __future__ import annotations

import asyncio
from typing import Any

from adapters.machines.base import MachineAdapter
from hub.ports import InMemoryPublisher


def facts(publisher: InMemoryPublisher) -> list[tuple[str, dict[str, Any]]]:
    """(kind, data as sent) of every published event, in publish order."""
    return [(subject.rsplit(".", 1)[1], e.envelope.data) for subject, e in publisher.published]


def of_kind(publisher: InMemoryPublisher, kind: str) -> list[dict[str, Any]]:
    return [data for k, data in facts(publisher) if k == kind]


class Running:
    """An adapter's ``run`` as a task, stopped (and checked not to have crashed) at the end."""

    def __init__(self, adapter: MachineAdapter, publisher: Any) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(adapter.run(publisher, self.stop))

    async def finish(self) -> None:
        assert not self.task.done(), "the adapter stopped on its own"
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
