"""Credentials, the authenticator protocol, and the chain the gateway asks in turn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from cryptography import x509

from kmsgate.auth.principal import Principal, PrincipalKind
from kmsgate.errors import Unauthenticated
from kmsgate.text import MAX_PRINCIPAL_ID

_REFUSED = "missing, invalid, expired or revoked token"


class Credentials(NamedTuple):
    """What a request offers to prove who sent it (the transport already checked the
    certificate chain when `peer_chain` is set; `forwarded_cert` is the raw
    `x-forwarded-client-cert` header, believed only from a trusted proxy)."""

    bearer: str | None = None
    peer_chain: tuple[x509.Certificate, ...] = ()
    remote_addr: str | None = None
    forwarded_cert: str = ""


class Authenticator(Protocol):
    """One way of authenticating (API tokens today; OIDC and mTLS next)."""

    @property
    def kind(self) -> PrincipalKind:
        """The principal kind this authenticator vouches for (named in audit records)."""
        ...

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The principal behind `credentials`, or None when they are not of this kind.

        Raises Unauthenticated when they are of this kind but do not prove anything
        (invalid, expired or revoked)."""
        ...


class AuthenticationFailed(Unauthenticated):
    """Unauthenticated, naming the authenticator kind that refused and, for a client
    certificate, its serial (for the audit record)."""

    def __init__(self, kind: str, cause: Unauthenticated, subject: str | None = None) -> None:
        super().__init__(cause.detail, reason=cause.reason)
        self.kind = kind
        self.subject = subject


class Authenticators:
    """The configured authenticators, asked in order; the first that recognises the
    credentials decides."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)
        self.fallback_kind = self._authenticators[0].kind if self._authenticators else "token"

    def authenticate(self, credentials: Credentials) -> Principal:
        """The caller. Raises AuthenticationFailed (an Unauthenticated) if no authenticator
        accepts the credentials, or for a principal whose id is over `MAX_PRINCIPAL_ID`
        characters (the store could not name it)."""
        for authenticator in self._authenticators:
            try:
                principal = authenticator.authenticate(credentials)
            except AuthenticationFailed:
                raise  # it named what it refused (a forwarded certificate, say)
            except Unauthenticated as exc:
                refused = credentials.peer_chain[0] if credentials.peer_chain else None
                serial = (
                    f"{refused.serial_number:x}"
                    if refused and authenticator.kind == "mtls"
                    else None
                )
                raise AuthenticationFailed(authenticator.kind, exc, serial) from None
            if principal is not None:
                if len(principal.id) > MAX_PRINCIPAL_ID:  # an OIDC subject, a SPIFFE ID
                    why = (
                        f"a principal id of {len(principal.id)} characters, over {MAX_PRINCIPAL_ID}"
                    )
                    raise AuthenticationFailed(
                        authenticator.kind, Unauthenticated(_REFUSED, reason=why)
                    )
                return principal
        raise AuthenticationFailed(self.fallback_kind, Unauthenticated(_REFUSED))
