"""Key versions remember whether kmsgate adopted them (made elsewhere, never destroyed).

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
    """Add key_versions.adopted (false for every existing version)."""
    with op.batch_alter_table("key_versions") as batch:
        batch.add_column(
            sa.Column("adopted", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    """Drop key_versions.adopted."""
    with op.batch_alter_table("key_versions") as batch:
        batch.drop_column("adopted")
