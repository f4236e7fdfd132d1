"""The plant board, the OEE pages and the orders page of a real hub (real NATS, real store),
signed in with the screens' session cookie: they show the figures the API answers for the same
window, in the order asked, and link to those API calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from lxml import html as lxml_html

from contracts import CloudEvent
from hub.api.app import create_app
from hub.bootstrap import Hub, api_context
from projections.rules.plant import MachinePlantConfig, PlantConfig, ShiftConfig
from tests.conftest import api_key, cloud_event, eventually

REASONS = {
    "material": {"waiting": "unplanned"},
    "mechanical": {"spindle": "unplanned", "coolant": "unplanned"},
    "planned": {"changeover": "planned", "break": "planned"},
}
PLANT = PlantConfig(
    shifts=[
        ShiftConfig(name="early", start=time(6), end=time(14), breaks=[(time(10), time(10, 30))])
    ],
    reasons=REASONS,
)
BEARER = {"Authorization": f"Bearer {api_key('auditor')}"}
SHIFT = {"from": "2026-03-02T06:00:00Z", "to": "2026-03-02T14:00:00Z"}
DAY = {"from": "2026-03-02T00:00:00Z", "to": "2026-03-03T00:00:00Z"}

Screens = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def screens(hub: Hub) -> AsyncIterator[Screens]:
    """``await screens(role, plant=PLANT)``: a client of the hub's app signed in to the screens
    with ``role``'s key (its session cookie kept; no bearer key)."""
    opened: list[tuple[httpx.AsyncClient, Any]] = []
    apps: dict[int, Any] = {}

    async def signed_in(role: str | None, plant: PlantConfig = PLANT) -> httpx.AsyncClient:
        if id(plant) not in apps:
            context = api_context(hub, plant)
            apps[id(plant)] = (create_app(context), context)
        app, context = apps[id(plant)]
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub")
        opened.append((client, context))
        if role is not None:
            answer = await client.post("/ui/login", data={"key": api_key(role), "next": "/ui/"})
            assert answer.status_code == 303, answer.text
        return client

    yield signed_in
    for client, _ in opened:
        await client.aclose()
    for _, context in apps.values():
        if context.live is not None:
            await context.live.close()
        context.reads.close()
        if context.sessions is not None:
            context.sessions.close()


def at(hh: int, mm: int = 0) -> datetime:
    return datetime.fromisoformat(f"2026-03-02T{hh:02d}:{mm:02d}:00+00:00")


async def published(hub: Hub, events: list[CloudEvent]) -> None:
    before = hub.ingest_stats().applied
    await hub.publisher.publish_many(events)
    await eventually(lambda: hub.ingest_stats().applied == before + len(events))
    await hub.wait_projected()


def execution(machine: str, value: str, when: datetime) -> CloudEvent:
    return cloud_event("mes.machine.execution.v1", machine, {"execution": value}, at=when)


def count(machine: str, value: int, kind: str, when: datetime) -> CloudEvent:
    return cloud_event("mes.machine.partcount.v1", machine, {"count": value, "kind": kind}, at=when)


def reason(machine: str, code: str, start: datetime, end: datetime) -> CloudEvent:
    data = {"reason": code, "start": start.isoformat(), "end": end.isoformat(), "operator": "op7"}
    return cloud_event("mes.operator.downtime_reason.v1", machine, data, at=end)


async def an_early_shift_with_stops(hub: Hub) -> None:
    """M1 on 2 March, 06:00-14:00 less the 10:00-10:30 break (PBT 27,000 s): stopped 10 min
    waiting for material, 15 min for the spindle, 5 min for the coolant, 4 min nobody said why,
    and 1 min (a micro stop: running); 400 parts at 60 s, 8 bad. M2 runs, then is offline
    from 13:00."""
    stops = [
        (at(8), at(8, 10), "material/waiting"),
        (at(9), at(9, 15), "mechanical/spindle"),
        (at(11), at(11, 5), "mechanical/coolant"),
        (at(12), at(12, 4), None),
        (at(12, 30), at(12, 31), None),
    ]
    events = [
        cloud_event(
            "mes.erp.order.released.v1",
            "SO-1",
            {
                "order_id": "SO-1",
                "part_number": "P-1",
                "quantity": 500,
                "due": "2026-03-03T00:00:00Z",
                "ideal_cycle_time_s": 60,
            },
            at=at(5),
        ),
        cloud_event("mes.machine.availability.v1", "M1", {"availability": "AVAILABLE"}, at=at(5)),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-1"}, at=at(5, 59)),
        count("M1", 1000, "all", at(6)),
        count("M1", 0, "bad", at(6)),
        execution("M1", "ACTIVE", at(6)),
        count("M1", 1400, "all", at(13)),
        count("M1", 8, "bad", at(13)),
        cloud_event("mes.machine.availability.v1", "M2", {"availability": "AVAILABLE"}, at=at(5)),
        execution("M2", "ACTIVE", at(6)),
        cloud_event(
            "mes.machine.availability.v1", "M2", {"availability": "UNAVAILABLE"}, at=at(13)
        ),
    ]
    for start, end, code in stops:
        events += [execution("M1", "STOPPED", start), execution("M1", "ACTIVE", end)]
        if code is not None:
            events.append(reason("M1", code, start, end))
    await published(hub, events)


