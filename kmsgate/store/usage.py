"""Key version usage: counts and last use, added in batches by each process's background
flush (upserts: `count = count + delta`, `last_used` the later of the two)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from kmsgate.store import tables
from kmsgate.store.engine import Database, utc

Uses = Mapping[tuple[str, int], tuple[int, datetime]]
"""(key name, version) -> (uses, last use)."""


class KeyUsageTable:
    """Writes and reads of `key_usage`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, uses: Uses) -> None:
        """Add `uses` to the stored counts in one transaction. Raises Unavailable."""
        if not uses:
            return
        t = tables.key_usage
        rows = [
            {"key_name": name, "version": version, "count": count, "last_used": at}
            for (name, version), (count, at) in uses.items()
        ]
        dialect = sqlite if self._db.engine.dialect.name == "sqlite" else postgresql
        insert = dialect.insert(t)
        upsert = insert.on_conflict_do_update(
            index_elements=[t.c.key_name, t.c.version],
            set_={
                "count": t.c.count + insert.excluded.count,
                "last_used": sa.case(
                    (insert.excluded.last_used > t.c.last_used, insert.excluded.last_used),
                    else_=t.c.last_used,
                ),
            },
        )
        with self._db.transaction() as conn:
            conn.execute(upsert, rows)

    def of_key(self, name: str) -> dict[int, tuple[int, datetime]]:
        """Version -> (uses, last use) of key `name`. Raises Unavailable."""
        t = tables.key_usage
        select = sa.select(t.c.version, t.c.count, t.c.last_used).where(t.c.key_name == name)
        with self._db.transaction() as conn:
            rows = conn.execute(select).mappings().all()
        return {int(r["version"]): (int(r["count"]), _aware(r["last_used"])) for r in rows}


def _aware(value: datetime) -> datetime:
    result = utc(value)
    assert result is not None
    return result
