"""The metadata store: SQLAlchemy Core over SQLite (WAL, the default) or PostgreSQL.

Only the control plane touches it (create, rotate, lifecycle, tokens), the cache refresher and
the rare cache miss; the hot path (sign, verify, mac) reads in-memory caches. Every write is
one transaction that also appends to its aggregate's change feed: a per-aggregate counter
(`meta` row `epoch:<aggregate>`, bumped under the row's lock, so its values follow commit
order) and a `changes` row naming the item. Caches follow the feed of their own aggregate
and reload only the items that moved.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection, Engine

from kmsgate.errors import ConfigError, Conflict, Unavailable
from kmsgate.store import tables

Row = Mapping[str, Any]

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utc(value: datetime | None) -> datetime | None:
    """`value` as an aware UTC datetime (SQLite hands back naive ones)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enable_sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    """Transactions over the kmsgate tables. Raises Conflict on uniqueness violations and
    Unavailable when the database cannot be reached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _enable_sqlite_wal)

    def migrate(self) -> None:
        """Bring the schema to the latest revision. Raises ConfigError on failure."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(f"database migration failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.IntegrityError as exc:
            raise Conflict("the change conflicts with existing state; retry") from exc
        except sa.exc.OperationalError as exc:
            raise Unavailable("metadata store unavailable") from exc

    # -- the change feed --------------------------------------------------------------------

    @staticmethod
    def _record_change(conn: Connection, aggregate: str, item: str) -> None:
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

    def epoch(self, aggregate: str) -> int:
        """How many committed changes `aggregate` has had. Raises Unavailable."""
        with self._tx() as conn:
            value = conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == f"epoch:{aggregate}")
            ).scalar_one_or_none()
        return int(value or 0)

    def changes_since(self, aggregate: str, epoch: int) -> list[tuple[int, str]]:
        """(epoch, item) of `aggregate`'s changes after `epoch`, oldest first; the first one
        is not `epoch + 1` when older changes were pruned. Raises Unavailable."""
        c = tables.changes.c
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(c.epoch, c.item)
                .where(c.aggregate == aggregate)
                .where(c.epoch > epoch)
                .order_by(c.epoch)
            ).all()
        return [(int(row.epoch), str(row.item)) for row in rows]

    def prune_changes(self, before: datetime) -> int:
        """Forget feed entries older than `before` (caches further behind reload fully).
        Returns how many were removed. Raises Unavailable."""
        with self._tx() as conn:
            removed = conn.execute(sa.delete(tables.changes).where(tables.changes.c.at < before))
        return int(removed.rowcount)

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._tx() as conn:
            return conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == key)
            ).scalar_one_or_none()

    def init_meta(self, key: str, value: str) -> str:
        """Set `key` unless it exists; return the stored value (first writer wins)."""
        with contextlib.suppress(Conflict), self._tx() as conn:
            conn.execute(sa.insert(tables.meta).values(key=key, value=value))
        stored = self.get_meta(key)
        assert stored is not None
        return stored

    # -- keys ------------------------------------------------------------------------------

    def insert_key(self, key: Row, versions: Sequence[Row]) -> None:
        """Insert a key and its first version(s) atomically. Raises Conflict if it exists."""
        with self._tx() as conn:
            conn.execute(sa.insert(tables.keys).values(**key))
            for version in versions:
                conn.execute(sa.insert(tables.key_versions).values(key_name=key["name"], **version))
            self._record_change(conn, "keys", key["name"])

    def add_version(self, name: str, version: Row, *, expected_primary: int) -> None:
        """Add a version and make it primary, if the primary is still `expected_primary`.

        Raises Conflict if another writer rotated first (the database enforces uniqueness).
        """
        with self._tx() as conn:
            conn.execute(sa.insert(tables.key_versions).values(key_name=name, **version))
            updated = conn.execute(
                sa.update(tables.keys)
                .where(tables.keys.c.name == name)
                .where(tables.keys.c.primary_version == expected_primary)
                .values(primary_version=version["version"], updated_at=version["created_at"])
            )
            if updated.rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            self._record_change(conn, "keys", name)

    def update_key(self, name: str, values: Row, *, expected_state: str | None = None) -> None:
        """Update key columns, optionally only from `expected_state`. Raises Conflict if not."""
        with self._tx() as conn:
            stmt = sa.update(tables.keys).where(tables.keys.c.name == name)
            if expected_state is not None:
                stmt = stmt.where(tables.keys.c.state == expected_state)
            if conn.execute(stmt.values(**values)).rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            self._record_change(conn, "keys", name)

    def update_version(self, name: str, version: int, values: Row) -> None:
        """Update one version's columns. Raises Conflict if the version does not exist."""
        with self._tx() as conn:
            updated = conn.execute(
                sa.update(tables.key_versions)
                .where(tables.key_versions.c.key_name == name)
                .where(tables.key_versions.c.version == version)
                .values(**values)
            )
            if updated.rowcount != 1:
                raise Conflict(f"version {version} of {name!r} does not exist")
            self._record_change(conn, "keys", name)

    def load_key(self, name: str) -> tuple[Row, list[Row]] | None:
        """One key and its versions (ascending), or None. Raises Unavailable."""
        with self._tx() as conn:
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

    def load_keys(self) -> list[tuple[Row, list[Row]]]:
        """Every key with its versions (ascending), as plain row mappings."""
        with self._tx() as conn:
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

    # -- tokens ----------------------------------------------------------------------------

    def insert_token(self, token: Row) -> None:
        """Insert an API token row (its secret is already hashed). Raises Conflict on a clash."""
        with self._tx() as conn:
            conn.execute(sa.insert(tables.tokens).values(**token))
            self._record_change(conn, "tokens", token["id"])

    def revoke_token(self, token_id: str, when: datetime) -> bool:
        """Mark a token revoked; False if no live token has that id."""
        with self._tx() as conn:
            updated = conn.execute(
                sa.update(tables.tokens)
                .where(tables.tokens.c.id == token_id)
                .where(tables.tokens.c.revoked_at.is_(None))
                .values(revoked_at=when)
            )
            if updated.rowcount == 1:
                self._record_change(conn, "tokens", token_id)
            return updated.rowcount == 1

    def load_token(self, token_id: str) -> Row | None:
        """One token row, or None. Raises Unavailable."""
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(tables.tokens).where(tables.tokens.c.id == token_id))
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    def load_tokens(self) -> list[Row]:
        with self._tx() as conn:
            return [dict(row) for row in conn.execute(sa.select(tables.tokens)).mappings()]


