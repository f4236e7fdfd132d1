"""A Haas control's Machine Data Collection port on loopback, for tests and benchmarks.

It answers as Haas documents MDC (Setting 143, and the "Machine Data Collection - NGC" query
table; see docs/adapters/haas.md): ASCII query lines ``?Q100``, ``?Q104``, ``?Q500``,
``?Q600 <n>`` (uppercase only), each answered with ``<STX>payload<ETB><CR><LF>>``:

    ?Q100       SERIAL NUMBER, 1234567
    ?Q104       MODE, MEM
    ?Q500       PROGRAM, O00012, IDLE, PARTS, 380      (STATUS, BUSY while a program runs)
    ?Q600 3901  MACRO, 380.000000                      (MACRO, 3901, 380.000000 if numbered)
    anything    UNKNOWN

At most two clients are served at a time; a third is closed at once. Every reply goes to
every connected client, as the control does. Queries are answered one at a time, in the order
they came, whichever client sent them. Knobs: the machine's state (``set``), ``drop()`` (close
the connections), ``hang()`` (accept, read, never answer), ``garbage()`` (junk bytes to every
client now), ``noise`` (junk sent before every reply, one entry after the other), ``replies`` (a
fixed, possibly malformed or non-ASCII, payload for a query), ``delay_s`` (the time the control
takes for each answer), ``interleave`` (before answering a query, answer another client's query
first, as if that client had sent it just before: the deterministic form of two clients asking
at once; that query is not in ``queries``). Every query line received is kept in ``queries``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

MAX_CLIENTS = 2
DEFAULT_JUNK = b"\xff\xfe#@!junk\r\n"


class HaasPeer:
    def __init__(
        self,
        *,
        serial: str = "1234567",
        program: str = "O00012",
        status: str = "IDLE",
        mode: str = "MEM",
        parts: int = 0,
        macros: dict[int, float] | None = None,
        numbered_macros: bool = False,
        ngc_framing: bool = False,
        busy_answers_all: bool = False,
    ) -> None:
        self.serial = serial
        self.program = program
        self.status = status  # IDLE, BUSY, FEED HOLD, ALARM ON, …
        self.mode = mode
        self.parts = parts  # Q500's PARTS
        self.macros: dict[int, float] = dict(macros or {})
        self.numbered_macros = numbered_macros  # "MACRO, <n>, <value>" instead of "MACRO, <value>"
        self.ngc_framing = ngc_framing  # ">payload\r\n" instead of STX payload ETB CR LF >
        # "STATUS, BUSY" to every query while busy (Setting 143's wording allows that reading)
        self.busy_answers_all = busy_answers_all
        self.replies: dict[str, str] = {}  # query -> payload sent instead of the real answer
        self.delay_s = 0.0  # each answer takes this long (a slow control, a busy network)
        # query -> the other client's query the control answers just before it
        self.interleave: dict[str, str] = {}
        self.noise: list[bytes] = []  # junk sent before every reply, in turn
        self._noise_at = 0
        self._answering = asyncio.Lock()  # one query at a time, as the control's MDC task
        self.queries: list[str] = []
        self.refused = 0  # clients closed because two were connected
        self.port = 0
        self._hung = False
        self._server: asyncio.Server | None = None
        self._clients: list[asyncio.StreamWriter] = []

    # --- running ---------------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self.drop()
            await self._server.wait_closed()
            self._server = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    # --- knobs -----------------------------------------------------------------------------

    def set(self, **state: Any) -> None:
        """Change the machine: ``program``, ``status``, ``mode``, ``parts``, ``macros``…"""
        for name, value in state.items():
            if not hasattr(self, name) or name.startswith("_"):
                raise AttributeError(name)
            setattr(self, name, value)

    def macro(self, variable: int, value: float) -> None:
        self.macros[variable] = value

    async def drop(self) -> None:
        """Close every client connection (the control's network restarting)."""
        clients, self._clients = self._clients, []
        for writer in clients:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def hang(self, hung: bool = True) -> None:
        """Accept and read, but never answer (a control whose MDC task stalled)."""
        self._hung = hung

    def garbage(self, data: bytes = DEFAULT_JUNK) -> None:
        """Send ``data`` to every client now (line noise, a wrong device on the port)."""
        for writer in self._clients:
            writer.write(data)

    # --- the protocol ----------------------------------------------------------------------

    def answer(self, query: str) -> str:
        if query in self.replies:
            return self.replies[query]
        if self.busy_answers_all and self.status == "BUSY" and query != "?Q100":
            return "STATUS, BUSY"
        if query == "?Q100":
            return f"SERIAL NUMBER, {self.serial}"
        if query == "?Q101":
            return "SOFTWARE VERSION, 100.17.000.2037"
        if query == "?Q102":
            return "MODEL, VF2"
        if query == "?Q104":
            return f"MODE, {self.mode}"
        if query in ("?Q402", "?Q403"):
            return f"M30 #{1 if query == '?Q402' else 2}, {self.parts}"
        if query == "?Q500":
            if self.status == "BUSY":
                return "STATUS, BUSY"  # program and parts are not shown while busy
            return f"PROGRAM, {self.program}, {self.status}, PARTS, {self.parts}"
        command, _, variable = query.partition(" ")
        if command == "?Q600" and variable.isdigit():
            value = self.macros.get(int(variable), 0.0)
            if self.numbered_macros:
                return f"MACRO, {int(variable)}, {value:.6f}"
            return f"MACRO, {value:.6f}"
        return "UNKNOWN"

    def frame(self, payload: str) -> bytes:
        # UTF-8: a non-ASCII payload (a test's malformed reply) goes out as its bytes.
        if self.ngc_framing:
            return b">" + payload.encode() + b"\r\n"
        return b"\x02" + payload.encode() + b"\x17\r\n>"

    async def _respond(self, query: str) -> None:
        async with self._answering:
            other = self.interleave.get(query)
            for asked in ([other] if other else []) + [query]:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self._broadcast(self.frame(self.answer(asked)))

    def _broadcast(self, reply: bytes) -> None:
        if self.noise:
            reply = self.noise[self._noise_at % len(self.noise)] + reply
            self._noise_at += 1
        for client in list(self._clients):
            client.write(reply)  # every reply goes to every client

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            self.refused += 1
            writer.close()
            return
        self._clients.append(writer)
        buffer = b""
        try:
            while data := await reader.read(4096):
                buffer += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    query = raw.decode("ascii", errors="replace").strip()
                    if not query:
                        continue
                    self.queries.append(query)
                    if not self._hung:
                        await self._respond(query)
        except (ConnectionError, OSError):
            pass
        finally:
            if writer in self._clients:
                self._clients.remove(writer)
            writer.close()
