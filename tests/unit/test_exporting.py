"""The replay export without a database: every CloudEvent type ingest applies, stored, exported
and applied again, stores the same fields; the export's lines read back for an import."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from contracts import EVENT_TYPES, CloudEvent, encode_event
from hub.domain import Machine, Origin
from hub.exporting import (
    NOT_CLOUD_EVENTS,
    POSITION,
    RECORDED_TIME,
    REVERSES,
    SITE,
    ExportError,
    ExportStats,
    Selection,
    cloud_event_of,
    events_to_import,
    export_line,
    exported_events,
)
from hub.ingest import Ingestor
from hub.store import Entity
from tests.conftest import T0, cloud_event
from tests.fakes import InMemoryStore
from tests.unit.test_contracts import EXAMPLES
from tests.unit.test_ingest import HUB_KEY, ingest, message, signed

# More than one example of some types: optional fields left out or given as null, times with
# another offset, an order change that clears a field.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    *((name, subject, data) for name, (subject, data) in EXAMPLES.items()),
    ("mes.machine.execution.v1", "M2", {"execution": "READY"}),
    ("mes.machine.condition.v1", "M2", {"level": "normal"}),
    ("mes.operator.scrap.v1", "M2", {"order_id": "SO-2", "quantity": 1, "reason": "dent"}),
    (
        "mes.operator.downtime_reason.v1",
        "M2",
        {
            "reason": "setup",
            "start": "2026-03-02T07:00:00+01:00",
            "end": "2026-03-02T07:30:00+01:00",
            "operator": "op2",
            "note": "first piece",
        },
    ),
    (
        "mes.erp.order.released.v1",
        "SO-2",
        {
            "order_id": "SO-2",
            "part_number": "P-2",
            "quantity": 3,
            "due": "2026-03-09T00:00:00Z",
            "customer": "C7",
            "machine_id": "M2",
        },
    ),
    ("mes.erp.order.changed.v1", "SO-2", {"order_id": "SO-2", "customer": None}),
    ("mes.hub.plant.configured.v1", "default", {"plant": {"micro_stop_s": 60}}),
    (
        "mes.hub.delivery_forecast.changed.v1",
        "SO-2",
        {
            "order_id": "SO-2",
            "status": None,
            "eta": None,
            "due": None,
            "remaining": None,
            "effective_cycle_time_s": None,
            "basis": "none",
        },
    ),
    (
        "mes.hub.order.confirmation_due.v1",
        "SO-2",
        {
            "order_id": "SO-2",
            "sequence": 1,
            "reason": "run_ended",
            "yield_quantity": 3,
            "scrap_quantity": 0,
            "final": True,
        },
    ),
    (
        "mes.hub.delivery.attempted.v1",
        "SO-2",
        {
            "order_id": "SO-2",
            "message_id": "m-1",
            "destination": "erp-1",
            "attempt": 1,
            "outcome": "requeued",
        },
    ),
]


def originals() -> list[CloudEvent]:
    return [
        cloud_event(name, subject, data, at=timedelta(minutes=n))
        for n, (name, subject, data) in enumerate(VARIANTS)
    ]


def stored_by_ingest(events: list[CloudEvent], *, sign: bool = True) -> InMemoryStore:
    """What ingest stores of ``events`` (each message signed by the hub, as hub events and
    actor attributes need)."""
    store = InMemoryStore()
    ingestor = Ingestor(store, "p0", clock=lambda: T0 + timedelta(days=1), hub_key=HUB_KEY)
    batch = ingest(
        ingestor, *(signed(e, n) if sign else message(e, n) for n, e in enumerate(events, 1))
    )
    assert batch.rejected == []
    return store


class StoreLog:
    """``hub.exporting.ExportLog`` over the in-memory store: its events in commit order."""

    def __init__(self, store: InMemoryStore) -> None:
        self.store = store
        events = [e for stored in store.events.values() for e in stored]
        self.log = list(enumerate(sorted(events, key=lambda e: e.timestamp), start=1))

    def read_log(self, after: int, limit: int) -> list[tuple[int, Any]]:
        return [(p, e) for p, e in self.log if p > after][:limit]

    def entities(self) -> list[Entity]:
        return list(self.store.entities)

    def last_position(self) -> int:
        return len(self.log)


def stored_fields(store: InMemoryStore) -> dict[UUID, list[dict[str, Any]]]:
    """Every stored event's fields but the moment it was stored."""
    return {
        aggregate: [
            {
                "class": type(e).__qualname__,
                **{k: v for k, v in vars(e).items() if k != "timestamp"},
            }
            for e in events
        ]
        for aggregate, events in store.events.items()
    }


def export_all(store: InMemoryStore, selection: Selection = Selection()) -> list[CloudEvent]:
    return list(exported_events(StoreLog(store), selection, ExportStats(), batch=7))


def test_every_type_ingest_applies_has_a_reverse() -> None:
    made = {name for name, _, _ in VARIANTS}
    assert made == set(EVENT_TYPES)
    stored = stored_by_ingest(originals())
    classes = {type(e) for events in stored.events.values() for e in events}
    assert classes <= set(REVERSES) | NOT_CLOUD_EVENTS
    assert set(REVERSES) <= classes  # (every reverse is exercised here)


