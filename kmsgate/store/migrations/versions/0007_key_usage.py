"""How often each key version was used and when last: counted in memory by every process
and added here in the background, never on the request path.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `key_usage`."""
    op.create_table(
        "key_usage",
        sa.Column("key_name", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop `key_usage`."""
    op.drop_table("key_usage")
