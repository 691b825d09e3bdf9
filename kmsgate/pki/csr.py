"""Certificate requests: those made here (a fresh key and a CSR naming the given subject
alternative names, for the CLI's `cert issue --key-out` and the gateway's own TLS
certificate), and the check of a received CSR's self-signature."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.errors import InvalidRequest

__all__ = ["check_csr_signature", "new_key_and_csr", "parse_san"]

_BROKEN_HASHES = {"sha1": "SHA-1", "md5": "MD5"}
"""Hashes whose signatures are refused (collisions are practical): named in the refusal,
where a signature made with them would read as a damaged CSR."""


def check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    """Raises InvalidRequest unless `csr`'s self-signature verifies, naming a refused hash
    (SHA-1, MD5) or an algorithm this gateway cannot check."""
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise InvalidRequest("the CSR is signed with an algorithm kmsgate cannot check") from None
    if algorithm is not None and algorithm.name in _BROKEN_HASHES:
        raise InvalidRequest(
            f"the CSR is signed with {_BROKEN_HASHES[algorithm.name]}, which is refused: "
            "sign it with SHA-256 or stronger"
        )
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise InvalidRequest("CSR signature does not verify")


def parse_san(value: str) -> x509.GeneralName:
    """`dns:NAME`, `ip:ADDRESS`, `uri:URI`, or a bare value: an IP address, a URI (it holds
    `://`) or else a DNS name. Raises ValueError naming what is wrong."""
    kind, sep, rest = value.partition(":")
    kind = kind.lower() if sep else ""
    if kind not in ("dns", "ip", "uri"):
        rest = value
        if "://" in value:
            kind = "uri"
        else:
            try:
                ipaddress.ip_address(value)
                kind = "ip"
            except ValueError:
                kind = "dns"
    if kind == "ip":
        try:
            return x509.IPAddress(ipaddress.ip_address(rest))
        except ValueError:
            raise ValueError(f"SAN {value!r}: not an IP address") from None
    if not rest or not rest.isascii() or any(c.isspace() for c in rest):
        raise ValueError(f"SAN {value!r}: a {kind} name is non-empty ASCII without spaces")
    return x509.UniformResourceIdentifier(rest) if kind == "uri" else x509.DNSName(rest)


def new_key_and_csr(
    sans: list[str], common_name: str | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """A fresh P-256 key and a CSR for it naming `sans` (and `common_name` as the subject's
    CN). Raises ValueError without SANs or for a malformed one."""
    if not sans:
        raise ValueError("a certificate request needs at least one SAN")
    names = [parse_san(san) for san in sans]
    subject = x509.Name(
        [x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr
