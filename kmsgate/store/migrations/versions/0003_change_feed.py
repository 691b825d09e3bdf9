"""A change feed per aggregate: caches reload only the aggregate, and the items, that moved.

Each aggregate (keys, tokens) has its own counter in `meta` (`epoch:<aggregate>`), bumped in
the writing transaction; `changes` records which item each epoch changed. The single global
`epoch` row is dropped.

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

AGGREGATES = ("keys", "tokens")


def upgrade() -> None:
    """Create `changes`, start each aggregate's counter at 0, drop the global epoch."""
    op.create_table(
        "changes",
        sa.Column("aggregate", sa.String(32), primary_key=True),
        sa.Column("epoch", sa.BigInteger, primary_key=True),
        sa.Column("item", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.bulk_insert(meta, [{"key": f"epoch:{name}", "value": "0"} for name in AGGREGATES])
    op.execute(meta.delete().where(meta.c.key == "epoch"))


def downgrade() -> None:
    """Drop `changes` and the per-aggregate counters (the global epoch restarts at 0)."""
    op.drop_table("changes")
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(meta.delete().where(meta.c.key.in_([f"epoch:{n}" for n in AGGREGATES])))
