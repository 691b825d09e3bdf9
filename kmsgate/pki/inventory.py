"""The inventory's record of an issued certificate, and its store row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kmsgate.errors import Unavailable
from kmsgate.pki.extensions import extension_value
from kmsgate.pki.issuer import serial_hex
from kmsgate.store import Row, Store
from kmsgate.store.certificates import REVOKED, VALID
from kmsgate.store.mirror import StoreMirror
from kmsgate.text import utc_timestamp

MAX_PRESENTED = 100_000
"""Client certificates whose inventory facts one process keeps."""


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """What the gateway knows of a certificate it issued."""

    serial: str
    ca: str
    subject: str
    sans: tuple[str, ...]
    """`dns:name`, `ip:address`, `uri:value` or `email:address`."""
    profile: str
    key_type: str
    not_before: datetime
    not_after: datetime
    status: str
    revoked_at: datetime | None
    reason: str | None
    owner: str
    fingerprint: str
    pem: str

    def state(self, now: datetime | None = None) -> str:
        """`valid`, `revoked` or `expired` (a revoked certificate stays revoked)."""
        if self.status == REVOKED:
            return REVOKED
        return "expired" if self.not_after <= (now or datetime.now(UTC)) else VALID

    def policy_resource(self) -> dict[str, object]:
        return {
            "kind": "cert",
            "name": self.serial,
            "ca": self.ca,
            "profile": self.profile,
            "owner": self.owner,
            "sans": list(self.sans),
        }

    def to_dict(self) -> dict[str, object]:
        """The REST representation (the certificate itself is in `certificate`, PEM)."""
        return {
            "serial": self.serial,
            "ca": self.ca,
            "subject": self.subject,
            "sans": list(self.sans),
            "profile": self.profile,
            "key_type": self.key_type,
            "not_before": utc_timestamp(self.not_before),
            "not_after": utc_timestamp(self.not_after),
            "status": self.state(),
            "revoked_at": utc_timestamp(self.revoked_at) if self.revoked_at else None,
            "reason": self.reason,
            "owner": self.owner,
            "fingerprint": self.fingerprint,
        }


def san_strings(sans: x509.SubjectAlternativeName | list[x509.GeneralName]) -> tuple[str, ...]:
    """SANs as `type:value` strings (the inventory's and the policy's form); DNS names in
    lower case, as they compare."""
    out = []
    for name in sans:
        if isinstance(name, x509.DNSName):
            out.append(f"dns:{name.value.lower()}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"ip:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            out.append(f"uri:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            out.append(f"email:{name.value}")
    return tuple(out)


def requested_sans(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    """The SANs a CSR asks for as `san_strings` (what the policy decides on; the profile
    checks them): none when its extensions cannot be read, also when one is repeated (the
    profile refuses that CSR). Never raises."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return ()
    return san_strings(sans)


def record_of(
    cert: x509.Certificate, *, ca: str, profile: str, key_type: str, owner: str
) -> CertificateRecord:
    """The inventory record of a certificate just issued."""
    sans = extension_value(cert.extensions, x509.SubjectAlternativeName)
    names = san_strings(sans) if sans is not None else ()
    return CertificateRecord(
        serial=serial_hex(cert.serial_number),
        ca=ca,
        subject=cert.subject.rfc4514_string(),
        sans=names,
        profile=profile,
        key_type=key_type,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        status=VALID,
        revoked_at=None,
        reason=None,
        owner=owner,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def record_row(record: CertificateRecord) -> dict[str, Any]:
    return {
        "serial": record.serial,
        "ca": record.ca,
        "subject": record.subject,
        "sans": list(record.sans),
        "profile": record.profile,
        "key_type": record.key_type,
        "not_before": record.not_before,
        "not_after": record.not_after,
        "status": record.status,
        "revoked_at": record.revoked_at,
        "reason": record.reason,
        "owner": record.owner,
        "fingerprint": record.fingerprint,
        "certificate": record.pem,
    }


def record_from_row(row: Row) -> CertificateRecord:
    return CertificateRecord(
        serial=row["serial"],
        ca=row["ca"],
        subject=row["subject"],
        sans=tuple(row["sans"]),
        profile=row["profile"],
        key_type=row["key_type"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        status=row["status"],
        revoked_at=row["revoked_at"],
        reason=row["reason"],
        owner=row["owner"],
        fingerprint=row["fingerprint"],
        pem=row["certificate"],
    )


@dataclass(frozen=True, slots=True)
class InventoryFacts:
    """What the inventory says about one issued certificate."""

    ca: str
    profile: str
    revoked: bool
    fingerprint: str
    """SHA-256 of the certificate's DER, hex."""


class PresentedCertificates(StoreMirror):
    """The inventory's facts about the certificates clients present (mTLS), by serial:
    read from the store the first time a serial is asked for, then kept and updated from the
    "certs" change feed (a revocation reaches every process within a refresh)."""

    aggregate = "certs"

    def __init__(self, store: Store) -> None:
        self._facts: dict[str, InventoryFacts | None] = {}
        super().__init__(store)

    def _load(self) -> None:
        self._facts = {}

    def _load_item(self, item: str) -> None:
        if item in self._facts:  # only serials asked for are kept
            self._facts[item] = self._read(item)

    def _read(self, serial: str) -> InventoryFacts | None:
        row = self._store.certs.get(serial)
        if row is None:
            return None
        revoked = row["status"] == REVOKED
        return InventoryFacts(row["ca"], row["profile"], revoked, row["fingerprint"])

    def find(self, serial: int) -> InventoryFacts | None:
        """The facts about `serial`, None if kmsgate did not issue it. Raises Unavailable
        (the store is down, or too many unknown serials are asked for at once)."""
        key = serial_hex(serial)
        if key in self._facts:
            return self._facts[key]
        if not self._misses.take():
            raise Unavailable("too many new client certificates at once; retry")
        with self._lock:
            if len(self._facts) >= MAX_PRESENTED:
                del self._facts[next(iter(self._facts))]
            facts = self._facts[key] = self._read(key)
        return facts
