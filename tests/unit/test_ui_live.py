"""The live pages' follower of the views (hub.ui.live.LiveFeed), with fakes for the views'
position, the store's changed machines and the read pool."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hub.ui import live as live_module
from hub.ui.live import LiveFeed
from projections.rules.plant import PlantConfig


class FakeFactory:
    """Machines with a state each, the views' position, and a read pool that makes tiles of
    them (failing when told to, as a full pool answers 429)."""

    def __init__(self) -> None:
        self.states = {"M1": "running", "M2": "running"}
        self.position = 10
        self.changed_calls: list[tuple[int, int]] = []
        self.changed: set[str] = set()
        self.fail_reads = 0
        self.reads = 0

    def views_position(self) -> int:
        return self.position

    def changed_machines(self, after: int, upto: int) -> set[str]:
        self.changed_calls.append((after, upto))
        return set(self.changed)

    async def run(self, request: Any, work: Any, site: str, plant: Any, machines: Any, *rest: Any):
        self.reads += 1
        figures = rest[-1]
        if self.fail_reads:
            self.fail_reads -= 1
            raise RuntimeError("the read pool is full")
        wanted = sorted(self.states) if machines is None else machines
        return [
            {"machine_id": m, "state": self.states[m], "order_id": None,
             "shift": {"oee": 0.5} if figures else None}
            for m in wanted
        ]  # fmt: skip


@pytest.fixture
def factory(monkeypatch: pytest.MonkeyPatch) -> FakeFactory:
    monkeypatch.setattr(live_module, "SESSION_CHECK_S", 0.2)
    return FakeFactory()


def feed_of(factory: FakeFactory) -> LiveFeed:
    return LiveFeed(
        factory,  # type: ignore[arg-type]
        "default",
        PlantConfig(),
        factory.views_position,
        factory.changed_machines,
        poll_s=0.01,
        figures_every_s=3600,
    )


async def signed_in() -> bool:
    return True


async def events(stream: AsyncIterator[bytes], count: int) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    async for chunk in stream:
        text = chunk.decode()
        if "data: " in text:
            name = text.split("event: ")[1].split("\n")[0]
            found.append((name, json.loads(text.split("data: ")[1].split("\n")[0])))
            if len(found) == count:
                break
    return found


async def test_a_stopped_machine_reaches_the_page_showing_it(factory: FakeFactory) -> None:
    feed = feed_of(factory)
    stream = feed.stream(["M1"], signed_in)
    ((name, first),) = await events(stream, 1)
    assert (name, first["full"], [t["state"] for t in first["tiles"]]) == (
        "tiles",
        True,
        ["running"],
    )
    factory.states["M1"], factory.changed, factory.position = "stopped", {"M1"}, 11
    received = await asyncio.wait_for(events(stream, 2), 5)
    # The state is new; the figures are those of the last time they were made.
    tile = {"machine_id": "M1", "state": "stopped", "order_id": None, "shift": {"oee": 0.5},
            "order_quantity": None, "order_good": None}  # fmt: skip
    assert received == [
        ("tiles", {"position": 11, "tiles": [tile], "full": False}),
        ("views", {"position": 11, "machines": ["M1"]}),
    ]
    await stream.aclose()
    await feed.close()


async def test_a_round_that_fails_is_made_again_not_lost(factory: FakeFactory) -> None:
    feed = feed_of(factory)
    stream = feed.stream(None, signed_in, tiles=False)
    await events(stream, 1)
    # The views move on; the read of the changed tiles fails (the pool is full) once.
    factory.fail_reads, factory.changed, factory.position = 1, {"M2"}, 12
    ((name, views),) = await asyncio.wait_for(events(stream, 1), 5)
    assert (name, views) == ("views", {"position": 12, "machines": ["M2"]})
    assert factory.changed_calls.count((10, 12)) == 2  # asked again after the failure
    await stream.aclose()
    await feed.close()


async def test_nothing_is_said_while_the_views_stand_still(factory: FakeFactory) -> None:
    feed = feed_of(factory)
    feed.figures_every_s = 0.05  # every tile made again, often: the figures change with time
    stream = feed.stream(None, signed_in, tiles=False)
    await events(stream, 1)
    reads = factory.reads
    await asyncio.sleep(0.5)
    assert factory.reads > reads + 3  # the figures were made again, and again
    factory.position = 13  # the first move after them is the first thing said
    ((name, views),) = await asyncio.wait_for(events(stream, 1), 5)
    assert (name, views["position"]) == ("views", 13)
    await stream.aclose()
    await feed.close()


async def test_a_page_opened_after_the_last_closed_gets_every_tile_at_once(
    factory: FakeFactory,
) -> None:
    feed = feed_of(factory)
    first = feed.stream(None, signed_in)
    await events(first, 1)
    await first.aclose()
    while feed._task is not None:  # the follower stops with the last page
        await asyncio.sleep(0.01)
    factory.position = 20
    again = feed.stream(None, signed_in)
    ((name, data),) = await asyncio.wait_for(events(again, 1), 2)
    assert (name, data["full"], data["position"]) == ("tiles", True, 20)
    assert all(after >= 0 for after, _ in factory.changed_calls)  # never the whole log
    await again.aclose()
    await feed.close()


async def test_a_stream_ends_soon_after_its_session_does(factory: FakeFactory) -> None:
    feed = feed_of(factory)
    feed.figures_every_s = 0.05  # messages keep coming: no quiet moment to check in
    session = {"open": True}

    async def still() -> bool:
        return session["open"]

    stream = feed.stream(None, still)
    await events(stream, 1)
    session["open"] = False

    async def drain() -> None:
        async for _ in stream:
            pass

    await asyncio.wait_for(drain(), 5)  # the stream ended by itself
    await feed.close()


async def test_no_stream_opens_once_the_hub_stops(factory: FakeFactory) -> None:
    feed = feed_of(factory)
    await feed.close()
    assert [chunk async for chunk in feed.stream(None, signed_in)] == []
