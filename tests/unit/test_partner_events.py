"""What an order's partners are told, derived from its stored events (worked examples)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from contracts import export_json_schemas
from hub.domain import Order, Origin
from projections.rules.keys import message_key
from projections.rules.partner_events import partner_event_id, partner_events

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)  # a Monday, 06:00


class Facts:
    """An order's life, told to its aggregate as ingest would."""

    def __init__(self) -> None:
        self.order = Order(site="default", order_id="SO-1")
        self.n = 0

    def origin(self, at: timedelta, source: str = "urn:test") -> Origin:
        self.n += 1
        return Origin(f"e{self.n}", source, T0 + at)

    def events(self) -> list[Any]:
        return list(self.order.collect_events())

    def confirm(self, at: timedelta, sequence: int, good: int, total: int, final: bool) -> str:
        origin = self.origin(at, "urn:mes-hub:default:confirmations")
        self.order.record_confirmation_due(origin, {
            "order_id": "SO-1", "sequence": sequence, "reason": "run_ended", "machine_id": "M1",
            "yield_quantity": good, "scrap_quantity": 0, "final": final,
            "end": (T0 + at).isoformat(), "yield_total": total, "scrap_total": 0,
            "site": "default",
        })  # fmt: skip
        return message_key(origin.source, origin.event_id)

    def attempt(self, at: timedelta, message: str, outcome: str, destination: str) -> None:
        self.order.record_delivery_attempt(self.origin(at), {
            "order_id": "SO-1", "message_id": message, "destination": destination,
            "attempt": 1, "outcome": outcome,
        })  # fmt: skip

    def forecast(
        self,
        at: timedelta,
        change: tuple[str | None, str],
        eta: timedelta,
        before: timedelta | None,
    ) -> None:
        """``change``: the forecast's status before and now."""
        self.order.record_delivery_forecast(self.origin(at), {
            "order_id": "SO-1", "previous_status": change[0], "status": change[1],
            "eta": (T0 + eta).isoformat(),
            "previous_eta": (T0 + before).isoformat() if before is not None else None,
        })  # fmt: skip

    def progress(self, at: timedelta, good: int, scrap: int, quantity: int | None = 10) -> None:
        """The forecast watch's ``mes.hub.order.progressed.v1``, as ingest stores it."""
        remaining = max(0, quantity - good) if quantity is not None else None
        self.order.record_progress(self.origin(at, "urn:mes-hub:default:order-progress"), {
            "good": good, "scrap": scrap, "remaining": remaining, "quantity": quantity,
        })  # fmt: skip

    def release(self, customer: str = "C-7") -> None:
        self.order.release(self.origin(-timedelta(hours=1)), {
            "order_id": "SO-1", "part_number": "P-100", "quantity": 10, "customer": customer,
            "due": (T0 + timedelta(days=1)).isoformat(),
        })  # fmt: skip


