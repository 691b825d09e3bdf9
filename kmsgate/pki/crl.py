"""Certificate revocation lists (RFC 5280 §5): pure builders, no storage.

`build_crl` returns the DER of a full CRL or, with `delta_base`, of a delta CRL. The CA key may
be any cryptography private-key object, including a "remote" key that delegates signing to an
HSM or KMS: it is only used through cryptography's builder (one `sign` call) and
`public_key()`.

All entries go into the builder at once: `CertificateRevocationListBuilder.add_revoked_certificate`
copies the list on every call, which makes a large CRL quadratic.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)

from kmsgate.errors import InvalidRequest
from kmsgate.pki.extensions import authority_key_identifier, extension_value

__all__ = [
    "CA_REVOCATION_REASONS",
    "LEAF_REVOCATION_REASONS",
    "REASONS",
    "CrlHash",
    "RevokedEntry",
    "build_crl",
    "parse_reason",
]

# RFC 5280 §5.3.1 CRLReason names -> cryptography's flags. Reason code 7 is unused.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "removeFromCRL": x509.ReasonFlags.remove_from_crl,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
CA_REVOCATION_REASONS = tuple(
    name for name in REASONS if name not in ("removeFromCRL", "certificateHold", "aACompromise")
)
"""The reasons a CA certificate is revoked for: removeFromCRL only ends a hold, every
revocation here is final (so never a hold), and aACompromise is an attribute authority's."""
LEAF_REVOCATION_REASONS = tuple(name for name in CA_REVOCATION_REASONS if name != "cACompromise")
"""The reasons an end-entity certificate is revoked for (RFC 5280 §5.3.1: cACompromise is a
CA's)."""

# The signature hashes cryptography accepts for a CRL (None: Ed25519/Ed448, which hash
# internally).
CrlHash = (
    hashes.SHA224
    | hashes.SHA256
    | hashes.SHA384
    | hashes.SHA512
    | hashes.SHA3_224
    | hashes.SHA3_256
    | hashes.SHA3_384
    | hashes.SHA3_512
)

# CRL numbers and serial numbers are at most 20 octets (RFC 5280 §4.1.2.2, §5.2.3).
_MAX_INTEGER = 1 << 159

