"""Keys say whether their public keys are served without a token: existing `model-sign`
keys are (their verifiers relied on it), every other key is not.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add keys.public; true for the `model-sign` keys."""
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("public", sa.Boolean, nullable=False, server_default=sa.false()))
    keys = sa.table("keys", sa.column("purpose", sa.String), sa.column("public", sa.Boolean))
    op.execute(keys.update().where(keys.c.purpose == "model-sign").values(public=True))


def downgrade() -> None:
    """Drop keys.public."""
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("public")
