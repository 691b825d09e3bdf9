"""hashivault: keys held by a HashiCorp Vault or OpenBao Transit engine, through hvac.

Key material never leaves Transit (keys are created with `exportable=false`). kmsgate's
version N of a key is Transit version N of the Transit key `<key_prefix><name>`: version 1
creates the Transit key, every later version is one Transit rotation. A `BackendKey.ref`
names mount, Transit key and version: `hashivault:<mount>/<transit-name>#<version>`, and
every operation pins that version (`key_version`), so a rotation made outside kmsgate never
changes what a kmsgate version signs with.

- sign: `hash_algorithm`, `prehashed`, `signature_algorithm` (`pss` with an explicit salt
  length equal to the hash length, `pkcs1v15`), `marshaling_algorithm=asn1`; the
  `vault:vN:` prefix is stripped and N checked. Batches use `batch_input`: one request per
  (algorithm, prehashed) group and `batch_size` items. Verification is local (the service
  uses the public key read from Transit at creation).
- MAC: `hmac` keys (`key_size` 32/48/64 bytes) and the `hmac` endpoint.
- wrap/unwrap: `encrypt`/`decrypt` with `associated_data` (and a derivation `context` when
  the Transit key is derived). The wrapped form is compact binary, see `_WRAP_FORMAT`.
- Errors: Vault sealed, down, unreachable or timing out -> BackendUnavailable (503 with
  Retry-After); kmsgate's own token refused -> BackendError (502). Vault's error text is
  logged, never put in an error detail.
- Auth: a token (inline or `token_file`), AppRole or a Kubernetes service account; the
  token is renewed (or the login redone) at two thirds of its TTL by a background thread,
  and re-acquired once when Vault answers 403.

See docs/backends/hashivault.md for configuration, the Vault policy kmsgate needs and what
`destroy` can and cannot do with Transit.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
import requests.adapters
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from kmsgate.algorithms import (
    HashName,
    KeyType,
    KeyUsage,
    Scheme,
    SignAlg,
    check_digest,
    key_type_of_public_key,
    sign_algorithm,
)
from kmsgate.backends.base import (
    BackendKey,
    BackendStatus,
    KeyBackend,
    KeySpec,
    MacCapable,
    SignMessage,
    WrapCapable,
)
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    NotFound,
    NotSupported,
    Unavailable,
)

__all__ = ["AppRoleAuth", "HashiVaultBackend", "HashiVaultSettings", "KubernetesAuth"]

_log = logging.getLogger(__name__)

# kmsgate key type -> (Transit type, extra creation parameters)
_TRANSIT_TYPES: dict[KeyType, tuple[str, dict[str, object]]] = {
    KeyType.ED25519: ("ed25519", {}),
    KeyType.ECDSA_P256: ("ecdsa-p256", {}),
    KeyType.ECDSA_P384: ("ecdsa-p384", {}),
    KeyType.RSA_3072: ("rsa-3072", {}),
    KeyType.RSA_4096: ("rsa-4096", {}),
    KeyType.AES_256_GCM: ("aes256-gcm96", {}),
    KeyType.HMAC_SHA256: ("hmac", {"key_size": 32}),
    KeyType.HMAC_SHA384: ("hmac", {"key_size": 48}),
    KeyType.HMAC_SHA512: ("hmac", {"key_size": 64}),
}
_MAC_HASH: dict[KeyType, HashName] = {
    KeyType.HMAC_SHA256: HashName.SHA256,
    KeyType.HMAC_SHA384: HashName.SHA384,
    KeyType.HMAC_SHA512: HashName.SHA512,
}
_TRANSIT_HASH: dict[HashName, str] = {
    HashName.SHA256: "sha2-256",
    HashName.SHA384: "sha2-384",
    HashName.SHA512: "sha2-512",
}
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"  # a path segment that is never "." or ".."
_MOUNT = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(
    rf"^hashivault:(?P<mount>{_SEGMENT}(/{_SEGMENT})*)/(?P<name>{_SEGMENT})"
    r"#(?P<version>[1-9][0-9]{0,9})$"
)
_VAULT_PREFIX = re.compile(r"^vault:v(?P<version>[1-9][0-9]{0,9}):(?P<body>.*)$", re.DOTALL)

_WRAP_FORMAT = b"\x01"
"""Wrapped form, version 1: 0x01 || Transit key version (4 bytes, big endian) || the raw
Transit ciphertext (for aes256-gcm96: 12-byte nonce || ciphertext || 16-byte tag). Binary
rather than the `vault:vN:<base64>` string, so that every byte of it is authenticated: a
flipped base64 padding bit would decode to the same ciphertext."""
_WRAP_MIN_LEN = 1 + 4 + 12 + 16
_DERIVE_CONTEXT = b"kmsgate/hashivault/wrap/v1\x00"
"""Prefix of the key-derivation context for derived Transit keys (the AAD follows), so the
context is never empty, as Transit requires."""

_RENEW_AT = 2 / 3
"""Renew (or log in again) when this fraction of the token's TTL has passed."""
_RENEW_RETRY_SECONDS = 5.0
"""Background renewal: wait this long after a failed attempt before trying again."""


