"""The PKI: certificate authorities and the inventory of issued certificates.

A certificate's serial is its primary key, so a serial is reserved by the same insert that
records the certificate. Both aggregates get a change-feed counter.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

AGGREGATES = ("cas", "certs")


def upgrade() -> None:
    """Create `cas` and `certificates` and start their change-feed counters at 0."""
    op.create_table(
        "cas",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("type", sa.String(24), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("key_name", sa.String(128), nullable=True),
        sa.Column("backend", sa.String(64), nullable=True),
        sa.Column("options", sa.JSON, nullable=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("csr", sa.Text, nullable=True),
        sa.Column("certificate", sa.Text, nullable=True),
        sa.Column("chain", sa.Text, nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("crl_number", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("ca", sa.String(128), sa.ForeignKey("cas.name"), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("sans", sa.JSON, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("key_type", sa.String(32), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("certificate", sa.Text, nullable=False),
    )
    op.create_index("certificates_ca_status", "certificates", ["ca", "status"])
    op.create_index("certificates_not_after", "certificates", ["not_after"])
    op.create_index("certificates_owner", "certificates", ["owner"])
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.bulk_insert(meta, [{"key": f"epoch:{name}", "value": "0"} for name in AGGREGATES])


def downgrade() -> None:
    """Drop the PKI tables and their counters."""
    op.drop_table("certificates")
    op.drop_table("cas")
    meta = sa.table("meta", sa.column("key", sa.String))
    op.execute(meta.delete().where(meta.c.key.in_([f"epoch:{n}" for n in AGGREGATES])))
