"""Authentication: credentials in, a `Principal` out. API tokens are the first
authenticator; OIDC and mTLS plug in beside them."""

from kmsgate.auth.authenticator import (
    AuthenticationFailed,
    Authenticator,
    Authenticators,
    Credentials,
)
from kmsgate.auth.principal import SYSTEM, Principal, PrincipalKind
from kmsgate.auth.tokens import TokenInfo, TokenRegistry, token_id_of

__all__ = [
    "SYSTEM",
    "AuthenticationFailed",
    "Authenticator",
    "Authenticators",
    "Credentials",
    "Principal",
    "PrincipalKind",
    "TokenInfo",
    "TokenRegistry",
    "token_id_of",
]
