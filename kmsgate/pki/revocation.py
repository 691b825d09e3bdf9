"""Revocation as the gateway publishes it: the documents of each CA (full CRL, delta CRL, OCSP
responder certificate) and two in-memory caches that follow the change feed.

- `PublishedDocuments` follows the "crls" feed: every worker serves the CRLs and uses the
  responder certificate that the one builder (the jobs leader) published.
- `OcspAnswers` follows the "certs" feed: the status of each serial asked about, and the
  pre-signed answer without a nonce; a change to a certificate (its revocation) drops them.

The timing rules (validity, when to rebuild) are here too; `service/revocation.py` uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from kmsgate.pki.crl import REASONS, RevokedEntry
from kmsgate.pki.extensions import authority_key_identifier
from kmsgate.pki.ocsp import CertStatus, delegated_responder_extensions
from kmsgate.store import Row, Store, StoreMirror
from kmsgate.store.certificates import REVOKED, CertQuery
from kmsgate.store.crls import AGGREGATE, DELTA, FULL, RESPONDER, RevokedRow, instant

__all__ = [
    "CRL_VALIDITY",
    "OCSP_VALIDITY",
    "RESPONDER_VALIDITY",
    "Answer",
    "CrlEntries",
    "Document",
    "OcspAnswers",
    "Published",
    "PublishedDocuments",
    "cert_status",
    "listed_serials",
    "past_half",
    "responder_extensions",
    "responder_key_name",
]

CRL_VALIDITY = timedelta(hours=24)
"""nextUpdate - thisUpdate of every CRL; rebuilt once less than half of it remains."""
OCSP_VALIDITY = timedelta(hours=1)
"""nextUpdate - thisUpdate of an OCSP answer; a cached one is re-signed at half-life."""
RESPONDER_VALIDITY = timedelta(days=30)
"""Lifetime of a delegated OCSP responder certificate; renewed at half-life."""

OCSP_MISSES_PER_SECOND = 500.0
"""OCSP statuses a process reads from the store per second; beyond that, `tryLater`."""
MAX_CACHED_SERIALS = 100_000
"""Serials whose answers a process keeps; the oldest go first beyond that."""


RESPONDER_PROFILE = "ocsp-responder"
"""The inventory's profile of a delegated OCSP responder certificate."""


def responders_of_key(
    store: Store, ca: str, public_key: PublicKeyTypes | None, status: str
) -> list[str]:
    """The serials of `ca`'s OCSP responder certificates in the inventory whose status is
    `status` (`valid`, `revoked`) and whose key is `public_key`. Raises Unavailable."""
    query = CertQuery(ca=ca, profile=RESPONDER_PROFILE, status=status, limit=1000)
    return [
        str(row["serial"])
        for row in store.certs.search(query)
        if x509.load_pem_x509_certificate(row["certificate"].encode()).public_key() == public_key
    ]


def responder_key_name(ca: str) -> str:
    """The kmsgate key that signs CA `ca`'s OCSP answers."""
    return f"ocsp.{ca}"


def past_half(not_before: datetime, not_after: datetime, at: datetime) -> bool:
    """Whether less than half of the period from `not_before` to `not_after` remains at `at`."""
    return at >= not_before + (not_after - not_before) / 2


@dataclass(frozen=True, slots=True)
class Document:
    """One published document: a CRL (`number`, and `base_number` for a delta; `entries` is
    how many revoked certificates it lists) or a responder certificate (its validity)."""

    kind: str
    der: bytes
    this_update: datetime
    next_update: datetime
    entries: int = 0
    number: int | None = None
    base_number: int | None = None

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "der": self.der,
            "this_update": self.this_update,
            "next_update": self.next_update,
            "entries": self.entries,
            "number": self.number,
            "base_number": self.base_number,
        }

    @classmethod
    def from_row(cls, row: Row) -> Document:
        return cls(
            kind=row["kind"],
            der=row["der"],
            this_update=row["this_update"],
            next_update=row["next_update"],
            entries=row["entries"],
            number=row["number"],
            base_number=row["base_number"],
        )


@dataclass(frozen=True, slots=True)
class Published:
    """What one CA has published (None: not yet)."""

    full: Document | None = None
    delta: Document | None = None
    responder: x509.Certificate | None = None

    def merged(self, documents: Iterable[Document]) -> Published:
        """These documents replacing those of the same kind."""
        full, delta, responder = self.full, self.delta, self.responder
        for doc in documents:
            if doc.kind == FULL:
                full = doc
            elif doc.kind == DELTA:
                delta = doc
            elif doc.kind == RESPONDER:
                responder = x509.load_der_x509_certificate(doc.der)
        return Published(full, delta, responder)