# -- configuration ---------------------------------------------------------------------------


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
    """Vault address, `https://vault.example:8200` (`http://` only for loopback tests)."""
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


def _read_secret_file(path: Path, what: str) -> str:
    """The stripped content of a secret file. Raises ConfigError if unreadable or empty."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


# -- helpers ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64 decoding. Raises ValueError."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def _strip_prefix(value: object, version: int, what: str) -> bytes:
    """The bytes of a `vault:vN:<base64>` value, checking N. Raises BackendError."""
    match = _VAULT_PREFIX.match(value) if isinstance(value, str) else None
    if match is None:
        raise BackendError(f"the backend returned a malformed {what}")
    if int(match["version"]) != version:
        raise BackendError(f"the backend made the {what} with another key version")
    try:
        return _unb64(match["body"])
    except ValueError:
        raise BackendError(f"the backend returned a malformed {what}") from None


def _public_key_pem(key_type: KeyType, transit_value: object) -> str:
    """PEM SubjectPublicKeyInfo from Transit's `public_key` (base64 raw for Ed25519, PEM
    otherwise), checked against `key_type`. Raises BackendError."""
    try:
        if not isinstance(transit_value, str):
            raise ValueError("no public key")
        public: PublicKeyTypes
        if key_type is KeyType.ED25519:
            public = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(transit_value))
        else:
            public = serialization.load_pem_public_key(transit_value.encode("ascii"))
        if key_type_of_public_key(public) is not key_type:
            raise ValueError("wrong key type")
    except (ValueError, TypeError, InvalidRequest, UnicodeEncodeError):
        raise BackendError("the backend returned an unusable public key") from None
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


@dataclass(frozen=True, slots=True)
class _Ref:
    mount: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"hashivault:{self.mount}/{self.name}#{self.version}"

    @classmethod
    def parse(cls, ref: str) -> _Ref:
        """Raises BackendError for a reference that is not ours."""
        match = _REF.match(ref)
        if match is None:
            raise BackendError("the key reference is not a hashivault reference")
        return cls(match["mount"], match["name"], int(match["version"]))


@dataclass(frozen=True, slots=True)
class _KeyInfo:
    """What `GET <mount>/keys/<name>` says about a Transit key (never key material)."""

    transit_type: str
    derived: bool
    exportable: bool
    latest_version: int
    min_available_version: int
    min_decryption_version: int
    min_encryption_version: int
    public_keys: Mapping[int, object]

    @property
    def available_versions(self) -> range:
        return range(max(1, self.min_available_version), self.latest_version + 1)

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> _KeyInfo:
        """Raises BackendError if the reply does not describe a Transit key."""
        try:
            data = reply["data"]
            keys = data.get("keys") or {}
            public_keys = {
                int(v): entry.get("public_key")
                for v, entry in keys.items()
                if isinstance(entry, Mapping)
            }
            return cls(
                transit_type=str(data["type"]),
                derived=bool(data.get("derived", False)),
                exportable=bool(data.get("exportable", False)),
                latest_version=int(data["latest_version"]),
                min_available_version=int(data.get("min_available_version") or 0),
                min_decryption_version=int(data.get("min_decryption_version") or 0),
                min_encryption_version=int(data.get("min_encryption_version") or 0),
                public_keys=public_keys,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackendError("the backend returned an unexpected key description") from None


# -- authentication --------------------------------------------------------------------------


class _Auth:
    """Owns the hvac client's token: reads it or logs in, renews it before expiry.

    `ensure()` is called before every request and is cheap while the token is fresh. A
    background thread calls it too at two thirds of the TTL, so an idle gateway keeps its
    token alive. Never logs a token.
    """

    def __init__(self, backend: str, settings: HashiVaultSettings, client: Any) -> None:
        self._backend = backend
        self._settings = settings
        self._client = client
        self._lock = threading.Lock()
        self._have_token = False
        self._token_value: str | None = None
        self._renewable = False
        self._ttl = 0.0
        self._renew_at = math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.auth_method == "token_file":
            assert settings.token_file is not None
            _read_secret_file(settings.token_file, "token")  # fail at start-up, not later
        if settings.approle is not None and settings.approle.secret_id_file is not None:
            _read_secret_file(settings.approle.secret_id_file, "AppRole secret id")

    @property
    def logs_in(self) -> bool:
        return self._settings.auth_method in ("approle", "kubernetes")

    @property
    def renew_at(self) -> float:
        """time.monotonic() value at which the token is renewed (inf: never)."""
        return self._renew_at

    def ensure(self) -> None:
        """Make sure the client holds a live token. Raises hvac / requests errors."""
        if self._have_token and time.monotonic() < self._renew_at:
            return
        with self._lock:
            if not self._have_token:
                self._acquire()
            elif time.monotonic() >= self._renew_at:
                self._renew()

    @property
    def token(self) -> str:
        """The token in use now (to tell `reacquire` which one failed); never log it."""
        return str(self._client.token or "")

    def reacquire(self, failed: str) -> bool:
        """After a 403 with token `failed`: drop it if a new one may help (login methods, a
        changed token file). True if the caller should retry once. Concurrent 403s on the
        same token cause one new login, not one each."""
        with self._lock:
            if self._client.token != failed:
                return True  # another thread already replaced it
            if self.logs_in:
                self._have_token = False
                return True
            if self._settings.token_file is not None:
                fresh = _read_secret_file(self._settings.token_file, "token")
                if fresh != self._token_value:
                    self._have_token = False
                    return True
            return False

    def _acquire(self) -> None:
        s = self._settings
        if s.approle is not None:
            secret = (
                s.approle.secret_id.get_secret_value()
                if s.approle.secret_id is not None
                else _read_secret_file(s.approle.secret_id_file, "AppRole secret id")  # type: ignore[arg-type]
            )
            reply = self._client.auth.approle.login(
                role_id=s.approle.role_id, secret_id=secret, mount_point=s.approle.mount
            )
            self._logged_in(reply)
        elif s.kubernetes is not None:
            jwt = _read_secret_file(s.kubernetes.jwt_file, "service account token")
            reply = self._client.auth.kubernetes.login(
                role=s.kubernetes.role, jwt=jwt, mount_point=s.kubernetes.mount
            )
            self._logged_in(reply)
        else:
            if s.token is not None:
                value = s.token.get_secret_value()
            else:
                assert s.token_file is not None
                value = _read_secret_file(s.token_file, "token")
            self._client.token = value
            self._lookup()  # raises if Vault is unreachable: the next call tries again
            self._token_value = value
            self._have_token = True
        self._start_thread()

    def _logged_in(self, reply: Mapping[str, Any]) -> None:
        auth = reply["auth"]
        self._client.token = auth["client_token"]
        self._token_value = None
        self._have_token = True
        self._schedule(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
        _log.info(
            "hashivault %s: logged in with %s (ttl %ss)",
            self._backend,
            self._settings.auth_method,
            auth.get("lease_duration"),
        )

    def _lookup(self) -> None:
        """TTL and renewability of a configured token (needs the default policy)."""
        try:
            data = self._client.auth.token.lookup_self()["data"]
        except hvac.exceptions.Forbidden:
            _log.warning(
                "hashivault %s: the token may not look itself up; it will not be renewed",
                self._backend,
            )
            self._schedule(0.0, False)
            return
        self._schedule(float(data.get("ttl") or 0), bool(data.get("renewable")))
        if self._ttl and not self._renewable:
            _log.warning(
                "hashivault %s: the token is not renewable and expires in %ss",
                self._backend,
                data.get("ttl"),
            )

    def _schedule(self, ttl: float, renewable: bool) -> None:
        self._ttl, self._renewable = ttl, renewable
        if ttl <= 0 or not (renewable or self.logs_in):
            self._renew_at = math.inf  # no expiry, or nothing we could do about it
        else:
            self._renew_at = time.monotonic() + ttl * _RENEW_AT
        self._wake.set()

    def _renew(self) -> None:
        previous_ttl = self._ttl
        if self._renewable:
            try:
                reply = self._client.auth.token.renew_self()
            except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
                if self.logs_in:
                    self._acquire()
                    return
                # a configured token that can no longer be renewed (expired, revoked): stop
                # trying; requests now get 403 (502 to clients) until the token file changes
                _log.error("hashivault %s: the token could not be renewed", self._backend)
                self._renew_at = math.inf
                return
            auth = reply["auth"]
            ttl = float(auth.get("lease_duration") or 0)
            if self.logs_in and ttl < previous_ttl * (1 - _RENEW_AT):
                # the token reached its max TTL: renewing buys little, log in again
                self._acquire()
                return
            self._schedule(ttl, bool(auth.get("renewable")))
            _log.info("hashivault %s: token renewed (ttl %ss)", self._backend, int(ttl))
        elif self.logs_in:
            self._acquire()
        else:
            self._renew_at = math.inf

    def _start_thread(self) -> None:
        if self._thread is not None or self._stop.is_set() or self._renew_at == math.inf:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"kmsgate-vault-renew-{self._backend}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            delay = self._renew_at - time.monotonic()
            if delay > 0:
                self._wake.wait(min(delay, 3600.0))
                continue
            try:
                self.ensure()
            except Exception as exc:  # keep the thread alive; requests will report errors
                _log.warning(
                    "hashivault %s: token renewal failed (%s); retrying in %ss",
                    self._backend,
                    type(exc).__name__,
                    _RENEW_RETRY_SECONDS,
                )
                self._stop.wait(_RENEW_RETRY_SECONDS)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- natural batching --------------------------------------------------------------------------

_Result = bytes | KmsgateError
_Send = Callable[[Sequence[bytes]], list[_Result]]


@dataclass(eq=False)
class _Job:
    inputs: Sequence[bytes]
    event: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    batch: list[_Job] | None = None
    """Set (with `event`) when this job's thread is handed the next request to send."""
    results: list[_Result] | None = None
    error: KmsgateError | None = None


