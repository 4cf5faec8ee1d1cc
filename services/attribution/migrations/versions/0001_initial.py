"""Initial ledger: usage events, sender cursors, rollups, provenance, prices, reward entries.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("token_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("adapters", sa.Text(), nullable=False),
    )
    op.create_index("uq_usage_events_key", "usage_events", ["request_id", "token_index", "kind"], unique=True)
    op.create_table(
        "usage_senders",
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("acked_sequence", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "usage_pending_batches",
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("sequence", sa.BigInteger(), primary_key=True),
    )
    op.create_table(
        "usage_rollups",
        sa.Column("adapter_id", sa.String(256), primary_key=True),
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("minute_us", sa.BigInteger(), primary_key=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "provenance",
        sa.Column("adapter_id", sa.String(256), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("trainer", sa.Text(), nullable=False),
        sa.Column("datasets", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("registered_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "provenance_contributors",
        sa.Column("adapter_id", sa.String(256), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("contributor_id", sa.String(256), primary_key=True),
        sa.Column("role", sa.SmallInteger(), nullable=False),
        sa.Column("share_micros", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id", "version"], ["provenance.adapter_id", "provenance.version"], ondelete="CASCADE"
        ),
    )
    op.create_table(
        "prices",
        sa.Column("adapter_id", sa.String(256), primary_key=True),
        sa.Column("prompt_picos", sa.BigInteger(), nullable=False),
        sa.Column("completion_picos", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "reward_entries",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("contributor_id", sa.String(256), nullable=False),
        sa.Column("role", sa.SmallInteger(), nullable=False),
        sa.Column("adapter_id", sa.String(256), nullable=False),
        sa.Column("adapter_version", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("minute_us", sa.BigInteger(), nullable=False),
        sa.Column("tokens_micros", sa.BigInteger(), nullable=False),
        sa.Column("amount_picos", sa.BigInteger(), nullable=False),
        sa.Column("committed_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_reward_entries_contributor", "reward_entries", ["contributor_id", "minute_us"])
    op.create_index("ix_reward_entries_adapter", "reward_entries", ["adapter_id", "minute_us"])
    op.create_index("ix_reward_entries_tenant", "reward_entries", ["tenant", "minute_us"])


def downgrade() -> None:
    op.drop_table("reward_entries")
    op.drop_table("prices")
    op.drop_table("provenance_contributors")
    op.drop_table("provenance")
    op.drop_table("usage_rollups")
    op.drop_table("usage_pending_batches")
    op.drop_table("usage_senders")
    op.drop_table("usage_events")