def test_the_export_gives_back_the_cloud_events_ingest_received() -> None:
    sent = originals()
    exported = export_all(stored_by_ingest(sent))
    # One each: an operator's start or end is exported once (with the machine's event).
    assert sorted(e.id for e in exported) == sorted(e.id for e in sent)
    by_id = {e.id: e for e in exported}
    for original in sent:
        back = by_id[original.id]
        same = ("specversion", "id", "source", "type", "time", "subject")
        assert [getattr(back, a) for a in same] == [getattr(original, a) for a in same]
        # The data as the contract reads it (optional fields left out come back as their
        # defaults; a time in the same instant, in its offset).
        model = EVENT_TYPES[original.type].data_model
        assert model.model_validate(back.data) == model.model_validate(original.data)
        if original.type == "mes.erp.order.changed.v1":
            assert back.data == {k: v for k, v in original.data.items()}


def test_applying_the_export_again_stores_the_same_fields() -> None:
    first = stored_by_ingest(originals())
    lines = b"".join(export_line(e) for e in export_all(first))
    again = [item.event for item in events_to_import(lines.splitlines())]
    second = stored_by_ingest(again)
    assert stored_fields(second) == stored_fields(first)
    assert sorted(second.entities, key=str) == sorted(first.entities, key=str)


def test_each_line_says_where_and_when_it_was_stored_and_by_whom() -> None:
    store = stored_by_ingest(originals())
    log = StoreLog(store)
    exported = export_all(store)
    first = exported[0]
    extra = first.model_extra or {}
    position = extra[POSITION]
    stored = dict(log.log)[position]
    assert extra[RECORDED_TIME] == stored.timestamp.isoformat().replace("+00:00", "Z")
    assert extra[SITE] == "default"
    assert (extra["mesactorkind"], extra["mesactorid"]) == ("adapter", "urn:test")
    positions = [(e.model_extra or {})[POSITION] for e in exported]
    assert positions == sorted(positions)  # log order
    line = json.loads(export_line(first))
    assert list(line)[:6] == ["specversion", "id", "source", "type", "time", "subject"]


def test_the_actor_named_by_the_api_is_exported_and_kept_by_an_import() -> None:
    event = cloud_event("mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}).model_copy(
        update={"mesactorkind": "key", "mesactorid": "k-1234", "mesactorrole": "operator"}
    )
    (exported,) = export_all(stored_by_ingest([event]))
    extra = exported.model_extra or {}
    assert (extra["mesactorkind"], extra["mesactorid"], extra["mesactorrole"]) == (
        "key", "k-1234", "operator"
    )  # fmt: skip
    (item,) = events_to_import([export_line(exported)])
    assert set(item.event.model_extra or {}) == {"mesactorkind", "mesactorid", "mesactorrole"}
    assert (item.site, item.position) == ("default", extra[POSITION])


def test_an_event_stored_before_actors_were_kept_has_no_actor_attributes() -> None:
    machine = Machine(site="default", machine_id="M1")
    machine.report_availability(Origin("e1", "urn:old", T0), "AVAILABLE")
    _, reported = machine.collect_events()
    del reported.__dict__["actor"]  # (as stored before the field existed)
    entity = Entity("machine", "default", "M1", machine.id)
    exported = cloud_event_of(reported, entity, 2)
    assert exported is not None
    assert not any(k.startswith("mesactor") for k in exported.model_extra or {})


def test_selection_by_position_and_by_recorded_time() -> None:
    store = stored_by_ingest(originals())
    log = StoreLog(store)
    exported = export_all(store, Selection(first=5, last=9))
    assert {(e.model_extra or {})[POSITION] for e in exported} <= set(range(5, 10))
    times = [e.timestamp for _, e in log.log]
    since, until = times[10], times[20]
    by_time = export_all(store, Selection(since=since, until=until))
    recorded = [datetime.fromisoformat((e.model_extra or {})[RECORDED_TIME]) for e in by_time]
    assert by_time and all(since <= t < until for t in recorded)


def test_a_stored_event_with_no_cloud_event_is_refused_naming_its_position() -> None:
    machine = Machine(site="default", machine_id="M1")
    (registered,) = machine.collect_events()
    assert cloud_event_of(registered, Entity("machine", "default", "M1", machine.id), 1) is None

    class Unknown:
        pass

    with pytest.raises(ExportError, match="position 3: no CloudEvent known for"):
        cloud_event_of(Unknown(), Entity("machine", "default", "M1", machine.id), 3)


def test_an_export_line_that_is_not_a_cloud_event_is_refused_naming_its_line() -> None:
    good = export_line(cloud_event("mes.machine.availability.v1", "M1", {"availability": "X"}))
    with pytest.raises(ExportError, match="line 2: not a CloudEvent to import"):
        list(events_to_import([b"", good]))
    with pytest.raises(ExportError, match="line 1"):
        list(events_to_import([b"[1, 2]"]))
    valid = cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"})
    raw = json.loads(encode_event(valid)) | {POSITION: 7, SITE: "north", RECORDED_TIME: "x"}
    (item,) = events_to_import([json.dumps(raw).encode()])
    assert (item.line, item.site, item.position) == (1, "north", 7)
    assert item.event == valid and not item.event.model_extra
    for position in ("7", 7.5, True):
        with pytest.raises(ExportError, match=r"line 1: .*mesposition must be an integer"):
            list(events_to_import([json.dumps(raw | {POSITION: position}).encode()]))


def test_recorded_times_are_rfc3339_in_utc() -> None:
    store = stored_by_ingest(originals()[:1])
    (exported,) = export_all(store)
    recorded = (exported.model_extra or {})[RECORDED_TIME]
    assert recorded.endswith("Z")
    assert datetime.fromisoformat(recorded).tzinfo is not None
    assert datetime.fromisoformat(recorded) <= datetime.now(UTC)
