"""What each CA publishes about revocation: its full CRL, its delta CRL and its delegated OCSP
responder's certificate, as DER, one row per (CA, kind). Every write is recorded in the "crls"
change feed (item: the CA's name), so every worker's and replica's cache follows the one
process that builds them.

The `crls` table is defined here, beside its queries (migration 0005 creates it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa

from kmsgate.errors import ConcurrentChange
from kmsgate.store import tables
from kmsgate.store.certificates import AGGREGATE as CERTS
from kmsgate.store.certificates import REVOKED, insert_certificates
from kmsgate.store.engine import Database, Row, utc
from kmsgate.store.feed import record_change

AGGREGATE = "crls"
FULL = "full"
DELTA = "delta"
RESPONDER = "responder"
_PARTITION = 500

RevokedRow = tuple[str, datetime | str, str | None]
"""A revoked certificate's serial (hex), revocation time (a datetime, or SQLite's ISO text:
`instant` reads both) and reason name."""

crls = sa.Table(
    "crls",
    tables.metadata,
    sa.Column("ca", sa.String(128), sa.ForeignKey("cas.name"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("number", sa.BigInteger, nullable=True),
    sa.Column("base_number", sa.BigInteger, nullable=True),
    sa.Column("entries", sa.Integer, nullable=False),
    sa.Column("this_update", sa.DateTime(timezone=True), nullable=False),
    sa.Column("next_update", sa.DateTime(timezone=True), nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
)
"""`number`: the CRL number (none for the responder); `base_number`: a delta's base;
`entries`: how many revoked certificates the CRL lists; for the responder, `this_update` and
`next_update` are its certificate's validity."""


class Crls:
    """Queries and writes of published CRLs and OCSP responder certificates."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def publish(self, ca: str, documents: Sequence[Row]) -> None:
        """Replace the CA's documents of the kinds given (rows without `ca`), in one
        transaction. Raises Unavailable, Conflict (no such CA)."""
        kinds = [doc["kind"] for doc in documents]
        with self._db.transaction() as conn:
            conn.execute(sa.delete(crls).where(crls.c.ca == ca, crls.c.kind.in_(kinds)))
            conn.execute(sa.insert(crls), [{**doc, "ca": ca} for doc in documents])
            record_change(conn, AGGREGATE, ca)

    def publish_responder(
        self, ca: str, document: Row, certificate: Row, *, replacing: bytes | None
    ) -> None:
        """Record the responder certificate `certificate` in the inventory and publish it
        (`document`, of kind responder, without `ca`) in one transaction, in place of the
        responder certificate `replacing` (its DER; None where there was none). Raises
        ConcurrentChange if another process published a responder meanwhile (nothing is
        written: use theirs), Unavailable."""
        with self._db.transaction() as conn:
            if replacing is not None:
                mine = sa.and_(crls.c.ca == ca, crls.c.kind == RESPONDER, crls.c.der == replacing)
                if conn.execute(sa.delete(crls).where(mine)).rowcount != 1:
                    raise ConcurrentChange(f"another process published CA {ca!r}'s responder")
            conn.execute(sa.insert(crls).values(**document, ca=ca))  # taken: a Conflict too
            insert_certificates(conn, [certificate])
            record_change(conn, AGGREGATE, ca)
            record_change(conn, CERTS, certificate["serial"])

    def of_ca(self, ca: str) -> list[Row]:
        """The CA's documents. Raises Unavailable."""
        with self._db.transaction() as conn:
            rows = conn.execute(sa.select(crls).where(crls.c.ca == ca)).mappings()
            return [_row(r) for r in rows]

    def all(self) -> list[Row]:
        """Every CA's documents. Raises Unavailable."""
        with self._db.transaction() as conn:
            return [_row(r) for r in conn.execute(sa.select(crls)).mappings()]

    def revoked(self, ca: str) -> list[RevokedRow]:
        """(serial, revoked_at, reason) of each of the CA's revoked certificates: what a CRL
        lists, read for speed (100,000 rows in about 0.1 s on SQLite, a quarter of what
        `Certificates.revoked` takes), as the database gives them: `instant` reads
        revoked_at. Raises Unavailable."""
        c = tables.certificates.c
        # SQLAlchemy's SQLite datetime parsing costs more than the query: take the text (the
        # caller parses it once per row it has not seen); PostgreSQL's driver hands back
        # datetimes anyway
        at = sa.type_coerce(c.revoked_at, sa.String)
        query = sa.select(c.serial, at, c.reason).where(c.ca == ca, c.status == REVOKED)
        revoked: list[RevokedRow] = []
        # a plain connection: this long read does not queue behind, or hold up, the
        # process's SQLite writers (`Database.transaction`); WAL readers block no one
        with self._db.plain_connection() as conn:
            # in partitions: other threads get the GIL between them (OCSP answers)
            for rows in conn.execute(query).partitions(_PARTITION):
                revoked += [(serial, when, reason) for serial, when, reason in rows]
        return revoked

    def revoked_count(self, ca: str) -> int:
        """How many of the CA's certificates are revoked now (never falls: a revocation is
        not undone and the inventory keeps its rows). Raises Unavailable."""
        c = tables.certificates.c
        query = sa.select(sa.func.count()).where(c.ca == ca, c.status == REVOKED)
        with self._db.transaction() as conn:
            return int(conn.execute(query).scalar_one())


def instant(value: datetime | str) -> datetime:
    """An aware UTC datetime from a driver's datetime or SQLite's ISO text."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _row(row: sa.RowMapping) -> Row:
    out = dict(row)
    out["this_update"] = utc(out["this_update"])
    out["next_update"] = utc(out["next_update"])
    out["der"] = bytes(out["der"])
    return out
