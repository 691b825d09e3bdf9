"""Configuration of a `type: hashivault` backend: Vault address and TLS, Transit mount and key
prefix, one auth method (token, token file, AppRole, Kubernetes) and request limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kmsgate.backends.hashivault.transit import _MOUNT, _SEGMENT
from kmsgate.loopback import https_or_loopback, plain_http_refused


class AppRoleAuth(BaseModel):
    """AppRole login: `role_id` plus the secret id, inline or (better) from a file."""

    model_config = ConfigDict(extra="forbid")

    role_id: str = Field(min_length=1)
    secret_id: SecretStr | None = None
    secret_id_file: Path | None = None
    mount: str = Field(default="approle", pattern=_MOUNT.pattern)

    @model_validator(mode="after")
    def _one_secret(self) -> AppRoleAuth:
        if (self.secret_id is None) == (self.secret_id_file is None):
            raise ValueError("approle needs exactly one of secret_id, secret_id_file")
        return self


class KubernetesAuth(BaseModel):
    """Kubernetes login with the pod's service account token (re-read at every login)."""

    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1)
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    mount: str = Field(default="kubernetes", pattern=_MOUNT.pattern)


class HashiVaultSettings(BaseModel):
    """The `backends.<name>` entry of a `type: hashivault` backend (everything but `type`)."""

    model_config = ConfigDict(extra="forbid")

    addr: str = Field(pattern=r"^https?://[^\s/]+(/.*)?$")
    """Vault address, `https://vault.example:8200`; `http://` only to a loopback host (tests),
    as every request carries the Vault token (and plaintext, for encrypt and decrypt)."""
    namespace: str | None = None
    ca_cert: Path | None = None
    """CA bundle (PEM) that signed Vault's TLS certificate; the system store if unset."""
    client_cert: Path | None = None
    client_key: Path | None = None
    mount: str = Field(default="transit", pattern=_MOUNT.pattern)
    key_prefix: str = Field(default="kmsgate-", pattern=rf"^({_SEGMENT})?$")
    derived: bool = False
    """Create aes-256-gcm keys with Transit key derivation (context bound to the AAD)."""

    token: SecretStr | None = None
    token_file: Path | None = None
    approle: AppRoleAuth | None = None
    kubernetes: KubernetesAuth | None = None

    timeout: float = Field(default=10.0, gt=0)
    """Seconds to connect and to wait for each Vault reply."""
    batch_size: int = Field(default=250, ge=1, le=10_000)
    """Items per Vault batch request (a 1,000-item kmsgate batch is 4 requests)."""
    max_inflight: int = Field(default=2, ge=1)
    """Concurrent Vault requests per key version and algorithm; further concurrent sign and
    MAC calls wait and are merged into the next request (natural batching)."""
    max_connections: int = Field(default=32, ge=1)
    retry_after: int = Field(default=5, ge=1)
    """Retry-After (seconds) sent with a 503 when Vault is down or sealed."""

    @field_validator("addr")
    @classmethod
    def _https_off_loopback(cls, addr: str) -> str:
        if not https_or_loopback(addr):
            raise ValueError(plain_http_refused(addr, "the Vault token"))
        return addr

    @model_validator(mode="after")
    def _one_auth_method(self) -> HashiVaultSettings:
        chosen = [
            name
            for name, value in (
                ("token", self.token),
                ("token_file", self.token_file),
                ("approle", self.approle),
                ("kubernetes", self.kubernetes),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "configure exactly one of token, token_file, approle, kubernetes "
                f"(got {', '.join(chosen) or 'none'})"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self

    @property
    def auth_method(self) -> Literal["token", "token_file", "approle", "kubernetes"]:
        if self.approle is not None:
            return "approle"
        if self.kubernetes is not None:
            return "kubernetes"
        return "token_file" if self.token_file is not None else "token"
