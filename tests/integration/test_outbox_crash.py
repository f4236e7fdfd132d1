"""A hub killed mid-delivery loses no confirmation and posts none twice: ``mes-hub serve``
with a generic REST ERP (the stand-in of tests/erp_standins/rest.py), SIGKILLed by a failpoint
right after the ERP took a confirmation and before the hub recorded it, or at random moments
while confirmations flow, then started again."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from hub.bootstrap import CONFIRMATIONS_SINCE
from hub.nats import EmbeddedNatsServer, NatsPublisher, connect, ensure_streams
from hub.settings import load_settings
from tests.conftest import T0, cloud_event, eventually
from tests.erp_standins import served
from tests.erp_standins.rest import CONFIRM_PATH, rest_erp

TOKEN = "rest-token-0123456789"
ORDERS = 6


def start_hub(data_dir: Path, config: Path, nats_url: str, **env: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub",
            "serve",
            "--config",
            str(config),
            "--nats-url",
            nats_url,
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
        ],
        env={
            **clean,
            "ERP_TOKEN": TOKEN,
            "MES_HUB_API_KEYS": "admin:admin-key-0123456789abcdef",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=(data_dir.parent / "hub.stderr").open("ab"),
    )


def workload(orders: int = ORDERS, machines: int = 3) -> list[Any]:
    """``orders`` orders on ``machines`` machines, each run ended: a confirmation each, order
    k's of k + 1 good parts."""
    events = []
    for k in range(orders):
        order_id, machine, start = f"SO-{k}", f"M{k % machines}", 60 * (k // machines)
        release = {"order_id": order_id, "part_number": "P-1", "quantity": 50,
                   "due": (T0 + timedelta(days=3)).isoformat()}  # fmt: skip
        events += [
            cloud_event("mes.erp.order.released.v1", order_id, release, at=-timedelta(hours=1)),
            cloud_event("mes.operator.order_started.v1", machine, {"order_id": order_id},
                        at=timedelta(minutes=start)),
            cloud_event("mes.machine.partcount.v1", machine, {"count": 10 * k, "kind": "all"},
                        at=timedelta(minutes=start)),
            cloud_event("mes.machine.partcount.v1", machine, {"count": 10 * k + k + 1,
                        "kind": "all"}, at=timedelta(minutes=start + 50)),
            cloud_event("mes.operator.order_ended.v1", machine, {"order_id": order_id},
                        at=timedelta(minutes=start + 55)),
        ]  # fmt: skip
    return events


def erp_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "mes-hub.toml"
    config.write_text(
        f'[[erp]]\nname = "plant-erp"\ndialect = "rest"\nurl = "{url}"\n'
        'secret = { env = "ERP_TOKEN" }\nallow = ["127.0.0.1"]\npoll_interval_s = 0\n'
        f'confirm_path = "{CONFIRM_PATH}"\n'
    )
    return config


def hub_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    (data_dir / CONFIRMATIONS_SINCE).write_text((T0 - timedelta(days=1)).isoformat())
    return data_dir


async def test_a_hub_killed_between_the_erp_s_answer_and_its_record_posts_nothing_twice(
    tmp_path: Path,
) -> None:
    erp = rest_erp(token=TOKEN)
    data_dir = hub_data_dir(tmp_path)
    async with served(erp) as url:
        config = erp_config(tmp_path, url)
        with EmbeddedNatsServer(tmp_path / "nats") as nats_server:
            crashing = start_hub(
                data_dir, config, nats_server.url, MES_HUB_FAULT_KILL_AFTER_DELIVERY="3"
            )
            client = await connect(nats_server.url)
            try:
                await eventually(lambda: (data_dir / "views.sqlite").exists(), timeout=30)
                await NatsPublisher(client.jetstream(), "default").publish_many(workload())
                # The third confirmation taken kills the hub before it records the attempt.
                await eventually(lambda: crashing.poll() is not None, timeout=60)
                assert crashing.returncode == -signal.SIGKILL
                taken_before = len(erp.state.confirmations)
                assert taken_before >= 3
                again = start_hub(data_dir, config, nats_server.url)
                try:
                    await eventually(lambda: len(erp.state.confirmations) == ORDERS, timeout=60)
                    # The one taken but not recorded went again with its key: answered as a
                    # repeat, counted once.
                    await eventually(lambda: sum(erp.state.attempts.values()) > ORDERS)
                finally:
                    again.send_signal(signal.SIGTERM)
                    again.wait(30)
            finally:
                await client.close()
                if crashing.poll() is None:
                    crashing.kill()
    taken = erp.state.confirmations
    assert sorted(body["order_id"] for body in taken.values()) == [f"SO-{k}" for k in range(ORDERS)]
    assert [body["yield_quantity"] for _, body in sorted(
        (b["order_id"], b) for b in taken.values())] == [k + 1 for k in range(ORDERS)]  # fmt: skip
    assert max(erp.state.attempts.values()) == 2  # the repeat, and nothing else twice


async def test_a_hub_killed_at_random_while_confirming_loses_none_and_posts_none_twice(
    tmp_path: Path,
) -> None:
    orders, rng = 60, random.Random(11)
    erp = rest_erp(token=TOKEN)
    erp.state.slow = 0.2  # an ERP that takes its time: the kills land mid-delivery
    data_dir = hub_data_dir(tmp_path)
    async with served(erp) as url:
        config = erp_config(tmp_path, url)
        with EmbeddedNatsServer(tmp_path / "nats") as nats_server:
            client = await connect(nats_server.url)
            try:
                await ensure_streams(client.jetstream(), load_settings())
                await NatsPublisher(client.jetstream(), "default").publish_many(
                    workload(orders, machines=6)
                )
                # Three times: a hub confirms for a while, then is SIGKILLed wherever it is.
                for _ in range(3):
                    hub = start_hub(data_dir, config, nats_server.url)
                    try:
                        before = len(erp.state.confirmations)
                        await eventually(
                            lambda b=before: len(erp.state.confirmations) >= min(orders, b + 5),
                            timeout=60,
                        )
                        await asyncio.sleep(rng.uniform(0.0, 0.3))
                    finally:
                        hub.kill()
                        hub.wait(30)
                assert len(erp.state.confirmations) < orders, "killed too late to test a thing"
                last = start_hub(data_dir, config, nats_server.url)
                try:
                    await eventually(lambda: len(erp.state.confirmations) >= orders, timeout=120)
                    await asyncio.sleep(1.0)  # nothing more comes
                finally:
                    last.send_signal(signal.SIGTERM)
                    last.wait(30)
            finally:
                await client.close()
    # Each order confirmed once (one idempotency key, one body), with what it made.
    told = sorted((b["order_id"], b["sequence"], b["yield_quantity"])
                  for b in erp.state.confirmations.values())  # fmt: skip
    assert told == sorted((f"SO-{k}", 1, k + 1) for k in range(orders))
    # The kills landed mid-delivery: some confirmations the ERP took went again after a
    # restart (the same key, answered as a repeat, counted once above).
    assert any(tries > 1 for tries in erp.state.attempts.values())
