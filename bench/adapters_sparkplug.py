"""Sparkplug B benchmark: messages per second through the real adapter against a bare MQTT
subscriber decoding the same messages.

A real broker (amqtt's, in its own process) and an edge node (``tests/sparkplug_peer.py``,
paho-mqtt with pysparkplug payloads) publishing NDATA as fast as it can, every message a new
part count and every tenth a change of ``Running``, so nearly every message makes an event.

1. Baseline: an amqtt client subscribed to the group, decoding every payload with the adapter's
   decoder (``decode_payload``): the transport and the parsing, no session rules, no events.
2. Adapter: ``SparkplugAdapter.run`` on the same broker and node, publishing into a counting
   publisher that validates like the real one (NATS is not measured).

    .venv/bin/python bench/adapters_sparkplug.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pysparkplug import DataType  # noqa: E402

from adapters.machines.sparkplug import SparkplugAdapter, SparkplugConfig  # noqa: E402
from adapters.machines.sparkplug_payload import decode_payload  # noqa: E402
from bench.adapters import Counting  # noqa: E402
from contracts import CloudEvent  # noqa: E402
from tests.sparkplug_peer import Broker, EdgeNode  # noqa: E402

GROUP = "Bench"


class Producer:
    """The edge node's machine, changing as fast as the node can publish, in a thread."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        parts = self.node.tags[None]["Parts"].value
        while not self.stop.is_set():
            parts += 1
            changes: dict[str, Any] = {"Parts": parts}
            if parts % 10 == 0:
                changes["Running"] = parts % 20 == 0
            self.node.set_metrics(changes)
            if parts % 200 == 0:
                time.sleep(0.001)  # let paho's network thread drain its queue

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


async def baseline(broker: Broker, node: EdgeNode, seconds: float) -> float:
    from amqtt.client import MQTTClient

    client = MQTTClient(config={"auto_reconnect": False, "plugins": {}})
    await client.connect(f"mqtt://127.0.0.1:{broker.port}")
    await client.subscribe([(f"spBv1.0/{GROUP}/#", 1)])
    received = 0
    with Producer(node):
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            try:
                message = await client.deliver_message(timeout_duration=0.5)
            except TimeoutError:
                continue
            decode_payload(bytes(message.data))
            received += 1
    # amqtt's disconnect can wait on the messages still queued for us: do not wait for it.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 2)
    return received / elapsed


async def adapter(
    broker: Broker, node: EdgeNode, seconds: float
) -> tuple[float, int, dict[str, int]]:
    """Messages per second the adapter took (in sequence, from a trusted node: a message it
    ignores, after a seq gap or as a duplicate, is not counted), the events, and what it saw:
    ``ignored`` messages, seq ``gaps`` and the ``rebirths`` the node was asked for."""
    config = SparkplugConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": broker.port,
            "group_id": GROUP,
            "machines": [
                {
                    "machine_id": "BENCH-1",
                    "edge_node": node.node,
                    "execution": {"metric": "Running"},
                    "part_count": "Parts",
                }
            ],
        }
    )
    sparkplug = SparkplugAdapter(config)
    received = 0
    seen = {"ignored": 0, "gaps": 0}
    receive = sparkplug.host.receive
    session = sparkplug.host.nodes[node.node]

    def counted(topic: str, data: bytes, now: Any = None) -> list[CloudEvent]:
        nonlocal received
        was_trusted, was_seq = session.born, session.seq
        events = receive(topic, data, now)
        if session.born and session.seq != was_seq:
            received += 1  # taken: in sequence from a trusted node
        else:
            seen["ignored"] += 1
        if was_trusted and not session.born:
            seen["gaps"] += 1
        return events

    sparkplug.host.receive = counted  # type: ignore[method-assign]
    publisher, stop = Counting(), asyncio.Event()
    task = asyncio.create_task(sparkplug.run(publisher, stop))
    while publisher.count == 0:  # connected, asked for a rebirth, read the births
        await asyncio.sleep(0.05)
    events_before, received = publisher.count, 0
    seen.update(ignored=0, gaps=0)
    rebirths_before = node.rebirth_requests
    with Producer(node):
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        messages, events = received, publisher.count - events_before
        seen["rebirths"] = node.rebirth_requests - rebirths_before
    stop.set()
    await task
    return messages / elapsed, events, seen


async def measure(seconds: float) -> dict[str, object]:
    async def on_a_fresh_broker(phase: Any) -> Any:
        # Each phase its own broker and edge node: no backlog of the other phase in them.
        broker = Broker()
        broker.start()
        node = EdgeNode(
            broker.port,
            group=GROUP,
            metrics={"Running": (DataType.BOOLEAN, False), "Parts": (DataType.UINT64, 0)},
        )
        try:
            node.connect()
            return await phase(broker, node, seconds)
        finally:
            node.close()
            broker.kill()

    baseline_per_s = await on_a_fresh_broker(baseline)
    adapter_per_s, events, seen = await on_a_fresh_broker(adapter)
    return {
        "protocol": "sparkplug",
        "unit": "messages",
        "baseline_per_s": round(baseline_per_s, 1),
        "adapter_per_s": round(adapter_per_s, 1),
        "events": events,
        "events_per_s": round(events / seconds, 1),
        "note": (
            "NDATA from a paho/pysparkplug edge node through amqtt's broker (a separate "
            "process, same 2 cores); baseline = amqtt subscriber + decode_payload; the broker "
            "and the producer share the machine, so both figures are bounded by them too; "
            f"adapter_per_s counts messages taken (in sequence), not the {seen['ignored']} "
            f"ignored; seq gaps seen: {seen['gaps']}, rebirths asked: {seen['rebirths']}"
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    print(asyncio.run(measure(parser.parse_args().seconds)))