def test_an_order_s_life_is_told_once_each_with_stable_ids() -> None:
    # SO-1 of 10 for customer C-7: released; starts on M1 at 06:00 and again on M2 (told
    # once); its forecast turns at_risk with an ETA of Tuesday 18:00, moves to Wednesday 10:00
    # (still at risk: only eta_changed); confirmation 1 (6 good) goes to two ERPs, failing once
    # at the first; confirmation 2 (4 good, 10 in all, final): completed, then confirmed.
    life = Facts()
    life.order.release(life.origin(-timedelta(hours=1)), {
        "order_id": "SO-1", "part_number": "P-100", "quantity": 10, "customer": "C-7",
        "due": (T0 + timedelta(days=1)).isoformat(),
    })  # fmt: skip
    life.order.start_on(life.origin(timedelta(0)), "M1")
    life.order.start_on(life.origin(timedelta(hours=1)), "M2")
    life.forecast(timedelta(hours=2), (None, "at_risk"), timedelta(hours=36), before=None)
    life.forecast(
        timedelta(hours=3), ("at_risk", "at_risk"), timedelta(hours=52), before=timedelta(hours=36)
    )
    first = life.confirm(timedelta(hours=4), 1, good=6, total=6, final=False)
    life.attempt(timedelta(hours=4, minutes=1), first, "failed", "erp-a")
    life.attempt(timedelta(hours=4, minutes=2), first, "delivered", "erp-b")
    life.attempt(timedelta(hours=4, minutes=3), first, "delivered", "erp-a")
    second = life.confirm(timedelta(hours=5), 2, good=4, total=10, final=True)
    life.attempt(timedelta(hours=5, minutes=1), second, "duplicate", "erp-a")

    stored = life.events()
    told = partner_events("default", "SO-1", stored)

    assert [(e.type, e.time - T0) for e in told] == [
        ("mes.order.started.v1", timedelta(0)),
        ("mes.order.at_risk.v1", timedelta(hours=2)),
        ("mes.order.eta_changed.v1", timedelta(hours=3)),
        ("mes.order.confirmed.v1", timedelta(hours=4, minutes=2)),
        ("mes.order.completed.v1", timedelta(hours=5)),
        ("mes.order.confirmed.v1", timedelta(hours=5, minutes=1)),
    ]
    started, at_risk, moved, confirmed, completed, last = (e.data for e in told)
    assert started == {
        "order_id": "SO-1", "customer": "C-7", "part_number": "P-100", "quantity": 10,
        "due": "2026-03-03T06:00:00Z", "machine_id": "M1", "started_at": "2026-03-02T06:00:00Z",
    }  # fmt: skip
    assert (at_risk["status"], at_risk["eta"]) == ("at_risk", "2026-03-03T18:00:00Z")
    assert (moved["previous_eta"], moved["eta"]) == ("2026-03-03T18:00:00Z", "2026-03-04T10:00:00Z")
    assert (confirmed["sequence"], confirmed["yield_quantity"], confirmed["final"]) == (1, 6, False)
    assert (completed["good"], completed["completed_at"]) == (10, "2026-03-02T11:00:00Z")
    assert (last["sequence"], last["yield_total"], last["final"]) == (2, 10, True)
    # Ids from what caused them: the same when derived again (a rebuild, a replay).
    assert [e.id for e in partner_events("default", "SO-1", stored)] == [e.id for e in told]
    assert told[0].id == partner_event_id("default", "SO-1", "mes.order.started.v1")
    assert len({e.id for e in told}) == 6


def test_at_risk_is_told_when_the_risk_appears_or_changes_and_eta_only_with_the_status_kept() -> (
    None
):
    life = Facts()
    life.order.release(life.origin(-timedelta(hours=1)), {
        "order_id": "SO-1", "part_number": "P-1", "quantity": 5,
        "due": (T0 + timedelta(days=1)).isoformat(),
    })  # fmt: skip
    # on_track -> at_risk (told), -> late (told: worse), -> on_track with the ETA 10 h earlier
    # (a change of status: not an eta_changed), ETA moved on track (told), -> at_risk (told),
    # -> done (not an eta_changed either).
    hours = timedelta(hours=1)
    life.forecast(1 * hours, ("on_track", "at_risk"), 30 * hours, before=28 * hours)
    life.forecast(2 * hours, ("at_risk", "late"), 31 * hours, before=30 * hours)
    life.forecast(3 * hours, ("late", "on_track"), 21 * hours, before=31 * hours)
    life.forecast(4 * hours, ("on_track", "on_track"), 23 * hours, before=21 * hours)
    life.forecast(5 * hours, ("on_track", "at_risk"), 23 * hours, before=23 * hours)
    life.forecast(6 * hours, ("at_risk", "done"), 6 * hours, before=23 * hours)

    told = [
        (e.type, e.data.get("status")) for e in partner_events("default", "SO-1", life.events())
    ]

    assert told == [
        ("mes.order.at_risk.v1", "at_risk"),
        ("mes.order.at_risk.v1", "late"),
        ("mes.order.eta_changed.v1", "on_track"),
        ("mes.order.at_risk.v1", "at_risk"),
    ]


def test_a_confirmation_no_erp_took_is_not_told_confirmed() -> None:
    life = Facts()
    life.order.release(life.origin(-timedelta(hours=1)), {
        "order_id": "SO-1", "part_number": "P-1", "quantity": 5,
        "due": (T0 + timedelta(days=1)).isoformat(),
    })  # fmt: skip
    message = life.confirm(timedelta(hours=1), 1, good=5, total=5, final=True)
    life.attempt(timedelta(hours=1, minutes=1), message, "failed", "erp-a")
    life.attempt(timedelta(hours=2), message, "dead", "erp-a")

    told = [e.type for e in partner_events("default", "SO-1", life.events())]

    assert told == ["mes.order.completed.v1"]


