"""The certificate inventory: one row per issued certificate, its serial the primary key (so
the insert that records a certificate is what reserves its serial). Writes are recorded in
the "certs" change feed."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from kmsgate.errors import Conflict
from kmsgate.store import tables
from kmsgate.store.engine import Database, Row, utc
from kmsgate.store.feed import record_change
from kmsgate.store.sans import matches, san_names, serials_named

_log = logging.getLogger(__name__)
AGGREGATE = "certs"
_INSERT = tables.certificates.insert()
_MAX_BATCH = 1000
"""Records committed in one transaction at most."""
_GATHER_SECONDS = 0.005
"""How long the writer lets a batch fill when records arrive faster than it commits."""
VALID = "valid"
REVOKED = "revoked"
EXPIRED = "expired"
"""Not a stored status: a valid (unrevoked) certificate past its not_after."""


@dataclass(frozen=True, slots=True)
class CertQuery:
    """Inventory filters; `after` is the last serial of the previous page."""

    ca: str | None = None
    profile: str | None = None
    san: str | None = None
    """A SAN value: exact, or a suffix when it starts with "." or "*." (DNS names)."""
    status: str | None = None
    """`valid` (unrevoked, not yet ended), `revoked` or `expired` (unrevoked, ended)."""
    expires_before: datetime | None = None
    owner: str | None = None
    limit: int = 100
    after: str | None = None


class Certificates:
    """Queries and writes of issued certificates."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: queue.SimpleQueue[_Insert] = queue.SimpleQueue()
        self._writer_pid: int | None = None
        """The process whose writer thread serves the queue (none yet, or a parent's)."""
        self._writer_lock = threading.Lock()

    def submit(self, cert: Row) -> Future[None]:
        """Queue an issued certificate's record for the inventory's writer thread. The
        future completes once the record is committed, or fails with Conflict (its serial
        is taken) or Unavailable.

        The writer commits every record waiting when it starts a transaction in that one
        transaction (group commit): a burst of issuance costs one commit (one fsync)
        instead of one per certificate, and no request thread waits on the database lock.
        """
        if self._writer_pid != os.getpid():
            self._start_writer()
        pending = _Insert(cert)
        self._queue.put(pending)
        return pending.done

    def insert(self, cert: Row) -> None:
        """Record an issued certificate (durable when this returns). Raises Conflict if its
        serial is taken, Unavailable."""
        self.submit(cert).result()

    def _start_writer(self) -> None:
        """Start this process's writer (on first use: a process forked from one that had
        a writer has the queue but not the thread)."""
        with self._writer_lock:
            if self._writer_pid == os.getpid():
                return
            self._queue = queue.SimpleQueue()
            threading.Thread(
                target=self._write_forever,
                args=(self._queue,),
                name="kmsgate-inventory-writer",
                daemon=True,
            ).start()
            self._writer_pid = os.getpid()

    def _write_forever(self, waiting: queue.SimpleQueue[_Insert]) -> None:
        while True:
            batch = [waiting.get()]
            if not waiting.empty():
                # under load: let the batch fill for a moment, so that the writer runs (and
                # takes the interpreter lock from the request threads) once per many records
                time.sleep(_GATHER_SECONDS)
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(waiting.get_nowait())
                except queue.Empty:
                    break
            # a record whose future was cancelled before now is not written
            live = [one for one in batch if one.done.set_running_or_notify_cancel()]
            try:
                self._commit(live)
            except Exception as exc:  # the writer lives on, and no caller is left waiting
                _log.error("inventory writer: %s", type(exc).__name__)
                for one in live:
                    if not one.done.done():
                        one.done.set_exception(exc)

    def _commit(self, batch: list[_Insert]) -> None:
        """Insert `batch` in one transaction; if that conflicts, each on its own, so that
        only the row at fault (a serial taken) gets the error."""
        if not batch:
            return
        try:
            self._write(batch)
        except Exception as exc:
            if len(batch) == 1 or not isinstance(exc, Conflict):
                for one in batch:
                    one.done.set_exception(exc)
                return
            for one in batch:
                try:
                    self._write([one])
                except Exception as alone:
                    one.done.set_exception(alone)
                else:
                    one.done.set_result(None)
        else:
            for one in batch:
                one.done.set_result(None)

    def _write(self, batch: list[_Insert]) -> None:
        with self._db.transaction() as conn:
            insert_certificates(conn, [one.row for one in batch])
            record_change(conn, AGGREGATE, *(one.row["serial"] for one in batch))

    def revoke(self, serial: str, at: datetime, reason: str) -> bool:
        """Mark a valid certificate revoked; False if there is none with that serial."""
        with self._db.transaction() as conn:
            updated = conn.execute(
                sa.update(tables.certificates)
                .where(tables.certificates.c.serial == serial)
                .where(tables.certificates.c.status == VALID)
                .values(status=REVOKED, revoked_at=at, reason=reason)
            )
            if updated.rowcount == 1:
                record_change(conn, AGGREGATE, serial)
            return updated.rowcount == 1

    def get(self, serial: str) -> Row | None:
        """One certificate row, or None. Raises Unavailable."""
        with self._db.transaction() as conn:
            row = conn.execute(
                sa.select(tables.certificates).where(tables.certificates.c.serial == serial)
            )
            found = row.mappings().first()
        return _row(found) if found is not None else None

    def search(self, query: CertQuery) -> list[Row]:
        """Rows matching `query`, by serial, at most `query.limit`. Raises Unavailable."""
        c = tables.certificates.c
        select = sa.select(tables.certificates).order_by(c.serial).limit(query.limit)
        for column, value in ((c.ca, query.ca), (c.profile, query.profile), (c.owner, query.owner)):
            if value is not None:
                select = select.where(column == value)
        if query.status == REVOKED:
            select = select.where(c.status == REVOKED)
        elif query.status is not None:  # valid or expired: unrevoked, and by not_after
            at = datetime.now(UTC)
            ended = c.not_after <= at
            select = select.where(c.status == VALID, ended if query.status == EXPIRED else ~ended)
        if query.expires_before is not None:
            select = select.where(c.not_after < query.expires_before)
        if query.after is not None:
            select = select.where(c.serial > query.after)
        if query.san is None:
            with self._db.transaction() as conn:
                return [_row(r) for r in conn.execute(select).mappings()]
        # the index of names finds the certificates that may match; `matches` decides (a
        # name's case on SQLite, whose LIKE ignores it), reading pages until `limit` match
        select = select.where(c.serial.in_(serials_named(query.san)))
        found: list[Row] = []
        after = query.after
        while len(found) < query.limit:
            page = select.limit(500)
            if after is not None:
                page = page.where(c.serial > after)
            with self._db.transaction() as conn:
                rows = [_row(r) for r in conn.execute(page).mappings()]
            found += [r for r in rows if matches(r["sans"], query.san)]
            if len(rows) < 500:
                break
            after = rows[-1]["serial"]
        return found[: query.limit]

    def count_by_status(self) -> dict[str, int]:
        """How many certificates the inventory holds in each stored status (valid,
        revoked). Raises Unavailable."""
        c = tables.certificates.c
        select = sa.select(c.status, sa.func.count()).group_by(c.status)
        with self._db.transaction() as conn:
            return {str(status): int(count) for status, count in conn.execute(select).all()}

    def count_expiring(self, after: datetime, until: datetime) -> int:
        """How many valid (unrevoked) certificates end between `after` and `until`.
        Raises Unavailable."""
        c = tables.certificates.c
        select = (
            sa.select(sa.func.count())
            .select_from(tables.certificates)
            .where(c.status == VALID, c.not_after > after, c.not_after <= until)
        )
        with self._db.transaction() as conn:
            return int(conn.execute(select).scalar_one())

    def revoked(self, ca: str, since: datetime | None = None) -> list[Row]:
        """`(serial, revoked_at, reason)` of the CA's revoked certificates (revoked after
        `since` if given), for a CRL. Raises Unavailable."""
        c = tables.certificates.c
        select = sa.select(c.serial, c.revoked_at, c.reason).where(c.ca == ca, c.status == REVOKED)
        if since is not None:
            select = select.where(c.revoked_at > since)
        with self._db.transaction() as conn:
            return [_row(r) for r in conn.execute(select).mappings()]


@dataclass(frozen=True, slots=True)
class _Insert:
    """One queued insert: its row, and the future its committer completes."""

    row: Row
    done: Future[None] = field(default_factory=Future)


def _row(row: sa.RowMapping) -> Row:
    out = dict(row)
    for name in ("not_before", "not_after", "revoked_at"):
        if name in out:
            out[name] = utc(out[name])
    return out


def insert_certificates(conn: sa.Connection, certificates: list[Row]) -> None:
    """Insert the rows `certificates`, with the names of their SANs that searches read (in
    the caller's transaction). Raises what the insert raises (a serial taken)."""
    conn.execute(_INSERT, certificates)
    names = [
        {"serial": row["serial"], "name": name}
        for row in certificates
        for name in san_names(row["sans"])
    ]
    if names:
        conn.execute(sa.insert(tables.certificate_names), names)
