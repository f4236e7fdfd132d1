"""The pull consumer ingest reads JetStream with (hub.pull), against a real nats-server: batches
in order, heartbeats through idle time, a consumer deleted under it, a delivery lost between the
server and the hub, a lost connection, and a server restarted under it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from hub.nats import STREAM, EmbeddedNatsServer, connect, ensure_streams
from hub.pull import Delivery, PullConsumer, PullFailed
from hub.settings import Settings


@pytest.fixture
async def client(nats_server: EmbeddedNatsServer) -> AsyncIterator[NatsClient]:
    client = await connect(nats_server.url)
    await ensure_streams(client.jetstream(), Settings())
    yield client
    await client.close()


async def publish(client: NatsClient, count: int, first: int = 0) -> None:
    js = client.jetstream()
    for n in range(first, first + count):
        await js.publish(f"mes.default.test.{n}", str(n).encode())


async def durable(client: NatsClient, name: str = "reader") -> None:
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.ALL, max_ack_pending=1000)
    await client.jetstream().add_consumer(STREAM, config)


async def read_all(consumer: PullConsumer, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < count:
        batch = await consumer.fetch(timeout=5)
        assert batch, f"only {len(got)} of {count} came"
        got += batch
        await batch[-1].message.ack()
    return got


async def test_batches_come_in_order_at_most_a_batch_at_a_time_with_nothing_lost(
    client: NatsClient,
) -> None:
    await publish(client, 250)
    await durable(client)
    consumer = PullConsumer(client, STREAM, "reader", batch=40)
    await consumer.start()
    sizes = []
    got: list[Delivery] = []
    while len(got) < 250:
        batch = await consumer.fetch(timeout=5)
        sizes.append(len(batch))
        got += batch
        await batch[-1].message.ack()
    await consumer.stop()
    assert [d.message.data for d in got] == [str(n).encode() for n in range(250)]
    assert [d.stream_seq for d in got] == list(range(1, 251))
    assert [d.consumer_seq for d in got] == list(range(1, 251))
    assert max(sizes) == 40
    assert got[-1].pending == 0 and got[0].pending == 249


async def test_an_idle_consumer_outlives_its_requests_and_takes_what_comes_later(
    client: NatsClient,
) -> None:
    await durable(client)
    # Requests expire after 1 s: the idle time below outlives several, kept up by heartbeats.
    consumer = PullConsumer(client, STREAM, "reader", batch=10, expires_s=1.0, heartbeat_s=0.25)
    await consumer.start()
    loop = asyncio.get_running_loop()
    idle_until = loop.time() + 3.0
    while loop.time() < idle_until:
        assert await consumer.fetch(timeout=0.5) == []
    await publish(client, 3)
    got = await read_all(consumer, 3)
    await consumer.stop()
    assert [d.message.data for d in got] == [b"0", b"1", b"2"]


async def test_a_deleted_consumer_fails_the_fetch(client: NatsClient) -> None:
    await durable(client)
    consumer = PullConsumer(client, STREAM, "reader", batch=10, expires_s=2.0, heartbeat_s=0.5)
    await consumer.start()
    assert await consumer.fetch(timeout=0.3) == []
    await client.jetstream().delete_consumer(STREAM, "reader")
    with pytest.raises(PullFailed, match="the consumer is gone: 409 Consumer Deleted"):
        for _ in range(20):
            await consumer.fetch(timeout=0.5)
    await consumer.stop()


class Dropping(PullConsumer):
    """Loses the deliveries whose payload is in ``lose`` between the server and the reader, as
    a slow-consumer drop or a request lost in a reconnect would."""

    def __init__(self, *args: object, lose: set[bytes], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lose = lose

    async def _on_message(self, message: Msg) -> None:
        if message.data in self.lose and not message.headers:
            return
        await super()._on_message(message)


async def test_a_lost_delivery_fails_the_fetch_before_anything_after_it_is_handed_out(
    client: NatsClient,
) -> None:
    await publish(client, 30)
    await durable(client)
    consumer = Dropping(client, STREAM, "reader", batch=100, lose={b"12"})
    await consumer.start()
    got: list[Delivery] = []
    with pytest.raises(PullFailed, match=r"deliveries 13\.\.13 .*never arrived"):
        for _ in range(10):
            got += await consumer.fetch(timeout=2)
    await consumer.stop()
    # What came before the gap is handed out (it may be committed and acked "all up to" 12);
    # nothing after it is, so an ack can never cover the lost one.
    assert [d.message.data for d in got] == [str(n).encode() for n in range(12)]


async def test_a_lost_last_delivery_is_seen_from_the_heartbeat(client: NatsClient) -> None:
    await publish(client, 5)
    await durable(client)
    consumer = Dropping(
        client, STREAM, "reader", batch=10, expires_s=2.0, heartbeat_s=0.25, lose={b"4"}
    )
    await consumer.start()
    got: list[Delivery] = []
    with pytest.raises(PullFailed, match=r"deliveries 5\.\.5 .*never arrived"):
        for _ in range(20):
            got += await consumer.fetch(timeout=0.5)
    await consumer.stop()
    assert [d.message.data for d in got] == [b"0", b"1", b"2", b"3"]


async def test_a_lost_connection_fails_the_fetch(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "nats")
    server.start()
    client = await connect(server.url)
    try:
        await ensure_streams(client.jetstream(), Settings())
        await durable(client)
        consumer = PullConsumer(client, STREAM, "reader", batch=10, heartbeat_s=0.25)
        await consumer.start()
        assert await consumer.fetch(timeout=0.3) == []
        server.stop()  # no messages, no heartbeats, no statuses from now on
        with pytest.raises(PullFailed, match=r"no message or heartbeat|cannot ask"):
            for _ in range(20):
                await consumer.fetch(timeout=0.5)
    finally:
        with contextlib.suppress(Exception):  # the connection is gone
            await client.close()
        server.stop()


async def test_after_a_server_restart_reading_starts_again_from_what_was_kept(
    tmp_path: Path,
) -> None:
    # What ingest does: on PullFailed, recreate the consumer after the last position it kept.
    server = EmbeddedNatsServer(tmp_path / "nats")
    server.start()
    client = await connect(server.url)
    kept: list[Delivery] = []

    async def reader() -> PullConsumer:
        with contextlib.suppress(NotFoundError):
            await client.jetstream().delete_consumer(STREAM, "reader")
        after = kept[-1].stream_seq if kept else 0
        config = ConsumerConfig(
            durable_name="reader",
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
        )
        await client.jetstream().add_consumer(STREAM, config)
        consumer = PullConsumer(client, STREAM, "reader", batch=10, heartbeat_s=0.5)
        await consumer.start()
        return consumer

    failures = 0
    try:
        await ensure_streams(client.jetstream(), Settings())
        await publish(client, 20)
        consumer = await reader()
        kept += await read_all(consumer, 10)
        server.stop()
        server.start()  # the same port and store: the client reconnects by itself
        await asyncio.sleep(1.5)
        await publish(client, 5, first=20)
        while len(kept) < 25:
            try:
                batch = await consumer.fetch(timeout=5)
            except PullFailed:
                failures += 1
                await consumer.stop()
                consumer = await reader()
                continue
            assert batch, f"only {len(kept)} of 25 came"
            kept += batch
            await batch[-1].message.ack()
        await consumer.stop()
    finally:
        await client.close()
        server.stop()
    assert failures >= 1  # the reconnect was noticed, not read through
    assert [d.message.data for d in kept] == [str(n).encode() for n in range(25)]


async def test_a_message_with_a_status_header_of_its_own_is_a_message(
    client: NatsClient,
) -> None:
    # Only what comes under the request's reply subject is a status from the server.
    await client.jetstream().publish("mes.default.test.0", b"0", headers={"Status": "503"})
    await durable(client)
    consumer = PullConsumer(client, STREAM, "reader", batch=10)
    await consumer.start()
    got = await read_all(consumer, 1)
    await consumer.stop()
    assert got[0].message.data == b"0"
