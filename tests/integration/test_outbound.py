"""Outbound calls (hub/outbound.py): internal addresses are refused unless allowed, at every
connection and on the very address connected to; plain http only where allowed; no redirect
followed; bodies capped; credentials never ride in a URL. Real servers on loopback, the real
checks: only a test's own host names go through a resolver it gives."""

from __future__ import annotations

import gzip
import ipaddress
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from hub.outbound import (
    Allowlist,
    IpAddress,
    OutboundRefused,
    ResponseTooLarge,
    check_url,
    is_public,
    not_public,
    outbound_client,
)
from hub.server import ApiServer


def ip(text: str) -> IpAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),  # IPv4-mapped public: the same host
        ("64:ff9b::808:808", None),  # NAT64 of a public address
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),  # AWS over IPv6 (inside fc00::/7)
        ("100.100.100.200", "cloud metadata"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("fec0::1", "site-local"),
        ("::ffff:127.0.0.1", "loopback, IPv4-mapped"),
        ("::ffff:10.0.0.1", "private, IPv4-mapped"),
        ("::ffff:169.254.169.254", "cloud metadata, IPv4-mapped"),
        ("::7f00:1", "loopback, IPv4-compatible"),
        ("::808:808", "IPv4-compatible"),  # deprecated: never called
        ("64:ff9b::7f00:1", "loopback, NAT64"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata, NAT64"),
        ("64:ff9b:1::a00:1", "local-use NAT64"),
        ("::ffff:0:7f00:1", "SIIT"),  # IPv4-translated loopback
        ("2002:7f00:1::", "loopback, 6to4"),
        ("2002:a9fe:a9fe::", "cloud metadata, 6to4"),
        ("2002:a00:1::", "private, 6to4"),
        ("2001:0:808:808::80ff:fffe", "loopback, Teredo"),  # client 127.0.0.1, obfuscated
    ],
)
def test_only_public_addresses_are_public_and_the_others_say_why(
    address: str, why: str | None
) -> None:
    reason = not_public(ip(address))
    assert is_public(ip(address)) is (why is None)
    if why is not None:
        assert reason is not None and why in reason


def test_a_url_is_refused_for_its_scheme_credentials_or_an_internal_address() -> None:
    nothing = Allowlist()
    for url, why in (
        ("ftp://erp.example/x", "only http"),
        ("https://user:pw@erp.example/", "credentials go in a secret"),
        ("http://erp.example/", "internal address"),
        ("https://erp.example/", r"erp\.example resolves to 10\.0\.0\.5, an internal address"),
    ):
        with pytest.raises(OutboundRefused, match=why):
            check_url(url, nothing, addresses=[ip("10.0.0.5")])
    # Allowed by network, or by host name — plain http too.
    check_url("http://erp.example/", Allowlist.of(["10.0.0.0/8"]), [ip("10.0.0.5")])
    check_url("http://erp.example/", Allowlist.of(["ERP.example"]), [ip("10.0.0.5")])
    check_url("https://erp.example/", nothing, [ip("93.184.216.34")])
    # One internal address among public ones is enough to refuse.
    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1.*loopback"):
        check_url("https://erp.example/", nothing, [ip("93.184.216.34"), ip("127.0.0.1")])


def test_https_is_required_unless_the_host_or_its_network_is_allowed() -> None:
    public = [ip("93.184.216.34")]
    with pytest.raises(OutboundRefused, match=r"erp\.example: http:// to 93\.184\.216\.34.*https"):
        check_url("http://erp.example/hook", Allowlist(), public)
    check_url("http://erp.example/hook", Allowlist.of(["93.184.216.0/24"]), public)
    check_url("http://erp.example/hook", Allowlist.of(["erp.example"]), public)
    with pytest.raises(OutboundRefused, match="https"):  # another host's entry is not this one's
        check_url("http://erp.example/hook", Allowlist.of(["other.example", "10.0.0.0/8"]), public)


def test_a_host_name_allowed_never_admits_cloud_metadata_only_a_network_does() -> None:
    metadata = [ip("169.254.169.254")]
    with pytest.raises(OutboundRefused, match=r"cloud metadata.*a network that holds it"):
        check_url("http://erp.plant/", Allowlist.of(["erp.plant"]), metadata)
    with pytest.raises(OutboundRefused, match="cloud metadata"):
        check_url("http://erp.plant/", Allowlist.of(["erp.plant"]), [ip("fd00:ec2::254")])
    check_url("http://erp.plant/", Allowlist.of(["169.254.169.254/32"]), metadata)
    # A private network admits its IPv4-mapped form (what a dual-stack resolver may answer).
    check_url("http://erp.plant/", Allowlist.of(["10.0.0.0/8"]), [ip("::ffff:10.1.2.3")])


# --- through the client, on real sockets ------------------------------------------------------


