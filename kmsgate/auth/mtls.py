"""mTLS authentication: the client certificate the TLS layer verified (against
`tls.client_cas`) names the caller.

The principal's id is the certificate's SPIFFE URI SAN (`spiffe://...`), else its subject's
common name; `claims` holds `{ca, profile, serial, sans, fingerprint}`. Each request checks
the certificate again: within its validity now (a connection may outlive it), and not
revoked in kmsgate's inventory. The inventory's facts count only for the very certificate
it holds (the same SHA-256 fingerprint): a certificate of another CA of `tls.client_cas`,
even one that carries a serial of kmsgate's, is not in it (`ca` is then its issuer's name
and `profile` is null).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from kmsgate.auth.authenticator import Credentials
from kmsgate.auth.principal import Principal
from kmsgate.errors import Unauthenticated
from kmsgate.spiffe import SPIFFE_PREFIX, is_spiffe_id

__all__ = ["InventoryLookup", "MtlsAuthenticator"]

CN_PREFIX = "cn:"
"""How the principal id of a certificate without a SPIFFE ID starts (then its CN)."""


class IssuedFacts(Protocol):
    """What kmsgate's inventory says about a certificate it issued."""

    @property
    def ca(self) -> str: ...

    @property
    def profile(self) -> str: ...

    @property
    def revoked(self) -> bool: ...

    @property
    def fingerprint(self) -> str: ...


InventoryLookup = Callable[[int], IssuedFacts | None]
"""The inventory's facts about a serial, None if kmsgate did not issue it (raises
Unavailable when it cannot tell)."""


class MtlsAuthenticator:
    """Authenticates the verified client certificate of the connection."""

    kind: Final = "mtls"

    def __init__(self, inventory: InventoryLookup) -> None:
        self._inventory = inventory

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The certificate's principal; None without a client certificate. Raises
        Unauthenticated (expired, not yet valid, revoked, or naming no identity),
        Unavailable (the inventory cannot be read)."""
        if not credentials.peer_chain or credentials.bearer is not None:
            return None  # a request that sends a bearer token is judged by that token
        cert = credentials.peer_chain[0]
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise Unauthenticated("the client certificate is expired or not yet valid")
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        facts = self._inventory(cert.serial_number)
        if facts is not None and facts.fingerprint != fingerprint:
            facts = None  # another CA's certificate with the same serial: not ours
        if facts is not None and facts.revoked:
            raise Unauthenticated("the client certificate is revoked")
        identity, sans = _identity(cert)
        claims = {
            "ca": facts.ca if facts else cert.issuer.rfc4514_string(),
            "profile": facts.profile if facts else None,
            "serial": f"{cert.serial_number:x}",
            "sans": sans,
            "fingerprint": fingerprint,
        }
        return Principal(id=identity, kind="mtls", roles=(), claims=claims)


def _identity(cert: x509.Certificate) -> tuple[str, list[str]]:
    """The principal id a client certificate names, and its SANs: its one SPIFFE ID (a URI
    SAN; a DNS name spelled like one is no SPIFFE ID), else `cn:` and its common name (a
    prefix no token, OIDC issuer or SPIFFE ID takes). Raises Unauthenticated for a
    certificate without a subjectAltName (what the forwarded-header path cannot verify
    either), with two SPIFFE IDs (an X.509-SVID has one), or naming neither a SPIFFE ID nor
    a common name, or a malformed SPIFFE ID."""
    uris, others = _sans(cert)
    sans = [*uris, *others]
    if not sans:
        raise Unauthenticated("the client certificate has no subjectAltName")
    spiffe = [uri for uri in uris if uri.startswith(SPIFFE_PREFIX)]
    if len(spiffe) > 1:
        raise Unauthenticated("the client certificate names more than one SPIFFE ID")
    if spiffe:
        if not is_spiffe_id(spiffe[0]):
            raise Unauthenticated("the client certificate's SPIFFE ID is malformed")
        return spiffe[0], sans
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if not common_name:
        raise Unauthenticated("the client certificate names no SPIFFE ID or common name")
    return f"{CN_PREFIX}{common_name}", sans


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """A certificate's URI SANs, and its DNS and IP SANs (as text)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    others = names.get_values_for_type(x509.DNSName)
    others += [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return names.get_values_for_type(x509.UniformResourceIdentifier), others
