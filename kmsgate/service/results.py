"""What the use cases return: frozen dataclasses of bytes and domain types.

A batch operation returns one entry per item, each a result or the `KmsgateError` that item
met; the REST edge turns them into JSON (base64 for bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from cryptography import x509

from kmsgate.errors import KmsgateError

ResultT = TypeVar("ResultT")
ItemResults = list[ResultT | KmsgateError]
"""One entry per item, in order: its result or its error."""


@dataclass(frozen=True, slots=True)
class Signature:
    key_version: int
    algorithm: str
    signature: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    """The signature or MAC verifies under `key_version` (a mismatch raises instead)."""

    valid: bool = True
    key_version: int


@dataclass(frozen=True, slots=True)
class Mac:
    mac: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class Ciphertext:
    ciphertext: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class Plaintext:
    plaintext: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class WrappedDataKey:
    """A data key in its wrapped form only."""

    ciphertext: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class DataKey(WrappedDataKey):
    """A data key, wrapped and in plaintext."""

    plaintext: bytes


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    digest: str
    files: list[str]
    loaded_at: datetime
    env: str


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a caller is to the gateway: its principal and the roles policy gives it."""

    id: str
    kind: str
    tenant: str | None
    roles: list[str]
    claims: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    allow: bool
    reasons: list[str]
    roles: list[str]
    """The roles the policy maps the principal to (its `roles` rule)."""
    exceptions_used: list[str]
    """The grants a reason names (`exception <id>`)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate just issued and its chain (issuing CA first, root last)."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    serial: str
    not_after: datetime
