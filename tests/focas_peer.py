"""A FANUC control's FOCAS2 Ethernet server on loopback, for the FOCAS adapter's tests and bench.

No faithful simulator of FOCAS exists and FANUC does not document the wire, so this peer is built
from the same public reverse-engineering notes as the adapter, and written apart from it (its own
encoding, no import of ``adapters.machines.focas``) so that one misreading does not hide itself:

- diohpix/pyfanuc ``README.md`` (the 10-byte header ``A0 A0 A0 A0``, version, type, length; the
  request and answer blocks), ``sample_multipacket.md`` (several calls in one request, their
  answers in one reply), ``sample_with_error.md`` (an answer with an error code and no data),
  ``protocol.txt`` (function numbers: 0x15 read macro, 0x19 statinfo, 0x1c program numbers,
  0x23 alarm messages) and ``pyfanuc.py`` (open 0x0101/0x0102, close 0x0201/0x0202, the 8-byte
  macro value: mantissa, base, exponent; FF FF when vacant);
- the alarm record of pyfanuc forks' ``readalarmcode`` (number, type, axis, text length as
  int32, then the text).

It answers ``cnc_statinfo``, ``cnc_rdprgnum``, ``cnc_rdmacro`` and ``cnc_rdalmmsg``; any other
function gets ``EW_FUNC`` (1), as a control without that function would. Knobs: the machine's
state (``aut``, ``run``, ``emergency``, ``alarm``, ``main_program``, ``macros``, ``alarms``),
``call_errors`` (function -> error code), ``macro_errors`` (macro variable -> error code),
``statinfo_30i`` (answer statinfo in the 30i's longer ODBST layout, ``hdck`` and ``tmmode``
first: 18 bytes), ``write_size`` (send every reply in pieces of that many bytes, each its own
TCP write), ``refuse_sessions``, and the faults ``drop()``, ``hang()`` / ``resume()`` and
``garbage(kind, replies)`` (the next replies broken: wrong magic, wrong length, noise).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass
from typing import Literal

MAGIC = b"\xa0\xa0\xa0\xa0"
SERVER_VERSION = 2  # what pyfanuc's samples show controls answering with
EW_FUNC = 1


@dataclass
class PeerAlarm:
    number: int
    type: int = 0
    axis: int = 0
    text: str = ""


Garbage = Literal["magic", "length", "noise", "type"]


def macro_bytes(mantissa: int, decimals: int, base: int = 10) -> bytes:
    """A macro value as the control sends it: mantissa, 0, base, 0, decimals."""
    return struct.pack(">ixBBB", mantissa, base, 0, decimals)


VACANT = struct.pack(">ixBBB", 0, 10, 0xFF, 0xFF)


class FocasPeer:
    """The server; ``start()`` on a free loopback port, ``stop()``; knobs as attributes."""

    def __init__(self) -> None:
        self.port = 0
        # cnc_statinfo: aut 1 (MEM), run 0 (reset), no emergency, no alarm
        self.aut = 1
        self.run = 0
        self.motion = 0
        self.mstb = 0
        self.emergency = 0
        self.alarm = 0
        self.edit = 0
        self.running_program = 1234
        self.main_program = 1234
        self.macros: dict[int, bytes] = {3901: macro_bytes(0, 0)}
        self.alarms: list[PeerAlarm] = []
        self.call_errors: dict[int, int] = {}
        self.macro_errors: dict[int, int] = {}
        self.statinfo_30i = False
        self.write_size: int | None = None
        self.refuse_sessions = False
        self.requests = 0  # requests (polls) answered
        self.sessions = 0  # sessions opened
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._answering = asyncio.Event()
        self._answering.set()
        self._garbage: Garbage | None = None
        self._garbage_left: int | None = 0  # replies still to break; None: every one

    def set_count(self, count: int, decimals: int = 0, macro: int = 3901) -> None:
        self.macros[macro] = macro_bytes(count * 10**decimals, decimals)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    # --- faults ----------------------------------------------------------------------------

    def drop(self) -> None:
        """Close every open connection (the server keeps listening)."""
        for writer in list(self._writers):
            writer.close()

    def hang(self) -> None:
        """Read requests and answer none (a control whose Ethernet task is stuck)."""
        self._answering.clear()

    def resume(self) -> None:
        self._answering.set()

    def garbage(self, kind: Garbage, replies: int | None = 1) -> None:
        """Break the next ``replies`` replies to a request (None: every one until
        ``clean()``): ``magic`` (not A0 A0 A0 A0), ``length`` (announces 3 bytes less than it
        sends), ``noise`` (bytes of another protocol), ``type`` (a frame type that does not
        answer a request)."""
        self._garbage, self._garbage_left = kind, replies

    def clean(self) -> None:
        """Replies follow the framing again."""
        self._garbage, self._garbage_left = None, 0

    async def served(self, n: int) -> None:
        """Wait until ``n`` more requests were answered (polls, not seconds)."""
        target = self.requests + n
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while self.requests < target:
            if loop.time() > deadline:
                raise AssertionError(f"the peer answered {self.requests}, not {target}")
            await asyncio.sleep(0.01)

    # --- the protocol ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                header = await reader.readexactly(10)
                magic, _version, frame_type, length = struct.unpack(">4sHHH", header)
                payload = await reader.readexactly(length)
                if magic != MAGIC:
                    return  # not FOCAS: a control drops the connection
                await self._answering.wait()
                if frame_type == 0x0101:
                    self.sessions += 1
                    if self.refuse_sessions:
                        await self._send(writer, self._frame(0x0103, b"\x00\x00"))
                        return
                    await self._send(writer, self._frame(0x0102, b""))
                elif frame_type == 0x0201:
                    await self._send(writer, self._frame(0x0202, b""))
                    return
                elif frame_type == 0x2101:
                    reply = self._frame(0x2102, self._answer(payload))
                    self.requests += 1
                    await self._send(writer, self._broken(reply))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _frame(self, frame_type: int, payload: bytes) -> bytes:
        return struct.pack(">4sHHH", MAGIC, SERVER_VERSION, frame_type, len(payload)) + payload

    def _broken(self, reply: bytes) -> bytes:
        kind, left = self._garbage, self._garbage_left
        if kind is None or left == 0:
            return reply
        if left is not None:
            self._garbage_left = left - 1
        if kind == "magic":
            return b"\xa1\xa1\xa1\xa1" + reply[4:]
        if kind == "length":
            (length,) = struct.unpack_from(">H", reply, 8)
            return reply[:8] + struct.pack(">H", length - 3) + reply[10:]
        if kind == "noise":
            return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
        if kind == "type":
            return reply[:6] + struct.pack(">H", 0x2103) + reply[8:]
        return reply

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        size = self.write_size
        if size is None:
            writer.write(data)
            await writer.drain()
            return
        for start in range(0, len(data), size):
            writer.write(data[start : start + size])
            await writer.drain()
            await asyncio.sleep(0)  # let each piece leave as its own segment

    def _answer(self, payload: bytes) -> bytes:
        (count,) = struct.unpack_from(">H", payload)
        offset, blocks = 2, []
        for _ in range(count):
            (size,) = struct.unpack_from(">H", payload, offset)
            c1, c2, function, *args = struct.unpack_from(">HHHiiiii", payload, offset + 2)
            offset += size
            error = self.call_errors.get(function, 0)
            if function == 0x15:
                error = self.macro_errors.get(args[0], error)
            data = b""
            if not error:
                try:
                    data = self._data(function, args)
                except KeyError:
                    error = EW_FUNC
            head = struct.pack(">HHHhhxxH", c1, c2, function, error, 0, len(data))
            blocks.append(struct.pack(">H", 2 + len(head) + len(data)) + head + data)
        return struct.pack(">H", count) + b"".join(blocks)

    def _data(self, function: int, args: list[int]) -> bytes:
        if function == 0x19:
            fields = (self.aut, self.run, self.motion, self.mstb, self.emergency, self.alarm,
                      self.edit)  # fmt: skip
            if self.statinfo_30i:
                return struct.pack(">9h", 0, 0, *fields)  # hdck, tmmode, then the same
            return struct.pack(">7h", *fields)
        if function == 0x1C:
            return struct.pack(">ii", self.running_program, self.main_program)
        if function == 0x15:
            first, last = args[0], args[1]
            return b"".join(self.macros.get(n, VACANT) for n in range(first, last + 1))
        if function == 0x23:
            wanted, text_length = args[1], args[3]
            records = []
            for alarm in self.alarms[:wanted]:
                text = alarm.text.encode("latin-1")[:text_length]
                head = struct.pack(">iiii", alarm.number, alarm.type, alarm.axis, len(text))
                records.append(head + text.ljust(text_length, b"\0"))
            return b"".join(records)
        raise KeyError(function)
