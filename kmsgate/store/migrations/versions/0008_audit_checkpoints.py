"""The last signed checkpoint of every audit chain, kept apart from the log so that
`kmsgate audit verify` can tell a truncated or rewritten chain file.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `audit_checkpoints`."""
    op.create_table(
        "audit_checkpoints",
        sa.Column("replica", sa.String(64), primary_key=True),
        sa.Column("chain", sa.String(128), primary_key=True),
        sa.Column("record_seq", sa.BigInteger, nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("signed_at", sa.String(32), nullable=False),
        sa.Column("final", sa.Boolean, nullable=False),
        sa.Column("key_name", sa.String(128), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    """Drop `audit_checkpoints`."""
    op.drop_table("audit_checkpoints")
