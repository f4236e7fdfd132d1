"""The Sparkplug B adapter against a real MQTT broker (amqtt's, in its own process) and an edge
node that speaks Sparkplug B through paho-mqtt with payloads encoded by pysparkplug
(``tests/sparkplug_peer.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pysparkplug import DataType, DBirth, DDeath, NBirth, NData, NDeath
from pysparkplug import Metric as SpbMetric
from pysparkplug._protobuf import Payload as PbPayload

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.sparkplug import (
    BIRTHS_WAIT_S,
    MAX_PAYLOAD_BYTES,
    BrokerLost,
    SparkplugAdapter,
    SparkplugConfig,
    SparkplugHost,
    SparkplugMachine,
)
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running, facts, of_kind
from tests.conftest import eventually
from tests.sparkplug_peer import (
    Broker,
    EdgeNode,
    free_port,
    password_file,
    self_signed_certificate,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "sparkplug.md"
PRESS = {"Running": (DataType.BOOLEAN, False), "Parts": (DataType.UINT32, 100)}


class Recorder(InMemoryPublisher):
    """Keeps every event offered, duplicates included (``published`` drops repeated ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[str] = []

    async def publish_many(self, events: list[Any]) -> list[Any]:
        self.offered += [e.id for e in events]
        return await super().publish_many(events)


@pytest.fixture
def broker() -> Iterator[Broker]:
    server = Broker()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def nodes() -> Iterator[list[EdgeNode]]:
    """Edge nodes a test starts, closed at its end."""
    started: list[EdgeNode] = []
    yield started
    for node in started:
        node.close()


def edge(nodes: list[EdgeNode], broker: Broker, **kwargs: Any) -> EdgeNode:
    node = EdgeNode(broker.port, metrics=kwargs.pop("metrics", PRESS), **kwargs)
    nodes.append(node)
    return node


def config(
    broker: Broker, machines: list[dict[str, Any]] | None = None, **kwargs: Any
) -> SparkplugConfig:
    return SparkplugConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": broker.port,
            "group_id": "Plant1",
            "keepalive_s": 2,
            "timeout_s": 1.0,
            "reconnect_max_s": 0.5,
            "rebirth_interval_s": 0.2,
            "check_wait_s": 5.0,
            "machines": machines
            or [
                {
                    "machine_id": "PRESS-1",
                    "edge_node": "Line1",
                    "execution": {"metric": "Running"},
                    "part_count": "Parts",
                }
            ],
            **kwargs,
        }
    )


RESET = ("condition", {"level": "normal"})  # a first birth's: the hub's conditions cleared


def told(publisher: InMemoryPublisher) -> list[tuple[str, dict[str, Any]]]:
    """What the adapter published, without the conditions' resets of first births (tested on
    their own): what the tests of other rules are about."""
    return [fact for fact in facts(publisher) if fact != RESET]


def conditions_told(publisher: InMemoryPublisher) -> list[dict[str, Any]]:
    return [data for kind, data in told(publisher) if kind == "condition"]


def at_ms(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


def times(publisher: InMemoryPublisher) -> list[datetime]:
    """The times of what ``told`` gives."""
    return [e.envelope.time for (_, e), fact in zip(publisher.published, facts(publisher),
                                                    strict=True) if fact != RESET]  # fmt: skip


@pytest.fixture
async def started() -> AsyncIterator[list[Running]]:
    running: list[Running] = []
    yield running
    for item in running:
        if not item.task.done():
            item.stop.set()
            await asyncio.wait_for(item.task, 10)


def run(started: list[Running], adapter: SparkplugAdapter, publisher: Any) -> Running:
    running = Running(adapter, publisher)  # type: ignore[arg-type]
    started.append(running)
    return running


def test_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = SparkplugAdapter(
        SparkplugConfig(
            host="broker",
            group_id="G",
            machines=[SparkplugMachine(machine_id="M1", edge_node="N1", part_count="Parts")],
        )
    )
    assert adapter.protocol == "sparkplug"


async def test_births_then_every_change_once_with_its_time(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker)
    node.connect()  # born before the adapter runs: it asks for a rebirth on connecting
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    await eventually(lambda: len(told(publisher)) == 3)
    assert node.rebirth_requests == 1
    assert told(publisher) == [
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "STOPPED"}),
        ("partcount", {"count": 100, "kind": "all"}),
    ]
    born = node.tags[None]
    assert times(publisher)[1:] == [
        at_ms(born["Running"].timestamp),
        at_ms(born["Parts"].timestamp),
    ]

    # DATA by alias only: each change once, at the metric's own time (not arrival).
    started_at = node.set(Running=True, timestamp=1_700_000_000_000 + 5)
    counted_at = node.set(Parts=101, timestamp=1_700_000_000_000 + 9)
    stopped_at = node.set(Running=False, Parts=102, timestamp=1_700_000_000_000 + 20)
    await eventually(lambda: len(told(publisher)) == 7)
    assert told(publisher)[3:] == [
        ("execution", {"execution": "ACTIVE"}),
        ("partcount", {"count": 101, "kind": "all"}),
        ("execution", {"execution": "STOPPED"}),
        ("partcount", {"count": 102, "kind": "all"}),
    ]
    assert times(publisher)[3:] == [at_ms(started_at), at_ms(counted_at)] + [at_ms(stopped_at)] * 2
    events = [e.envelope for _, e in publisher.published]
    assert {e.subject for e in events} == {"PRESS-1"}
    assert {e.source for e in events} == {"sparkplug://Plant1/Line1"}

    # A rebirth repeats the same values (same timestamps): nothing new is offered.
    offered = len(publisher.offered)
    node.publish_births()
    node.set(Parts=103, timestamp=1_700_000_000_000 + 30)  # and then goes on
    await eventually(lambda: len(told(publisher)) == 8)
    assert publisher.offered[offered:] == [publisher.published[-1][1].envelope.id]
    assert len(set(publisher.offered)) == len(publisher.offered)


async def test_a_rereading_adapter_gives_the_same_ids(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker)
    node.connect()
    node.set(Running=True, Parts=7)
    first, second = Recorder(), Recorder()
    run(started, SparkplugAdapter(config(broker)), first)
    await eventually(lambda: len(told(first)) == 3)
    run(started, SparkplugAdapter(config(broker)), second)  # its rebirth request: births again
    await eventually(lambda: len(told(second)) == 3)
    # The values carry their own timestamps: the same facts, the same ids. AVAILABLE is
    # stamped with the birth it was read from, a new one.
    assert [e.envelope.id for _, e in first.published[2:]] == [
        e.envelope.id for _, e in second.published[2:]
    ]


