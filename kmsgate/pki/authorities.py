"""Certificate authorities: the model (`Authority`), its store rows, and the in-memory
catalogue of CAs that follows the "cas" change feed (issuance never waits on the database
to find its CA)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.errors import Conflict, NotFound
from kmsgate.store import READ_THROUGH_PER_SECOND, Row, Store, StoreMirror, utc
from kmsgate.text import utc_timestamp

CA_PURPOSE = "ca"
"""The purpose of a CA's key: it signs certificates, CRLs and OCSP responses, never raw data."""
OCSP_PURPOSE = "ocsp"
"""The purpose of a delegated OCSP responder's key: it signs OCSP responses only."""
PKI_PURPOSES = frozenset({CA_PURPOSE, OCSP_PURPOSE})
"""Purposes whose keys the raw `sign` operation refuses, whatever the policy says."""


class CaType(enum.StrEnum):
    KMSGATE = "kmsgate"
    HASHIVAULT_PKI = "hashivault-pki"


class CaState(enum.StrEnum):
    PENDING = "pending"
    """Its key exists and its CSR waits for the offline root's signature."""
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA as the gateway holds it. `chain` is its issuers, nearest first, root last."""

    name: str
    type: CaType
    state: CaState
    subject: str
    key_name: str | None
    """The kmsgate key (purpose `ca`) of a `kmsgate` CA; None for a Vault PKI CA."""
    csr_pem: str | None
    certificate: x509.Certificate | None
    chain: tuple[x509.Certificate, ...]
    crl_number: int
    created_at: datetime
    updated_at: datetime
    backend: str | None = None
    """The hashivault backend of a Vault PKI CA."""
    options: Mapping[str, str] = field(default_factory=dict)
    """A Vault PKI CA's `mount` and `role`."""

    @property
    def not_after(self) -> datetime | None:
        return self.certificate.not_valid_after_utc if self.certificate else None

    def active_certificate(self) -> x509.Certificate:
        """The CA's certificate. Raises Conflict while the CA is pending."""
        if self.state is not CaState.ACTIVE or self.certificate is None:
            raise Conflict(f"CA {self.name!r} is {self.state.value}: import its certificate")
        return self.certificate

    def chain_pem(self) -> str:
        """PEM of the issuers (nearest first, root last), without the CA's own certificate."""
        return "".join(_pem(c) for c in self.chain)

    def full_chain_pem(self) -> str:
        """PEM of the CA's certificate and its issuers, root last."""
        return _pem(self.active_certificate()) + self.chain_pem()

    def policy_resource(self) -> dict[str, object]:
        """The `resource` part of the policy input for actions on this CA."""
        return {"kind": "ca", "name": self.name, "type": self.type.value}

    def to_dict(self) -> dict[str, object]:
        """The REST representation; a pending CA's repeats its CSR (the reply of `create`
        may have been lost, and the CSR is public)."""
        parent = self.chain[0].subject.rfc4514_string() if self.chain else None
        not_after = self.not_after
        view: dict[str, object] = {
            "name": self.name,
            "type": self.type.value,
            "state": self.state.value,
            "subject": self.subject,
            "key": self.key_name,
            "parent": parent,
            "not_after": utc_timestamp(not_after) if not_after else None,
        }
        if self.state is CaState.PENDING:
            view["csr"] = self.csr_pem
        return view


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_chain(pem: str | None) -> tuple[x509.Certificate, ...]:
    """The certificates in a PEM bundle, in order. Raises ValueError if it does not parse."""
    return tuple(x509.load_pem_x509_certificates(pem.encode())) if pem else ()


def authority_from_row(row: Row) -> Authority:
    cert = (
        x509.load_pem_x509_certificate(row["certificate"].encode()) if row["certificate"] else None
    )
    return Authority(
        name=row["name"],
        type=CaType(row["type"]),
        state=CaState(row["state"]),
        subject=row["subject"],
        key_name=row["key_name"],
        csr_pem=row["csr"],
        certificate=cert,
        chain=load_chain(row["chain"]),
        crl_number=row["crl_number"],
        created_at=_aware(row["created_at"]),
        updated_at=_aware(row["updated_at"]),
        backend=row["backend"],
        options=row["options"] or {},
    )


def _aware(value: datetime) -> datetime:
    aware = utc(value)
    assert aware is not None  # the column is NOT NULL
    return aware


def authority_row(ca: Authority) -> dict[str, Any]:
    return {
        "name": ca.name,
        "type": ca.type.value,
        "state": ca.state.value,
        "key_name": ca.key_name,
        "subject": ca.subject,
        "csr": ca.csr_pem,
        "certificate": _pem(ca.certificate) if ca.certificate else None,
        "chain": ca.chain_pem() or None,
        "not_after": ca.not_after,
        "crl_number": ca.crl_number,
        "created_at": ca.created_at,
        "updated_at": ca.updated_at,
        "backend": ca.backend,
        "options": dict(ca.options) or None,
    }


class Authorities(StoreMirror):
    """All CAs in memory, following the "cas" change feed; writes go through the store."""

    aggregate = "cas"

    def __init__(
        self, store: Store, *, read_through_per_second: float = READ_THROUGH_PER_SECOND
    ) -> None:
        self._cas: dict[str, Authority] = {}
        super().__init__(store, read_through_per_second=read_through_per_second)

    def _load(self) -> None:
        self._cas = {row["name"]: authority_from_row(row) for row in self._store.cas.all()}

    def _load_item(self, item: str) -> None:
        row = self._store.cas.get(item)
        if row is None:
            self._cas.pop(item, None)
        else:
            self._cas[item] = authority_from_row(row)

    def find(self, name: str, *, read_through: bool = True) -> Authority | None:
        """The CA called `name`, or None (a miss reads through, within the budget, unless
        told not to). Raises Unavailable (a read-through while the store is down)."""
        ca = self._cas.get(name)
        if ca is None and read_through and 0 < len(name) <= 128 and self._read_through(name):
            ca = self._cas.get(name)
        return ca

    def find_current(self, name: str) -> Authority | None:
        """`find`, but a CA this cache holds as pending is read again: another worker or
        replica may have activated it since the cache last followed the feed."""
        ca = self.find(name)
        if ca is not None and ca.state is CaState.PENDING and self._read_through(name):
            ca = self._cas.get(name)
        return ca

    def get(self, name: str) -> Authority:
        """The CA called `name`. Raises NotFound."""
        ca = self.find(name)
        if ca is None:
            raise NotFound(f"no CA named {name!r}")
        return ca

    def all(self) -> Sequence[Authority]:
        return sorted(self._cas.values(), key=lambda ca: ca.name)

    def insert(self, ca: Authority) -> Authority:
        """Store a new CA. Raises Conflict if the name is taken."""
        with self._lock:
            self._store.cas.insert(authority_row(ca))
            self._cas[ca.name] = ca
        return ca

    def activate(
        self,
        ca: Authority,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        at: datetime,
    ) -> Authority:
        """Store the CA's certificate and chain and mark it active. Raises Conflict if
        another writer changed its state meanwhile."""
        active = replace(
            ca,
            state=CaState.ACTIVE,
            subject=certificate.subject.rfc4514_string(),
            certificate=certificate,
            chain=tuple(chain),
            updated_at=at,
        )
        row = authority_row(active)
        with self._lock:
            self._store.cas.update(
                ca.name,
                {
                    k: row[k]
                    for k in ("state", "subject", "certificate", "chain", "not_after", "updated_at")
                },
                expected_state=ca.state.value,
            )
            self._cas[ca.name] = active
        return active
