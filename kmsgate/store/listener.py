"""Changes announced by the database, so that a process's caches follow another process's
change within milliseconds instead of at the next poll.

- PostgreSQL: every committed change to the store is announced on the `kmsgate_changes`
  channel (`record_change` adds a `pg_notify` to its transaction), and a process waits on a
  connection of its own that LISTENs.
- SQLite (one host: the workers of one gateway): a connection of its own reads
  `PRAGMA data_version` every `SQLITE_POLL_SECONDS`, which moves when another connection
  commits (a read of shared memory in WAL mode, microseconds). Any commit moves it (an
  inventory row too): the caller then asks each feed's counter whether its aggregate moved.

While neither can be used (an in-memory database, PostgreSQL out of reach), waiting falls
back to sleeping: the caches then poll."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from kmsgate.store.feed import CHANNEL
from kmsgate.store.stall import connection_defaults

if TYPE_CHECKING:
    from psycopg import Connection

log = logging.getLogger("kmsgate.store")

RECONNECT_SECONDS = 5.0
"""How long a listener whose connection broke waits before it connects again."""
SQLITE_POLL_SECONDS = 0.01
"""How often a listener on SQLite reads the database's data version."""


class ChangeListener:
    """Waits for the store's change announcements (PostgreSQL), or for time to pass."""

    def __init__(self, database_url: str, stop: threading.Event) -> None:
        url = sa.engine.make_url(database_url)
        self._conninfo = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if url.get_backend_name() == "postgresql"
            else None
        )
        sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
        self._sqlite = (
            _SqliteVersion(sqlite_file) if sqlite_file not in (None, "", ":memory:") else None
        )
        self._stop = stop
        self._conn: Connection[Any] | None = None
        self._retry_at = 0.0

    def wait(self, seconds: float) -> bool:
        """Block until a change is announced (True) or `seconds` pass or the stop event is
        set (False). Never raises."""
        if self._sqlite is not None:
            return self._sqlite.wait(seconds, self._stop)
        conn = self._connection()
        if conn is None:
            return self._stop.wait(seconds) and False
        try:
            announced = any(True for _ in conn.notifies(timeout=seconds, stop_after=1))
            if announced:  # take the rest of a burst in one go
                for _ in conn.notifies(timeout=0.0):
                    pass
            return announced
        except Exception as exc:  # a broken connection: poll until it comes back
            log.warning("change listener lost its connection: %s", type(exc).__name__)
            self.close()
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            return self._stop.wait(seconds) and False

    def _connection(self) -> Connection[Any] | None:
        if self._conninfo is None:
            return None
        if self._conn is None and time.monotonic() >= self._retry_at:
            try:
                import psycopg
                from psycopg.conninfo import conninfo_to_dict, make_conninfo

                given = conninfo_to_dict(self._conninfo)
                conninfo = make_conninfo(self._conninfo, **connection_defaults(given))
                conn = psycopg.connect(conninfo, autocommit=True)
                conn.execute(f"LISTEN {CHANNEL}")  # a constant: no quoting needed
                self._conn = conn
            except Exception as exc:
                log.warning("change listener cannot connect: %s", type(exc).__name__)
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
        return self._conn

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                conn.close()


class _SqliteVersion:
    """`PRAGMA data_version` of one SQLite file, read on a read-only connection of its own."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._retry_at = 0.0

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Block until another connection commits (True), or `seconds` pass or `stop` is
        set (False). Never raises: an unreadable database polls by time."""
        deadline = time.monotonic() + seconds
        while not stop.wait(min(SQLITE_POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            version = self._read()
            if version is not None and self._version is not None and version != self._version:
                self._version = version
                return True
            self._version = version if version is not None else self._version
            if time.monotonic() >= deadline:
                return False
        return False

    def _read(self) -> int | None:
        if time.monotonic() < self._retry_at:
            return None
        try:
            if self._conn is None:
                uri = f"file:{urllib.parse.quote(self._path)}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            row = self._conn.execute("PRAGMA data_version").fetchone()
            return int(row[0])
        except sqlite3.Error as exc:
            log.warning("change watcher cannot read the database: %s", type(exc).__name__)
            self.close()
            self._version = None  # a new connection's version is not comparable
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            return None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
