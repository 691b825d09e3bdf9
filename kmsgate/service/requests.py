"""What the use cases take: frozen dataclasses of bytes and domain types.

The REST edge (`kmsgate/schemas.py`) validates JSON and base64 and builds these; nothing in
`kmsgate/service/` sees JSON, base64 or pydantic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from kmsgate.audit import AuditCursor

Context = Mapping[str, str] | None
"""An encryption context (already checked: sizes, characters), bound as AAD."""


@dataclass(frozen=True, slots=True)
class SignInput:
    """Sign `input`, or a prehashed `digest`, with `version` (default: primary)."""

    input: bytes | None = None
    digest: bytes | None = None
    algorithm: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class VerifyInput:
    """Check `signature`; `strict` skips compromised versions, `signed_at` the versions
    compromised before that time."""

    signature: bytes
    input: bytes | None = None
    digest: bytes | None = None
    algorithm: str | None = None
    version: int | None = None
    strict: bool = False
    signed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class MacInput:
    input: bytes
    algorithm: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class MacVerifyInput:
    input: bytes
    mac: bytes
    algorithm: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class EncryptInput:
    plaintext: bytes
    context: Context = None


@dataclass(frozen=True, slots=True)
class DecryptInput:
    """A kmsgate ciphertext (from `encrypt` or `datakey`) and its context."""

    ciphertext: bytes
    context: Context = None


@dataclass(frozen=True, slots=True)
class DataKeyInput:
    bits: int = 256
    context: Context = None
    include_plaintext: bool = True


@dataclass(frozen=True, slots=True)
class RewrapInput:
    ciphertext: bytes
    context: Context = None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key to create (`type`), adopt (`type` and `uri`) or import (`public_key`)."""

    name: str
    purpose: str
    type: str | None = None
    backend: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    rotation_period: timedelta | None = None
    public_key: str | None = None
    uri: str | None = None
    public: bool | None = None
    """Serve its public keys without a token; None: only a `model-sign` key's."""


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """What `update_key` changes; None leaves a field as it is."""

    min_decrypt_version: int | None = None
    rotation_period: timedelta | None = None
    labels: Mapping[str, str] | None = None
    public: bool | None = None
    stop_rotation: bool = False
    """The key no longer rotates on a schedule (its `rotation_period` is cleared)."""

    def policy_request(self) -> dict[str, object]:
        """The fields being changed, as the policy sees them (durations in seconds)."""
        request: dict[str, object] = {}
        if self.min_decrypt_version is not None:
            request["min_decrypt_version"] = self.min_decrypt_version
        if self.rotation_period is not None:
            request["rotation_period"] = int(self.rotation_period.total_seconds())
        elif self.stop_rotation:
            request["rotation_period"] = None
        if self.labels is not None:
            request["labels"] = dict(self.labels)
        if self.public is not None:
            request["public"] = self.public
        return request


@dataclass(frozen=True, slots=True)
class NewToken:
    roles: tuple[str, ...]
    ttl: timedelta | None = None
    description: str = ""
    orphan: bool = False
    """Whether it outlives the revocation of the token that makes it."""


@dataclass(frozen=True, slots=True)
class NewException:
    """A JIT exception a principal asks for itself."""

    actions: tuple[str, ...]
    resource: str
    duration: timedelta
    ticket: str
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyQuery:
    """A hypothetical input for the policy to decide (explain, what-if)."""

    principal: Mapping[str, object]
    action: str
    resource: Mapping[str, object] = field(default_factory=dict)
    request: Mapping[str, object] = field(default_factory=dict)
    exceptions: Sequence[Mapping[str, object]] = ()
    env: str | None = None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    since: datetime | None = None
    principal: str | None = None
    key: str | None = None
    action: str | None = None
    limit: int = 100
    before: AuditCursor | None = None
    """Only records older than this cursor's (the `next` of a previous page)."""


@dataclass(frozen=True, slots=True)
class NewCa:
    """A CA to create. `kmsgate`: its key (`key_type` on `backend`) and its subject (an
    RFC 4514 name or a bare common name), pending until the offline root signs it.
    `hashivault-pki`: the PKI engine at `mount` of the hashivault `backend`, issuing through
    `role` (active at once; its subject is the engine's CA's)."""

    name: str
    subject: str
    key_type: str
    backend: str | None = None
    type: str = "kmsgate"
    mount: str | None = None
    role: str | None = None


@dataclass(frozen=True, slots=True)
class IssueInput:
    """A certificate request: the CSR (its signature not yet checked), the profile and the
    lifetime (default: the profile's)."""

    csr: x509.CertificateSigningRequest
    profile: str
    ttl: timedelta | None = None
