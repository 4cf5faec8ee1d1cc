"""The Alembic migrations, on PostgreSQL and SQLite: up and down from empty, matching the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from services.attribution import db
from services.attribution.models import Base

TABLES = {
    "usage_events",
    "usage_senders",
    "usage_pending_batches",
    "usage_rollups",
    "provenance",
    "provenance_contributors",
    "prices",
    "reward_entries",
}


def tables(engine: object) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_up_and_down_from_empty(ledger_url: str) -> None:
    engine = db.make_engine(ledger_url)
    try:
        assert tables(engine) == set()
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert tables(engine) == TABLES
        assert db.current_revision(engine) == db.head_revision()
        db.upgrade(engine)  # idempotent at head
        db.downgrade(engine, "base")
        assert tables(engine) == set()
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert tables(engine) == TABLES
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(ledger_url: str) -> None:
    engine = db.make_engine(ledger_url)
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()
