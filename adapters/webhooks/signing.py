"""Signing outgoing partner webhooks the Standard Webhooks way (spec 1.0, "Signature scheme").

The signed content is ``msg_id.timestamp.body``; the ``webhook-signature`` header is a
space-separated list of ``v1,<base64 HMAC-SHA256>`` (a shared ``whsec_`` secret) and
``v1a,<base64 Ed25519>`` (a ``whsk_`` key whose ``whpk_`` public half the partner holds) entries.
A receiver accepts the webhook when any one entry verifies, which is what makes rotation work:
while a partner moves to a new secret, both the old and the new one sign every webhook.

```python
secret = new_secret()                        # hand to the partner once; store it as a secret
key = SigningKey.generate()                  # or: asymmetric, publish key.public_key()
headers(msg_id, int(time.time()), body, [old_secret, secret], signing_key=key)
```

Errors: ``InvalidSecretError`` (a ``ValueError``) for an empty or malformed secret or key; a plain
``ValueError`` for a message id or timestamp the scheme cannot sign safely. No message, repr or
chained exception carries secret material: they name the secret by its position only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from secrets import token_bytes

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = [
    "InvalidSecretError",
    "SigningKey",
    "headers",
    "new_secret",
    "sign",
]

SECRET_PREFIX = "whsec_"  # symmetric secret
SIGNING_KEY_PREFIX = "whsk_"  # Ed25519 private key (ours alone)
PUBLIC_KEY_PREFIX = "whpk_"  # Ed25519 public key (published to partners)

# The spec asks for 24 to 64 random bytes; 32 is SHA-256's output size, and RFC 2104 notes that
# an HMAC key longer than that adds little strength.
SECRET_BYTES = 32

# Visible ASCII without "."; the spec: ids must not hold "." (it delimits the signed content), and
# the id travels in a header, so no spaces or control characters either.
_MSG_ID = re.compile(r"[\x21-\x2d\x2f-\x7e]+")


class InvalidSecretError(ValueError):
    """A secret or signing key that is empty or not what its prefix says. Never quotes it."""


def new_secret() -> str:
    """A fresh ``whsec_`` secret for one partner endpoint (never reuse one across partners)."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


def _b64decode(text: str) -> bytes:
    # Strict, unlike the reference library (which drops stray characters): a mangled secret must
    # fail here, not yield signatures the partner's copy can never match. Missing padding is
    # accepted as the reference library accepts it.
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _decode_secret(secret: str, position: int) -> bytes:
    body = secret.removeprefix(SECRET_PREFIX)
    try:
        key = _b64decode(body)
    except (binascii.Error, ValueError):
        # "from None": the decoder's own error could one day quote its input.
        raise InvalidSecretError(f"webhook secret #{position} is not base64") from None
    if not key:
        raise InvalidSecretError(f"webhook secret #{position} is empty")
    return key


class SigningKey:
    """An Ed25519 key pair for ``v1a`` signatures; its repr shows the public half only."""

    __slots__ = ("_private",)

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: str) -> SigningKey:
        """Load a key saved with ``export_secret`` (``whsk_`` + base64 of the 32-byte seed)."""
        if not secret.startswith(SIGNING_KEY_PREFIX):
            # The prefix is what tells a signing key from an HMAC secret; refuse to guess.
            raise InvalidSecretError(f"signing key does not start with {SIGNING_KEY_PREFIX!r}")
        try:
            seed = _b64decode(secret.removeprefix(SIGNING_KEY_PREFIX))
            private = Ed25519PrivateKey.from_private_bytes(seed)
        except (binascii.Error, ValueError):
            raise InvalidSecretError("signing key is not a base64 32-byte Ed25519 key") from None
        return cls(private)

    def export_secret(self) -> str:
        """``whsk_`` + base64 of the raw 32-byte private key (RFC 8032 seed): store as a secret."""
        raw = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return SIGNING_KEY_PREFIX + base64.b64encode(raw).decode("ascii")

    def public_key(self) -> str:
        """``whpk_`` + base64 of the raw 32-byte public key: what partners verify ``v1a`` with."""
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")

    def _sign(self, content: bytes) -> str:
        return "v1a," + base64.b64encode(self._private.sign(content)).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_key()!r})"


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    if not _MSG_ID.fullmatch(msg_id):
        raise ValueError("webhook id must be visible ASCII without '.' or spaces, and not empty")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("webhook timestamp must be whole seconds since the epoch")
    return f"{msg_id}.{timestamp}.".encode("ascii") + body


def sign(
    secrets: Sequence[str],
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    signing_key: SigningKey | None = None,
) -> str:
    """The ``webhook-signature`` value: one ``v1`` entry per secret, then ``v1a`` if a key is given.

    ``secrets`` may hold several during a rotation (old and new); each may carry the ``whsec_``
    prefix or not. ``body`` is the exact bytes sent: re-serialising JSON breaks the signature.
    """
    if isinstance(secrets, str):
        # A bare str is a Sequence[str] too; it would sign with each character.
        raise TypeError("secrets must be a sequence of secrets, not one str")
    keys = [_decode_secret(secret, position) for position, secret in enumerate(secrets, 1)]
    if not keys and signing_key is None:
        raise ValueError("no webhook secret or signing key to sign with")
    content = _signed_content(msg_id, timestamp, body)
    entries = [
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    ]
    if signing_key is not None:
        entries.append(signing_key._sign(content))
    return " ".join(entries)


def headers(
    msg_id: str,
    timestamp: int,
    body: bytes,
    secrets: Sequence[str],
    signing_key: SigningKey | None = None,
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt.

    ``msg_id`` stays the same across retries (the partner's idempotency key); ``timestamp`` is the
    attempt's, so each retry signs afresh (receivers refuse timestamps older than a few minutes).
    """
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body, signing_key=signing_key),
    }
