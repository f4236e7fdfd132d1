"""The secrets of the endpoints partners register through the API, kept in the data dir.

A ``whsec_`` secret is made by the hub, shown once to whoever registered the endpoint (or rotated
its secret), and kept here — one file per endpoint, readable by the hub's user only (0600) — for
signing. The store keeps only each secret's id and fingerprint (``hub.webhook_registry``): the
event log goes to auditors and into exports, secrets must not. Which of an endpoint's secrets
sign now (the new one and, during a rotation's overlap, the old) is the registry's to say.

The hub-wide Ed25519 key that signs ``v1a`` for endpoints that ask for it is kept here too; its
public half is published by the API (``GET /api/v1/webhooks/public-key``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets as random
import threading
from collections.abc import Iterable
from pathlib import Path

from adapters.webhooks.signing import SigningKey, new_secret
from hub.nats_auth import write_private

_ENDPOINT = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
SIGNING_KEY_FILE = "signing.key"


def fingerprint(secret: str) -> str:
    """What the store keeps of a secret: enough to tell two apart, nothing to sign with."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


class EndpointSecrets:
    """The secrets of managed endpoints, one 0600 file each under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()  # (the API writes while the senders read)

    def _path(self, endpoint_id: str) -> Path:
        if not _ENDPOINT.fullmatch(endpoint_id):
            raise ValueError("not an endpoint id")
        return self._directory / f"{endpoint_id}.json"

    def _read(self, endpoint_id: str) -> dict[str, str]:
        try:
            found = json.loads(self._path(endpoint_id).read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in found.items()}

    def add(self, endpoint_id: str) -> tuple[str, str, str]:
        """A new secret for the endpoint, kept beside the ones it has: (its id, the secret, its
        fingerprint). Shown once by the caller; never logged."""
        secret, secret_id = new_secret(), "s_" + random.token_hex(8)
        with self._lock:
            kept = self._read(endpoint_id)
            kept[secret_id] = secret
            self._write(endpoint_id, kept)
        return secret_id, secret, fingerprint(secret)

    def _write(self, endpoint_id: str, kept: dict[str, str]) -> None:
        """Whole or not at all, and on disk before the registry names the secret (a power cut
        after it must not leave an endpoint whose secret is lost)."""
        path = self._path(endpoint_id)
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        write_private(partial, json.dumps(kept), exclusive=True)
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def values(self, endpoint_id: str, secret_ids: Iterable[str]) -> list[str]:
        """The secrets of these ids that are kept (in the order asked)."""
        with self._lock:
            kept = self._read(endpoint_id)
        return [kept[i] for i in secret_ids if i in kept]

    def forget(self, endpoint_id: str, keep: Iterable[str] = ()) -> None:
        """Drop the endpoint's secrets but those in ``keep`` (all of them: a deleted endpoint)."""
        kept_ids = set(keep)
        with self._lock:
            path = self._path(endpoint_id)
            kept = {k: v for k, v in self._read(endpoint_id).items() if k in kept_ids}
            if not kept:
                path.unlink(missing_ok=True)
                return
            self._write(endpoint_id, kept)

    def signing_key(self) -> SigningKey:
        """The hub's Ed25519 key for ``v1a`` signatures, made on first use (0600)."""
        path = self._directory / SIGNING_KEY_FILE
        if not path.exists():
            write_private(path, SigningKey.generate().export_secret(), exclusive=True)
        return SigningKey.from_secret(path.read_text().strip())
