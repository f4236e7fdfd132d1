"""Domain aggregates: a Machine and an Order, event-sourced with the ``eventsourcing`` library.

Every event keeps the CloudEvent's id, source and event time, so the store answers "who said
what, when" for auditors. Decisions (e.g. how many parts a counter reading adds) are taken in the
command methods and recorded in the event; replaying history never re-decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from hub.webhook_registry import apply_change
from hub.webhook_registry import empty as registry_empty

# Aggregate ids are derived from the plant's own ids, so any process finds the same aggregate.
_ID_NAMESPACE = uuid5(NAMESPACE_URL, "urn:mes-hub")


def machine_aggregate_id(site: str, machine_id: str) -> UUID:
    return uuid5(_ID_NAMESPACE, f"machine/{site}/{machine_id}")


def order_aggregate_id(site: str, order_id: str) -> UUID:
    return uuid5(_ID_NAMESPACE, f"order/{site}/{order_id}")


# Who put a fact into the hub (``Origin.actor``): {"kind": "key", "id": the API key's id,
# "role": its role} for what came through the API; {"kind": "adapter", "id": the CloudEvent
# source, "role": its family} for what an adapter published on NATS; {"kind": "hub", "id": the
# source of the hub's component} for the hub's own events. Set by the hub, never by a client.
Actor = dict[str, str]


def actor_of(stored_event: Any) -> Actor | None:
    """The actor recorded with a stored event; None for events stored before actors were kept
    (they have no such field: read it so, never as an attribute)."""
    found = stored_event.__dict__.get("actor")
    return dict(found) if isinstance(found, dict) else None


@dataclass(frozen=True)
class Origin:
    """Where a fact came from: the CloudEvent id, its source, the event time, and who sent it."""

    event_id: str
    source: str
    time: datetime
    actor: Actor | None = None


def _newer(time: datetime, than: datetime | None) -> bool:
    return than is None or time >= than


class MachineEvent(Aggregate.Event):
    """What every fact about a machine carries: the CloudEvent id, its source, the event time
    and its actor (``actor_of``: events stored before actors were kept have none)."""

    event_id: str
    source: str
    event_time: datetime
    actor: Actor | None


# The condition the hub shows for an implausible counter reading, until a ``normal`` condition
# with this code is reported after it (an admin or integrator acknowledging it: a machine event).
COUNTER_JUMP = "MES_HUB_COUNTER_JUMP"


class Machine(Aggregate):
    # Class defaults, so machines restored from older snapshots have them.
    reported: bool = False
    cleared_at: dict[str, datetime] | None = None  # condition code -> its last ``normal``

    @staticmethod
    def create_id(site: str, machine_id: str) -> UUID:
        return machine_aggregate_id(site, machine_id)

    @event("Registered")
    def __init__(self, site: str, machine_id: str) -> None:
        self.site = site
        self.machine_id = machine_id
        self.availability: str | None = None
        self.availability_time: datetime | None = None
        self.execution: str | None = None
        self.execution_time: datetime | None = None
        self.mode: str | None = None
        self.program: str | None = None
        self.state_since: datetime | None = None
        self.parts_scrapped = 0
        # The latest reading per counter kind by event time, and that time.
        self.counter_values: dict[str, int] = {}
        self.counter_times: dict[str, datetime] = {}
        self.conditions: dict[str, dict[str, Any]] = {}
        self.order_id: str | None = None
        self.order_time: datetime | None = None
        self.last_event_time: datetime | None = None
        self.downtime_reasons = 0

    # --- commands: decide, then record -------------------------------------------------------

    def report_availability(self, origin: Origin, availability: str) -> None:
        self._record(self.AvailabilityReported, origin, availability=availability)

    def report_execution(
        self, origin: Origin, execution: str, mode: str | None, program: str | None
    ) -> None:
        self._record(
            self.ExecutionReported, origin, execution=execution, mode=mode, program=program
        )

    def report_part_count(self, origin: Origin, kind: str, count: int) -> None:
        """A counter reading is recorded as read. How many parts it adds depends on its
        neighbours by event time, which a late reading may change: the projections count
        (``projections.rules.counters``), not the aggregate."""
        self._record(self.PartCountReported, origin, kind=kind, count=count)

    def report_condition(
        self, origin: Origin, level: str, native_code: str | None, message: str | None
    ) -> None:
        self._record(
            self.ConditionReported, origin, level=level, native_code=native_code, message=message
        )

    def give_downtime_reason(
        self,
        origin: Origin,
        reason: str,
        start: datetime,
        end: datetime | None,
        operator: str,
        note: str | None,
    ) -> None:
        self._record(
            self.DowntimeReasonGiven,
            origin,
            reason=reason,
            start=start,
            end=end,
            operator=operator,
            note=note,
        )

    def start_order(self, origin: Origin, order_id: str) -> None:
        self._record(self.OrderStarted, origin, order_id=order_id)

    def end_order(self, origin: Origin, order_id: str) -> None:
        self._record(self.OrderEnded, origin, order_id=order_id)

    def report_scrap(
        self, origin: Origin, order_id: str | None, quantity: int, reason: str
    ) -> None:
        self._record(
            self.ScrapReported,
            origin,
            # Without an order id, the scrap belongs to the order running at its event time:
            # the projections decide, so a late order start re-attributes it.
            order_id=order_id,
            quantity=quantity,
            reason=reason,
        )

    def record_program_sent(
        self,
        origin: Origin,
        program: str,
        file: str,
        sha256: str,
        size_bytes: int,
        sent_bytes: int,
        outcome: str,
        started_at: datetime,
        port: str | None,
        sent_by: str | None,
        message: str | None,
    ) -> None:
        self._record(
            self.ProgramSent,
            origin,
            program=program,
            file=file,
            sha256=sha256,
            size_bytes=size_bytes,
            sent_bytes=sent_bytes,
            outcome=outcome,
            started_at=started_at,
            port=port,
            sent_by=sent_by,
            message=message,
        )

    def _record(self, event_class: type[MachineEvent], origin: Origin, **fields: Any) -> None:
        self.trigger_event(
            event_class,
            event_id=origin.event_id,
            source=origin.source,
            event_time=origin.time,
            actor=origin.actor,
            **fields,
        )

    def has_reported(self) -> bool:
        """Whether the machine itself ever reported (availability, execution, a counter or a
        condition): operator events alone do not make a machine."""
        return self.reported or bool(
            self.availability_time or self.execution_time or self.counter_values
        )

    def _reported(self) -> None:
        self.reported = True

    def _seen(self, time: datetime) -> None:
        if _newer(time, self.last_event_time):
            self.last_event_time = time

    # --- events: the facts, and how each changes the machine -----------------------------------

    class AvailabilityReported(MachineEvent):
        availability: str

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine._reported()
            if _newer(self.event_time, machine.availability_time):
                machine.availability = self.availability
                machine.availability_time = self.event_time

    class ExecutionReported(MachineEvent):
        execution: str
        mode: str | None
        program: str | None

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine._reported()
            # An older report is kept in the history but does not overwrite the current state.
            if not _newer(self.event_time, machine.execution_time):
                return
            if self.execution != machine.execution:
                machine.state_since = self.event_time
            machine.execution = self.execution
            machine.execution_time = self.event_time
            if self.mode is not None:
                machine.mode = self.mode
            if self.program is not None:
                machine.program = self.program

    class PartCountReported(MachineEvent):
        # Events stored before counting moved to the projections also carry ``increment``,
        # ``reset``, ``late`` and ``order_id``: decisions taken at arrival, no longer read.
        kind: str
        count: int

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine._reported()
            # The latest reading by event time, for the machine's current state.
            last = machine.counter_times.get(self.kind)
            if last is None or self.event_time >= last:
                machine.counter_values[self.kind] = self.count
                machine.counter_times[self.kind] = self.event_time

    class ConditionReported(MachineEvent):
        level: str
        native_code: str | None
        message: str | None

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine._reported()
            code = self.native_code or ""
            current = machine.conditions.get(code)
            if current is not None and not _newer(
                self.event_time, datetime.fromisoformat(current["since"])
            ):
                return
            if self.level == "normal":
                cleared = machine.cleared_at or {}
                if code not in cleared or self.event_time > cleared[code]:
                    machine.cleared_at = {**cleared, code: self.event_time}
                # MTConnect: NORMAL without a native code clears every active condition.
                if code:
                    machine.conditions.pop(code, None)
                else:
                    machine.conditions.clear()
                return
            machine.conditions[code] = {
                "level": self.level,
                "native_code": self.native_code,
                "message": self.message,
                "since": self.event_time.isoformat(),
            }

    class DowntimeReasonGiven(MachineEvent):
        reason: str
        start: datetime
        end: datetime | None
        operator: str
        note: str | None

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine.downtime_reasons += 1

    class OrderStarted(MachineEvent):
        order_id: str

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            if _newer(self.event_time, machine.order_time):
                machine.order_id = self.order_id
                machine.order_time = self.event_time

    class OrderEnded(MachineEvent):
        order_id: str

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            if machine.order_id == self.order_id and _newer(self.event_time, machine.order_time):
                machine.order_id = None
                machine.order_time = self.event_time

    class ScrapReported(MachineEvent):
        order_id: str | None
        quantity: int
        reason: str

        def apply(self, aggregate: Any) -> None:
            machine: Machine = aggregate
            machine._seen(self.event_time)
            machine.parts_scrapped += self.quantity

    class ProgramSent(MachineEvent):
        """An NC program sent to the machine's control (DNC). Kept for the auditors (which
        version of which program went to this machine); it changes nothing of the machine's
        state, not even when it was last heard of: the hub sent it, the machine said nothing."""

        program: str
        file: str
        sha256: str
        size_bytes: int
        sent_bytes: int
        outcome: str
        started_at: datetime
        port: str | None
        sent_by: str | None
        message: str | None

        def apply(self, aggregate: Any) -> None:
            pass


class Order(Aggregate):
    """A production order as the ERP released it and the floor ran it.

    An operator may start an order the ERP has not released yet (the release is late or went
    elsewhere): the order then exists with status ``unreleased`` until the release arrives.
    """

    # Class defaults, so orders restored from snapshots taken before these existed have them.
    delivery_forecast: dict[str, Any] | None = None  # the last one published (JSON-ready)
    delivery_forecast_changes: int = 0
    # The last progress published (OrderProgressedV1 data without the order id, and ``as_of``:
    # the event time, which the watch's throttle counts from), and how many were.
    progress: dict[str, Any] | None = None
    progress_changes: int = 0
    # Every start and end as tapped: {machine_id, time (ISO), started}; None on orders stored
    # before moves were kept (their runs are the starting point).
    moves: list[dict[str, Any]] | None = None
    # Production confirmations decided (ConfirmationDueV1 data) and, per "destination/message",
    # the last delivery attempt; None on orders stored before these existed.
    confirmations: list[dict[str, Any]] | None = None
    deliveries: dict[str, dict[str, Any]] | None = None

    @staticmethod
    def create_id(site: str, order_id: str) -> UUID:
        return order_aggregate_id(site, order_id)

    @event("Registered")
    def __init__(self, site: str, order_id: str) -> None:
        self.site = site
        self.order_id = order_id
        self.status = "unreleased"
        self.part_number: str | None = None
        self.quantity: int | None = None
        self.due: datetime | None = None
        self.customer: str | None = None
        self.machine_id: str | None = None
        self.ideal_cycle_time_s: float | None = None
        self.released_at: datetime | None = None
        self.cancelled_reason: str | None = None
        self.running_on: list[str] = []
        # One entry per run on a machine: {machine_id, start, end}; times as ISO text.
        self.runs: list[dict[str, Any]] = []
        self.changes = 0

    def release(self, origin: Origin, fields: dict[str, Any]) -> None:
        self._released(origin.event_id, origin.source, origin.time, fields, actor=origin.actor)

    def change(self, origin: Origin, fields: dict[str, Any]) -> None:
        self._changed(origin.event_id, origin.source, origin.time, fields, actor=origin.actor)

    def cancel(self, origin: Origin, reason: str) -> None:
        self._cancelled(origin.event_id, origin.source, origin.time, reason, actor=origin.actor)

    def start_on(self, origin: Origin, machine_id: str) -> None:
        self._started(origin.event_id, origin.source, origin.time, machine_id, actor=origin.actor)

    def end_on(self, origin: Origin, machine_id: str) -> None:
        self._ended(origin.event_id, origin.source, origin.time, machine_id, actor=origin.actor)

    def record_delivery_forecast(self, origin: Origin, forecast: dict[str, Any]) -> None:
        self._delivery_forecast_changed(
            origin.event_id, origin.source, origin.time, forecast, actor=origin.actor
        )

    def record_progress(self, origin: Origin, progress: dict[str, Any]) -> None:
        self._progressed(origin.event_id, origin.source, origin.time, progress, actor=origin.actor)

    def record_confirmation_due(self, origin: Origin, confirmation: dict[str, Any]) -> None:
        self._confirmation_due(
            origin.event_id, origin.source, origin.time, confirmation, actor=origin.actor
        )

    def record_webhook_due(self, origin: Origin, webhook: dict[str, Any]) -> None:
        self._webhook_due(origin.event_id, origin.source, origin.time, webhook, actor=origin.actor)

    def record_delivery_attempt(self, origin: Origin, attempt: dict[str, Any]) -> None:
        self._delivery_attempted(
            origin.event_id, origin.source, origin.time, attempt, actor=origin.actor
        )

    @property
    def confirmed(self) -> list[dict[str, Any]]:
        """The confirmations the hub decided for this order (``ConfirmationDueV1`` data and
        the site), in sequence."""
        return list(self.confirmations or [])

    def _set_fields(self, fields: dict[str, Any]) -> None:
        for name in ("part_number", "quantity", "due", "customer", "machine_id"):
            if name in fields:
                setattr(self, name, fields[name])
        if fields.get("ideal_cycle_time_s") is not None:
            # An ERP without cycle times leaves it out: the plant's fallbacks apply.
            self.ideal_cycle_time_s = float(fields["ideal_cycle_time_s"])

    def _refresh_status(self) -> None:
        if self.status == "cancelled":
            return
        if self.running_on:
            self.status = "running"
        elif self.runs:
            self.status = "ended"
        elif self.released_at is not None:
            self.status = "released"

    @event("Released")
    def _released(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        fields: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self._set_fields(fields)
        self.released_at = event_time
        self._refresh_status()

    @event("Changed")
    def _changed(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        fields: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self._set_fields(fields)
        self.changes += 1

    @event("Cancelled")
    def _cancelled(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        reason: str,
        actor: Actor | None = None,
    ) -> None:
        self.status = "cancelled"
        self.cancelled_reason = reason

    @event("DeliveryForecastChanged")
    def _delivery_forecast_changed(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        forecast: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self.delivery_forecast = forecast
        self.delivery_forecast_changes += 1

    @event("Progressed")
    def _progressed(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        progress: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self.progress = {**progress, "as_of": event_time.isoformat()}
        self.progress_changes += 1

    @event("ConfirmationDue")
    def _confirmation_due(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        confirmation: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self.confirmations = [*(self.confirmations or []), confirmation]

    @event("WebhookDue")
    def _webhook_due(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        webhook: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        # Kept in the store for the outbox and the auditors; the order's state does not change.
        pass

    @event("DeliveryAttempted")
    def _delivery_attempted(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        attempt: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        # The last outcome per message and destination (every attempt stays in the store).
        key = f"{attempt['destination']}/{attempt['message_id']}"
        self.deliveries = {**(self.deliveries or {}), key: attempt}

    @event("Started")
    def _started(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        machine_id: str,
        actor: Actor | None = None,
    ) -> None:
        self._move(machine_id, event_time, started=True)

    @event("Ended")
    def _ended(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        machine_id: str,
        actor: Actor | None = None,
    ) -> None:
        self._move(machine_id, event_time, started=False)

    def _move(self, machine_id: str, time: datetime, started: bool) -> None:
        """Record a start or end and derive the runs by event time, whatever order the taps
        arrived in (a late end closes the run it belongs to, not the last one stored)."""
        if self.moves is None:  # an order stored before moves were kept: start from its runs
            self.moves = [
                {"machine_id": run["machine_id"], "time": run[edge], "started": edge == "start"}
                for run in self.runs
                for edge in ("start", "end")
                if run[edge] is not None
            ]
        self.moves = [
            *self.moves,
            {"machine_id": machine_id, "time": time.isoformat(), "started": started},
        ]
        self.runs = order_runs(self.moves)
        self.running_on = sorted({r["machine_id"] for r in self.runs if r["end"] is None})
        self._refresh_status()


def order_runs(moves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An order's runs per machine from its starts and ends, folded in event-time order: a
    start opens a run unless one is open on that machine; an end closes the open run. At one
    moment the open run ends first, then starts, then the end of a run started at that very
    moment (a run of no length). An end with no open run changes nothing."""
    runs: list[dict[str, Any]] = []
    open_runs: dict[str, dict[str, Any]] = {}
    by_time: dict[datetime, list[dict[str, Any]]] = {}
    for move in moves:
        by_time.setdefault(datetime.fromisoformat(move["time"]), []).append(move)
    for time in sorted(by_time):
        moves_now = by_time[time]
        ended = {m["machine_id"] for m in moves_now if not m["started"]}
        for machine_id in sorted(ended & open_runs.keys()):
            open_runs.pop(machine_id)["end"] = time.isoformat()
            ended.discard(machine_id)
        for machine_id in sorted({m["machine_id"] for m in moves_now if m["started"]}):
            if machine_id not in open_runs:
                run = {"machine_id": machine_id, "start": time.isoformat(), "end": None}
                runs.append(run)
                open_runs[machine_id] = run
        for machine_id in sorted(ended & open_runs.keys()):
            open_runs.pop(machine_id)["end"] = time.isoformat()
    return runs


