"""The metadata store: SQLAlchemy Core over SQLite (WAL, the default) or PostgreSQL.

Only the control plane touches it (create, rotate, lifecycle, tokens) and the cache refresher;
the hot path (sign, verify, mac) reads in-memory caches. Every write is one transaction and
bumps the `epoch` counter, which other replicas poll to invalidate their caches.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

    @staticmethod
    def _bump_epoch(conn: Connection) -> None:
        updated = conn.execute(
            sa.update(tables.meta)
            .where(tables.meta.c.key == "epoch")
            .values(value=sa.cast(sa.cast(tables.meta.c.value, sa.Integer) + 1, sa.Text))
        )
        if updated.rowcount == 0:
            conn.execute(sa.insert(tables.meta).values(key="epoch", value="1"))

    def epoch(self) -> int:
        """The change counter: it grows with every committed catalogue or token change."""
        with self._tx() as conn:
            value = conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == "epoch")
            ).scalar_one_or_none()
        return int(value or 0)

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
            self._bump_epoch(conn)

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
            self._bump_epoch(conn)

    def update_key(self, name: str, values: Row, *, expected_state: str | None = None) -> None:
        """Update key columns, optionally only from `expected_state`. Raises Conflict if not."""
        with self._tx() as conn:
            stmt = sa.update(tables.keys).where(tables.keys.c.name == name)
            if expected_state is not None:
                stmt = stmt.where(tables.keys.c.state == expected_state)
            if conn.execute(stmt.values(**values)).rowcount != 1:
                raise Conflict("the key changed concurrently; retry")
            self._bump_epoch(conn)

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
            self._bump_epoch(conn)

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
            self._bump_epoch(conn)

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
                self._bump_epoch(conn)
            return updated.rowcount == 1

    def load_tokens(self) -> list[Row]:
        with self._tx() as conn:
            return [dict(row) for row in conn.execute(sa.select(tables.tokens)).mappings()]


class StoreMirror(ABC):
    """An in-memory copy of part of the store, reloaded when the store's epoch moves.

    Readers use the copy and never wait on the database; `maybe_refresh` (called by a
    background thread) checks the epoch at most every `refresh_seconds`.
    """

    def __init__(self, store: Store, *, refresh_seconds: float = 1.0) -> None:
        self._store = store
        self._refresh_seconds = refresh_seconds
        self._epoch = -1
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self.reload()

    @abstractmethod
    def _load(self) -> None:
        """Replace the copy with the store's content. Raises Unavailable."""

    def reload(self) -> None:
        """Reload now. Raises Unavailable if the store is down."""
        with self._lock:
            epoch = self._store.epoch()
            self._load()
            self._epoch = epoch
            self._checked_at = time.monotonic()

    def maybe_refresh(self) -> None:
        """Reload if the store's epoch moved; checks at most every `refresh_seconds`."""
        if time.monotonic() - self._checked_at < self._refresh_seconds:
            return
        self._checked_at = time.monotonic()
        if self._store.epoch() != self._epoch:
            self.reload()
