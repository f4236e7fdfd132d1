"""A HEIDENHAIN control as pyLSV2 1.8 sees it: an asyncio LSV2 server on loopback.

Built from pyLSV2's client (``pyLSV2/client.py``, ``low_level_com.py``, ``misc.py``) and its
protocol notes (``docs/protocol.rst``), not from a real control. A telegram is a 4-byte
big-endian payload length, a 4-character command, the payload; the server answers every
telegram pyLSV2 sends for connecting, logging in and out and for the adapter's queries:

- ``A_LG`` login (name, NUL, optional password, NUL) -> ``T_OK``, or ``T_ER`` for ``DNC``
  without the DNC option and for ``PLCDEBUG`` with a wrong password; ``A_LO`` logout -> ``T_OK``;
- ``R_VR`` versions, ``R_PR`` system parameters (120 bytes), ``R_CI`` system information,
  ``C_CC`` buffer size and secure file send -> ``S_VR``, ``S_PR``, ``S_CI``, ``T_OK``;
- ``R_RI`` 23 execution mode, 24 program stack, 26 program status, 27/28 first/next error
  (``T_ER`` 57 "no next error" when the list ends) -> ``S_RI``; these need the DNC login;
- ``R_MB`` PLC memory (4-byte address, 1-byte count) -> ``S_MB``; needs the PLCDEBUG login.

Anything else is answered ``T_ER`` 22 (unknown telegram), as a control does, and a telegram too
short for its parameters ``T_ER`` 20 (bad format). Knobs change what the control shows
(``execution_mode``, ``program_state`` — any number, also one pyLSV2 does not know —,
``program``, ``errors``, ``set_plc``), refuse the DNC option (``dnc_option``), refuse or break
off the error list (``error_list_refusal``, ``error_list_breaks_after``), answer a query with the
wrong kind of telegram (``answer_once``), and break the line (``drop``, ``close_on``, ``hang``,
``garbage``, ``truncate``). ``logins``, ``telegrams``, ``connected_at`` and ``unanswered``
record what clients did.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass

# pyLSV2's LSV2StatusCode values the server answers with (T_ER payload: type 1, code).
T_ER_BAD_FORMAT = 20
T_ER_UNKNOWN_TELE = 22
T_ER_NO_PRIV = 23
T_ER_WRONG_PARA = 24
T_ER_BAD_MEMADR = 52
T_ER_NO_NEXT_ERROR = 57
T_ER_ACCESS_TIMEOUT = 58

# The PLC memory map the server reports in R_PR (absolute byte addresses).
WORDS_START = 0x1000
NUMBER_OF_WORDS = 8192  # word memory W0..W16382, D0..D8188 (pyLSV2 allows 8192 / 4 dwords)
INPUT_WORDS_START = 0x9000
OUTPUT_WORDS_START = 0xA000
NUMBER_OF_IO_WORDS = 256
MEMORY_SIZE = 0xB000
_AREAS = {  # PLC address area -> (start, struct format of a value, little-endian as pyLSV2 reads)
    "B": (WORDS_START, "<b"),
    "W": (WORDS_START, "<h"),
    "D": (WORDS_START, "<l"),
    "IW": (INPUT_WORDS_START, "<H"),
    "ID": (INPUT_WORDS_START, "<l"),
    "OW": (OUTPUT_WORDS_START, "<H"),
    "OD": (OUTPUT_WORDS_START, "<l"),
}


@dataclass(frozen=True)
class PeerError:
    """An error message the control shows: class and group as HEIDENHAIN's DNC numbers them."""

    number: int
    text: str
    error_class: int = 8  # error
    group: int = 1  # operating


def telegram(command: str, payload: bytes = b"") -> bytes:
    return struct.pack("!L", len(payload)) + command.encode("ascii") + payload


def refusal(code: int) -> bytes:
    return telegram("T_ER", struct.pack("!BB", 1, code))


def _system_parameters() -> bytes:
    """R_PR's answer in the 120-byte layout pyLSV2 decodes (``misc.decode_system_parameters``)."""
    values = [
        0x0, 10000,  # markers: start, count
        0x400, 1000,  # inputs
        0x600, 1000,  # outputs
        0x800, 48,  # counters
        0x900, 48,  # timers
        WORDS_START, NUMBER_OF_WORDS,  # words
        0x8000, 100,  # strings
        128,  # max string length (B)
        0, 0, 0, 0, 0, 0, 0,  # 7 unknown bytes
        INPUT_WORDS_START, NUMBER_OF_IO_WORDS,  # input words (L)
        OUTPUT_WORDS_START, NUMBER_OF_IO_WORDS,  # output words (L)
        0, 0, 0, 0,  # 4 unknown longs
        2, 0,  # LSV2 version, flags (B)
        4096,  # max block length (H)
        0, 0, 0, 0,  # bin version, revision, ISO version, revision (B)
        0, 0,  # hardware version, flags ex (L)
        0, 0,  # max trace line, scope channels (H)
        0,  # password encryption key (L)
    ]  # fmt: skip
    return struct.pack("!14L8B8L2BH4B2L2HL", *values)