def plant_aggregate_id(site: str) -> UUID:
    return uuid5(_ID_NAMESPACE, f"plant/{site}")


class Plant(Aggregate):
    """The site's calendar and reason catalog over time: every configuration ever applied, so
    a report on last March uses last March's shifts."""

    @staticmethod
    def create_id(site: str) -> UUID:
        return plant_aggregate_id(site)

    @event("Registered")
    def __init__(self, site: str) -> None:
        self.site = site
        # {"config": the [plant] table, "effective_from": ISO time or None, "recorded_at": ISO}
        self.configurations: list[dict[str, Any]] = []

    def configure(
        self, origin: Origin, config: dict[str, Any], effective_from: datetime | None
    ) -> None:
        self._configured(
            origin.event_id, origin.source, origin.time, config, effective_from, actor=origin.actor
        )

    @event("Configured")
    def _configured(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        config: dict[str, Any],
        effective_from: datetime | None,
        actor: Actor | None = None,
    ) -> None:
        self.configurations.append(
            {
                "config": config,
                "effective_from": effective_from.isoformat() if effective_from else None,
                "recorded_at": event_time.isoformat(),
            }
        )


def webhooks_aggregate_id(site: str) -> UUID:
    return uuid5(_ID_NAMESPACE, f"webhooks/{site}")