def page_of(answer: httpx.Response) -> Any:
    assert answer.status_code == 200, answer.text[:2000]
    return lxml_html.fromstring(answer.text)


def api_json(answer: httpx.Response) -> Any:
    assert answer.status_code == 200, answer.text
    return answer.json()


def alert(answer: httpx.Response) -> str:
    """The text of the page's alert (what went wrong, said on the page)."""
    return str(lxml_html.fromstring(answer.text).xpath("string(//*[@role='alert'])"))


def number(text: str) -> float | None:
    return None if text == "" else float(text)


FIELDS = (
    "availability",
    "performance",
    "quality",
    "oee",
    "planned_busy_time_s",
    "actual_production_time_s",
    "ideal_time_s",
    "produced",
    "good",
    "bad",
    "scrapped",
)


def row_figures(row: Any) -> dict[str, float | None]:
    return {
        cell.get("data-field"): number(cell.get("data-value"))
        for cell in row.xpath(".//*[@data-field]")
    }


def api_figures(bucket: dict[str, Any]) -> dict[str, float | None]:
    return {key: bucket[key] for key in FIELDS}


async def test_the_screens_need_a_session_and_an_erp_key_cannot_sign_in(screens: Screens) -> None:
    anonymous = await screens(None)
    answer = await anonymous.get("/ui/")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login?next=/ui/"
    answer = await anonymous.get("/ui/oee?machine=M1")
    assert answer.headers["location"] == "/ui/login?next=/ui/oee%3Fmachine%3DM1"
    for role in ("erp", "auditor", "supplier"):
        refused = await anonymous.post("/ui/login", data={"key": api_key(role), "next": "/ui/"})
        assert refused.status_code in (401, 403), role
        assert "mes_hub_session" not in refused.headers.get("set-cookie", "")
    assert (
        "cannot use the screens"
        in (await anonymous.post("/ui/login", data={"key": api_key("erp")})).text
    )
    assert (await anonymous.get("/ui/orders")).status_code == 303


