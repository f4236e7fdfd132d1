"""Fake machines on a serial line, for the serial status adapter and the DNC drip feed: each is
the master side of a pseudo-terminal pair (``os.openpty``); the "machine port" the code under
test opens is the slave, reached through a symlink (``link``) that can be repointed, as a
udev ``/dev/serial/by-id/…`` name is when a USB adapter comes back.

- ``SerialMachine`` prints status lines (and noise) on demand, can be unplugged (the pty is
  closed and the link removed) and plugged back (a new pty behind the same link).
- ``FakeControl`` is a control reading a drip feed: a small receive buffer that it "executes"
  at ``consume_per_s``, XOFF at the high-water mark, XON at low water, and an overrun recorded
  whenever more bytes arrive than the buffer holds. ``never_xon`` makes it stop answering after
  its first XOFF (a control in alarm); ``stop_reading`` makes it stop reading the line at all
  (a hung control or a pulled cable: the sender's buffers fill). ``after_xoff`` holds, per
  XOFF, the bytes that arrived after it until the XON: what a sender's late reaction to XOFF
  costs, which a test bounds by its chunk size (the buffer's room above the high-water mark
  is far larger, so an overrun alone would not show a sender a few chunks late)."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from pathlib import Path

XON, XOFF = b"\x11", b"\x13"


class _Pty:
    """One pseudo-terminal, both ends raw, its slave reachable at ``link``."""

    def __init__(self, link: Path) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self._slave)
        self.device = os.ttyname(self._slave)
        temporary = link.with_name(link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(self.device)
        temporary.replace(link)  # atomic: the link never points nowhere while being moved

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SerialMachine:
    """A machine that prints status lines on its serial port."""

    def __init__(self, link: Path, end: bytes = b"\r\n") -> None:
        self.link = link
        self.end = end
        self._pty: _Pty | None = _Pty(link)

    @property
    def master(self) -> int:
        assert self._pty is not None, "unplugged"
        return self._pty.master

    def print(self, *lines: str) -> None:
        """Print lines, each ended as the machine does."""
        self.send(b"".join(line.encode("latin-1") + self.end for line in lines))

    def send(self, data: bytes) -> None:
        """Raw bytes on the line (noise, a half line)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def unplug(self) -> None:
        """The device disappears: the pty is closed and the link removed."""
        if self._pty is not None:
            self._pty.close()
            self._pty = None
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()

    def plug(self) -> None:
        """A new device appears behind the same link."""
        self.unplug()
        self._pty = _Pty(self.link)

    def close(self) -> None:
        self.unplug()


class FakeControl:
    """A control reading a drip feed on the master side of a pty, in a thread of its own."""

    def __init__(
        self,
        link: Path,
        capacity: int = 1024,
        high_water: int = 384,
        low_water: int = 128,
        consume_per_s: float = 2500.0,
        never_xon: bool = False,
    ) -> None:
        self.stop_reading = threading.Event()
        self.link = link
        self.capacity = capacity
        self.high_water = high_water
        self.low_water = low_water
        self.consume_per_s = consume_per_s
        self.never_xon = never_xon
        self.received = bytearray()  # every byte that arrived, in order
        self.overruns = 0  # arrivals that found the buffer full
        self.xoffs = 0
        self.xons = 0
        self.after_xoff: list[int] = []  # per XOFF: bytes that arrived before the next XON
        self.level = 0.0  # bytes in the receive buffer
        self._pty = _Pty(link)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fake-control", daemon=True)
        self._thread.start()

    @property
    def paused(self) -> bool:
        """Whether the control's last word was XOFF."""
        return self.xoffs > self.xons

    def _run(self) -> None:
        master = self._pty.master
        last = time.monotonic()
        while not self._stop.is_set():
            if self.stop_reading.is_set():
                time.sleep(0.005)
                continue
            ready, _, _ = select.select([master], [], [], 0.005)
            now = time.monotonic()
            with self._lock:
                self.level = max(0.0, self.level - (now - last) * self.consume_per_s)
                last = now
                if ready:
                    try:
                        data = os.read(master, 4096)
                    except OSError:  # no slave open right now
                        data = b""
                        time.sleep(0.005)
                    self.received += data
                    self.level += len(data)
                    if self.paused:
                        self.after_xoff[-1] += len(data)
                    if self.level > self.capacity:
                        self.overruns += 1
                        self.level = float(self.capacity)  # what did not fit is lost
                if not self.paused and self.level >= self.high_water:
                    os.write(master, XOFF)
                    self.xoffs += 1
                    self.after_xoff.append(0)
                elif self.paused and self.level <= self.low_water and not self.never_xon:
                    os.write(master, XON)
                    self.xons += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pty.close()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
