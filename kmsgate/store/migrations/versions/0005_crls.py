"""Published revocation documents: each CA's full CRL, delta CRL and OCSP responder
certificate (DER), so that every worker and replica serves what the one builder published.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

AGGREGATE = "crls"


def upgrade() -> None:
    """Create `crls` and start its change-feed counter at 0."""
    op.create_table(
        "crls",
        sa.Column("ca", sa.String(128), sa.ForeignKey("cas.name"), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("number", sa.BigInteger, nullable=True),
        sa.Column("base_number", sa.BigInteger, nullable=True),
        sa.Column("entries", sa.Integer, nullable=False),
        sa.Column("this_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("der", sa.LargeBinary, nullable=False),
    )
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.bulk_insert(meta, [{"key": f"epoch:{AGGREGATE}", "value": "0"}])


def downgrade() -> None:
    """Drop `crls` and its counter."""
    op.drop_table("crls")
    meta = sa.table("meta", sa.column("key", sa.String))
    op.execute(meta.delete().where(meta.c.key == f"epoch:{AGGREGATE}"))