async def test_the_machine_oee_page_shows_what_the_api_answers_for_the_window(
    hub: Hub, screens: Screens
) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    api = await screens(None)
    query = {"machine": "M1", **DAY, "group_by": "shift"}
    page = page_of(await viewer.get("/ui/oee", params=query))
    grouped = api_json(await api.get("/api/v1/oee", params=query, headers=BEARER))
    whole = api_json(await api.get("/api/v1/oee", params={"machine": "M1", **DAY}, headers=BEARER))[
        "buckets"
    ][0]

    # The table: a row per bucket, each figure as the API has it.
    rows = page.xpath("//table[contains(@class, 'figures-table')]/tbody/tr[@data-start]")
    assert [r.get("data-label") for r in rows] == [b["label"] for b in grouped["buckets"]]
    assert [row_figures(r) for r in rows] == [api_figures(b) for b in grouped["buckets"]]
    (footer,) = page.xpath("//table[contains(@class, 'figures-table')]/tfoot/tr")
    assert row_figures(footer) == api_figures(whole)
    assert whole["planned_busy_time_s"] == 27_000
    assert whole["actual_production_time_s"] == 27_000 - 600 - 900 - 300 - 240  # micro: running
    assert whole["downtime_s_by_reason"] == {
        "material/waiting": 600,
        "mechanical/spindle": 900,
        "mechanical/coolant": 300,
        "unassigned": 240,
    }

    # The waterfall: PBT, then the bars that add up to it, exactly.
    (figure,) = page.xpath("//figure[@id='waterfall']")
    bars = figure.xpath(".//*[@data-seconds]")
    start = [b for b in bars if b.get("data-kind") == "start"]
    parts = [b for b in bars if b.get("data-kind") in ("loss", "end")]
    assert len(start) == 1 and Decimal(start[0].get("data-seconds")) == 27_000
    assert sum(Decimal(b.get("data-seconds")) for b in parts) == Decimal(27_000)
    by_reason = {
        b.get("data-reason"): float(b.get("data-seconds"))
        for b in parts
        if b.get("data-key") == "downtime"
    }
    assert by_reason == whole["downtime_s_by_reason"]
    keyed = {b.get("data-key"): Decimal(b.get("data-seconds")) for b in parts}
    assert "difference" not in keyed  # PBT - APT is the downtime by reason, exactly
    assert keyed["speed_loss"] == 24_960 - 24_000  # APT - 400 parts x 60 s
    assert keyed["quality_loss"] == 480  # 24,000 s x 8 bad / 400
    assert keyed["fully_productive"] == 23_520
    assert figure.xpath(".//svg[@role='img']/title")

    # The Pareto by first level, as the API's downtime by reason adds up.
    pareto = {
        b.get("data-reason"): float(b.get("data-seconds"))
        for b in page.xpath("//figure[@id='pareto']//*[@data-seconds]")
    }
    assert pareto == {"mechanical": 1200, "material": 600, "unassigned": 240}
    drills = page.xpath("//table[starts-with(@data-csv, 'downtime-pareto')]/tbody//a/@href")
    assert len(drills) == 2  # mechanical and material have reasons under them
    drill = next(h for h in drills if "drill=mechanical" in h)
    assert parse_qs(urlsplit(drill).query)["machine"] == ["M1"]
    drilled = page_of(await viewer.get(drill))
    assert {
        b.get("data-reason"): float(b.get("data-seconds"))
        for b in drilled.xpath("//figure[@id='pareto']//*[@data-seconds]")
    } == {
        "mechanical/spindle": 900,
        "mechanical/coolant": 300,
    }

    # The timeline: every interval of the API's answer, with the shift and its break.
    timeline = api_json(await api.get("/api/v1/machines/M1/timeline", params=DAY, headers=BEARER))
    (drawn,) = page.xpath("//figure[@id='timeline']")
    assert int(drawn.get("data-intervals")) == len(timeline["intervals"])
    assert len(drawn.xpath(".//*[contains(@class, 'st-stopped')]")) == 4
    micro = ".//*[contains(@class, 'st-running') and contains(@class, 'micro')]"
    assert len(drawn.xpath(micro)) == 1
    assert len(drawn.xpath(".//*[contains(@class, 'tl-break')]")) == 1
    (order,) = drawn.xpath(".//*[contains(@class, 'tl-order')]/title/text()")
    assert order.startswith("Order SO-1")
    assert "Shift boundary" in drawn.text_content()


async def test_every_figure_links_to_the_api_call_that_answers_it_with_the_cookie(
    hub: Hub, screens: Screens
) -> None:
    await an_early_shift_with_stops(hub)
    operator = await screens("operator")
    page = page_of(await operator.get("/ui/oee", params={"machine": "M1", **SHIFT}))
    links = sorted(set(page.xpath("//a[starts-with(@href, '/api/v1/')]/@href")))
    assert any(
        link.startswith("/api/v1/oee?machine=M1&from=") and "group_by=shift" in link
        for link in links
    )
    assert any(link.startswith("/api/v1/machines/M1/timeline?from=") for link in links)
    for link in links:
        answer = await operator.get(link)  # the session cookie, no key
        assert answer.status_code == 200, (link, answer.text)
    # The API's answer behind the summary is the one the page shows.
    whole = next(link for link in links if "group_by" not in link and "/oee?" in link)
    figures = (await operator.get(whole)).json()["buckets"][0]
    shown = page.xpath("//section[contains(@class, 'summary')]//*[@data-field]")
    assert {d.get("data-field"): number(d.get("data-value")) for d in shown} == {
        k: figures[k] for k in ("oee", "availability", "performance", "quality")
    }


