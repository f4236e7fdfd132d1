"""The events the hub publishes itself (``mes.hub.*``): what it concludes, not what it heard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from contracts import CloudEvent


def hub_event(
    site: str, producer: str, type_: str, event_id: str, subject: str, time: datetime,
    data: dict[str, Any],
) -> CloudEvent:  # fmt: skip
    return CloudEvent(
        specversion="1.0",
        id=event_id,
        source=hub_source(site, producer),
        type=type_,
        time=time,
        subject=subject,
        datacontenttype="application/json",
        data=data,
    )


def hub_source(site: str, producer: str) -> str:
    """The CloudEvents source of what a component of the hub of ``site`` publishes."""
    return f"urn:mes-hub:{site}:{producer}"
