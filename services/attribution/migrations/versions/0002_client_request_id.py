"""Usage events keep the client's request id as a label; `request_id` becomes the worker's unique id.

Clients choose request ids and may reuse them, so keying the ledger by them billed a reused id once.
Workers now send an id of their own, unique per served request, as `request_id`, and the client's id
as `client_request_id`. Rows written before this revision were keyed by the client's id, so that is
what their label is backfilled with: lookups by client id find old and new rows alike.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_events") as table:
        table.add_column(sa.Column("client_request_id", sa.String(128), nullable=False, server_default=""))
    op.execute("UPDATE usage_events SET client_request_id = request_id")
    op.create_index("ix_usage_events_client_request", "usage_events", ["client_request_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_events_client_request", table_name="usage_events")
    with op.batch_alter_table("usage_events") as table:
        table.drop_column("client_request_id")