async def test_devices_are_machines_and_ddeath_makes_one_unavailable(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(
        nodes,
        broker,
        metrics={"Temperature": (DataType.DOUBLE, 21.5)},
        devices={
            "Lathe": {"State": (DataType.INT32, 0), "Count": (DataType.INT64, 5)},
            "Mill": {"State": (DataType.INT32, 1), "Count": (DataType.INT64, 9)},
        },
    )
    machines = [
        {
            "machine_id": machine_id,
            "edge_node": "Line1",
            "device": device,
            "execution": {
                "metric": "State",
                "values": {"0": "READY", "1": "ACTIVE", "-1": "STOPPED"},
            },
            "part_count": "Count",
        }
        for machine_id, device in (("LATHE-1", "Lathe"), ("MILL-1", "Mill"))
    ]
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, machines)), publisher)
    node.connect()

    def of(machine: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (s.rsplit(".", 1)[1], e.envelope.data)
            for s, e in publisher.published
            if e.envelope.subject == machine and e.envelope.data != RESET[1]
        ]

    await eventually(lambda: len(of("LATHE-1")) == 3 and len(of("MILL-1")) == 3)
    assert of("LATHE-1") == [
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "READY"}),
        ("partcount", {"count": 5, "kind": "all"}),
    ]
    node.set("Lathe", State=-1)  # a negative Int32 (two's complement on the wire)
    node.device_death("Mill")
    await eventually(lambda: len(of("LATHE-1")) == 4 and len(of("MILL-1")) == 5)
    assert of("LATHE-1")[3] == ("execution", {"execution": "STOPPED"})
    unavailable, condition = of("MILL-1")[3:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert condition[1]["native_code"] == CONNECTION_CODE
    assert "Plant1/Line1/Mill is offline (DDEATH)" in condition[1]["message"]
    node.device_death("Mill")  # again: still one UNAVAILABLE
    node.set("Lathe", Count=6)
    await eventually(lambda: len(of("LATHE-1")) == 5)
    assert len(of("MILL-1")) == 5


async def test_a_node_death_with_its_bdseq_makes_its_machines_unavailable_once(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker, bd_seq=7)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)

    node.drop()  # no DISCONNECT: the broker publishes the will, NDEATH bdSeq 7
    await eventually(lambda: len(told(publisher)) == 5)
    unavailable, condition = told(publisher)[3:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert condition[1]["level"] == "unavailable"
    assert condition[1]["native_code"] == CONNECTION_CODE
    assert condition[1]["message"] == "Sparkplug edge node Plant1/Line1 is offline (NDEATH bdSeq 7)"

    node.tags[None]["Parts"].value = 150  # made while offline; the next birth says so
    node.connect()  # bdSeq 8
    await eventually(lambda: len(told(publisher)) == 8)
    assert told(publisher)[5:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("partcount", {"count": 150, "kind": "all"}),
    ]


async def test_a_stale_node_death_is_ignored(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker, bd_seq=0)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)
    node.close()
    node.connect()  # bdSeq 1: a new session
    # The will of session 0, delivered late (as when a session is taken over), and one
    # from long ago across the wrap (255): both are of earlier sessions.
    node.send_raw("NDEATH", node.death(0))
    node.send_raw("NDEATH", node.death(255))
    node.set(Parts=101)  # sent after the stale deaths: the adapter has read them when it comes
    await eventually(lambda: len(told(publisher)) == 4)
    assert told(publisher)[3] == ("partcount", {"count": 101, "kind": "all"})
    assert "UNAVAILABLE" not in str(told(publisher))


async def test_pysparkplug_clean_disconnect_death_is_misnumbered_and_honoured(
    broker: Broker, started: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    """pysparkplug 0.6's ``EdgeNode.disconnect`` publishes an NDEATH whose bdSeq is the next
    session's (its NBIRTH had the one before). The node is gone all the same."""
    from pysparkplug import Client, MessageType, Metric, QoS, Topic
    from pysparkplug import EdgeNode as PyEdgeNode

    caplog.set_level(logging.INFO, logger="adapters.machines.sparkplug")
    seen: list[tuple[str, int]] = []  # (NBIRTH|NDEATH, bdSeq) as the broker delivers them
    watcher = Client()

    def remember(_client: Any, message: Any) -> None:
        kind = message.topic.message_type.name
        metrics = message.payload.metrics if kind == "NBIRTH" else (message.payload.bd_seq_metric,)
        seen.extend((kind, m.value) for m in metrics if m.name == "bdSeq")

    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, request_rebirth=False)), publisher)
    watcher.connect("127.0.0.1", port=broker.port, blocking=False)
    for kind in (MessageType.NBIRTH, MessageType.NDEATH):
        topic = Topic(group_id="Plant1", message_type=kind, edge_node_id="Line1")
        watcher.subscribe(topic, QoS.AT_LEAST_ONCE, remember)
    await eventually(lambda: any("subscribed" in r.getMessage() for r in caplog.records))
    node = PyEdgeNode(
        "Plant1",
        "Line1",
        [
            Metric(timestamp=None, name="Running", datatype=DataType.BOOLEAN, value=True),
            Metric(timestamp=None, name="Parts", datatype=DataType.UINT64, value=3),
        ],
    )
    node.connect("127.0.0.1", port=broker.port, blocking=False)
    await eventually(lambda: len(told(publisher)) == 3)
    node.disconnect()
    await eventually(lambda: len(told(publisher)) == 5)
    watcher.disconnect()
    assert told(publisher)[3][1] == {"availability": "UNAVAILABLE"}
    (birth,) = [b for k, b in seen if k == "NBIRTH"]
    (death,) = [d for k, d in seen if k == "NDEATH"]
    assert death == (birth + 1) % 256  # the known problem, as the broker carried it
    assert any("honoured as this session's death" in r.getMessage() for r in caplog.records)


async def test_a_seq_gap_requests_a_rebirth_and_values_wait_for_it(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)
    asked = node.rebirth_requests
    node.answer_rebirth = False
    node.skip_seq()  # a message lost on the way
    node.set(Parts=200)
    await eventually(lambda: node.rebirth_requests == asked + 1)
    node.set(Parts=201)  # in sequence again, but the node is not trusted before a birth
    node.publish_births()  # the birth says where it stands
    await eventually(lambda: len(told(publisher)) == 4)
    # 200 and 201 by DATA were not taken: had they been, 200 would be here.
    assert told(publisher)[3:] == [("partcount", {"count": 201, "kind": "all"})]