class PublishedDocuments(StoreMirror):
    """Every CA's published documents in memory, following the "crls" change feed."""

    aggregate = AGGREGATE

    def __init__(self, store: Store) -> None:
        self._published: dict[str, Published] = {}
        super().__init__(store)

    def _load(self) -> None:
        grouped: dict[str, list[Document]] = {}
        for row in self._store.crls.all():
            grouped.setdefault(row["ca"], []).append(Document.from_row(row))
        self._published = {ca: Published().merged(docs) for ca, docs in grouped.items()}

    def _load_item(self, item: str) -> None:
        docs = [Document.from_row(row) for row in self._store.crls.of_ca(item)]
        if docs:
            self._published[item] = Published().merged(docs)
        else:
            self._published.pop(item, None)

    def find(self, ca: str, *, read_through: bool = True) -> Published | None:
        """What `ca` has published; a miss reads through (within the budget) unless told not
        to. Raises Unavailable."""
        found = self._published.get(ca)
        if found is None and read_through and 0 < len(ca) <= 128 and self._read_through(ca):
            found = self._published.get(ca)
        return found

    def fetch(self, ca: str) -> Published | None:
        """What `ca` has published, read from the store now (within the read-through
        budget, else from memory). Raises Unavailable."""
        self._read_through(ca)
        return self._published.get(ca)

    def publish(self, ca: str, documents: Sequence[Document]) -> Published:
        """Store `documents` as `ca`'s (replacing those of the same kinds) and serve them at
        once in this process. Raises Unavailable."""
        with self._lock:
            self._store.crls.publish(ca, [doc.row() for doc in documents])
            return self._serve(ca, documents)

    def publish_responder(
        self,
        ca: str,
        responder: Document,
        record: Row,
        *,
        replacing: x509.Certificate | None,
    ) -> Published:
        """Store the responder certificate `responder` as `ca`'s, with its inventory
        `record`, in place of `replacing` (the responder this process saw; None: none),
        and serve it at once in this process. Raises ConcurrentChange if another process
        published one meanwhile (nothing is stored), Unavailable."""
        der = replacing.public_bytes(serialization.Encoding.DER) if replacing else None
        with self._lock:
            self._store.crls.publish_responder(ca, responder.row(), record, replacing=der)
            return self._serve(ca, [responder])

    def _serve(self, ca: str, documents: Sequence[Document]) -> Published:
        """Serve `documents`, just stored, as `ca`'s in this process; the caller holds the
        lock."""
        published = self._published.get(ca, Published()).merged(documents)
        self._published[ca] = published
        return published


_LONG_AGO = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Answer:
    """A serial's status as one CA's responder gives it, and the pre-signed answer without a
    nonce (`der`, empty until one is signed) with the time to re-sign it."""

    status: CertStatus
    der: bytes = b""
    refresh_at: datetime = _LONG_AGO


class OcspAnswers(StoreMirror):
    """OCSP answers by serial, following the "certs" change feed: a change to a certificate
    (issued, revoked) drops what is cached about its serial. The store is read only on a
    miss, within `OCSP_MISSES_PER_SECOND` (`take_miss`)."""

    aggregate = "certs"

    def __init__(self, store: Store) -> None:
        self._answers: dict[int, dict[tuple[str, str], Answer]] = {}
        self._watched: dict[int, int] = {}  # serial -> how many changes the feed brought
        super().__init__(store, read_through_per_second=OCSP_MISSES_PER_SECOND)

    def _load(self) -> None:
        self._answers = {}
        self._watched = {serial: seen + 1 for serial, seen in self._watched.items()}

    def _load_item(self, item: str) -> None:
        with contextlib.suppress(ValueError):  # not a serial: nothing of ours to drop
            serial = int(item, 16)
            self._answers.pop(serial, None)
            if serial in self._watched and self.revoked(item):  # a responder's own
                self._watched[serial] += 1
                self._answers = {}  # what it signed is served no more

    def revoked(self, serial: str) -> bool:
        """Whether the inventory has the certificate `serial` (hex) revoked (a change to a
        responder's certificate that is not its revocation, such as its issuance, leaves
        what it signed in place). Raises Unavailable."""
        row = self._store.certs.get(serial)
        return row is not None and row["status"] == REVOKED

    def watch(self, serial: int) -> int:
        """Follow the changes of the certificate `serial` (a responder's own certificate:
        its change also drops every cached answer) and return how many there were so far,
        for `changed_after`. Call it before reading the certificate's state: a change the
        read did not see is then counted after it."""
        with self._lock:
            if serial not in self._watched and len(self._watched) >= MAX_CACHED_SERIALS:
                self._watched.clear()
            return self._watched.setdefault(serial, 0)

    def changed_after(self, serial: int, seen: int) -> bool:
        """Whether the certificate `serial` changed (was revoked) after `watch` returned
        `seen`; True for a serial no longer watched."""
        return self._watched.get(serial) != seen

    def get(self, serial: int, ca: str, cert_id_hash: str) -> tuple[Answer | None, int]:
        """The cached answer about `serial` (by CA and CertID hash), and the feed position to
        hand back to `put`."""
        by_ca = self._answers.get(serial)
        return (by_ca.get((ca, cert_id_hash)) if by_ca else None), self._epoch

    def put(self, serial: int, ca: str, cert_id_hash: str, answer: Answer, epoch: int) -> None:
        """Cache `answer`, read from the store when the feed was at `epoch`; skipped if the
        feed moved since (the certificate may have changed after it was read)."""
        with self._lock:
            if self._epoch != epoch:
                return
            by_ca = self._answers.get(serial)
            if by_ca is None:
                if len(self._answers) >= MAX_CACHED_SERIALS:
                    del self._answers[next(iter(self._answers))]
                by_ca = self._answers[serial] = {}
            by_ca[(ca, cert_id_hash)] = answer

    def take_miss(self) -> bool:
        """Whether a miss may read the store now (False once the budget is spent)."""
        return self._misses.take()


