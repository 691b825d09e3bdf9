"""The certificate inventory: one row per issued certificate, its serial the primary key (so
the insert that records a certificate is what reserves its serial). Writes are recorded in
the "certs" change feed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from kmsgate.errors import KmsgateError
from kmsgate.store import tables
from kmsgate.store.engine import Database, Row, utc
from kmsgate.store.feed import record_change

AGGREGATE = "certs"
_INSERT = tables.certificates.insert()
VALID = "valid"
REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class CertQuery:
    """Inventory filters; `after` is the last serial of the previous page."""

    ca: str | None = None
    profile: str | None = None
    san: str | None = None
    """A SAN value: exact, or a suffix when it starts with "." or "*." (DNS names)."""
    status: str | None = None
    expires_before: datetime | None = None
    owner: str | None = None
    limit: int = 100
    after: str | None = None


class Certificates:
    """Queries and writes of issued certificates."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[_Insert] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def insert(self, cert: Row) -> None:
        """Record an issued certificate (durable when this returns). Raises Conflict if its
        serial is taken, Unavailable.

        Concurrent inserts share one transaction (group commit): a thread that finds others
        waiting commits their rows with its own, so a burst of issuance costs one commit
        (one fsync) instead of one per certificate.
        """
        mine = _Insert(cert)
        with self._pending_lock:
            self._pending.append(mine)
        with self._commit_lock:
            if not mine.done.is_set():
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit(batch)
        if mine.error is not None:
            raise mine.error

    def _commit(self, batch: list[_Insert]) -> None:
        """Insert `batch` in one transaction; if that fails, each on its own, so that only
        the row at fault (a serial taken) gets the error."""
        try:
            self._write(batch)
        except KmsgateError as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for one in batch:
                    try:
                        self._write([one])
                    except KmsgateError as alone:
                        one.error = alone
        except Exception as exc:  # a bug or a driver failure: every waiter sees it
            for one in batch:
                one.error = exc
        finally:
            for one in batch:
                one.done.set()

    def _write(self, batch: list[_Insert]) -> None:
        with self._db.transaction() as conn:
            conn.execute(_INSERT, [one.row for one in batch])
            for one in batch:
                record_change(conn, AGGREGATE, one.row["serial"])

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
        for column, value in (
            (c.ca, query.ca),
            (c.profile, query.profile),
            (c.status, query.status),
            (c.owner, query.owner),
        ):
            if value is not None:
                select = select.where(column == value)
        if query.expires_before is not None:
            select = select.where(c.not_after < query.expires_before)
        if query.after is not None:
            select = select.where(c.serial > query.after)
        if query.san is None:
            with self._db.transaction() as conn:
                return [_row(r) for r in conn.execute(select).mappings()]
        # SANs are a JSON list: filter in Python, reading pages until `limit` rows match
        found: list[Row] = []
        after = query.after
        while len(found) < query.limit:
            page = select.limit(500)
            if after is not None:
                page = page.where(c.serial > after)
            with self._db.transaction() as conn:
                rows = [_row(r) for r in conn.execute(page).mappings()]
            found += [r for r in rows if _san_matches(r["sans"], query.san)]
            if len(rows) < 500:
                break
            after = rows[-1]["serial"]
        return found[: query.limit]

    def revoked(self, ca: str, since: datetime | None = None) -> list[Row]:
        """`(serial, revoked_at, reason)` of the CA's revoked certificates (revoked after
        `since` if given), for a CRL. Raises Unavailable."""
        c = tables.certificates.c
        select = sa.select(c.serial, c.revoked_at, c.reason).where(c.ca == ca, c.status == REVOKED)
        if since is not None:
            select = select.where(c.revoked_at > since)
        with self._db.transaction() as conn:
            return [_row(r) for r in conn.execute(select).mappings()]


@dataclass(slots=True)
class _Insert:
    """One waiting insert: its row, and once committed (or not) its error."""

    row: Row
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


def _row(row: sa.RowMapping) -> Row:
    out = dict(row)
    for name in ("not_before", "not_after", "revoked_at"):
        if name in out:
            out[name] = utc(out[name])
    return out


def _san_matches(sans: list[str], wanted: str) -> bool:
    """`wanted` equals one of the SAN values (`dns:`, `ip:`, `uri:` prefixes stripped), or,
    starting with "." or "*.", is a suffix of one."""
    values = [san.partition(":")[2] for san in sans]
    if wanted.startswith("*."):
        wanted = wanted[1:]
    if wanted.startswith("."):
        return any(value.endswith(wanted) for value in values)
    return wanted in values