# One shared entry-extension list per reason: entries only read it, and sharing saves building
# 100,000 identical Extension objects. `unspecified` has none: RFC 5280 §5.3.1 says the reason
# code SHOULD be absent rather than unspecified.
_NO_EXTENSIONS: list[x509.Extension[x509.ExtensionType]] = []
_ENTRY_EXTENSIONS: dict[x509.ReasonFlags | None, list[x509.Extension[x509.ExtensionType]]] = {
    None: _NO_EXTENSIONS,
    x509.ReasonFlags.unspecified: _NO_EXTENSIONS,
    **{
        flag: [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag))]
        for flag in x509.ReasonFlags
        if flag is not x509.ReasonFlags.unspecified
    },
}


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One revoked certificate: its serial, when it was revoked (timezone-aware, UTC) and why
    (None: no reason code)."""

    serial: int
    revoked_at: datetime.datetime
    reason: x509.ReasonFlags | None = None


class KeptEntries:
    """The entries of a CA's last CRL, kept for its next build: between two builds a CRL
    changes by a few entries, and building one costs about 100 times more than finding it
    (100,000 entries: ~0.8 s against ~10 ms). An entry encodes only its serial, time and
    reason, so a kept one is the very entry a new build would make."""

    def __init__(self) -> None:
        self.entries: dict[RevokedEntry, x509.RevokedCertificate] = {}


def parse_reason(name: str, names: Sequence[str] = tuple(REASONS)) -> x509.ReasonFlags:
    """The `ReasonFlags` for an RFC 5280 reason name such as ``keyCompromise``, one of
    `names` (for a revocation: `LEAF_REVOCATION_REASONS` or `CA_REVOCATION_REASONS`).

    Raises InvalidRequest for any other name; the message lists the valid ones.
    """
    if name not in names:
        what = "does not apply here" if name in REASONS else "is unknown"
        raise InvalidRequest(f"revocation reason {name!r} {what}; valid: {', '.join(names)}")
    return REASONS[name]


def build_crl(
    *,
    issuer: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    revoked: Sequence[RevokedEntry],
    number: int,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
    delta_base: int | None = None,
    freshest_url: str | None = None,
    hash_alg: CrlHash | None,
    kept: KeptEntries | None = None,
) -> bytes:
    """The DER of a CRL signed by `key`, the private half of `issuer`'s public key.

    Without `delta_base`: a full CRL with CRL number, authority key identifier and, when
    `freshest_url` is given, a freshest-CRL pointer to the delta CRLs. With `delta_base`: a
    delta CRL (critical delta CRL indicator naming the base CRL number) carrying only the
    entries given. `hash_alg` is the signature hash (None for Ed25519/Ed448 keys). `kept`:
    the entries of the previous build to take again, replaced by this build's.

    Raises InvalidRequest when the key does not match the issuer, the issuer may not sign CRLs,
    a time is naive or next_update is not after this_update, a number or serial is out of
    range, a serial repeats, removeFromCRL appears in a full CRL, or a delta CRL is given a
    freshest_url.
    """
    _check_issuer(issuer, key)
    _check_time("this_update", this_update)
    _check_time("next_update", next_update)
    if next_update <= this_update:
        raise InvalidRequest("next_update must be after this_update")
    if not 0 <= number < _MAX_INTEGER:
        raise InvalidRequest("CRL number out of range (0 to 2^159 - 1)")

    extensions: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
        x509.Extension(x509.AuthorityKeyIdentifier.oid, False, authority_key_identifier(issuer)),
    ]
    is_delta = delta_base is not None
    if delta_base is not None:
        if not 0 <= delta_base < number:
            raise InvalidRequest("delta_base must be a CRL number below this CRL's number")
        if freshest_url is not None:
            # RFC 5280 §5.2.6: the freshest CRL extension MUST NOT appear in a delta CRL.
            raise InvalidRequest("a delta CRL carries no freshest CRL pointer")
        extensions.append(
            x509.Extension(x509.DeltaCRLIndicator.oid, True, x509.DeltaCRLIndicator(delta_base))
        )
    elif freshest_url is not None:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(freshest_url)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        extensions.append(x509.Extension(x509.FreshestCRL.oid, False, x509.FreshestCRL([point])))

    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=extensions,
        revoked_certificates=_entries(revoked, is_delta, kept),
    )
    crl = builder.sign(key, hash_alg)
    return crl.public_bytes(serialization.Encoding.DER)


def _entries(
    revoked: Sequence[RevokedEntry], is_delta: bool, kept: KeptEntries | None
) -> list[x509.RevokedCertificate]:
    """The CRL entries, built in one pass (those in `kept` taken from it; `kept` then holds
    these); raises InvalidRequest for a bad entry."""
    seen: set[int] = set()
    previous = kept.entries if kept is not None else {}
    now: dict[RevokedEntry, x509.RevokedCertificate] = {}
    entries: list[x509.RevokedCertificate] = []
    append = entries.append
    new_entry = x509.RevokedCertificateBuilder
    extensions_for = _ENTRY_EXTENSIONS
    remove = x509.ReasonFlags.remove_from_crl
    for entry in revoked:
        serial = entry.serial
        if not 0 < serial < _MAX_INTEGER:
            raise InvalidRequest(f"serial {serial} out of range (1 to 2^159 - 1)")
        if serial in seen:
            raise InvalidRequest(f"serial {serial:#x} listed twice")
        seen.add(serial)
        if entry.revoked_at.utcoffset() is None:
            raise InvalidRequest(f"revocation time of serial {serial:#x} has no timezone")
        if entry.reason is remove and not is_delta:
            # RFC 5280 §5.3.1: removeFromCRL is only used in delta CRLs.
            raise InvalidRequest("removeFromCRL may only appear in a delta CRL")
        built = previous.get(entry)
        if built is None:
            # The constructor, unlike the chained setters, makes no intermediate copies.
            built = new_entry(serial, entry.revoked_at, extensions_for[entry.reason]).build()
        append(built)
        if kept is not None:
            now[entry] = built
    if kept is not None:
        kept.entries = now
    return entries


def _check_issuer(issuer: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> None:
    """Raises InvalidRequest when `key` is not `issuer`'s key or `issuer` may not sign CRLs."""
    if key.public_key() != issuer.public_key():
        raise InvalidRequest("the signing key does not match the issuer certificate")
    usage = extension_value(issuer.extensions, x509.KeyUsage)
    if usage is not None and not usage.crl_sign:
        raise InvalidRequest("the issuer certificate's key usage does not allow cRLSign")


def _check_time(name: str, value: datetime.datetime) -> None:
    if value.utcoffset() is None:
        raise InvalidRequest(f"{name} has no timezone")