class CrlEntries:
    """A CA's CRL entries, made from the inventory's rows of its revoked certificates
    (`Crls.revoked`). The entry of a row seen at the last build is taken again: between two
    builds a CA's list changes by a few rows, and making an entry costs ~40 times more than
    finding it (100,000 rows: ~0.6 s against ~15 ms)."""

    def __init__(self) -> None:
        self._made: dict[RevokedRow, RevokedEntry] = {}

    def of(self, rows: Iterable[RevokedRow]) -> list[RevokedEntry]:
        """The entries of `rows`, in their order. `removeFromCRL` is not a reason a full CRL
        may carry: such a certificate is listed without a reason."""
        made, now, reason = self._made, {}, _reason
        entries: list[RevokedEntry] = []
        for row in rows:
            entry = made.get(row)
            if entry is None:
                serial, at, name = row
                entry = RevokedEntry(int(serial, 16), instant(at), reason(name))
            now[row] = entry
            entries.append(entry)
        self._made = now
        return entries


def cert_status(row: Row | None, ca: str) -> CertStatus:
    """The OCSP status of the inventory row of a serial, as CA `ca` answers for it."""
    if row is None or row["ca"] != ca:
        return CertStatus.unknown()
    if row["status"] != REVOKED:
        return CertStatus.good()
    return CertStatus.revoked(row["revoked_at"], _reason(row["reason"]))


def _reason(name: str | None) -> x509.ReasonFlags | None:
    """The reason a CRL entry or an OCSP answer gives for the inventory's reason name (none
    for an unknown name and for removeFromCRL, a delta-CRL instruction)."""
    reason = REASONS.get(name or "")
    return None if reason is x509.ReasonFlags.remove_from_crl else reason


def listed_serials(crl_der: bytes) -> frozenset[int]:
    """The serials a CRL lists."""
    return frozenset(entry.serial_number for entry in x509.load_der_x509_crl(crl_der))


_RESPONDER_CN = "OCSP responder"
_MAX_CN = 64  # ub-common-name (RFC 5280)


def responder_subject(ca_name: str, issuer: x509.Certificate) -> x509.Name:
    """A delegated responder's subject: the issuer's own name without its common names
    (each RDN keeps its other attributes), then `CN=<ca_name> OCSP responder` (`CN=OCSP
    responder` if that exceeds 64 characters). It stays under a directoryName constraint
    on the CA's organisation, and a host-like CN of the CA's is not judged against DNS
    constraints as the responder's."""
    common_name = f"{ca_name} {_RESPONDER_CN}"
    if len(common_name) > _MAX_CN:
        common_name = _RESPONDER_CN
    rdns = [
        x509.RelativeDistinguishedName(others)
        for rdn in issuer.subject.rdns
        if (others := [a for a in rdn if a.oid != x509.NameOID.COMMON_NAME])
    ]
    own = x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)
    return x509.Name([*rdns, x509.RelativeDistinguishedName([own])])


def responder_extensions(
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
) -> list[tuple[x509.ExtensionType, bool]]:
    """A delegated OCSP responder certificate's extensions: id-kp-OCSPSigning, nocheck, key
    usage, and the key identifiers (the authority's from `issuer`)."""
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        *delegated_responder_extensions(),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (authority_key_identifier(issuer), False),
    ]
