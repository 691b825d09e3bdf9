"""Changes pushed by PostgreSQL: every committed change to the store is announced on the
`kmsgate_changes` channel (`record_change` adds a `pg_notify` to its transaction), and a
process waits on a connection of its own that LISTENs, so its caches follow another
replica's change within milliseconds instead of at the next poll. On SQLite, or while
PostgreSQL cannot be reached, waiting falls back to sleeping (the caches then poll)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from kmsgate.store.feed import CHANNEL

if TYPE_CHECKING:
    from psycopg import Connection

log = logging.getLogger("kmsgate.store")

RECONNECT_SECONDS = 5.0
"""How long a listener whose connection broke waits before it connects again."""


class ChangeListener:
    """Waits for the store's change announcements (PostgreSQL), or for time to pass."""

    def __init__(self, database_url: str, stop: threading.Event) -> None:
        url = sa.engine.make_url(database_url)
        self._conninfo = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if url.get_backend_name() == "postgresql"
            else None
        )
        self._stop = stop
        self._conn: Connection[Any] | None = None
        self._retry_at = 0.0

    def wait(self, seconds: float) -> bool:
        """Block until a change is announced (True) or `seconds` pass or the stop event is
        set (False). Never raises."""
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

                conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
                conn.execute(f"LISTEN {CHANNEL}")  # a constant: no quoting needed
                self._conn = conn
            except Exception as exc:
                log.warning("change listener cannot connect: %s", type(exc).__name__)
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                conn.close()
