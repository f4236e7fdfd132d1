"""The pieces every polled adapter shares (adapters/machines/base.py), as worked examples."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from adapters.machines.base import MachineEvents, problem_changes, publish_or_keep
from contracts import CloudEvent
from hub.ports import InMemoryPublisher, PublishReceipt

log = logging.getLogger("test")
AT = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
EVENTS = MachineEvents("M7", "test://peer")


class Unreachable:
    async def publish(self, event: CloudEvent) -> PublishReceipt:
        raise ConnectionError("NATS and its buffer are away")

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        raise ConnectionError("NATS and its buffer are away")


async def test_a_failed_publish_keeps_the_old_state_so_the_next_poll_finds_the_changes() -> None:
    events = [EVENTS.part_count(5, "all", AT, "5")]
    assert await publish_or_keep(Unreachable(), events, "old", "new", log) == "old"
    published = InMemoryPublisher()
    assert await publish_or_keep(published, events, "old", "new", log) == "new"
    assert [e.envelope.id for _, e in published.published] == [events[0].id]


async def test_an_event_the_contract_refuses_is_logged_whole_and_the_others_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = EVENTS.part_count(5, "all", AT, "5")
    wrong = EVENTS.part_count(-1, "all", AT, "-1")  # a count below 0: refused
    published = InMemoryPublisher()
    with caplog.at_level(logging.ERROR):
        state = await publish_or_keep(published, [wrong, good], "old", "new", log)
    # The adapter moves on (retrying would refuse it for ever); the good one is published.
    assert state == "new"
    assert [e.envelope.id for _, e in published.published] == [good.id]
    assert wrong.id in caplog.text and '"count":-1' in caplog.text


def test_a_problem_is_reported_once_while_it_lasts_and_cleared_once() -> None:
    first, reported = problem_changes(log, EVENTS, {}, [("#3901", "not a number", "x")], AT)
    assert [(e.data["level"], e.data["native_code"]) for e in first] == [
        ("warning", "ADAPTER_INPUT")
    ]
    again, reported = problem_changes(log, EVENTS, reported, [("#3901", "not a number", "y")], AT)
    assert again == [] and reported == {"#3901": "not a number"}
    cleared, reported = problem_changes(log, EVENTS, reported, [], AT)
    assert [(e.data["level"], e.data["native_code"]) for e in cleared] == [
        ("normal", "ADAPTER_INPUT")
    ]
    assert reported == {}
    assert problem_changes(log, EVENTS, reported, [], AT) == ([], {})
