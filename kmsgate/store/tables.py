"""SQLAlchemy Core table definitions: the schema the Alembic migrations build."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("purpose", sa.String(64), nullable=False),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("primary_version", sa.Integer, nullable=False),
    sa.Column("min_decrypt_version", sa.Integer, nullable=False),
    sa.Column("rotation_period_s", sa.Integer, nullable=True),
    sa.Column("deletion_date", sa.DateTime(timezone=True), nullable=True),
    sa.Column("verify_only", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("public", sa.Boolean, nullable=False, server_default=sa.false()),
)

key_versions = sa.Table(
    "key_versions",
    metadata,
    sa.Column(
        "key_name",
        sa.String(128),
        sa.ForeignKey("keys.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("backend_ref", sa.String(512), nullable=False),
    sa.Column("material", sa.LargeBinary, nullable=True),
    sa.Column("public_key", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("compromised_since", sa.DateTime(timezone=True), nullable=True),
    sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("adopted", sa.Boolean, nullable=False, server_default=sa.false()),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("description", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_by", sa.Text, nullable=True),
    sa.Column("parent", sa.String(32), nullable=True),
    sa.Index("tokens_parent", "parent"),
)

cas = sa.Table(
    "cas",
    metadata,
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

certificates = sa.Table(
    "certificates",
    metadata,
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
    sa.Index("certificates_ca_status", "ca", "status"),
    sa.Index("certificates_not_after", "not_after"),
    sa.Index("certificates_owner", "owner"),
)

certificate_names = sa.Table(
    "certificate_names",
    metadata,
    sa.Column("serial", sa.String(40), sa.ForeignKey("certificates.serial"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("serial", "name"),
    sa.Index("certificate_names_name", "name"),
)
"""Each SAN value of each certificate, reversed (`store.certificates.san_name`): a search
by name or by a domain's suffix is an index range, not a scan of the inventory."""

grants = sa.Table(
    "grants",
    metadata,
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
    sa.Index("grants_principal", "principal"),
    sa.Index("grants_ended_at", "ended_at"),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

changes = sa.Table(
    "changes",
    metadata,
    sa.Column("aggregate", sa.String(32), primary_key=True),
    sa.Column("epoch", sa.BigInteger, primary_key=True),
    sa.Column("item", sa.String(128), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

key_usage = sa.Table(
    "key_usage",
    metadata,
    sa.Column("key_name", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
)

audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
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
