"""The checks a CA certificate and its chain pass before a pending CA is activated with them:
the certificate is for the CA's key, and each link is a CA that may issue what is below it,
valid now, signed by the next, up to a self-signed root."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from kmsgate.errors import InvalidRequest
from kmsgate.pki.extensions import extension_value
from kmsgate.text import utc_timestamp


def check_ca_certificate(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    public_key: CertificatePublicKeyTypes,
    at: datetime,
) -> None:
    """Raises InvalidRequest unless `cert` is a CA certificate for `public_key` and `chain`
    links it, issuer by issuer, to a self-signed root (each valid at `at`)."""
    if cert.public_key() != public_key:
        raise InvalidRequest("the certificate is for another key than this CA's")
    if not chain:
        raise InvalidRequest("send the chain up to the root (at least the root certificate)")
    links = [cert, *chain]
    for below, link in enumerate(links):
        _check_issuing_ca(link, below, at)
    for child, parent in itertools.pairwise(links):
        try:
            child.verify_directly_issued_by(parent)
        except InvalidSignature:
            why = "its signature does not verify with the issuer's key"
        except (ValueError, TypeError):
            why = "its issuer name or signature algorithm does not match the issuer's"
        else:
            continue
        raise InvalidRequest(f"{_called(child)} is not issued by {_called(parent)}: {why}")
    root = links[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidRequest("the chain does not end in a self-signed root") from None


def _called(cert: x509.Certificate) -> str:
    """How a message names `cert`: its subject, or its serial when the subject is empty."""
    return cert.subject.rfc4514_string() or f"the certificate with serial {cert.serial_number:x}"


def _check_issuing_ca(cert: x509.Certificate, below: int, at: datetime) -> None:
    """Raises InvalidRequest unless `cert`, with `below` CA certificates under it down to the
    imported one (0: it is that one), may issue what that CA will: a CA (basicConstraints)
    whose key usage, if stated, allows certificates (and CRLs, for the imported one), whose
    path length leaves room for those CAs, and
    which is valid at `at` (what `openssl verify` checks on every issuer of a leaf)."""
    name = _called(cert)
    constraints = extension_value(cert.extensions, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise InvalidRequest(f"{name} is not a CA certificate (basicConstraints ca)")
    usage = extension_value(cert.extensions, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise InvalidRequest(f"{name}: its key usage does not allow keyCertSign")
    if usage is not None and below == 0 and not usage.crl_sign:
        raise InvalidRequest(f"{name}: its key usage does not allow cRLSign (for its CRLs)")
    limit = constraints.path_length
    if limit is not None and limit < below:
        raise InvalidRequest(
            f"{name}: its path length {limit} allows {limit} CA certificate(s) below it, "
            f"the chain has {below}"
        )
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise InvalidRequest(
            f"{name} is valid from {utc_timestamp(cert.not_valid_before_utc)} to "
            f"{utc_timestamp(cert.not_valid_after_utc)}, not now"
        )
