"""The attribution suite runs twice: on a fresh PostgreSQL database per test and on a SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from openlora.v1 import attribution_pb2_grpc
from sqlalchemy import Engine

from services.attribution import db
from services.attribution.app import AttributionApp, build
from services.common.grpc_client import open_channel
from tests.integration.attribution.wire import attribution_settings
from tests.kit.postgres import create_database, drop_database
from tests.kit.service_auth import trusted


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty ledger database: a SQLite file, or a PostgreSQL database of this test alone."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    url = create_database("openlora_attr")
    yield url
    drop_database(url)


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    """An engine on a migrated ledger."""
    engine = db.make_engine(ledger_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def attribution(ledger_url: str) -> AsyncIterator[AttributionApp]:
    """A started attribution server on a loopback port (default prices: 0.0000005 / 0.0000015)."""
    built = build(attribution_settings(ledger_url, grace_period_s=1.0))
    try:
        await built.start()
        yield built
    finally:
        await built.close()


@pytest.fixture
async def stub(attribution: AttributionApp) -> AsyncIterator[attribution_pb2_grpc.AttributionAsyncStub]:
    async with open_channel(f"127.0.0.1:{attribution.server.port}", **trusted("attribution")) as channel:
        yield attribution_pb2_grpc.AttributionStub(channel)
