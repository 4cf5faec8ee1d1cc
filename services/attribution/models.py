"""The ledger's tables (SQLAlchemy 2). The schema itself is created by the Alembic migrations in
`migrations/`, which must match these models (a test compares them).

Times are epoch microseconds (BIGINT): cheap to bucket by minute with integer arithmetic, identical
on PostgreSQL and SQLite. Money and shares are integers of fixed units, see `domain.py`.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKeyConstraint, Index, Integer, SmallInteger, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid); PostgreSQL gets a 64-bit key.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class UsageEvent(Base):
    """One token read or produced; at most one row per idempotency key.

    `request_id` is unique per served request (the worker makes it), so a client reusing its own ids
    is still billed for every token; rows from before revision 0002 hold the client's id there."""

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("uq_usage_events_key", "request_id", "token_index", "kind", unique=True),
        Index("ix_usage_events_client_request", "client_request_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128))
    token_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[int] = mapped_column(SmallInteger)  # domain.TokenKind
    tenant: Mapped[str] = mapped_column(String(128))
    worker_id: Mapped[str] = mapped_column(String(128))
    ts_us: Mapped[int] = mapped_column(BigInteger)
    # `id version weight_micros` per adapter, `;`-separated (ids and versions hold no whitespace);
    # kept so rewards can be audited or recomputed from the events alone.
    adapters: Mapped[str] = mapped_column(Text)
    # The id the client chose, for lookups; request_id (made unique by the worker) is the key.
    client_request_id: Mapped[str] = mapped_column(String(128), server_default="")
    # The row covers tokens [token_index, token_index + token_count) of its kind; a worker sends one
    # range per request per flush. Ranges of one request and kind never overlap.
    token_count: Mapped[int] = mapped_column(Integer, server_default="1")


class UsageSender(Base):
    """Per sending worker: the highest contiguous batch sequence committed."""

    __tablename__ = "usage_senders"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    acked_sequence: Mapped[int] = mapped_column(BigInteger)


class UsagePendingBatch(Base):
    """A batch committed out of order, above its sender's contiguous sequence (removed once covered)."""

    __tablename__ = "usage_pending_batches"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class UsageRollup(Base):
    """Token counts per adapter × tenant × minute, updated in each batch's transaction.

    `adapter_id` '' counts every token once (whatever adapters it had); a mixed token also counts,
    whole, in the row of each of its adapters.
    """

    __tablename__ = "usage_rollups"

    adapter_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    minute_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class ProvenanceRow(Base):
    """Who is credited for one adapter version (immutable once written)."""

    __tablename__ = "provenance"

    adapter_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    trainer: Mapped[str] = mapped_column(Text)
    datasets: Mapped[str] = mapped_column(Text)  # JSON list of strings
    source: Mapped[str] = mapped_column(String(16))  # "push" or "store"
    registered_us: Mapped[int] = mapped_column(BigInteger)


class ProvenanceContributor(Base):
    __tablename__ = "provenance_contributors"
    __table_args__ = (
        ForeignKeyConstraint(
            ["adapter_id", "version"], ["provenance.adapter_id", "provenance.version"], ondelete="CASCADE"
        ),
    )

    adapter_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    contributor_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    role: Mapped[int] = mapped_column(SmallInteger)  # domain.Role
    share_micros: Mapped[int] = mapped_column(Integer)


class PriceRow(Base):
    """Price per token of one adapter; adapter_id '' is the default for adapters without a row."""

    __tablename__ = "prices"

    adapter_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    prompt_picos: Mapped[int] = mapped_column(BigInteger)
    completion_picos: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class RewardLedgerEntry(Base):
    """Money one contributor earned from one adapter for one request's tokens in one minute."""

    __tablename__ = "reward_entries"
    __table_args__ = (
        Index("ix_reward_entries_contributor", "contributor_id", "minute_us"),
        Index("ix_reward_entries_adapter", "adapter_id", "minute_us"),
        Index("ix_reward_entries_tenant", "tenant", "minute_us"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    contributor_id: Mapped[str] = mapped_column(String(256))
    role: Mapped[int] = mapped_column(SmallInteger)
    adapter_id: Mapped[str] = mapped_column(String(256))
    adapter_version: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(128))
    minute_us: Mapped[int] = mapped_column(BigInteger)
    tokens_micros: Mapped[int] = mapped_column(BigInteger)
    amount_picos: Mapped[int] = mapped_column(BigInteger)
    committed_us: Mapped[int] = mapped_column(BigInteger)
