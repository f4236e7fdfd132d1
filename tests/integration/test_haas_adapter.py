"""The Haas MDC adapter against a loopback control (tests/haas_peer.py) over real TCP."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.haas import JUNK, HaasAdapter, HaasConfig, ReplyReader
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running, facts, of_kind
from tests.conftest import eventually
from tests.haas_peer import HaasPeer

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "haas.md"
QUERY = re.compile(r"^\?Q(100|104|500|600 \d+)$")


@pytest.fixture
async def peer() -> AsyncIterator[HaasPeer]:
    control = HaasPeer(program="O00012", status="IDLE", mode="MEM", parts=0, macros={3901: 380})
    await control.start()
    yield control
    await control.stop()


def config(peer: HaasPeer, **kwargs: Any) -> HaasConfig:
    return HaasConfig.model_validate(
        {
            "machine_id": "VF2-1",
            "host": "127.0.0.1",
            "port": peer.port,
            "poll_s": 0.02,
            "timeout_s": 1.0,
            "reconnect_max_s": 0.2,
            **kwargs,
        }
    )


async def polls(peer: HaasPeer, n: int) -> None:
    """Wait until the control has been asked ``?Q500`` ``n`` more times (polls, not seconds)."""
    target = peer.queries.count("?Q500") + n
    await eventually(lambda: peer.queries.count("?Q500") >= target)


async def settle(publisher: InMemoryPublisher, peer: HaasPeer, count: int) -> None:
    """Wait for ``count`` events, then a few more polls (which must add nothing)."""
    await eventually(lambda: len(publisher.published) >= count)
    await polls(peer, 4)
    published = len(publisher.published)
    assert published == count, f"{published} events, the first extra: {facts(publisher)[count]}"


INITIAL = [
    ("availability", {"availability": "AVAILABLE"}),
    ("condition", {"level": "normal"}),
    ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00012"}),
    ("partcount", {"count": 380, "kind": "all"}),
]


def test_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = HaasAdapter(HaasConfig(machine_id="M1", host="haas"))
    assert adapter.protocol == "haas"
    assert HaasAdapter.protocol == "haas"


async def test_publishes_the_state_then_only_changes_each_once(peer: HaasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    assert facts(publisher) == INITIAL

    # Cycle start: Q500 says STATUS, BUSY (no program, no parts): ACTIVE, program kept.
    peer.set(status="BUSY")
    await settle(publisher, peer, 5)
    peer.macro(3901, 381)  # M30 at the end of the cycle: #3901 counts, read while BUSY
    await settle(publisher, peer, 6)
    peer.set(status="FEED HOLD")
    await settle(publisher, peer, 7)
    peer.set(status="IDLE", mode="MDI", program="MDI")  # one poll sees all three: one event
    await settle(publisher, peer, 8)
    peer.set(mode="(ZERO RET)")  # older controls put the mode in parentheses
    await settle(publisher, peer, 9)
    peer.set(mode="MEM", program="O00013")
    await settle(publisher, peer, 10)
    await running.finish()

    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O00012"}),
        ("partcount", {"count": 381, "kind": "all"}),
        ("execution", {"execution": "FEED_HOLD", "mode": "AUTOMATIC", "program": "O00012"}),
        ("execution", {"execution": "READY", "mode": "MANUAL_DATA_INPUT"}),  # MDI: no program
        ("execution", {"execution": "READY", "mode": "MANUAL"}),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00013"}),
    ]
    events = [e.envelope for _, e in publisher.published]
    assert all(e.subject == "VF2-1" for e in events)
    assert all(e.source == f"haas://127.0.0.1:{peer.port}" for e in events)
    assert len({e.id for e in events}) == len(events)
    # The event time is the poll's: the first poll's four events share it, later ones differ.
    assert len({e.time for e in events[:4]}) == 1
    assert len({e.time for e in events[3:]}) == len(events[3:])
    assert all(QUERY.match(q) for q in peer.queries), set(peer.queries)


async def test_the_same_state_read_again_publishes_nothing_new(peer: HaasPeer) -> None:
    # A restarted adapter republishes the state, each event with the time of its own first
    # poll; within a run, polls of an unchanged machine send nothing at all.
    sent: list[Any] = []

    class Recording(InMemoryPublisher):
        async def publish_many(self, events: list[Any]) -> list[Any]:
            sent.extend(events)
            return await super().publish_many(events)

    publisher = Recording()
    running = Running(HaasAdapter(config(peer)), publisher)
    await eventually(lambda: len(sent) == 4)
    await polls(peer, 20)
    await running.finish()
    assert len(sent) == 4


async def test_busy_hides_program_and_parts_and_nothing_made_up_is_published(
    peer: HaasPeer,
) -> None:
    peer.set(parts=10)
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer, part_count_source="q500")), publisher)
    await settle(publisher, peer, 4)
    assert of_kind(publisher, "partcount") == [{"count": 10, "kind": "all"}]

    # While BUSY the control shows neither: the next program and the next parts stay unseen.
    peer.set(status="BUSY", program="O00020", parts=11)
    await settle(publisher, peer, 5)
    assert facts(publisher)[-1] == (
        "execution",
        {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O00012"},
    )
    peer.set(parts=12)
    await polls(peer, 5)
    assert len(publisher.published) == 5  # nothing from a reply that shows nothing

    peer.set(status="IDLE")
    await settle(publisher, peer, 7)
    await running.finish()
    assert facts(publisher)[5:] == [
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00020"}),
        ("partcount", {"count": 12, "kind": "all"}),
    ]


async def test_a_control_busy_to_every_query_is_neither_lost_nor_made_up(peer: HaasPeer) -> None:
    # Should a control answer STATUS, BUSY to ?Q600 and ?Q104 too while it runs: ACTIVE, the
    # mode and the count kept until it shows them again.
    peer.set(busy_answers_all=True)
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    peer.set(status="BUSY", mode="MDI")
    peer.macro(3901, 381)
    await settle(publisher, peer, 5)
    peer.set(status="IDLE")
    await settle(publisher, peer, 7)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O00012"}),
        ("execution", {"execution": "READY", "mode": "MANUAL_DATA_INPUT", "program": "O00012"}),
        ("partcount", {"count": 381, "kind": "all"}),
    ]


@pytest.mark.parametrize("numbered", [False, True], ids=["MACRO-value", "MACRO-n-value"])
async def test_a_macro_change_is_one_part_count(peer: HaasPeer, numbered: bool) -> None:
    peer.set(numbered_macros=numbered)
    peer.macro(3902, 2)
    publisher = InMemoryPublisher()
    adapter = HaasAdapter(config(peer, part_count_macro=3901, bad_count_macro=3902))
    running = Running(adapter, publisher)
    await settle(publisher, peer, 5)
    peer.macro(3901, 383)
    await settle(publisher, peer, 6)
    peer.macro(3902, 3)
    await settle(publisher, peer, 7)
    peer.macro(3901, 0)  # reset at the control: published as it is, the hub sees a reset
    await settle(publisher, peer, 8)
    await running.finish()
    assert of_kind(publisher, "partcount") == [
        {"count": 380, "kind": "all"},
        {"count": 2, "kind": "bad"},
        {"count": 383, "kind": "all"},
        {"count": 3, "kind": "bad"},
        {"count": 0, "kind": "all"},
    ]
    assert "?Q600 3902" in peer.queries


class OtherClient:
    """Another MDC client on the same control (a shop's own monitor), asking its own queries
    in a loop; the control sends its replies to our adapter too."""

    QUERIES = ("?Q500", "?Q600 100", "?Q104", "?Q600 3901", "?Q200", "?Q600 5021", "?Q100")

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = b""
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.task = asyncio.create_task(self._loop(reader, writer))

    async def _loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.stopping.is_set():
                for query in self.QUERIES:
                    writer.write(query.encode() + b"\r\n")
                    await writer.drain()
                    async with asyncio.timeout(5):
                        self.received += await reader.read(4096)
                    await asyncio.sleep(0.005)
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.task is not None and not self.task.done(), "the other client failed"
        self.stopping.set()
        async with asyncio.timeout(10):
            await self.task


@pytest.mark.parametrize("numbered", [False, True], ids=["MACRO-value", "MACRO-n-value"])
async def test_a_second_client_changes_nothing_we_publish(peer: HaasPeer, numbered: bool) -> None:
    # A real second client, asking all the time: where its replies fall among ours is up to
    # chance, so this checks only the outcome, whatever the interleaving (the tests above force
    # each interleaving with the peer's knobs and check the adapter saw it).
    # The other client reads #100 (777), #5021 (-12.5) and #3901 too; its replies reach us.
    peer.set(numbered_macros=numbered)
    peer.macro(100, 777)
    peer.macro(5021, -12.5)
    other = OtherClient(peer.port)
    await other.start()
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    for change, count in [
        ({"status": "BUSY"}, 5),
        ({"macros": {**peer.macros, 3901: 381}}, 6),
        ({"status": "IDLE", "program": "O00013"}, 7),
        ({"macros": {**peer.macros, 3901: 382}}, 8),
        ({"mode": "JOG"}, 9),
    ]:
        peer.set(**change)
        await settle(publisher, peer, count)
    await other.stop()
    await running.finish()

    assert facts(publisher) == [
        *INITIAL,
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O00012"}),
        ("partcount", {"count": 381, "kind": "all"}),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00013"}),
        ("partcount", {"count": 382, "kind": "all"}),
        ("execution", {"execution": "READY", "mode": "MANUAL", "program": "O00013"}),
    ]
    # The broadcast really happened: the other client got our replies, and we got its.
    assert b"MACRO, " in other.received and b"SERIAL NUMBER" in other.received
    assert peer.queries.count("?Q600 100") > 3


async def test_a_bad_macro_is_one_warning_also_while_the_other_client_reads_macros(
    peer: HaasPeer,
) -> None:
    # Polls in which the macro replies cannot be told apart neither repeat nor clear it.
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    other = OtherClient(peer.port)
    await other.start()
    peer.macro(3901, 380.5)
    await eventually(lambda: len(publisher.published) == 5)
    await polls(peer, 40)
    peer.macro(3901, 381)
    await settle(publisher, peer, 7)
    await other.stop()
    await running.finish()
    assert facts(publisher)[4:] == [
        (
            "condition",
            {
                "level": "warning",
                "native_code": BAD_INPUT_CODE,
                "message": "macro #3901 is '380.500000': a part counter must be a whole number ≥ 0",
            },
        ),
        ("partcount", {"count": 381, "kind": "all"}),
        ("condition", {"level": "normal", "native_code": BAD_INPUT_CODE}),
    ]


@pytest.mark.parametrize("ours", ["MACRO, 380.000000", "UNKNOWN", "STATUS, BUSY"])
async def test_the_other_clients_macro_is_never_taken_for_ours(
    peer: HaasPeer, ours: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Forced interleaving: the other client's ?Q600 100 (MACRO, 777) is answered just before
    # our ?Q600 3901, whose own answer is a MACRO, an UNKNOWN or STATUS, BUSY. Which of the
    # two replies is ours cannot be told: no count and no UNKNOWN from those polls.
    caplog.set_level(logging.DEBUG, logger="adapters.machines.haas")
    peer.macro(100, 777)
    peer.set(interleave={"?Q600 3901": "?Q600 100"}, replies={"?Q600 3901": ours})
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 3)
    await polls(peer, 10)
    assert facts(publisher) == [*INITIAL[:3]]
    assert "macro values not used this poll" in caplog.text
    # The other client stops reading macros: our own answer is read, as it is.
    peer.set(interleave={})
    if ours == "UNKNOWN":
        await settle(publisher, peer, 4)
        assert facts(publisher)[3][1]["message"] == "?Q600 3901: the control answered UNKNOWN"
    peer.set(replies={})
    await settle(publisher, peer, 6 if ours == "UNKNOWN" else 4)  # (and the warning cleared)
    await running.finish()
    assert of_kind(publisher, "partcount") == [{"count": 380, "kind": "all"}]


async def test_the_other_clients_replies_between_ours_change_nothing(
    peer: HaasPeer, caplog: pytest.LogCaptureFixture
) -> None:
    # Forced interleaving: before each of our queries the control answers one of the other
    # client's (its Q500, its model, its mode). None of them can be taken for a macro value,
    # except its Q500 while BUSY (STATUS, BUSY): then macro counts wait for the cycle's end.
    caplog.set_level(logging.DEBUG, logger="adapters.machines.haas")
    peer.set(interleave={"?Q600 3901": "?Q500", "?Q500": "?Q102", "?Q104": "?Q104"})
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    assert facts(publisher) == INITIAL
    assert "macro values not used" not in caplog.text
    peer.set(status="BUSY")
    await settle(publisher, peer, 5)
    peer.macro(3901, 381)  # counted during the cycle: not readable while the other asks Q500
    await polls(peer, 5)
    assert len(publisher.published) == 5
    assert "macro values not used this poll" in caplog.text
    peer.set(status="IDLE", program="O00013")
    await settle(publisher, peer, 7)
    peer.set(mode="JOG")
    await settle(publisher, peer, 8)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "O00012"}),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00013"}),
        ("partcount", {"count": 381, "kind": "all"}),
        ("execution", {"execution": "READY", "mode": "MANUAL", "program": "O00013"}),
    ]


async def test_a_slow_control_answering_the_other_clients_unknown_first_is_no_refusal(
    peer: HaasPeer,
) -> None:
    # 0.55 s per answer, one at a time: the other client's unknown query, sent just before
    # ours, is answered UNKNOWN 0.55 s before our answer comes. Not a refusal: the adapter
    # waits a few round trips for its own answer (at connect, the whole timeout), so the
    # serial number checks and the execution is published. (The count is not: an UNKNOWN
    # came that could have answered our macro query; it waits for a poll without one.)
    peer.set(delay_s=0.55, interleave={"?Q100": "?Q999", "?Q500": "?Q999"})
    adapter = HaasAdapter(config(peer, timeout_s=3.0, serial_number="1234567"))
    events = await adapter.check()
    assert [(e.type.split(".")[2], e.data) for e in events] == INITIAL[:3]


async def test_an_unknown_while_the_other_client_asks_is_reported_once_it_repeats(
    peer: HaasPeer,
) -> None:
    # Our ?Q104 is really answered UNKNOWN, and the other client's model query comes in
    # between: the UNKNOWN might be the other client's, so one poll reports nothing…
    peer.set(replies={"?Q104": "UNKNOWN"}, interleave={"?Q104": "?Q102"})
    events = await HaasAdapter(config(peer)).check()
    assert [(e.type.split(".")[2], e.data) for e in events] == [
        *INITIAL[:2],
        ("execution", {"execution": "READY", "program": "O00012"}),  # the mode is not known
        INITIAL[3],
    ]
    # …and polls in a row answering UNKNOWN report it, once.
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 5)
    peer.set(replies={})
    await settle(publisher, peer, 7)
    await running.finish()
    assert facts(publisher)[4:] == [
        (
            "condition",
            {
                "level": "warning",
                "native_code": BAD_INPUT_CODE,
                "message": "?Q104: the control answered UNKNOWN",
            },
        ),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00012"}),
        ("condition", {"level": "normal", "native_code": BAD_INPUT_CODE}),
    ]


async def test_a_third_client_is_refused_and_ours_still_works(peer: HaasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    other = OtherClient(peer.port)
    await other.start()
    await eventually(lambda: peer.clients == 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed at once
    writer.close()
    assert peer.refused == 1
    peer.set(status="BUSY")
    await settle(publisher, peer, 5)
    await other.stop()
    await running.finish()
    assert facts(publisher)[-1][1]["execution"] == "ACTIVE"


async def test_the_adapter_as_third_client_is_unavailable_until_a_place_frees(
    peer: HaasPeer,
) -> None:
    first, second = OtherClient(peer.port), OtherClient(peer.port)
    await first.start()
    await second.start()
    await eventually(lambda: peer.clients == 2)
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await eventually(lambda: peer.refused >= 3)  # it tries again, and is refused again
    assert [kind for kind, _ in facts(publisher)] == ["availability", "condition"]
    (condition,) = of_kind(publisher, "condition")
    assert condition["native_code"] == CONNECTION_CODE
    assert "two MDC clients" in condition["message"]
    await second.stop()
    await eventually(lambda: len(publisher.published) >= 7)
    await first.stop()
    await running.finish()
    assert facts(publisher)[2:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("condition", {"level": "normal"}),
        *INITIAL[2:],
    ]


async def test_a_dropped_connection_is_unavailable_once_then_back(
    peer: HaasPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.haas")
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)

    await peer.stop()  # the control goes away: the connection drops, reconnects are refused
    await eventually(lambda: sum("still no answer" in r.getMessage() for r in caplog.records) >= 3)
    (unavailable, lost) = facts(publisher)[4:]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert lost[1]["level"] == "unavailable" and lost[1]["native_code"] == CONNECTION_CODE
    # The connection closed or reset, or (if the loss came between two polls) refused.
    assert lost[1]["message"].startswith(f"Haas MDC 127.0.0.1:{peer.port}: ")
    peer.set(status="BUSY")  # the machine went on meanwhile
    peer.macro(3901, 385)
    peer.set(program="O00020")  # …and may have started another program: BUSY hides which
    await peer.start(peer.port)
    await settle(publisher, peer, 10)
    await peer.drop()  # the control's network restarts; it takes connections again at once
    await settle(publisher, peer, 14)
    peer.set(status="IDLE")
    await settle(publisher, peer, 15)
    await running.finish()
    lost_again = of_kind(publisher, "condition")[-2]
    assert lost_again["level"] == "unavailable" and lost_again["native_code"] == CONNECTION_CODE
    assert facts(publisher)[6:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        # The program before the loss is not carried over it: no program until Q500 shows one.
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC"}),
        ("partcount", {"count": 385, "kind": "all"}),
        ("availability", {"availability": "UNAVAILABLE"}),
        ("condition", lost_again),
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00020"}),
    ]
    assert any("control not answering" in r.getMessage() for r in caplog.records)


async def test_a_hung_control_is_a_loss_and_the_adapter_recovers(peer: HaasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer, timeout_s=0.3)), publisher)
    await settle(publisher, peer, 4)
    peer.hang()
    await eventually(lambda: len(publisher.published) == 6)
    lost = of_kind(publisher, "condition")[-1]
    assert lost["level"] == "unavailable" and lost["native_code"] == CONNECTION_CODE
    assert "no answer to ?Q" in lost["message"] and "within 0.3 s" in lost["message"]
    peer.set(status="FEED HOLD")
    peer.hang(False)
    await settle(publisher, peer, 9)
    await running.finish()
    assert facts(publisher)[6:] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("execution", {"execution": "FEED_HOLD", "mode": "AUTOMATIC", "program": "O00012"}),
    ]


async def test_unreachable_from_the_start_publishes_unavailable_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once the socket is closed
    nobody = HaasPeer()
    nobody.port = port
    publisher = InMemoryPublisher()
    adapter = HaasAdapter(config(nobody))
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == 2)
    with pytest.raises(ConnectionError, match=f"cannot connect to 127.0.0.1:{port}"):
        await adapter.check()
    await running.finish()
    assert of_kind(publisher, "availability") == [{"availability": "UNAVAILABLE"}]
    (condition,) = of_kind(publisher, "condition")
    assert condition["message"].startswith(f"Haas MDC 127.0.0.1:{port}: cannot connect")


async def test_an_ipv6_host_is_bracketed_in_the_loss() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # on ::1 too, nobody listens there (or no IPv6 at all)
    nobody = HaasPeer()
    nobody.port = port
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(nobody, host="::1")), publisher)
    await eventually(lambda: len(publisher.published) == 2)
    await running.finish()
    (condition,) = of_kind(publisher, "condition")
    where = f"[::1]:{port}"
    assert condition["message"].startswith(f"Haas MDC {where}: cannot connect to {where} (")


async def test_garbage_is_a_warning_once_and_the_adapter_goes_on(
    peer: HaasPeer, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    peer.garbage()
    await eventually(lambda: len(publisher.published) == 6)
    warning, cleared = of_kind(publisher, "condition")[-2:]
    assert warning == {"level": "warning", "native_code": BAD_INPUT_CODE, "message": JUNK}
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert (
        "1 piece, 9 bytes: bytes outside any reply: b'" in caplog.text and "#@!junk" in caplog.text
    )
    # A reply cut short by the next one (which is read): not taken for the reply it began.
    peer.garbage(b"\x02PROGRAM, O1\x02SERIAL NUMBER, 1\x17\r\n>")
    await eventually(lambda: len(of_kind(publisher, "condition")) == 5)
    peer.set(status="BUSY")
    await settle(publisher, peer, 9)
    await running.finish()
    warning, cleared = of_kind(publisher, "condition")[3:]
    assert warning["message"] == JUNK
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert "a reply without its end (ETB): b'" in caplog.text and "PROGRAM, O1'" in caplog.text
    assert facts(publisher)[-1][1]["execution"] == "ACTIVE"


async def test_junk_is_one_warning_while_it_lasts(
    peer: HaasPeer, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    # Five junk lines of different lengths at once: one warning, the pieces in the log.
    lines = [b"#" * n + b"\r\n" for n in (1, 5, 12, 40, 300)]
    peer.garbage(b"".join(lines))
    await settle(publisher, peer, 6)
    assert "5 pieces, 358 bytes: bytes outside any reply: b'#'; " in caplog.text
    # Junk before every reply, a different length each time, poll after poll: still one.
    peer.set(noise=[b"\x00" * n + b"\r\n" for n in (3, 7, 11, 13)])
    await settle(publisher, peer, 7)
    await polls(peer, 10)
    peer.set(noise=[])
    await settle(publisher, peer, 8)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("condition", {"level": "warning", "native_code": BAD_INPUT_CODE, "message": JUNK}),
        ("condition", {"level": "normal", "native_code": BAD_INPUT_CODE}),
        ("condition", {"level": "warning", "native_code": BAD_INPUT_CODE, "message": JUNK}),
        ("condition", {"level": "normal", "native_code": BAD_INPUT_CODE}),
    ]


def test_junk_between_polls_is_counted_not_kept() -> None:
    reader = ReplyReader()
    reader.feed(b"".join(b"junk %d\r\n" % n for n in range(10_000)) + b"\x02MODE, MEM\x17")
    assert len(reader.junk_samples) == 3 and reader.junk_pieces == 10_000
    summary = reader.take_junk()
    assert summary is not None and summary.startswith("10000 pieces, 88890 bytes: ")
    assert summary.endswith(" …") and reader.take_junk() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"status": "DANCING"}, "Q500: status 'DANCING' is not known"),
        ({"mode": "WARP"}, "Q104: mode 'WARP' is not known"),
        ({"macros": {3901: 380.5}}, "macro #3901 is '380.500000': a part counter must be a "),
        ({"macros": {3901: -1}}, "macro #3901 is '-1.000000': a part counter must be a "),
        ({"replies": {"?Q500": "PROGRAM, O1, IDLE"}}, "Q500: expected 'PROGRAM, <program>, "),
        ({"replies": {"?Q600 3901": "UNKNOWN"}}, "?Q600 3901: the control answered UNKNOWN"),
        ({"replies": {"?Q104": "MODE, MÉM"}}, JUNK),  # not ASCII: no reply the control sends
    ],
)
async def test_a_bad_reply_is_one_warning_and_nothing_else_changes(
    peer: HaasPeer, change: dict[str, Any], message: str
) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    previous = {name: getattr(peer, name) for name in change}
    peer.set(**change)
    await settle(publisher, peer, 5)  # one warning, however many polls
    peer.set(**previous)
    await settle(publisher, peer, 6)
    await running.finish()
    warning, cleared = facts(publisher)[4:]
    assert warning[1]["level"] == "warning" and warning[1]["native_code"] == BAD_INPUT_CODE
    assert warning[1]["message"].startswith(message)
    assert cleared == ("condition", {"level": "normal", "native_code": BAD_INPUT_CODE})


async def test_an_alarm_is_stopped_with_a_fault_until_it_clears(peer: HaasPeer) -> None:
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    peer.set(status="ALARM ON")
    await settle(publisher, peer, 6)
    peer.set(status="IDLE")
    await settle(publisher, peer, 8)
    await running.finish()
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "STOPPED", "mode": "AUTOMATIC", "program": "O00012"}),
        (
            "condition",
            {
                "level": "fault",
                "native_code": "ALARM",
                "message": "the control reports ALARM ON (Q500); the alarm is on its ALARMS screen",
            },
        ),
        ("execution", {"execution": "READY", "mode": "AUTOMATIC", "program": "O00012"}),
        ("condition", {"level": "normal", "native_code": "ALARM"}),
    ]


async def test_a_failed_publish_is_retried_with_the_next_poll(peer: HaasPeer) -> None:
    class FailingOnce(InMemoryPublisher):
        failed = False

        async def publish_many(self, events: list[Any]) -> list[Any]:
            if not self.failed and len(self.published) == 4:
                self.failed = True
                raise ConnectionError("NATS is down")
            return await super().publish_many(events)

    publisher = FailingOnce()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    peer.set(status="BUSY")
    await settle(publisher, peer, 5)
    await running.finish()
    assert publisher.failed
    assert facts(publisher)[-1][1]["execution"] == "ACTIVE"


async def test_a_failure_while_deciding_loses_no_change(
    peer: HaasPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Something fails after the poll's execution was taken in, before anything is published:
    # the session starts over, and the change is published then, not taken as published.
    original = HaasAdapter._problem_changes
    failures: list[str] = []

    def failing_once(self: HaasAdapter, machine: Any, reading: Any, at: Any) -> Any:
        if reading.execution == "ACTIVE" and not failures:
            failures.append("failed")
            raise RuntimeError("a bug")
        return original(self, machine, reading, at)

    monkeypatch.setattr(HaasAdapter, "_problem_changes", failing_once)
    publisher = InMemoryPublisher()
    running = Running(HaasAdapter(config(peer)), publisher)
    await settle(publisher, peer, 4)
    peer.set(status="BUSY")
    await settle(publisher, peer, 9)
    await running.finish()
    assert failures
    unavailable, lost, available, back, active = facts(publisher)[4:]
    assert lost[1]["message"].endswith("session failed (RuntimeError)")
    assert (unavailable, available, back) == (
        ("availability", {"availability": "UNAVAILABLE"}),
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
    )
    assert active == ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC"})


async def test_a_failure_while_receiving_is_a_loss_at_once_and_the_adapter_recovers(
    peer: HaasPeer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = ReplyReader.feed

    def feed(self: ReplyReader, data: bytes) -> Any:
        if b"BOOM" in data:
            raise RuntimeError("a bug")
        return original(self, data)

    monkeypatch.setattr(ReplyReader, "feed", feed)
    publisher = InMemoryPublisher()
    # A timeout far beyond the test: the loss must come from the failure, not from waiting.
    running = Running(HaasAdapter(config(peer, timeout_s=60, poll_s=0.05)), publisher)
    await settle(publisher, peer, 4)
    peer.garbage(b"BOOM\r\n")
    await settle(publisher, peer, 8)
    await running.finish()
    lost = facts(publisher)[5][1]
    assert lost["message"].endswith("reading from the control failed (RuntimeError)")
    assert [kind for kind, _ in facts(publisher)[4:]] == ["availability", "condition"] * 2
    assert "reading from the control failed" in caplog.text and "a bug" in caplog.text


async def test_check_returns_the_state_without_publishing(peer: HaasPeer) -> None:
    adapter = HaasAdapter(config(peer, modes={"(setup)": "MANUAL"}))
    peer.set(mode="SETUP")
    events = await adapter.check()
    assert [(e.type.split(".")[2], e.data) for e in events] == [
        *INITIAL[:2],
        ("execution", {"execution": "READY", "mode": "MANUAL", "program": "O00012"}),
        INITIAL[3],
    ]
    assert adapter.serial_number == "1234567"
    assert len(peer.queries) == 4  # ?Q100 once, then one poll


async def test_the_newer_reply_form_is_read_too(peer: HaasPeer) -> None:
    peer.set(ngc_framing=True)  # ">payload\r\n", as the NGC control's documentation writes it
    events = await HaasAdapter(config(peer)).check()
    assert [(e.type.split(".")[2], e.data) for e in events] == INITIAL


async def test_another_machine_at_the_address_is_not_published(peer: HaasPeer) -> None:
    adapter = HaasAdapter(config(peer, serial_number="7654321"))
    with pytest.raises(ConnectionError, match="serial number '1234567', not '7654321'"):
        await adapter.check()
    publisher = InMemoryPublisher()
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == 2)
    await running.finish()
    assert of_kind(publisher, "availability") == [{"availability": "UNAVAILABLE"}]
    assert of_kind(publisher, "partcount") == []


def test_replies_split_across_reads_and_both_busy_spellings() -> None:
    reader = ReplyReader()
    stream = b"\x02STATUS, BUSY\x17\r\n>\x02STATUS BUSY\x17\r\n>>MODE, MEM\r\n>"
    replies = [r for byte in stream for r in reader.feed(bytes([byte]))]
    assert [r.fields for r in replies] == [("STATUS", "BUSY")] * 2 + [("MODE", "MEM")]
    assert reader.take_junk() is None


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ("port = 99999", "port", "less than or equal to 65535"),
        ('part_count_source = "m30"', "part_count_source", "'macro' or 'q500'"),
        ("part_count_macro = 0", "part_count_macro", "greater than or equal to 1"),
        ('modes = { SETUP = "SETUP" }', "modes.SETUP", "'AUTOMATIC'"),
        ("write_macros = true", "write_macros", "Extra inputs are not permitted"),
    ],
)
def test_the_config_file_error_names_file_key_and_reason(
    tmp_path: Path, line: str, key: str, reason: str
) -> None:
    path = tmp_path / "mes-hub.toml"
    path.write_text(f'[[adapters.haas]]\nmachine_id = "VF2-1"\nhost = "haas"\n{line}\n')
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert str(path) in text and f"'adapters.haas.0.{key}'" in text and reason in text


def test_the_bad_count_macro_must_differ_from_the_part_count_macro() -> None:
    with pytest.raises(ValidationError, match="bad_count_macro #3901 is also part_count_macro"):
        HaasConfig(machine_id="M1", host="haas", bad_count_macro=3901)


def test_a_counter_macro_that_would_not_be_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "mes-hub.toml"
    path.write_text(
        '[[adapters.haas]]\nmachine_id = "VF2-1"\nhost = "haas"\n'
        'part_count_source = "q500"\npart_count_macro = 3905\n'
    )
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert str(path) in text and "'adapters.haas.0'" in text
    assert 'part_count_macro #3905 is not read with part_count_source = "q500"' in text
    # Without part_count_macro, "q500" reads Q500's PARTS (and no macro).
    assert HaasConfig(machine_id="M1", host="haas", part_count_source="q500").macros() == []


def test_an_empty_host_is_an_error() -> None:
    with pytest.raises(ValidationError, match="host"):
        HaasConfig(machine_id="M1", host="")


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.haas]]" in b)
    path = tmp_path / "mes-hub.toml"
    path.write_text(example)
    (entry,) = load_adapters(path).haas
    assert entry.machine_id == "VF2-3" and entry.bad_count_macro == 3902
