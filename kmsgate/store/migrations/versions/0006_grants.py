"""JIT exceptions: grants a principal requests and another approves, time-limited.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

AGGREGATE = "grants"


def upgrade() -> None:
    """Create `grants` and start its change-feed counter at 0."""
    op.create_table(
        "grants",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("principal", sa.String(256), nullable=False),
        sa.Column("actions", sa.JSON, nullable=False),
        sa.Column("resource", sa.String(160), nullable=False),
        sa.Column("duration_s", sa.Integer, nullable=False),
        sa.Column("ticket", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approvals", sa.JSON, nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(256), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("grants_principal", "grants", ["principal"])
    op.create_index("grants_ended_at", "grants", ["ended_at"])
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.bulk_insert(meta, [{"key": f"epoch:{AGGREGATE}", "value": "0"}])


def downgrade() -> None:
    """Drop `grants` and its counter."""
    op.drop_table("grants")
    meta = sa.table("meta", sa.column("key", sa.String))
    op.execute(meta.delete().where(meta.c.key == f"epoch:{AGGREGATE}"))
