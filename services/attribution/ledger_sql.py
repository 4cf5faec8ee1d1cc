"""The ledger's per-batch statements as plain SQL on the transaction's own DBAPI cursor.

A worker flushes usage every half second, so most batches are small (one record per running request)
and their cost is per statement and per row, not per token. Through SQLAlchemy Core each statement
cost ~0.3 ms of building and compiling and each executemany row ~20 µs of parameter processing
(`bench/RESULTS.md`); here a statement is a string made once and a row a tuple. The SQL is the same on
SQLite (≥ 3.35, for RETURNING) and PostgreSQL; only the placeholder differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from services.attribution.domain import TokenRecord

# Rows per multi-row INSERT … RETURNING on SQLite, whose executemany cannot return rows: 9 columns a
# row stays far below its 32,766 bound variables.
_SQLITE_ROWS_PER_INSERT = 512

EVENT_COLUMNS = (
    "request_id, token_index, kind, tenant, worker_id, ts_us, adapters, client_request_id, token_count"
)


def event_row(record: TokenRecord, adapters_text: Callable[[TokenRecord], str]) -> tuple[Any, ...]:
    """A `usage_events` row of `record`, in `EVENT_COLUMNS` order."""
    r = record
    return (
        r.request_id,
        r.token_index,
        int(r.kind),
        r.tenant,
        r.worker_id,
        r.ts_us,
        adapters_text(r),
        r.client_request_id,
        r.token_count,
    )


class LedgerSql:
    """The statements for one dialect, with `?` written as its placeholder."""

    def __init__(self, dialect: str) -> None:
        self.is_postgres = dialect == "postgresql"
        mark = "%s" if self.is_postgres else "?"

        def sql(text: str) -> str:
            return text.replace("?", mark)

        self._mark = mark
        self.ensure_sender = sql(
            "INSERT INTO usage_senders (worker_id, acked_sequence) VALUES (?, 0) ON CONFLICT DO NOTHING"
        )
        # PostgreSQL locks the sender's row, so batches of one sender serialise (SQLite has one writer).
        self.acked_sequence = sql("SELECT acked_sequence FROM usage_senders WHERE worker_id = ?") + (
            " FOR UPDATE" if self.is_postgres else ""
        )
        self.set_acked = sql("UPDATE usage_senders SET acked_sequence = ? WHERE worker_id = ?")
        self.add_pending = sql(
            "INSERT INTO usage_pending_batches (worker_id, sequence) VALUES (?, ?) ON CONFLICT DO NOTHING"
        )
        self.pending_after = sql(
            "SELECT sequence FROM usage_pending_batches WHERE worker_id = ? AND sequence > ? "
            "ORDER BY sequence"
        )
        self.drop_pending = sql("DELETE FROM usage_pending_batches WHERE worker_id = ? AND sequence <= ?")
        self.bump_rollup = sql(
            "INSERT INTO usage_rollups (adapter_id, tenant, minute_us, prompt_tokens, completion_tokens) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (adapter_id, tenant, minute_us) DO UPDATE SET "
            "prompt_tokens = usage_rollups.prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = usage_rollups.completion_tokens + excluded.completion_tokens"
        )
        self.add_rewards = sql(
            "INSERT INTO reward_entries (contributor_id, role, adapter_id, adapter_version, tenant, "
            "request_id, minute_us, tokens_micros, amount_picos, committed_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )

    def prices_of(self, count: int) -> str:
        marks = ", ".join([self._mark] * count)
        return f"SELECT adapter_id, prompt_picos, completion_picos FROM prices WHERE adapter_id IN ({marks})"

    def insert_events(self, count: int) -> str:
        """SQLite: `count` rows in one INSERT that returns the keys it wrote (a key already in the
        ledger is skipped)."""
        rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count)
        return (
            f"INSERT INTO usage_events ({EVENT_COLUMNS}) VALUES {rows} "
            "ON CONFLICT (request_id, token_index, kind) DO NOTHING RETURNING request_id, token_index, kind"
        )


def cursor_of(conn: Connection) -> Any:
    """A cursor of the DBAPI connection that runs `conn`'s transaction."""
    driver = conn.connection.driver_connection
    assert driver is not None
    return driver.cursor()


def fetch_all(conn: Connection, statement: str, params: Sequence[Any]) -> list[Any]:
    cursor = cursor_of(conn)
    try:
        cursor.execute(statement, params)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def execute(conn: Connection, statement: str, params: Sequence[Any]) -> None:
    cursor = cursor_of(conn)
    try:
        cursor.execute(statement, params)
    finally:
        cursor.close()


def execute_many(conn: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> None:
    cursor = cursor_of(conn)
    try:
        cursor.executemany(statement, rows)
    finally:
        cursor.close()


def insert_sizes(count: int) -> list[int]:
    """`count` rows as INSERTs of power-of-two sizes, largest first. Each size is one SQL text, so a
    connection's statement cache holds at most ten prepared INSERTs: with a text per row count, it
    held up to 128 of up to 500 rows each (megabytes a connection) and the process grew for minutes."""
    sizes = []
    while count:
        size = min(_SQLITE_ROWS_PER_INSERT, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return sizes


def insert_events_sqlite(
    conn: Connection,
    sql: LedgerSql,
    records: list[TokenRecord],
    adapters_text: Callable[[TokenRecord], str],
) -> set[tuple[str, int, int]]:
    """Insert `records` inside the connection's transaction; return the keys that were new."""
    rows = [event_row(r, adapters_text) for r in records]
    new: set[tuple[str, int, int]] = set()
    cursor = cursor_of(conn)
    try:
        start = 0
        for size in insert_sizes(len(rows)):
            part = rows[start : start + size]
            start += size
            cursor.execute(sql.insert_events(size), [value for row in part for value in row])
            new.update((row[0], row[1], row[2]) for row in cursor.fetchall())
    finally:
        cursor.close()
    return new
