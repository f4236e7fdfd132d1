"""The delivery outbox over a real hub (nats-server, SQLite, the views process): production
confirmations decided from the store and delivered exactly once per destination, in order per
order, through an outage, a refusal and a late correction.

The destination is the in-memory fake (``hub.outbox.InMemoryDestination``); the ERP dialects'
own tests run against their stand-ins."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from adapters.erp.base import Confirmation
from adapters.erp.outbox import ErpDestination
from adapters.erp.outbox import confirmation as erp_confirmation
from contracts import ConfirmationDueV1
from hub.bootstrap import CONFIRMATIONS_SINCE, Hub, build_hub, earlier_confirmations
from hub.cli import app
from hub.domain import Order
from hub.outbox import Delivered, InMemoryDestination, RetryPolicy
from hub.ports import InMemoryPublisher
from hub.sealer import AuditLog, AuditMismatch, checkpoint_reference
from hub.settings import Settings
from projections.processes.confirmations import ConfirmationWatch, confirmation_message_key
from projections.rules.hub_events import hub_event
from projections.rules.plant import PlantConfig
from projections.views.facts_view import FactsReader
from projections.views.outbox_view import WEBHOOK, OutboxReader, idempotency_key
from tests.conftest import T0, api_client, api_key, cloud_event, eventually

CONFIRMATIONS = "/api/v1/erp/confirmations"
# Quick retries, so an outage and its recovery fit in a test.
FAST = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, circuit_failures=3, circuit_open_s=0.3)


@pytest.fixture
async def erp() -> InMemoryDestination:
    return InMemoryDestination("erp-1")


@pytest.fixture
async def hub(settings: Settings, erp: InMemoryDestination) -> AsyncIterator[Hub]:
    # Confirm runs from T0 on (a hub confirms only runs that end after it began to).
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / CONFIRMATIONS_SINCE).write_text((T0 - timedelta(days=1)).isoformat())
    running = await build_hub(
        settings, plant=PlantConfig(time_zone="UTC"), destinations=[erp], retry=FAST
    )
    yield running
    await running.close()


async def publish(hub: Hub, *events: Any) -> None:
    await hub.publisher.publish_many(list(events))


def released(order_id: str, quantity: int) -> Any:
    data = {"order_id": order_id, "part_number": "P-1", "quantity": quantity,
            "due": (T0 + timedelta(days=3)).isoformat()}  # fmt: skip
    return cloud_event("mes.erp.order.released.v1", order_id, data, at=-timedelta(hours=1))


def count(machine: str, parts: int, minutes: int) -> Any:
    data = {"count": parts, "kind": "all"}
    return cloud_event("mes.machine.partcount.v1", machine, data, at=timedelta(minutes=minutes))


def tap(kind: str, machine: str, order_id: str, minutes: int) -> Any:
    return cloud_event(
        f"mes.operator.order_{kind}.v1", machine, {"order_id": order_id},
        at=timedelta(minutes=minutes),
    )  # fmt: skip


def scrap(machine: str, order_id: str, quantity: int, minutes: int) -> Any:
    data = {"order_id": order_id, "quantity": quantity, "reason": "burr"}
    return cloud_event("mes.operator.scrap.v1", machine, data, at=timedelta(minutes=minutes))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(role)}"}


def taken(erp: InMemoryDestination, order_id: str) -> list[dict[str, Any]]:
    """What the ERP was told about ``order_id``, in the order it took it."""
    return [m.payload for m in erp.taken.values() if m.ordering_key == order_id]


async def run_on(hub: Hub, machine: str, order_id: str, start: int, end: int, parts: int) -> None:
    """The order runs on ``machine`` from minute ``start`` to ``end`` making ``parts``."""
    await publish(
        hub,
        tap("started", machine, order_id, start),
        count(machine, 0, start),
        count(machine, parts, end - 1),
        tap("ended", machine, order_id, end),
    )


async def test_each_ended_run_is_confirmed_once_with_what_it_made(
    hub: Hub, erp: InMemoryDestination
) -> None:
    # Worked example: an order of 10; 6 good on M1, then 4 on M2 (final).
    await publish(hub, released("SO-1", 10))
    await run_on(hub, "M1", "SO-1", start=0, end=60, parts=6)
    await eventually(lambda: len(taken(erp, "SO-1")) == 1, timeout=30)
    await run_on(hub, "M2", "SO-1", start=70, end=120, parts=4)
    await eventually(lambda: len(taken(erp, "SO-1")) == 2, timeout=30)
    first, second = taken(erp, "SO-1")
    assert (first["sequence"], first["machine_id"], first["yield_quantity"]) == (1, "M1", 6)
    assert (first["scrap_quantity"], first["final"], first["reason"]) == (0, False, "run_ended")
    assert (second["sequence"], second["machine_id"], second["yield_quantity"]) == (2, "M2", 4)
    assert second["final"] is True
    # The keys a dialect is told the order's earlier confirmations went with are theirs.
    keys = [m.key for m in erp.taken.values() if m.ordering_key == "SO-1"]
    assert keys == [confirmation_message_key("default", "SO-1", k) for k in (1, 2)]
    told = [k for k, m in erp.taken.items() if m.ordering_key == "SO-1"]
    assert told == [idempotency_key(key, "erp-1") for key in keys]
    # Each delivery is stored as an attempt on the order: what the ERP was told, and said.
    order = hub.store.order("default", "SO-1")
    assert order is not None and [c["sequence"] for c in order.confirmed] == [1, 2]

    def recorded() -> list[str]:
        found = hub.store.order("default", "SO-1")
        return sorted(a["outcome"] for a in ((found.deliveries or {}) if found else {}).values())

    await eventually(lambda: recorded() == ["delivered", "delivered"])
    assert erp.calls == 2  # nothing sent twice


async def test_an_erp_that_is_down_gets_everything_once_in_order_when_it_is_back(
    hub: Hub, erp: InMemoryDestination
) -> None:
    erp.down = True
    await publish(hub, released("SO-2", 100), released("SO-3", 100))
    await run_on(hub, "M1", "SO-2", start=0, end=30, parts=5)
    await run_on(hub, "M2", "SO-3", start=0, end=30, parts=7)
    await run_on(hub, "M1", "SO-2", start=40, end=50, parts=3)
    (sender,) = hub.senders
    await eventually(lambda: sender.circuit.state != "closed", timeout=30)
    calls_while_open = erp.calls
    erp.down = False
    await eventually(lambda: len(erp.taken) == 3, timeout=30)
    assert [p["yield_quantity"] for p in taken(erp, "SO-2")] == [5, 3]  # in sequence
    assert [p["yield_quantity"] for p in taken(erp, "SO-3")] == [7]
    assert calls_while_open >= FAST.circuit_failures
    assert sender.circuit.state == "closed"


async def test_a_refused_confirmation_is_dead_and_holds_back_the_order_s_next(
    hub: Hub, erp: InMemoryDestination
) -> None:
    erp.refuse = True
    await publish(hub, released("SO-4", 100))
    await run_on(hub, "M1", "SO-4", start=0, end=30, parts=5)
    (sender,) = hub.senders
    await eventually(lambda: sender.stats.dead == 1, timeout=30)
    erp.refuse = False
    await run_on(hub, "M1", "SO-4", start=40, end=50, parts=3)
    order = await _eventually_order(hub, "SO-4", confirmations=2)
    assert [c["sequence"] for c in order.confirmed] == [1, 2]
    # The second waits behind the dead first: nothing of SO-4 reached the ERP.
    await eventually(lambda: sender.stats.dead == 1 and erp.calls == 1)
    assert taken(erp, "SO-4") == []


async def test_scrap_reported_after_a_confirmation_is_confirmed_as_a_correction(
    hub: Hub, erp: InMemoryDestination
) -> None:
    await publish(hub, released("SO-5", 100))
    await run_on(hub, "M1", "SO-5", start=0, end=30, parts=8)
    await eventually(lambda: len(taken(erp, "SO-5")) == 1, timeout=30)
    # An inspection finds 2 of them bad, an hour after the run.
    await publish(hub, scrap("M1", "SO-5", 2, minutes=90))
    await eventually(lambda: len(taken(erp, "SO-5")) == 2, timeout=30)
    first, correction = taken(erp, "SO-5")
    assert (first["yield_quantity"], first["scrap_quantity"]) == (8, 0)
    assert correction["reason"] == "correction" and correction["correction_of"] == 1
    assert (correction["yield_quantity"], correction["scrap_quantity"]) == (-2, 2)
    # What the ERP was told now adds up to what the store says: 6 good, 2 scrap.
    await eventually(lambda: _reconciled(hub) == 0, timeout=30)
    said = CliRunner().invoke(
        app, ["erp", "reconcile", "--order", "SO-5", "--data-dir", str(hub.settings.data_dir)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    row = next(line for line in said.output.splitlines() if "SO-5" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == ["SO-5", "erp-1", "6", "2", "6", "2", "none"]


def _reconciled(hub: Hub) -> int:
    return (
        CliRunner()
        .invoke(app, ["erp", "reconcile", "--data-dir", str(hub.settings.data_dir)])
        .exit_code
    )


async def _eventually_order(hub: Hub, order_id: str, confirmations: int) -> Any:
    found: list[Any] = []

    def ready() -> bool:
        order = hub.store.order("default", order_id)
        found[:] = [order]
        return order is not None and len(order.confirmed) >= confirmations

    await eventually(ready, timeout=30)
    return found[0]


async def test_the_erp_desk_sees_every_confirmation_and_retries_a_dead_one(
    hub: Hub, erp: InMemoryDestination
) -> None:
    erp.refuse = True
    await publish(hub, released("SO-6", 100))
    await run_on(hub, "M1", "SO-6", start=0, end=30, parts=4)
    (sender,) = hub.senders
    await eventually(lambda: sender.stats.dead == 1, timeout=30)
    async with api_client(hub) as http:
        assert (await http.get(CONFIRMATIONS, headers=auth("operator"))).status_code == 403

        async def listed(status: str) -> list[dict[str, Any]]:
            answer = await http.get(CONFIRMATIONS, params={"status": status}, headers=auth("erp"))
            assert answer.status_code == 200, answer.text
            return list(answer.json())

        async def dead_listed() -> bool:
            return len(await listed("dead")) == 1

        await eventually(dead_listed)
        (dead,) = await listed("dead")
        assert (dead["order_id"], dead["yield_quantity"], dead["status"]) == ("SO-6", 4, "dead")
        (delivery,) = dead["deliveries"]
        assert (delivery["destination"], delivery["outcome"]) == ("erp-1", "dead")
        assert delivery["status_code"] == 400 and "quantity not allowed" in delivery["reason"]
        erp.refuse = False
        retry = f"{CONFIRMATIONS}/{dead['id']}/retry"
        unknown = await http.post(retry, params={"destination": "elsewhere"}, headers=auth("erp"))
        assert unknown.status_code == 404
        again = await http.post(retry, params={"destination": "erp-1"}, headers=auth("erp"))
        assert again.status_code == 202, again.text
        await eventually(lambda: len(taken(erp, "SO-6")) == 1, timeout=30)

        async def sent_listed() -> bool:
            return [c["id"] for c in await listed("sent")] == [dead["id"]]

        await eventually(sent_listed)
        taken_twice = await http.post(retry, params={"destination": "erp-1"}, headers=auth("erp"))
        assert taken_twice.status_code == 409  # taken: never sent twice


async def test_a_refusal_while_the_circuit_probes_closes_it_and_later_orders_go(
    hub: Hub, erp: InMemoryDestination
) -> None:
    erp.down = True
    await publish(hub, released("SO-7", 100), released("SO-8", 100))
    await run_on(hub, "M1", "SO-7", start=0, end=30, parts=2)
    (sender,) = hub.senders
    await eventually(lambda: sender.circuit.state != "closed", timeout=30)
    # Back, but refusing SO-7's confirmation for good: the probe's answer closes the circuit.
    erp.down, erp.refuse = False, True
    await eventually(lambda: sender.stats.dead == 1, timeout=30)
    assert sender.circuit.state == "closed"
    erp.refuse = False
    await run_on(hub, "M2", "SO-8", start=0, end=30, parts=3)
    await eventually(lambda: len(taken(erp, "SO-8")) == 1, timeout=30)


async def test_a_retry_of_a_message_dead_after_several_attempts_counts_on_from_them(
    hub: Hub, erp: InMemoryDestination
) -> None:
    (sender,) = hub.senders
    sender.policy = replace(FAST, max_attempts=2, circuit_failures=100)
    erp.down = True
    await publish(hub, released("SO-9", 100))
    await run_on(hub, "M1", "SO-9", start=0, end=30, parts=4)
    await eventually(lambda: sender.stats.dead == 1, timeout=30)
    erp.down = False
    async with api_client(hub) as http:

        async def dead() -> list[dict[str, Any]]:
            answer = await http.get(CONFIRMATIONS, params={"status": "dead"}, headers=auth("erp"))
            return list(answer.json())

        await eventually(lambda: _nonempty(dead()))
        (message,) = await dead()
        assert message["deliveries"][0]["attempts"] == 2
        retry = f"{CONFIRMATIONS}/{message['id']}/retry"
        answer = await http.post(retry, params={"destination": "erp-1"}, headers=auth("erp"))
        assert answer.status_code == 202
    await eventually(lambda: len(taken(erp, "SO-9")) == 1, timeout=30)

    def recorded() -> tuple[int, str] | None:
        order = hub.store.order("default", "SO-9")
        attempts = list(((order.deliveries or {}) if order else {}).values())
        return (attempts[0]["attempt"], attempts[0]["outcome"]) if attempts else None

    await eventually(lambda: recorded() == (3, "delivered"))  # its third attempt, stored


async def _nonempty(listing: Any) -> bool:
    return bool(await listing)


async def test_a_late_part_count_inside_a_confirmed_run_is_confirmed_as_a_correction(
    hub: Hub, erp: InMemoryDestination
) -> None:
    await publish(
        hub, released("SO-10", 100), tap("started", "M3", "SO-10", 0), count("M3", 0, 0),
        count("M3", 8, 20), tap("ended", "M3", "SO-10", 30),
    )  # fmt: skip
    await eventually(lambda: len(taken(erp, "SO-10")) == 1, timeout=30)
    # The machine's buffer sends a reading from 06:25 only now: 2 more parts in that run.
    await publish(hub, count("M3", 10, 25))
    await eventually(lambda: len(taken(erp, "SO-10")) == 2, timeout=30)
    first, correction = taken(erp, "SO-10")
    assert first["yield_quantity"] == 8
    assert (correction["reason"], correction["yield_quantity"]) == ("correction", 2)


async def test_orders_running_at_a_shift_end_are_confirmed_what_they_made_in_it(
    settings: Settings, erp: InMemoryDestination
) -> None:
    # Worked examples ([hub] confirm_each_shift, shifts 06:00-14:00 and 14:00-22:00):
    # - SO-20 of 100 runs on M1 from 06:00, 30 made by 14:00: at 14:00 the ERP is told 30
    #   (partial, not final); it makes 12 more and ends at 14:25: told 12.
    # - SO-24 runs on M5 and M6 at once: 10 and 20 by 14:00, told 30; M5 ends at 14:20 with 3
    #   more (told 3), M6 at 14:25 with 5 more (told 5).
    # - SO-23 of 10 has made 12 by 14:00: told 12, not final (it still runs).
    # - SO-22 started at 13:56 and made nothing: told nothing at 14:00, nor at 22:00.
    # - SO-21 starts on M2 at 14:10 and runs past 22:00: told once, for 22:00.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / CONFIRMATIONS_SINCE).write_text((T0 - timedelta(days=1)).isoformat())
    shifts = [{"name": "early", "start": "06:00", "end": "14:00"},
              {"name": "late", "start": "14:00", "end": "22:00"}]  # fmt: skip
    plant = PlantConfig.model_validate({"time_zone": "UTC", "shifts": shifts})
    now = [T0 + timedelta(hours=7, minutes=58)]  # 13:58 (the hub's clock; T0 is 06:00)
    hub = await build_hub(
        settings.model_copy(update={"confirm_each_shift": True}), plant=plant,
        destinations=[erp], retry=FAST, clock=lambda: now[0],
    )  # fmt: skip

    def runs(order_id: str, quantity: int, *machines: str) -> list[Any]:
        events = [released(order_id, quantity)]
        for machine in machines:
            events += [tap("started", machine, order_id, 0), count(machine, 0, 0)]
        return events

    def told(order_id: str) -> list[tuple[str, int, bool]]:
        return [(c["reason"], c["yield_quantity"], c["final"]) for c in taken(erp, order_id)]

    try:
        await publish(
            hub, *runs("SO-19", 100, "M3"), count("M3", 7, 5 * 60 + 50),
            tap("ended", "M3", "SO-19", 6 * 60),
            *runs("SO-20", 100, "M1"), count("M1", 30, 6 * 60 + 50),
            released("SO-22", 100), tap("started", "M4", "SO-22", 7 * 60 + 56),
            *runs("SO-23", 10, "M7"), count("M7", 12, 7 * 60),
            *runs("SO-24", 100, "M5", "M6"), count("M5", 10, 7 * 60 + 30),
            count("M6", 20, 7 * 60 + 40),
        )  # fmt: skip
        # SO-19 ended before the shift end: its confirmation shows the rounds ran, and owed
        # the others nothing yet.
        await eventually(lambda: len(taken(erp, "SO-19")) == 1, timeout=30)
        await hub.wait_projected()
        assert [o for o in ("SO-20", "SO-22", "SO-23", "SO-24") if taken(erp, o)] == []
        now[0] = T0 + timedelta(hours=8, minutes=30)  # 14:30: the early shift has ended
        await eventually(
            lambda: all(len(taken(erp, o)) == 1 for o in ("SO-20", "SO-23", "SO-24")),
            timeout=30,
        )
        await publish(
            hub, count("M1", 42, 8 * 60 + 20), tap("ended", "M1", "SO-20", 8 * 60 + 25),
            count("M5", 13, 8 * 60 + 10), tap("ended", "M5", "SO-24", 8 * 60 + 20),
            count("M6", 25, 8 * 60 + 22), tap("ended", "M6", "SO-24", 8 * 60 + 25),
            released("SO-21", 100), tap("started", "M2", "SO-21", 8 * 60 + 10),
            count("M2", 0, 8 * 60 + 10), count("M2", 5, 8 * 60 + 28),
        )  # fmt: skip
        await eventually(
            lambda: len(taken(erp, "SO-20")) == 2 and len(taken(erp, "SO-24")) == 3, timeout=30
        )
        now[0] = T0 + timedelta(hours=17)  # 23:00: the late shift ended an hour ago
        await eventually(lambda: len(taken(erp, "SO-21")) == 1, timeout=30)
        assert told("SO-20") == [("shift_end", 30, False), ("run_ended", 12, False)]
        shift = taken(erp, "SO-20")[0]
        assert [at(shift["start"]), at(shift["end"])] == [T0, T0 + timedelta(hours=8)]
        assert shift["yield_total"] == 30 and taken(erp, "SO-20")[1]["yield_total"] == 42
        assert told("SO-24") == [
            ("shift_end", 30, False), ("run_ended", 3, False), ("run_ended", 5, False),
        ]  # fmt: skip
        assert [c["machine_id"] for c in taken(erp, "SO-24")] == ["M5", "M5", "M6"]
        assert told("SO-23") == [("shift_end", 12, False)]
        assert told("SO-21") == [("shift_end", 5, False)]
        late = taken(erp, "SO-21")[0]
        started, ten_pm = T0 + timedelta(hours=8, minutes=10), T0 + timedelta(hours=16)
        assert [at(late["start"]), at(late["end"])] == [started, ten_pm]
        # Rounds at 23:00 owe nothing more: SO-23 and SO-22 made nothing in the late shift.
        calls = erp.calls
        await publish(hub, *runs("SO-25", 100, "M8"), count("M8", 4, 16 * 60 + 50),
                      tap("ended", "M8", "SO-25", 16 * 60 + 55))  # fmt: skip
        await eventually(lambda: len(taken(erp, "SO-25")) == 1, timeout=30)
        assert erp.calls == calls + 1
        assert taken(erp, "SO-22") == [] and len(taken(erp, "SO-23")) == 1
    finally:
        await hub.close()


async def test_an_erp_added_later_is_owed_only_what_was_decided_after_it_came(
    settings: Settings, erp: InMemoryDestination
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / CONFIRMATIONS_SINCE).write_text((T0 - timedelta(days=1)).isoformat())
    plant = PlantConfig(time_zone="UTC")
    first = await build_hub(settings, plant=plant, destinations=[erp], retry=FAST)
    try:
        await publish(first, released("SO-30", 10))
        await run_on(first, "M1", "SO-30", start=0, end=30, parts=4)
        await eventually(lambda: len(taken(erp, "SO-30")) == 1, timeout=30)
    finally:
        await first.close()
    # The plant connects a second ERP: it gets SO-31's confirmation, not SO-30's, and SO-30's
    # counts as sent (taken by every ERP that is owed it), not pending for ever.
    later = InMemoryDestination("erp-2")
    again = await build_hub(settings, plant=plant, destinations=[erp, later], retry=FAST)
    try:
        await publish(again, released("SO-31", 10))
        await run_on(again, "M2", "SO-31", start=40, end=70, parts=3)
        await eventually(lambda: len(taken(later, "SO-31")) == 1, timeout=30)
        await eventually(lambda: len(taken(erp, "SO-31")) == 1, timeout=30)
        assert taken(later, "SO-30") == [] and len(taken(erp, "SO-30")) == 1
        async with api_client(again) as http:

            async def statuses() -> dict[str, str]:
                answer = await http.get(CONFIRMATIONS, headers=auth("erp"))
                return {c["order_id"]: c["status"] for c in answer.json()}

            async def both_sent() -> bool:
                return await statuses() == {"SO-30": "sent", "SO-31": "sent"}

            await eventually(both_sent)
    finally:
        await again.close()


class Told:
    """A dialect that keeps the confirmations it is given (``ConfirmationSender``)."""

    def __init__(self) -> None:
        self.given: list[Confirmation] = []

    async def send(self, confirmation: Confirmation) -> Delivered:
        self.given.append(confirmation)
        return Delivered(201)

    async def close(self) -> None:
        pass


async def test_a_correction_tells_each_erp_the_keys_of_what_it_was_sent_before(
    hub: Hub, erp: InMemoryDestination
) -> None:
    # SO-40 is confirmed twice to erp-1; then erp-2 is added. Its correction (3) tells erp-1
    # the keys of 1 and 2 and the order's totals; erp-2, sent neither, gets no keys and no
    # totals (they would be more than it holds): its dialect must not re-post them.
    await publish(hub, released("SO-40", 100))
    await run_on(hub, "M1", "SO-40", start=0, end=30, parts=5)
    await eventually(lambda: len(taken(erp, "SO-40")) == 1, timeout=30)
    await run_on(hub, "M2", "SO-40", start=40, end=70, parts=6)
    await eventually(lambda: len(taken(erp, "SO-40")) == 2, timeout=30)
    await publish(hub, scrap("M2", "SO-40", 2, 80))
    await eventually(lambda: len(taken(erp, "SO-40")) == 3, timeout=30)
    correction = [m for m in erp.taken.values() if m.ordering_key == "SO-40"][2]
    assert correction.payload["yield_quantity"] == -2 and correction.payload["yield_total"] == 9
    earlier = earlier_confirmations(hub.settings, hub.views)
    told_1, told_2 = Told(), Told()
    await ErpDestination("erp-1", told_1, earlier).deliver(correction, "key-3")
    await ErpDestination("erp-2", told_2, earlier).deliver(correction, "key-3")
    (to_1,), (to_2,) = told_1.given, told_2.given
    keys = [idempotency_key(confirmation_message_key("default", "SO-40", k), "erp-1")
            for k in (1, 2)]  # fmt: skip
    assert (to_1.earlier_keys, to_1.yield_total, to_1.scrap_total) == (tuple(keys), 9, 2)
    assert (to_2.earlier_keys, to_2.yield_total, to_2.scrap_total) == ((), None, None)


async def test_a_webhook_due_is_stored_on_the_order_and_owed_to_its_endpoints_only(
    hub: Hub,
) -> None:
    # What the partner watch will publish: SO-50's start, for the endpoint of customer C-7.
    await publish(hub, released("SO-50", 10))
    due = {"order_id": "SO-50", "sequence": 1, "event_id": "evt-50-1",
           "event_type": "mes.order.started.v1", "event_time": T0.isoformat(),
           "data": {"order_id": "SO-50", "machine_id": "M1", "started_at": T0.isoformat()},
           "endpoints": ["c7-endpoint"]}  # fmt: skip
    event = hub_event("default", "webhooks", "mes.hub.webhook.due.v1", "webhook-evt-50-1",
                      "SO-50", T0, due)  # fmt: skip
    await publish(hub, event, event)  # (a repeat is stored once)
    await hub.wait_projected()
    outbox = OutboxReader(hub.views)

    def owed(endpoint: str) -> list[str]:
        return [m.payload["event_id"] for m in outbox.undelivered(endpoint, [WEBHOOK])[1]]

    await eventually(lambda: owed("c7-endpoint") == ["evt-50-1"])
    assert owed("another-partner") == [] and owed("erp-1") == []


async def test_each_confirmation_carries_the_latest_checkpoint_which_later_proves_the_log(
    hub: Hub, erp: InMemoryDestination
) -> None:
    # The sealer signs its first checkpoint once the log has records; the confirmation decided
    # after that carries the latest one, and a consistency proof from its size checks its root.
    await publish(hub, released("SO-60", 10))
    await eventually(lambda: checkpoint_reference(hub.store) is not None, timeout=30)
    await run_on(hub, "M1", "SO-60", start=0, end=60, parts=10)
    await eventually(lambda: len(taken(erp, "SO-60")) == 1, timeout=30)
    [due] = taken(erp, "SO-60")
    origin, size, root = due["checkpoint"].rsplit(" ", 2)
    assert origin == "mes-hub/default" and int(size) >= 1
    audit = AuditLog(hub.store)
    stored = audit.checkpoint(int(size))  # a checkpoint the hub signed, as the ERP was told
    assert base64.b64encode(stored.root).decode() == root
    # What a partner asks an auditor for: the proof from that size to the latest checkpoint,
    # which holds for the root it was told and for no other.
    proof = audit.consistency_with(int(size), base64.b64decode(root))
    assert proof.first_size == int(size) and proof.second.size >= int(size)
    with pytest.raises(AuditMismatch):
        audit.consistency_with(int(size), bytes(32))
    # What the ERP dialects are handed: the stored decision's.
    [message] = [m for m in erp.taken.values() if m.ordering_key == "SO-60"]
    assert erp_confirmation(message, "k").checkpoint == due["checkpoint"]


async def test_the_watch_puts_what_its_checkpoint_source_gives_in_each_decision(
    settings: Settings,
) -> None:
    # Without an ERP the hub runs no confirmation watch: two are made here over its views, one
    # with a fake source of checkpoints, one with the default (none signed: null).
    running = await build_hub(settings, plant=PlantConfig(time_zone="UTC"))
    try:
        await publish(running, released("SO-61", 10))
        await run_on(running, "M1", "SO-61", start=0, end=60, parts=4)
        await running.wait_projected()
        reference = "mes-hub/plant-9 4097 Vb0lMT3kzAt4F3t1VmnOA1l+8+8K3VJ0M9a6HlqTQu0="

        def load(keys: Any) -> list[Order]:
            found = (running.store.load(key) for key in keys)
            return [o for o in found if isinstance(o, Order)]

        def decide(**options: Any) -> list[Any]:
            """What a fresh watch decides now (each remembers what it decided)."""
            watch = ConfirmationWatch(
                "default", load, running.views, FactsReader(running.views),
                PlantConfig(time_zone="UTC"), InMemoryPublisher(), T0 - timedelta(days=1),
                **options,
            )  # fmt: skip
            return watch.decisions(T0 + timedelta(hours=2))[0]

        await eventually(lambda: bool(decide()), timeout=30)
        [decided] = decide(checkpoint=lambda: reference)
        assert decided.data["checkpoint"] == reference
        assert ConfirmationDueV1.model_validate(decided.data).checkpoint == reference
        [plain] = decide()
        assert plain.data["checkpoint"] is None
    finally:
        await running.close()
