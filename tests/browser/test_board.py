"""The plant board and the OEE page in a real Chromium, against a real hub served on a socket:
a tile's colour follows a machine event published to NATS within a second, the waterfall adds
up to the planned busy time and the Pareto is the API's downtime by reason, the OEE page fetches
its figures again when its machine changes, accessibility, and the docs' screenshots."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest

from contracts import CloudEvent
from projections.rules.plant import MachinePlantConfig, PlantConfig
from tests.browser.conftest import ServedHub, axe_check, screenshot, sign_in
from tests.conftest import api_key, cloud_event

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
from playwright.sync_api import Page, expect

REASONS = {
    "mechanical": {"spindle": "unplanned", "coolant": "unplanned"},
    "material": {"waiting": "unplanned"},
    "planned": {"changeover": "planned"},
}
MACHINES = ("M1", "M2", "M3", "M4")
# The tiles' colours (hub/ui/static/pages.css).
RUNNING, STOPPED = "rgb(20, 108, 49)", "rgb(161, 42, 30)"


def noon_zone(now: datetime) -> str:
    """A time zone in which ``now`` is around noon: the plant's one 24-hour shift began hours
    ago, and the last hours lie wholly inside it."""
    offset = 12 - now.hour
    return "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def plant(now: datetime) -> PlantConfig:
    return PlantConfig(
        time_zone=noon_zone(now),
        reasons=REASONS,
        machines={m: MachinePlantConfig(ideal_cycle_time_s=30) for m in MACHINES},
    )


def floor(now: datetime) -> list[CloudEvent]:
    """The last hour and a half: M1 runs; M2 stopped 50-40 min ago (the spindle) and 35-30 min ago
    (waiting for material), and 25-20 min ago (the coolant), then ran; M3 is stopped since 15
    minutes ago, nobody said why; M4 went offline 5 minutes ago."""

    def ago(minutes: float) -> datetime:
        return now - timedelta(minutes=minutes)

    def event(type_: str, machine: str, data: dict[str, Any], when: datetime) -> CloudEvent:
        return cloud_event(f"mes.{type_}.v1", machine, data, at=when)

    events = []
    for machine in MACHINES:
        events += [
            event("machine.availability", machine, {"availability": "AVAILABLE"}, ago(90)),
            event("machine.execution", machine, {"execution": "ACTIVE"}, ago(90)),
            event("machine.partcount", machine, {"count": 0, "kind": "all"}, ago(90)),
        ]
    for start, end, reason in (
        (50, 40, "mechanical/spindle"),
        (35, 30, "material/waiting"),
        (25, 20, "mechanical/coolant"),
    ):
        events += [
            event("machine.execution", "M2", {"execution": "STOPPED"}, ago(start)),
            event("machine.execution", "M2", {"execution": "ACTIVE"}, ago(end)),
            event(
                "operator.downtime_reason",
                "M2",
                {
                    "reason": reason,
                    "start": ago(start).isoformat(),
                    "end": ago(end).isoformat(),
                    "operator": "Anna",
                },
                ago(end),
            ),
        ]
    events += [
        event("machine.partcount", "M1", {"count": 110, "kind": "all"}, ago(2)),
        event("machine.partcount", "M2", {"count": 70, "kind": "all"}, ago(12)),
        event("machine.partcount", "M2", {"count": 3, "kind": "bad"}, ago(12)),
        event("machine.execution", "M3", {"execution": "STOPPED"}, ago(15)),
        event("machine.partcount", "M3", {"count": 80, "kind": "all"}, ago(15)),
        event("machine.availability", "M4", {"availability": "UNAVAILABLE"}, ago(5)),
    ]
    return events


def board(
    serve_hub: Callable[..., ServedHub], page: Page, role: str = "viewer", to: str = "/ui/"
) -> tuple[ServedHub, datetime]:
    now = datetime.now(UTC).replace(microsecond=0)
    served = serve_hub(plant(now))
    served.publish(*floor(now))
    sign_in(page, served, role, to)
    return served, now


def background(page: Page, selector: str) -> str:
    color: str = page.eval_on_selector(selector, "el => getComputedStyle(el).backgroundColor")
    return color


def tile_order(page: Page) -> list[str]:
    """The tiles' machines in the order shown, read at one moment (the live stream may move them
    between two reads)."""
    order: list[str] = page.eval_on_selector_all(
        "ul.tiles > li", "tiles => tiles.map(t => t.dataset.machine)"
    )
    return order


def live_on(page: Page) -> None:
    """Wait for the board's live stream to have given its first tiles."""
    page.wait_for_function("() => document.getElementById('board').dataset.position !== undefined")


