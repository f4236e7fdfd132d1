"""Reading a JetStream pull consumer with one pull request per batch.

nats-py's ``fetch()`` pays, per message, a task, an ``asyncio.wait_for`` and a ``uuid4``; at the
hub's burst rates that was about a sixth of ingest's CPU. ``PullConsumer`` asks the server for a
batch with one request whose replies land on an inbox of its own (a plain buffered
subscription), and asks for the next batch while the caller is still committing this one.

What comes back besides messages (under the request's own reply subject, where messages come
under their stream subject), and what is done with it:

- ``100`` idle heartbeat: the server and the request are alive; it also says which delivery the
  server made last (``Nats-Last-Consumer``).
- ``404`` / ``408``: a request ended with fewer messages than it asked for; ``409``: it ended or
  was refused (``Leadership Change``, ``Server Shutdown``, …). What it still owed
  (``Nats-Pending-Messages``) is no longer due, and the next fetch asks again. ``409 Consumer
  Deleted`` or a push consumer is an error (``PullFailed``): the caller recreates the consumer
  where its store says.
- Silence: no message, heartbeat or status for ``STALL_HEARTBEATS`` heartbeats while messages are
  due (a request dropped without a word, e.g. over the server's waiting limit) is ``PullFailed``.
- A reconnect is ``PullFailed``: the requests of the old connection are gone, and the caller
  starts again from what it stored (the server may even have restarted from an older state).

Nothing delivered may be lost between the server and the caller, because the caller acks "all
up to" the last message it committed: every delivery takes the next consumer sequence (a
redelivery too), so a gap in them — a message dropped by the client, or delivered to a request
lost in a reconnect, or seen from a heartbeat — is a ``PullFailed``, raised before anything
after the gap is handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import deque
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STALL_HEARTBEATS = 3
_STATUS = "Status"
_DESCRIPTION = "Description"


class PullFailed(Exception):
    """The pull consumer cannot go on as it is: recreate it (from the store's position)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message the consumer delivered, with what its ack subject says of it."""

    message: Msg
    stream_seq: int
    consumer_seq: int
    pending: int  # messages left in the stream for this consumer after this one


def ack_fields(reply: str) -> tuple[int, int, int]:
    """Stream sequence, consumer sequence and pending count from a JetStream ack subject,
    without the client's ``Metadata`` (which also parses a timestamp per message):
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``
    (9 tokens) or, from servers that add domain and account hash,
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<stream seq>.…`` (12 or more)."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    return int(tokens[at]), int(tokens[at + 1]), int(tokens[at + 3])


class PullConsumer:
    """A durable pull consumer of ``stream``, read a batch at a time (``fetch``)."""

    def __init__(
        self,
        client: NatsClient,
        stream: str,
        durable: str,
        batch: int,
        *,
        expires_s: float = 5.0,
        heartbeat_s: float = 1.0,
        api_prefix: str = "$JS.API",
    ) -> None:
        if heartbeat_s * 2 > expires_s:
            raise ValueError("the heartbeat must be under half the request's expiry")
        self._client = client
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._batch = batch
        self._expires_ns = int(expires_s * 1e9)
        self._heartbeat_s = heartbeat_s
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._numbers = itertools.count(1)
        # Messages asked for and not yet come or called off. (The server spreads its deliveries
        # over the open requests as it likes: only the total can be known.)
        self._due = 0
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._failure: PullFailed | None = None
        self._last_consumer_seq = 0  # consumer sequences start at 1
        self._last_heard = 0.0
        self._reconnects = 0  # the client's count when this consumer started

    async def start(self) -> None:
        self._inbox = self._client.new_inbox()
        self._reconnects = self._client.stats["reconnects"]
        # Room for what can be asked at once (two batches) and the statuses between them.
        self._subscription = await self._client.subscribe(
            f"{self._inbox}.*", cb=self._on_message, pending_msgs_limit=self._batch * 4 + 1000
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            try:
                await subscription.unsubscribe()
            except Exception:  # a closed connection has nothing left to unsubscribe
                log.debug("unsubscribing the pull inbox failed", exc_info=True)

    async def fetch(self, timeout: float) -> list[Delivery]:
        """Up to ``batch`` deliveries, in the order the server sent them; an empty list when
        none came within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if self._client.stats["reconnects"] != self._reconnects and self._failure is None:
            self._failure = PullFailed("the connection to NATS was made again")
        await self._ask()
        deadline = loop.time() + timeout
        while not self._buffer and self._failure is None:
            self._arrived.clear()
            now = loop.time()
            if now >= deadline:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(deadline - now, self._heartbeat_s))
            # (Judged after waiting: heartbeats queued while the loop was busy count.)
            silent = loop.time() - self._last_heard
            if self._due and silent > STALL_HEARTBEATS * self._heartbeat_s:
                self._failure = PullFailed(f"no message or heartbeat for {silent:.1f} s")
            elif not self._due and self._failure is None:
                await self._ask()  # the requests ended (expired or refused): ask again
        if self._buffer:  # hand out what came before a failure, then raise on the next fetch
            count = min(len(self._buffer), self._batch)
            return [self._buffer.popleft() for _ in range(count)]
        assert self._failure is not None
        raise self._failure

    async def _ask(self) -> None:
        """Ask for a batch when less than one batch is on its way or waiting here."""
        if self._failure is not None or self._due + len(self._buffer) >= self._batch:
            return
        reply = f"{self._inbox}.{next(self._numbers)}"
        request = {
            "batch": self._batch,
            "expires": self._expires_ns,
            "idle_heartbeat": int(self._heartbeat_s * 1e9),
        }
        if not self._due:
            # The silence watch starts with the request, not with the last message heard.
            self._last_heard = asyncio.get_running_loop().time()
        self._due += self._batch
        try:
            await self._client.publish(
                self._next_subject, json.dumps(request).encode(), reply=reply
            )
        except Exception as exc:  # the connection is lost or closed
            raise PullFailed(f"cannot ask for messages: {exc!r}") from exc

    async def _on_message(self, message: Msg) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        if message.subject.startswith(self._inbox):  # a status of one of the requests
            headers = message.headers or {}
            if _STATUS in headers:
                self._on_status(headers[_STATUS], headers)
            # else: not from the server for a request (e.g. a stream's publish ack sent here by
            # a publisher who named this inbox as its reply): nothing to do with it.
            return
        if self._failure is not None:
            return  # after a gap nothing more is handed out: the consumer is recreated
        stream_seq, consumer_seq, pending = ack_fields(message.reply)
        if not self._all_arrived(consumer_seq - 1):
            return
        self._last_consumer_seq = consumer_seq
        self._due = max(self._due - 1, 0)
        self._buffer.append(Delivery(message, stream_seq, consumer_seq, pending))
        self._arrived.set()

    def _all_arrived(self, through: int) -> bool:
        """Whether every delivery up to consumer sequence ``through`` arrived here; if not, the
        failure that says which did not."""
        if self._last_consumer_seq < through:
            self._failure = PullFailed(
                f"deliveries {self._last_consumer_seq + 1}..{through} of the consumer never arrived"
            )
            self._arrived.set()
            return False
        return True

    def _on_status(self, status: str, headers: dict[str, str]) -> None:
        description = headers.get(_DESCRIPTION, "")
        if status == "100":
            # An idle heartbeat: alive. It says what the server delivered last, so a delivery
            # lost while nothing else came is seen too.
            last = headers.get("Nats-Last-Consumer")
            if last is not None and last.isdigit():
                self._all_arrived(int(last))
            return
        if status == "409" and ("Deleted" in description or "push" in description):
            self._failure = PullFailed(f"the consumer is gone: {status} {description}")
        elif status not in ("404", "408", "409"):
            self._failure = PullFailed(f"unexpected status {status!r} {description}")
        # The request has ended: what it still owed is not coming. (Without the count, none is
        # taken as due: asking again for too much is harmless, waiting for nothing is not.)
        owed = headers.get("Nats-Pending-Messages", "")
        self._due = max(self._due - int(owed), 0) if owed.isdigit() else 0
        self._arrived.set()
