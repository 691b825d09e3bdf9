"""The database under the store: the engine (SQLite in WAL mode, or PostgreSQL), migrations,
transactions that turn driver errors into Conflict or Unavailable, and the `meta` settings.
Also the row type and the datetime fix-up every aggregate's queries share."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy.engine import Connection, Engine

from kmsgate.config import with_database_driver
from kmsgate.errors import ConcurrentChange, ConfigError, Conflict, KmsgateError, Unavailable
from kmsgate.store import tables
from kmsgate.store.stall import StallGuard, connection_defaults

Row = Mapping[str, Any]

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


_READ_ONLY = "metadata store is read-only (a standby, or a primary demoted by a failover)"
UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InternalError)
"""The driver errors that say the database cannot do the work now, not that kmsgate asked
wrongly: unreachable, gone, and the server's own state, such as a read-only transaction
(SQLSTATE 25006: the address now leads to a standby or a demoted primary after a failover,
which psycopg raises as InternalError)."""


def utc(value: datetime | None) -> datetime | None:
    """`value` as an aware UTC datetime (SQLite hands back naive ones)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


PING_SECONDS = 2.0
"""How long readiness waits for PostgreSQL to answer (a transaction waits `STALL_SECONDS`):
an orchestrator's probe is answered `degraded` in time while the server is frozen."""
WRITE_WAIT_SECONDS = 5.0
"""How long a transaction waits for SQLite's writer lock (also SQLite's busy timeout)."""
MIGRATION_LOCK_ID = 0x6B6D_7367_6D69_6772  # "kmsgmigr"
"""The PostgreSQL advisory lock id that serialises migrations among every process sharing
a database (the leader lock of kmsgate.jobs is another id)."""


def shown_url(url: sa.engine.URL) -> str:
    """`url` for a message or the banner: its password, and any query value named like one
    (`?password=`, `sslpassword=`), hidden; the driver not named
    (`postgresql://kmsgate:***@db:5432/kms`, `postgresql:///kms?host=db&password=***`)."""
    bare = url.set(drivername=url.get_backend_name(), query={}).render_as_string(hide_password=True)
    query = "&".join(
        f"{quote_plus(name)}={'***' if 'pass' in name.lower() else quote_plus(value)}"
        for name, values in sorted(url.query.items())
        for value in ((values,) if isinstance(values, str) else values)
    )
    return f"{bare}?{query}" if query else bare


# libpq's framing of a failed connection, which the message names already
_PSYCOPG_FRAMING = re.compile(
    r'^connection failed: |connection to server at "[^"]*"(?:, port \d+)? failed: |'
    r'connection to server on socket "[^"]*" failed: |FATAL: +'
)


def driver_reason(exc: Exception, url: sa.engine.URL, *, first_line: bool = False) -> str:
    """The database driver's reason for `exc` (a SQLAlchemy error) on one line, with every
    secret of `url` (its password, any query value named like one) replaced by `***`:
    a driver may echo what it was given. `first_line`: without the lines after the first
    (PostgreSQL's DETAIL may show a row's values). The SQL and its parameters, which
    SQLAlchemy's own text adds, are never in it."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    lines = [_PSYCOPG_FRAMING.sub("", " ".join(line.split())) for line in text.splitlines()]
    lines = [line for line in lines if line][: 1 if first_line else None]
    text = lines[0] if lines else ""
    if len(lines) > 1:  # libpq's hint ("Is the server running on that host ...?")
        text += f" ({'; '.join(lines[1:])})"
    secrets = [url.password or ""]
    for name, value in url.query.items():
        if "pass" in name.lower():
            secrets.extend([value] if isinstance(value, str) else value)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, "***")
    return text or type(orig if orig is not None else exc).__name__


def sqlite_file(url: str) -> Path | None:
    """The SQLite database file `url` names, or None (another database, one in memory, or
    a string that is no database URL: opening it says so)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def hold_transaction_lock(conn: sa.Connection, lock_id: int) -> None:
    """On PostgreSQL, wait for the transaction advisory lock `lock_id` (a signed 64-bit
    integer), freed when the transaction ends or its connection dies. On SQLite nothing:
    a transaction there holds the writer lock already."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})


def _dangling_references(conn: Connection) -> bool:
    """Whether a row of the SQLite database refers to a row that is not there."""
    return conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> None:
    """On SQLite, enforce foreign keys on `conn` (its default, `_enable_sqlite_wal`) or not;
    set on the driver's connection, outside any transaction (where SQLite ignores it)."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        assert driver is not None  # an open connection
        driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _enable_sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # a destroyed version's sealed material is overwritten, not left in free space, whatever
    # the SQLite build's default (Debian's is on, SQLite's own off)
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(WRITE_WAIT_SECONDS * 1000)}")
    cursor.close()


