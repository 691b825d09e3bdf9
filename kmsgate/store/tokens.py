"""The tokens aggregate: API token rows (secrets stored hashed only), each write recorded in
the "tokens" change feed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa

from kmsgate.errors import Unauthenticated
from kmsgate.store import tables
from kmsgate.store.engine import Database, Row
from kmsgate.store.feed import record_change

AGGREGATE = "tokens"
_WAVE = 500
"""Tokens per statement when a revocation walks down the tokens a token made."""


class Tokens:
    """Queries and writes of API tokens."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, token: Row) -> None:
        """Insert an API token row (its secret is already hashed), unless its `parent` was
        revoked meanwhile (the parent's row is locked first, so that a revocation under way
        either sees the new token or is seen by this check). Raises Conflict on a clash,
        Unauthenticated for a revoked parent."""
        c = tables.tokens.c
        with self._db.transaction() as conn:
            if token.get("parent") is not None:
                parent = sa.select(c.revoked_at).where(c.id == token["parent"]).with_for_update()
                row = conn.execute(parent).first()
                if row is None or row.revoked_at is not None:
                    raise Unauthenticated("missing, invalid, expired or revoked token")
            conn.execute(sa.insert(tables.tokens).values(**token))
            record_change(conn, AGGREGATE, token["id"])

    def revoke(self, token_id: str, when: datetime) -> list[str]:
        """Mark a live token revoked, with every live token it made, and those they made,
        and so on (each wave's rows locked before their children are read: a token made
        meanwhile by one of them is either found or refused, see `insert`). The ids
        revoked, `token_id` first; none if no live token has that id."""
        c = tables.tokens.c
        with self._db.transaction() as conn:
            if not self._revoke_live(conn, [token_id], when):
                return []
            revoked, wave = [token_id], [token_id]
            while wave:
                children = [
                    child
                    for chunk in _chunks(wave)
                    for child in conn.execute(sa.select(c.id).where(c.parent.in_(chunk))).scalars()
                ]
                revoked += self._revoke_live(conn, children, when)
                wave = children  # an already revoked child's own children are looked at too
            record_change(conn, AGGREGATE, *revoked)  # a few statements, however many
            return revoked

    @staticmethod
    def _revoke_live(conn: sa.Connection, ids: list[str], when: datetime) -> list[str]:
        """Mark the live tokens among `ids` revoked; their ids."""
        c = tables.tokens.c
        live = [
            token_id
            for chunk in _chunks(ids)
            for token_id in conn.execute(
                sa.select(c.id).where(c.id.in_(chunk), c.revoked_at.is_(None)).with_for_update()
            ).scalars()
        ]
        for chunk in _chunks(live):
            conn.execute(sa.update(tables.tokens).where(c.id.in_(chunk)).values(revoked_at=when))
        return live

    def delete_ended(self, ended_before: datetime, most: int) -> list[str]:
        """Delete at most `most` tokens that expired or were revoked before `ended_before`;
        their ids. Raises Unavailable."""
        c = tables.tokens.c
        ended = sa.or_(c.revoked_at < ended_before, c.expires_at < ended_before)
        with self._db.transaction() as conn:
            ids = list(conn.execute(sa.select(c.id).where(ended).limit(most)).scalars())
            for chunk in _chunks(ids):
                conn.execute(sa.delete(tables.tokens).where(c.id.in_(chunk)))
            if ids:
                record_change(conn, AGGREGATE, *ids)
            return ids

    def get_many(self, token_ids: list[str]) -> dict[str, Row]:
        """The rows of those of `token_ids` that exist, by id, in a statement per
        `_WAVE`. Raises Unavailable."""
        c = tables.tokens.c
        with self._db.transaction() as conn:
            return {
                row["id"]: dict(row)
                for chunk in _chunks(token_ids)
                for row in conn.execute(sa.select(tables.tokens).where(c.id.in_(chunk))).mappings()
            }

    def all(self) -> list[Row]:
        with self._db.transaction() as conn:
            return [dict(row) for row in conn.execute(sa.select(tables.tokens)).mappings()]


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    """`ids` in lists of at most `_WAVE`: one statement each (a database bounds its
    parameters)."""
    for start in range(0, len(ids), _WAVE):
        yield ids[start : start + _WAVE]