async def test_the_site_page_adds_the_machines_up_and_asks_for_one_for_a_timeline(
    hub: Hub, screens: Screens
) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    api = await screens(None)
    query = {**DAY, "group_by": "day"}
    page = page_of(await viewer.get("/ui/oee", params=query))
    grouped = api_json(await api.get("/api/v1/oee", params=query, headers=BEARER))
    rows = page.xpath("//table[contains(@class, 'figures-table')]/tbody/tr[@data-start]")
    assert [row_figures(r) for r in rows] == [api_figures(b) for b in grouped["buckets"]]
    assert grouped["buckets"][0]["planned_busy_time_s"] == 2 * 27_000
    pareto = {
        b.get("data-reason"): float(b.get("data-seconds"))
        for b in page.xpath("//figure[@id='pareto']//*[@data-seconds]")
    }
    assert pareto["unassigned"] == 240 + 3600  # M2 offline 13:00-14:00
    assert not page.xpath("//figure[@id='timeline']")
    assert "Choose a machine to see its timeline" in page.text_content()
    # The form offers the site and each machine.
    assert page.xpath("//select[@name='machine']/option/@value") == ["", "M1", "M2"]


async def test_provisional_buckets_are_styled_apart(hub: Hub, screens: Screens) -> None:
    now = datetime.now(UTC)
    await published(hub, [execution("M9", "ACTIVE", now - timedelta(hours=3))])
    viewer = await screens("viewer")
    window = {
        "from": (now - timedelta(hours=2)).isoformat(),
        "to": (now + timedelta(hours=2)).isoformat(),
    }
    page = page_of(
        await viewer.get("/ui/oee", params={"machine": "M9", **window, "group_by": "hour"})
    )
    rows = page.xpath("//table[contains(@class, 'figures-table')]/tbody/tr[@data-start]")
    marked = ["provisional" in r.get("class").split() for r in rows]
    words = ["provisional" in r.text_content() for r in rows]
    assert marked[-1] and marked == words  # the open hour, in class and in words
    assert not marked[0]  # an hour gone by is final
    assert page.xpath("//section[contains(@class, 'summary') and contains(@class, 'provisional')]")


async def test_wrong_choices_are_said_on_the_page(hub: Hub, screens: Screens) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    unknown = await viewer.get("/ui/oee", params={"machine": "NOPE", **SHIFT})
    assert unknown.status_code == 404 and "no machine 'NOPE'" in alert(unknown)
    backwards = await viewer.get("/ui/oee", params={"from": SHIFT["to"], "to": SHIFT["from"]})
    assert backwards.status_code == 422 and "to must be after from" in alert(backwards)
    grouping = await viewer.get("/ui/oee", params={**SHIFT, "group_by": "week"})
    assert grouping.status_code == 422 and "group_by must be one of" in alert(grouping)
    nonsense = await viewer.get("/ui/oee", params={"from": "yesterday"})
    assert nonsense.status_code == 422 and "must be times" in alert(nonsense)
    # A local time from the form's fields is the plant's (UTC here): the same window.
    local = page_of(
        await viewer.get(
            "/ui/oee",
            params={"machine": "M1", "from": "2026-03-02T06:00", "to": "2026-03-02T14:00"},
        )
    )
    assert local.xpath("//tfoot//*[@data-field='planned_busy_time_s']/@data-value") == ["27000.0"]


async def test_without_a_window_the_page_shows_today_s_shifts(hub: Hub, screens: Screens) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    page = page_of(await viewer.get("/ui/oee", params={"machine": "M1"}))
    today = datetime.now(UTC).date().isoformat()
    (link,) = page.xpath("//section[contains(@class, 'summary')]//a/@href")
    query = parse_qs(urlsplit(link).query)
    assert (query["from"], query["to"]) == ([f"{today}T06:00:00Z"], [f"{today}T14:00:00Z"])
    assert page.xpath("//input[@name='from']/@value") == [f"{today}T06:00:00"]
    assert page.xpath("//select[@name='group_by']/option[@selected]/@value") == ["shift"]


async def test_the_partial_answer_is_the_figures_alone(hub: Hub, screens: Screens) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    full = await viewer.get("/ui/oee", params={"machine": "M1", **SHIFT})
    partial = await viewer.get("/ui/oee", params={"machine": "M1", **SHIFT, "partial": "1"})
    assert partial.status_code == 200 and "<html" not in partial.text
    assert 'id="waterfall"' in partial.text and "<form" not in partial.text
    assert 'data-live-refresh data-machines="M1"' in full.text
    assert "/ui/static/oee.js" in full.text and "/ui/static/pages.css" in full.text


