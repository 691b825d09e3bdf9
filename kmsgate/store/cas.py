"""The certificate-authority aggregate: one row per CA (its key, certificate, chain, state
and CRL counter), each write recorded in the "cas" change feed."""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from kmsgate.errors import Conflict, NotFound
from kmsgate.store import tables
from kmsgate.store.engine import Database, Row
from kmsgate.store.feed import record_change

AGGREGATE = "cas"


class Cas:
    """Queries and writes of certificate authorities."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, ca: Row) -> None:
        """Insert a CA row. Raises Conflict if the name is taken, Unavailable."""
        with self._db.naming_transaction(f"a CA named {ca['name']!r} exists") as conn:
            conn.execute(sa.insert(tables.cas).values(**ca))
            record_change(conn, AGGREGATE, ca["name"])

    def update(
        self, name: str, values: Mapping[str, object], *, expected_state: str | None = None
    ) -> None:
        """Change a CA's columns. Raises NotFound, or Conflict if its state is no longer
        `expected_state` (another writer got there first)."""
        with self._db.transaction() as conn:
            query = sa.update(tables.cas).where(tables.cas.c.name == name)
            if expected_state is not None:
                query = query.where(tables.cas.c.state == expected_state)
            if conn.execute(query.values(**values)).rowcount != 1:
                exists = conn.execute(
                    sa.select(tables.cas.c.name).where(tables.cas.c.name == name)
                ).first()
                if exists is not None:
                    raise Conflict(f"CA {name!r} changed meanwhile; try again")
                raise NotFound(f"no CA named {name!r}")
            record_change(conn, AGGREGATE, name)

    def next_crl_number(self, name: str) -> int:
        """Take the CA's next CRL number (monotonic across processes). Raises NotFound."""
        with self._db.transaction() as conn:
            bumped = conn.execute(
                sa.update(tables.cas)
                .where(tables.cas.c.name == name)
                .values(crl_number=tables.cas.c.crl_number + 1)
            )
            if bumped.rowcount != 1:
                raise NotFound(f"no CA named {name!r}")
            number: int = conn.execute(
                sa.select(tables.cas.c.crl_number).where(tables.cas.c.name == name)
            ).scalar_one()
        return number

    def get(self, name: str) -> Row | None:
        """One CA row, or None. Raises Unavailable."""
        with self._db.transaction() as conn:
            row = conn.execute(sa.select(tables.cas).where(tables.cas.c.name == name))
            found = row.mappings().first()
        return dict(found) if found is not None else None

    def all(self) -> list[Row]:
        with self._db.transaction() as conn:
            return [dict(row) for row in conn.execute(sa.select(tables.cas)).mappings()]
