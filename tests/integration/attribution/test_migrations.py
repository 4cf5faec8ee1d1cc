"""The Alembic migrations, on PostgreSQL and SQLite: up and down from empty, matching the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

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


def test_0002_keeps_existing_events_and_labels_them_with_their_client_id(ledger_url: str) -> None:
    engine = db.make_engine(ledger_url)
    try:
        db.upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO usage_events (request_id, token_index, kind, tenant, worker_id, "
                    "ts_us, adapters) VALUES ('job-42', 0, 1, 'acme', 'w', 1, ''), "
                    "('job-42', 0, 2, 'acme', 'w', 1, '')"
                )
            )
        db.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT request_id, kind, client_request_id FROM usage_events ORDER BY kind")
            ).all()
        assert [tuple(r) for r in rows] == [("job-42", 1, "job-42"), ("job-42", 2, "job-42")]
        db.downgrade(engine, "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM usage_events")).scalar_one() == 2
    finally:
        engine.dispose()
