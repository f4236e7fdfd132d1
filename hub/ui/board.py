"""The plant board (``GET /ui/``): a tile per machine for a wall screen, coloured by state with
the state in words, its reason, how long it has been so, the running shift's OEE (provisional
while the shift is open), parts against target and the order it runs.

The tiles are ``hub.ui.floor.read_tiles``' (in the API's read pool), the very dicts the live
stream sends; ``static/board.js`` redraws a tile in place from each ``tiles`` event
(``hub.ui.live``), so a tile's colour follows a machine event within the stream's round.
``?sort=worst``: stopped and offline machines first, then the lowest OEE; else by machine id.
``?partial=1``: the tiles only (``board.js`` draws a machine it has no tile for from the
stream's tile itself, in the same markup)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from hub.api.deps import Context
from hub.api.policy import STATION_USERS
from hub.ui import charts
from hub.ui.access import ScreenUser, render
from hub.ui.floor import LOOKBACK, duration_text, read_tiles, state_word

router = APIRouter(prefix="/ui", include_in_schema=False)

DOWN = ("stopped", "offline")
# A shape beside the word (colour is never the only carrier; the word is the one read).
STATE_ICONS = {
    "running": "▶",
    "stopped": "■",
    "offline": "✕",
    "planned_stop": "‖",
    "no_shift": "\u2013",
    "not_commissioned": "\u2013",
}


def worst_first(tile: dict[str, Any]) -> tuple[int, float, str]:
    """The board's ``?sort=worst`` key: stopped and offline first, then the lowest OEE of the
    shift (none last), then the machine id. ``board.js`` sorts with the same key."""
    shift = tile.get("shift") or {}
    oee = shift.get("oee")
    return (
        0 if tile["state"] in DOWN else 1,
        math.inf if oee is None else float(oee),
        str(tile["machine_id"]),
    )


def sorted_tiles(tiles: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
    if sort == "worst":
        return sorted(tiles, key=worst_first)
    return sorted(tiles, key=lambda t: str(t["machine_id"]))


def since_text(since: str | None, now: datetime) -> str:
    """What ``mes.js`` shows in a ``data-since`` span (it counts on from here every second)."""
    if since is None:
        return f"over {int(LOOKBACK.total_seconds() // 3600)} h"
    return duration_text((now - datetime.fromisoformat(since)).total_seconds())


@router.get("/")
async def board_page(
    request: Request,
    context: Context,
    caller: ScreenUser,
    sort: str | None = None,
    partial: bool = False,
) -> Response:
    now = datetime.now(UTC)
    tiles = await context.reads.run(
        request, read_tiles, context.site, context.plant, None, now, True
    )
    sort = "worst" if sort == "worst" else "machine"
    values: dict[str, Any] = {
        "tiles": sorted_tiles(tiles, sort),
        "sort": sort,
        "now": now,
        "station": caller.role in STATION_USERS,
        "state_word": state_word,
        "state_icon": lambda s: STATE_ICONS.get(s, "\u2013"),
        "since_text": lambda s: since_text(s, now),
        "percent": charts.percent,
    }
    name = "board_tiles.html" if partial else "board.html"
    answer = render(request, name, caller, **values)
    answer.headers["Cache-Control"] = "no-store"
    return answer
