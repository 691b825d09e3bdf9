"""Building certificates: random serials, validity bounded by the issuer's, the signature
hash that fits the CA's key, and the URLs (CRL, OCSP, CA issuers) relying parties follow."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import AuthorityInformationAccessOID

from kmsgate.errors import InvalidRequest
from kmsgate.text import quoted

SERIAL_BITS = 159
BACKDATE = timedelta(minutes=1)
"""not_before is set this far in the past: clocks of relying parties drift."""


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A keyUsage granting only what is named: the uses a CA gives its certificates (no
    key transport or agreement, which TLS 1.3 and ECDHE never need)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def new_serial() -> int:
    """A random positive serial of up to 159 bits (RFC 5280 allows 20 octets; the top bit
    stays clear so the DER integer needs no sign padding)."""
    return secrets.randbits(SERIAL_BITS) or 1


def serial_hex(serial: int) -> str:
    """The API's form of a serial: lowercase hex, no separators."""
    return format(serial, "x")


_SERIAL_DIGITS = 64
"""The most hex digits a serial may be written with (leading zeros included)."""
_SERIAL_TEXT = re.compile(r"[0-9a-fA-F]+\Z")


def parse_serial(text: str) -> int:
    """A serial from its hex form, in any case, with leading zeros or colons between bytes
    (as `openssl x509 -serial` and certificate viewers print it). Raises InvalidRequest."""
    digits = text.replace(":", "")
    if len(digits) > _SERIAL_DIGITS:
        raise InvalidRequest(
            f"serial is {len(digits)} characters long; at most {_SERIAL_DIGITS} hex digits"
        )
    if not _SERIAL_TEXT.match(digits):
        raise InvalidRequest(f"serial {quoted(text)} is not hexadecimal")
    serial = int(digits, 16)
    if not 0 < serial < 1 << 160:
        raise InvalidRequest("serial out of range (1 to 2^160 - 1)")
    return serial


def signature_hash(key: CertificatePublicKeyTypes) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash a CA with this key signs with (None for Ed25519, which hashes itself)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return hashes.SHA256()
    raise InvalidRequest(f"a {type(key).__name__} cannot sign certificates")


def validity(issuer: x509.Certificate, ttl: timedelta, now: datetime) -> tuple[datetime, datetime]:
    """(not_before, not_after) for a certificate of `ttl` issued now, never past the
    issuer's own not_after. Raises InvalidRequest if the issuer has expired."""
    not_after = min(now + ttl, issuer.not_valid_after_utc)
    if not_after <= now:
        raise InvalidRequest("the CA's certificate has expired; it cannot issue")
    return now - BACKDATE, not_after


def crl_distribution_point(url: str) -> x509.CRLDistributionPoints:
    """The one place relying parties find the issuer's full CRL: `url`."""
    point = x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)],
        relative_name=None,
        reasons=None,
        crl_issuer=None,
    )
    return x509.CRLDistributionPoints([point])


def distribution_extensions(base_url: str | None, ca: str) -> list[x509.ExtensionType]:
    """CRL distribution point and authority information access (OCSP, CA issuers: the
    issuing CA's certificate in DER, as RFC 5280 4.2.2.1 asks) under `base_url`, the
    gateway's public address; none without one."""
    if not base_url:
        return []
    root = f"{base_url.rstrip('/')}/v1/pki/cas/{ca}"
    return [
        crl_distribution_point(f"{root}/crl"),
        x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(f"{root}/ocsp"),
                ),
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(f"{root}/certificate"),
                ),
            ]
        ),
    ]


def build_certificate(
    *,
    issuer: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate signed by `key` (the issuer's, possibly held by a backend). Raises
    what the key's backend raises."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, signature_hash(issuer.public_key()))
