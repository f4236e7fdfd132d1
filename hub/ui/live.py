"""Live pages: one follower of the views for every open page, pushing changes by server-sent
events (``GET /ui/live``).

The views are kept in another process (``hub.bootstrap.views_process``); this follower polls
how far they have read (``poll_s``, a read of one small table). When they have moved on, it
asks the store which machines had events in between, has their tiles made once in the read
pool (``hub.ui.floor.read_tiles``, without the shift's figures: the light part) and hands
them to every open stream that shows one of those machines, each message encoded once. The
shift's figures change with time even when nothing happens (a stop lasting lowers
availability), so every ``figures_every_s`` they are made again for every tile, beside the
rounds (a round never waits for them), and sent.

What a stream sends (``text/event-stream``):

- ``event: tiles``, data ``{"position": p, "tiles": [...], "full": bool}``: the tiles of the
  machines the stream shows that changed (all of them first, ``full``); ``position``: how far
  the views had read;
- ``event: views``, data ``{"position": p, "machines": [...]}``: the views moved on and these
  of the machines it shows changed (the OEE pages fetch their figures again); a stream of the
  whole site hears of every move, also of none of its machines (the ERP changed an order). A
  stream opened with ``tiles=false`` gets these only, the first one ``full``;
- a comment every ``KEEPALIVE_S`` (proxies close silent connections); a stream whose session
  has ended (signed out, ended by an admin, its key revoked) is closed then.

A stream that cannot keep up (``QUEUE`` messages waiting) is closed; the browser's
EventSource opens it again and gets all its tiles afresh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from hub.api.deps import SESSION_COOKIE, Caller, Context, require
from hub.api.policy import SCREEN_USERS
from hub.api.problems import Problem
from hub.api.reads import ReadPool
from hub.ui.floor import read_tiles
from projections.rules.plant import PlantConfig

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
SESSION_CHECK_S = 5.0  # how soon a stream ends after its session has
QUEUE = 64


@dataclass(eq=False)
class Stream:
    """One open page's stream: the machines it shows (None: all) and what waits to be sent."""

    machines: frozenset[str] | None
    tiles: bool = True  # False: only ``views`` events (a page of figures, not of tiles)
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE))

    def wants(self, machine_id: str) -> bool:
        return self.machines is None or machine_id in self.machines

    def put(self, message: bytes) -> bool:
        """Queue ``message``; False when the stream is too far behind (it is then closed)."""
        try:
            self.queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            return False


