"""Who is calling: the principal every policy decision and audit record is about."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PrincipalKind = Literal["token", "oidc", "mtls", "system", "local"]
"""`local`: an operator running a command with the gateway's own config (`kmsgate token
bootstrap`), vouched for by the host, not by the API."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `kind` names the authenticator that vouched for it;
    `claims` carries what that authenticator learnt (OIDC claims, certificate profile)."""

    id: str
    kind: PrincipalKind
    roles: tuple[str, ...]
    claims: dict[str, Any] = field(default_factory=dict)
    tenant: str | None = None

    def policy_document(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "roles": list(self.roles),
            "claims": self.claims,
            "tenant": self.tenant,
        }


SYSTEM = Principal(id="system", kind="system", roles=())
"""The gateway itself, for scheduled work (key destruction)."""