def board_plant(now: datetime) -> tuple[PlantConfig, datetime]:
    """A shift that began two hours ago (whole minutes) and ends in two: the board's figures
    are the running shift's. Each machine's ideal cycle time is 60 s."""
    start = (now - timedelta(hours=2)).replace(second=0, microsecond=0)
    end = start + timedelta(hours=4)
    plant = PlantConfig(
        shifts=[ShiftConfig(name="now", start=start.time(), end=end.time())],
        reasons=REASONS,
        machines={m: MachinePlantConfig(ideal_cycle_time_s=60) for m in ("M1", "M2", "M3", "M4")},
    )
    return plant, start


async def machines_around_now(hub: Hub, start: datetime, now: datetime) -> None:
    """M1 runs the whole shift; M2 stopped 10 minutes ago; M3 stopped half an hour early in the
    shift and runs again; M4 went offline 5 minutes ago."""
    minutes = lambda m: start + timedelta(minutes=m)  # noqa: E731
    events = []
    for machine in ("M1", "M2", "M3", "M4"):
        events += [execution(machine, "ACTIVE", start), count(machine, 0, "all", start)]
    events += [
        count("M1", 100, "all", now - timedelta(minutes=1)),
        count("M2", 50, "all", now - timedelta(minutes=20)),
        execution("M2", "STOPPED", now - timedelta(minutes=10)),
        execution("M3", "STOPPED", minutes(10)),
        execution("M3", "ACTIVE", minutes(40)),
        count("M3", 60, "all", now - timedelta(minutes=1)),
        count("M4", 80, "all", now - timedelta(minutes=30)),
        cloud_event(
            "mes.machine.availability.v1",
            "M4",
            {"availability": "UNAVAILABLE"},
            at=now - timedelta(minutes=5),
        ),
        cloud_event(
            "mes.erp.order.released.v1",
            "SO-9",
            {
                "order_id": "SO-9",
                "part_number": "P-9",
                "quantity": 200,
                "due": (now + timedelta(days=5)).isoformat(),
                "ideal_cycle_time_s": 60,
            },
            at=start,
        ),
        cloud_event("mes.operator.order_started.v1", "M1", {"order_id": "SO-9"}, at=start),
    ]
    await published(hub, events)


def tiles_of(page: Any) -> list[Any]:
    return page.xpath("//ul[contains(@class, 'tiles')]/li")


async def test_the_board_shows_a_tile_per_machine_and_sorts_the_worst_first(
    hub: Hub, screens: Screens
) -> None:
    now = datetime.now(UTC)
    plant, start = board_plant(now)
    await machines_around_now(hub, start, now)
    viewer = await screens("viewer", plant)
    page = page_of(await viewer.get("/ui/"))
    tiles = tiles_of(page)
    assert [t.get("data-machine") for t in tiles] == ["M1", "M2", "M3", "M4"]
    states = {t.get("data-machine"): t for t in tiles}
    assert {m: t.get("data-state") for m, t in states.items()} == {
        "M1": "running",
        "M2": "stopped",
        "M3": "running",
        "M4": "offline",
    }
    # The state in words, not colour alone; the reason; time in state for mes.js to tick.
    m2 = states["M2"]
    assert "state-stopped" in m2.get("class").split()
    assert m2.xpath(".//*[@class='state-word']/text()") == ["Stopped"]
    assert m2.xpath(".//*[contains(@class, 'reason-code')]/text()") == ["unassigned"]
    (since,) = m2.xpath(".//*[@data-since]/@data-since")
    assert abs(datetime.fromisoformat(since) - (now - timedelta(minutes=10))) < timedelta(seconds=1)
    assert states["M4"].xpath(".//*[@class='state-word']/text()") == ["Offline"]
    # The shift's OEE, provisional while the shift is open, as the API has it for the shift.
    api = await screens(None, plant)
    shift = {"from": start.isoformat(), "to": (start + timedelta(hours=4)).isoformat()}
    for machine, tile in states.items():
        answer = api_json(
            await api.get("/api/v1/oee", params={"machine": machine, **shift}, headers=BEARER)
        )
        (oee_cell,) = tile.xpath(".//*[contains(@class, 'tile-oee')]")
        assert float(oee_cell.get("data-value")) == pytest.approx(
            answer["buckets"][0]["oee"], rel=0.02
        )
        assert "provisional" in oee_cell.text_content()
    m1 = states["M1"]
    assert "100 made / target" in m1.xpath("string(.//*[@class='tile-parts'])")
    assert "SO-9" in m1.xpath("string(.//*[@class='tile-order'])")
    # Links: the machine's OEE for all; its station for those who may use it.
    assert m1.xpath(".//a/@href")[:1] == ["/ui/oee?machine=M1"]
    assert not page.xpath("//a[starts-with(@href, '/ui/station/')]")
    operator = await screens("operator", plant)
    assert page_of(await operator.get("/ui/")).xpath("//a[@href='/ui/station/M1']")

    worst = tiles_of(page_of(await viewer.get("/ui/", params={"sort": "worst"})))
    order = [t.get("data-machine") for t in worst]
    assert set(order[:2]) == {"M2", "M4"}  # stopped and offline first
    assert order[2:] == ["M3", "M1"]  # then the lowest OEE
    oee = {t.get("data-machine"): float(t.get("data-oee")) for t in worst}
    assert oee["M3"] < oee["M1"]
    assert oee[order[0]] <= oee[order[1]]

    partial = await viewer.get("/ui/", params={"partial": "1", "sort": "worst"})
    assert "<html" not in partial.text and 'id="tile-M2"' in partial.text
    board = page_of(await viewer.get("/ui/", params={"sort": "worst"}))
    (holder,) = board.xpath("//*[@id='board']")
    assert (
        holder.get("data-sort") == "worst"
        and "/ui/static/board.js" in (await viewer.get("/ui/")).text
    )