# --- (a) a tile follows its machine --------------------------------------------------------------


def test_a_tile_changes_colour_within_a_second_of_a_machine_event(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    served, _ = board(serve_hub, page)
    tile = page.locator("#tile-M1")
    expect(tile).to_have_attribute("data-state", "running")
    expect(tile.locator(".state-word")).to_have_text("Running")
    assert background(page, "#tile-M1") == RUNNING
    live_on(page)

    # The page notes the moment the tile turns, by its own clock (the wall clock, as this
    # test's): what is measured is the hub and the page, not this test's calls to the browser,
    # which a loaded machine can hold up for seconds.
    page.evaluate(
        """colour => {
          window.turnedAt = null;
          const turned = () => {
            const tile = document.getElementById('tile-M1');
            if (window.turnedAt === null && getComputedStyle(tile).backgroundColor === colour) {
              window.turnedAt = Date.now();
            }
          };
          new MutationObserver(turned).observe(
            document.getElementById('board'), {subtree: true, childList: true, attributes: true});
        }""",
        STOPPED,
    )
    stop = cloud_event(
        "mes.machine.execution.v1", "M1", {"execution": "STOPPED"}, at=datetime.now(UTC)
    )
    published = time.time()
    served.run(served.hub.publisher.publish_many([stop]))
    page.wait_for_function("() => window.turnedAt !== null")
    took = page.evaluate("window.turnedAt") / 1000 - published
    expect(tile).to_have_attribute("data-state", "stopped")
    assert background(page, "#tile-M1") == STOPPED
    assert took < 1.0, f"the tile turned after {took:.2f} s"
    # In place: the same page (no reload), the state in words, its reason, time counted (in
    # seconds: it has just begun).
    expect(tile.locator(".state-word")).to_have_text("Stopped")
    expect(tile.locator(".reason-code")).to_have_text("unassigned")
    expect(tile.locator("[data-since]")).to_have_text(re.compile(r"^\d{1,2} s$"))
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1

    # It runs again: green again, and with ?sort=worst it would move; here by machine id.
    served.run(
        served.hub.publisher.publish_many(
            [
                cloud_event(
                    "mes.machine.execution.v1", "M1", {"execution": "ACTIVE"}, at=datetime.now(UTC)
                )
            ]
        )
    )
    expect(tile).to_have_attribute("data-state", "running")
    assert tile_order(page) == list(MACHINES)


def test_worst_first_keeps_its_order_as_machines_change(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    served, _ = board(serve_hub, page, to="/ui/?sort=worst")
    order = tile_order(page)
    assert set(order[:2]) == {"M3", "M4"} and order[2:] == ["M2", "M1"]
    live_on(page)
    served.run(
        served.hub.publisher.publish_many(
            [
                cloud_event(
                    "mes.machine.execution.v1", "M1", {"execution": "STOPPED"}, at=datetime.now(UTC)
                )
            ]
        )
    )
    expect(page.locator("ul.tiles > li").nth(2)).not_to_have_attribute("data-machine", "M2")
    order = tile_order(page)
    assert set(order[:3]) == {"M1", "M3", "M4"} and order[3] == "M2"


# --- (c), (d) the board's accessibility and its picture ------------------------------------------


def test_the_board_passes_axe_and_is_pictured(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    page.set_viewport_size({"width": 1920, "height": 1080})  # a wall screen
    board(serve_hub, page, role="operator")
    live_on(page)
    expect(page.locator("#tile-M3 .state-word")).to_have_text("Stopped")
    assert axe_check(page) == []
    screenshot(page, "board")


# --- (b) the OEE page's charts are the API's figures ---------------------------------------------


def oee_window(now: datetime) -> dict[str, str]:
    """The hour before the last 10 minutes: closed, so its figures stay what they are."""
    return {
        "from": (now - timedelta(minutes=70)).isoformat(),
        "to": (now - timedelta(minutes=10)).isoformat(),
    }


def page_path(params: dict[str, str]) -> str:
    """``/ui/oee?…``, quoted whole to ride in a sign-in link's ``next``."""
    return quote(f"/ui/oee?{urlencode(params)}", safe="")


def api_oee(served: ServedHub, params: dict[str, str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key('auditor')}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=10) as http:
        answer = http.get("/api/v1/oee", params=params)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def bars(page: Page, selector: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = page.eval_on_selector_all(
        selector,
        "els => els.map(e => ({key: e.dataset.key || '', kind: e.dataset.kind || '',"
        " reason: e.dataset.reason || '', seconds: e.dataset.seconds}))",
    )
    return found


def test_the_waterfall_adds_up_and_the_pareto_is_the_api_s_downtime(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    served = serve_hub(plant(now))
    served.publish(*floor(now))
    window = oee_window(now)
    sign_in(page, served, "viewer", page_path({"machine": "M2", **window}))
    whole = api_oee(served, {"machine": "M2", **window})["buckets"][0]

    drawn = bars(page, "#waterfall [data-seconds]")
    (start,) = [b for b in drawn if b["kind"] == "start"]
    parts = [b for b in drawn if b["kind"] in ("loss", "end")]
    assert Decimal(start["seconds"]) == Decimal(str(whole["planned_busy_time_s"])) == 3600
    assert sum(Decimal(b["seconds"]) for b in parts) == Decimal(start["seconds"])
    assert (
        {b["reason"]: float(b["seconds"]) for b in parts if b["key"] == "downtime"}
        == whole["downtime_s_by_reason"]
        == {"mechanical/spindle": 600, "material/waiting": 300, "mechanical/coolant": 300}
    )

    pareto = {b["reason"]: float(b["seconds"]) for b in bars(page, "#pareto [data-seconds]")}
    first_level: dict[str, float] = {}
    for code, seconds in whole["downtime_s_by_reason"].items():
        first_level[code.split("/")[0]] = first_level.get(code.split("/")[0], 0) + seconds
    assert pareto == first_level == {"mechanical": 900, "material": 300}
    # Longest first, and a bar drills into the reasons under it.
    assert [b["reason"] for b in bars(page, "#pareto [data-seconds]")] == ["mechanical", "material"]
    # Every table can be exported (mes.js adds the button).
    tables = page.locator("table[data-csv]").count()
    assert tables == 4 and page.locator("button.csv-export").count() == tables
    assert axe_check(page) == []
    screenshot(page, "oee-machine", full_page=True)

    page.locator("#pareto .pareto-bar[data-reason='mechanical'] rect").click()
    expect(page).to_have_url(re.compile("drill=mechanical"))
    # The new page is there (its address changes when it starts to arrive, not when it is read).
    page.wait_for_load_state()
    drilled = {b["reason"]: float(b["seconds"]) for b in bars(page, "#pareto [data-seconds]")}
    assert drilled == {"mechanical/spindle": 600, "mechanical/coolant": 300}


def test_the_oee_page_fetches_its_figures_again_when_its_machine_changes(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    served = serve_hub(plant(now))
    served.publish(*floor(now))
    window = {
        "from": (now - timedelta(hours=1)).isoformat(),
        "to": (now + timedelta(hours=1)).isoformat(),
    }
    sign_in(page, served, "viewer", page_path({"machine": "M1", **window, "group_by": "hour"}))
    expect(page.locator("tr.bucket.provisional").first).to_contain_text("provisional")
    assert page.locator("#pareto").count() == 0  # M1 has not stopped
    page.wait_for_function("() => document.getElementById('live-part').dataset.live === 'open'")
    served.publish(
        cloud_event(
            "mes.machine.execution.v1",
            "M1",
            {"execution": "STOPPED"},
            at=datetime.now(UTC) - timedelta(minutes=5),
        )
    )
    expect(page.locator("#pareto .pareto-bar[data-reason='unassigned']")).to_have_count(1)
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1


def test_the_orders_page_passes_axe_and_is_pictured(
    serve_hub: Callable[..., ServedHub], page: Page
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    served = serve_hub(plant(now))

    def release(order_id: str, quantity: int, due: timedelta, machine: str) -> CloudEvent:
        return cloud_event(
            "mes.erp.order.released.v1",
            order_id,
            {
                "order_id": order_id,
                "part_number": f"P-{order_id[-1]}",
                "quantity": quantity,
                "due": (now + due).isoformat(),
                "ideal_cycle_time_s": 30,
                "customer": "ACME",
                "machine_id": machine,
            },
            at=now - timedelta(hours=2),
        )

    served.publish(
        *floor(now),
        release("SO-1", 400, timedelta(days=3), "M1"),
        release("SO-2", 50_000, timedelta(days=1), "M2"),
        release("SO-3", 100, -timedelta(hours=1), "M3"),
        cloud_event(
            "mes.operator.order_started.v1",
            "M1",
            {"order_id": "SO-1"},
            at=now - timedelta(minutes=80),
        ),
    )
    sign_in(page, served, "viewer", "/ui/orders")
    rows = page.locator("table[data-csv='orders'] tbody tr")
    expect(rows).to_have_count(3)
    assert [r.get_attribute("data-delivery") for r in rows.all()] == ["late", "at_risk", "on_track"]
    expect(page.locator("button.csv-export")).to_have_count(1)
    assert axe_check(page) == []
    screenshot(page, "orders")
