"""Where the hub may call out to: every outbound HTTP call (an ERP, a partner's webhook) goes to
an address checked here first.

A URL someone configures can name the hub's own machine, the plant's internal network or a cloud
metadata service (169.254.169.254): a request there could reach what the caller could not
(server-side request forgery). So:

- every address a URL's host resolves to must be public — not loopback, private, link-local,
  shared (CGNAT), multicast, unspecified, broadcast, reserved or a cloud metadata address, nor
  an IPv6 form that carries one (IPv4-mapped or -compatible, NAT64, 6to4, Teredo) — unless the
  entry's allowlist admits it: an ERP or a receiver inside the plant network is the normal case,
  allowed by saying so (``allow`` = networks such as ``10.0.0.0/8``, or host names; a host
  name never admits a cloud metadata address, only a network that holds it does);
- the call is https unless the allowlist admits the host or its address (plain http inside
  the plant network; never to the internet);
- redirects are never followed: a 3xx with a ``Location`` is refused (``OutboundRefused``
  naming both hosts), whatever the caller asked;
- an answer's body is read up to a cap (``max_body_bytes``, decoded and on the wire), past
  which the call fails (``ResponseTooLarge``) — never a body in an error.

``outbound_client`` makes the check at every connection: it resolves the host once, checks each
address, and connects to the very address it checked, so a DNS answer that changes between the
check and the connection (DNS rebinding) cannot lead the call elsewhere; TLS still verifies the
host's name. Proxies are not used (the environment's, or given): a proxy would connect where the
hub did not check.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import certifi
import httpcore
import httpx

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A host name and port to every address it resolves to (``resolve``; tests give their own).
Resolver = Callable[[str, int], Sequence[IpAddress]]

# Enough for an ERP's page of orders; a caller that expects little (a webhook's answer) says so.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class OutboundRefused(ValueError):
    """An outbound URL the hub will not call, and why (names the URL's host, never a secret)."""


class ResponseTooLarge(OutboundRefused):
    """An answer whose body is larger than the client's cap: not read further."""


def _net(text: str) -> IpNetwork:
    return ipaddress.ip_network(text)


# Cloud metadata services (AWS, GCP, Azure, Oracle: 169.254.169.254; AWS over IPv6 and ECS;
# Alibaba; Oracle's other one). Checked first: the most sensitive internal address there is.
_METADATA = tuple(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "192.0.0.192")
)

# Not public, whatever Python's version says (``is_global`` has changed between versions): the
# first network that holds an address names why. The rest must then be ``is_global``.
_NOT_PUBLIC: tuple[tuple[IpNetwork, str], ...] = tuple(
    (_net(network), why)
    for network, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "reserved (documentation)"),
        ("192.88.99.0/24", "reserved (6to4 relay)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved (benchmarking)"),
        ("198.51.100.0/24", "reserved (documentation)"),
        ("203.0.113.0/24", "reserved (documentation)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0:0/96", "reserved (IPv4-translated, SIIT)"),
        ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
        ("100::/64", "reserved (discard)"),
        ("2001:db8::/32", "reserved (documentation)"),
        ("fc00::/7", "private (unique local)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_NAT64 = _net("64:ff9b::/96")
_IPV4_COMPATIBLE = _net("::/96")


@dataclass(frozen=True)
class Allowlist:
    """Host names and networks an entry may call although they are not public (and over plain
    http): ``allow = ["10.0.0.0/8", "erp.plant.local"]``."""

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
        """``address`` (``host``'s) is inside an allowed network, or ``host`` is allowed by
        name and the address is not a cloud metadata one."""
        forms = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)  # the same IPv4 host, as a dual-stack socket says
        if any(form in network for form in forms for network in self.networks):
            return True
        return host.lower().rstrip(".") in self.hosts and not any(f in _METADATA for f in forms)