# The parameters each command must carry (bytes): a shorter telegram is refused, not a crash.
_PAYLOAD_AT_LEAST = {"A_LG": 1, "R_RI": 2, "R_CI": 4, "C_CC": 2, "R_MB": 5}


class Lsv2Peer:
    """The control. ``port`` is known after ``start``; ``stop`` then ``start`` again reuses it."""

    def __init__(self) -> None:
        self.port = 0
        self.execution_mode = 4  # pyLSV2 ExecState: AUTOMATIC
        self.program_state = 7  # pyLSV2 PgmState: IDLE
        self.program = "TNC:\\nc_prog\\PART-7.h"  # the main program of the stack
        self.current_program = "TNC:\\nc_prog\\PART-7.h"  # the stack's current (sub)program
        self.line = 0
        self.errors: list[PeerError] = []
        self.dnc_option = True  # without it, the DNC login is refused
        # A control that does not give its error messages over LSV2 (pyLSV2's notes: the
        # TNC 640 without TNCremoPlus) answers R_RI 27 with T_ER: this code (22, unknown
        # telegram, for one), or None to list them.
        self.error_list_refusal: int | None = None
        # After this many errors, the next R_RI 28 is answered T_ER 58 (access timeout) instead
        # of the next error: a list broken off partway. None: the whole list.
        self.error_list_breaks_after: int | None = None
        self.plc_password: str | None = None  # PLCDEBUG asks for it when set
        self.memory = bytearray(MEMORY_SIZE)
        self.logins: list[str] = []  # every login name received, in order
        self.telegrams: list[str] = []  # every command received, in order
        self.connections = 0
        self.connected_at: list[float] = []  # time.monotonic() of each connection accepted
        self.unanswered = 0  # telegrams received while hung
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._hung = False
        self._resumed = asyncio.Event()
        self._garbage: bool | None = False  # None: for ever
        self._truncate = False
        self._answers_once: dict[str, bytes] = {}
        self._close_on: str | None = None

    # --- knobs ---------------------------------------------------------------------------

    def set_plc(self, address: str, value: int) -> None:
        """Write a PLC value as the PLC program would: ``set_plc("D1200", 17)``."""
        for area in ("IW", "ID", "OW", "OD", "B", "W", "D"):
            if address.startswith(area) and address[len(area) :].isdigit():
                start, fmt = _AREAS[area]
                offset = start + int(address[len(area) :])
                struct.pack_into(fmt, self.memory, offset, value)
                return
        raise ValueError(f"not a numeric PLC address: {address}")

    def drop(self) -> None:
        """Close every client connection now; new ones are accepted."""
        for writer in list(self._writers):
            writer.close()

    def hang(self) -> None:
        """Stop answering (connections stay open) until ``resume``."""
        self._hung = True
        self._resumed.clear()

    def resume(self) -> None:
        self._hung = False
        self._resumed.set()

    def garbage(self, forever: bool = False) -> None:
        """Answer the next telegram (``forever``: every one until ``no_garbage``) with one that
        is not LSV2 (a response code no control has)."""
        self._garbage = None if forever else True

    def no_garbage(self) -> None:
        self._garbage = False

    def close_on(self, command: str) -> None:
        """Close the connection, unanswered, when ``command`` (``R_PR``) next arrives: a control
        reset in the middle of a conversation."""
        self._close_on = command

    def answer_once(self, query: str, answer: bytes) -> None:
        """Answer the next ``query`` (``R_RI:26``, ``R_MB``, as in ``telegrams``) with ``answer``,
        a well-formed telegram of another kind than the query expects (``telegram("T_OK")``)."""
        self._answers_once[query] = answer

    def truncate(self) -> None:
        """Answer the next telegram with its start only, then close the connection (a control
        reset in the middle of an answer)."""
        self._truncate = True

    def polls(self) -> int:
        """Program status queries answered so far: one per adapter poll."""
        return self.telegrams.count("R_RI:26")

    # --- server --------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
            self.drop()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connected_at.append(time.monotonic())
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        logins: set[str] = set()
        errors_left: list[PeerError] = []
        try:
            while True:
                header = await reader.readexactly(8)
                length = struct.unpack("!L", header[:4])[0]
                command = header[4:].decode("latin1")
                payload = await reader.readexactly(length) if length else b""
                if command == self._close_on:
                    self._close_on = None
                    break
                if self._hung:
                    self.unanswered += 1
                    await self._resumed.wait()
                    continue  # a hung control forgets what it was asked
                answer = self._answer(command, payload, logins, errors_left)
                once = self._answers_once.pop(self.telegrams[-1], None)
                if once is not None:
                    answer = once
                if self._garbage is not False:
                    self._garbage = None if self._garbage is None else False
                    answer = telegram("?!#*", b"\x00\x01")
                if self._truncate:
                    self._truncate = False
                    writer.write(struct.pack("!L", 100) + answer[4:9])  # 100 bytes announced
                    await writer.drain()
                    break
                writer.write(answer)  # one write: pyLSV2 reads an answer with one recv
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(
        self, command: str, payload: bytes, logins: set[str], errors_left: list[PeerError]
    ) -> bytes:
        if len(payload) < _PAYLOAD_AT_LEAST.get(command, 0):
            self.telegrams.append(command)
            return refusal(T_ER_BAD_FORMAT)  # too short for its parameters
        if command == "A_LG":
            name, _, rest = payload.partition(b"\x00")
            login, password = name.decode("latin1"), rest.rstrip(b"\x00").decode("latin1")
            self.logins.append(login)
            self.telegrams.append(f"A_LG:{login}")
            if login == "DNC" and not self.dnc_option:
                return refusal(T_ER_NO_PRIV)
            if login == "PLCDEBUG" and self.plc_password not in (None, password):
                return refusal(T_ER_NO_PRIV)
            logins.add(login)
            return telegram("T_OK")
        if command == "R_RI":
            selector = struct.unpack("!H", payload[:2])[0]
            self.telegrams.append(f"R_RI:{selector}")
            return self._run_info(selector, logins, errors_left)
        self.telegrams.append(command)
        if command == "A_LO":
            return telegram("T_OK")
        if command == "R_VR":
            return self._version(payload)
        if command == "R_PR":
            return telegram("S_PR", _system_parameters())
        if command == "R_CI":
            parameter = struct.unpack("!L", payload[:4])[0]
            info = {
                1: struct.pack("!LL", 1, 0),  # turbo mode: off
                2: struct.pack("!LL", 1, int(self.dnc_option)),  # DNC allowed
                3: struct.pack("!LL", 2, 3000),  # axes sampling rate
            }
            return telegram("S_CI", info[parameter]) if parameter in info else refusal(24)
        if command == "C_CC":
            system_command = struct.unpack("!H", payload[:2])[0]
            # 7: buffer 4096 bytes (the R_PR block length), 19: secure file send.
            return telegram("T_OK") if system_command in (7, 19) else refusal(T_ER_WRONG_PARA)
        if command == "R_MB":
            return self._memory(payload, logins)
        return refusal(T_ER_UNKNOWN_TELE)

    def _version(self, payload: bytes) -> bytes:
        if not payload:
            parts = [b"TNC640", b"340595 11 SP4", b"PLC BASIS 640-11", b"00000000000000000000"]
            return telegram("S_VR", b"\x00".join(parts) + b"\x00")
        texts = {5: b"ID 1234567", 6: b"Export", 7: b"SPLC 1.0"}
        text = texts.get(payload[0])
        return telegram("S_VR", text + b"\x00") if text else refusal(T_ER_WRONG_PARA)

    def _run_info(self, selector: int, logins: set[str], errors_left: list[PeerError]) -> bytes:
        if "DNC" not in logins and selector in (23, 24, 26, 27, 28):
            return refusal(T_ER_NO_PRIV)
        if selector == 23:
            return telegram("S_RI", struct.pack("!H", self.execution_mode))
        if selector == 24:
            names = self.program.encode("latin1") + b"\x00"
            names += self.current_program.encode("latin1") + b"\x00"
            return telegram("S_RI", struct.pack("!L", self.line) + names)
        if selector == 26:
            return telegram("S_RI", struct.pack("!H", self.program_state))
        if selector in (27, 28):
            if self.error_list_refusal is not None:
                return refusal(self.error_list_refusal)
            if selector == 27:
                errors_left[:] = self.errors
            listed = len(self.errors) - len(errors_left)
            if selector == 28 and listed == self.error_list_breaks_after:
                return refusal(T_ER_ACCESS_TIMEOUT)
            if not errors_left:
                return refusal(T_ER_NO_NEXT_ERROR)
            error = errors_left.pop(0)
            head = struct.pack("!HHl", error.error_class, error.group, error.number)
            return telegram("S_RI", head + error.text.encode("latin1") + b"\x00")
        return refusal(T_ER_WRONG_PARA)

    def _memory(self, payload: bytes, logins: set[str]) -> bytes:
        if "PLCDEBUG" not in logins:
            return refusal(T_ER_NO_PRIV)
        address, count = struct.unpack("!LB", payload[:5])
        if address + count > MEMORY_SIZE:
            return refusal(T_ER_BAD_MEMADR)
        return telegram("S_MB", bytes(self.memory[address : address + count]))
