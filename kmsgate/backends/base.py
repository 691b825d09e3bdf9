"""The backend contract: a small required interface plus optional capabilities.

A backend holds key material; kmsgate holds metadata. `create_key` returns a `BackendKey`
whose opaque `material` (if any) the catalogue persists in the same transaction as the key
version, so a failed write never leaves half a key behind.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import HashName, KeyType, SignAlg, verify_with_public_key
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    KmsgateError,
    NotSupported,
    Unavailable,
)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What to create: the logical key's name and version number, and its type."""

    name: str
    version: int
    key_type: KeyType
    labels: Mapping[str, str] = field(default_factory=dict)
    previous: BackendKey | None = None
    """For version N > 1: the primary version it succeeds."""


@dataclass(frozen=True, slots=True)
class BackendKey:
    """A reference to one key version held by a backend.

    `ref` is the backend URI (`softkms:<name>/<version>`, `pkcs11:...`). `material` is opaque
    backend data the catalogue stores (softkms: the sealed private key); never log it.
    """

    ref: str
    key_type: KeyType
    name: str
    version: int
    material: bytes | None = field(default=None, repr=False)
    public_key_pem: str | None = None


@dataclass(frozen=True, slots=True)
class SignMessage:
    """One message (or digest, if `prehashed`) to sign with `alg`."""

    data: bytes
    alg: SignAlg
    prehashed: bool


@dataclass(frozen=True, slots=True)
class BackendStatus:
    ok: bool
    detail: str = "ok"


class KeyBackend(ABC):
    """Required of every backend: create, sign, expose the public key, destroy.

    The errors each method's docstring lists are the contract: what any backend may raise
    there (an override's docstring names the errors it raises beyond them). BackendUnavailable:
    the backend cannot be reached now (503 with Retry-After); BackendError: it failed or
    answered something unusable (502).
    """

    scheme: ClassVar[str]
    blocking: ClassVar[bool] = True
    """Whether calls may block (network, HSM): the API then runs them in the thread pool."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> KeyBackend:
        """Build the backend from its config entry. Raises ConfigError."""
        raise ConfigError(f"backend type {cfg.type!r} cannot be built from config alone")

    @abstractmethod
    def create_key(self, spec: KeySpec) -> BackendKey:
        """Generate a non-exportable key. Raises NotSupported for a type it cannot hold,
        BackendUnavailable, BackendError."""

    @abstractmethod
    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        """Sign `data` (or a digest if `prehashed`).

        Raises InvalidRequest if `alg` does not fit the key or the digest is malformed,
        KeyDestroyed if the version's key material is gone, BackendUnavailable, BackendError.
        """

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """Sign several messages with one key version, each error in its place.

        Unavailable (the backend is down) stops the call: the messages signed before it keep
        their signatures and the others take the error (`signed_so_far`); if none was
        signed it propagates and fails the whole call. Every other error `sign` raises takes
        its message's place. Backends with a batch API (Vault's `batch_input`) override this
        to save round trips.
        """
        return one_by_one(lambda m: self.sign(key, m.data, m.alg, prehashed=m.prehashed), messages)

    def sign_checked(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """`sign_many`; a backend outside the process (`blocking`) also has each signature
        checked against the version's public key, and one that does not verify is a
        BackendError in its place: a key replaced or restored outside kmsgate, or a faulty
        device (a fault in an RSA signature can leak the key), never hands out a signature
        that its published public key does not verify. Raises as `sign_many`."""
        signed = self.sign_many(key, messages)
        public_pem = key.public_key_pem
        if not self.blocking or public_pem is None:
            return signed
        public_key = _public_key(public_pem)
        return [
            output
            if not isinstance(output, bytes)
            or verify_with_public_key(
                public_key, message.alg, message.data, output, prehashed=message.prehashed
            )
            else BackendError(
                f"backend {self.name!r} made a signature that version {key.version} of "
                f"{key.name!r} does not verify: was its key replaced or restored outside "
                "kmsgate? (the signature was withheld)"
            )
            for message, output in zip(messages, signed, strict=True)
        ]

    def sign_one_checked(
        self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool
    ) -> bytes:
        """One signature through `sign_checked`. Raises what `sign` raises, or BackendError
        for a signature that does not verify."""
        (signed,) = self.sign_checked(key, [SignMessage(data, alg, prehashed)])
        if isinstance(signed, KmsgateError):
            raise signed
        return signed

    @abstractmethod
    def destroy(self, key: BackendKey) -> None:
        """Destroy the key material (irreversible) and forget any cached copy. Raises
        BackendUnavailable, BackendError."""

    def keep_state_in(self, directory: Path) -> None:  # noqa: B027
        """Share what the gateway's processes must agree on through `directory` (the data
        dir), such as a PIN the token refused (pkcs11). Most backends share nothing."""

    def promoted(self, key: BackendKey) -> None:  # noqa: B027
        """The catalogue made `key` (from `create_key`) the key's primary version: a backend
        that names the primary version outside kmsgate points that name at it (AWS KMS's
        alias). Called only after the catalogue accepted the version, so a creation or
        rotation that lost a race never moves the name. Raises BackendUnavailable,
        BackendError."""

    def retire_versions_below(self, oldest: BackendKey) -> None:  # noqa: B027
        """Mirror kmsgate's `min_decrypt_version`, raised or lowered, whose version is
        `oldest`, where the backend can enforce it too (Vault Transit's
        `min_decryption_version`); kmsgate enforces it either way. Raises
        BackendUnavailable, BackendError."""

    def status(self) -> BackendStatus:
        """Readiness of the backend (for /v1/sys/ready); problems are reported in the
        status, not raised."""
        return BackendStatus(ok=True)

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections and cached keys."""


