"""The LSV2 adapter (HEIDENHAIN TNC) through the real pyLSV2 client against the LSV2 server of
``tests/lsv2_peer.py`` on loopback: a control as pyLSV2 sees it, not a real one."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.machines.base import BAD_INPUT_CODE, CONNECTION_CODE, MachineAdapter
from adapters.machines.config import AdapterConfigError, load_adapters
from adapters.machines.lsv2 import (
    DNC_MEANING,
    ControlLost,
    LoginRefused,
    Lsv2Adapter,
    Lsv2Config,
    Reading,
)
from hub.ports import InMemoryPublisher
from tests.adapter_harness import Running, facts, of_kind
from tests.conftest import eventually
from tests.lsv2_peer import T_ER_BAD_FORMAT, Lsv2Peer, PeerError, refusal, telegram

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "heidenhain.md"
GUARD_OPEN = PeerError(-2130706422, "010 Machine guard is open !", error_class=3, group=3)


@pytest.fixture
async def peer() -> AsyncIterator[Lsv2Peer]:
    control = Lsv2Peer()
    await control.start()
    yield control
    await control.stop()


def config(peer: Lsv2Peer, **kwargs: Any) -> Lsv2Config:
    return Lsv2Config.model_validate(
        {
            "machine_id": "TNC-1",
            "host": "127.0.0.1",
            "port": peer.port,
            "poll_s": 0.05,
            "timeout_s": 2.0,
            "reconnect_max_s": 0.2,
            **kwargs,
        }
    )


def times(publisher: InMemoryPublisher, kind: str) -> list[datetime]:
    return [e.envelope.time for s, e in publisher.published if s.rsplit(".", 1)[1] == kind]


async def polled(peer: Lsv2Peer, n: int) -> None:
    """Wait until the control answered ``n`` more polls (polls, not seconds)."""
    target = peer.polls() + n
    await eventually(lambda: peer.polls() >= target)


def test_adapter_satisfies_the_port() -> None:
    adapter: MachineAdapter = Lsv2Adapter(Lsv2Config(machine_id="M1", host="tnc"))
    assert adapter.protocol == "lsv2" == Lsv2Adapter.protocol


async def test_publishes_the_state_then_each_change_once_with_its_time(peer: Lsv2Peer) -> None:
    peer.set_plc("D1200", 40)
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, part_count="D1200")), publisher)
    initial = [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal"}),  # a fresh run clears what an earlier one left
        (
            "execution",
            {"execution": "READY", "mode": "AUTOMATIC", "program": "TNC:\\nc_prog\\PART-7.h"},
        ),
        ("partcount", {"count": 40, "kind": "all"}),
    ]
    await eventually(lambda: len(publisher.published) >= len(initial))
    await polled(peer, 5)
    assert facts(publisher) == initial  # polls of the same state publish nothing

    # What the operator does, one step at a time; each step is published once, at the time
    # of the poll that saw it (between the moment it was made and the moment it arrived).
    steps: list[tuple[str, Any, dict[str, str] | None]] = [
        ("program_state", 0, {"execution": "ACTIVE"}),  # NC start
        ("program_state", 4, {"execution": "INTERRUPTED"}),  # NC stop
        ("execution_mode", 3, {"mode": "SEMI_AUTOMATIC"}),  # single block
        ("program_state", 0, {"execution": "ACTIVE"}),
        ("program_state", 2, {"execution": "PROGRAM_COMPLETED"}),
        ("program", "TNC:\\nc_prog\\PART-8.h", {"program": "TNC:\\nc_prog\\PART-8.h"}),
        ("execution_mode", 1, {"mode": "MANUAL_DATA_INPUT"}),
        ("program_state", 7, {"execution": "READY"}),
        ("execution_mode", 5, None),  # undefined: nothing to tell, the mode stays as it was
        ("program_state", 0, {"execution": "ACTIVE"}),  # still in MDI
    ]
    state = dict(initial[2][1])
    for attribute, value, changes in steps:
        before = datetime.now(UTC)
        count = len(of_kind(publisher, "execution"))
        setattr(peer, attribute, value)
        if changes is None:
            await polled(peer, 3)
            assert len(of_kind(publisher, "execution")) == count
            continue
        await eventually(lambda n=count: len(of_kind(publisher, "execution")) == n + 1)
        state = {**state, **changes}
        assert of_kind(publisher, "execution")[-1] == state
        assert before <= times(publisher, "execution")[-1] <= datetime.now(UTC)
    assert state["mode"] == "MANUAL_DATA_INPUT"
    await polled(peer, 3)
    await running.finish()
    assert len(of_kind(publisher, "execution")) == 1 + sum(1 for *_, c in steps if c is not None)
    events = [e.envelope for _, e in publisher.published]
    assert all(e.subject == "TNC-1" for e in events)
    assert all(e.source == f"lsv2://127.0.0.1:{peer.port}" for e in events)
    assert len({e.id for e in events}) == len(events)
    assert len({e.time for e in events[: len(initial)]}) == 1  # one poll, one time


async def test_the_plc_counter_counting_up_gives_each_count_once(peer: Lsv2Peer) -> None:
    peer.set_plc("D1200", 0)
    peer.set_plc("W100", 0)
    publisher = InMemoryPublisher()
    adapter = Lsv2Adapter(config(peer, part_count="D1200", bad_count="W100"))
    running = Running(adapter, publisher)
    await eventually(lambda: len(of_kind(publisher, "partcount")) == 2)
    for count in range(1, 6):
        before = datetime.now(UTC)
        peer.set_plc("D1200", count)
        await eventually(lambda c=count: of_kind(publisher, "partcount")[-1]["count"] == c)
        assert before <= times(publisher, "partcount")[-1]
        await polled(peer, 2)  # later polls of the same count add nothing
    peer.set_plc("W100", 1)  # a reject
    await eventually(lambda: of_kind(publisher, "partcount")[-1] == {"count": 1, "kind": "bad"})
    await polled(peer, 2)
    await running.finish()
    assert of_kind(publisher, "partcount") == [
        {"count": 0, "kind": "all"},
        {"count": 0, "kind": "bad"},
        *({"count": c, "kind": "all"} for c in range(1, 6)),
        {"count": 1, "kind": "bad"},
    ]


async def test_an_error_appearing_and_clearing_gives_fault_then_normal_once(
    peer: Lsv2Peer,
) -> None:
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 1)
    peer.errors = [GUARD_OPEN]
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    await polled(peer, 3)
    peer.errors = [GUARD_OPEN, PeerError(1200, "Coolant level low", error_class=1, group=3)]
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    peer.errors = []
    await eventually(lambda: len(of_kind(publisher, "condition")) == 5)
    await polled(peer, 3)
    await running.finish()
    code = str(GUARD_OPEN.number)
    assert of_kind(publisher, "condition") == [
        {"level": "normal"},
        {"level": "fault", "native_code": code,
         "message": "010 Machine guard is open ! (program hold, PLC)"},
        {"level": "warning", "native_code": "1200",
         "message": "Coolant level low (warning, PLC)"},
        {"level": "normal", "native_code": code},
        {"level": "normal", "native_code": "1200"},
    ]  # fmt: skip


async def test_the_dnc_option_missing_is_said_plainly_and_not_hammered(
    peer: Lsv2Peer, caplog: pytest.LogCaptureFixture
) -> None:
    peer.dnc_option = False
    with pytest.raises(LoginRefused) as refused:
        await Lsv2Adapter(config(peer)).check()
    assert (
        str(refused.value)
        == f"the control refused the DNC login (T_ER 23 (T_ER_NO_PRIV)): {DNC_MEANING}"
    )
    assert isinstance(refused.value, ConnectionError)

    caplog.set_level(logging.DEBUG, logger="adapters.machines.lsv2")
    peer.logins.clear()
    connections = peer.connections
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, reconnect_max_s=0.3)), publisher)
    await eventually(lambda: peer.logins.count("DNC") >= 4)
    assert [kind for kind, _ in facts(publisher)] == ["availability", "condition"]
    (condition,) = of_kind(publisher, "condition")
    assert condition["level"] == "unavailable" and condition["native_code"] == CONNECTION_CODE
    assert DNC_MEANING in condition["message"]
    # One DNC login per connection, each after the slow wait: never a tight retry loop.
    assert peer.logins.count("DNC") in (
        peer.connections - connections,
        peer.connections - connections - 1,  # the latest connection is logging in
    )
    # The connections are at least reconnect_max_s apart (a lower bound, with 10 % for clocks).
    attempts = peer.connected_at[connections:]
    assert len(attempts) >= 4
    assert all(b - a >= 0.3 * 0.9 for a, b in itertools.pairwise(attempts))
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "adapters.machines.lsv2"
    ]
    assert len([m for m in warned if "refused the DNC login" in m]) == 1
    assert "reconnecting in 0.30 s" in warned[0]

    peer.dnc_option = True  # the option is enabled
    await eventually(lambda: len(publisher.published) >= 5)
    await running.finish()
    assert facts(publisher)[2:5] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("condition", {"level": "normal"}),
    ]


async def test_a_dropped_connection_gives_unavailable_once_and_recovers(
    peer: Lsv2Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.lsv2")
    peer.set_plc("D0", 3)
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, part_count="D0", reconnect_max_s=0.8)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    await peer.stop()  # the control goes away: refused from now on
    await eventually(lambda: len(publisher.published) == 6)
    await eventually(lambda: len(waits(caplog)) >= 2)
    assert waits(caplog)[:2] == [0.5, 0.8]  # backing off, not hammering the refused port
    first_connections = peer.connections
    unavailable, lost = facts(publisher)[4:6]
    assert unavailable == ("availability", {"availability": "UNAVAILABLE"})
    assert lost[1]["level"] == "unavailable" and lost[1]["native_code"] == CONNECTION_CODE
    assert lost[1]["message"].startswith(f"LSV2 127.0.0.1:{peer.port}: ")

    peer.set_plc("D0", 5)  # parts made while the line was down
    peer.program_state = 0
    await peer.start()
    await eventually(lambda: len(publisher.published) == 10)
    assert peer.connections > first_connections
    assert facts(publisher)[6:10] == [
        ("availability", {"availability": "AVAILABLE"}),
        ("condition", {"level": "normal", "native_code": CONNECTION_CODE}),
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC",
                       "program": "TNC:\\nc_prog\\PART-7.h"}),
        ("partcount", {"count": 5, "kind": "all"}),
    ]  # fmt: skip

    peer.drop()  # the connection breaks, the control stays: one loss, then back
    await eventually(lambda: len(publisher.published) == 14)
    await polled(peer, 3)
    await running.finish()
    assert [k for k, _ in facts(publisher)[10:]] == [
        "availability", "condition", "availability", "condition"
    ]  # fmt: skip
    assert of_kind(publisher, "availability")[-2:] == [
        {"availability": "UNAVAILABLE"},
        {"availability": "AVAILABLE"},
    ]


async def test_a_hung_control_gives_unavailable_once_and_recovers(peer: Lsv2Peer) -> None:
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, timeout_s=1.0)), publisher)
    await eventually(lambda: len(publisher.published) == 3)
    peer.hang()
    await eventually(lambda: len(publisher.published) == 5)
    hung_connections = peer.connections
    await eventually(lambda: peer.connections >= hung_connections + 2)  # retries, still hung
    assert of_kind(publisher, "availability") == [
        {"availability": "AVAILABLE"},
        {"availability": "UNAVAILABLE"},
    ]
    assert "no answer" in of_kind(publisher, "condition")[-1]["message"]
    peer.resume()
    await eventually(lambda: len(publisher.published) == 7)
    peer.program_state = 0
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await running.finish()
    assert of_kind(publisher, "availability")[-1] == {"availability": "AVAILABLE"}


async def test_a_telegram_that_is_not_lsv2_is_reported_and_the_adapter_recovers(
    peer: Lsv2Peer, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 3)
    connections = peer.connections
    peer.garbage()
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await polled(peer, 3)
    peer.program_state = 0  # polling goes on after the reconnect
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await running.finish()
    assert peer.connections == connections + 1
    warning, cleared = of_kind(publisher, "condition")[1:]
    assert warning["level"] == "warning" and warning["native_code"] == BAD_INPUT_CODE
    assert warning["message"].startswith("the control sent a telegram that is not LSV2 (")
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert of_kind(publisher, "availability") == [{"availability": "AVAILABLE"}]  # not a loss
    assert any("not LSV2" in r.getMessage() for r in caplog.records)


async def test_an_answer_cut_short_by_a_reset_ends_in_a_loss_and_recovers(
    peer: Lsv2Peer,
) -> None:
    # pyLSV2 1.8 alone would call recv on the closed socket until the deadline (2 x 5 + 1 s);
    # the adapter's socket says the connection closed at the first empty recv.
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, timeout_s=5.0)), publisher)
    await eventually(lambda: len(publisher.published) == 3)
    peer.truncate()
    await eventually(lambda: len(publisher.published) == 7)
    peer.program_state = 0
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    await running.finish()
    assert [k for k, _ in facts(publisher)[3:7]] == [
        "availability", "condition", "availability", "condition"
    ]  # fmt: skip
    message = of_kind(publisher, "condition")[1]["message"]
    assert message.endswith("ConnectionResetError: the control closed the connection")


async def test_bad_plc_values_are_reported_once_and_the_rest_goes_on(peer: Lsv2Peer) -> None:
    peer.set_plc("W10", -1)
    publisher = InMemoryPublisher()
    adapter = Lsv2Adapter(config(peer, part_count="D16384", bad_count="W10"))
    running = Running(adapter, publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await polled(peer, 4)
    peer.set_plc("W10", -2)  # the same problem with another value: not reported again
    await polled(peer, 3)
    peer.program_state = 0
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    peer.set_plc("W10", 2)
    await eventually(lambda: of_kind(publisher, "partcount") == [{"count": 2, "kind": "bad"}])
    await polled(peer, 3)
    await running.finish()
    warnings = sorted(c["message"] for c in of_kind(publisher, "condition")[1:3])
    assert warnings == [
        "PLC D16384 (part_count): beyond the control's PLC memory",
        "PLC W10 (bad_count): a count cannot be negative "
        "(a word past 32767 reads negative: use a double word)",
    ]
    # The out-of-range address stays wrong, so the warning is not cleared.
    assert len(of_kind(publisher, "condition")) == 3


async def test_a_double_word_anywhere_in_word_memory_reads_as_the_plc_holds_it(
    peer: Lsv2Peer,
) -> None:
    # D16380 is the last double word of the fake's 16384 bytes of word memory: beyond what
    # pyLSV2 1.8 reads as a DWORD (the first half only), read here as its two words.
    peer.set_plc("D16380", 70_000)  # more than a word holds
    peer.set_plc("D16376", -5)
    events = await Lsv2Adapter(config(peer, part_count="D16380", bad_count="D16376")).check()
    data = [e.data for e in events]
    assert {"count": 70_000, "kind": "all"} in data
    assert "PLC D16376 (bad_count): a count cannot be negative" in [d.get("message") for d in data]


async def test_the_plc_password_opens_plc_memory_and_is_never_logged(
    peer: Lsv2Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    peer.plc_password = "807667"
    peer.set_plc("D8", 12)
    without = config(peer, part_count="D8")
    with pytest.raises(LoginRefused, match=r"refused the PLCDEBUG login .*plc_password"):
        await Lsv2Adapter(without).check()
    events = await Lsv2Adapter(config(peer, part_count="D8", plc_password="807667")).check()
    assert {"count": 12, "kind": "all"} in [e.data for e in events]
    assert "807667" not in caplog.text
    assert "807667" not in repr(config(peer, plc_password="807667"))


async def test_a_wrong_plc_password_loses_the_counters_not_the_machine(peer: Lsv2Peer) -> None:
    peer.plc_password = "807667"
    peer.set_plc("D8", 12)
    publisher = InMemoryPublisher()
    adapter = Lsv2Adapter(config(peer, part_count="D8", plc_password="1234", reconnect_max_s=0.3))
    running = Running(adapter, publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    # The login is tried again every reconnect_max_s on the same connection.
    await eventually(lambda: peer.logins.count("PLCDEBUG") >= 3)
    peer.program_state = 0  # execution goes on being published
    await eventually(lambda: of_kind(publisher, "execution")[-1]["execution"] == "ACTIVE")
    assert peer.connections == 1
    assert of_kind(publisher, "availability") == [{"availability": "AVAILABLE"}]
    assert of_kind(publisher, "partcount") == []
    warning = of_kind(publisher, "condition")[1]
    assert warning["level"] == "warning" and warning["native_code"] == BAD_INPUT_CODE
    assert warning["message"].startswith("the control refused the PLCDEBUG login (T_ER 23")
    assert len(of_kind(publisher, "condition")) == 2  # once, not per attempt

    peer.plc_password = "1234"  # the machine builder changes it to what the config says
    await eventually(lambda: of_kind(publisher, "partcount") == [{"count": 12, "kind": "all"}])
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await running.finish()
    assert of_kind(publisher, "condition")[2] == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert peer.connections == 1


async def test_a_control_without_error_messages_is_reported_once(peer: Lsv2Peer) -> None:
    peer.error_list_refusal = 22  # T_ER_UNKNOWN_TELE: the function is not there
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    await polled(peer, 4)
    await running.finish()
    (warning,) = of_kind(publisher, "condition")[1:]
    assert warning["native_code"] == BAD_INPUT_CODE
    assert warning["message"].startswith("error messages: the control refused them (T_ER 22")
    assert peer.telegrams.count("R_RI:27") == 1  # asked once per session


async def test_an_error_list_refused_once_is_asked_again(peer: Lsv2Peer) -> None:
    peer.errors = [GUARD_OPEN]
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    peer.error_list_refusal = 58  # T_ER_ACCESS_TIMEOUT: busy, not missing
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    asked = peer.telegrams.count("R_RI:27")
    await polled(peer, 2)
    assert peer.telegrams.count("R_RI:27") > asked  # not latched for the session
    peer.error_list_refusal = None
    peer.errors = []
    await eventually(lambda: len(of_kind(publisher, "condition")) == 5)
    await polled(peer, 2)
    await running.finish()
    code = str(GUARD_OPEN.number)
    conditions = of_kind(publisher, "condition")
    assert conditions[1]["level"] == "fault" and conditions[1]["native_code"] == code
    assert conditions[2]["native_code"] == BAD_INPUT_CODE
    assert conditions[2]["message"] == (
        "error messages: the control refused the query (T_ER 58 (T_ER_ACCESS_TIMEOUT))"
    )
    # The fault stayed while the list was refused; it clears once the list says so.
    assert sorted(map(str, conditions[3:])) == sorted(
        map(str, [{"level": "normal", "native_code": code},
                  {"level": "normal", "native_code": BAD_INPUT_CODE}])
    )  # fmt: skip


async def test_an_error_list_broken_off_partway_changes_no_condition(peer: Lsv2Peer) -> None:
    coolant = PeerError(1200, "Coolant level low", error_class=1, group=3)
    peer.errors = [GUARD_OPEN, coolant]
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    peer.error_list_breaks_after = 1  # the coolant error is not listed: not known to be gone
    await eventually(lambda: len(of_kind(publisher, "condition")) == 4)
    await polled(peer, 3)
    peer.error_list_breaks_after = None
    await eventually(lambda: len(of_kind(publisher, "condition")) == 5)
    await polled(peer, 3)
    await running.finish()
    broken, fixed = of_kind(publisher, "condition")[3:]
    assert broken["native_code"] == BAD_INPUT_CODE and broken["message"] == (
        "error messages: the list broke off (T_ER 58 (T_ER_ACCESS_TIMEOUT)); "
        "conditions left as they were"
    )
    assert fixed == {"level": "normal", "native_code": BAD_INPUT_CODE}  # no normal for 1200


@pytest.mark.parametrize(
    ("query", "what", "expected"),
    [
        ("R_RI:26", "program status", "S_RI"),  # pyLSV2 alone would say UNDEFINED: READY
        ("R_MB", "PLC D0 (part_count)", "S_MB"),  # pyLSV2 alone would give no value at all
    ],
)
async def test_an_answer_of_the_wrong_kind_is_not_taken_for_a_value(
    peer: Lsv2Peer, caplog: pytest.LogCaptureFixture, query: str, what: str, expected: str
) -> None:
    peer.program_state = 0
    peer.set_plc("D0", 7)
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer, part_count="D0")), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    connections = peer.connections
    peer.answer_once(query, telegram("T_OK"))
    await eventually(lambda: peer.connections == connections + 1)  # a new session
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await polled(peer, 3)
    await running.finish()
    assert [d["execution"] for d in of_kind(publisher, "execution")] == ["ACTIVE"]
    assert of_kind(publisher, "partcount") == [{"count": 7, "kind": "all"}]
    assert of_kind(publisher, "availability") == [{"availability": "AVAILABLE"}]
    warning, cleared = of_kind(publisher, "condition")[1:]
    assert warning["native_code"] == BAD_INPUT_CODE and "not LSV2" in warning["message"]
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert f"{what}: answered T_OK, expected {expected}" in caplog.text


async def test_an_unknown_program_status_is_reported_and_the_last_one_stays(
    peer: Lsv2Peer,
) -> None:
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 3)
    peer.program_state = 9  # a number pyLSV2's PgmState does not have
    await eventually(lambda: len(of_kind(publisher, "condition")) == 2)
    peer.execution_mode = 3  # the mode still read: published with the last execution
    await eventually(lambda: len(of_kind(publisher, "execution")) == 2)
    peer.program_state = 10  # another unknown number: the same problem, not reported again
    await polled(peer, 3)
    peer.program_state = 0
    await eventually(lambda: len(of_kind(publisher, "condition")) == 3)
    await running.finish()
    warning, cleared = of_kind(publisher, "condition")[1:]
    assert warning["message"] == "program status: an answer pyLSV2 cannot decode (ValueError)"
    assert cleared == {"level": "normal", "native_code": BAD_INPUT_CODE}
    assert [(d["execution"], d["mode"]) for d in of_kind(publisher, "execution")] == [
        ("READY", "AUTOMATIC"), ("READY", "SEMI_AUTOMATIC"), ("ACTIVE", "SEMI_AUTOMATIC"),
    ]  # fmt: skip


async def test_a_control_that_only_sends_garbage_is_lost_once_and_recovers(
    peer: Lsv2Peer,
) -> None:
    peer.garbage(forever=True)  # from the first telegram of every connection
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: peer.connections >= 4)
    assert [k for k, _ in facts(publisher)] == ["condition", "availability", "condition"]
    warning, lost = of_kind(publisher, "condition")
    assert warning["native_code"] == BAD_INPUT_CODE
    assert lost["level"] == "unavailable" and lost["native_code"] == CONNECTION_CODE
    assert "the control answers, but not in LSV2" in lost["message"]
    peer.no_garbage()
    await eventually(lambda: of_kind(publisher, "availability")[-1]["availability"] == "AVAILABLE")
    await eventually(lambda: len(of_kind(publisher, "condition")) == 5)
    await running.finish()
    assert of_kind(publisher, "condition")[2:] == [
        {"level": "normal", "native_code": CONNECTION_CODE},
        {"level": "normal"},
        {"level": "normal", "native_code": BAD_INPUT_CODE},
    ]


async def test_a_control_that_closes_while_connecting_is_a_loss_not_bad_input(
    peer: Lsv2Peer,
) -> None:
    peer.close_on("R_PR")  # after the version queries, before the buffer size is agreed
    with pytest.raises(ConnectionError) as lost:  # the control gone, not a telegram not LSV2
        await Lsv2Adapter(config(peer)).check()
    assert "the control closed the connection" in str(lost.value)
    peer.close_on("R_PR")
    publisher = InMemoryPublisher()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) >= 5)  # lost, then back
    await running.finish()
    assert [k for k, _ in facts(publisher)[:2]] == ["availability", "condition"]
    assert of_kind(publisher, "condition")[0]["native_code"] == CONNECTION_CODE
    assert BAD_INPUT_CODE not in [c.get("native_code") for c in of_kind(publisher, "condition")]


def lsv2_threads(machine_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"lsv2-{machine_id}_")]


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_stopping_during_a_hung_call_returns_at_once_and_publishes_no_loss(
    peer: Lsv2Peer, how: str
) -> None:
    publisher = InMemoryPublisher()
    adapter = Lsv2Adapter(config(peer, machine_id="TNC-HUNG", timeout_s=10.0))
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == 3)
    peer.hang()
    await eventually(lambda: peer.unanswered >= 1)  # the adapter waits for an answer
    if how == "stop":
        running.stop.set()
        # Well before the control's timeout of 10 s (a bound, not a measure of speed).
        await asyncio.wait_for(running.task, 5)
    else:
        running.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running.task, 5)
    assert of_kind(publisher, "availability") == [{"availability": "AVAILABLE"}]
    assert len(publisher.published) == 3
    # The blocked call was ended, so the control's worker thread ends too.
    await eventually(lambda: not lsv2_threads("TNC-HUNG"))


async def test_check_on_a_control_that_does_not_answer_names_it(peer: Lsv2Peer) -> None:
    peer.hang()  # the connection is accepted, no telegram is answered
    with pytest.raises(ControlLost) as silent:
        await Lsv2Adapter(config(peer, timeout_s=0.2)).check()
    where = f"127.0.0.1:{peer.port}"
    assert str(silent.value) == f"cannot connect to {where} (no answer within 0.2 s)"
    assert isinstance(silent.value, ConnectionError)


def test_an_ipv6_address_is_refused_plainly() -> None:
    with pytest.raises(ValidationError) as caught:
        Lsv2Config(machine_id="M1", host="fd00::40")
    (error,) = caught.value.errors()
    assert error["loc"] == ("host",)
    assert "pyLSV2 1.8 connects over IPv4 only" in error["msg"]


async def test_the_fake_refuses_a_telegram_too_short_for_its_parameters(peer: Lsv2Peer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    try:
        writer.write(telegram("R_RI", b"\x00"))  # a run-info query needs 2 bytes
        await writer.drain()
        answer = await reader.readexactly(10)
    finally:
        writer.close()
    assert answer == refusal(T_ER_BAD_FORMAT)


class FailsOnce(InMemoryPublisher):
    """A publisher whose next ``publish_many`` fails once ``fail`` is set (NATS and the
    store-and-forward buffer both out)."""

    fail = False
    failures = 0

    async def publish_many(self, events: list[Any]) -> list[Any]:
        if self.fail:
            self.fail, self.failures = False, self.failures + 1
            raise ConnectionError("publishing failed")
        return await super().publish_many(events)


async def test_a_failed_publish_is_made_good_by_the_next_poll(peer: Lsv2Peer) -> None:
    peer.errors = [GUARD_OPEN]
    publisher = FailsOnce()
    running = Running(Lsv2Adapter(config(peer)), publisher)
    await eventually(lambda: len(publisher.published) == 4)
    publisher.fail = True
    peer.program_state = 0  # NC start: its event is the one that fails
    await eventually(lambda: publisher.failures == 1)
    await eventually(
        lambda: any(d["execution"] == "ACTIVE" for d in of_kind(publisher, "execution"))
    )
    await polled(peer, 3)
    await running.finish()
    # The next poll publishes what the failed one could not, and nothing else: no second
    # AVAILABLE or reset, the active fault neither cleared nor raised again.
    assert [k for k, _ in facts(publisher)[:4]] == [
        "availability", "condition", "execution", "condition"
    ]  # fmt: skip
    assert facts(publisher)[4:] == [
        ("execution", {"execution": "ACTIVE", "mode": "AUTOMATIC",
                       "program": "TNC:\\nc_prog\\PART-7.h"}),
    ]  # fmt: skip


async def test_unreachable_from_the_start_publishes_unavailable_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.machines.lsv2")
    nobody = Lsv2Peer()
    await nobody.start()
    await nobody.stop()  # its port: nothing listens there
    with pytest.raises(ControlLost) as refused:  # the socket's error, named as the others do
        await Lsv2Adapter(config(nobody)).check()
    assert str(refused.value).startswith(f"cannot connect to 127.0.0.1:{nobody.port} (")
    assert "Connection refused" in str(refused.value)
    publisher = InMemoryPublisher()
    adapter = Lsv2Adapter(config(nobody, reconnect_max_s=0.8))
    running = Running(adapter, publisher)
    # A few reconnect attempts: still one UNAVAILABLE, and the waits grow to the longest.
    await eventually(lambda: len(waits(caplog)) >= 3)
    await running.finish()
    assert [kind for kind, _ in facts(publisher)] == ["availability", "condition"]
    assert of_kind(publisher, "condition")[0]["native_code"] == CONNECTION_CODE
    assert waits(caplog)[:3] == [0.5, 0.8, 0.8]  # after 0.25 s: doubling up to 0.8 s
    # One loss, one warning: pyLSV2's own error line for each refused attempt is at debug.
    loud = [(r.name, r.levelname) for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [("adapters.machines.lsv2", "WARNING")]
    assert any(r.name == "LSV2 TCP" and "refused" in r.getMessage() for r in caplog.records)


def waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits before each further reconnect attempt, as the adapter logged them."""
    found = (re.search(r"still lost .*next attempt in ([0-9.]+) s", r.getMessage())
             for r in caplog.records)  # fmt: skip
    return [float(m[1]) for m in found if m]


