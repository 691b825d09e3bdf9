"""The change feed: one per aggregate (keys, tokens, ...). A write records its change in its
own transaction (`record_change`): the aggregate's counter, the `meta` row
`epoch:<aggregate>`, is bumped under the row's lock, so its values follow commit order, and a
`changes` row names the item. `Feed` reads the counters and changes back, and prunes old ones.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kmsgate.store import tables
from kmsgate.store.engine import Database


def record_change(conn: Connection, aggregate: str, item: str) -> None:
    """Bump `aggregate`'s counter and record that `item` changed, in the caller's
    transaction (the counter row stays locked until it commits)."""
    counter = tables.meta.c.key == f"epoch:{aggregate}"
    bumped = sa.cast(sa.cast(tables.meta.c.value, sa.BigInteger) + 1, sa.Text)
    if conn.execute(sa.update(tables.meta).where(counter).values(value=bumped)).rowcount == 0:
        conn.execute(sa.insert(tables.meta).values(key=f"epoch:{aggregate}", value="1"))
    epoch = int(conn.execute(sa.select(tables.meta.c.value).where(counter)).scalar_one())
    conn.execute(
        sa.insert(tables.changes).values(
            aggregate=aggregate, epoch=epoch, item=item, at=datetime.now(UTC)
        )
    )


class Feed:
    """The read side of every aggregate's change feed."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def epoch(self, aggregate: str) -> int:
        """How many committed changes `aggregate` has had. Raises Unavailable."""
        with self._db.transaction() as conn:
            value = conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == f"epoch:{aggregate}")
            ).scalar_one_or_none()
        return int(value or 0)

    def changes_since(self, aggregate: str, epoch: int) -> list[tuple[int, str]]:
        """(epoch, item) of `aggregate`'s changes after `epoch`, oldest first; the first one
        is not `epoch + 1` when older changes were pruned. Raises Unavailable."""
        c = tables.changes.c
        with self._db.transaction() as conn:
            rows = conn.execute(
                sa.select(c.epoch, c.item)
                .where(c.aggregate == aggregate)
                .where(c.epoch > epoch)
                .order_by(c.epoch)
            ).all()
        return [(int(row.epoch), str(row.item)) for row in rows]

    def prune(self, before: datetime) -> int:
        """Forget feed entries older than `before` (caches further behind reload fully).
        Returns how many were removed. Raises Unavailable."""
        with self._db.transaction() as conn:
            removed = conn.execute(sa.delete(tables.changes).where(tables.changes.c.at < before))
        return int(removed.rowcount)