def _keep_private(path: Path) -> None:
    """Create the SQLite file `path` readable by its owner only (0600), or, if it exists
    and this user owns it, take away what its group and others may do with it and with its
    -wal and -shm files (SQLite gives those the database file's mode; early kmsgate made
    the database file 0644). Token hashes and wrapped keys are in it, whatever the data
    dir's own mode. Errors are left to SQLite to report."""
    with contextlib.suppress(OSError):  # it exists, or SQLite will say what is wrong
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            st = os.stat(file)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(file, stat.S_IMODE(st.st_mode) & 0o700)


_FRESH = "kmsgate_fresh"
"""A pool entry's info key: its connection was just made (no ping needed)."""


def _fresh(_driver_connection: Any, record: Any) -> None:
    record.info[_FRESH] = True


class Database:
    """One engine and its transactions. Raises ConcurrentChange (a Conflict) on uniqueness
    violations and Unavailable when the database cannot be reached."""

    def __init__(self, url: str) -> None:
        """Raises ConfigError if `url` is no database URL kmsgate can open (its message
        shows the URL without its password)."""
        url = with_database_driver(url)
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except (sa.exc.ArgumentError, ValueError):  # its text could show the password
            raise ConfigError(
                "database_url is not a database URL "
                "(sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)"
            ) from None
        if url.partition("://")[2].count("@") > 1:  # a password's own "@" would be read
            # as the end of the credentials, and the rest shown as the host or the path
            raise ConfigError(
                "database_url: an '@' in the user or password must be percent-encoded (%40)"
            )
        self._shown = shown_url(parsed)
        postgres = parsed.get_backend_name() == "postgresql"
        # a database that cannot be reached fails a request in seconds (503), not minutes
        connect_args: dict[str, Any] = connection_defaults(parsed.query) if postgres else {}
        self._stall = StallGuard() if postgres else StallGuard(None)
        try:
            self.engine: Engine = sa.create_engine(
                parsed,
                pool_pre_ping=not postgres,
                connect_args=connect_args,
                # whatever the database's default: each statement of a transaction sees what
                # committed before it (a migration waiting for another's, a revocation
                # finding the tokens made while it ran), and the rest of kmsgate assumes it
                **({"isolation_level": "READ COMMITTED"} if postgres else {}),
            )
        except sa.exc.NoSuchModuleError:
            raise ConfigError(
                f"database_url {self._shown}: kmsgate has no driver for "
                f"{parsed.drivername!r} (use sqlite:///PATH or postgresql://...)"
            ) from None
        except ImportError as exc:
            extra = " (pip install 'kmsgate[postgres]')" if postgres else ""
            raise ConfigError(
                f"database_url {self._shown}: its driver {exc.name} is not installed{extra}"
            ) from None
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"database_url {self._shown}: {driver_reason(exc, parsed)}") from None
        self._serial: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self._meta_reader = _MetaReader(self.engine, self._stall)
        if postgres:
            sa.event.listen(self.engine, "do_connect", self._connect_or_silence)
            sa.event.listen(self.engine, "connect", _fresh)
            sa.event.listen(self.engine, "checkout", self._ping_at_checkout)
            sa.event.listen(self.engine, "checkin", self._returned)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _enable_sqlite_wal)
            # SQLite has one writer at a time; threads and processes that find it busy sleep
            # in its busy handler (1, 2, 5, ... 100 ms), which turns a queue of writers into
            # seconds of latency. They queue on a lock instead: a thread lock, and for a
            # database file an flock beside it (workers of one gateway share the file).
            database = sqlite_file(url)
            if database is not None:
                _keep_private(database)
            self._serial = _WriterLock(Path(f"{database}.write.lock") if database else None)

    def ping(self) -> str | None:
        """None if the database answers a query now and takes writes, else why not (for
        readiness): within `PING_SECONDS`, and at once while PostgreSQL counts as silent
        (see StallGuard)."""
        try:
            with self._stall.watching(PING_SECONDS), self.engine.connect() as conn:
                if conn.dialect.name != "postgresql":
                    conn.execute(sa.text("SELECT 1"))
                elif conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on":
                    return _READ_ONLY
        except KmsgateError as exc:
            return exc.detail
        except UNAVAILABLE:
            return "metadata store unavailable"
        return None

    def migrate(self) -> None:
        """Bring the schema to the latest revision, one process at a time: processes that
        start together on an empty database (a Deployment's replicas, a server's workers)
        wait for the first one's migration, then find the schema current and do nothing.
        The lock is, on PostgreSQL, the transaction advisory lock `MIGRATION_LOCK_ID` (freed
        when the migration commits or rolls back, or its connection dies) and, on SQLite, the
        writer lock; either is waited for as long as the other migration takes.
        Raises ConfigError on failure."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        serial = self._serial.waiting() if isinstance(self._serial, _WriterLock) else None
        with serial or contextlib.nullcontext(), self._connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            try:
                # a migration on SQLite rebuilds a table (copy, drop, rename): with foreign
                # keys enforced, dropping `keys` deleted every key version (ON DELETE CASCADE)
                _sqlite_foreign_keys(conn, on=False)
                with conn.begin():  # READ COMMITTED: it sees what a migration before it did
                    hold_transaction_lock(conn, MIGRATION_LOCK_ID)
                    cfg.attributes["connection"] = conn
                    was = MigrationContext.configure(conn).get_current_revision()
                    command.upgrade(cfg, "head")
                    migrated = MigrationContext.configure(conn).get_current_revision() != was
                    if migrated and sqlite and _dangling_references(conn):
                        raise ConfigError(
                            f"migrating the database at {self._shown} left rows whose "
                            "references are missing: nothing was changed; restore it from a "
                            "backup, or report this"
                        )
            except sa.exc.SQLAlchemyError as exc:
                why = driver_reason(exc, self.engine.url, first_line=True)
                raise ConfigError(
                    f"migrating the database at {self._shown} failed: {why}"
                ) from None
            except AlembicCommandError as exc:
                if not str(exc).startswith("Can't locate revision"):
                    why = f"migrating the database at {self._shown} failed: {exc}"
                    raise ConfigError(why) from None
                raise ConfigError(
                    f"the database at {self._shown} was migrated by a newer kmsgate ({exc}): "
                    "run that version, or restore the backup taken before the upgrade"
                ) from None
            finally:
                _sqlite_foreign_keys(conn, on=True)

    def _connect(self) -> Connection:
        """A connection for start-up work. Raises ConfigError saying why there is none."""
        try:
            return self.engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            why = driver_reason(exc, self.engine.url)
            raise ConfigError(f"cannot connect to the database at {self._shown}: {why}") from None

    def close(self) -> None:
        self._meta_reader.close()
        self.engine.dispose()

    def _connect_or_silence(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        """Open a PostgreSQL connection; one that cannot be made marks the server silent
        (`StallGuard.silence`: the next transactions fail at once, not after a connect
        timeout each). Raises the driver's error."""
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception:
            self._stall.silence()
            raise

    def _ping_at_checkout(self, driver_connection: Any, record: Any, _proxy: Any) -> None:
        """Ping a PostgreSQL connection as it leaves the pool again (not a new one, as
        `pool_pre_ping` does), under the deadline of the transaction that takes it
        (`StallGuard`). Raises DisconnectionError (the pool opens another: the server
        restarted meanwhile), Unavailable (the deadline passed)."""
        self._stall.attach(driver_connection)
        if record.info.pop(_FRESH, False):
            return
        try:
            self.engine.dialect.do_ping(driver_connection)
        except Exception as exc:
            self._stall.attach(driver_connection)
            raise sa.exc.DisconnectionError("the connection failed its ping") from exc

    def _returned(self, driver_connection: Any, _record: Any) -> None:
        """A connection back in the pool is no longer its last user's to have cut."""
        self._stall.detach(driver_connection)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block exits normally, rolled back otherwise.
        On PostgreSQL it has `STALL_SECONDS` (then Unavailable)."""
        try:
            with self._stall.watching(), self._serial, self.engine.begin() as conn:
                yield conn
        except sa.exc.IntegrityError as exc:
            raise ConcurrentChange("the change conflicts with existing state; retry") from exc
        except UNAVAILABLE as exc:
            raise Unavailable("metadata store unavailable") from exc

    @contextlib.contextmanager
    def naming_transaction(self, taken: str) -> Iterator[Connection]:
        """`transaction` for the insert of a record keyed by its name: a uniqueness refusal
        is Conflict(`taken`), that name exists (another process made it at the same
        moment), not a race that a retry would win."""
        try:
            with self.transaction() as conn:
                yield conn
        except ConcurrentChange:
            raise Conflict(taken) from None

    @contextlib.contextmanager
    def plain_connection(self) -> Iterator[Connection]:
        """A connection outside a transaction (a long read that must not queue behind, or
        hold up, SQLite's writers), with a transaction's deadline. Raises Unavailable."""
        try:
            with self._stall.watching(), self.engine.connect() as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise Unavailable("metadata store unavailable") from exc

    def empty_log(self) -> bool:
        """On SQLite, copy the write-ahead log into the database file and empty it
        (`wal_checkpoint(TRUNCATE)`, waiting for readers as a writer waits): what a change
        replaced, such as a destroyed version's sealed material (`secure_delete`
        overwrites it in the database file), is then in neither file. False if readers kept
        it from ending (a later checkpoint does it), True once done, or on PostgreSQL
        (nothing to do: see VACUUM in docs/operations.md). Raises Unavailable."""
        if self.engine.dialect.name != "sqlite":
            return True
        try:
            with self._serial, self.engine.connect() as conn:
                busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        except UNAVAILABLE as exc:
            raise Unavailable("metadata store unavailable") from exc
        return not busy

    def get_meta(self, key: str) -> str | None:
        with self.transaction() as conn:
            return conn.execute(
                sa.select(tables.meta.c.value).where(tables.meta.c.key == key)
            ).scalar_one_or_none()

    def read_meta_now(self, key: str) -> str | None:
        """`meta` value `key` as last committed, read outside the transaction machinery, for
        checks on the request path (see `_MetaReader`). Raises Unavailable."""
        return self._meta_reader.read(key)

    def init_meta(self, key: str, value: str) -> str:
        """Set `key` unless it exists; return the stored value (first writer wins)."""
        with contextlib.suppress(ConcurrentChange), self.transaction() as conn:
            conn.execute(sa.insert(tables.meta).values(key=key, value=value))
        stored = self.get_meta(key)
        assert stored is not None
        return stored


class _MetaReader:
    """Reads one `meta` value on a database connection of its own, kept open: microseconds
    on SQLite (a WAL reader waits for no writer) and one round trip on PostgreSQL, where a
    `transaction` costs a pool checkout, a liveness ping, BEGIN and COMMIT as well.
    Thread-safe: one read at a time."""

    def __init__(self, engine: Engine, stall: StallGuard) -> None:
        self._engine = engine
        self._stall = stall
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        table = tables.meta.name  # constants only: the key is a bound parameter
        self._sql = f"SELECT value FROM {table} WHERE key = {marker}"  # noqa: S608

    def read(self, key: str) -> str | None:
        """The value of `key`, or None. A connection that fails (the server restarted) is
        replaced once. Raises Unavailable when a new one fails too."""
        with self._lock:
            try:
                return self._read(key)
            except Exception:  # the driver's errors have no common base we import
                self._close()
            try:
                return self._read(key)
            except Exception as exc:
                self._close()
                raise Unavailable("metadata store unavailable") from exc

    def _read(self, key: str) -> str | None:
        with self._stall.watching():
            connection = self._connection()
            # a detached connection has no driver_connection; psycopg's is its DB-API one
            self._stall.attach(connection.dbapi_connection)
            return self._select(connection, key)

    def _select(self, connection: Any, key: str) -> str | None:
        cursor = connection.cursor()
        try:
            cursor.execute(self._sql, (key,))
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else str(row[0])

    def _connection(self) -> Any:
        if self._conn is None or self._pid != os.getpid():  # never one a parent opened
            conn = self._engine.raw_connection()
            if self._engine.dialect.name == "postgresql":
                driver: Any = conn.driver_connection
                driver.autocommit = True  # no transaction left open between reads
            conn.detach()  # ours until closed; the pool opens another in its place
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._close()


class _WriterLock:
    """One transaction at a time: across this process's threads (a lock) and, given a
    `path`, across processes (an exclusive flock on that file). A writer waits at most
    `WRITE_WAIT_SECONDS` (SQLite's busy timeout), then gets Unavailable; a transaction
    opened inside another on the same thread is a bug and raises RuntimeError instead of
    waiting for itself."""

    def __init__(self, path: Path | None) -> None:
        self._thread_lock = threading.Lock()
        self._owner: int | None = None
        self._path = path
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("a store transaction was opened inside another one")
        if not self._thread_lock.acquire(timeout=WRITE_WAIT_SECONDS):
            raise Unavailable("metadata store busy")
        self._owner = me
        if self._path is None:
            return
        try:
            self._lock_file()
        except BaseException:
            self._owner = None
            self._thread_lock.release()
            raise

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None and self._path is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._owner = None
            self._thread_lock.release()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The lock, waited for without a time limit (a migration at start-up, which may
        take a while; the process has nothing else to do meanwhile). Raises ConfigError if
        the lock file cannot be opened."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("a store transaction was opened inside another one")
        with self._thread_lock:
            self._owner = me
            try:
                if self._path is None:
                    yield
                    return
                try:
                    fd = self._descriptor()
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot open the database's lock file {self._path}: {exc.strerror}"
                    ) from None
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                self._owner = None

    def _lock_file(self) -> None:
        """Take the flock, polling (0.1 ms, doubling to 2 ms) until `WRITE_WAIT_SECONDS`
        pass: a stopped or hung process that holds it must not stall every other one.
        Raises Unavailable."""
        deadline = time.monotonic() + WRITE_WAIT_SECONDS
        pause = 0.0001
        try:
            fd = self._descriptor()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Unavailable("metadata store busy") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.002)
        except OSError as exc:
            raise Unavailable("metadata store unavailable (write lock)") from exc

    def _descriptor(self) -> int:
        """This process's descriptor of the lock file (a forked worker opens its own: an
        flock belongs to the open file, which a fork would share). Raises OSError."""
        assert self._path is not None
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except PermissionError:  # made by another user (an operator's command as root)
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no more
            self._pid = os.getpid()
        return self._fd
