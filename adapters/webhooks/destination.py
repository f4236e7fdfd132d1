"""A partner's webhook endpoint as a destination of the hub's outbox (``hub.outbox.Destination``):
each message (one partner event) is POSTed as a CloudEvent in JSON, signed the Standard Webhooks
way (``adapters.webhooks.signing``), through the SSRF-safe client (``hub.outbound``).

```python
endpoint = WebhookDestination(
    "acme-orders", "https://hooks.acme.example/mes", lambda: [secret],
    allow=Allowlist(), site="plant-1",
)
await endpoint.deliver(message, key)         # Delivered, or raises DeliveryFailed
```

- ``webhook-id`` is the partner event's id: the same on every retry, redelivery and replay
  (the partner's idempotency key); ``webhook-timestamp`` is the attempt's, so each attempt is
  signed afresh — with every secret the endpoint has (two during a rotation), and Ed25519
  (``v1a``) too when the hub has a signing key.
- Only a 2xx is taken (``Delivered``). ``410 Gone``: the receiver wants no more webhooks —
  ``DeliveryFailed(permanent=True)`` (the caller disables the endpoint). Any other answer is
  retried; 429, 502, 503 and 504 pass their ``Retry-After`` on (``retry_after_s``).
- No answer within the timeout (15 s, the whole call), a connection refused or reset: retried.
  An address the hub will not call (``OutboundRefused``: internal and not allowlisted, plain
  http to the internet, a redirect): permanent — the URL itself must change. A host name that
  does not resolve (now): retried.
- Reasons are one line, name the host (never the path or query, which may carry a token) and
  never a secret; the answer's start is kept (capped, secrets blanked), the rest is not read.

Errors, as ``Sender`` sees them::

    DeliveryFailed             not taken (``permanent``, ``status``, ``retry_after_s``)
    (nothing else escapes ``deliver``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from adapters.webhooks.signing import InvalidSecretError, SigningKey, headers
from hub.outbound import Allowlist, OutboundRefused, outbound_client
from hub.outbox import EXCERPT_CHARS, Delivered, DeliveryFailed, OutboxMessage, excerpt

__all__ = ["WEBHOOK", "WebhookDestination", "cloud_event_body", "retry_after_s"]

WEBHOOK = "webhook"  # the outbox kind of a partner event
DEFAULT_TIMEOUT_S = 15.0  # the spec recommends 15 to 30 s
# Of a receiver's answer: read this much at most (the client refuses more than its cap anyway).
_READ_BYTES = EXCERPT_CHARS * 4
_MAX_BODY_BYTES = 64 * 1024
_RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})
_FIELDS = ("event_id", "event_type", "event_time", "order_id", "data")
# What ``hub.outbound.resolve`` says when a name does not resolve: that may pass.
_UNRESOLVED = ("host name not resolved", "resolves to no address")


def cloud_event_body(payload: dict[str, Any], site: str) -> bytes:
    """The exact bytes POSTed for one partner event (compact JSON, keys sorted)."""
    missing = [name for name in _FIELDS if name not in payload]
    if missing:
        raise ValueError(f"a partner event without {', '.join(missing)}")
    when = payload["event_time"]
    event = {
        "specversion": "1.0",
        "id": str(payload["event_id"]),
        "source": f"urn:mes-hub:{site}",
        "type": str(payload["event_type"]),
        "time": when.isoformat() if isinstance(when, datetime) else str(when),
        "subject": str(payload["order_id"]),
        "datacontenttype": "application/json",
        "data": payload["data"],
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` value (RFC 9110: whole seconds, or an HTTP date) as seconds from
    ``now`` (epoch seconds), never negative; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # (an HTTP date is GMT)
    return max(0.0, when.timestamp() - now)


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class WebhookDestination:
    """One partner endpoint (see the module). ``secrets``: called at each attempt, the current
    ``whsec_`` secrets (two during a rotation: each signs); ``signing_key``: adds ``v1a``;
    ``allow``: the endpoint's allowlist (internal addresses and plain http only inside it);
    ``clock``: epoch seconds for ``webhook-timestamp``."""

    kinds: tuple[str, ...] = (WEBHOOK,)

    def __init__(
        self,
        name: str,
        url: str,
        secrets: Callable[[], Sequence[str]],
        *,
        signing_key: SigningKey | None = None,
        allow: Allowlist,
        site: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        rate_per_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name, self.url, self.site, self.timeout_s = name, url, site, timeout_s
        self.rate_per_s = rate_per_s  # deliveries started per second at most (hub.outbox)
        self._secrets, self._signing_key, self._allow, self._clock = (
            secrets, signing_key, allow, clock,
        )  # fmt: skip
        try:
            self.host = httpx.URL(url).host or "?"
        except (httpx.InvalidURL, TypeError):
            self.host = "?"
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # (no URL path or query: they may carry a token)
        return f"WebhookDestination(name={self.name!r}, host={self.host!r})"

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        """POST ``message``'s partner event; ``key`` (the outbox's idempotency key) is not sent:
        the partner dedupes on ``webhook-id``, the event's own id, whatever the endpoint."""
        try:
            body = cloud_event_body(message.payload, self.site)
        except ValueError as exc:
            raise DeliveryFailed(f"{self.name}: {exc}", permanent=True) from None
        signed = self._headers(str(message.payload["event_id"]), body)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._post(body, signed)
        except TimeoutError:
            raise DeliveryFailed(f"{self.host}: no answer within {self.timeout_s:g} s") from None
        except httpx.TimeoutException as exc:
            reason = f"{self.host}: no answer within {self.timeout_s:g} s ({type(exc).__name__})"
            raise DeliveryFailed(reason) from None
        except OutboundRefused as exc:
            said = _one_line(str(exc), 400)
            retried = any(words in said for words in _UNRESOLVED)  # DNS may be back later
            raise DeliveryFailed(said, permanent=not retried) from None
        except httpx.InvalidURL:
            reason = f"{self.name}: the endpoint's URL is not valid"
            raise DeliveryFailed(reason, permanent=True) from None
        except (httpx.HTTPError, OSError) as exc:
            detail = _one_line(str(exc))
            reason = f"{self.host}: cannot reach the endpoint: {type(exc).__name__}"
            raise DeliveryFailed(reason + (f": {detail}" if detail else "")) from None

    def _headers(self, event_id: str, body: bytes) -> dict[str, str]:
        try:
            secrets = self._current_secrets()
        except Exception as exc:  # a store that failed: the secret may be readable later
            reason = f"{self.name}: the endpoint's secrets could not be read ({type(exc).__name__})"
            raise DeliveryFailed(reason) from None
        try:
            signed = headers(event_id, int(self._clock()), body, secrets, self._signing_key)
        except InvalidSecretError as exc:  # (names a secret by position only)
            raise DeliveryFailed(f"{self.name}: {exc}") from None
        except ValueError as exc:  # no secret (until one is set), or an id that cannot be signed
            permanent = bool(secrets) or self._signing_key is not None
            raise DeliveryFailed(f"{self.name}: {exc}", permanent=permanent) from None
        return {
            **signed,
            "Content-Type": "application/json",
            "User-Agent": "mes-hub-webhooks/1",
        }

    async def _post(self, body: bytes, signed: dict[str, str]) -> Delivered:
        client = self._http()
        async with client.stream("POST", self.url, content=body, headers=signed) as answer:
            said = self._scrubbed(await _start_of(answer))
            status = answer.status_code
            if 200 <= status < 300:
                return Delivered(status, said)
            if status == 410:
                reason = (
                    f"{self.host}: HTTP 410 Gone: the endpoint is gone (the receiver asks for no "
                    "more webhooks)"
                )
                raise DeliveryFailed(reason, status=status, excerpt=said, permanent=True)
            reason = f"{self.host}: HTTP {status} {answer.reason_phrase}".rstrip()
            wait: float | None = None
            if status in _RETRY_AFTER_STATUSES:
                value = answer.headers.get("retry-after")
                wait = retry_after_s(value, self._clock())
                if value is not None:
                    reason += f", Retry-After: {_one_line(value, 64)}"
            raise DeliveryFailed(reason, status=status, excerpt=said, retry_after_s=wait)

    def _current_secrets(self) -> list[str]:
        found = self._secrets()
        return [found] if isinstance(found, str) else list(found)  # (one str: one secret)

    def _scrubbed(self, text: str) -> str:
        """The start of an answer, as kept: capped, any of the secrets blanked should the
        receiver echo one."""
        text = text[: EXCERPT_CHARS * 2]
        try:
            secrets = self._current_secrets()
        except Exception:
            secrets = []
        forms = {form for s in secrets for form in (s, s.removeprefix("whsec_")) if len(form) >= 8}
        for form in sorted(forms, key=len, reverse=True):  # (the prefixed form first)
            text = text.replace(form, "***")
        return excerpt(text)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = outbound_client(
                self._allow, self.timeout_s, max_body_bytes=_MAX_BODY_BYTES
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


async def _start_of(answer: httpx.Response) -> str:
    """The first bytes of an answer's body (the rest is not read). A body cut short, or past
    the client's cap, is what was read of it: the status is the answer."""
    read = bytearray()
    with contextlib.suppress(httpx.HTTPError, OutboundRefused):
        async for chunk in answer.aiter_bytes():  # (the stream is closed with the answer)
            read += chunk
            if len(read) >= _READ_BYTES:
                break
    return bytes(read[:_READ_BYTES]).decode("utf-8", "replace")