class _Coalescer:
    """Natural batching: concurrent calls with the same key share Vault requests.

    A caller queues its inputs. If fewer than `max_inflight` requests for that key are in
    flight, it sends the queue's oldest jobs (up to `max_items` inputs) as one request at
    once; otherwise it waits. When a request answers, its jobs' callers are woken, and if
    jobs are queued, the caller of the oldest one is handed the slot and sends the next
    batch. A lone call therefore goes out immediately (no timer, no added latency); under
    load, calls arriving while requests are in flight ride together on the next one. Each
    wake-up concerns one thread (no thundering herd). The Python HTTP client tops out near
    1,000 requests/s per process, so this is what lets single-item signing scale.
    """

    def __init__(self, max_items: int, max_inflight: int) -> None:
        self._max_items = max_items
        self._max_inflight = max_inflight
        self._lock = threading.Lock()
        self._queues: dict[Hashable, collections.deque[_Job]] = {}
        self._inflight: dict[Hashable, int] = {}

    def run(self, key: Hashable, inputs: Sequence[bytes], send: _Send) -> list[_Result]:
        """`send(inputs)` for this caller, possibly merged with others' inputs.

        Raises the KmsgateError that failed the whole request carrying these inputs.
        """
        job = _Job(inputs)
        with self._lock:
            self._queues.setdefault(key, collections.deque()).append(job)
            batch: list[_Job] | None = None
            if self._inflight.get(key, 0) < self._max_inflight:
                self._inflight[key] = self._inflight.get(key, 0) + 1
                batch = self._take(key)
        while True:
            if batch is not None:
                batch = self._send_and_hand_over(key, batch, send, job)
                if batch is not None:
                    continue  # the next batch starts with our own job: send it too
            if job.finished:
                break
            job.event.wait()
            if job.finished:
                break
            batch, job.batch = job.batch, None
        if job.error is not None:
            raise job.error
        assert job.results is not None
        return job.results

    def _take(self, key: Hashable) -> list[_Job]:
        """Jobs from the front of `key`'s queue, up to `max_items` inputs (at least one).
        Called with the lock held."""
        queue = self._queues[key]
        batch = [queue.popleft()]
        size = len(batch[0].inputs)
        while queue and size + len(queue[0].inputs) <= self._max_items:
            size += len(queue[0].inputs)
            batch.append(queue.popleft())
        if not queue:
            del self._queues[key]
        return batch

    def _send_and_hand_over(
        self, key: Hashable, batch: list[_Job], send: _Send, me: _Job
    ) -> list[_Job] | None:
        """Send `batch`, finish its jobs, pass the slot on. Returns the next batch if it is
        `me` who must send it."""
        self._send(batch, send)
        with self._lock:
            for job in batch:
                job.finished = True
            following: list[_Job] | None = None
            if self._queues.get(key):
                following = self._take(key)  # the slot passes to following[0]'s thread
            elif self._inflight[key] > 1:
                self._inflight[key] -= 1
            else:
                del self._inflight[key]
        for job in batch:
            if job is not me:
                job.event.set()
        if following is None:
            return None
        if following[0] is me:
            return following
        following[0].batch = following
        following[0].event.set()
        return None

    @staticmethod
    def _send(batch: list[_Job], send: _Send) -> None:
        inputs = [item for job in batch for item in job.inputs]
        try:
            results = send(inputs)
            if len(results) != len(inputs):
                raise BackendError("the backend answered a batch with the wrong item count")
        except KmsgateError as exc:
            for job in batch:
                job.error = exc
        except Exception:
            _log.exception("hashivault: a batched request failed unexpectedly")
            for job in batch:
                job.error = BackendError("the key backend request failed")
        else:
            start = 0
            for job in batch:
                job.results = results[start : start + len(job.inputs)]
                start += len(job.inputs)


