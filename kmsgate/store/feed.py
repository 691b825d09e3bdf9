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

_KEY = tables.meta.c.key == sa.bindparam("counter")
_BUMP = (
    sa.update(tables.meta)
    .where(_KEY)
    .values(
        value=sa.cast(
            sa.cast(tables.meta.c.value, sa.BigInteger) + sa.bindparam("by", type_=sa.BigInteger),
            sa.Text,
        )
    )
    .returning(tables.meta.c.value)
)
_START = tables.meta.insert()
CHANNEL = "kmsgate_changes"
"""The PostgreSQL notification channel every committed change is announced on."""
_NOTIFY = sa.text("SELECT pg_notify(:channel, :aggregate)")
_CHANGE = tables.changes.insert()
# built once: composing a statement per call costs more than running it on SQLite


def record_change(conn: Connection, aggregate: str, *items: str) -> None:
    """Bump `aggregate`'s counter once per item and record that each of `items` changed
    (in order), in the caller's transaction (the counter row stays locked until it
    commits)."""
    counter, count = f"epoch:{aggregate}", len(items)
    # one statement bumps and reads the counter (SQLite >= 3.35 and PostgreSQL: RETURNING)
    bumped = conn.execute(_BUMP, {"counter": counter, "by": count}).scalar_one_or_none()
    if bumped is None:
        conn.execute(_START, {"key": counter, "value": str(count)})
    last = count if bumped is None else int(bumped)
    at = datetime.now(UTC)
    conn.execute(
        _CHANGE,
        [
            {"aggregate": aggregate, "epoch": last - count + n, "item": item, "at": at}
            for n, item in enumerate(items, start=1)
        ],
    )
    if conn.dialect.name == "postgresql":  # delivered to the listeners when this commits
        conn.execute(_NOTIFY, {"channel": CHANNEL, "aggregate": aggregate})


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

    def epoch_now(self, aggregate: str) -> int:
        """`epoch`, read on the store's reader connection: cheap enough for a request to
        ask whether a cached copy is still current. Raises Unavailable."""
        return int(self._db.read_meta_now(f"epoch:{aggregate}") or 0)

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

    def announce(self, aggregate: str, item: str) -> None:
        """Record a change that lives outside the store (a policy reload) so that the
        processes following `aggregate` see it. Raises Unavailable."""
        with self._db.transaction() as conn:
            record_change(conn, aggregate, item)

    def prune(self, before: datetime) -> int:
        """Forget feed entries older than `before` (caches further behind reload fully).
        Returns how many were removed. Raises Unavailable."""
        with self._db.transaction() as conn:
            removed = conn.execute(sa.delete(tables.changes).where(tables.changes.c.at < before))
        return int(removed.rowcount)