async def test_data_before_any_birth_is_ignored_and_a_rebirth_requested(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker)
    node.answer_rebirth = False
    node.connect()  # its NBIRTH is gone before the adapter listens
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    await eventually(lambda: node.rebirth_requests == 1)  # on connecting

    def data_without_birth_asks_again() -> bool:
        node.set(Running=True)  # until the rebirth interval (0.2 s) has passed
        return node.rebirth_requests >= 2

    await eventually(data_without_birth_asks_again)
    assert publisher.published == []
    node.publish_births()
    await eventually(lambda: len(told(publisher)) == 3)
    assert told(publisher)[1] == ("execution", {"execution": "ACTIVE"})


async def test_request_rebirth_false_sends_no_command(
    broker: Broker, nodes: list[EdgeNode], started: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.machines.sparkplug")
    node = edge(nodes, broker)
    node.connect()
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, request_rebirth=False)), publisher)
    await eventually(lambda: any("subscribed" in r.getMessage() for r in caplog.records))
    node.set(Running=True)
    node.skip_seq()
    node.set(Running=False)
    node.close()
    node.connect()  # a birth of its own accord
    await eventually(lambda: len(told(publisher)) == 3)
    assert node.rebirth_requests == 0


async def test_garbage_and_wrong_types_are_warnings_and_the_adapter_goes_on(
    broker: Broker, nodes: list[EdgeNode], started: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    node = edge(
        nodes,
        broker,
        metrics={
            "Running": (DataType.BOOLEAN, False),
            "Parts": (DataType.STRING, "twelve"),
            "Mode": (DataType.STRING, "AUTOMATIC"),
        },
    )
    machines = [
        {
            "machine_id": "PRESS-1",
            "edge_node": "Line1",
            "execution": {"metric": "Running"},
            "mode": {"metric": "Mode"},
            "part_count": "Parts",
        }
    ]
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, machines)), publisher)
    node.connect()
    await eventually(lambda: len(conditions_told(publisher)) == 1)
    (wrong_type,) = conditions_told(publisher)
    assert wrong_type["level"] == "warning"
    assert wrong_type["native_code"] == BAD_INPUT_CODE
    assert wrong_type["message"] == "Line1: metric 'Parts': a count, got 'twelve'"

    node.send_raw("NDATA", b"\x0a\xff\xff\xff")  # not a Sparkplug payload
    await eventually(lambda: len(conditions_told(publisher)) == 2)
    garbage = conditions_told(publisher)[1]
    assert garbage["native_code"] == BAD_INPUT_CODE
    assert garbage["message"].startswith("Line1: NDATA spBv1.0/Plant1/NDATA/Line1: payload:")
    node.set_metrics({"Mode": "DANCING"})
    await eventually(lambda: len(conditions_told(publisher)) == 3)
    assert "'DANCING' is not a controller mode" in conditions_told(publisher)[2]["message"]
    node.set(Running=True)  # and on it goes
    await eventually(
        lambda: {"execution": "ACTIVE", "mode": "AUTOMATIC"} in of_kind(publisher, "execution")
    )
    assert any("a count, got 'twelve'" in r.getMessage() for r in caplog.records)


async def test_flag_and_alarm_code_conditions(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(
        nodes,
        broker,
        metrics={"Door Open": (DataType.BOOLEAN, False), "Alarm": (DataType.UINT16, 0)},
    )
    machines = [
        {
            "machine_id": "PRESS-1",
            "edge_node": "Line1",
            "conditions": [
                {"metric": "Door Open", "native_code": "DOOR", "level": "warning"},
                {"metric": "Alarm"},
            ],
        }
    ]
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, machines)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 1)
    node.set_metrics({"Door Open": True})
    node.set(Alarm=17)
    node.set(Alarm=23)
    node.set(Alarm=0)
    node.set_metrics({"Door Open": False})
    await eventually(lambda: len(conditions_told(publisher)) == 6)
    assert [(c["level"], c.get("native_code")) for c in conditions_told(publisher)] == [
        ("warning", "DOOR"),
        ("fault", "17"),
        ("normal", "17"),
        ("fault", "23"),
        ("normal", "23"),
        ("normal", "DOOR"),
    ]
    assert conditions_told(publisher)[1]["message"] == "alarm 17 (Alarm)"


class IntoHub(Recorder):
    """Records what is offered, and publishes it into a running hub."""

    def __init__(self, hub: Any) -> None:
        super().__init__()
        self.hub = hub

    async def publish_many(self, events: list[Any]) -> list[Any]:
        await self.hub.publisher.publish_many(events)
        return await super().publish_many(events)


async def test_a_new_run_clears_what_cleared_while_no_adapter_listened(
    hub: Any, broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    """A fault that clears while the adapter is stopped: the new run's first birth shows it
    clear, which the new run, not knowing it was active, could not tell by a NORMAL with its
    code. The birth lists every metric: a NORMAL without a code clears all, then the birth
    raises again what is still active (with a new id: the same reading as before would be a
    duplicate the hub drops)."""
    node = edge(
        nodes,
        broker,
        metrics={"Overload": (DataType.BOOLEAN, False), "Alarm": (DataType.UINT16, 0)},
    )
    machines = [
        {
            "machine_id": "PRESS-1",
            "edge_node": "Line1",
            "conditions": [{"metric": "Overload", "native_code": "OVERLOAD"}, {"metric": "Alarm"}],
        }
    ]
    publisher = IntoHub(hub)  # one hub, both runs

    def active() -> set[str]:
        machine = hub.store.machine(hub.settings.site, "PRESS-1")
        return set(machine.conditions) if machine is not None else set()

    first = run(started, SparkplugAdapter(config(broker, machines)), publisher)
    node.connect()
    await eventually(lambda: len(publisher.published) == 2)
    assert facts(publisher) == [RESET, ("availability", {"availability": "AVAILABLE"})]
    node.set_metrics({"Overload": True})
    node.set(Alarm=17)
    await eventually(lambda: active() == {"OVERLOAD", "17"})
    alarm_17 = publisher.published[-1][1].envelope
    await first.finish()

    node.set_metrics({"Overload": False})  # no adapter listens
    seen = len(publisher.published)
    run(started, SparkplugAdapter(config(broker, machines)), publisher)  # asks for a rebirth
    await eventually(lambda: len(publisher.published) == seen + 3)
    assert facts(publisher)[seen:] == [
        RESET,  # before anything else of the machine
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "fault", "native_code": "17", "message": "alarm 17 (Alarm)"}),
    ]
    reset, _, again = [e.envelope for _, e in publisher.published[seen:]]
    # Alarm 17 is still active at the birth: raised again at the reset's time, never before
    # it (read by event time, a fault from before the reset would be cleared by it).
    assert again.time == reset.time > alarm_17.time and again.id != alarm_17.id
    # In the hub: not OVERLOAD (it cleared while no adapter listened), and alarm 17 again, as
    # known from the birth that showed it active.
    await eventually(lambda: active() == {"17"})
    machine = hub.store.machine(hub.settings.site, "PRESS-1")
    assert machine.conditions["17"]["since"] == reset.time.isoformat()


