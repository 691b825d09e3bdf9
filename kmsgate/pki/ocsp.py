"""OCSP (RFC 6960): parse a request, build the signed answer. Pure, no storage.

The responder is either the CA itself or a delegated responder: a certificate the CA issued
with id-kp-OCSPSigning (see `delegated_responder_extensions`), which is then included in the
response so that clients can check it. The responder key may be any cryptography private-key
object, including a "remote" key delegating to an HSM or KMS: it is only used through
cryptography's builder (one `sign` call) and `public_key()`.

A request for another CA is answered with `unauthorized_response()`, one that cannot be
parsed with `malformed_response()` (RFC 6960 §2.3).
"""

from __future__ import annotations

import datetime
import enum
import functools
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmsgate.errors import InvalidRequest
from kmsgate.pki.extensions import extension_value
from kmsgate.pki.issuer import key_usage

__all__ = [
    "AUTO_HASH",
    "CertStatus",
    "MalformedOcspRequest",
    "build_response",
    "delegated_responder_extensions",
    "issuer_matches",
    "malformed_response",
    "parse_request",
    "request_nonce",
    "try_later_response",
    "unauthorized_response",
]

# RFC 9654 §2.1 (which obsoletes RFC 8954): a nonce is 1 to 128 octets, anything else is a
# malformed request; a responder echoes 16 to 32 octets and may leave out the rest: we echo
# 1 to 32.
MAX_NONCE_LENGTH = 32
_NONCE_LIMIT = 128


class MalformedOcspRequest(InvalidRequest):
    """The bytes are not a single-certificate OCSP request; answer `malformed_response()`."""

    code = "malformed_ocsp_request"
    title = "Malformed OCSP request"


class _Auto(enum.Enum):
    AUTO = "auto"


AUTO_HASH = _Auto.AUTO
"""`build_response`'s default signature hash: SHA-256, or none for an Ed25519/Ed448 key."""

_STATUS = {
    "good": ocsp.OCSPCertStatus.GOOD,
    "revoked": ocsp.OCSPCertStatus.REVOKED,
    "unknown": ocsp.OCSPCertStatus.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class CertStatus:
    """What the responder says about one certificate. `revoked_at` (timezone-aware) is set
    exactly when the status is revoked; `reason` is optional and only for revoked.

    Raises InvalidRequest when the fields do not fit together, or for removeFromCRL (a CRL
    delta instruction, not a revocation reason).
    """

    status: Literal["good", "revoked", "unknown"]
    revoked_at: datetime.datetime | None = None
    reason: x509.ReasonFlags | None = None

    def __post_init__(self) -> None:
        if self.status not in _STATUS:
            raise InvalidRequest(f"unknown certificate status {self.status!r}")
        if self.status == "revoked":
            if self.revoked_at is None or self.revoked_at.utcoffset() is None:
                raise InvalidRequest("a revoked status needs a timezone-aware revoked_at")
            if self.reason is x509.ReasonFlags.remove_from_crl:
                raise InvalidRequest("removeFromCRL is not a revocation reason")
        elif self.revoked_at is not None or self.reason is not None:
            raise InvalidRequest(f"a {self.status} status has no revocation time or reason")

    @classmethod
    def good(cls) -> CertStatus:
        return cls("good")

    @classmethod
    def unknown(cls) -> CertStatus:
        return cls("unknown")

    @classmethod
    def revoked(
        cls, revoked_at: datetime.datetime, reason: x509.ReasonFlags | None = None
    ) -> CertStatus:
        return cls("revoked", revoked_at, reason)


def parse_request(der: bytes) -> ocsp.OCSPRequest:
    """The OCSP request in `der`.

    Raises MalformedOcspRequest when it is not DER, not an OCSP request, asks about more than
    one certificate, has unreadable extensions, a nonce of no octet or more than 128 (RFC
    9654), or names a negative serial number (no certificate has one, RFC 5280 §4.1.2.2,
    and no answer can carry it).
    """
    if not isinstance(der, bytes | bytearray | memoryview):
        raise MalformedOcspRequest("an OCSP request is bytes")
    try:
        request = ocsp.load_der_ocsp_request(bytes(der))
        # Extensions are decoded on first access: decode them now, so a bad one fails here.
        _ = request.extensions
    except NotImplementedError:
        # cryptography reads one-certificate requests only (what clients send in practice)
        raise MalformedOcspRequest(
            "the OCSP request asks about more than one certificate"
        ) from None
    except (ValueError, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        raise MalformedOcspRequest(f"malformed OCSP request: {exc}") from None
    if request.serial_number < 0:
        raise MalformedOcspRequest("the OCSP request names a negative serial number")
    nonce = request_nonce(request)
    if nonce is not None and not 0 < len(nonce) <= _NONCE_LIMIT:
        raise MalformedOcspRequest(f"the OCSP nonce is {len(nonce)} octets, not 1-{_NONCE_LIMIT}")
    return request


@functools.cache
def malformed_response() -> bytes:
    """The DER of an OCSPResponse with status malformedRequest (unsigned, RFC 6960 §2.3)."""
    return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)


@functools.cache
def unauthorized_response() -> bytes:
    """The DER of an OCSPResponse with status unauthorized: the request is about a certificate
    this responder does not answer for (another issuer)."""
    return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)


@functools.cache
def try_later_response() -> bytes:
    """The DER of an OCSPResponse with status tryLater: the responder cannot answer now."""
    return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


