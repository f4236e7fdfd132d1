"""NATS subject rules of contract v1.

``mes.<site>.machine.<machine_id>.<kind>``, ``mes.<site>.operator.<machine_id>.<kind>``,
``mes.<site>.erp.order.<order_id>.<kind>``, and for what the hub itself records
``mes.<site>.hub.order.<order_id>.<kind>`` and ``mes.<site>.hub.plant.<site>.<kind>``; rejected
messages go to ``mes.dlq.<subject>``.
"""

from __future__ import annotations

import re
import zlib

from contracts._envelope import ValidatedEvent
from contracts._errors import ContractViolation

DLQ_PREFIX = "mes.dlq."
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED_SITES = frozenset({"dlq"})


def is_token(value: str) -> bool:
    return bool(_TOKEN.match(value))


def nats_subject_for(site: str, event: ValidatedEvent) -> str:
    if not is_token(site) or site in RESERVED_SITES:
        raise ContractViolation(f"site {site!r} is not a usable NATS token", field="site")
    subject, kind = event.envelope.subject, event.event_type.kind
    match event.event_type.stream:
        case "machine":
            return f"mes.{site}.machine.{subject}.{kind}"
        case "operator":
            return f"mes.{site}.operator.{subject}.{kind}"
        case "erp":
            return f"mes.{site}.erp.order.{subject}.{kind}"
        case "hub":
            return f"mes.{site}.hub.{event.event_type.entity}.{subject}.{kind}"


def check_subject(nats_subject: str, event: ValidatedEvent) -> str:
    """Check the NATS subject agrees with the event's type and ``subject``; return the site."""
    tokens = nats_subject.split(".")
    site = tokens[1] if len(tokens) > 1 else ""
    expected = (
        nats_subject_for(site, event) if is_token(site) and site not in RESERVED_SITES else None
    )
    if expected != nats_subject:
        raise ContractViolation(
            f"subject mismatch: NATS subject {nats_subject!r} does not fit type "
            f"{event.event_type.name!r} with subject {event.envelope.subject!r} "
            f"(expected {expected or 'mes.<site>.…'!r})",
            field="subject",
        )
    return site


def dlq_subject(nats_subject: str) -> str:
    return DLQ_PREFIX + nats_subject


def partition_key(nats_subject: str) -> str:
    """The entity a subject is about: machine id, or order id for order subjects (ERP's and the
    hub's own, so both land in the order's partition)."""
    tokens = nats_subject.split(".")
    if len(tokens) >= 6 and tokens[2] in ("erp", "hub"):
        return tokens[4]
    return tokens[3] if len(tokens) >= 4 else nats_subject


def partition_of(nats_subject: str, partitions: int) -> int:
    # crc32 is stable across processes and Python versions, unlike hash().
    return zlib.crc32(partition_key(nats_subject).encode()) % partitions
