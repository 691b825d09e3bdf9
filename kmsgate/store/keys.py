"""The keys aggregate: a `keys` row and its `key_versions`, written together, each write
recorded in the "keys" change feed."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from kmsgate.errors import Conflict
from kmsgate.store import tables
from kmsgate.store.engine import Database, Row
from kmsgate.store.feed import record_change

AGGREGATE = "keys"


class Keys:
    """Queries and writes of keys and their versions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, key: Row, versions: Sequence[Row]) -> None:
        """Insert a key and its first version(s) atomically. Raises Conflict if it exists."""
        with self._db.naming_transaction(f"a key named {key['name']!r} exists") as conn:
            conn.execute(sa.insert(tables.keys).values(**key))
            for version in versions:
                conn.execute(sa.insert(tables.key_versions).values(key_name=key["name"], **version))
            record_change(conn, AGGREGATE, key["name"])

    def add_version(
        self, name: str, version: Row, *, expected_primary: int, expected_state: str
    ) -> None:
        """Add a version and make it primary, if the primary is still `expected_primary`
        and the state still `expected_state`.

        Raises Conflict if another writer rotated first (the database enforces uniqueness),
        or disabled the key or scheduled its deletion meanwhile (a rotation that had begun
        must not give such a key a new version).
        """
        with self._db.transaction() as conn:
            conn.execute(sa.insert(tables.key_versions).values(key_name=name, **version))
            updated = conn.execute(
                sa.update(tables.keys)
                .where(tables.keys.c.name == name)
                .where(tables.keys.c.primary_version == expected_primary)
                .where(tables.keys.c.state == expected_state)
                .values(primary_version=version["version"], updated_at=version["created_at"])
            )
            if updated.rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            record_change(conn, AGGREGATE, name)

    def update(self, name: str, values: Row, *, expected: Row | None = None) -> None:
        """Update key columns, only while the columns of `expected` hold its values. Raises
        Conflict if not."""
        with self._db.transaction() as conn:
            stmt = sa.update(tables.keys).where(tables.keys.c.name == name)
            for column, value in (expected or {}).items():
                stmt = stmt.where(tables.keys.c[column] == value)
            if conn.execute(stmt.values(**values)).rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            record_change(conn, AGGREGATE, name)

    def update_version(self, name: str, version: int, values: Row, *, expected_state: str) -> None:
        """Update one version's columns while the key is in `expected_state` and the version
        is not destroyed (a write decided on an earlier reading never brings back what a
        destruction removed). Raises Conflict if not, or if the version does not exist."""
        versions, keys = tables.key_versions.c, tables.keys.c
        in_state = sa.exists().where(keys.name == name, keys.state == expected_state)
        with self._db.transaction() as conn:
            updated = conn.execute(
                sa.update(tables.key_versions)
                .where(versions.key_name == name, versions.version == version)
                .where(versions.destroyed_at.is_(None), in_state)
                .values(**values)
            )
            if updated.rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            record_change(conn, AGGREGATE, name)

    def get(self, name: str) -> tuple[Row, list[Row]] | None:
        """One key and its versions (ascending), or None. Raises Unavailable."""
        with self._db.transaction() as conn:
            key_row = (
                conn.execute(sa.select(tables.keys).where(tables.keys.c.name == name))
                .mappings()
                .first()
            )
            if key_row is None:
                return None
            version_rows = conn.execute(
                sa.select(tables.key_versions)
                .where(tables.key_versions.c.key_name == name)
                .order_by(tables.key_versions.c.version)
            ).mappings()
            return dict(key_row), [dict(row) for row in version_rows]

    def all(self) -> list[tuple[Row, list[Row]]]:
        """Every key with its versions (ascending), as plain row mappings."""
        with self._db.transaction() as conn:
            key_rows = conn.execute(sa.select(tables.keys)).mappings().all()
            version_rows = (
                conn.execute(
                    sa.select(tables.key_versions).order_by(
                        tables.key_versions.c.key_name, tables.key_versions.c.version
                    )
                )
                .mappings()
                .all()
            )
        by_key: dict[str, list[Row]] = {row["name"]: [] for row in key_rows}
        for row in version_rows:
            by_key[row["key_name"]].append(dict(row))
        return [(dict(row), by_key[row["name"]]) for row in key_rows]