async def test_a_broker_restart_makes_machines_unavailable_once_then_back(
    broker: Broker, nodes: list[EdgeNode], started: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.machines.sparkplug")
    node = edge(nodes, broker)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)

    broker.kill()
    await eventually(lambda: len(told(publisher)) == 5)
    await eventually(lambda: sum("cannot connect" in r.getMessage() for r in caplog.records) >= 3)
    unavailable, condition = told(publisher)[3:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert condition[1]["native_code"] == CONNECTION_CODE
    assert condition[1]["message"].startswith(f"MQTT broker 127.0.0.1:{broker.port} unreachable: ")
    assert len(told(publisher)) == 5  # three failed reconnects: still one UNAVAILABLE

    broker.start()  # the same port
    node.drop()
    node.connect()  # the edge node reconnects too: a new session
    counted_at = node.set(Parts=120)  # published after the restart: must arrive
    await eventually(lambda: ("partcount", {"count": 120, "kind": "all"}) in told(publisher))
    assert told(publisher)[5:7] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
    ]
    assert times(publisher)[-1] == at_ms(counted_at)
    assert of_kind(publisher, "availability").count({"availability": "UNAVAILABLE"}) == 1


async def test_a_hung_broker_is_lost_and_found_again(
    broker: Broker, nodes: list[EdgeNode], started: list[Running]
) -> None:
    node = edge(nodes, broker)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)
    broker.pause()  # connections stay open, nothing is answered
    try:
        await eventually(lambda: len(told(publisher)) == 5)
    finally:
        broker.resume()
    # Found by the adapter's own ping (keepalive_s / 2 of quiet), not by a closed socket.
    assert "no answer to a ping within 1.0 s" in told(publisher)[4][1]["message"]
    await eventually(
        lambda: ("availability", {"availability": "AVAILABLE"}) in told(publisher)[5:], timeout=30
    )


async def test_host_state_online_retained_and_offline_on_stop(
    broker: Broker, started: list[Running]
) -> None:
    from amqtt.client import MQTTClient

    publisher = Recorder()
    running = run(started, SparkplugAdapter(config(broker, host_id="mes-hub-1")), publisher)

    async def state() -> dict[str, Any]:
        client = MQTTClient(config={"auto_reconnect": False, "plugins": {}})
        await client.connect(f"mqtt://127.0.0.1:{broker.port}")
        try:
            await client.subscribe([("spBv1.0/STATE/mes-hub-1", 1)])
            message = await client.deliver_message(timeout_duration=5)
            return dict(json.loads(bytes(message.data)))
        finally:
            await client.disconnect()

    async def online() -> bool:
        return (await state())["online"] is True

    await eventually(online)
    await running.finish()
    assert (await state())["online"] is False


async def test_credentials_let_the_adapter_in_and_never_reach_the_log(
    nodes: list[EdgeNode], started: list[Running], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A broker that lets no anonymous client in: the right password is needed, and is never
    logged (not even by amqtt at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    users = {"hub": "s3cret-Pa55", "edge": "edge-Pa55"}
    broker = Broker(passwords=password_file(tmp_path, users))
    broker.start()
    try:
        node = edge(nodes, broker, credentials=("edge", users["edge"]))
        node.connect()
        for refused in ({}, {"username": "hub", "password": "wrong-Pa55"}):
            with pytest.raises(BrokerLost, match=r"connection refused \(CONNACK [45]\)"):
                await SparkplugAdapter(config(broker, **refused)).check()
        cfg = config(broker, username="hub", password=users["hub"])
        assert "s3cret" not in repr(cfg)
        publisher = Recorder()
        run(started, SparkplugAdapter(cfg), publisher)
        await eventually(lambda: len(told(publisher)) == 3)
        assert not any("s3cret" in r.getMessage() or "Pa55" in r.getMessage()
                       for r in caplog.records)  # fmt: skip
    finally:
        for item in started:
            item.stop.set()
        broker.kill()


async def test_tls_with_the_brokers_ca(
    nodes: list[EdgeNode], started: list[Running], tmp_path: Path
) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    broker = Broker(tls=(certificate, key))
    broker.start()
    try:
        node = edge(nodes, broker)  # on the plain listener
        node.connect()
        secure = config(broker, port=broker.tls_port, tls=True, ca_file=str(certificate))
        publisher = Recorder()
        run(started, SparkplugAdapter(secure), publisher)
        await eventually(lambda: len(told(publisher)) == 3)

        # A broker whose certificate the adapter cannot check is refused.
        untrusted = config(broker, port=broker.tls_port, tls=True)
        with pytest.raises(BrokerLost, match="CERTIFICATE_VERIFY_FAILED"):
            await SparkplugAdapter(untrusted).check()
    finally:
        for item in started:
            item.stop.set()
        broker.kill()


async def test_check_returns_the_births_without_publishing(
    broker: Broker, nodes: list[EdgeNode]
) -> None:
    node = edge(nodes, broker)
    node.connect()
    node.set(Running=True, Parts=42)
    events = await SparkplugAdapter(config(broker)).check()
    assert [(e.type.split(".")[2], e.data) for e in events] == [
        RESET,
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "ACTIVE"}),
        ("partcount", {"count": 42, "kind": "all"}),
    ]


async def test_without_amqtt_the_adapter_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "amqtt.client", None)  # as if not installed
    adapter = SparkplugAdapter(
        SparkplugConfig(
            host="broker",
            group_id="G",
            machines=[SparkplugMachine(machine_id="M1", edge_node="N1", part_count="Parts")],
        )
    )
    with pytest.raises(RuntimeError, match=r"install mes-hub\[sparkplug\]"):
        await adapter.check()