READ_THROUGH_PER_SECOND = 200.0
"""Cache misses a process reads through to the store per second (burst the same); beyond
that a miss answers "unknown" without a query, so unknown names cannot load the database."""


class _MissBudget:
    """A token bucket of read-throughs: `take()` is False once the budget is spent."""

    def __init__(self, per_second: float) -> None:
        self._rate = per_second
        self._tokens = per_second
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class StoreMirror(ABC):
    """An in-memory copy of one aggregate of the store, following its change feed.

    Readers use the copy and never wait on the database, except on a miss, which a subclass
    reads through (`_read_through`, within `READ_THROUGH_PER_SECOND`). `refresh` (called by
    a background thread every `cache_refresh_seconds`) reloads only the items that changed
    since the copy's epoch, and the whole aggregate only when the feed no longer reaches back
    that far. `full_reloads` and `item_reloads` count the work done (for /metrics).
    """

    aggregate: ClassVar[str]

    def __init__(
        self, store: Store, *, read_through_per_second: float = READ_THROUGH_PER_SECOND
    ) -> None:
        self._store = store
        self._epoch = -1
        self._lock = threading.RLock()
        self._misses = _MissBudget(read_through_per_second)
        self.full_reloads = 0
        self.item_reloads = 0
        self.reload()

    @abstractmethod
    def _load(self) -> None:
        """Replace the copy with the store's content. Raises Unavailable."""

    @abstractmethod
    def _load_item(self, item: str) -> None:
        """Replace (or drop) one item of the copy from the store. Raises Unavailable."""

    def _read_through(self, item: str) -> bool:
        """Load `item`, which the copy does not hold, from the store, unless the miss budget
        is spent. Returns whether the store was asked. Raises Unavailable."""
        if not self._misses.take():
            return False
        with self._lock:  # the store's state is at least as new as any cached write
            self._load_item(item)
        return True

    def reload(self) -> None:
        """Reload the whole aggregate now. Raises Unavailable if the store is down."""
        with self._lock:
            epoch = self._store.epoch(self.aggregate)
            self._load()
            self._epoch = epoch
            self.full_reloads += 1

    def refresh(self) -> None:
        """Apply the changes committed since the copy's epoch. Raises Unavailable."""
        if self._store.epoch(self.aggregate) == self._epoch:
            return
        with self._lock:
            changes = self._store.changes_since(self.aggregate, self._epoch)
            if not changes or changes[0][0] != self._epoch + 1:  # pruned past our epoch
                self.reload()
                return
            items = list(dict.fromkeys(item for _, item in changes))
            for item in items:
                self._load_item(item)
            self.item_reloads += len(items)
            self._epoch = changes[-1][0]