@asynccontextmanager
async def serving(app: FastAPI, host: str = "127.0.0.1") -> AsyncIterator[ApiServer]:
    server = ApiServer(app, host, 0)
    server.start()
    try:
        yield server
    finally:
        await server.stop()


def counting_app() -> tuple[FastAPI, list[str]]:
    """An app that records every request it gets (path, then the address it was reached on)."""
    app, hits = FastAPI(), []

    @app.get("/{path:path}")
    async def anything(path: str, request: Request) -> dict[str, str]:
        server = request.scope["server"]
        hits.append(path)
        return {"path": path, "reached": server[0], "host": request.headers["host"]}

    return app, hits


async def test_internal_addresses_are_refused_naming_the_host_and_why() -> None:
    app, hits = counting_app()
    async with serving(app) as server, outbound_client(Allowlist(), 5) as client:
        port = server.port
        for url, why in (
            (f"http://127.0.0.1:{port}/a", r"^127\.0\.0\.1 is an internal address \(loopback\)"),
            (f"https://127.0.0.1:{port}/a", r"127\.0\.0\.1 is an internal address \(loopback\)"),
            (f"http://localhost:{port}/a", r"^localhost resolves to 127\.0\.0\.1.*\(loopback\)"),
            (
                f"http://[::ffff:127.0.0.1]:{port}/a",
                r"^::ffff:127\.0\.0\.1 is an internal address \(loopback, IPv4-mapped 127\.0\.0\.1",
            ),
            (f"http://10.0.0.1:{port}/a", r"^10\.0\.0\.1 is an internal address \(private\)"),
            (
                "http://169.254.169.254/latest/meta-data/",
                r"^169\.254\.169\.254 is an internal address \(cloud metadata\)",
            ),
            (f"http://100.64.0.1:{port}/a", r"\(shared address space \(CGNAT\)\)"),
            (f"http://[::1]:{port}/a", r"^::1 is an internal address \(loopback\)"),
        ):
            with pytest.raises(OutboundRefused, match=why):
                await client.get(url)
            with pytest.raises(OutboundRefused, match=why):
                await client.post(url, json={"x": 1})
        assert hits == []  # refused before a connection: nothing reached the server


async def test_an_allowed_network_or_host_is_called_over_plain_http() -> None:
    app, hits = counting_app()
    async with serving(app) as server:
        port = server.port
        for allow in (["127.0.0.0/8"], ["127.0.0.1/32"], ["localhost"], ["127.0.0.1"]):
            async with outbound_client(Allowlist.of(allow), 5) as client:
                host = "localhost" if allow == ["localhost"] else "127.0.0.1"
                answer = await client.get(f"http://{host}:{port}/ok")
                assert answer.json()["path"] == "ok", allow
        # Allowed by name: another name for the same address is not.
        async with outbound_client(Allowlist.of(["localhost"]), 5) as client:
            with pytest.raises(OutboundRefused, match=r"^127\.0\.0\.1 is an internal"):
                await client.get(f"http://127.0.0.1:{port}/ok")
    assert hits == ["ok"] * 4


async def test_https_is_required_to_a_public_address_before_any_connection() -> None:
    # erp.example is a test name: only this resolver knows it; nothing is connected to.
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> Sequence[IpAddress]:
        calls.append((host, port))
        return [ip("93.184.216.34")]

    async with outbound_client(Allowlist(), 5, resolver=resolver) as client:
        with pytest.raises(OutboundRefused, match=r"^erp\.example: http:// to 93\.184.*https://"):
            await client.post("http://erp.example/hook", json={})
    assert calls == [("erp.example", 80)]


async def test_a_redirect_is_never_followed_even_to_an_allowed_address() -> None:
    inner, inner_hits = counting_app()
    async with serving(inner, "127.0.0.2") as elsewhere:
        outer = FastAPI()

        @outer.get("/away")
        async def away() -> RedirectResponse:
            return RedirectResponse(f"http://127.0.0.2:{elsewhere.port}/secret")

        @outer.post("/back", status_code=303)
        async def back() -> RedirectResponse:
            return RedirectResponse("/ok", status_code=303)  # to itself: allowed, not followed

        @outer.get("/ok")
        async def ok() -> dict[str, bool]:
            raise AssertionError("a redirect was followed")

        async with serving(outer) as server:
            url = server.url
            async with outbound_client(Allowlist.of(["127.0.0.1/32"]), 5) as client:
                with pytest.raises(
                    OutboundRefused,
                    match=r"^127\.0\.0\.1 answered 307 redirecting to 127\.0\.0\.2: .*no redirects",
                ):
                    await client.get(f"{url}/away", follow_redirects=True)
            async with outbound_client(Allowlist.of(["127.0.0.0/8"]), 5) as client:
                for follow in (True, False):
                    with pytest.raises(OutboundRefused, match=r"redirecting to 127\.0\.0\.2"):
                        await client.get(f"{url}/away", follow_redirects=follow)
                    with pytest.raises(OutboundRefused, match=r"303 redirecting to 127\.0\.0\.1"):
                        await client.post(f"{url}/back", follow_redirects=follow)
    assert inner_hits == []
    with pytest.raises(OutboundRefused, match="follow_redirects"):
        outbound_client(Allowlist(), 5, follow_redirects=True)