async def test_check_of_an_unreachable_broker_raises() -> None:
    unreachable = SparkplugConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": free_port(),
            "group_id": "G",
            "timeout_s": 1.0,
            "machines": [{"machine_id": "M1", "edge_node": "N1", "part_count": "Parts"}],
        }
    )
    with pytest.raises(BrokerLost, match="cannot connect"):
        await SparkplugAdapter(unreachable).check()


@pytest.mark.parametrize(
    ("entry", "key", "message"),
    [
        ('group_id = "a/b"', "adapters.sparkplug.0.group_id", "should match pattern"),
        ('machines = [{machine_id = "M 1", edge_node = "N", part_count = "P"}]',
         "adapters.sparkplug.0.machines.0.machine_id", "should match pattern"),
        ('machines = [{machine_id = "M1", edge_node = "N"}]',
         "adapters.sparkplug.0.machines.0", "map at least one metric"),
        ('machines = [{machine_id = "M1", edge_node = "N", program = "Prog"}]',
         "adapters.sparkplug.0.machines.0", "mode and program need an execution metric"),
        ('machines = [{machine_id = "M1", edge_node = "N", '
         'execution = {metric = "S", values = {"1" = "RUNNING"}}}]',
         "adapters.sparkplug.0.machines.0.execution.values.1", "Input should be 'ACTIVE'"),
        ('machines = [{machine_id = "M1", edge_node = "N", part_count = "P"}, '
         '{machine_id = "M2", edge_node = "N", part_count = "P"}]',
         "adapters.sparkplug.0.machines", "'N' is mapped to more than one machine"),
        ('ca_file = "nowhere.pem"', "adapters.sparkplug.0.ca_file", "no such file"),
        ('password = "x"', "adapters.sparkplug.0", "a password needs a username"),
        ("keepalive_s = 1", "adapters.sparkplug.0.keepalive_s", "greater than or equal to 2"),
        ('host = ""', "adapters.sparkplug.0.host", "at least 1 character"),
        ('machines = [{machine_id = "M1", edge_node = "N", conditions = ['
         '{metric = "Alarm", native_code = "A"}, {metric = "Alarm", native_code = "B"}]}]',
         "adapters.sparkplug.0.machines.0", "a metric is given to more than one condition"),
    ],
)  # fmt: skip
def test_the_config_file_error_names_the_key(
    tmp_path: Path, entry: str, key: str, message: str
) -> None:
    lines = {
        "host": 'host = "broker"',
        "group_id": 'group_id = "G"',
        "machines": 'machines = [{machine_id = "M1", edge_node = "N", part_count = "P"}]',
    }
    name = entry.split(" ", 1)[0]
    lines[name] = entry
    path = tmp_path / "mes-hub.toml"
    path.write_text("[[adapters.sparkplug]]\n" + "\n".join(lines.values()) + "\n")
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert str(path) in text and f"'{key}'" in text and message in text, text


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.sparkplug]]" in b)
    path = tmp_path / "mes-hub.toml"
    path.write_text(example)
    (tmp_path / "plant-ca.pem").write_text("a CA certificate\n")  # named by the example
    (entry,) = load_adapters(path).sparkplug
    assert [m.machine_id for m in entry.machines] == ["PRESS-3", "LATHE-7"]
    assert entry.password is not None and entry.username == "mes-hub"


# --- The host's rules, message by message (payloads encoded by pysparkplug, no broker) ----------

T0 = 1_764_000_000_000  # the edge node's clock, in milliseconds
LINE1 = {
    "machine_id": "PRESS-1",
    "edge_node": "Line1",
    "execution": {"metric": "State", "values": {"0": "READY", "1": "ACTIVE", "2": "STOPPED"}},
    "mode": {"metric": "Mode"},
    "program": "Program",
    "part_count": "Parts",
}
STATE = {"State": (DataType.INT32, 0), "Mode": (DataType.STRING, "MANUAL"),
         "Program": (DataType.STRING, "O100"), "Parts": (DataType.UINT32, 10)}  # fmt: skip


class Wire:
    """Edge node Line1's messages as pysparkplug encodes them: births give every metric its
    name and alias, DATA names them by alias only; ``seq`` counts across all of them."""

    def __init__(
        self, metrics: dict[str, tuple[DataType, Any]], bd_seq: int = 0, stamped: bool = True
    ) -> None:
        self.types = {name: datatype for name, (datatype, _) in metrics.items()}
        self.values = {name: value for name, (_, value) in metrics.items()}
        self.aliases = {name: alias for alias, name in enumerate(metrics, start=1)}
        self.bd_seq, self.seq, self.stamped = bd_seq, -1, stamped

    def _encode(self, payload: Any) -> bytes:
        data = payload.encode()
        if self.stamped:
            return bytes(data)
        message = PbPayload.FromString(data)  # the same without any timestamp
        message.ClearField("timestamp")
        for metric in message.metrics:
            if metric.name != "bdSeq":
                metric.ClearField("timestamp")
        return bytes(message.SerializeToString())

    def _metrics(self, names: Any, birth: bool, at: int) -> tuple[SpbMetric, ...]:
        return tuple(
            SpbMetric(
                timestamp=at,
                name=name if birth else None,
                alias=self.aliases[name],
                datatype=self.types[name],
                value=self.values[name],
            )
            for name in names
        )

    def _next(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def nbirth(self, at: int = T0) -> tuple[str, bytes]:
        self.seq = -1
        bd_seq = SpbMetric(timestamp=at, name="bdSeq", datatype=DataType.INT64, value=self.bd_seq)
        metrics = (*self._metrics(self.values, True, at), bd_seq)
        payload = NBirth(timestamp=at, seq=self._next(), metrics=metrics)
        return "spBv1.0/Plant1/NBIRTH/Line1", self._encode(payload)

    def ndata(self, at: int, **values: Any) -> tuple[str, bytes]:
        self.values.update(values)
        payload = NData(timestamp=at, seq=self._next(), metrics=self._metrics(values, False, at))
        return "spBv1.0/Plant1/NDATA/Line1", self._encode(payload)

    def dbirth(self, device: str, at: int = T0) -> tuple[str, bytes]:
        payload = DBirth(
            timestamp=at, seq=self._next(), metrics=self._metrics(self.values, True, at)
        )
        return f"spBv1.0/Plant1/DBIRTH/Line1/{device}", self._encode(payload)

    def ddeath(self, device: str, at: int = T0) -> tuple[str, bytes]:
        payload = DDeath(timestamp=at, seq=self._next())
        return f"spBv1.0/Plant1/DDEATH/Line1/{device}", self._encode(payload)

    def ndeath(self, bd_seq: int, at: int = T0) -> tuple[str, bytes]:
        metric = SpbMetric(timestamp=at, name="bdSeq", datatype=DataType.INT64, value=bd_seq)
        return "spBv1.0/Plant1/NDEATH/Line1", NDeath(timestamp=at, bd_seq_metric=metric).encode()


def host(machines: list[dict[str, Any]] | None = None, **kwargs: Any) -> SparkplugHost:
    return SparkplugHost(
        SparkplugConfig.model_validate(
            {"host": "broker", "group_id": "Plant1", "machines": machines or [LINE1], **kwargs}
        )
    )


def said(events: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type.split(".")[2], e.data) for e in events]