def not_public(address: IpAddress) -> str | None:
    """Why ``address`` is not routable on the internet ("loopback", "cloud metadata", …), or
    None if it is. An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4, Teredo, the
    old "compatible" form) is judged by the IPv4 address as well."""
    if address in _METADATA:
        return "cloud metadata"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            why = not_public(mapped)
            return None if why is None else f"{why}, IPv4-mapped {mapped}"
        carried: list[tuple[str, ipaddress.IPv4Address]] = []
        if address in _NAT64:
            carried.append(("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
        if address.sixtofour is not None:
            carried.append(("6to4", address.sixtofour))
        if address.teredo is not None:
            server, client = address.teredo
            carried += [("Teredo", client), ("Teredo server", server)]
        compatible = address in _IPV4_COMPATIBLE and int(address) > 1
        if compatible:
            carried.append(("IPv4-compatible", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
        for form, v4 in carried:
            why = not_public(v4)
            if why is not None:
                return f"{why}, {form} {v4}"
        if compatible:
            return "reserved (deprecated IPv4-compatible form)"
    for network, why in _NOT_PUBLIC:
        if address in network:
            return why
    if address.is_multicast:
        return "multicast"
    if not address.is_global:
        return "reserved (not globally routable)"
    return None


def is_public(address: IpAddress) -> bool:
    """Routable on the internet (``not_public`` says why not)."""
    return not_public(address) is None


def resolve(host: str, port: int) -> list[IpAddress]:
    """Every address ``host`` resolves to, in the resolver's order (a literal: itself)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OutboundRefused(f"{host}: host name not resolved ({exc.strerror})") from None
    addresses = (ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found)
    return list(dict.fromkeys(addresses))


def refusal(host: str, address: IpAddress, allow: Allowlist, scheme: str) -> str | None:
    """Why ``scheme://host`` is not called at ``address``, or None if it may be."""
    if allow.admits(host, address):
        return None
    why = not_public(address)
    if why is not None:
        return _internal(host, address, why)
    if scheme != "https":
        return (
            f"{host}: {scheme}:// to {address} refused: the hub calls out over https:// "
            "unless the entry allows the host or its network (allow = [...])"
        )
    return None


def check_url(
    url: str,
    allow: Allowlist,
    addresses: Sequence[IpAddress] | None = None,
    *,
    resolver: Resolver | None = None,
) -> None:
    """Refuse ``url`` (``OutboundRefused``) unless it is http(s), carries no credentials, and
    each of its host's addresses is public or allowed — and, for http, allowed. ``addresses``:
    already resolved (else ``resolver``, by default ``resolve``). The client checks again at
    every connection: this is for saying no early (a config, a subscription)."""
    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise OutboundRefused(f"{url!r}: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise OutboundRefused(f"{url!r}: only http:// and https:// URLs with a host are called")
    if parts.username or parts.password:
        raise OutboundRefused(f"{parts.host}: credentials go in a secret, not in the URL")
    host = parts.host
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if addresses is None:
        addresses = (resolver or resolve)(host, port)
    for address in addresses:
        reason = refusal(host, address, allow, parts.scheme)
        if reason is not None:
            raise OutboundRefused(reason)


def checked_addresses(
    host: str, port: int, allow: Allowlist, resolver: Resolver | None = None, scheme: str = "https"
) -> list[IpAddress]:
    """``host``'s addresses, if every one of them may be called (else ``OutboundRefused``)."""
    addresses = list((resolver or resolve)(host, port))
    if not addresses:
        raise OutboundRefused(f"{host}: host name resolves to no address")
    for address in addresses:
        reason = refusal(host, address, allow, scheme)
        if reason is not None:
            raise OutboundRefused(reason)
    return addresses


def _internal(host: str, address: IpAddress, why: str) -> str:
    try:
        literal = ipaddress.ip_address(host) == address
    except ValueError:
        literal = False
    what = f"{host} is" if literal else f"{host} resolves to {address},"
    if why == "cloud metadata":
        return (
            f"{what} an internal address ({why}): the hub never calls it unless the entry "
            "allows a network that holds it"
        )
    return (
        f"{what} an internal address ({why}): the hub does not call it unless the entry "
        "allows it (allow = [...] with the host or its network)"
    )


# --- the client --------------------------------------------------------------------------------


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network, connecting only to checked addresses (see the module). ``scheme``:
    what its pool carries (the http pool requires every address allowed)."""

    def __init__(self, allow: Allowlist, resolver: Resolver | None, scheme: str) -> None:
        self._allow = allow
        self._resolver = resolver
        self._scheme = scheme
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await asyncio.to_thread(
            checked_addresses, host, port, self._allow, self._resolver, self._scheme
        )
        failure: Exception | None = None
        for address in addresses:  # each checked address in turn, as a resolver's caller does
            try:
                return await self._inner.connect_tcp(
                    str(address),  # a literal: no second resolution
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # (checked_addresses returns at least one address)
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused("the hub calls out over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _tls() -> ssl.SSLContext:
    """The one TLS context of every outbound client (certifi's CAs). Made once: loading the CA
    bundle takes milliseconds, and a hub with a hundred partner endpoints makes as many
    clients."""
    return ssl.create_default_context(cafile=certifi.where())


class _PoolTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow: Allowlist, resolver: Resolver | None, scheme: str) -> None:
        super().__init__(verify=_tls(), trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_tls(), network_backend=_CheckedBackend(allow, resolver, scheme)
        )


class _CappedStream(httpx.AsyncByteStream):
    """A body as it arrives, refused past ``cap`` bytes."""

    def __init__(self, inner: httpx.AsyncByteStream, host: str, cap: int) -> None:
        self._inner, self._host, self._cap = inner, host, cap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._cap:
                raise ResponseTooLarge(_too_large(self._host, self._cap))
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CappedResponse(httpx.Response):
    """A response whose decoded body is refused past the cap too (a small gzip body can decode
    to gigabytes)."""

    def __init__(self, answer: httpx.Response, host: str, cap: int) -> None:
        assert isinstance(answer.stream, httpx.AsyncByteStream)
        super().__init__(
            answer.status_code,
            headers=answer.headers,
            stream=_CappedStream(answer.stream, host, cap),
            extensions=answer.extensions,
        )
        self._outbound_host, self._outbound_cap = host, cap

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in super().aiter_bytes(chunk_size):
            seen += len(chunk)
            if seen > self._outbound_cap:
                raise ResponseTooLarge(_too_large(self._outbound_host, self._outbound_cap))
            yield chunk


def _too_large(host: str, cap: int) -> str:
    return f"{host} answered with a body larger than {cap} bytes: the hub reads no more"


class _CheckedTransport(httpx.AsyncBaseTransport):
    """https and http each on their own pool (plain http: allowed addresses only); no redirect
    taken; bodies capped."""

    def __init__(self, allow: Allowlist, resolver: Resolver | None, max_body_bytes: int) -> None:
        self._pools = {s: _PoolTransport(allow, resolver, s) for s in ("https", "http")}
        self._cap = max_body_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        pool = self._pools.get(request.url.scheme)
        if pool is None:
            raise OutboundRefused(f"{host}: only http:// and https:// URLs are called")
        # Answers come uncompressed: a few hundred bytes of gzip can decode to gigabytes in
        # one chunk, before any cap on the decoded size could stop it.
        request.headers["Accept-Encoding"] = "identity"
        answer = await pool.handle_async_request(request)
        encoding = answer.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await answer.aclose()
            raise OutboundRefused(
                f"{host} answered with a {encoding} body though asked for none: the hub does "
                "not decompress answers"
            )
        if answer.has_redirect_location:
            await answer.aclose()
            try:
                target = request.url.join(answer.headers["location"]).host or host
            except httpx.InvalidURL:
                target = "an unreadable Location"
            raise OutboundRefused(
                f"{host} answered {answer.status_code} redirecting to {target}: the hub follows "
                "no redirects (configure the final URL)"
            )
        return _CappedResponse(answer, host, self._cap)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


# Options that would let a call go around the checks (another transport, a proxy) or pretend to
# do what the client does not (verify, follow redirects).
_REFUSED_OPTIONS = frozenset(
    {"transport", "mounts", "proxy", "proxies", "app", "verify", "cert", "trust_env", "http2"}
)


def outbound_client(
    allow: Allowlist,
    timeout_s: float,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    resolver: Resolver | None = None,
    **options: Any,
) -> httpx.AsyncClient:
    """An HTTP client for calls out of the hub: every connection checked, no redirect followed,
    bodies capped (see the module). ``options``: httpx's (``auth``, ``headers``, …), except
    those that would bypass the checks. ``resolver``: host names to addresses (tests)."""
    refused = sorted(_REFUSED_OPTIONS & options.keys())
    if options.pop("follow_redirects", False):
        refused.append("follow_redirects")
    if refused:
        raise OutboundRefused(f"outbound_client: {', '.join(refused)}: not with checked calls")
    return httpx.AsyncClient(
        transport=_CheckedTransport(allow, resolver, max_body_bytes),
        timeout=timeout_s,
        trust_env=False,
        follow_redirects=False,
        **options,
    )