def request_nonce(request: ocsp.OCSPRequest) -> bytes | None:
    """The nonce of the request's id-pkix-ocsp-nonce extension, or None when it has none."""
    nonce = extension_value(request.extensions, x509.OCSPNonce)
    return nonce.nonce if nonce is not None else None


def issuer_matches(request: ocsp.OCSPRequest, issuer: x509.Certificate) -> bool:
    """Whether the request's CertID names `issuer`: the hashes of its subject name and of its
    public key, under the request's own hash algorithm. False for a hash we cannot compute."""
    try:
        algorithm = request.hash_algorithm
        name_hash, key_hash = _issuer_hashes(issuer, algorithm.name)
    except (UnsupportedAlgorithm, ValueError):
        return False
    return request.issuer_name_hash == name_hash and request.issuer_key_hash == key_hash


_CERT_ID_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    h.name: h for h in (hashes.SHA1, hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512)
}


@functools.lru_cache(maxsize=64)
def _issuer_hashes(issuer: x509.Certificate, algorithm: str) -> tuple[bytes, bytes]:
    """(name hash, key hash) of `issuer` as a CertID carries them (RFC 6960 §4.1.1): the hash
    of the DER of its subject name, and of the value of its subjectPublicKey BIT STRING.

    For the key hash we let cryptography's request builder read the BIT STRING straight from
    the certificate, with the issuer standing in as the certificate asked about (the builder's
    name hash is then the issuer's own issuer, so we do not use it). Raises ValueError for an
    unsupported hash.
    """
    hash_class = _CERT_ID_HASHES.get(algorithm)
    if hash_class is None:
        raise ValueError(f"unsupported CertID hash {algorithm}")
    digest = hashes.Hash(hash_class())
    digest.update(issuer.subject.public_bytes())
    probe = ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, hash_class()).build()
    return digest.finalize(), probe.issuer_key_hash


def delegated_responder_extensions() -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions, as (value, critical) pairs, that a delegated OCSP responder certificate
    needs (RFC 6960 §4.2.2.2): extended key usage id-kp-OCSPSigning, id-pkix-ocsp-nocheck (its
    own status is not checked) and key usage digitalSignature. The CA adds them with
    `CertificateBuilder.add_extension(value, critical)`, besides its usual key identifiers."""
    return [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
        (x509.OCSPNoCheck(), False),
        (key_usage(digital_signature=True), True),
    ]


@dataclass(frozen=True, slots=True)
class Responder:
    """Who signs a CA's OCSP answers: the CA's own certificate, or a delegated responder
    certificate the CA issued, with its key. Make one with `checked`, once per certificate:
    the answers it signs are then not checked again."""

    issuer: x509.Certificate
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @classmethod
    def checked(
        cls,
        issuer: x509.Certificate,
        certificate: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
    ) -> Responder:
        """Raises InvalidRequest unless `key` is `certificate`'s and the certificate is
        `issuer` or a responder `issuer` delegated to (RFC 6960 §4.2.2.2): issued by
        `issuer`, with id-kp-OCSPSigning."""
        if key.public_key() != certificate.public_key():
            raise InvalidRequest("the responder key does not match the responder certificate")
        if certificate != issuer:
            try:
                certificate.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise InvalidRequest(
                    "the responder certificate was not issued by the issuer"
                ) from exc
            usage = extension_value(certificate.extensions, x509.ExtendedKeyUsage)
            if usage is None or ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
                raise InvalidRequest("the responder certificate lacks id-kp-OCSPSigning")
        return cls(issuer, certificate, key)


def build_response(
    *,
    request: ocsp.OCSPRequest,
    responder: Responder,
    status: CertStatus,
    this_update: datetime.datetime,
    next_update: datetime.datetime | None,
    include_nonce: bool,
    hash_alg: hashes.HashAlgorithm | _Auto | None = AUTO_HASH,
) -> bytes:
    """The DER of a successful OCSP response about the certificate `request` asks for, signed
    by `responder`.

    A delegated responder's certificate is included in the response. The responder is
    identified by key hash. With `include_nonce`, the request's nonce (if any, and at most
    32 octets) is echoed. `hash_alg` is the signature hash (default: SHA-256, none for EdDSA).

    Raises InvalidRequest when the request is about another issuer (answer
    `unauthorized_response()` instead), a time is naive, or next_update is not after
    this_update.
    """
    if not issuer_matches(request, responder.issuer):
        raise InvalidRequest("the OCSP request is about another issuer")
    if this_update.utcoffset() is None:
        raise InvalidRequest("this_update has no timezone")
    if next_update is not None:
        if next_update.utcoffset() is None:
            raise InvalidRequest("next_update has no timezone")
        if next_update <= this_update:
            raise InvalidRequest("next_update must be after this_update")

    reason = status.reason
    if reason is x509.ReasonFlags.unspecified:
        reason = None  # as in CRLs (RFC 5280 §5.3.1): absent rather than unspecified
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        serial_number=request.serial_number,
        algorithm=request.hash_algorithm,
        cert_status=_STATUS[status.status],
        this_update=this_update,
        next_update=next_update,
        revocation_time=status.revoked_at,
        revocation_reason=reason,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
    if responder.certificate != responder.issuer:
        builder = builder.certificates([responder.certificate])
    if include_nonce:
        nonce = request_nonce(request)
        if nonce is not None and 0 < len(nonce) <= MAX_NONCE_LENGTH:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)

    algorithm = _default_hash(responder.key) if isinstance(hash_alg, _Auto) else hash_alg
    response = builder.sign(responder.key, algorithm)
    return response.public_bytes(serialization.Encoding.DER)


def _default_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()
