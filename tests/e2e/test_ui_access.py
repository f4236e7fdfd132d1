"""Signing in to the floor's screens, sessions and CSRF, and the live stream, against a real
hub on a real socket (hub.ui.access, hub.ui.sessions, hub.ui.live)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from hub.api.app import create_app
from hub.api.deps import CSRF_HEADER, SESSION_COOKIE
from hub.bootstrap import Hub, api_context, screen_sessions
from hub.nats_auth import signing_key
from hub.server import ApiServer
from hub.settings import Settings
from tests.conftest import api_key, cloud_event, eventually


@pytest.fixture
async def server(hub: Hub) -> AsyncIterator[ApiServer]:
    running = ApiServer(create_app(api_context(hub)), "127.0.0.1", 0)
    running.start()
    yield running
    await running.stop()


async def sign_in(client: httpx.AsyncClient, role: str, next_page: str = "/ui/") -> httpx.Response:
    return await client.post("/ui/login", data={"key": api_key(role), "next": next_page})


def csrf_of(page: str) -> str:
    marker = '<meta name="csrf-token" content="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


async def machine_reported(hub: Hub, machine: str = "M1", execution: str = "ACTIVE") -> None:
    before = hub.ingest_stats().applied
    await hub.publisher.publish_many(
        [cloud_event("mes.machine.execution.v1", machine, {"execution": execution})]
    )
    await eventually(lambda: hub.ingest_stats().applied == before + 1)
    await hub.wait_projected()


async def test_a_key_signs_a_device_in_with_a_strict_http_only_cookie(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        first = await client.get("/ui/admin?x=1")
        assert first.status_code == 303
        assert first.headers["location"] == "/ui/login?next=/ui/admin%3Fx%3D1"
        answer = await sign_in(client, "admin", "/ui/admin?x=1")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/admin?x=1"
        cookie = answer.headers["set-cookie"].lower()
        for attribute in ("httponly", "samesite=strict", "path=/"):
            assert attribute in cookie
        assert "secure" not in cookie  # served over http here
        assert api_key("admin") not in answer.headers["set-cookie"]  # a token, never the key
        # The GET routes of the API take the session too: the pages' links to them open.
        machines = await client.get("/api/v1/machines")
        assert machines.status_code == 200


async def test_wrong_keys_and_roles_without_screens_are_refused(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        wrong = await client.post("/ui/login", data={"key": "not-a-key-0123456789"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        for role in ("erp", "supplier", "auditor"):
            refused = await sign_in(client, role)
            assert refused.status_code == 403, role
            assert f"a {role} key cannot use the screens" in refused.text
        assert SESSION_COOKIE not in client.cookies


async def test_after_signing_in_only_pages_of_the_screens_are_gone_to(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for elsewhere in ("https://evil.example/ui/", "//evil.example/ui/", "/api/v1/machines"):
            answer = await sign_in(client, "viewer", elsewhere)
            assert answer.headers["location"] == "/ui/", elsewhere


async def test_a_form_posted_from_another_site_signs_nobody_in(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = await client.post(
            "/ui/login",
            data={"key": api_key("admin")},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert answer.status_code == 403
        assert SESSION_COOKIE not in client.cookies


async def test_a_change_needs_the_pages_csrf_token(server: ApiServer, hub: Hub) -> None:
    await machine_reported(hub)
    event = cloud_event(
        "mes.operator.scrap.v1", "M1", {"quantity": 1, "reason": "burr"}
    ).model_dump(mode="json", exclude_none=True)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await sign_in(client, "operator")
        page = await client.get("/ui/admin")  # refused (403 page), but it carries the token
        assert page.status_code == 403 and "may not open this page" in page.text
        token = csrf_of(page.text)
        body = json.dumps(event)
        kind = {"Content-Type": "application/cloudevents+json"}
        without = await client.post("/api/v1/events", content=body, headers=kind)
        assert without.status_code == 403
        assert without.headers["content-type"] == "application/problem+json"
        assert CSRF_HEADER in without.json()["detail"]
        forged = await client.post(
            "/api/v1/events", content=body, headers={**kind, CSRF_HEADER: "guess"}
        )
        assert forged.status_code == 403
        sent = await client.post(
            "/api/v1/events", content=body, headers={**kind, CSRF_HEADER: token}
        )
        assert sent.status_code == 202, sent.text
        assert sent.json()["id"] == event["id"]


async def test_a_viewer_reads_but_cannot_tap(server: ApiServer, hub: Hub) -> None:
    await machine_reported(hub)
    event = cloud_event("mes.operator.scrap.v1", "M1", {"quantity": 1, "reason": "burr"})
    async with httpx.AsyncClient(base_url=server.url) as client:
        await sign_in(client, "viewer")
        token = csrf_of((await client.get("/ui/login?next=/ui/admin", follow_redirects=True)).text)
        answer = await client.post(
            "/api/v1/events",
            content=event.model_dump_json(exclude_none=True),
            headers={"Content-Type": "application/cloudevents+json", CSRF_HEADER: token},
        )
        assert answer.status_code == 403
        assert "role 'viewer' may not do this" in answer.json()["detail"]


async def test_signing_out_ends_the_session(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        await sign_in(client, "admin")
        cookie = client.cookies[SESSION_COOKIE]
        page = await client.get("/ui/admin")
        assert page.status_code == 200
        out = await client.post("/ui/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    # The old cookie, kept by whoever copied it, opens nothing any more.
    async with httpx.AsyncClient(base_url=server.url, cookies={SESSION_COOKIE: cookie}) as thief:
        assert (await thief.get("/ui/admin")).status_code == 303
        assert (await thief.get("/api/v1/machines")).status_code == 401


async def test_sign_out_without_the_token_does_nothing(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        await sign_in(client, "admin")
        forged = await client.post("/ui/logout", data={"csrf": "guess"})
        assert forged.status_code == 403
        assert (await client.get("/ui/admin")).status_code == 200


async def test_an_admin_ends_another_devices_session(server: ApiServer) -> None:
    async with (
        httpx.AsyncClient(base_url=server.url) as admin,
        httpx.AsyncClient(base_url=server.url) as wall,
    ):
        await sign_in(admin, "admin")
        await sign_in(wall, "viewer")
        assert (await wall.get("/api/v1/machines")).status_code == 200
        page = (await admin.get("/ui/admin")).text
        assert page.count("/end") == 2  # both devices listed
        viewer_row = next(r for r in page.split("<tr>") if "<td>viewer</td>" in r)
        session_id = viewer_row.split("<code>")[1].split("</code>")[0]
        ended = await admin.post(
            f"/ui/admin/sessions/{session_id}/end", data={"csrf": csrf_of(page)}
        )
        assert ended.status_code == 303
        assert (await wall.get("/api/v1/machines")).status_code == 401
        assert (await admin.get("/ui/admin")).status_code == 200


async def test_a_one_time_link_opens_one_session_once(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as admin:
        await sign_in(admin, "admin")
        page = (await admin.get("/ui/admin")).text
        viewer_option = next(o for o in page.split("<option") if "viewer ·" in o)
        key_id = viewer_option.split('value="')[1].split('"')[0]
        made = await admin.post(
            "/ui/admin/links", data={"csrf": csrf_of(page), "key_id": key_id, "next": "/ui/"}
        )
        assert made.status_code == 200
        link = made.text.split('id="one-time-link">')[1].split("<")[0].replace("&amp;", "&")
    async with httpx.AsyncClient() as scanner:
        # A mail scanner opening the link uses nothing up: the page asks first.
        for _ in range(2):
            asked = await scanner.get(link)
            assert asked.status_code == 200 and "Sign in as viewer" in asked.text
        assert SESSION_COOKIE not in scanner.cookies
    async with httpx.AsyncClient() as wall:
        entered = await wall.post(link.split("?")[0], data={"next": "/ui/"})
        assert entered.status_code == 303 and entered.headers["location"] == "/ui/"
        assert SESSION_COOKIE in wall.cookies
    async with httpx.AsyncClient() as again:
        second = await again.post(link.split("?")[0], data={"next": "/ui/"})
        assert second.status_code == 401 and "used already" in second.text
        assert (await again.get(link)).status_code == 401


async def test_revoking_a_key_ends_its_sessions(
    server: ApiServer, hub: Hub, settings: Settings
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        await sign_in(client, "viewer")
        await sign_in(client_admin := httpx.AsyncClient(base_url=server.url), "admin")
        assert (await client.get("/api/v1/machines")).status_code == 200
        cookie = client.cookies[SESSION_COOKIE]
        # The key is taken out of the settings: a hub reading them finds the session over at
        # once, and one starting with them removes it from the file.
        kept = [k for k in settings.parsed_api_keys() if k.role != "viewer"]
        secret = signing_key(settings.data_dir)
        starting = screen_sessions(settings, kept, secret)
        assert starting.find(cookie) is None
        assert [s.role for s in starting.listed()] == ["admin"]
        assert (await client.get("/api/v1/machines")).status_code == 401
        assert (await client_admin.get("/api/v1/machines")).status_code == 200
        await client_admin.aclose()


async def read_events(lines: AsyncIterator[str], wanted: int) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name = ""
    async for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            if len(events) >= wanted:
                break
    return events


async def test_the_live_stream_sends_the_tiles_then_each_change(
    server: ApiServer, hub: Hub
) -> None:
    await machine_reported(hub, "M1")
    await machine_reported(hub, "M2")
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        await sign_in(client, "viewer")
        async with client.stream("GET", "/ui/live", params={"machine": "M1"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            ((name, first),) = await read_events(lines, 1)
            assert name == "tiles" and first["full"] is True
            assert [t["machine_id"] for t in first["tiles"]] == ["M1"]  # only what it shows
            assert first["tiles"][0]["state"] == "running"
            await machine_reported(hub, "M2", "STOPPED")  # not shown: nothing sent of it
            await machine_reported(hub, "M1", "STOPPED")
            received: list[tuple[str, Any]] = []

            async def until_stopped() -> None:
                while not any(
                    t["state"] == "stopped" for n, d in received if n == "tiles" for t in d["tiles"]
                ):
                    received.extend(await read_events(lines, 1))

            await asyncio.wait_for(until_stopped(), 10)
            # The round's tiles come with its views event, naming what changed.
            received.extend(await asyncio.wait_for(read_events(lines, 1), 10))
    shown = {t["machine_id"] for name, data in received if name == "tiles" for t in data["tiles"]}
    assert shown == {"M1"}
    views = [data["machines"] for name, data in received if name == "views"]
    assert views and all(machines == ["M1"] for machines in views)


async def test_the_live_stream_wants_a_session_or_a_key(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = await client.get("/ui/live")
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/problem+json"


async def test_the_pages_run_only_their_own_script_and_are_framed_by_nobody(
    server: ApiServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        page = await client.get("/ui/login")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"  # a signed-in page is not kept
        assert "<script>" not in page.text  # no inline script for the policy to allow
        script = await client.get("/ui/static/mes.js")
        assert script.status_code == 200 and "TapQueue" in script.text
        assert "no-store" not in script.headers.get("cache-control", "")


async def test_a_page_of_figures_hears_of_the_views_moving_only(
    server: ApiServer, hub: Hub
) -> None:
    await machine_reported(hub, "M1")
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        await sign_in(client, "viewer")
        async with client.stream("GET", "/ui/live", params={"tiles": "false"}) as stream:
            lines = stream.aiter_lines()
            ((name, first),) = await read_events(lines, 1)
            assert (name, first["full"], first["machines"]) == ("views", True, [])
            # The ERP releases an order: no machine changed, yet the orders page must hear.
            release = cloud_event(
                "mes.erp.order.released.v1",
                "SO-9",
                {"order_id": "SO-9", "part_number": "P", "quantity": 5,
                 "due": "2030-01-01T00:00:00Z", "ideal_cycle_time_s": 30},
            )  # fmt: skip
            before = hub.ingest_stats().applied
            await hub.publisher.publish_many([release])
            await eventually(lambda: hub.ingest_stats().applied == before + 1)

            async def next_move(after: int) -> tuple[str, Any]:
                while True:  # (what was queued before, of the position first sent, is passed)
                    ((name, data),) = await read_events(lines, 1)
                    if data["position"] > after:
                        return name, data

            name, moved = await asyncio.wait_for(next_move(first["position"]), 10)
            assert (name, moved["machines"]) == ("views", [])
            await machine_reported(hub, "M1", "STOPPED")
            name, changed = await asyncio.wait_for(next_move(moved["position"]), 10)
            assert (name, changed["machines"]) == ("views", ["M1"])  # and no tiles at all


async def test_a_live_stream_ends_when_its_session_does(server: ApiServer, hub: Hub) -> None:
    await machine_reported(hub)
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        await sign_in(client, "admin")
        token = csrf_of((await client.get("/ui/admin")).text)
        async with client.stream("GET", "/ui/live") as stream:
            lines = stream.aiter_lines()
            await read_events(lines, 1)
            out = await client.post("/ui/logout", data={"csrf": token})
            assert out.status_code == 303

            async def drain() -> None:
                async for _ in lines:
                    pass

            await asyncio.wait_for(drain(), 15)  # ended by the hub, not by this test
