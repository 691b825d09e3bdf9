"""Scheduled work, done by exactly one process among all the workers and replicas that share
a store: the one holding the leader lock.

Every process ticks (`Jobs.run_due`); a tick first tries the leader lock without waiting, and
only the holder runs the jobs. The lock is a PostgreSQL session advisory lock, held by a
connection of its own and lost with it (a crashed leader frees it), or, on SQLite, an
exclusive `flock` on a file beside the database (freed when the process exits). Jobs are
idempotent: each first catches up with the store, and a key already destroyed is skipped.

Jobs today: destroy the material of keys whose deletion date passed; record the JIT grants
whose time ran out (`exception.expire`); rotate keys whose `rotation_period` passed (every
second, from the catalogue in memory); delete the API tokens that ended longer than
`auth.token_retention` ago (`token.purge`); prune the change feed;
publish CRLs and renew OCSP responders (`service.revocation`). CRLs also have a short tick of
their own (`run_revocation`, every loop of the cache refresher: 1 s by default), so that the
revocations of one second are published, together, by the leader's next tick.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kmsgate.errors import KmsgateError, Unavailable
from kmsgate.service import Ctx, Service
from kmsgate.store.stall import StallGuard, connection_defaults

log = logging.getLogger("kmsgate.jobs")

ADVISORY_LOCK_ID = 0x6B6D_7367_6A6F_6273  # "kmsgjobs": one lock id for the whole store
FEED_RETENTION = timedelta(hours=1)  # caches further behind than this reload in full
SCHEDULER = Ctx(request_id="scheduler")
TAKEOVER_SECONDS = 2.0
"""How often a process that does not lead tries the leader lock (the jobs move to another
process within about this long after the leader dies)."""


class LeaderLock(ABC):
    """A lock that at most one process among those sharing a store holds."""

    @abstractmethod
    def acquire(self) -> bool:
        """True if this process holds the lock (taking it now if it is free). Never waits;
        never raises: a lock that cannot be checked is not held."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock up (no-op if not held)."""

    @abstractmethod
    def close(self) -> None:
        """Release the lock and what holds it (a connection, a file); at shutdown."""


class PostgresLeaderLock(LeaderLock):
    """`pg_try_advisory_lock` on a dedicated autocommit connection."""

    def __init__(self, database_url: str) -> None:
        self._engine = sa.create_engine(
            database_url,
            poolclass=sa.pool.NullPool,
            connect_args=connection_defaults(sa.engine.make_url(database_url).query),
        )
        self._conn: Connection | None = None
        self._stall = StallGuard()

    def acquire(self) -> bool:
        """Whether this process holds the lock (taken now, or still held: a silent server
        is given `STALL_SECONDS`, then the lock is let go)."""
        try:
            with self._stall.watching():
                if self._conn is not None:
                    self._stall.attach(self._conn.connection.driver_connection)
                    self._conn.execute(sa.text("SELECT 1"))  # the session, and the lock, lives
                    return True
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._stall.attach(conn.connection.driver_connection)
                query = sa.text("SELECT pg_try_advisory_lock(:id)")
                if conn.execute(query, {"id": ADVISORY_LOCK_ID}).scalar():
                    self._conn = conn
                    return True
                conn.close()
        except (sa.exc.SQLAlchemyError, Unavailable) as exc:
            log.warning("leader lock unavailable: %s", type(exc).__name__)
            self.release()
        return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.close()  # ends the session, which frees the advisory lock
            self._conn = None

    def close(self) -> None:
        self.release()
        self._engine.dispose()


class FileLeaderLock(LeaderLock):
    """An exclusive, non-blocking `flock` on `path`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("leader lock %s unavailable: %s", self._path, exc.strerror)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process (or another lock object)
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def close(self) -> None:
        self.release()


def leader_lock(database_url: str) -> PostgresLeaderLock | FileLeaderLock:
    """The leader lock for the store at `database_url`: advisory on PostgreSQL, a file
    beside a SQLite database."""
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return FileLeaderLock(Path(f"{url.database}.jobs.lock"))
    return PostgresLeaderLock(database_url)


class Jobs:
    """The scheduled jobs of one process; only the leader's tick does anything."""

    def __init__(
        self, service: Service, lock: LeaderLock, frequent: Sequence[Callable[[], None]] = ()
    ) -> None:
        """`frequent`: more jobs for the leader, run at every tick (every second) like the
        revocation publishing; each logs its own failures."""
        self._service = service
        self._lock = lock
        self._led = False
        self._next_takeover = 0.0
        self._frequent = tuple(frequent)

    def run_due(self, now: datetime | None = None) -> bool:
        """Run every job if this process leads. Returns whether it led. A failing job is
        logged (by code or type, never by text) and retried on the next tick; the others
        run all the same."""
        if not self._lead():
            return False
        service = self._service
        _guarded("key destruction", service.keys.destroy_due, SCHEDULER, now)
        _guarded("grant expiry", service.exceptions.expire_due, SCHEDULER)
        _guarded("token purge", service.system.purge_ended_tokens, SCHEDULER)
        _guarded("feed pruning", service.store.feed.prune, datetime.now(UTC) - FEED_RETENTION)
        self._run_frequent(now)
        return True

    def run_revocation(self, now: datetime | None = None) -> bool:
        """The leader's frequent jobs (CRLs due after a revocation, grant expiry, scheduled
        rotations). A process that does not lead tries the lock again every
        `TAKEOVER_SECONDS` (a leader that died freed it) and, once it leads, runs every job.
        Returns whether it led."""
        if not self._led:
            if time.monotonic() < self._next_takeover:
                return False
            self._next_takeover = time.monotonic() + TAKEOVER_SECONDS
            return self.run_due(now)
        if not self._lead():
            return False
        self._run_frequent(now)
        return True

    def close(self) -> None:
        """Release the leader lock (at shutdown), saying so if this process led."""
        self._lock.close()
        self._now_leads(False)

    def _lead(self) -> bool:
        """Take (or keep) the leader lock; whether this process leads."""
        self._now_leads(self._lock.acquire())
        return self._led

    def _now_leads(self, led: bool) -> None:
        """Record whether this process leads; a change is logged, so that an operator can
        tell which process runs the jobs."""
        if led != self._led:
            replica = self._service.settings.resolved_replica_id()
            state = "now leads" if led else "no longer leads"
            log.info(
                "this process (replica %s, pid %d) %s the scheduled jobs",
                replica,
                os.getpid(),
                state,
            )
        self._led = led

    def _run_frequent(self, now: datetime | None) -> None:
        _guarded("revocation publishing", self._service.revocation.publish_due, SCHEDULER, now)
        _guarded("grant expiry", self._service.exceptions.expire_active_due, SCHEDULER)
        _guarded("key rotation", self._service.keys.rotate_due, SCHEDULER, now)
        for job in self._frequent:
            job()


def _guarded(name: str, job: Callable[..., object], *args: object) -> None:
    """Run a frequent job; a failure is logged (by code or type) and retried on the next
    tick, never raised into the refresher's loop."""
    try:
        job(*args)
    except KmsgateError as exc:
        log.warning("%s failed: %s", name, exc.code)
    except Exception as exc:  # a bug must not stop the refresher thread
        log.error("%s failed: %s", name, type(exc).__name__)
