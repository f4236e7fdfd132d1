"""The keys of what the hub sends out (its outbox: ERP confirmations, partners' webhooks)."""

from __future__ import annotations

import hashlib


def message_key(source: str, event_id: str) -> str:
    """A message's key, from the stored event that decided it (its CloudEvent source and id):
    the same on every rebuild."""
    return hashlib.sha256(f"{source}\n{event_id}".encode()).hexdigest()[:32]


def idempotency_key(message: str, destination: str) -> str:
    """What a destination is told identifies a message: one per message and destination, the
    same on every retry, redelivery and replay."""
    return hashlib.sha256(f"{message}\n{destination}".encode()).hexdigest()[:32]
