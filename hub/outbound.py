"""Where the hub may call out to: every outbound HTTP call (an ERP, a partner's webhook) goes to
an address checked here first.

A URL someone configures can name the hub's own machine, the plant's internal network or a cloud
metadata service (169.254.169.254): a request there could reach what the caller could not
(server-side request forgery). So an outbound URL must be http(s), and every address its host
resolves to must be public, unless the entry names it in its allowlist: an ERP inside the plant
network is the normal case, and it is allowed by saying so (``allow`` = host names, addresses or
networks such as ``10.0.0.0/8``).

``outbound_client`` makes the check at every connection, redirects included, and connects to
the very address it checked, so a DNS answer that changes between the check and the connection
(DNS rebinding) cannot lead the call elsewhere; TLS still verifies the host's name. Proxies from
the environment are not used: a proxy would connect where the hub did not check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutboundRefused(ValueError):
    """An outbound URL the hub will not call, and why (names the URL's host, never a secret)."""


@dataclass(frozen=True)
class Allowlist:
    """Host names and networks an entry may call although they are not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> Allowlist:
        hosts, networks = set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, address: IpAddress) -> bool:
        return host.lower().rstrip(".") in self.hosts or any(address in n for n in self.networks)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public(address: IpAddress) -> bool:
    """Routable on the internet: not loopback, private, link-local (cloud metadata), site-local,
    multicast, reserved or unspecified. An IPv6 address that carries an IPv4 one (mapped,
    NAT64, 6to4, Teredo, the old "compatible" form) is judged by the IPv4 address as well."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        carried = [
            address.ipv4_mapped,
            address.sixtofour,
            address.teredo[1] if address.teredo else None,
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1)
            else None,
        ]
        if any(v4 is not None and not is_public(v4) for v4 in carried):
            return False
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


def resolve(host: str, port: int) -> list[IpAddress]:
    """Every address ``host`` resolves to (an address literal resolves to itself)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OutboundRefused(f"{host}: host name not resolved ({exc.strerror})") from None
    return sorted({ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found}, key=str)


def check_url(url: str, allow: Allowlist, addresses: Sequence[IpAddress] | None = None) -> None:
    """Refuse ``url`` unless it is http(s) and each of its host's addresses is public or
    allowlisted. ``addresses``: already resolved (tests; ``resolve`` otherwise)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundRefused(f"{url!r}: only http:// and https:// URLs with a host are called")
    if parts.username or parts.password:
        raise OutboundRefused(f"{parts.hostname}: credentials go in a secret, not in the URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if addresses is None:
        checked_addresses(host, port, allow)
        return
    for address in addresses:
        if not is_public(address) and not allow.admits(host, address):
            raise OutboundRefused(_internal(host, address))


def checked_addresses(host: str, port: int, allow: Allowlist) -> list[IpAddress]:
    """``host``'s addresses, if every one of them may be called (else ``OutboundRefused``)."""
    addresses = resolve(host, port)
    for address in addresses:
        if not is_public(address) and not allow.admits(host, address):
            raise OutboundRefused(_internal(host, address))
    return addresses


def _internal(host: str, address: IpAddress) -> str:
    return (
        f"{host} resolves to {address}, an internal address: the hub does not call it unless "
        "the entry allows it (allow = [...] with the host or its network)"
    )


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network, connecting only to checked addresses (see the module)."""

    def __init__(self, allow: Allowlist) -> None:
        self._allow = allow
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await asyncio.to_thread(checked_addresses, host, port, self._allow)
        failure: Exception | None = None
        for address in addresses:  # each checked address in turn, as a resolver's caller does
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # (resolve returns at least one address)
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused("the hub calls out over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow: Allowlist) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            network_backend=_CheckedBackend(allow),
        )


def outbound_client(allow: Allowlist, timeout_s: float, **options: Any) -> httpx.AsyncClient:
    """An HTTP client for calls out of the hub: every connection checked (see the module)."""
    return httpx.AsyncClient(
        transport=_CheckedTransport(allow), timeout=timeout_s, trust_env=False, **options
    )
