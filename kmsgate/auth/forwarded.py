"""mTLS through a TLS-terminating proxy: the client certificate a trusted proxy verified and
forwarded in Envoy's `x-forwarded-client-cert` (XFCC) header.

Only a proxy at an address of `tls.trusted_proxies` may forward an identity; from any other
address the header is ignored (the connection's own credentials decide). The forwarded
certificate (XFCC `Cert`, with `Chain` when the proxy sends it) is verified again against
`tls.client_cas` here (RFC 5280 path, validity now, the clientAuth usage), then judged as
a client certificate of the connection would be (`MtlsAuthenticator`: revocation, identity).
The header must hold exactly one element: the one the trusted proxy added for its client.
"""

from __future__ import annotations

import functools
import ipaddress
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kmsgate.auth.authenticator import AuthenticationFailed, Credentials
from kmsgate.auth.mtls import MtlsAuthenticator
from kmsgate.auth.principal import Principal
from kmsgate.errors import ConfigError, Unauthenticated, Unavailable

__all__ = ["ForwardedMtlsAuthenticator", "parse_xfcc"]

HEADER = b"x-forwarded-client-cert"
MAX_HEADER_CHARS = 64 * 1024
ANCHORS_REFRESH_SECONDS = 30.0
"""How long the resolved `tls.client_cas` certificates are reused (a CA activated or
rotated in the meantime is trusted for forwarded certificates after at most this long)."""

Anchors = Callable[[], Sequence[x509.Certificate]]


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """The elements of an XFCC header value, each as `{key (lower case): value}`, values
    unquoted. Raises Unauthenticated for a value that is not well formed."""
    elements: list[dict[str, str]] = [{}]
    key, text, quoted, escaped = "", "", False, False

    def close_pair() -> None:
        nonlocal key, text
        if key or text:
            name = key.strip().lower()
            if not name or name in elements[-1]:
                raise Unauthenticated("malformed x-forwarded-client-cert header")
            elements[-1][name] = text.strip()
        key, text = "", ""

    reading_key = True
    for char in value:
        if escaped:
            text += char
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                text += char
        elif char == '"' and not reading_key:
            quoted = True
        elif char == "=" and reading_key:
            key, reading_key = text, False
            text = ""
        elif char in ";,":
            if reading_key and text.strip():
                raise Unauthenticated("malformed x-forwarded-client-cert header")
            close_pair()
            reading_key = True
            if char == ",":
                elements.append({})
        else:
            text += char
    if quoted or escaped or (reading_key and text.strip()):
        raise Unauthenticated("malformed x-forwarded-client-cert header")
    close_pair()
    return elements


def _forwarded_chain_of(header: str) -> tuple[x509.Certificate, ...]:
    """The leaf (then its chain) a trusted proxy forwards in `header`. Raises
    Unauthenticated when there is none, or the header is too large or malformed."""
    if not header:
        raise Unauthenticated("the trusted proxy forwarded no client certificate")
    if len(header) > MAX_HEADER_CHARS:
        raise Unauthenticated("x-forwarded-client-cert is too large")
    return _forwarded_chain(header)


@functools.lru_cache(maxsize=1024)
def _forwarded_chain(value: str) -> tuple[x509.Certificate, ...]:
    """The leaf (then its chain) of a one-element XFCC header, parsed once per distinct
    value. Raises Unauthenticated."""
    elements = parse_xfcc(value)
    if len(elements) != 1:
        raise Unauthenticated("x-forwarded-client-cert must hold exactly one element")
    element = elements[0]
    if "cert" not in element:
        raise Unauthenticated(
            "x-forwarded-client-cert carries no Cert (configure the proxy to forward it)"
        )
    try:
        leaf = x509.load_pem_x509_certificates(urllib.parse.unquote(element["cert"]).encode())
        chain = (
            x509.load_pem_x509_certificates(urllib.parse.unquote(element["chain"]).encode())
            if "chain" in element
            else []
        )
    except ValueError:
        raise Unauthenticated("x-forwarded-client-cert holds no readable certificate") from None
    if len(leaf) != 1:
        raise Unauthenticated("x-forwarded-client-cert Cert must hold one certificate")
    if chain and chain[0] == leaf[0]:
        chain = chain[1:]  # Envoy's Chain starts with the leaf itself
    return (leaf[0], *chain)


class ForwardedMtlsAuthenticator:
    """Authenticates the client certificate a trusted proxy forwards."""

    kind: Final = "mtls"

    def __init__(self, proxies: Sequence[str], anchors: Anchors, mtls: MtlsAuthenticator) -> None:
        self._proxies = tuple(ipaddress.ip_network(p, strict=False) for p in proxies)
        self._anchors = anchors
        self._mtls = mtls
        self._store: tuple[float, Store | None] = (0.0, None)

    def trusts(self, address: str | None) -> bool:
        """Whether `address` is one of `tls.trusted_proxies`."""
        if address is None or not self._proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._proxies)

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The forwarded certificate's principal (claims name the proxy in `forwarded_by`);
        None with a bearer token, or from an untrusted address. A trusted proxy speaks for
        its clients: the certificate of its own connection never identifies a request.
        Raises AuthenticationFailed (an Unauthenticated) when a trusted proxy forwards no
        certificate or a malformed header, naming the forwarded certificate's serial when
        it does not verify against `tls.client_cas`, is revoked or names no identity;
        Unavailable."""
        if credentials.bearer is not None or not self.trusts(credentials.remote_addr):
            return None  # anyone can send the header; only a trusted proxy is believed
        try:
            chain = _forwarded_chain_of(credentials.forwarded_cert)
        except Unauthenticated as exc:  # no serial: the connection's certificate is the proxy's
            raise AuthenticationFailed(self.kind, exc) from None
        try:
            self._verify(chain)
            principal = self._mtls.authenticate(credentials._replace(peer_chain=chain))
        except Unauthenticated as exc:
            raise AuthenticationFailed(self.kind, exc, f"{chain[0].serial_number:x}") from None
        if principal is None:  # pragma: no cover - a chain is always given here
            return None
        claims = {**principal.claims, "forwarded_by": credentials.remote_addr}
        return Principal(id=principal.id, kind="mtls", roles=(), claims=claims)

    def _verify(self, chain: tuple[x509.Certificate, ...]) -> None:
        """Raises Unauthenticated unless `chain` leads to one of `tls.client_cas` now."""
        verifier = (
            PolicyBuilder().store(self._trust_store()).time(datetime.now(UTC))
        ).build_client_verifier()
        try:
            verifier.verify(chain[0], list(chain[1:]))
        except VerificationError:
            raise Unauthenticated(
                "the forwarded client certificate does not verify against tls.client_cas"
            ) from None

    def _trust_store(self) -> Store:
        """Raises Unavailable when `tls.client_cas` cannot be resolved now."""
        loaded_at, store = self._store
        if store is None or time.monotonic() - loaded_at > ANCHORS_REFRESH_SECONDS:
            try:
                store = Store(list(self._anchors()))
            except (ConfigError, ValueError) as exc:
                raise Unavailable(f"tls.client_cas cannot be resolved: {exc}") from None
            self._store = (time.monotonic(), store)
        return store