async def test_check_returns_the_first_events_of_run_and_leaves_no_state(peer: Lsv2Peer) -> None:
    peer.errors = [GUARD_OPEN]
    peer.program_state = 0
    adapter = Lsv2Adapter(config(peer))
    events = await adapter.check()
    publisher = InMemoryPublisher()
    running = Running(adapter, publisher)
    await eventually(lambda: len(publisher.published) == len(events))
    await running.finish()
    assert [e.envelope.data for _, e in publisher.published] == [e.data for e in events]


def test_a_reread_makes_the_same_ids_and_one_event_per_poll() -> None:
    at = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
    reading = Reading(mode=4, program_state=0, program="TNC:\\P.h")

    def changes(adapter: Lsv2Adapter, reading: Reading, at: datetime) -> list[Any]:
        return adapter._changes(adapter.state, reading, at)

    first = changes(Lsv2Adapter(Lsv2Config(machine_id="M1", host="tnc")), reading, at)
    again = changes(Lsv2Adapter(Lsv2Config(machine_id="M1", host="tnc")), reading, at)
    assert [e.id for e in first] == [e.id for e in again]
    # Mode, execution and program changed in one poll: one execution event, not three.
    adapter = Lsv2Adapter(Lsv2Config(machine_id="M1", host="tnc"))
    changes(adapter, Reading(mode=0, program_state=7, program="TNC:\\O.h"), at)
    later = at.replace(minute=1)
    changed = changes(adapter, reading, later)
    assert [e.data for e in changed] == [
        {"execution": "ACTIVE", "mode": "AUTOMATIC", "program": "TNC:\\P.h"}
    ]
    assert changes(adapter, reading, later.replace(minute=2)) == []
    # Not read (None) or no mode to tell (UNDEFINED): stays as published, nothing new.
    assert changes(adapter, Reading(mode=5, program_state=None, program=None), later) == []


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("M100", "M100 is a marker (one bit), not a number that can count parts"),
        (
            "W1091",
            "a word (signed, -32768..32767) starts at a byte address that is a multiple of 2",
        ),
        ("D1202", "(D1200 or D1204)"),
        ("X12", "is not a PLC address"),
        ("S3", "is a string"),
    ],
)
def test_a_counter_address_that_cannot_count_is_refused(address: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Lsv2Config(machine_id="M1", host="tnc", part_count=address)
    (error,) = caught.value.errors()
    assert error["loc"] == ("part_count",)
    assert message in error["msg"]


def test_the_config_file_error_names_file_key_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "mes-hub.toml"
    path.write_text('[[adapters.lsv2]]\nmachine_id = "TNC-1"\nhost = "tnc"\npart_count = "M5"\n')
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert str(path) in text and "adapters.lsv2.0.part_count" in text and "marker" in text
    path.write_text('[[adapters.lsv2]]\nmachine_id = "TNC 1"\nhost = "tnc"\nspeed = 2\n')
    with pytest.raises(AdapterConfigError) as caught:
        load_adapters(path)
    text = str(caught.value)
    assert "adapters.lsv2.0.machine_id" in text and "adapters.lsv2.0.speed" in text


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "[[adapters.lsv2]]" in b)
    path = tmp_path / "mes-hub.toml"
    path.write_text(example)
    (entry,) = load_adapters(path).lsv2
    assert entry.counters() == {"all": "D1200", "bad": "D1204"}
    assert entry.plc_password is not None
