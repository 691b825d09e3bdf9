"""The tokens aggregate: API token rows (secrets stored hashed only), each write recorded in
the "tokens" change feed."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from kmsgate.store import tables
from kmsgate.store.engine import Database, Row
from kmsgate.store.feed import record_change

AGGREGATE = "tokens"


class Tokens:
    """Queries and writes of API tokens."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, token: Row) -> None:
        """Insert an API token row (its secret is already hashed). Raises Conflict on a clash."""
        with self._db.transaction() as conn:
            conn.execute(sa.insert(tables.tokens).values(**token))
            record_change(conn, AGGREGATE, token["id"])

    def revoke(self, token_id: str, when: datetime) -> bool:
        """Mark a token revoked; False if no live token has that id."""
        with self._db.transaction() as conn:
            updated = conn.execute(
                sa.update(tables.tokens)
                .where(tables.tokens.c.id == token_id)
                .where(tables.tokens.c.revoked_at.is_(None))
                .values(revoked_at=when)
            )
            if updated.rowcount == 1:
                record_change(conn, AGGREGATE, token_id)
            return updated.rowcount == 1

    def get(self, token_id: str) -> Row | None:
        """One token row, or None. Raises Unavailable."""
        with self._db.transaction() as conn:
            row = (
                conn.execute(sa.select(tables.tokens).where(tables.tokens.c.id == token_id))
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    def all(self) -> list[Row]:
        with self._db.transaction() as conn:
            return [dict(row) for row in conn.execute(sa.select(tables.tokens)).mappings()]
