"""The write path: one transaction per usage batch.

In that transaction the batch's records are inserted idempotently (a record whose key is already in
the ledger is skipped), the sender's contiguous sequence is advanced, the per-minute rollups are
bumped and the rewards of the newly inserted records are written. Either all of it commits or none.

Calls here are blocking; the servicer runs them on worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from services.attribution.domain import (
    AdapterShare,
    IngestResult,
    Provenance,
    RewardEntry,
    TokenKind,
    TokenRecord,
    UsageBatch,
)
from services.attribution.events_pg import insert_events_pg
from services.attribution.ledger_sql import (
    LedgerSql,
    execute,
    execute_many,
    fetch_all,
    insert_events_sqlite,
)
from services.attribution.models import PriceRow
from services.attribution.rewards import PricePicos, Tally, compute_rewards, tally

# SQLSTATEs worth retrying the whole batch for: deadlock, serialization failure.
_RETRYABLE_PG_STATES = {"40P01", "40001"}
_MAX_ATTEMPTS = 5

ALL_ADAPTERS = ""  # rollup row counting every token once


class AdaptersText:
    """The `usage_events.adapters` text of a mix, made once per distinct mix of a batch."""

    def __init__(self) -> None:
        self._texts: dict[tuple[AdapterShare, ...], str] = {}

    def __call__(self, record: TokenRecord) -> str:
        text = self._texts.get(record.adapters)
        if text is None:
            text = ";".join(f"{a.adapter_id} {a.version} {a.weight_micros}" for a in record.adapters)
            self._texts[record.adapters] = text
        return text


class Ledger:
    """Writes usage batches, with their rewards, in single transactions."""

    def __init__(self, engine: Engine, default_price: PricePicos) -> None:
        self.engine = engine
        self.default_price = default_price
        self.is_postgres = engine.dialect.name == "postgresql"
        self.sql = LedgerSql(engine.dialect.name)
        # SQLite has one writer at a time anyway; queueing here beats polling on busy_timeout.
        self._sqlite_writer = threading.Lock()

    def record(self, batch: UsageBatch, provenance: Mapping[tuple[str, str], Provenance]) -> IngestResult:
        """Commit `batch`; `provenance` must cover every (adapter_id, version) the batch names."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                if self.is_postgres:
                    return self._record_once(batch, provenance)
                with self._sqlite_writer:
                    return self._record_once(batch, provenance)
            except OperationalError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state not in _RETRYABLE_PG_STATES or attempt == _MAX_ATTEMPTS:
                    raise
                time.sleep(0.005 * attempt)  # the other transaction usually commits within ms
        raise AssertionError("unreachable")

    def _record_once(
        self, batch: UsageBatch, provenance: Mapping[tuple[str, str], Provenance]
    ) -> IngestResult:
        with self.engine.begin() as conn:
            # The sender's row is locked first, so batches of one sender serialise here rather than
            # interleaving their event inserts (and so cannot deadlock on each other).
            acked = self._advance_sequence(conn, batch.worker_id, batch.sequence)
            inserted = self._insert_events(conn, batch.records)
            counts = tally(inserted)
            self._bump_rollups(conn, counts)
            prices = self._prices(conn, {a.adapter_id for key in counts for a in key[4]})
            committed_us = time.time_ns() // 1000
            rewards = compute_rewards(
                counts, provenance, lambda adapter_id: prices.get(adapter_id, prices[""]), committed_us
            )
            self._write_rewards(conn, rewards)
        return IngestResult(
            acked_sequence=acked,
            inserted=len(inserted),
            duplicates=len(batch.records) - len(inserted),
            rewards=rewards,
        )

    def _advance_sequence(self, conn: Connection, worker_id: str, sequence: int) -> int:
        """Mark `sequence` committed for `worker_id`; return the highest contiguous one."""
        sql = self.sql
        execute(conn, sql.ensure_sender, (worker_id,))
        acked = int(fetch_all(conn, sql.acked_sequence, (worker_id,))[0][0])
        if sequence <= acked:
            # Already covered. The records were still inserted idempotently by the caller: a sender that
            # lost its spool and restarted its numbering must not have new records taken for old ones.
            return acked
        if sequence > acked + 1:
            execute(conn, sql.add_pending, (worker_id, sequence))
            return acked
        acked = sequence
        for (later,) in fetch_all(conn, sql.pending_after, (worker_id, acked)):
            if later != acked + 1:
                break
            acked = later
        execute(conn, sql.drop_pending, (worker_id, acked))
        execute(conn, sql.set_acked, (acked, worker_id))
        return acked

    def _insert_events(self, conn: Connection, records: list[TokenRecord]) -> list[TokenRecord]:
        """Insert the records not yet in the ledger; return those, in batch order."""
        if not records:
            return []
        # A key repeated inside one batch (a confused sender) is written once, from its first record,
        # so the rewards are computed from exactly the row that was stored.
        first_of: dict[tuple[str, int, int], TokenRecord] = {}
        for record in records:
            first_of.setdefault(record.key, record)
        if len(first_of) != len(records):
            records = list(first_of.values())
        if self.is_postgres:
            new_keys = insert_events_pg(conn, records, AdaptersText())
        else:
            new_keys = insert_events_sqlite(conn, self.sql, records, AdaptersText())
        if new_keys is None or len(new_keys) == len(records):
            return records
        return [record for record in records if record.key in new_keys]

    def _bump_rollups(self, conn: Connection, tallied: Tally) -> None:
        counts: dict[tuple[str, str, int], list[int]] = {}
        for (_request, tenant, kind, minute, mix), tokens in tallied.items():
            column = 0 if kind is TokenKind.PROMPT else 1
            for adapter_id in (ALL_ADAPTERS, *(a.adapter_id for a in mix)):
                key = (adapter_id, tenant, minute)
                row = counts.get(key)
                if row is None:
                    row = counts[key] = [0, 0]
                row[column] += tokens
        if not counts:
            return
        # Sorted, so concurrent transactions lock rollup rows in one order and cannot deadlock.
        rows = [(a, t, m, p, c) for (a, t, m), (p, c) in sorted(counts.items())]
        execute_many(conn, self.sql.bump_rollup, rows)

    def _prices(self, conn: Connection, adapter_ids: set[str]) -> dict[str, PricePicos]:
        """Prices of `adapter_ids`, plus the default under ''."""
        prices: dict[str, PricePicos] = {"": self.default_price}
        if not adapter_ids:
            return prices
        wanted = [*adapter_ids, ""]
        for adapter_id, prompt, completion in fetch_all(conn, self.sql.prices_of(len(wanted)), wanted):
            prices[adapter_id] = (int(prompt), int(completion))
        return prices

    def _write_rewards(self, conn: Connection, rewards: list[RewardEntry]) -> None:
        if not rewards:
            return
        rows = [
            (
                e.contributor_id,
                int(e.role),
                e.adapter_id,
                e.adapter_version,
                e.tenant,
                e.request_id,
                e.minute_us,
                e.tokens_micros,
                e.amount_picos,
                e.committed_us,
            )
            for e in rewards
        ]
        execute_many(conn, self.sql.add_rewards, rows)


def set_price(engine: Engine, adapter_id: str, prompt_picos: int, completion_picos: int) -> None:
    """Set the price of `adapter_id` ('' = the default for adapters without one)."""
    is_postgres = engine.dialect.name == "postgresql"
    statement = (postgresql.insert if is_postgres else sqlite.insert)(PriceRow).values(
        adapter_id=adapter_id,
        prompt_picos=prompt_picos,
        completion_picos=completion_picos,
        updated_us=time.time_ns() // 1000,
    )
    statement = statement.on_conflict_do_update(
        index_elements=["adapter_id"],
        set_={
            "prompt_picos": statement.excluded.prompt_picos,
            "completion_picos": statement.excluded.completion_picos,
            "updated_us": statement.excluded.updated_us,
        },
    )
    with engine.begin() as conn:
        conn.execute(statement)