def test_what_partners_are_told_meets_the_schemas_they_are_given(tmp_path: Path) -> None:
    # The schemas `mes-hub contracts export` writes, checked by a third-party validator.
    schemas = {
        path.name.removesuffix(".schema.json"): json.loads(path.read_text())
        for path in export_json_schemas(tmp_path)
    }
    life = Facts()
    life.order.release(life.origin(-timedelta(hours=1)), {
        "order_id": "SO-1", "part_number": "P-1", "quantity": 5,
        "due": (T0 + timedelta(days=1)).isoformat(),
    })  # fmt: skip
    life.order.start_on(life.origin(timedelta(0)), "M1")
    life.progress(timedelta(minutes=30), good=2, scrap=1, quantity=5)
    life.forecast(
        timedelta(hours=1), ("late", "late"), timedelta(hours=30), before=timedelta(hours=20)
    )
    message = life.confirm(timedelta(hours=2), 1, good=5, total=5, final=True)
    life.attempt(timedelta(hours=2, minutes=1), message, "delivered", "erp-a")
    told = partner_events("default", "SO-1", life.events())
    assert len({e.type for e in told}) == 6
    for e in told:
        envelope = {
            "specversion": "1.0", "id": e.id, "source": "urn:mes-hub:default", "type": e.type,
            "time": e.time.isoformat(), "subject": e.order_id, "data": e.data,
        }  # fmt: skip
        jsonschema.validate(envelope, schemas[e.type])
    with pytest.raises(jsonschema.ValidationError):
        bad = {**told[0].data, "quantity": 0}
        jsonschema.validate({**envelope, "type": told[0].type, "data": bad}, schemas[told[0].type])


def test_an_order_started_before_its_release_is_told_at_the_release_and_not_after_a_cancel() -> (
    None
):
    # The floor starts SO-1 on M2 at 07:00, then (stored later) on M1 at 06:00; the ERP's release
    # comes after: started is told then, with the order's customer and its earliest start. The
    # order is cancelled: a forecast and a confirmation after it are not told.
    life = Facts()
    life.order.start_on(life.origin(timedelta(hours=1)), "M2")
    life.order.start_on(life.origin(timedelta(0)), "M1")
    life.release()
    life.order.cancel(life.origin(timedelta(hours=2)), "customer withdrew")
    life.forecast(timedelta(hours=3), ("on_track", "late"), timedelta(hours=30), before=None)
    life.confirm(timedelta(hours=4), 1, good=10, total=10, final=True)

    told = partner_events("default", "SO-1", life.events())

    assert [e.type for e in told] == ["mes.order.started.v1"]
    data = told[0].data
    assert (data["customer"], data["machine_id"], data["started_at"]) == (
        "C-7", "M1", "2026-03-02T06:00:00Z",
    )  # fmt: skip


def test_progress_is_told_with_its_percent_only_between_the_release_and_a_cancel() -> None:
    # SO-1 of 10: the watch records 2 good before the ERP released it (not told: whose order
    # it is is not known yet), then 4 good and 1 scrap (told: 6 remaining, 40 %), then 12 good
    # (more than ordered: 100 %, not 120 %); the order is cancelled and 13 good is not told.
    life = Facts()
    life.progress(-timedelta(hours=2), good=2, scrap=0)
    life.release()
    life.progress(timedelta(hours=1), good=4, scrap=1)
    life.progress(timedelta(hours=2), good=12, scrap=1)
    life.order.cancel(life.origin(timedelta(hours=3)), "customer withdrew")
    life.progress(timedelta(hours=4), good=13, scrap=1)

    stored = life.events()
    told = partner_events("default", "SO-1", stored)

    assert [(e.type, e.time - T0) for e in told] == [
        ("mes.order.progress.v1", timedelta(hours=1)),
        ("mes.order.progress.v1", timedelta(hours=2)),
    ]
    first, second = (e.data for e in told)
    assert first == {
        "order_id": "SO-1", "customer": "C-7", "part_number": "P-100", "quantity": 10,
        "due": "2026-03-03T06:00:00Z", "good": 4, "scrap": 1, "remaining": 6,
        "percent_complete": 0.4,
    }  # fmt: skip
    assert (second["good"], second["remaining"], second["percent_complete"]) == (12, 0, 1.0)
    # Each from its stored progressed event: the same ids when derived again.
    progressed = [e for e in stored if type(e).__name__ == "Progressed"]
    assert told[0].id == partner_event_id(
        progressed[1].source, progressed[1].event_id, "mes.order.progress.v1"
    )
    assert [e.id for e in partner_events("default", "SO-1", stored)] == [e.id for e in told]
    assert told[0].id != told[1].id