def warnings_of(events: list[Any]) -> list[str]:
    return [e.data["message"] for e in events if e.data.get("native_code") == BAD_INPUT_CODE]


def test_mode_program_and_execution_of_one_message_are_one_event() -> None:
    rules, wire = host(), Wire(STATE)
    events = rules.receive(*wire.nbirth())
    assert said(events)[:3] == [
        RESET,
        ("availability", {"availability": "AVAILABLE"}),
        ("execution", {"execution": "READY", "mode": "MANUAL", "program": "O100"}),
    ]
    # One NDATA: the machine went from READY in MANUAL to ACTIVE in AUTOMATIC running O200.
    # (READY, AUTOMATIC) never happened: no event may say so.
    events = rules.receive(*wire.ndata(T0 + 10, State=1, Mode="AUTOMATIC", Program="O200"))
    assert said(events) == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O200"})
    ]
    assert events[0].time == at_ms(T0 + 10)
    # The mode alone: the same execution in the new mode.
    assert said(rules.receive(*wire.ndata(T0 + 20, Mode="MANUAL"))) == [
        ("execution", {"execution": "ACTIVE", "mode": "MANUAL", "program": "O200"})
    ]


def test_a_birth_after_a_loss_resets_the_conditions_and_raises_the_active_again() -> None:
    machine = {**LINE1, "conditions": [{"metric": "Door", "native_code": "DOOR"}]}
    rules, wire = host([machine]), Wire({**STATE, "Door": (DataType.BOOLEAN, True)})
    first = rules.receive(*wire.nbirth())
    assert said(first)[:2] == [RESET, ("availability", {"availability": "AVAILABLE"})]
    (door,) = [e for e in first if e.data.get("native_code") == "DOOR"]
    assert door.data["level"] == "fault"
    # A rebirth of the same session (the node was not lost): nothing to reset, nothing new.
    rules.receive(*wire.ndata(T0 + 1, Parts=11))
    assert said(rules.receive(*wire.nbirth(T0 + 2))) == []
    # Lost, then born again, even with the very first birth's values and times: its
    # conditions may have changed meanwhile, so a reset comes first (not the first one's id,
    # which the hub would drop) and the door, still open, is raised again.
    rules.receive(*wire.ndeath(0))
    events = rules.receive(*wire.nbirth(T0))
    assert said(events)[:2] == [RESET, ("availability", {"availability": "AVAILABLE"})]
    assert events[0].time == at_ms(T0) and events[0].id != first[0].id
    (again,) = [e for e in events if e.data.get("native_code") == "DOOR"]
    assert (again.data, again.time) == (door.data, door.time) and again.id != door.id
    # The same birth read again (a duplicate delivery): nothing new.
    assert rules.receive(*wire.nbirth(T0)) == []


def test_mode_before_any_execution_waits_for_it() -> None:
    machine = {**LINE1, "part_count": None}
    rules, wire = host([machine]), Wire({"Mode": (DataType.STRING, "EDIT")})
    # A birth with a mode but no execution (State is null): no execution is made up to carry
    # the mode; the first real one carries it.
    wire.types["State"], wire.aliases["State"], wire.values["State"] = DataType.INT32, 9, None
    assert said(rules.receive(*wire.nbirth())) == [
        RESET, ("availability", {"availability": "AVAILABLE"}),
    ]  # fmt: skip
    assert said(rules.receive(*wire.ndata(T0 + 5, State=2))) == [
        ("execution", {"execution": "STOPPED", "mode": "EDIT"})
    ]


def test_without_timestamps_times_are_arrival_times_and_each_change_counts() -> None:
    rules, wire = host(), Wire(STATE, stamped=False)
    arrived = [datetime(2026, 11, 30, 12, 0, s, tzinfo=UTC) for s in range(6)]
    events = rules.receive(*wire.nbirth(), now=arrived[0])
    assert warnings_of(events) == ["Line1: messages without timestamps: times are arrival times"]
    assert {e.time for e in events if not warnings_of([e])} == {arrived[0]}
    for second, state in enumerate((1, 2, 1, 2), start=1):  # ACTIVE, STOPPED, ACTIVE, STOPPED
        events += rules.receive(*wire.ndata(0, State=state), now=arrived[second])
    executions = [e for e in events if e.type.endswith(".execution.v1")]
    assert [e.data["execution"] for e in executions] == [
        "READY", "ACTIVE", "STOPPED", "ACTIVE", "STOPPED",
    ]  # fmt: skip
    assert [e.time for e in executions] == arrived[:5]
    assert len({e.id for e in events}) == len(events)  # the hub drops none of them
    assert len(warnings_of(events)) == 1  # one warning for the node, not one per message
    # Two messages arriving in the same microsecond still have different times.
    late = rules.receive(*wire.ndata(0, State=1), now=arrived[4])
    assert late[0].time > arrived[4]


def test_times_the_hub_would_refuse_are_arrival_times_with_one_warning() -> None:
    rules, wire = host(), Wire(STATE)
    rules.receive(*wire.nbirth())
    now = datetime.now(UTC)
    year_2100 = 4_102_444_800_000
    events = rules.receive(*wire.ndata(year_2100, State=1), now=now)
    assert said(events)[1] == ("execution", {"execution": "ACTIVE", "mode": "MANUAL",
                                              "program": "O100"})  # fmt: skip
    assert events[1].time == now  # not 2100: the hub would refuse it (clock skew)
    (warning,) = warnings_of(events)
    assert "timestamp 4102444800000 ms is not a time the hub can take" in warning
    # While it lasts, no new warning; a right time ends it; 1970 is wrong again.
    events = rules.receive(*wire.ndata(year_2100 + 1, State=2), now=now + timedelta(seconds=1))
    assert warnings_of(events) == []
    assert events[0].time == now + timedelta(seconds=1)
    assert rules.receive(*wire.ndata(T0 + 100, State=1))[0].time == at_ms(T0 + 100)
    events = rules.receive(*wire.ndata(5_000, State=2))
    assert len(warnings_of(events)) == 1


