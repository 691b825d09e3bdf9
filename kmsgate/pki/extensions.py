"""Reading a certificate's (or a request's) extensions."""

from __future__ import annotations

from typing import TypeVar

from cryptography import x509

ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def extension_value(extensions: x509.Extensions, kind: type[ExtensionT]) -> ExtensionT | None:
    """The value of the extension of class `kind` in `extensions`, None if there is none."""
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """How what `issuer` signs (a certificate, a CRL) names its key: by the issuer's
    subjectKeyIdentifier, or when it has none, by the RFC 5280 method-1 hash of its public
    key (what a derived subjectKeyIdentifier would hold)."""
    ski = extension_value(issuer.extensions, x509.SubjectKeyIdentifier)
    if ski is None:
        ski = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
