"""Certificates' SAN values in a table of their own, indexed, reversed (`certificate_names`):
a search of the inventory by a SAN reads the index, not every certificate. Existing
certificates' names are written from their `sans`.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from kmsgate.store.sans import san_names

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    """Create certificate_names and fill it from every certificate's SANs."""
    names = op.create_table(
        "certificate_names",
        sa.Column("serial", sa.String(40), sa.ForeignKey("certificates.serial"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("serial", "name"),
    )
    op.create_index("certificate_names_name", "certificate_names", ["name"])
    certificates = sa.table("certificates", sa.column("serial"), sa.column("sans", sa.JSON))
    conn = op.get_bind()
    rows = conn.execute(sa.select(certificates.c.serial, certificates.c.sans)).all()
    for start in range(0, len(rows), _BATCH):
        values = [
            {"serial": serial, "name": name}
            for serial, sans in rows[start : start + _BATCH]
            for name in san_names(sans)
        ]
        if values:
            conn.execute(sa.insert(names), values)


def downgrade() -> None:
    """Drop certificate_names."""
    op.drop_index("certificate_names_name", "certificate_names")
    op.drop_table("certificate_names")
