"""PostgreSQL fast path for inserting usage events: COPY into a session temp table, then one
`INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING` that reports which keys were new.

COPY moves rows in bulk without a bind parameter per value, which is what makes ≥50k records/s
possible from Python; the conflict check stays in the database.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection

from services.attribution.domain import TokenRecord
from services.attribution.ledger_sql import EVENT_COLUMNS, event_row

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS usage_stage (
    request_id varchar(128) NOT NULL,
    token_index integer NOT NULL,
    kind smallint NOT NULL,
    tenant varchar(128) NOT NULL,
    worker_id varchar(128) NOT NULL,
    ts_us bigint NOT NULL,
    adapters text NOT NULL,
    client_request_id varchar(128) NOT NULL,
    token_count integer NOT NULL
) ON COMMIT DELETE ROWS
"""

# Ordered by key so concurrent transactions inserting overlapping keys (a resend racing the
# original) take index locks in one order and cannot deadlock.
_MOVE = f"""
INSERT INTO usage_events ({EVENT_COLUMNS})
SELECT {EVENT_COLUMNS} FROM usage_stage ORDER BY request_id, token_index, kind
ON CONFLICT (request_id, token_index, kind) DO NOTHING
RETURNING request_id, token_index, kind
"""


def insert_events_pg(
    conn: Connection, records: list[TokenRecord], adapters_text: Callable[[TokenRecord], str]
) -> set[tuple[str, int, int]] | None:
    """Insert `records` inside the connection's transaction; return the keys that were new, or None
    when every record was (the common case, where turning the keys into Python objects is skipped)."""
    driver = conn.connection.driver_connection  # the psycopg 3 connection of this transaction
    assert driver is not None
    with driver.cursor() as cursor:
        cursor.execute(_CREATE_STAGE)
        with cursor.copy(f"COPY usage_stage ({EVENT_COLUMNS}) FROM STDIN") as copy:
            for r in records:
                copy.write_row(event_row(r, adapters_text))
        cursor.execute(_MOVE)
        if cursor.rowcount == len(records):
            return None
        return {(row[0], row[1], row[2]) for row in cursor.fetchall()}
