"""Audit checkpoints: the last one written to each audit chain (one row per replica and
chain file), replaced by each new checkpoint, never on the request path."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from kmsgate.store import tables
from kmsgate.store.engine import Database

__all__ = ["AuditAnchor", "AuditAnchors"]


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A chain's last checkpoint as the store keeps it: the checkpoint record itself
    (`record_seq`, `record_hash`: the chain's head once it was written) and what it signed
    (`seq`, `hash`, `signed_at`, `final`, with `key_name` version `key_version`)."""

    replica: str
    chain: str
    record_seq: int
    record_hash: str
    seq: int
    hash: str
    signed_at: str
    final: bool
    key_name: str
    key_version: int


class AuditAnchors:
    """Writes and reads of `audit_checkpoints`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def save(self, anchor: AuditAnchor) -> None:
        """Replace the chain's stored checkpoint with `anchor`. Raises Unavailable."""
        t = tables.audit_checkpoints
        row = asdict(anchor)
        dialect = sqlite if self._db.engine.dialect.name == "sqlite" else postgresql
        upsert = dialect.insert(t).on_conflict_do_update(
            index_elements=[t.c.replica, t.c.chain],
            set_={k: v for k, v in row.items() if k not in ("replica", "chain")},
        )
        with self._db.transaction() as conn:
            conn.execute(upsert, [row])

    def find(self, replica: str, chain: str) -> AuditAnchor | None:
        """The stored checkpoint of `replica`'s chain file `chain`, if any. Raises
        Unavailable."""
        t = tables.audit_checkpoints
        select = sa.select(t).where(t.c.replica == replica, t.c.chain == chain)
        with self._db.transaction() as conn:
            row = conn.execute(select).mappings().one_or_none()
        return AuditAnchor(**row) if row is not None else None

    def all(self) -> list[AuditAnchor]:
        """Every chain's stored checkpoint, by replica and chain. Raises Unavailable."""
        t = tables.audit_checkpoints
        with self._db.transaction() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.replica, t.c.chain)).mappings().all()
        return [AuditAnchor(**row) for row in rows]
