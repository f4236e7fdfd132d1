"""``mes-hub demo`` as first contact runs it: ``make demo | cat`` (stdout a pipe, no terminal
width) and on a terminal (the live table, unchanged). Issue 10."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

MES_HUB = [sys.executable, "-m", "hub"]
# What would make Rich take a pipe for a terminal, or give it a width: the user's pipe has none.
TERMINAL_ENV = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM")
COLUMNS = ["machine", "avail.", "execution", "order", "parts", "bad", "A", "P", "Q", "OEE", "alarm"]


def demo_args(tmp_path: Path, duration: int) -> list[str]:
    return [
        *MES_HUB, "demo", "--machines", "4", "--speed", "3000", "--duration", str(duration),
        "--data-dir", str(tmp_path / "demo"),
    ]  # fmt: skip


def without_terminal_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}


def test_a_piped_demo_says_what_it_does_as_it_goes_and_prints_the_whole_table(
    tmp_path: Path,
) -> None:
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(
        demo_args(tmp_path, duration=10),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=without_terminal_env(),
    )
    watchdog = threading.Timer(180, process.kill)
    watchdog.start()
    # Each line as it arrives, and whether the demo was still running then.
    lines: list[tuple[str, bool]] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((line.rstrip("\n"), process.poll() is None))
        assert process.wait(60) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    finally:
        watchdog.cancel()
        process.kill()
        stderr.close()
    text = [line for line, _ in lines]
    output = "\n".join(text)

    # Progress from the first moment, flushed as it happens: the first line comes before the
    # hub is up, and the counts arrive while the simulation still runs.
    assert text[0].startswith("starting the hub"), output
    assert any(line.startswith("simulating 4 machines") for line in text), output
    summary_at = next(i for i, line in enumerate(text) if line.startswith("Summary:"))
    running = [
        line
        for line, alive in lines[:summary_at]
        if alive and re.search(r"events stored: \d+", line)
    ]
    assert running, output
    # Lines are not folded at a width the pipe does not have: the curl command is one line.
    assert any(
        re.fullmatch(r"try: curl -H 'Authorization: Bearer \S+' http://\S+/api/v1/machines", line)
        for line in text
    ), output

    # The final table at its full width: every column, nothing cut, nothing ellipsized.
    top = next(i for i, line in enumerate(text) if line.startswith("┏"))
    bottom = next(i for i, line in enumerate(text) if line.startswith("└"))
    table = text[top : bottom + 1]
    header = [cell.strip() for cell in table[1].strip("┃").split("┃")]
    assert header == COLUMNS, output
    assert len({len(line) for line in table}) == 1, output  # no row cut short
    for line in table[3:-1]:
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert re.fullmatch(r"M000[1-4]", cells[0]) and cells[1] in ("AVAILABLE", "UNAVAILABLE")
    assert sorted(line.split("│")[1].strip() for line in table[3:-1]) == [
        "M0001", "M0002", "M0003", "M0004",
    ]  # fmt: skip
    title = next(i for i, line in enumerate(text) if "mes-hub demo —" in line)
    assert "…" not in "\n".join(text[title : bottom + 1]), output
    summary = re.search(r"(\d+) events published, (\d+) stored exactly once", text[summary_at])
    assert summary is not None and int(summary.group(1)) > 100, output


def test_on_a_terminal_the_demo_shows_the_live_table_as_before(tmp_path: Path) -> None:
    """The terminal keeps the live view: a table redrawn in place, no progress lines."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    process = subprocess.Popen(
        demo_args(tmp_path, duration=4),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
        env={**without_terminal_env(), "TERM": "xterm-256color"},
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:  # the live view redraws twice a second: read it all, or it would block
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the demo closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert process.wait(120) == 0
    finally:
        process.kill()
    deadline = time.monotonic() + 10
    while reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.close(controller)
    output = b"".join(chunks).decode(errors="replace")
    assert "\x1b[2K" in output  # the live table erases and redraws its lines
    assert "M0004" in output and "Summary" in output
    assert "starting the hub" not in output and "events stored:" not in output
