"""The grants aggregate: JIT exceptions (requested, approved, expired or revoked), each write
recorded in the "grants" change feed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from kmsgate.store import tables
from kmsgate.store.engine import Database, Row, hold_transaction_lock, utc
from kmsgate.store.feed import record_change

AGGREGATE = "grants"
_DATES = ("requested_at", "pending_until", "approved_at", "expires_at", "revoked_at", "ended_at")


def _row(row: sa.RowMapping) -> Row:
    values = dict(row)
    for name in _DATES:
        values[name] = utc(values[name])
    return values


class Grants:
    """Queries and writes of grants."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, grant: Row, *, open_limit: int) -> int | None:
        """Insert a requested grant unless its principal already holds `open_limit` grants
        not ended: None once inserted, else how many it holds. The count and the insert are
        one transaction, serialised per principal (SQLite's writer lock, a PostgreSQL
        advisory lock), so concurrent asks cannot pass the limit. Raises ConcurrentChange
        on an id clash, Unavailable."""
        c = tables.grants.c
        with self._db.transaction() as conn:
            hold_transaction_lock(conn, _principal_lock(str(grant["principal"])))
            count = sa.select(sa.func.count()).where(
                c.principal == grant["principal"], c.ended_at.is_(None)
            )
            held: int = conn.execute(count).scalar_one()
            if held >= open_limit:
                return held
            conn.execute(sa.insert(tables.grants).values(**grant))
            record_change(conn, AGGREGATE, grant["id"])
        return None

    def get(self, grant_id: str) -> Row | None:
        """One grant, or None. Raises Unavailable."""
        with self._db.transaction() as conn:
            row = (
                conn.execute(sa.select(tables.grants).where(tables.grants.c.id == grant_id))
                .mappings()
                .first()
            )
        return _row(row) if row is not None else None

    def query(self, *, principal: str | None = None, open_only: bool = False) -> list[Row]:
        """Grants, oldest first: of `principal` only, and only those not ended (pending or
        active) with `open_only`. Raises Unavailable."""
        c = tables.grants.c
        select = sa.select(tables.grants).order_by(c.requested_at, c.id)
        if principal is not None:
            select = select.where(c.principal == principal)
        if open_only:
            select = select.where(c.ended_at.is_(None))
        with self._db.transaction() as conn:
            return [_row(r) for r in conn.execute(select).mappings()]

    def change(self, grant_id: str, decide: Callable[[Row], Mapping[str, Any]]) -> Row | None:
        """Read the grant and write the values `decide(row)` returns, in one transaction
        (no other change to it in between); None if there is no such grant. `decide` raises
        to change nothing. Raises what `decide` raises, Conflict, Unavailable."""
        grants = tables.grants
        with self._db.transaction() as conn:
            select = sa.select(grants).where(grants.c.id == grant_id).with_for_update()
            found = conn.execute(select).mappings().first()
            if found is None:
                return None
            row = _row(found)
            values = dict(decide(row))
            conn.execute(sa.update(grants).where(grants.c.id == grant_id).values(**values))
            record_change(conn, AGGREGATE, grant_id)
        return {**row, **values}


def _principal_lock(principal: str) -> int:
    """A PostgreSQL advisory lock id for `principal`'s grants (a signed 64-bit integer)."""
    digest = hashlib.sha256(f"kmsgate grants {principal}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