# -- the backend -----------------------------------------------------------------------------


class HashiVaultBackend(KeyBackend, MacCapable, WrapCapable):
    """Keys in a Vault/OpenBao Transit mount. Thread-safe; every call may block (HTTP)."""

    scheme: ClassVar[str] = "hashivault"

    def __init__(self, name: str, settings: HashiVaultSettings) -> None:
        super().__init__(name)
        self.settings = settings
        session = requests.Session()
        session.trust_env = False  # connection settings come from config only (no env)
        pool = requests.adapters.HTTPAdapter(
            pool_connections=1, pool_maxsize=settings.max_connections
        )
        session.mount("http://", pool)
        session.mount("https://", pool)
        verify: bool | str = str(settings.ca_cert) if settings.ca_cert else True
        cert = (
            (str(settings.client_cert), str(settings.client_key))
            if settings.client_cert and settings.client_key
            else None
        )
        session.verify = verify
        session.cert = cert
        self._client = hvac.Client(
            url=settings.addr,
            token="",  # set by _Auth; "" keeps hvac from reading VAULT_TOKEN or ~/.vault-token
            verify=verify,
            cert=cert,
            timeout=settings.timeout,
            namespace=settings.namespace,
            session=session,
        )
        self._auth = _Auth(name, settings, self._client)
        self._coalescer = _Coalescer(settings.batch_size, settings.max_inflight)
        self._info_cache: dict[tuple[str, str], _KeyInfo] = {}
        self._info_lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> HashiVaultBackend:
        """Raises ConfigError (the message never repeats a configured secret)."""
        try:
            settings = HashiVaultSettings.model_validate(cfg.model_extra or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in exc.errors(include_input=False, include_url=False)
            )
            raise ConfigError(f"backend {name!r} (hashivault): {problems}") from None
        return cls(name, settings)

    @property
    def http_session(self) -> requests.Session:
        """The HTTP session to Vault (tests and benchmarks attach response hooks to count)."""
        session: requests.Session = self._client.adapter.session
        return session

    # -- requests and errors ---------------------------------------------------------------

    def _unavailable(self, why: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.name!r} is {why}", retry_after=self.settings.retry_after
        )

    def _translate(
        self,
        exc: Exception,
        what: str,
        on_invalid: Callable[[str], KmsgateError] | None,
    ) -> KmsgateError:
        """A kmsgate error for an hvac/requests failure; Vault's text goes to the log only."""
        level = logging.INFO if isinstance(exc, hvac.exceptions.InvalidRequest) else logging.WARNING
        _log.log(
            level, "hashivault %s: %s failed: %s: %s", self.name, what, type(exc).__name__, exc
        )
        if isinstance(exc, requests.exceptions.SSLError):
            return BackendError(f"backend {self.name!r} failed TLS verification")
        if isinstance(exc, requests.RequestException):
            return self._unavailable("unreachable")
        if isinstance(exc, hvac.exceptions.VaultDown):
            return self._unavailable("sealed or down")
        if isinstance(
            exc,
            hvac.exceptions.RateLimitExceeded
            | hvac.exceptions.BadGateway
            | hvac.exceptions.VaultNotInitialized,
        ):
            return self._unavailable("not ready")
        if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            return BackendError(
                f"backend {self.name!r} refused kmsgate's credentials (permission denied)"
            )
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            message = " ".join(str(e) for e in (exc.errors or [])) or str(exc)
            if "key not found" in message:
                return KeyDestroyed("the Transit key behind this key version no longer exists")
            if on_invalid is not None:
                return on_invalid(message)
            return BackendError(f"backend {self.name!r} rejected the request to {what}")
        if isinstance(exc, hvac.exceptions.InternalServerError):
            message = " ".join(str(e) for e in (exc.errors or []))
            if "not active" in message or "standby" in message:
                return self._unavailable("not ready (no active node)")
        return BackendError(f"backend {self.name!r} failed to {what}")

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        body: Mapping[str, object] | None = None,
        *,
        on_invalid: Callable[[str], KmsgateError] | None = None,
        not_found: Callable[[], KmsgateError] | None = None,
    ) -> dict[str, Any]:
        """One Vault request (`path` under /v1/); the reply's JSON ({} if none).

        A 403 makes the token be re-acquired and the request retried once. Raises
        BackendUnavailable, BackendError, KeyDestroyed, or what `on_invalid` / `not_found`
        make of a 400 / 404.
        """
        for attempt in (1, 2):
            token = ""
            try:
                self._auth.ensure()
                token = self._auth.token
                reply = self._client.adapter.request(method, f"/v1/{path}", json=body)
            except hvac.exceptions.Forbidden as exc:
                if attempt == 1 and token and self._auth.reacquire(token):
                    continue
                raise self._translate(exc, what, on_invalid) from None
            except hvac.exceptions.InvalidPath as exc:
                if not_found is not None:
                    raise not_found() from None
                raise self._translate(exc, what, on_invalid) from None
            except (hvac.exceptions.VaultError, requests.RequestException, ConfigError) as exc:
                if isinstance(exc, ConfigError):  # a secret file vanished after start-up
                    _log.error("hashivault %s: %s", self.name, exc)
                    raise BackendError(f"backend {self.name!r} cannot authenticate") from None
                raise self._translate(exc, what, on_invalid) from None
            if isinstance(reply, dict):
                return reply
            if isinstance(reply, requests.Response) and reply.status_code == 204:
                return {}
            raise BackendError(f"backend {self.name!r} sent an unexpected reply to {what}")
        raise AssertionError("unreachable")

    def _transit_name(self, name: str) -> str:
        if not _NAME.match(name):
            raise InvalidRequest(f"key name {name!r} cannot name a Transit key")
        return f"{self.settings.key_prefix}{name}"

    def _read_info(self, mount: str, name: str) -> _KeyInfo | None:
        """The Transit key's description, or None if it does not exist (uncached)."""
        try:
            reply = self._call("GET", f"{mount}/keys/{name}", "read a key", not_found=_Missing)
        except _Missing:
            return None
        info = _KeyInfo.parse(reply)
        self._remember(mount, name, info)
        return info

    def _remember(self, mount: str, name: str, info: _KeyInfo) -> None:
        with self._info_lock:
            self._info_cache[(mount, name)] = info

    def _forget(self, mount: str, name: str) -> None:
        with self._info_lock:
            self._info_cache.pop((mount, name), None)

    def _info(self, ref: _Ref) -> _KeyInfo:
        """The (cached) description of the Transit key of `ref`. Raises KeyDestroyed."""
        with self._info_lock:
            cached = self._info_cache.get((ref.mount, ref.name))
        if cached is not None:
            return cached
        info = self._read_info(ref.mount, ref.name)
        if info is None:
            raise KeyDestroyed("the Transit key behind this key version no longer exists")
        return info

    # -- KeyBackend ------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        """Version 1 creates Transit key `<key_prefix><name>` (refused if it exists); version
        N > 1 rotates it to Transit version N. Raises NotSupported, Conflict, BackendError."""
        entry = _TRANSIT_TYPES.get(spec.key_type)
        if entry is None:
            raise NotSupported(f"backend {self.name!r} cannot hold {spec.key_type} keys")
        if spec.version < 1:
            raise InvalidRequest("key versions start at 1")
        transit_type, params = entry
        mount, name = self.settings.mount, self._transit_name(spec.name)
        existing = self._read_info(mount, name)
        if existing is not None:
            self._check_type(name, existing, transit_type)
        if spec.version == 1:
            if existing is not None:
                raise Conflict(
                    f"Transit key {name!r} already exists in mount {mount!r}; "
                    "kmsgate does not take over keys it did not create"
                )
            body: dict[str, object] = {
                "type": transit_type,
                "exportable": False,
                "allow_plaintext_backup": False,
                **params,
            }
            if spec.key_type is KeyType.AES_256_GCM and self.settings.derived:
                body["derived"] = True
            reply = self._call("POST", f"{mount}/keys/{name}", "create a key", body)
            info = _KeyInfo.parse(reply) if reply.get("data") else self._read_info(mount, name)
        else:
            if existing is None:
                raise BackendError(f"Transit key {name!r} is missing: cannot add a version")
            info = existing
            if existing.latest_version == spec.version - 1:
                reply = self._call("POST", f"{mount}/keys/{name}/rotate", "rotate a key")
                info = _KeyInfo.parse(reply) if reply.get("data") else self._read_info(mount, name)
            # latest == version: a rotation whose catalogue write failed; reuse that version
        if info is None:
            raise BackendError(f"Transit key {name!r} vanished while being created")
        self._check_type(name, info, transit_type)
        if info.latest_version != spec.version:
            raise BackendError(
                f"Transit key {name!r} is at version {info.latest_version}, kmsgate expected "
                f"{spec.version}: it was rotated outside kmsgate"
            )
        ref = _Ref(mount, name, spec.version)
        pem = (
            _public_key_pem(spec.key_type, info.public_keys.get(spec.version))
            if spec.key_type.is_asymmetric
            else None
        )
        return BackendKey(str(ref), spec.key_type, spec.name, spec.version, None, pem)

    @staticmethod
    def _check_type(name: str, info: _KeyInfo, transit_type: str) -> None:
        if info.transit_type != transit_type or info.exportable:
            raise BackendError(
                f"Transit key {name!r} is {info.transit_type}"
                f"{' and exportable' if info.exportable else ''}, not {transit_type}"
            )

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        [result] = self.sign_many(key, [SignMessage(data, alg, prehashed)])
        if isinstance(result, KmsgateError):
            raise result
        return result

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """One Transit `sign` request per (algorithm, prehashed) group and `batch_size`
        items. Unavailable fails the whole call; other errors stay in place."""
        ref = _Ref.parse(key.ref)
        results: list[bytes | KmsgateError | None] = [None] * len(messages)
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, message in enumerate(messages):
            try:
                self._check_sign(key.key_type, message)
            except KmsgateError as exc:
                results[index] = exc
                continue
            groups.setdefault((message.alg.name, message.prehashed), []).append(index)
        size = self.settings.batch_size
        for (alg_name, prehashed), indexes in groups.items():
            params = self._sign_params(messages[indexes[0]].alg, prehashed)

            def send(
                inputs: Sequence[bytes], params: Mapping[str, object] = params
            ) -> list[_Result]:
                return self._sign_chunk(ref, params, inputs)

            for start in range(0, len(indexes), size):
                chunk = indexes[start : start + size]
                try:
                    signed = self._coalescer.run(
                        ("sign", key.ref, alg_name, prehashed),
                        [messages[i].data for i in chunk],
                        send,
                    )
                except Unavailable:
                    raise
                except KmsgateError as exc:
                    signed = [exc] * len(chunk)
                for index, result in zip(chunk, signed, strict=True):
                    results[index] = result
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    @staticmethod
    def _check_sign(key_type: KeyType, message: SignMessage) -> None:
        sign_algorithm(key_type, message.alg.name)  # raises InvalidRequest if it does not fit
        if message.prehashed:
            check_digest(message.alg, message.data)

    @staticmethod
    def _sign_params(alg: SignAlg, prehashed: bool) -> dict[str, object]:
        if alg.scheme is Scheme.ED25519:
            return {}
        assert alg.hash is not None
        params: dict[str, object] = {
            "hash_algorithm": _TRANSIT_HASH[alg.hash],
            "prehashed": prehashed,
        }
        if alg.scheme is Scheme.ECDSA:
            params["marshaling_algorithm"] = "asn1"
        elif alg.scheme is Scheme.RSA_PSS:
            params["signature_algorithm"] = "pss"
            params["salt_length"] = str(alg.hash.digest_size)  # interoperable; Transit: max
        else:
            params["signature_algorithm"] = "pkcs1v15"
        return params

    def _sign_chunk(
        self, ref: _Ref, params: Mapping[str, object], inputs: Sequence[bytes]
    ) -> list[bytes | KmsgateError]:
        body = {
            **params,
            "key_version": ref.version,
            "batch_input": [{"input": _b64(data)} for data in inputs],
        }
        reply = self._call("POST", f"{ref.mount}/sign/{ref.name}", "sign", body)
        return self._batch_results(reply, ref, len(inputs), "signature", "signature")

    def destroy(self, key: BackendKey) -> None:
        """Destroy one Transit version as far as Transit allows.

        - the only version left: `deletion_allowed=true`, then delete the whole Transit key;
        - the oldest version left: raise `min_decryption_version` / `min_encryption_version`
          past it and trim it (`min_available_version`): its material is gone;
        - a version with older live versions below it (a rotation the catalogue rolled back):
          Transit cannot remove it alone. It stays unused; the next rotation reuses it, and
          destroying the whole key removes it.
        An already missing key or version is not an error. Raises BackendUnavailable,
        BackendError.
        """
        ref = _Ref.parse(key.ref)
        info = self._read_info(ref.mount, ref.name)
        self._forget(ref.mount, ref.name)
        if info is None or ref.version not in info.available_versions:
            return
        base = f"{ref.mount}/keys/{ref.name}"
        available = info.available_versions
        if len(available) == 1:
            self._call("POST", f"{base}/config", "allow deletion", {"deletion_allowed": True})
            self._call("DELETE", base, "delete a key")
        elif ref.version == available[0]:
            floor = ref.version + 1
            self._call(
                "POST",
                f"{base}/config",
                "retire a version",
                {
                    "min_decryption_version": max(info.min_decryption_version, floor),
                    "min_encryption_version": max(info.min_encryption_version, floor),
                },
            )
            self._call("POST", f"{base}/trim", "trim a version", {"min_available_version": floor})
        else:
            _log.warning(
                "hashivault %s: Transit cannot destroy version %s of %s alone (older versions "
                "are live); it stays unused until the key is destroyed",
                self.name,
                ref.version,
                ref.name,
            )

    def retire_versions_below(self, key: BackendKey, min_version: int) -> None:
        """Mirror kmsgate's `min_decrypt_version` onto Transit's `min_decryption_version`, so
        Transit itself refuses to decrypt (and verify HMACs) below it. Never lowers it.
        Raises BackendUnavailable, BackendError."""
        ref = _Ref.parse(key.ref)
        info = self._info(ref)
        if min_version <= info.min_decryption_version:
            return
        body: dict[str, object] = {"min_decryption_version": min_version}
        if info.min_encryption_version and info.min_encryption_version < min_version:
            body["min_encryption_version"] = min_version
        self._call("POST", f"{ref.mount}/keys/{ref.name}/config", "set min version", body)
        self._forget(ref.mount, ref.name)

    def status(self) -> BackendStatus:
        """Vault's health (unsealed, initialised) and whether it accepts kmsgate's token."""
        try:
            health = self._client.adapter.request("GET", "/v1/sys/health", raise_exception=False)
        except requests.RequestException as exc:
            _log.warning("hashivault %s: health check failed: %s", self.name, exc)
            tls = isinstance(exc, requests.exceptions.SSLError)
            return BackendStatus(False, "TLS verification failed" if tls else "unreachable")
        code = health.status_code if isinstance(health, requests.Response) else 200
        if code == 503:
            return BackendStatus(False, "sealed")
        if code == 501:
            return BackendStatus(False, "not initialized")
        if code not in (200, 429, 472, 473):
            return BackendStatus(False, f"unhealthy (HTTP {code})")
        try:
            self._call("GET", "auth/token/lookup-self", "check the token")
        except Unavailable as exc:
            return BackendStatus(False, exc.detail.removeprefix(f"backend {self.name!r} is "))
        except KmsgateError:
            return BackendStatus(False, "kmsgate's credentials were refused")
        return BackendStatus(True, "ok" if code == 200 else "ok (standby)")

    def close(self) -> None:
        self._auth.close()
        self._client.adapter.close()
        with self._info_lock:
            self._info_cache.clear()

    # -- MacCapable ------------------------------------------------------------------------

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        expected = _MAC_HASH.get(key.key_type)
        if expected is None:
            raise InvalidRequest(f"a {key.key_type} key cannot compute MACs")
        if hash_name is not expected:
            raise InvalidRequest(f"a {key.key_type} key computes HMAC-{expected.upper()} only")
        ref = _Ref.parse(key.ref)

        def send(inputs: Sequence[bytes]) -> list[_Result]:
            return self._mac_chunk(ref, hash_name, inputs)

        [tag] = self._coalescer.run(("hmac", key.ref, hash_name), [data], send)
        if isinstance(tag, KmsgateError):
            raise tag
        return tag

    def _mac_chunk(
        self, ref: _Ref, hash_name: HashName, inputs: Sequence[bytes]
    ) -> list[bytes | KmsgateError]:
        body = {
            "algorithm": _TRANSIT_HASH[hash_name],
            "key_version": ref.version,
            "batch_input": [{"input": _b64(data)} for data in inputs],
        }
        reply = self._call("POST", f"{ref.mount}/hmac/{ref.name}", "compute a MAC", body)
        return self._batch_results(
            reply, ref, len(inputs), "hmac", "MAC", expected_size=hash_name.digest_size
        )

    def _batch_results(
        self,
        reply: Mapping[str, Any],
        ref: _Ref,
        count: int,
        attribute: str,
        what: str,
        *,
        expected_size: int | None = None,
    ) -> list[bytes | KmsgateError]:
        """The `attribute` values of a reply's `batch_results`, prefix stripped and version checked;
        a failed item becomes a BackendError in its place (Vault's text is logged only).
        Raises BackendError if the reply itself is malformed."""
        try:
            items = reply["data"]["batch_results"]
            if not isinstance(items, list) or len(items) != count:
                raise TypeError
        except (KeyError, TypeError):
            raise BackendError(f"backend {self.name!r} sent an unexpected {what} reply") from None
        results: list[bytes | KmsgateError] = []
        for item in items:
            if not isinstance(item, Mapping) or item.get("error"):
                error = item.get("error") if isinstance(item, Mapping) else item
                _log.warning("hashivault %s: %s item failed: %s", self.name, what, error)
                results.append(BackendError(f"backend {self.name!r} could not make this {what}"))
                continue
            try:
                value = _strip_prefix(item.get(attribute), ref.version, what)
                if expected_size is not None and len(value) != expected_size:
                    raise BackendError(f"backend {self.name!r} returned a {what} of wrong length")
                results.append(value)
            except BackendError as exc:
                results.append(exc)
        return results

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        return hmac.compare_digest(self.mac(key, data, hash_name), mac)

    # -- WrapCapable -----------------------------------------------------------------------

    @staticmethod
    def _require_aes(key: BackendKey) -> None:
        if key.key_type.usage is not KeyUsage.ENCRYPT:
            raise InvalidRequest(f"a {key.key_type} key cannot wrap or unwrap")

    @staticmethod
    def _aead_params(info: _KeyInfo, aad: bytes) -> dict[str, object]:
        params: dict[str, object] = {}
        if aad:
            params["associated_data"] = _b64(aad)
        if info.derived:
            params["context"] = _b64(_DERIVE_CONTEXT + aad)
        return params

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        ref = _Ref.parse(key.ref)
        info = self._info(ref)  # also keeps encrypt from re-creating a destroyed key (upsert)
        body = {
            "plaintext": _b64(plaintext),
            "key_version": ref.version,
            **self._aead_params(info, aad),
        }
        reply = self._call("POST", f"{ref.mount}/encrypt/{ref.name}", "encrypt", body)
        raw = _strip_prefix((reply.get("data") or {}).get("ciphertext"), ref.version, "ciphertext")
        return _WRAP_FORMAT + ref.version.to_bytes(4, "big") + raw

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt with the Transit version recorded in the wrapped form (so a key handle
        survives rotation: auto-unseal). Raises DecryptionFailed, KeyDestroyed, ..."""
        self._require_aes(key)
        if len(ciphertext) < _WRAP_MIN_LEN or not ciphertext.startswith(_WRAP_FORMAT):
            raise DecryptionFailed()
        version = int.from_bytes(ciphertext[1:5], "big")
        if version < 1:
            raise DecryptionFailed()
        ref = _Ref.parse(key.ref)
        info = self._info(ref)
        body = {
            "ciphertext": f"vault:v{version}:{_b64(ciphertext[5:])}",
            **self._aead_params(info, aad),
        }
        reply = self._call(
            "POST",
            f"{ref.mount}/decrypt/{ref.name}",
            "decrypt",
            body,
            on_invalid=lambda _message: DecryptionFailed(),
        )
        try:
            return _unb64((reply.get("data") or {}).get("plaintext") or "")
        except (ValueError, TypeError):
            raise BackendError(f"backend {self.name!r} returned malformed plaintext") from None

    # -- auto-unseal support -----------------------------------------------------------------

    def wrapping_key(self, transit_name: str, *, mount: str | None = None) -> BackendKey:
        """A handle on an existing aes256-gcm96 Transit key (latest version), for wrapping
        softkms's root key outside the catalogue (auto-unseal). `transit_name` is the Transit
        key's own name (no prefix added). `unwrap` works across later Transit rotations.

        Raises NotFound if it does not exist, InvalidRequest if it is not aes256-gcm96 or
        is exportable, BackendUnavailable.
        """
        mount = mount or self.settings.mount
        if not _NAME.match(transit_name) or not _MOUNT.match(mount):
            raise InvalidRequest("malformed Transit key or mount name")
        info = self._read_info(mount, transit_name)
        if info is None:
            raise NotFound(f"no Transit key {transit_name!r} in mount {mount!r}")
        if info.transit_type != "aes256-gcm96" or info.exportable:
            raise InvalidRequest(
                f"Transit key {transit_name!r} must be a non-exportable aes256-gcm96 key"
            )
        ref = _Ref(mount, transit_name, info.latest_version)
        return BackendKey(str(ref), KeyType.AES_256_GCM, transit_name, info.latest_version)


class _Missing(KmsgateError):
    """Internal: a 404 from a key read (the key does not exist); never leaves this module."""
