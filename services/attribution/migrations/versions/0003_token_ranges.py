"""Usage events are token ranges: a row covers [token_index, token_index + token_count) of its kind.

One row per token cost more than the model on small models; workers now send one record per request
per flush. Existing rows each stand for one token, which the default of 1 says.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_events") as table:
        table.add_column(sa.Column("token_count", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    # A range cannot be one row per token again without making up rows: refuse rather than lose counts.
    bind = op.get_bind()
    ranges = bind.execute(sa.text("SELECT count(*) FROM usage_events WHERE token_count <> 1")).scalar_one()
    if ranges:
        raise RuntimeError(f"{ranges} usage rows cover more than one token; revision 0002 cannot hold them")
    with op.batch_alter_table("usage_events") as table:
        table.drop_column("token_count")
