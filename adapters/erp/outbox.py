"""An ERP as a destination of the hub's outbox (``hub.outbox.Destination``): a confirmation
message is handed to the entry's dialect (``ConfirmationSender``) with its idempotency key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from adapters.erp.base import Confirmation, ConfirmationSender
from hub.outbox import Delivered, OutboxMessage

CONFIRMATION = "erp.confirmation"


def confirmation(
    message: OutboxMessage, key: str, earlier_keys: tuple[str, ...] = ()
) -> Confirmation:
    """The confirmation a ``mes.hub.order.confirmation_due.v1`` message carries."""
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
        yield_total=due.get("yield_total"),
        scrap_total=due.get("scrap_total"),
        earlier_keys=earlier_keys,
    )


class ErpDestination:
    """One ``[[erp]]`` entry that takes confirmations."""

    kinds: tuple[str, ...] = (CONFIRMATION,)

    def __init__(
        self,
        name: str,
        sender: ConfirmationSender,
        earlier_keys: Callable[[OutboxMessage, str], tuple[str, ...]] | None = None,
    ) -> None:
        self.name = name
        self._sender = sender
        # (message, destination) -> the keys the order's earlier confirmations went with
        self._earlier_keys = earlier_keys

    async def deliver(self, message: OutboxMessage, key: str) -> Delivered:
        earlier = self._earlier_keys(message, self.name) if self._earlier_keys else ()
        return await self._sender.send(confirmation(message, key, earlier))

    async def close(self) -> None:
        await self._sender.close()
