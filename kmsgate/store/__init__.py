"""The metadata store: SQLAlchemy Core over SQLite (WAL, the default) or PostgreSQL.

Only the control plane touches it (create, rotate, lifecycle, tokens), the cache refresher and
the rare cache miss; the hot path (sign, verify, mac) reads in-memory caches. Every write is
one transaction that also appends to its aggregate's change feed; caches follow the feed of
their own aggregate and reload only the items that moved.

- `engine`: the engine, migrations, transactions (Conflict, Unavailable) and `meta` settings
- `feed`: the per-aggregate change feed (counters in `meta`, items in `changes`)
- `keys`, `tokens`: one module per aggregate, its queries and writes
- `store`: `Store`, the engine with one object per aggregate (`store.keys`, `store.tokens`,
  `store.feed`)
- `mirror`: `StoreMirror`, the in-memory copy of an aggregate that follows its feed
- `tables`: the schema; `migrations`: the Alembic revisions that build it
"""

from kmsgate.store import tables
from kmsgate.store.engine import Row, sqlite_file, utc
from kmsgate.store.mirror import READ_THROUGH_PER_SECOND, StoreMirror
from kmsgate.store.store import Store

__all__ = [
    "READ_THROUGH_PER_SECOND",
    "Row",
    "Store",
    "StoreMirror",
    "sqlite_file",
    "tables",
    "utc",
]
