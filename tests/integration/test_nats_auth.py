"""NATS identities (hub/nats_auth.py): the embedded server lets each identity publish only its
families, and ingest takes no hub event the hub did not sign, even from an open NATS."""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from contracts import encode_event
from hub.bootstrap import Hub, build_hub
from hub.nats import connect
from hub.nats_auth import CREDENTIALS_FILE, IDENTITIES, Credentials, identities, inbox_prefix
from hub.settings import Settings, load_settings
from projections.rules.plant import PlantConfig
from projections.rules.plant_history import configuration_event
from tests.conftest import API_ROLES, api_key, eventually

SUBJECTS = {
    "machine": "mes.default.machine.M1.execution",
    "operator": "mes.default.operator.M1.downtime",
    "erp": "mes.default.erp.order.SO-1.released",
    "hub": "mes.default.hub.plant.default.configured",
    "dead letters": "mes.dlq.mes.default.machine.M1.execution",
    "another site": "mes.other.machine.M1.execution",
}
ALLOWED = {
    "hub": set(SUBJECTS),
    "api": {"machine", "operator", "erp"},
    "machines": {"machine"},
    "erp": {"erp"},
    "reader": set(),
}


@pytest.fixture
async def embedded(tmp_path: Path) -> Hub:
    settings = load_settings(
        data_dir=tmp_path / "hub",
        api_keys=",".join(f"{role}:{api_key(role)}" for role in API_ROLES),
    )
    hub = await build_hub(settings, projections=False)
    yield hub  # type: ignore[misc]
    await hub.close()


async def may_publish(url: str, credentials: Credentials, subject: str) -> bool:
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    client = await nats.connect(
        url,
        user=credentials.user,
        password=credentials.password,
        error_cb=on_error,
        inbox_prefix=inbox_prefix(credentials.user),  # as hub.nats.connect does
    )
    try:
        await client.jetstream().publish(subject, b"{}", timeout=0.5)
        return True
    except (NatsError, TimeoutError):
        await client.flush(timeout=1)
        # Refused by the server: it says so (a permissions violation), the stream never acks.
        assert any("ermission" in str(e) for e in errors), errors
        return False
    finally:
        await client.close()


async def test_each_identity_may_publish_its_families_only(embedded: Hub) -> None:
    path = embedded.settings.data_dir / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    credentials = identities(path)
    found = {
        identity: {
            family
            for family, subject in SUBJECTS.items()
            if await may_publish(embedded.nats_url, credentials[identity], subject)
        }
        for identity in IDENTITIES
    }
    assert found == ALLOWED


async def test_no_identity_but_the_hub_reads_another_s_replies(embedded: Hub) -> None:
    # Ingest fetches events into the hub's inbox; acks go to each publisher's own.
    credentials = identities(embedded.settings.data_dir / CREDENTIALS_FILE)
    for identity in ("api", "machines", "erp", "reader"):
        errors: list[Exception] = []

        async def on_error(error: Exception, errors: list[Exception] = errors) -> None:
            errors.append(error)

        client = await nats.connect(
            embedded.nats_url,
            user=identity,
            password=credentials[identity].password,
            error_cb=on_error,
        )
        for inbox in ("_INBOX.>", "_INBOX_hub.>", "_INBOX_api.>" if identity != "api" else ""):
            if inbox:
                await client.subscribe(inbox)
        await client.flush(timeout=2)
        await asyncio.sleep(0.2)
        await client.close()
        assert len([e for e in errors if "ermission" in str(e)]) >= 2, (identity, errors)


async def test_a_wrong_password_or_none_is_refused(embedded: Hub) -> None:
    for login in ({"user": "machines", "password": "guessed"}, {}):
        with pytest.raises(NatsError):
            await nats.connect(embedded.nats_url, allow_reconnect=False, connect_timeout=2, **login)


async def test_the_reader_sees_what_is_published(embedded: Hub) -> None:
    credentials = identities(embedded.settings.data_dir / CREDENTIALS_FILE)
    reader = await connect(embedded.nats_url, credentials=credentials["reader"])
    seen: list[str] = []

    async def on_message(message: Msg) -> None:
        seen.append(message.subject)

    subscription = await reader.subscribe("mes.>", cb=on_message)
    await reader.flush()
    await may_publish(embedded.nats_url, credentials["machines"], SUBJECTS["machine"])
    await eventually(lambda: SUBJECTS["machine"] in seen, timeout=10)
    await subscription.unsubscribe()
    await reader.close()


async def test_a_hub_event_the_hub_did_not_sign_is_dead_lettered_not_stored(
    hub: Hub, settings: Settings
) -> None:
    # An open NATS (no identities): anyone may publish there, so the signature is what holds.
    forged = configuration_event("default", None, PlantConfig(time_zone="UTC"), datetime.now(UTC))
    assert forged is not None
    await hub.jetstream.publish(SUBJECTS["hub"], encode_event(forged))
    await eventually(lambda: hub.ingest_stats().rejected == 1)
    assert hub.store.plant("default") is None
    # A signature that is not even text the hub could have written: refused, ingest goes on.
    garbled = configuration_event("default", None, PlantConfig(time_zone="UTC"), datetime.now(UTC))
    assert garbled is not None
    await hub.jetstream.publish(
        SUBJECTS["hub"], encode_event(garbled), headers={"Mes-Hub-Signature": "é" * 64}
    )
    await eventually(lambda: hub.ingest_stats().rejected == 2)
    # The hub's own, signed, is taken.
    assert await hub.record_plant(PlantConfig(time_zone="UTC"))
    await eventually(lambda: hub.ingest_stats().applied == 1)
    assert hub.store.plant("default") is not None
    dead = await hub.jetstream.get_last_msg("MES", "mes.dlq." + SUBJECTS["hub"])
    assert dead.headers is not None
    assert "the hub did not publish" in dead.headers["Mes-Dlq-Reason"]
    assert json.loads(dead.data)["id"] == forged.id


async def test_an_adapter_of_another_site_is_told_why_nats_refuses_it(
    embedded: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    # An adapter whose [hub] site is not the hub's publishes subjects its identity may not.
    credentials = identities(embedded.settings.data_dir / CREDENTIALS_FILE)["machines"]
    client = await connect(embedded.nats_url, "shdr", credentials, log_changes=True)
    try:
        with caplog.at_level("ERROR", logger="hub.nats"), pytest.raises(TimeoutError):
            await client.jetstream().publish(SUBJECTS["another site"], b"{}", timeout=0.5)
        await eventually(lambda: any(r.levelname == "ERROR" for r in caplog.records))
    finally:
        await client.close()
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "refused" in said and "mes.other.machine.m1.execution" in said.lower()
    assert "[hub] site" in said
    assert credentials.password not in caplog.text
