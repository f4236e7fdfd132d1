"""The operator station: a tablet at one machine (``/ui/station/{machine}``).

One big tile (the machine's state in colour and words, its reason, time in state, the order
running with its good parts, the shift's A, P, Q and OEE so far), the reason tree that asks
why once the machine has been stopped ``[plant] reason_prompt_after_s`` with no reason, the
shift's stops to label (or split in two), and the orders to start and end, scrap to report.

- ``GET /ui/station/{machine}``: the page, rendered here from ``read_station`` (useful before
  its script runs), with the same data as JSON in ``<script id="station-data">`` for
  ``static/station.js``; for ``STATION_USERS`` (a viewer gets the 403 page); a machine never
  heard of: the 404 page.
- ``GET /ui/station/{machine}/data``: that data as JSON (``read_station``'s), which the page
  fetches again when the live stream says its machine changed; a key or a session of
  ``STATION_USERS`` (problem+json otherwise, never a redirect: a script asks).
- ``GET /ui/stations``: the machines, each with a link to its station.

The page writes nothing through these routes: every tap is a CloudEvent the page posts to
``POST /api/v1/events`` with its session and CSRF token (``static/mes.js`` ``TapQueue``, which
keeps taps while the hub cannot be reached), so the API's rules decide and refuse."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from hub.api.deps import ApiContext, Caller, Context, require
from hub.api.policy import STATION_USERS
from hub.api.problems import Problem
from hub.ui.access import page_user, render
from hub.ui.floor import duration_text, read_station, read_tiles, state_word
from projections.rules.timeline import UNASSIGNED

router = APIRouter(prefix="/ui", include_in_schema=False)

MACHINE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

StationUser = Annotated[Caller, Depends(page_user(*STATION_USERS))]
# The JSON route: a script asks, so a missing session is a 401 problem, not the sign-in page.
StationReader = Annotated[Caller, Depends(require(*STATION_USERS))]


@dataclass(frozen=True)
class Words:
    """How the station's template writes times, shares and states (``static/station.js``
    writes them the same way): times in the plant's time zone."""

    zone: tzinfo

    def time(self, iso: str | None) -> str:
        if not iso:
            return ""
        return datetime.fromisoformat(iso).astimezone(self.zone).strftime("%H:%M")

    def minutes(self, start: str, end: str | None, now: str) -> str:
        """How long from ``start`` to ``end`` (None: to ``now``): "45 s", "12 min", "2 h 05 min"
        (as ``since`` of ``static/mes.js``)."""
        span = datetime.fromisoformat(end or now) - datetime.fromisoformat(start)
        return duration_text(span.total_seconds())

    @staticmethod
    def percent(share: float | None) -> str:
        return "\u2013" if share is None else f"{share * 100:.0f} %"

    @staticmethod
    def state(state: str) -> str:
        return state_word(state)

    @staticmethod
    def reason(reason: str | None) -> str:
        if reason is None:
            return ""
        return "no reason given yet" if reason == UNASSIGNED else reason


def _words(context: ApiContext) -> Words:
    return Words(ZoneInfo(context.plant.time_zone))


async def _station(request: Request, context: ApiContext, machine: str) -> dict[str, Any] | None:
    if not MACHINE_ID.fullmatch(machine):
        return None
    now = datetime.now(UTC)
    found: dict[str, Any] | None = await context.reads.run(
        request, read_station, context.site, context.plant, machine, now
    )
    return found


@router.get("/station/{machine}")
async def station_page(
    request: Request, context: Context, caller: StationUser, machine: str
) -> Response:
    data = await _station(request, context, machine)
    if data is None:
        shown = machine if MACHINE_ID.fullmatch(machine) else machine[:128]
        return render(request, "station_unknown.html", caller, 404, machine=shown)
    return render(
        request,
        "station.html",
        caller,
        machine=machine,
        data=data,
        tile=data["tile"],
        unassigned=[s for s in data["stops"] if s["unassigned"]],
        labelled=[s for s in data["stops"] if not s["unassigned"]],
        words=_words(context),
        time_zone=context.plant.time_zone,
    )


@router.get("/station/{machine}/data")
async def station_data(
    request: Request, context: Context, caller: StationReader, machine: str
) -> JSONResponse:
    data = await _station(request, context, machine)
    if data is None:
        raise Problem(
            404,
            f"no machine {machine[:128]!r} at site {context.site!r}",
            extensions={"machine_id": machine[:128]},
        )
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


@router.get("/stations")
async def stations_page(request: Request, context: Context, caller: StationUser) -> Response:
    tiles: list[dict[str, Any]] = await context.reads.run(
        request, read_tiles, context.site, context.plant, None, datetime.now(UTC), False
    )
    return render(request, "station_list.html", caller, tiles=tiles, words=_words(context))
