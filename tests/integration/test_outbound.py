"""Outbound calls (hub/outbound.py): internal addresses are refused unless allowed, at every
connection — redirects included — and credentials never ride in a URL."""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from hub.outbound import Allowlist, OutboundRefused, check_url, is_public, outbound_client
from tests.erp_standins import served


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),  # cloud metadata
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of the metadata address
        ("2002:7f00:1::", False),  # 6to4 of loopback
        ("::7f00:1", False),  # the old IPv4-compatible form
        ("fec0::1", False),  # site-local
        ("fe80::1", False),
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_a_url_is_refused_for_its_scheme_credentials_or_an_internal_address() -> None:
    nothing = Allowlist()
    for url, why in (
        ("ftp://erp.example/x", "only http"),
        ("https://user:pw@erp.example/", "credentials go in a secret"),
        ("http://erp.example/", "internal address"),
    ):
        with pytest.raises(OutboundRefused, match=why):
            check_url(url, nothing, addresses=[ipaddress.ip_address("10.0.0.5")])
    # Allowed by network, or by host name.
    check_url(
        "http://erp.example/", Allowlist.of(["10.0.0.0/8"]), [ipaddress.ip_address("10.0.0.5")]
    )
    check_url(
        "http://erp.example/", Allowlist.of(["ERP.example"]), [ipaddress.ip_address("10.0.0.5")]
    )
    check_url("https://erp.example/", nothing, [ipaddress.ip_address("93.184.216.34")])


async def test_the_client_refuses_loopback_unless_allowed_and_checks_every_redirect() -> None:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/away")
    async def away() -> RedirectResponse:
        return RedirectResponse("http://169.254.169.254/latest/meta-data/")

    async with served(app) as url:
        async with outbound_client(Allowlist(), 5) as client:
            with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1"):
                await client.get(f"{url}/ok")
        async with outbound_client(Allowlist.of(["127.0.0.1"]), 5) as client:
            assert (await client.get(f"{url}/ok")).json() == {"ok": True}
            with pytest.raises(OutboundRefused, match=r"169\.254\.169\.254"):
                await client.get(f"{url}/away", follow_redirects=True)
        async with outbound_client(Allowlist.of(["127.0.0.1"]), 5) as client:
            answer = await client.get(f"{url}/away")  # not followed: the caller decides
            assert answer.status_code == 307
            assert isinstance(answer, httpx.Response)