async def test_a_body_is_read_up_to_the_cap_never_decompressed_and_never_put_in_the_error() -> None:
    secretish = b"s3cr3t-" * 100_000  # 700 kB
    app = FastAPI()

    @app.get("/big")
    async def big() -> Response:
        return Response(secretish, media_type="text/plain")

    asked: list[str] = []

    @app.get("/bomb")
    async def bomb(request: Request) -> Response:  # 16 kB on the wire, 16 MB decoded
        asked.append(request.headers.get("accept-encoding", ""))
        body = gzip.compress(b"\0" * 16_000_000)
        return Response(body, media_type="text/plain", headers={"Content-Encoding": "gzip"})

    @app.get("/small")
    async def small() -> Response:
        return Response(b"fine", media_type="text/plain")

    async with serving(app) as server:
        allow = Allowlist.of(["127.0.0.1"])
        async with outbound_client(allow, 5, max_body_bytes=64 * 1024) as client:
            assert (await client.get(f"{server.url}/small")).text == "fine"
            with pytest.raises(ResponseTooLarge, match=r"^127\.0\.0\.1 .*65536 bytes") as err:
                await client.get(f"{server.url}/big")
            assert "s3cr3t" not in str(err.value)
            with pytest.raises(ResponseTooLarge):  # streamed: the same cap
                async with client.stream("GET", f"{server.url}/big") as answer:
                    async for _ in answer.aiter_bytes():
                        pass
            # A compressed answer is never decoded (one chunk could decode to gigabytes): the
            # hub asks for none, and refuses one sent anyway before reading it.
            for _ in range(2):
                with pytest.raises(OutboundRefused, match=r"gzip body though asked for none"):
                    await client.get(f"{server.url}/bomb")
            assert asked == ["identity", "identity"]
            # The client still works after a refused body.
            assert (await client.get(f"{server.url}/small")).text == "fine"
        async with outbound_client(allow, 5) as client:  # the default cap: larger
            assert (await client.get(f"{server.url}/big")).content == secretish


async def test_the_address_checked_is_the_address_connected_to() -> None:
    app, hits = counting_app()
    async with serving(app, "127.0.0.2") as server:
        port = server.port

        # A name whose answer changes between a check and the connection (DNS rebinding): public
        # when check_url asks, loopback when the client connects. The client's own check, on
        # the answer it connects with, refuses.
        answers = iter([[ip("93.184.216.34")], [ip("127.0.0.2")]])

        def rebinding(host: str, port: int) -> Sequence[IpAddress]:
            return next(answers)

        url = f"https://rebind.example:{port}/x"
        check_url(url, Allowlist(), resolver=rebinding)
        async with outbound_client(Allowlist(), 5, resolver=rebinding) as client:
            with pytest.raises(OutboundRefused, match=r"^rebind\.example resolves to 127\.0\.0\.2"):
                await client.get(url)

        # Resolved once per connection, checked, and connected to as resolved: a name no DNS
        # knows reaches the allowed address its resolver gave (no second look-up), with its
        # own name in Host.
        asked: list[str] = []

        def pinned(host: str, port: int) -> Sequence[IpAddress]:
            asked.append(host)
            return [ip("127.0.0.2")]

        allow = Allowlist.of(["127.0.0.2/32"])
        async with outbound_client(allow, 5, resolver=pinned) as client:
            answer = (await client.get(f"http://pinned.invalid:{port}/y")).json()
        assert answer == {"path": "y", "reached": "127.0.0.2", "host": f"pinned.invalid:{port}"}
        assert asked == ["pinned.invalid"]

        # Each new connection is checked anew: an answer that turns internal is refused; one
        # internal address among allowed ones refuses the lot.
        for turned in ([ip("169.254.169.254")], [ip("127.0.0.2"), ip("127.0.0.1")]):

            def turning(host: str, port: int, turned: list[IpAddress] = turned) -> list[IpAddress]:
                return turned

            async with outbound_client(allow, 5, resolver=turning) as client:
                with pytest.raises(OutboundRefused, match=r"pinned\.invalid resolves to"):
                    await client.get(f"http://pinned.invalid:{port}/z")
    assert hits == ["y"]


async def test_proxies_are_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens: a proxy would fail
    app, hits = counting_app()
    async with serving(app) as server, outbound_client(Allowlist.of(["127.0.0.1"]), 5) as client:
        assert (await client.get(f"{server.url}/direct")).status_code == 200
    assert hits == ["direct"]
    for option in ("proxy", "mounts", "transport", "verify"):
        with pytest.raises(OutboundRefused, match=option):
            options: dict[str, Any] = {option: None}
            outbound_client(Allowlist(), 5, **options)