def test_a_device_not_born_again_after_an_nbirth_is_unavailable() -> None:
    devices = [
        {"machine_id": machine_id, "edge_node": "Line1", "device": device, "part_count": "Parts"}
        for machine_id, device in (("LATHE-1", "Lathe"), ("MILL-1", "Mill"))
    ]
    rules, wire = host(devices), Wire({"Parts": (DataType.UINT32, 1)})
    events = rules.receive(*wire.nbirth())
    events += rules.receive(*wire.dbirth("Lathe")) + rules.receive(*wire.dbirth("Mill"))
    assert [e.subject for e in events if e.data == {"availability": "AVAILABLE"}] == [
        "LATHE-1", "MILL-1",
    ]  # fmt: skip
    wire.seq += 1  # a message lost: the node is not trusted until it is born again
    assert rules.receive(*wire.ndata(T0 + 1, Parts=2)) == []
    assert rules.receive(*wire.ddeath("Mill")) == []  # not trusted: not read
    # The rebirth has no DBIRTH for the mill: once the node's next message says the births
    # are over, the mill is not there any more.
    events = rules.receive(*wire.nbirth()) + rules.receive(*wire.dbirth("Lathe"))
    assert "availability" not in dict(said(events))
    events = rules.receive(*wire.ndata(T0 + 2, Parts=3))
    lost = [e for e in events if e.subject == "MILL-1"]
    assert said(lost)[0] == ("availability", {"availability": "UNAVAILABLE"})
    assert "no DBIRTH after the NBIRTH bdSeq 0" in lost[1].data["message"]
    # Without any message after the births, time says it.
    rules.receive(*wire.nbirth())
    rules.receive(*wire.dbirth("Mill"))
    assert rules.tick() == []  # not yet
    events = rules.tick(time.monotonic() + BIRTHS_WAIT_S)
    assert (events[0].subject, events[0].data) == ("LATHE-1", {"availability": "UNAVAILABLE"})


def test_only_this_sessions_node_death_is_honoured() -> None:
    rules, wire = host(), Wire(STATE, bd_seq=0)
    rules.receive(*wire.nbirth())
    assert rules.take_rebirths() == []
    # A node that numbers its sessions anew after a restart: NBIRTH bdSeq 0 now, and a will
    # of a session long gone (bdSeq 17) delivered late. Ignored, and a rebirth checks.
    assert rules.receive(*wire.ndeath(17)) == []
    assert rules.take_rebirths() == ["Line1"]
    assert rules.receive(*wire.ndeath(17)) == []
    assert rules.take_rebirths() == ["Line1"]  # asked again at once: a death may be real
    # pysparkplug's clean disconnect: one ahead of its NBIRTH. Honoured.
    events = rules.receive(*wire.ndeath(1))
    assert said(events)[0] == ("availability", {"availability": "UNAVAILABLE"})
    assert events[1].data["message"] == (
        "Sparkplug edge node Plant1/Line1 is offline (NDEATH bdSeq 1)"
    )
    rules.receive(*wire.nbirth())
    assert said(rules.receive(*wire.ndeath(0)))[0] == ("availability",
                                                       {"availability": "UNAVAILABLE"})  # fmt: skip


def test_with_request_rebirth_false_a_mismatched_death_leaves_the_node_as_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters.machines.sparkplug")
    rules, wire = host(request_rebirth=False), Wire(STATE, bd_seq=4)
    rules.receive(*wire.nbirth())
    assert rules.receive(*wire.ndeath(17)) == []  # ignored: the machine stays AVAILABLE
    assert rules.take_rebirths() == []
    assert any("NDEATH bdSeq 17 ignored" in r.getMessage() for r in caplog.records)
    wire.seq += 1
    for n in range(5):  # a gap, then DATA: logged once, not once per message
        rules.receive(*wire.ndata(T0 + n, Parts=20 + n))
    waiting = [r for r in caplog.records if "waiting for its next birth" in r.getMessage()]
    assert len(waiting) == 1


def test_an_unreadable_or_unnumbered_death_is_checked_by_a_rebirth() -> None:
    rules, wire = host(), Wire(STATE)
    # No birth known: an NDEATH that cannot be read can only be the node's.
    events = rules.receive("spBv1.0/Plant1/NDEATH/Line1", b"\x0a\xff")
    assert ("availability", {"availability": "UNAVAILABLE"}) in said(events)
    rules.receive(*wire.nbirth())
    rules.take_rebirths()
    events = rules.receive("spBv1.0/Plant1/NDEATH/Line1", b"\x0a\xff")
    assert ("availability", {"availability": "UNAVAILABLE"}) not in said(events)
    assert len(warnings_of(events)) == 1
    assert rules.take_rebirths() == ["Line1"]
    rules.receive(*wire.nbirth())
    no_bd_seq = NDeath(timestamp=T0, bd_seq_metric=SpbMetric(
        timestamp=T0, name="other", datatype=DataType.INT64, value=0)).encode()  # fmt: skip
    assert rules.receive("spBv1.0/Plant1/NDEATH/Line1", no_bd_seq) == []
    assert rules.take_rebirths() == ["Line1"]


def test_garbage_and_undefined_aliases_are_reported_once_and_a_rebirth_asked() -> None:
    rules, wire = host(), Wire(STATE)
    rules.receive(*wire.nbirth())
    rules.take_rebirths()
    events: list[Any] = []
    for _ in range(5):
        events += rules.receive("spBv1.0/Plant1/NDATA/Line1", b"\x0a\xff\xff\xff")
    assert len(warnings_of(events)) == 1
    assert rules.take_rebirths() == ["Line1"]
    rules.receive(*wire.nbirth())
    events = []
    for _ in range(5):
        unknown = SpbMetric(timestamp=T0, name=None, alias=99, datatype=DataType.INT32, value=1)
        data = NData(timestamp=T0 + 1, seq=wire._next(), metrics=(unknown,)).encode()
        events += rules.receive("spBv1.0/Plant1/NDATA/Line1", data)
    assert warnings_of(events) == ["Line1: alias 99 was not defined by the birth"]
    assert rules.nodes["Line1"].rebirth_wanted  # sent once rebirth_interval_s has passed


