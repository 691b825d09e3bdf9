"""Tokens remember who made them (`created_by`) and the token whose revocation ends them
(`parent`: the making token, unless the new one was made an orphan). Tokens made before
have neither: nothing is known of their makers.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add tokens.created_by and tokens.parent (indexed: a revocation looks up children)."""
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("created_by", sa.Text, nullable=True))
        batch.add_column(sa.Column("parent", sa.String(32), nullable=True))
    op.create_index("tokens_parent", "tokens", ["parent"])


def downgrade() -> None:
    """Drop tokens.parent and tokens.created_by."""
    op.drop_index("tokens_parent", "tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("parent")
        batch.drop_column("created_by")