async def test_the_orders_page_puts_late_and_at_risk_first(hub: Hub, screens: Screens) -> None:
    now = datetime.now(UTC)

    def release(order_id: str, quantity: int, due: datetime) -> CloudEvent:
        return cloud_event(
            "mes.erp.order.released.v1",
            order_id,
            {
                "order_id": order_id,
                "part_number": "P-1",
                "quantity": quantity,
                "due": due.isoformat(),
                "ideal_cycle_time_s": 60,
                "customer": "ACME",
            },
            at=now - timedelta(hours=1),
        )

    await published(
        hub,
        [
            release("SO-A", 10, now + timedelta(days=30)),  # on track
            release("SO-B", 10, now - timedelta(days=1)),  # late
            release("SO-C", 100_000, now + timedelta(days=2)),  # at risk: 69 days of work
        ],
    )
    operator = await screens("operator", PlantConfig())
    page = page_of(await operator.get("/ui/orders"))
    rows = page.xpath("//table[@data-csv='orders']/tbody/tr[@data-order]")
    assert [(r.get("data-order"), r.get("data-delivery")) for r in rows] == [
        ("SO-B", "late"),
        ("SO-C", "at_risk"),
        ("SO-A", "on_track"),
    ]
    listed = api_json(await operator.get("/api/v1/orders", params={"limit": 1000}))
    by_id = {o["order_id"]: o for o in listed}
    for row in rows:
        order = by_id[row.get("data-order")]
        assert row.get("data-delivery") == order["forecast"]["status"]
        (progress,) = row.xpath(".//*[@class='progress-text']")
        assert (progress.get("data-good"), progress.get("data-quantity")) == (
            str(order["progress"]["good"]),
            str(order["quantity"]),
        )
    assert [
        w.text_content() for w in page.xpath("//tbody//span[contains(@class, 'delivery ')]")
    ] == ["Late", "At risk", "On track"]
    api_links = page.xpath("//a[starts-with(@href, '/api/v1/orders')]/@href")
    for link in set(api_links):
        assert (await operator.get(link)).status_code == 200, link
    partial = await operator.get("/ui/orders", params={"partial": "1"})
    assert "<html" not in partial.text and 'data-csv="orders"' in partial.text
    bogus = await operator.get("/ui/orders", params={"status": "bogus"})
    assert bogus.status_code == 422 and "status must be one of" in bogus.text


@pytest.mark.parametrize("path", ["/ui/", "/ui/oee?machine=M1&group_by=order", "/ui/orders"])
async def test_every_table_can_be_exported_and_every_chart_is_named(
    hub: Hub, screens: Screens, path: str
) -> None:
    await an_early_shift_with_stops(hub)
    viewer = await screens("viewer")
    answer = await viewer.get(path.replace("M1&", f"M1&from={DAY['from']}&to={DAY['to']}&"))
    page = page_of(answer)
    for table in page.xpath("//table"):
        assert table.get("data-csv"), lxml_html.tostring(table)[:200]
        assert table.xpath(".//thead//th[@scope='col']")
    for svg in page.xpath("//svg"):
        assert svg.get("role") == "img" and svg.xpath("./title")
        assert svg.get("aria-labelledby")
    if "oee" in path:
        assert len(page.xpath("//table")) == 4 and len(page.xpath("//svg")) == 3