class Webhooks(Aggregate):
    """The site's partners and their webhook endpoints (``hub.webhook_registry``): every change
    kept, who asked for it and why."""

    @staticmethod
    def create_id(site: str) -> UUID:
        return webhooks_aggregate_id(site)

    @event("Registered")
    def __init__(self, site: str) -> None:
        self.site = site
        self.registry: dict[str, Any] = registry_empty()

    def change(self, origin: Origin, change: dict[str, Any]) -> None:
        self._changed(origin.event_id, origin.source, origin.time, change, actor=origin.actor)

    @event("Changed")
    def _changed(
        self,
        event_id: str,
        source: str,
        event_time: datetime,
        change: dict[str, Any],
        actor: Actor | None = None,
    ) -> None:
        self.registry = apply_change(self.registry, change, event_time.isoformat())


# The CloudEvent type each stored event was made from (``ingest`` maps types to aggregate
# methods; this is the way back), by the event's class: "Machine.ExecutionReported", ….
_CLOUD_EVENT_TYPES = {
    "Machine.AvailabilityReported": "mes.machine.availability.v1",
    "Machine.ExecutionReported": "mes.machine.execution.v1",
    "Machine.PartCountReported": "mes.machine.partcount.v1",
    "Machine.ConditionReported": "mes.machine.condition.v1",
    "Machine.DowntimeReasonGiven": "mes.operator.downtime_reason.v1",
    "Machine.OrderStarted": "mes.operator.order_started.v1",
    "Machine.OrderEnded": "mes.operator.order_ended.v1",
    "Machine.ScrapReported": "mes.operator.scrap.v1",
    "Machine.ProgramSent": "mes.machine.program_sent.v1",
    "Order.Started": "mes.operator.order_started.v1",
    "Order.Ended": "mes.operator.order_ended.v1",
    "Order.Released": "mes.erp.order.released.v1",
    "Order.Changed": "mes.erp.order.changed.v1",
    "Order.Cancelled": "mes.erp.order.cancelled.v1",
    "Order.DeliveryForecastChanged": "mes.hub.delivery_forecast.changed.v1",
    "Order.Progressed": "mes.hub.order.progressed.v1",
    "Order.ConfirmationDue": "mes.hub.order.confirmation_due.v1",
    "Order.WebhookDue": "mes.hub.webhook.due.v1",
    "Order.DeliveryAttempted": "mes.hub.delivery.attempted.v1",
    "Plant.Configured": "mes.hub.plant.configured.v1",
    "Webhooks.Changed": "mes.hub.webhooks.changed.v1",
}


def cloud_event_type(stored_event: Any) -> str:
    """The CloudEvent type a stored event was made from; for an event no CloudEvent made (an
    aggregate's ``Registered``), its class name."""
    name = type(stored_event).__qualname__
    return _CLOUD_EVENT_TYPES.get(name, name)