def event(name: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LiveFeed:
    """The follower of the views behind every live page (see the module)."""

    def __init__(
        self,
        reads: ReadPool,
        site: str,
        plant: PlantConfig,
        views_position: Callable[[], int],
        changed_machines: Callable[[int, int], set[str]],
        *,
        poll_s: float = 0.1,
        figures_every_s: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._reads, self._site, self._plant = reads, site, plant
        self._views_position, self._changed = views_position, changed_machines
        self.poll_s, self.figures_every_s = poll_s, figures_every_s
        self._clock = clock
        self._streams: set[Stream] = set()
        self._tiles: dict[str, dict[str, Any]] = {}  # the latest of each machine
        self._position = -1  # how far the tiles are made (-1: not yet)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # set once a first round has made every tile
        self._closed = False
        self.rounds = 0  # how many times the views had moved on (for the bench and tests)

    # --- streams --------------------------------------------------------------------------

    async def stream(
        self,
        machines: Collection[str] | None,
        still_signed_in: Callable[[], Awaitable[bool]],
        tiles: bool = True,
    ) -> AsyncIterator[bytes]:
        """The server-sent events of one page (see the module); ``tiles`` False: its ``views``
        events only, the first one ``full``. Its session is checked every ``SESSION_CHECK_S``:
        a stream whose session has ended (signed out, ended by an admin, its key revoked)
        closes then."""
        if self._closed:
            return
        subscriber = Stream(None if machines is None else frozenset(machines), tiles)
        self._streams.add(subscriber)
        self._ensure_running()
        try:
            yield b"retry: 2000\n\n"  # the browser reconnects after 2 s when the hub is gone
            first = await self._snapshot(subscriber)
            if first is None:
                return  # the hub is stopping
            if tiles:
                yield event("tiles", {"position": self._position, "tiles": first, "full": True})
            else:
                yield event("views", {"position": self._position, "machines": [], "full": True})
            check_due = time.monotonic() + SESSION_CHECK_S
            quiet_since = time.monotonic()
            while True:
                wait = max(0.0, min(check_due, quiet_since + KEEPALIVE_S) - time.monotonic())
                try:
                    message = await asyncio.wait_for(subscriber.queue.get(), wait)
                except TimeoutError:
                    message = b""
                now = time.monotonic()
                if now >= check_due:
                    if not await still_signed_in():
                        return
                    check_due = now + SESSION_CHECK_S
                if message is None:
                    return  # it fell behind, or the hub stops: the browser opens it again
                if message:
                    quiet_since = now
                    yield message
                elif now - quiet_since >= KEEPALIVE_S:
                    quiet_since = now
                    yield b": keepalive\n\n"
        finally:
            self._streams.discard(subscriber)

    async def _snapshot(self, subscriber: Stream) -> list[dict[str, Any]] | None:
        """Every tile ``subscriber`` shows, once a round has made them (None: closing)."""
        while not self._ready.is_set():
            if self._closed:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 1.0)
        return [t for m, t in sorted(self._tiles.items()) if subscriber.wants(m)]

    def _send(
        self, machines: Collection[str], tiles: list[dict[str, Any]], moved: bool = True
    ) -> None:
        """``tiles`` to the streams showing them; and, when the views ``moved``, a ``views``
        event naming the changed ``machines`` each stream shows. Each message is encoded once
        for all the streams that show the same machines (every board gets the same bytes)."""
        encoded: dict[tuple[frozenset[str] | None, bool], list[bytes]] = {}
        for subscriber in list(self._streams):
            key = (subscriber.machines, subscriber.tiles)
            messages = encoded.get(key)
            if messages is None:
                messages = encoded[key] = self._messages(subscriber, machines, tiles, moved)
            if not all(subscriber.put(message) for message in messages):
                self._drop(subscriber)

    def _messages(
        self, subscriber: Stream, machines: Collection[str], tiles: list[dict[str, Any]],
        moved: bool,
    ) -> list[bytes]:  # fmt: skip
        messages = []
        mine = [t for t in tiles if subscriber.tiles and subscriber.wants(t["machine_id"])]
        if mine:
            data = {"position": self._position, "tiles": mine, "full": False}
            messages.append(event("tiles", data, self._position))
        shown = sorted(m for m in machines if subscriber.wants(m))
        # A page of the whole site hears of every move of the views, a machine changed or not
        # (the ERP's orders change what the orders page shows).
        if moved and (shown or subscriber.machines is None):
            messages.append(event("views", {"position": self._position, "machines": shown}))
        return messages

    def _drop(self, subscriber: Stream) -> None:
        """Close ``subscriber``'s stream (too far behind, or the hub stops); its browser
        reconnects and gets every tile afresh."""
        self._streams.discard(subscriber)
        with contextlib.suppress(asyncio.QueueEmpty):
            subscriber.queue.get_nowait()  # room for the end, in a full queue
        with contextlib.suppress(asyncio.QueueFull):
            subscriber.queue.put_nowait(None)

    # --- following the views ------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="ui-live-feed")

    async def _follow(self) -> None:
        """Follow the views while any page is open; stop when the last one closes. The
        shift's figures are made again, for every tile, beside it (``_refresh``): a round
        never waits for them."""
        refresher: asyncio.Task[None] | None = None
        try:
            while self._streams and not self._closed:
                began = time.monotonic()
                try:
                    if not self._ready.is_set():
                        await self._first_round()
                    else:
                        await self._round()
                        if refresher is None or refresher.done():
                            refresher = asyncio.create_task(self._refresh(), name="ui-figures")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the store or a read failed: try again shortly
                    log.warning("live pages: could not follow the views: %s", exc)
                    await asyncio.sleep(1.0)
                await asyncio.sleep(max(0.0, self.poll_s - (time.monotonic() - began)))
        finally:
            if refresher is not None:
                refresher.cancel()
            self._task = None
            # The next page to open waits for a fresh first round: nothing is followed now.
            self._ready.clear()
            self._position = -1

    async def _first_round(self) -> None:
        """Every tile, with its figures: what every stream opened meanwhile starts with."""
        position = await asyncio.to_thread(self._views_position)
        tiles = await self._reads.run(
            None, read_tiles, self._site, self._plant, None, self._clock(), True
        )
        self._tiles = {t["machine_id"]: t for t in tiles}
        self._position = position
        self._ready.set()
        self.rounds += 1

    async def _round(self) -> None:
        """The tiles of the machines changed since the last round, without the figures (they
        keep the last ones made). How far the tiles are made moves on only once they are
        sent: a round that fails is made again, whole, by the next."""
        position = await asyncio.to_thread(self._views_position)
        if position <= self._position:
            return
        changed = await asyncio.to_thread(self._changed, self._position, position)
        tiles: list[dict[str, Any]] = []
        if changed:
            tiles = await self._reads.run(
                None, read_tiles, self._site, self._plant, sorted(changed), self._clock(), False
            )
            for tile in tiles:
                self._keep_figures(tile)
                self._tiles[tile["machine_id"]] = tile
        self._position = position
        self._send(changed, tiles)
        self.rounds += 1

    def _keep_figures(self, tile: dict[str, Any]) -> None:
        """``tile`` (made without figures) with the last figures made of its machine: the
        shift's, and its order's good parts while the order is the same."""
        known = self._tiles.get(tile["machine_id"])
        if known is None:
            return
        tile["shift"] = known.get("shift")
        if known.get("order_id") == tile["order_id"]:
            tile["order_quantity"] = known.get("order_quantity")
            tile["order_good"] = known.get("order_good")

    async def _refresh(self) -> None:
        """Every ``figures_every_s``, the figures of every tile made again (a stop that goes
        on lowers availability without any event) and sent; the states stay those of the
        rounds, which may be newer."""
        while self._streams and not self._closed:
            await asyncio.sleep(self.figures_every_s)
            try:
                made = await self._reads.run(
                    None, read_tiles, self._site, self._plant, None, self._clock(), True
                )
            except Exception as exc:
                log.warning("live pages: could not make the shift's figures: %s", exc)
                continue
            updated = []
            for fresh in made:
                tile = self._tiles.get(fresh["machine_id"])
                if tile is None:
                    continue  # a machine new since: its first round brings it
                tile = dict(tile, shift=fresh["shift"])
                if tile["order_id"] == fresh["order_id"]:
                    tile["order_quantity"] = fresh["order_quantity"]
                    tile["order_good"] = fresh["order_good"]
                self._tiles[tile["machine_id"]] = tile
                updated.append(tile)
            self._send((), updated, moved=False)

    async def close(self) -> None:
        """End every stream and the follower (the API stops); no stream opens after."""
        self._closed = True
        for subscriber in list(self._streams):
            self._drop(subscriber)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- the route ----------------------------------------------------------------------------------

router = APIRouter(prefix="/ui", include_in_schema=False)
MAX_MACHINES = 500


@router.get("/live")
async def live(
    request: Request,
    context: Context,
    _: Annotated[Caller, Depends(require(*SCREEN_USERS))],
    machine: Annotated[list[str] | None, Query(max_length=MAX_MACHINES)] = None,
    tiles: bool = True,
) -> StreamingResponse:
    """The server-sent events of a page showing ``machine`` (repeated; none: every machine);
    ``tiles=false``: the views' moves only (a page of figures)."""
    if context.live is None:
        raise Problem(503, "this hub keeps no views: its pages cannot be live")
    token = request.cookies.get(SESSION_COOKIE)
    sessions = context.sessions

    async def still_signed_in() -> bool:
        if token is None or sessions is None:
            return True  # a key (bearer), checked when the stream opened
        return await asyncio.to_thread(sessions.find, token) is not None

    return StreamingResponse(
        context.live.stream(machine, still_signed_in, tiles),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
