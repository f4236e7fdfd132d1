"""ERP stand-ins: small web servers on loopback that accept and refuse what the real ERPs do,
checked against their real definitions in ``../shared/fixtures/erp/`` (Odoo's models, ERPNext's
DocTypes, SAP's service metadata). One module per dialect; ``served`` runs one for a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI

from hub.server import ApiServer
from tests.conftest import fixtures_dir


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its base URL (``http://127.0.0.1:<port>``)."""
    server = ApiServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield server.url
    finally:
        await server.stop()


def erp_fixtures(dialect: str) -> Path:
    """``../shared/fixtures/erp/<dialect>``, or the test is skipped saying why."""
    root = fixtures_dir()
    if root is None or not (root / "erp" / dialect).is_dir():
        pytest.skip(f"../shared/fixtures/erp/{dialect} is absent (CI has it): no real definitions")
    return root / "erp" / dialect
