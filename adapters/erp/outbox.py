"""An ERP as a destination of the hub's outbox (``hub.outbox.Destination``): a confirmation
message is handed to the entry's dialect (``ConfirmationSender``) with its idempotency key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from adapters.erp.base import Confirmation, ConfirmationSender
from hub.outbox import Delivered, OutboxMessage

CONFIRMATION = "erp.confirmation"


def confirmation(
    message: OutboxMessage,
    key: str,
    earlier_keys: tuple[str, ...] = (),
    totals_held: bool = True,
) -> Confirmation:
    """The confirmation a ``mes.hub.order.confirmation_due.v1`` message carries.
    ``totals_held``: the ERP was sent all the order's earlier confirmations (else the order's
    totals are left out: they are more than it holds)."""
    due = message.payload

    def when(name: str) -> datetime | None:
        value = due.get(name)
        return datetime.fromisoformat(value) if value else None

    return Confirmation(
        key=key,
        order_id=str(due["order_id"]),
        sequence=int(due["sequence"]),
        machine_id=due.get("machine_id"),
        operation=due.get("operation"),
        yield_quantity=int(due["yield_quantity"]),
        scrap_quantity=int(due["scrap_quantity"]),
        start=when("start"),
        end=when("end"),
        final=bool(due["final"]),
        correction_of=due.get("correction_of"),
        posted_at=message.decided_at,
        yield_total=due.get("yield_total") if totals_held else None,
        scrap_total=due.get("scrap_total") if totals_held else None,
        earlier_keys=earlier_keys,
        checkpoint=due.get("checkpoint"),
    )


class ErpDestination:
    """One ``[[erp]]`` entry that takes confirmations."""

    kinds: tuple[str, ...] = (CONFIRMATION,)

    def __init__(
        self,
        name: str,
        sender: ConfirmationSender,
        earlier: Callable[[OutboxMessage, str], tuple[tuple[str, ...], bool]] | None = None,
    ) -> None:
        self.name = name
        self._sender = sender
        # (message, destination) -> the keys the ERP was sent the order's earlier
        # confirmations with, and whether it was sent them all
        self._earlier = earlier

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        due = message.payload
        if self._earlier is None or min(due["yield_quantity"], due["scrap_quantity"]) >= 0:
            return await self._sender.send(confirmation(message, key))
        # Parts taken back: a dialect that reverses and re-posts needs to know which of the
        # ERP's postings are the hub's (a query of the outbox view, off the loop).
        keys, held = await asyncio.to_thread(self._earlier, message, self.name)
        return await self._sender.send(confirmation(message, key, keys, held))

    async def close(self) -> None:
        await self._sender.close()
