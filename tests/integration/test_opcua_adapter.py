"""The OPC UA adapter against a real asyncua server on loopback, loaded with the OPC 40501
nodesets and the "SampleMachineTool" example instance from ../shared/fixtures/opcua."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import Node, Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.opcua import OpcuaAdapter, OpcuaConfig
from contracts import ValidatedEvent
from hub.ports import InMemoryPublisher
from tests.conftest import eventually, fixtures_dir
from tests.counting import stored_parts

NODESETS = (
    "Opc.Ua.Di.NodeSet2.xml",
    "Opc.Ua.IA.NodeSet2.xml",
    "Opc.Ua.Machinery.NodeSet2.xml",
    "Opc.Ua.MachineTool.NodeSet2.xml",
    "Machinetool-Example.xml",
)
MT_URI = "http://opcfoundation.org/UA/MachineTool/"
MACHINERY_URI = "http://opcfoundation.org/UA/Machinery/"
EXAMPLE_URI = "http://yourorganisation.org/MachineTool-Example/"
T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
MACHINE = "MT-1"


def nodeset_dir() -> Path:
    root = fixtures_dir()
    folder = root / "opcua" if root is not None else None
    if folder is None or not all((folder / name).is_file() for name in NODESETS):
        pytest.skip(
            "OPC 40501 nodesets not found: ../shared/fixtures/opcua beside the repository "
            "(see its SOURCE.txt) holds them"
        )
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MachineToolServer:
    server: Server
    endpoint: str
    mt: int
    ex: int
    machine: Node
    path_uri: list[str]  # SampleMachineTool as "<namespace uri>:<name>" from Objects
    path_index: list[str]  # the same as "<namespace index>:<name>"

    async def find(self, *names: str, start: Node | None = None) -> Node:
        node = start or self.machine
        for name in names:
            for child in await node.get_children():
                if (await child.read_browse_name()).Name == name:
                    node = child
                    break
            else:
                raise LookupError(f"no {name} under {node}")
        return node

    async def write(
        self, node: Node, value: Any, vtype: ua.VariantType, at: datetime | None = None
    ) -> datetime:
        at = at or datetime.now(UTC)
        # The server stamps its own ServerTimestamp; the event time must be the source's.
        await node.write_value(ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=at))
        return at

    async def write_bad(self, node: Node) -> None:
        # A Bad status nulls the value (as a server does when its PLC is gone); it also lets
        # the next write change the value's type, which is how the tests send a wrong type.
        await node.write_value(
            ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadCommunicationError))
        )

    def config(self, **overrides: Any) -> OpcuaConfig:
        values: dict[str, Any] = {
            "machine_id": MACHINE,
            "endpoint": self.endpoint,
            "browse_path": self.path_uri,
            "publishing_interval_ms": 50,
            "reconnect_max_s": 0.5,
        }
        return OpcuaConfig(**(values | overrides))


async def build_server(
    *,
    statistics: bool = True,
    messages: bool = True,
    plan: bool = False,
    secure: Callable[[Server], Awaitable[None]] | None = None,
) -> MachineToolServer:
    folder = nodeset_dir()
    server = Server()
    await server.init()
    if secure is not None:
        await secure(server)  # before the first start, which fixes the endpoints
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    for name in NODESETS:
        await server.import_xml(str(folder / name))
    mt = await server.get_namespace_index(MT_URI)
    ex = await server.get_namespace_index(EXAMPLE_URI)
    machinery = await server.get_namespace_index(MACHINERY_URI)
    # Find the example instance by browsing, as an integrator would.
    machines = await server.nodes.objects.get_child(f"{machinery}:Machines")
    machine = await machines.get_child(f"{ex}:SampleMachineTool")
    tool = MachineToolServer(
        server,
        endpoint,
        mt,
        ex,
        machine,
        [f"{MACHINERY_URI}:Machines", f"{EXAMPLE_URI}:SampleMachineTool"],
        [f"{machinery}:Machines", f"{ex}:SampleMachineTool"],
    )
    production = await tool.find("Production")
    # The example has neither Statistics nor Notification/Messages; real machines do.
    if statistics:
        stats = await production.add_object(ua.NodeId(0, ex), ua.QualifiedName("Statistics", mt))
        # Typed as the abstract Number (a loosely typed server), so that a test can send a
        # value of the wrong type: asyncua refuses those for built-in types like UInt32.
        await stats.add_variable(
            ua.NodeId(0, ex),
            ua.QualifiedName("PartsProducedInLifetime", mt),
            ua.Variant(0, ua.VariantType.UInt32),
            datatype=ua.NodeId(ua.ObjectIds.Number),
        )
        await tool.write(
            await tool.find("Production", "Statistics", "PartsProducedInLifetime"),
            0,
            ua.VariantType.UInt32,
            T0,
        )
    if messages:
        notification = await tool.find("Notification")
        box = await notification.add_object(
            ua.NodeId(0, ex), ua.QualifiedName("Messages", mt), objecttype=ua.NodeId(38, mt)
        )
        await box.write_attribute(
            ua.AttributeIds.EventNotifier, ua.DataValue(ua.Variant(1, ua.VariantType.Byte))
        )
    if plan:
        jobs = await production.add_object(ua.NodeId(0, ex), ua.QualifiedName("ProductionPlan", mt))
        await add_job(tool, jobs, "Job1", 0, "Ended", 2, completed=10, good=9)
        await add_job(tool, jobs, "Job2", 1, "Running", 1, completed=3, good=2)
    # The example's values, stamped T0 (the import stamps them "now"), so event times and ids
    # in the tests follow from what each test writes.
    for path, value, vtype in (
        (("Monitoring", "Channel1", "ChannelState"), 0, ua.VariantType.Int32),
        (("Monitoring", "Channel1", "ChannelMode"), 0, ua.VariantType.Int32),
        (("Monitoring", "MachineTool", "OperationMode"), 1, ua.VariantType.Int32),
        (("Production", "ActiveProgram", "Name"), "Sample.nc", ua.VariantType.String),
        (
            ("Production", "ActiveProgram", "State", "CurrentState"),
            ua.LocalizedText("running", "en"),
            ua.VariantType.LocalizedText,
        ),
        (
            ("Production", "ActiveProgram", "State", "CurrentState", "Number"),
            1,
            ua.VariantType.UInt32,
        ),
    ):
        await tool.write(await tool.find(*path), value, vtype, T0)
    await server.start()
    return tool


async def add_job(
    tool: MachineToolServer,
    plan: Node,
    name: str,
    place: int,
    state: str,
    number: int,
    *,
    completed: int,
    good: int,
) -> Node:
    mt, ex = tool.mt, tool.ex
    job = await plan.add_object(ua.NodeId(0, ex), ua.QualifiedName(name, ex))
    await job.add_property(
        ua.NodeId(0, ex),
        ua.QualifiedName("NumberInList", 0),
        ua.Variant(place, ua.VariantType.UInt16),
    )
    for counter, value in (("PartsCompleted", completed), ("PartsGood", good)):
        await job.add_variable(
            ua.NodeId(0, ex),
            ua.QualifiedName(counter, mt),
            ua.Variant(value, ua.VariantType.UInt32),
        )
    machine = await job.add_object(ua.NodeId(0, ex), ua.QualifiedName("State", mt))
    current = await machine.add_variable(
        ua.NodeId(0, ex),
        ua.QualifiedName("CurrentState", 0),
        ua.Variant(ua.LocalizedText(state, "en"), ua.VariantType.LocalizedText),
    )
    await current.add_property(
        ua.NodeId(0, ex), ua.QualifiedName("Number", 0), ua.Variant(number, ua.VariantType.UInt32)
    )
    return job


async def stop_server(server: Server) -> None:
    # Server.stop() waits for its clock task to wake up (it sleeps a second at a time).
    clock = server.iserver.time_task
    if clock is not None:
        clock.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await clock
        server.iserver.time_task = None
    await server.stop()


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[MachineToolServer]:
    tool = await build_server(**options)
    try:
        yield tool
    finally:
        await stop_server(tool.server)


@contextlib.asynccontextmanager
async def running(adapter: OpcuaAdapter, publisher: Any) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(publisher, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def of(publisher: InMemoryPublisher, kind: str) -> list[ValidatedEvent]:
    return [e for _, e in publisher.published if e.event_type.kind == kind]


def data(events: list[ValidatedEvent]) -> list[dict[str, Any]]:
    return [e.data.model_dump(exclude_none=True, mode="json") for e in events]


async def until(check: Callable[[], bool]) -> None:
    await eventually(check, timeout=15)


def test_the_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = OpcuaAdapter(
        OpcuaConfig(machine_id="M", endpoint="opc.tcp://h:4840/", browse_path=["0:x"])
    )
    assert adapter.protocol == "opcua"


async def test_run_publishes_changes_with_source_timestamps_and_only_changes() -> None:
    async with serving() as tool:
        publisher = InMemoryPublisher()
        adapter = OpcuaAdapter(tool.config())
        state = await tool.find("Monitoring", "Channel1", "ChannelState")
        name = await tool.find("Production", "ActiveProgram", "Name")
        lifetime = await tool.find("Production", "Statistics", "PartsProducedInLifetime")
        async with running(adapter, publisher):
            await until(lambda: len(of(publisher, "partcount")) == 1)
            assert data(of(publisher, "availability")) == [{"availability": "AVAILABLE"}]
            # The example: Channel1 Active in Automatic, Sample.nc running; the counter at 0.
            assert data(of(publisher, "execution")) == [
                {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "Sample.nc"}
            ]
            assert data(of(publisher, "partcount")) == [{"count": 0, "kind": "all"}]
            assert of(publisher, "partcount")[0].envelope.time == T0

            t1 = await tool.write(state, 1, ua.VariantType.Int32, T0 + timedelta(seconds=1))
            t2 = await tool.write(
                name, "O1234.nc", ua.VariantType.String, T0 + timedelta(seconds=2)
            )
            t3 = await tool.write(lifetime, 1, ua.VariantType.UInt32, T0 + timedelta(seconds=3))
            t4 = await tool.write(lifetime, 2, ua.VariantType.UInt32, T0 + timedelta(seconds=4))
            await until(lambda: len(of(publisher, "partcount")) == 3)
            await until(lambda: len(of(publisher, "execution")) == 3)
            executions = of(publisher, "execution")
            assert data(executions[1:]) == [
                {"execution": "INTERRUPTED", "mode": "AUTOMATIC", "program": "Sample.nc"},
                {"execution": "INTERRUPTED", "mode": "AUTOMATIC", "program": "O1234.nc"},
            ]
            assert [e.envelope.time for e in executions[1:]] == [t1, t2]
            counts = of(publisher, "partcount")
            assert data(counts[1:]) == [{"count": 1, "kind": "all"}, {"count": 2, "kind": "all"}]
            assert [e.envelope.time for e in counts[1:]] == [t3, t4]

            # A re-read of the same values gives the same ids (dropped downstream as duplicates).
            again = {e.type: e for e in await OpcuaAdapter(tool.config()).check()}
            assert again["mes.machine.execution.v1"].id == executions[-1].id
            assert again["mes.machine.partcount.v1"].id == counts[-1].id

            # The same values again (newer timestamps), then one real change as a marker.
            before = len(publisher.published)
            await tool.write(state, 1, ua.VariantType.Int32, T0 + timedelta(seconds=5))
            await tool.write(name, "O1234.nc", ua.VariantType.String, T0 + timedelta(seconds=5))
            await tool.write(lifetime, 2, ua.VariantType.UInt32, T0 + timedelta(seconds=5))
            t6 = await tool.write(state, 0, ua.VariantType.Int32, T0 + timedelta(seconds=6))
            await until(lambda: len(publisher.published) > before)
            await asyncio.sleep(0.3)  # room for anything else the repeats might have caused
            new = [e for _, e in publisher.published[before:]]
            assert data(new) == [
                {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O1234.nc"}
            ]
            assert new[0].envelope.time == t6


async def test_notification_alerts_and_messages_become_conditions() -> None:
    async with serving() as tool:
        publisher = InMemoryPublisher()
        adapter = OpcuaAdapter(tool.config())
        box = await tool.find("Notification", "Messages")
        async with running(adapter, publisher):
            await until(lambda: len(of(publisher, "execution")) == 1)
            alarm = await tool.server.get_event_generator(ua.NodeId(39, tool.mt), box)  # AlertType
            # The test server only sends typed fields; ErrorCode has no default to type it.
            alarm.event.add_property("ErrorCode", "E1010", ua.VariantType.String)
            alarm.event.Severity = 800
            setattr(alarm.event, "ActiveState/Id", True)
            alarm.event.Retain = True
            raised = T0 + timedelta(minutes=1)
            await alarm.trigger(time_attr=raised, message="SPINDLE OVERLOAD")
            await until(lambda: len(of(publisher, "condition")) == 1)
            setattr(alarm.event, "ActiveState/Id", False)
            alarm.event.Retain = False
            await alarm.trigger(time_attr=raised + timedelta(minutes=2), message="SPINDLE OVERLOAD")
            # A message (NotificationEventType) of medium severity.
            note = await tool.server.get_event_generator(ua.NodeId(35, tool.mt), box)
            note.event.add_property("Identifier", "TOOL-LIFE-7", ua.VariantType.String)
            note.event.Severity = 300
            await note.trigger(time_attr=raised + timedelta(minutes=3), message="Tool 7 at 90 %")
            await until(lambda: len(of(publisher, "condition")) == 3)
            conditions = of(publisher, "condition")
            assert data(conditions) == [
                {"level": "fault", "native_code": "E1010", "message": "SPINDLE OVERLOAD"},
                {"level": "normal", "native_code": "E1010", "message": "SPINDLE OVERLOAD"},
                {"level": "warning", "native_code": "TOOL-LIFE-7", "message": "Tool 7 at 90 %"},
            ]
            assert [c.envelope.time for c in conditions] == [
                raised,
                raised + timedelta(minutes=2),
                raised + timedelta(minutes=3),
            ]


async def test_production_plan_jobs_count_parts_without_a_lifetime_counter() -> None:
    async with serving(statistics=False, plan=True) as tool:
        publisher = InMemoryPublisher()
        adapter = OpcuaAdapter(tool.config(plan_rebrowse_s=0.2))
        plan = await tool.find("Production", "ProductionPlan")
        job2 = await tool.find("Job2", start=plan)
        async with running(adapter, publisher):
            # Job2 is the running one: all = its PartsCompleted, bad = completed - good.
            await until(lambda: len(of(publisher, "partcount")) == 2)
            assert sorted(data(of(publisher, "partcount")), key=lambda d: d["kind"]) == [
                {"count": 3, "kind": "all"},
                {"count": 1, "kind": "bad"},
            ]
            completed = await tool.find("PartsCompleted", start=job2)
            good = await tool.find("PartsGood", start=job2)
            at = await tool.write(completed, 4, ua.VariantType.UInt32, T0 + timedelta(seconds=1))
            await until(lambda: len(of(publisher, "partcount")) == 4)
            assert data(of(publisher, "partcount")[2:]) == [
                {"count": 4, "kind": "all"},
                {"count": 2, "kind": "bad"},
            ]
            assert of(publisher, "partcount")[2].envelope.time == at
            # Inconsistent counters are reported, not published.
            await tool.write(good, 9, ua.VariantType.UInt32, T0 + timedelta(seconds=2))
            await until(
                lambda: any(
                    "PartsGood 9 > PartsCompleted 4" in (c.get("message") or "")
                    for c in data(of(publisher, "condition"))
                ),
            )
            assert len(of(publisher, "partcount")) == 4
            # A job added later is found by browsing again; once it runs, it is the one counted
            # (the drop to its 0 is a counter reset for the hub).
            job3 = await add_job(tool, plan, "Job3", 2, "Initializing", 0, completed=0, good=0)
            await tool.write(
                await tool.find("State", "CurrentState", start=job2),
                ua.LocalizedText("Ended", "en"),
                ua.VariantType.LocalizedText,
            )
            await tool.write(
                await tool.find("State", "CurrentState", "Number", start=job2),
                2,
                ua.VariantType.UInt32,
            )
            # Usually a rebrowse finds Job3 before it starts; found running, it counts the same.
            await asyncio.sleep(0.5)
            await tool.write(
                await tool.find("State", "CurrentState", "Number", start=job3),
                1,
                ua.VariantType.UInt32,
            )
            await until(lambda: {"count": 0, "kind": "all"} in data(of(publisher, "partcount")))
            started = len(of(publisher, "partcount"))
            await tool.write(
                await tool.find("PartsCompleted", start=job3), 1, ua.VariantType.UInt32
            )
            await until(lambda: len(of(publisher, "partcount")) == started + 2)
            assert data(of(publisher, "partcount")[started:]) == [
                {"count": 1, "kind": "all"},
                {"count": 1, "kind": "bad"},
            ]


async def test_end_to_end_through_the_hub(hub: Any) -> None:
    async with serving() as tool:
        adapter = OpcuaAdapter(tool.config())
        state = await tool.find("Monitoring", "Channel1", "ChannelState")
        lifetime = await tool.find("Production", "Statistics", "PartsProducedInLifetime")
        site = hub.settings.site

        async def machine_is(execution: str, parts: int) -> bool:
            await hub.wait_caught_up()
            machine = hub.store.machine(site, MACHINE)
            return (
                machine is not None
                and machine.execution == execution
                and stored_parts(hub.store, site, MACHINE) == parts
            )

        async with running(adapter, hub.publisher):
            await eventually(lambda: machine_is("ACTIVE", 0))
            for count in range(1, 6):
                await tool.write(
                    lifetime, count, ua.VariantType.UInt32, T0 + timedelta(seconds=count)
                )
            await tool.write(state, 1, ua.VariantType.Int32, T0 + timedelta(seconds=10))
            await eventually(lambda: machine_is("INTERRUPTED", 5))
        machine = hub.store.machine(site, MACHINE)
        assert machine.availability == "AVAILABLE"
        assert machine.program == "Sample.nc"
        assert machine.mode == "AUTOMATIC"


async def test_basic256sha256_with_certificates(tmp_path: Path) -> None:
    pki, trusted = tmp_path / "pki", tmp_path / "pki" / "trusted"
    trusted.mkdir(parents=True)
    server_cert, server_key = pki / "server-cert.der", pki / "server-key.pem"
    await setup_self_signed_certificate(
        server_key,
        server_cert,
        "urn:mes-hub:test:server",
        "127.0.0.1",
        [ExtendedKeyUsageOID.SERVER_AUTH],
        {"commonName": "test server"},
    )
    client_certs = {}
    for name in ("trusted", "stranger"):
        cert, key = pki / f"{name}-cert.der", pki / f"{name}-key.pem"
        await setup_self_signed_certificate(
            key,
            cert,
            f"urn:mes-hub:test:{name}",
            socket.gethostname(),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            {"commonName": f"mes-hub {name}"},
        )
        client_certs[name] = (cert, key)
    shutil.copy(client_certs["trusted"][0], trusted / "mes-hub.der")

    async def secure_only(server: Server) -> None:
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        await server.set_application_uri("urn:mes-hub:test:server")
        await server.load_certificate(str(server_cert))
        await server.load_private_key(str(server_key))
        store = TrustStore([trusted], [])
        await store.load()
        # Checks our certificate's time, URI (= our ApplicationUri), key usage and trust.
        options = CertificateValidatorOptions.TRUSTED_VALIDATION
        server.set_certificate_validator(
            CertificateValidator(options | CertificateValidatorOptions.PEER_CLIENT, store)
        )

    tool = await build_server(secure=secure_only)
    try:
        secure = {"security_policy": "Basic256Sha256", "server_certificate": server_cert}
        publisher = InMemoryPublisher()
        cert, key = client_certs["trusted"]
        adapter = OpcuaAdapter(tool.config(certificate=cert, private_key=key, **secure))
        async with running(adapter, publisher):
            await until(lambda: len(of(publisher, "execution")) == 1)
            assert data(of(publisher, "availability")) == [{"availability": "AVAILABLE"}]

        # Without security, or with a certificate the server does not trust: no connection.
        for config in (
            tool.config(),
            tool.config(
                certificate=client_certs["stranger"][0],
                private_key=client_certs["stranger"][1],
                **secure,
            ),
        ):
            refused = InMemoryPublisher()
            async with running(OpcuaAdapter(config), refused) as task:
                await until(lambda: len(of(refused, "condition")) == 1)
                assert not task.done()
            assert data(of(refused, "availability")) == [{"availability": "UNAVAILABLE"}]
            assert of(refused, "condition")[0].data.native_code == CONNECTION_CODE
            assert of(refused, "execution") == []
    finally:
        await stop_server(tool.server)


async def test_connection_loss_publishes_unavailable_once_and_reconnects() -> None:
    async with serving() as tool:
        publisher = InMemoryPublisher()
        adapter = OpcuaAdapter(tool.config(reconnect_max_s=0.2))
        state = await tool.find("Monitoring", "Channel1", "ChannelState")
        async with running(adapter, publisher):
            await until(lambda: len(of(publisher, "execution")) == 1)
            await stop_server(tool.server)
            await until(lambda: len(of(publisher, "availability")) == 2)
            await asyncio.sleep(0.6)  # failed reconnects meanwhile (every 0.2 s)
            # What changes while we are away is published once we are back.
            changed = await tool.write(state, 2, ua.VariantType.Int32, T0 + timedelta(minutes=1))
            await tool.server.start()
            await until(lambda: len(of(publisher, "availability")) == 3)
            await until(lambda: len(of(publisher, "execution")) == 2)
        assert data(of(publisher, "availability")) == [
            {"availability": "AVAILABLE"},
            {"availability": "UNAVAILABLE"},
            {"availability": "AVAILABLE"},
        ]
        assert [(c["level"], c["native_code"]) for c in data(of(publisher, "condition"))] == [
            ("unavailable", CONNECTION_CODE),
            ("normal", CONNECTION_CODE),
        ]
        execution = of(publisher, "execution")[-1]
        assert execution.data.execution == "READY"
        assert execution.envelope.time == changed


async def test_missing_browse_path_is_reported_and_retried() -> None:
    async with serving() as tool:
        publisher = InMemoryPublisher()
        path = [tool.path_uri[0], f"{EXAMPLE_URI}:LateMachine"]
        adapter = OpcuaAdapter(tool.config(browse_path=path, reconnect_max_s=0.2))
        async with running(adapter, publisher) as task:
            await until(lambda: len(of(publisher, "condition")) == 1)
            condition = of(publisher, "condition")[0].data
            assert condition.level == "warning"
            assert condition.native_code == BAD_INPUT_CODE
            assert "LateMachine" in condition.message and "SampleMachineTool" in condition.message
            assert data(of(publisher, "availability")) == [{"availability": "UNAVAILABLE"}]
            await asyncio.sleep(0.6)  # retries (every 0.2 s) meanwhile report nothing new
            assert len(of(publisher, "condition")) == 1
            assert not task.done()
            # The machine appears on the server: the next retry finds it.
            machines = await tool.machine.get_parent()
            late = await machines.add_object(
                ua.NodeId(0, tool.ex), ua.QualifiedName("LateMachine", tool.ex)
            )
            monitoring = await late.add_object(
                ua.NodeId(0, tool.ex), ua.QualifiedName("Monitoring", tool.mt)
            )
            channel = await monitoring.add_object(
                ua.NodeId(0, tool.ex), ua.QualifiedName("Channel1", tool.ex)
            )
            await channel.add_variable(
                ua.NodeId(0, tool.ex),
                ua.QualifiedName("ChannelState", tool.mt),
                ua.Variant(2, ua.VariantType.Int32),
            )
            await until(lambda: len(of(publisher, "execution")) == 1)
        assert data(of(publisher, "execution")) == [{"execution": "READY"}]
        assert data(of(publisher, "availability"))[-1] == {"availability": "AVAILABLE"}
        assert data(of(publisher, "condition"))[-1] == {
            "level": "normal",
            "native_code": BAD_INPUT_CODE,
        }


async def test_wrong_values_are_reported_and_the_adapter_goes_on() -> None:
    async with serving() as tool:
        publisher = InMemoryPublisher()
        adapter = OpcuaAdapter(tool.config())
        state = await tool.find("Monitoring", "Channel1", "ChannelState")
        lifetime = await tool.find("Production", "Statistics", "PartsProducedInLifetime")
        async with running(adapter, publisher) as task:
            await until(lambda: len(of(publisher, "execution")) == 1)
            # Bad status: the channel's state is unknown, so is the machine's execution.
            await tool.write_bad(state)
            await until(lambda: len(of(publisher, "execution")) == 2)
            assert of(publisher, "execution")[-1].data.execution == "UNAVAILABLE"
            await tool.write(state, "oops", ua.VariantType.String)
            await tool.write_bad(lifetime)
            await tool.write(lifetime, "12", ua.VariantType.String)
            await tool.write_bad(state)
            await tool.write(state, 9, ua.VariantType.Int32)  # not a ChannelState
            await until(lambda: len(of(publisher, "condition")) == 3)
            messages = [c.data.message for c in of(publisher, "condition")]
            assert all(c.data.native_code == BAD_INPUT_CODE for c in of(publisher, "condition"))
            # (The server orders notifications of different nodes as it likes.)
            assert sorted(m.partition(" is not")[0] for m in messages) == [
                "Monitoring/Channel1/ChannelState: 'oops'",
                "Monitoring/Channel1/ChannelState: 9",
                "Production/Statistics/PartsProducedInLifetime: '12'",
            ]
            # Good values again: the adapter never stopped.
            await tool.write(state, 2, ua.VariantType.Int32)
            await tool.write_bad(lifetime)
            await tool.write(lifetime, 7, ua.VariantType.UInt32)
            await until(lambda: of(publisher, "execution")[-1].data.execution == "READY")
            await until(lambda: data(of(publisher, "partcount"))[-1]["count"] == 7)
            assert not task.done()


async def test_check_returns_the_current_state_without_publishing() -> None:
    async with serving() as tool:
        lifetime = await tool.find("Production", "Statistics", "PartsProducedInLifetime")
        await tool.write(lifetime, 41, ua.VariantType.UInt32, T0 + timedelta(hours=1))
        # Namespace indexes instead of URIs work too.
        adapter = OpcuaAdapter(tool.config(browse_path=tool.path_index))
        events = await adapter.check()
        assert [(e.type, e.data) for e in events] == [
            ("mes.machine.availability.v1", {"availability": "AVAILABLE"}),
            (
                "mes.machine.execution.v1",
                {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "Sample.nc"},
            ),
            ("mes.machine.partcount.v1", {"count": 41, "kind": "all"}),
        ]
        assert events[2].time == T0 + timedelta(hours=1)
        assert all(e.subject == MACHINE for e in events)
        # A second check of unchanged values: the same facts with the same ids (the
        # availability event is about this connection, so it is new).
        again = await OpcuaAdapter(tool.config()).check()
        assert [e.id for e in again[1:]] == [e.id for e in events[1:]]

    with pytest.raises((OSError, TimeoutError)):
        await OpcuaAdapter(tool.config()).check()  # the server is gone


async def test_config_resolves_relative_paths_and_requires_keys_for_security(
    tmp_path: Path,
) -> None:
    (tmp_path / "client.der").write_bytes(b"x")
    (tmp_path / "client.pem").write_bytes(b"x")
    base = {"machine_id": "M", "endpoint": "opc.tcp://h:4840/", "browse_path": ["0:x"]}
    config = OpcuaConfig.model_validate(
        base
        | {
            "security_policy": "Basic256Sha256",
            "certificate": "client.der",
            "private_key": "client.pem",
        },
        context={"base": tmp_path},
    )
    assert config.certificate == tmp_path / "client.der"
    with pytest.raises(ValueError, match="needs certificate and private_key"):
        OpcuaConfig.model_validate(base | {"security_policy": "Basic256Sha256"})
    with pytest.raises(ValueError, match="no such file"):
        OpcuaConfig.model_validate(
            base | {"certificate": "missing.der"}, context={"base": tmp_path}
        )