class MacCapable(ABC):
    """Optional: HMAC with keys held by the backend."""

    @abstractmethod
    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        """The full-length MAC of `data`.

        Raises InvalidRequest if the key cannot compute MACs (or not with `hash_name`),
        KeyDestroyed if the version's key material is gone, BackendUnavailable, BackendError.
        """

    def mac_many(
        self, key: BackendKey, messages: Sequence[bytes], hash_name: HashName
    ) -> list[bytes | KmsgateError]:
        """The MACs of several messages with one key version, each error in its place;
        Unavailable as `KeyBackend.sign_many` treats it. Backends with a batch API (Vault's
        `batch_input`) override this to save round trips."""
        return one_by_one(lambda data: self.mac(key, data, hash_name), messages)

    @abstractmethod
    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        """True iff `mac` is the full-length MAC of `data`; compared in constant time. A MAC
        that does not match is False, not an error. Raises what `mac` raises."""


class WrapCapable(ABC):
    """Optional: authenticated wrapping of small secrets (data keys) under a backend key."""

    @abstractmethod
    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate `plaintext` bound to `aad`.

        Raises InvalidRequest if the key cannot encrypt, KeyDestroyed if the version's key
        material is gone, BackendUnavailable, BackendError.
        """

    @abstractmethod
    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """Reverse `wrap`.

        Raises DecryptionFailed if the ciphertext or `aad` is wrong, and what `wrap` raises.
        """


class AdoptCapable(ABC):
    """Optional: take over a key that already exists in the backend (made by a ceremony tool)."""

    @abstractmethod
    def adopt_key(self, spec: KeySpec, uri: str) -> BackendKey:
        """A reference to the existing key at `uri`, checked against `spec.key_type`.

        Raises InvalidRequest for a malformed URI or a type mismatch, NotFound if absent,
        BackendUnavailable, BackendError.
        """

    def key_identity(self, ref: str) -> str:
        """What names the backend key behind the reference `ref`, whichever kmsgate key
        version it was recorded for: two references with one identity are one key."""
        return ref


ROOT_KEK_NAME = "kmsgate-root-kek"
"""The name of the handle `RootKeyWrapper.wrapping_key` gives (AWS KMS binds it into the
EncryptionContext of the wrapped root key: it must not change)."""


@runtime_checkable
class RootKeyWrapper(Protocol):
    """A backend that can wrap kmsgate's own secrets (the softkms root key: auto-unseal)
    with an existing AES key named by `reference` (a Transit key name, a PKCS#11 URI)."""

    def wrapping_key(self, reference: str) -> BackendKey:
        """A handle on the existing key. Raises NotFound, InvalidRequest (wrong type),
        BackendUnavailable, BackendError."""

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        """See WrapCapable.wrap."""

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """See WrapCapable.unwrap."""


class Registry:
    """Configured backends by name, built explicitly by create_app (no import-time globals)."""

    def __init__(self, backends: Mapping[str, KeyBackend], default: str) -> None:
        if default not in backends:
            raise ValueError(f"default backend {default!r} is not configured")
        self._backends = dict(backends)
        self.default = default

    def find(self, name: str) -> KeyBackend | None:
        return self._backends.get(name)

    def get(self, name: str | None) -> KeyBackend:
        """The backend called `name` (or the default). Raises InvalidRequest if unknown."""
        backend = self._backends.get(name or self.default)
        if backend is None:
            known = ", ".join(sorted(self._backends))
            raise InvalidRequest(f"unknown backend {name!r}; configured: {known}")
        return backend

    def holding(self, name: str) -> KeyBackend:
        """The backend a stored key or CA names (`get` is for a backend a caller names).
        Raises BackendUnavailable if this gateway does not configure it: its configuration
        lost the backend (or a replica's is behind), which is no fault of the caller's."""
        backend = self._backends.get(name)
        if backend is None:
            raise BackendUnavailable(
                f"backend {name!r}, which holds this key, is not configured on this gateway"
            )
        return backend

    def items(self) -> list[tuple[str, KeyBackend]]:
        return sorted(self._backends.items())

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()


T = TypeVar("T")


class PkiEngine(Protocol):
    """A PKI engine that signs certificates with its own CA key (Vault's PKI secrets engine).
    Every method may block; each raises BackendError or BackendUnavailable when the engine
    fails, and `sign` InvalidRequest when the engine refuses the names."""

    def sign(
        self,
        csr_pem: str,
        *,
        common_name: str,
        dns: list[str],
        ips: list[str],
        uris: list[str],
        ttl_seconds: int,
    ) -> list[x509.Certificate]:
        """The certificate for the CSR, then its issuing chain."""
        ...

    def revoke(self, serial: int) -> None: ...

    def role_settings(self) -> dict[str, object]:
        """The settings of the role it issues through. Raises InvalidRequest if there is
        no such role."""
        ...

    def chain(self) -> list[x509.Certificate]:
        """The engine's issuing CA, then its issuers."""
        ...

    def crl(self, *, delta: bool = False) -> bytes: ...

    def ocsp(self, request: bytes) -> bytes: ...


class PkiEngineCapable(ABC):
    """Optional: the backend fronts PKI engines (mount and role name one)."""

    @abstractmethod
    def pki(self, mount: str, role: str) -> PkiEngine:
        """The engine at `mount` issuing through `role`. Raises InvalidRequest for names
        that cannot be path segments."""


def require_capability(backend: KeyBackend, capability: type[T], what: str) -> T:
    """`backend` as `capability`. Raises NotSupported if it lacks it."""
    if not isinstance(backend, capability):
        raise NotSupported(f"backend {backend.name!r} ({backend.scheme}) cannot {what}")
    return backend


M = TypeVar("M")


@functools.lru_cache(maxsize=1024)
def _public_key(pem: str) -> PublicKeyTypes:
    """A version's public key, parsed once. Raises ValueError for a PEM that is none."""
    return serialization.load_pem_public_key(pem.encode())


def one_by_one(do: Callable[[M], bytes], messages: Sequence[M]) -> list[bytes | KmsgateError]:
    """`do` for each message, each error in its place; Unavailable (the backend is down)
    stops: what was done before keeps its result, the rest takes the error
    (`signed_so_far`, which raises it when nothing was done)."""
    results: list[bytes | KmsgateError] = []
    for message in messages:
        try:
            results.append(do(message))
        except Unavailable as exc:
            return signed_so_far([*results, *[None] * (len(messages) - len(results))], exc)
        except KmsgateError as exc:
            results.append(exc)
    return results


def signed_so_far(
    results: Sequence[bytes | KmsgateError | None], down: Unavailable
) -> list[bytes | KmsgateError]:
    """A batch's results once the backend went down (`down`), None marking the messages
    not signed: those take that error, the signatures made before stay (a batch reply
    reports them). Raises `down` if no message was signed: the whole call fails (503)."""
    if not any(isinstance(r, bytes) for r in results):
        raise down
    return [down if r is None else r for r in results]
