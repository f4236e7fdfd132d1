"""Small files the hub keeps beside its store (a cursor, a position, a "since" moment)."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """``text`` in ``path``, whole or not at all: written beside it, then renamed over it, so
    a crash never leaves a half-written or empty file to be read at the next start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
