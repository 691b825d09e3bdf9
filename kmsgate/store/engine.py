"""The database under the store: the engine (SQLite in WAL mode, or PostgreSQL), migrations,
transactions that turn driver errors into Conflict or Unavailable, and the `meta` settings.
Also the row type and the datetime fix-up every aggregate's queries share."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
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


class Database:
    """One engine and its transactions. Raises Conflict on uniqueness violations and
    Unavailable when the database cannot be reached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        self._serial: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _enable_sqlite_wal)
            # SQLite has one writer at a time; threads that find it busy sleep in its busy
            # handler (1, 2, 5, ... 100 ms), which turns a queue of writers into seconds of
            # latency. They queue on this lock instead (other processes still use the handler).
            self._serial = threading.Lock()

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
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block exits normally, rolled back otherwise."""
        try:
            with self._serial, self.engine.begin() as conn:
                yield conn
        except sa.exc.IntegrityError as exc:
            raise Conflict("the change conflicts with existing state; retry") from exc
        except sa.exc.OperationalError as exc:
            raise Unavailable("metadata store unavailable") from exc

    def get_meta(self, key: str) -> str | None:
        with self.transaction() as conn:
            return conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == key)
            ).scalar_one_or_none()

    def init_meta(self, key: str, value: str) -> str:
        """Set `key` unless it exists; return the stored value (first writer wins)."""
        with contextlib.suppress(Conflict), self.transaction() as conn:
            conn.execute(sa.insert(tables.meta).values(key=key, value=value))
        stored = self.get_meta(key)
        assert stored is not None
        return stored