def test_a_huge_payload_is_reported_without_being_read() -> None:
    rules, wire = host(), Wire(STATE)
    rules.receive(*wire.nbirth())
    huge = b"\x0a" + b"\xff" * MAX_PAYLOAD_BYTES
    (warning,) = warnings_of(rules.receive("spBv1.0/Plant1/NDATA/Line1", huge))
    assert f"{len(huge)} bytes, more than {MAX_PAYLOAD_BYTES} read" in warning
    # A long value in a wrong place: the message shows it cut.
    rules = host([{"machine_id": "PRESS-1", "edge_node": "Line1", "part_count": "Parts"}])
    wire = Wire({"Parts": (DataType.STRING, "x" * 100_000)})
    (warning,) = warnings_of(rules.receive(*wire.nbirth()))
    assert warning == f"Line1: metric 'Parts': a count, got '{'x' * 63}…"


# --- The MQTT side ---------------------------------------------------------------------------


async def test_reconnect_backoff_doubles_after_waiting_and_starts_again_after_a_session(
    broker: Broker, nodes: list[EdgeNode], started: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="adapters.machines.sparkplug")
    node = edge(nodes, broker)
    publisher = Recorder()
    run(started, SparkplugAdapter(config(broker, reconnect_max_s=1.0)), publisher)
    node.connect()
    await eventually(lambda: len(told(publisher)) == 3)

    def waits() -> list[tuple[float, float]]:
        """(when, seconds) of each "reconnecting in" the adapter logged."""
        found = [(r.created, r.getMessage()) for r in caplog.records]
        return [(t, float(m.split("reconnecting in ")[1].split()[0]))
                for t, m in found if "reconnecting in" in m]  # fmt: skip

    broker.kill()
    await eventually(lambda: len(waits()) >= 4)
    assert [seconds for _, seconds in waits()[:4]] == [0.25, 0.5, 1.0, 1.0]
    for (logged, seconds), (next_logged, _) in zip(waits(), waits()[1:], strict=False):
        assert next_logged - logged >= seconds - 0.01  # it waited before trying again
    broker.start()
    node.drop()
    node.connect()
    await eventually(lambda: ("availability", {"availability": "AVAILABLE"}) in told(publisher)[5:])
    seen = len(waits())
    broker.kill()  # the session brought messages: the backoff starts again
    await eventually(lambda: len(waits()) >= seen + 2)
    assert [seconds for _, seconds in waits()[seen : seen + 2]] == [0.25, 0.5]


async def test_messages_received_before_the_connection_closed_are_read() -> None:
    """amqtt keeps what it received in the session's queue: a closed connection must not
    throw it away (a fake client: the order of a close and a delivery cannot be forced on a
    real socket)."""

    class Transitions:
        def is_connected(self) -> bool:
            return False

    class Message:
        topic, data = "spBv1.0/Plant1/NDATA/Line1", bytearray(b"\x08\x01")

    class Session:
        transitions = Transitions()
        delivered_message_queue: asyncio.Queue[Message] = asyncio.Queue()

    class Client:
        session = Session()

    Client.session.delivered_message_queue.put_nowait(Message())
    adapter = SparkplugAdapter(config(Broker(port=1)))
    received = await adapter._receive(Client(), 0.1)  # type: ignore[arg-type]
    assert received is not None and (received.topic, received.data) == (Message.topic, b"\x08\x01")
    with pytest.raises(BrokerLost, match="closed the connection"):
        await adapter._receive(Client(), 0.1)  # type: ignore[arg-type]


async def test_host_state_will_on_a_failed_session_and_online_again_when_told_offline(
    broker: Broker, started: list[Running]
) -> None:
    from amqtt.client import MQTTClient

    watcher = MQTTClient(config={"auto_reconnect": False, "plugins": {}})
    await watcher.connect(f"mqtt://127.0.0.1:{broker.port}")
    await watcher.subscribe([("spBv1.0/STATE/mes-hub-1", 1)])
    states: list[dict[str, Any]] = []

    async def watch() -> None:
        while True:
            message = await watcher.deliver_message()
            states.append(json.loads(bytes(message.data)))

    watching = asyncio.create_task(watch())
    try:
        adapter = SparkplugAdapter(config(broker, host_id="mes-hub-1"))
        ticks = adapter.host.tick
        failed = False

        def tick_failing_once(now: float | None = None) -> list[Any]:
            nonlocal failed
            if not failed:
                failed = True
                raise RuntimeError("a bug in the session")  # the session fails, not stops
            return ticks(now)

        adapter.host.tick = tick_failing_once  # type: ignore[method-assign]
        running = run(started, adapter, Recorder())
        await eventually(lambda: len(states) >= 3)
        first, will, second = states[:3]
        # The will (no DISCONNECT was sent) carries the first connection's timestamp.
        assert (first["online"], will["online"], second["online"]) == (True, False, True)
        assert will["timestamp"] == first["timestamp"] < second["timestamp"]

        # Told offline for its own connection: it says online again, with the same timestamp.
        offline = {"online": False, "timestamp": second["timestamp"]}
        await watcher.publish("spBv1.0/STATE/mes-hub-1", json.dumps(offline).encode(), qos=1,
                              retain=True)  # fmt: skip
        await eventually(lambda: offline in states and states[-1] == second)
        told = states.index(offline)
        assert states[told + 1 :] == [second]
        await running.finish()
        await eventually(lambda: states[-1] == offline)  # said by the adapter on its stop
    finally:
        watching.cancel()
        await watcher.disconnect()


def test_the_amqtt_internals_the_adapter_relies_on_are_there() -> None:
    """amqtt 0.12 has no public way to pass credentials outside the URI (which it logs), to
    abort a connection so that the will is sent, or to read what was received once closed:
    the adapter uses these private names. A new amqtt without them fails here, clearly."""
    from amqtt.adapters import StreamWriterAdapter
    from amqtt.client import MQTTClient
    from amqtt.session import Session

    client = MQTTClient(config={"auto_reconnect": False, "plugins": {}})
    assert callable(client._init_session) and callable(client._do_connect)
    assert hasattr(client, "_handler")
    assert StreamWriterAdapter(writer=object())._writer is not None  # type: ignore[arg-type]
    session = Session()
    assert isinstance(session.delivered_message_queue, asyncio.Queue)
    assert hasattr(session, "transitions")
