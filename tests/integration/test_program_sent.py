"""``mes.machine.program_sent.v1`` through a real hub (embedded nats-server, ingest, SQLite
store, the views, the API): a DNC send is stored once with everything it said, an auditor finds
it in the machine's history and in the log by type, it changes none of the machine's figures,
a malformed one is dead-lettered with its reason and its bytes, the replay export gives it back,
and ``mes-hub contracts export`` writes a schema that takes it.

Worked example (docs/contract.md): lathe-7 runs from T0; at T0 - 3 min 58 s the DNC sender
starts sending O1234 from ``programs/O1234-rev-C.nc`` on /dev/ttyUSB0 and ends at T0 + 4 min,
all of it sent. The machine's state, timeline and OEE for T0..T0+1h are the same before and
after the send is stored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from typer.testing import CliRunner

from contracts import CloudEvent, encode_event
from hub.bootstrap import Hub
from hub.cli import app
from hub.exporting import ExportStats, Selection, exported_events
from hub.nats import DLQ_REASON_HEADER, DLQ_SEQ_HEADER
from tests.conftest import T0, api_client, api_key, cloud_event, eventually
from tests.unit.test_contracts import PROGRAM_SENT

TYPE = "mes.machine.program_sent.v1"
SENDER = "urn:mes-hub:dnc:cell-3-pc"
WINDOW = {"from": T0.isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()}


def program_sent(**data: Any) -> CloudEvent:
    event = cloud_event(TYPE, "lathe-7", {**PROGRAM_SENT, **data}, at=timedelta(minutes=4))
    return event.model_copy(update={"source": SENDER})


def as_json(event: CloudEvent) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(encode_event(event))
    return found


@pytest.fixture
async def http(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hub) as client:
        yield client


async def get(http: httpx.AsyncClient, role: str, path: str, **params: Any) -> Any:
    answer = await http.get(
        path, params=params, headers={"Authorization": f"Bearer {api_key(role)}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def figures(http: httpx.AsyncClient) -> list[Any]:
    """What the plant sees of lathe-7: its state, its timeline and its OEE in the window. (Not
    the machine's version: it counts the facts stored about the machine, the send one of them.)"""
    machine = await get(http, "viewer", "/api/v1/machines/lathe-7")
    del machine["version"]
    return [
        machine,
        await get(http, "viewer", "/api/v1/machines/lathe-7/timeline", **WINDOW),
        await get(http, "viewer", "/api/v1/oee", machine="lathe-7", **WINDOW),
    ]


async def test_a_program_sent_is_stored_once_in_the_audit_history_and_changes_no_figure(
    hub: Hub, http: httpx.AsyncClient
) -> None:
    running = cloud_event("mes.machine.execution.v1", "lathe-7", {"execution": "ACTIVE"})
    await hub.publisher.publish(running)
    await eventually(lambda: hub.ingest_stats().applied == 1)
    await hub.wait_caught_up()
    before = await figures(http)

    sent = program_sent()
    first = await hub.publisher.publish(sent)
    # Published again after NATS' duplicate window (no Nats-Msg-Id): the store drops it.
    await hub.jetstream.publish(first.subject, encode_event(sent))
    await eventually(lambda: hub.ingest_stats().duplicates == 1)
    await hub.wait_caught_up()
    assert hub.ingest_stats().applied == 2

    history = await get(http, "auditor", "/api/v1/audit/machines/lathe-7/history")
    assert [e["type"] for e in history["events"]] == [
        "registered",
        "mes.machine.execution.v1",
        TYPE,
    ]
    entry = history["events"][-1]
    assert (entry["event_id"], entry["source"], entry["subject"]) == (sent.id, SENDER, "lathe-7")
    assert entry["event_time"] == as_json(sent)["time"]
    assert entry["actor"] == {"kind": "adapter", "id": SENDER, "role": "machine"}
    stored = {k: v for k, v in entry["data"].items() if v is not None}
    assert stored == as_json(sent)["data"]
    by_type = await get(http, "auditor", "/api/v1/audit/events", type=TYPE)
    assert [e["event_id"] for e in by_type["events"]] == [sent.id]

    assert await figures(http) == before


async def test_a_malformed_program_sent_is_dead_lettered_with_its_reason_and_bytes(
    hub: Hub,
) -> None:
    dead = await hub.nats.subscribe("mes.dlq.>")
    good = encode_event(program_sent())
    size = PROGRAM_SENT["size_bytes"]
    # "completed" with 40 bytes of the program sent: a sender's bug, not a fact to keep.
    body = good.replace(f'"sent_bytes":{size}'.encode(), b'"sent_bytes":40')
    assert body != good
    subject = "mes.default.machine.lathe-7.program_sent"
    ack = await hub.jetstream.publish(subject, body)
    letter = await dead.next_msg(timeout=20)
    assert letter.subject == "mes.dlq." + subject
    assert letter.data == body
    headers = letter.headers or {}
    assert "data.outcome" in headers[DLQ_REASON_HEADER]
    assert "'completed' needs sent_bytes == size_bytes" in headers[DLQ_REASON_HEADER]
    assert headers[DLQ_SEQ_HEADER] == str(ack.seq)
    # The hub goes on: the correct one is stored.
    await hub.publisher.publish(program_sent(sent_bytes=40, outcome="cancelled"))
    await eventually(lambda: hub.ingest_stats().applied == 1)
    assert hub.ingest_stats().rejected == 1


async def test_the_replay_export_gives_back_the_program_sent(hub: Hub, tmp_path: Path) -> None:
    sent = program_sent(
        sent_bytes=12,
        outcome="failed",
        message="no XON for 30 s after XOFF; the control holds the first 12 bytes of O1234",
    )
    await hub.publisher.publish(sent)
    await eventually(lambda: hub.ingest_stats().applied == 1)
    exported = [e for e in exported_events(hub.store, Selection(), ExportStats()) if e.type == TYPE]
    assert len(exported) == 1
    again = as_json(exported[0])
    assert {k: again[k] for k in ("id", "source", "type", "time", "subject", "data")} == {
        k: as_json(sent)[k] for k in ("id", "source", "type", "time", "subject", "data")
    }
    # And ``mes-hub contracts export`` writes the schema an integrator validates it with.
    said = CliRunner().invoke(app, ["contracts", "export", str(tmp_path)])
    assert said.exit_code == 0, said.output
    schema = json.loads((tmp_path / f"{TYPE}.schema.json").read_text())
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(again)


async def test_the_api_takes_a_program_sent_from_an_admin_and_refuses_a_broken_one(
    hub: Hub, http: httpx.AsyncClient
) -> None:
    async def post(role: str, event: dict[str, Any]) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {api_key(role)}",
            "Content-Type": "application/cloudevents+json",
        }
        return await http.post("/api/v1/events", content=json.dumps(event), headers=headers)

    sent = as_json(program_sent())
    late_start = {**sent, "data": {**sent["data"], "started_at": "2026-03-02T06:05:00Z"}}
    refused = await post("admin", late_start)
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"][0]["field"] == "data.started_at"
    assert "after the CloudEvent time" in refused.json()["detail"]
    # A machine fact: an operator's tablet may not send it.
    assert (await post("operator", sent)).status_code == 403
    assert (await post("admin", sent)).status_code == 202
    await eventually(lambda: hub.ingest_stats().applied == 1)
    await hub.wait_caught_up()
    history = await get(http, "auditor", "/api/v1/audit/machines/lathe-7/history")
    (entry,) = [e for e in history["events"] if e["type"] == TYPE]
    assert entry["actor"]["role"] == "admin" and entry["event_id"] == sent["id"]
